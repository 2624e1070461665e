"""Free-text environments: Countdown (safe expression parser, rewards, solver) and multi-turn math QA."""

from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from turnrl.envs import CountdownEnv, MathQAEnv, StaticQAEnv, check_env, make
from turnrl.envs.countdown import (
    EvaluationError,
    ExpressionError,
    evaluate,
    literals,
    parse_expression,
)
from turnrl.envs.math_qa import generate_problem
from turnrl.envs.qa import DEFAULT_FEEDBACK, answers_match, load_jsonl, normalize_answer, sample_path
from turnrl.envs.solvers import countdown_solve


def _value(text: str) -> Fraction:
    return evaluate(parse_expression(text))


# ---------------------------------------------------------------------- countdown: parser


@pytest.mark.parametrize("text, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("8 / (3 - 8 / 3)", 24), ("-3 + 5", 2), ("--3", 3),
    ("10 - 4 - 3", 3), ("24 / 4 / 3", 2), ("2 × 3 ÷ 4", Fraction(3, 2)), ("  (((7)))  ", 7),
    ("3 * 4 = 12", 12), ("3 * 4 = 13", 12), ("1/3 + 1/3 + 1/3", 1),
])
def test_parser_values(text, value):
    assert _value(text) == value


@pytest.mark.parametrize("text", [
    "", "   ", "1 +", "(1 + 2", "1 + 2)", "2 ** 3", "2 ^ 3", "1e309", "3.14", "0x10", "nan",
    "__import__('os').system('ls')", "abs(-3)", "1; 2", "1 2", "+3", "1 = 2 = 3", "a = 1",
    "1" * 11, "(" * 40 + "1" + ")" * 40, "-" * 40 + "1", "1 + " * 60 + "1", "٣ + 4", "３ + 4",
])
def test_parser_rejects_malformed_text(text):
    with pytest.raises(ExpressionError):
        parse_expression(text)


def test_parser_limits_and_evaluation_errors():
    tree = parse_expression("9" * 10)  # ten digits parse...
    with pytest.raises(EvaluationError, match="exceeds"):
        evaluate(tree)  # ...but exceed the 1e9 magnitude limit when evaluated
    with pytest.raises(EvaluationError, match="division by zero"):
        _value("3 / (4 - 4)")
    with pytest.raises(EvaluationError):
        _value("99999 * 99999")
    with pytest.raises(EvaluationError):
        _value("1 / 99999 / 99999")  # denominators are limited too
    assert literals(parse_expression("(3 + 4) * -6 - 1")) == [3, 4, 6, 1]
    with pytest.raises(ExpressionError, match="longer than 200"):
        parse_expression("1 + " * 50 + "1")


# ---------------------------------------------------------------------- countdown: env


def test_countdown_observation_and_rewards():
    env = CountdownEnv()
    obs, info = env.reset(seed=5)
    assert re.fullmatch(r"Target: \d+, nums: \[\d+(, \d+){2,3}\]", obs)
    target, nums = info["target"], info["numbers"]
    solution = env.expert_action()
    assert _value(solution) == target and sorted(literals(parse_expression(solution))) == sorted(nums)

    obs, reward, term, trunc, info = env.step(solution)
    assert (reward, term, trunc, info["success"], info["verdict"]) == (1.0, True, False, True, "correct")
    assert obs.splitlines()[-1].endswith("(correct)")

    env.reset(seed=5)
    wrong = " + ".join(map(str, nums)) if sum(nums) != target else " * ".join(map(str, nums))
    _, reward, term, _, info = env.step(wrong)
    assert reward == 0.1 and term and not info["success"] and info["verdict"] == "wrong value"

    env.reset(seed=5)
    _, reward, term, _, info = env.step(f"{target}")  # the target itself: wrong numbers
    assert reward == 0.0 and term and info["action_valid"] and info["verdict"] == "wrong numbers"


def test_countdown_invalid_answers_do_not_end_the_episode():
    env = CountdownEnv()
    start, _ = env.reset(seed=1)
    for bad in ["", "__import__('os')", "x" * 500, "2 ** 3", "(1 + 2"]:
        obs, reward, term, trunc, info = env.step(bad)
        assert obs.startswith("Invalid expression '") and obs.endswith("\n" + start)
        assert reward == 0.0 and not (term or trunc) and not info["action_valid"]
    assert env.step(env.expert_action())[2]


def test_countdown_division_by_zero_is_a_wrong_answer():
    env = CountdownEnv()
    obs, _ = env.reset(seed=0, options={"target": 7, "numbers": [2, 2, 5]})
    assert obs == "Target: 7, nums: [2, 2, 5]"
    assert env.expert_action() == "2 + 2 + 5"  # unsolvable given puzzle: the expert falls back to a sum
    _, reward, term, _, info = env.step("5 / (2 - 2)")
    assert (reward, term, info["action_valid"], info["verdict"]) == (0.1, True, True, "undefined")
    env.reset(seed=0, options={"target": 7, "numbers": [2, 2, 5]})
    _, reward, _, _, info = env.step("5 / (2 - 2) + 1")
    assert (reward, info["verdict"]) == (0.0, "wrong numbers")
    with pytest.raises(ValueError, match="go together"):
        env.reset(options={"target": 7})


def test_countdown_solver():
    assert _value(countdown_solve((3, 3, 8, 8), 24)) == 24
    assert countdown_solve((1, 1, 1, 1), 24) is None
    assert countdown_solve((2, 3), 6, "+-") is None and countdown_solve((2, 4), 6, "+-") == "2 + 4"


def test_countdown_generator_guarantees_solvable_puzzles():
    env = CountdownEnv()
    sizes = set()
    for seed in range(200):
        _, info = env.reset(seed=seed)
        assert 1 <= info["target"] <= 100 and all(1 <= n <= 99 for n in info["numbers"])
        sizes.add(len(info["numbers"]))
        assert env.step(env.expert_action())[4]["success"], seed
    assert sizes == {3, 4}
    plus_minus = CountdownEnv(ops="+-")
    for seed in range(50):
        _, info = plus_minus.reset(seed=seed)
        assert countdown_solve(tuple(info["numbers"]), info["target"], "+-") is not None


def test_countdown_bad_arguments():
    for kwargs in ({"ops": "+%"}, {"min_numbers": 5, "max_numbers": 4}, {"max_chars": 0}):
        with pytest.raises(ValueError):
            CountdownEnv(**kwargs)


# ---------------------------------------------------------------------- answer normalisation


@pytest.mark.parametrize("a, b", [
    ("3", "3.0"), ("3", " 3 "), ("1/2", "0.5"), ("2/4", ".5"), ("1,000", "1000"), ("$1,000.", "1000"),
    ("\\boxed{42}", "42"), ("New  York", "new york"), ("-0", "0"), ("+7", "7"), ("17/14", "34/28"),
])
def test_answers_match(a, b):
    assert answers_match(a, b)


@pytest.mark.parametrize("a, b", [("3", "4"), ("0.33", "1/3"), ("1,2", "12"), ("12", "1 2 0"), ("2/0", "0")])
def test_answers_differ(a, b):
    assert not answers_match(a, b)


def test_normalize_answer_never_builds_huge_numbers():
    assert normalize_answer("1" * 5000) == "1" * 5000  # compared as text, no big-int arithmetic
    assert normalize_answer("1e999999999") == "1e999999999"


# ---------------------------------------------------------------------- math QA (UFO)


def _qa(**kwargs) -> MathQAEnv:
    env = MathQAEnv(**kwargs)
    env.reset(seed=3)
    return env


def test_qa_feedback_and_turn_decay():
    env = _qa()
    gold = env.expert_action()
    wrong = [str(int(gold) + k) for k in (1, 2, 3)]
    for i, answer in enumerate(wrong):
        obs, reward, term, trunc, info = env.step(answer)
        assert obs == DEFAULT_FEEDBACK and reward == 0.0 and not (term or trunc)
        assert info["attempt"] == i and info["action_valid"]
    obs, reward, term, trunc, info = env.step(f" {gold}.0 ")
    assert term and not trunc and info["success"] and reward == pytest.approx(0.5**3)
    assert info["unique_answer_ratio"] == 1.0 and info["repetition_penalty"] == 0.0
    assert obs.endswith("\nCorrect!")


def test_qa_repetition_penalty_hand_computed():
    env = _qa()
    gold = env.expert_action()
    env.step("4" if gold != "4" else "5")
    env.step("4" if gold != "4" else "5")
    _, reward, term, _, info = env.step(gold)
    # T = 3 answers, E = 2 distinct: 0.5**2 - 0.5 * (1 - 2/3)
    assert term and reward == pytest.approx(0.25 - 0.5 / 3)
    assert info["unique_answer_ratio"] == pytest.approx(2 / 3)


def test_qa_truncates_after_max_attempts_with_penalty():
    env = _qa(max_attempts=5, feedback="Try again.")
    gold = env.expert_action()
    bad = "-1" if gold != "-1" else "-2"
    results = [env.step(bad) for _ in range(5)]
    assert [r.obs for r in results[:4]] == ["Try again."] * 4
    last = results[-1]
    assert last.truncated and not last.terminated and not last.info["success"]
    assert last.reward == pytest.approx(-0.5 * (1 - 1 / 5))
    after = env.step(gold)
    assert not after.info["action_valid"] and after.reward == 0.0 and after.truncated


def test_qa_invalid_answers_are_not_attempts():
    env = _qa(max_attempts=1, max_answer_chars=10)
    question = env.render()
    for bad in ["", "   ", "x" * 11]:
        obs, reward, term, trunc, info = env.step(bad)
        assert obs.startswith("Invalid answer '") and obs.endswith("\n" + question)
        assert not info["action_valid"] and reward == 0.0 and not (term or trunc)
    _, reward, term, _, _ = env.step(env.expert_action())
    assert term and reward == 1.0


def test_qa_arguments_and_prompt():
    for kwargs in ({"difficulty": 0}, {"difficulty": 6}, {"kind": "poetry"}, {"gamma": 1.5},
                   {"max_attempts": 0}, {"feedback": "two\nlines"}, {"repetition_penalty": -1}):
        with pytest.raises(ValueError):
            MathQAEnv(**kwargs)
    prompt = MathQAEnv(feedback="Nope.").system_prompt()
    assert "Nope." in prompt and "<answer>" in prompt and "at most 5 answers" in prompt
    custom = StaticQAEnv(instruction="Answer trivia questions in <answer>...</answer>.", max_attempts=1)
    assert custom.system_prompt() == "Answer trivia questions in <answer>...</answer>."


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_math_generator_answers_are_right(difficulty):
    rng = random.Random(difficulty)
    questions = set()
    for _ in range(100):
        item = generate_problem(rng, difficulty, "arithmetic")
        expression = item.question.removeprefix("What is ").removesuffix("?")
        assert _value(expression) == Fraction(item.answer), item  # cross-check with our own parser
        questions.add(item.question)
        word = generate_problem(rng, difficulty, "word")
        assert normalize_answer(word.answer) == word.answer.strip().lower() or "/" in word.answer
        questions.add(word.question)
    assert len(questions) > 120


def test_math_qa_expert_and_determinism():
    for difficulty in (1, 5):
        env = make("math_qa", difficulty=difficulty)
        for seed in range(100):
            env.reset(seed=seed)
            assert env.step(env.expert_action()).info["success"]
    a, b = make("math_qa"), make("math_qa")
    assert [a.reset(seed=s)[0] for s in range(20)] == [b.reset(seed=s)[0] for s in range(20)]


# ---------------------------------------------------------------------- static data


def test_shipped_sample_and_jsonl_env():
    items = load_jsonl(sample_path())
    assert len(items) >= 50 and all(i.question and i.answer for i in items)
    env = make("math_qa_jsonl")
    seen = set()
    for seed in range(200):
        obs, _ = env.reset(seed=seed)
        seen.add(obs)
        assert env.step(env.expert_action()).info["success"]
    assert len(seen) >= 40


def test_jsonl_custom_file_and_errors(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text('{"question": "Capital of France?", "answer": "Paris"}\n\n{"question": "2+2?", "answer": 4}\n')
    env = StaticQAEnv(path=str(good))
    assert len(env.items) == 2 and env.items[1].answer == "4"
    check_env(env)
    env.reset(seed=0)
    while env.render() != "Capital of France?":
        env.reset()
    assert env.step("  paris ").info["success"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok?", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        StaticQAEnv(path=str(bad))
    (tmp_path / "missing_key.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        StaticQAEnv(path=str(tmp_path / "missing_key.jsonl"))
    with pytest.raises(ValueError, match="not found"):
        StaticQAEnv(path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="either path or hf_dataset"):
        StaticQAEnv(path=str(good), hf_dataset="gsm8k")


def test_hf_loading_is_optional():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the 'datasets' package"):
            StaticQAEnv(hf_dataset="gsm8k")
    with pytest.raises(ValueError, match="unknown Hugging Face QA dataset"):
        StaticQAEnv(hf_dataset="no_such_set")

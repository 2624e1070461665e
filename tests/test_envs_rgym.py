"""Env reasoning_gym: Reasoning Gym's procedural tasks scored by their own verifiers (turnrl.envs.rgym)."""
import itertools
import json

import pytest

from turnrl.envs import check_env, make
from turnrl.envs.qa import DEFAULT_FEEDBACK, normalize_answer

rg = pytest.importorskip("reasoning_gym")

TASKS = ["basic_arithmetic", "leg_counting", "spell_backward", "countdown", "word_sorting"]


@pytest.mark.parametrize("task", TASKS)
def test_tasks_pass_check_env_and_the_solver_answers_them(task):
    env = make("reasoning_gym", task=task)
    check_env(env)
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        assert obs.strip()
        _obs, reward, term, _trunc, info = env.step(env.expert_action())
        assert term and info["success"] and reward == 1.0


def test_each_seed_is_the_task_generators_question_for_a_seed_drawn_from_it():
    env = make("reasoning_gym", task="basic_arithmetic")
    questions = [env.reset(seed=seed)[0] for seed in range(200)]
    assert len(set(questions)) >= 190  # procedural: (almost) every seed its own question
    held_out = {env.reset(seed=seed)[0] for seed in range(50)}
    training = {env.reset(seed=1_000_000 + seed)[0] for seed in range(50)}
    assert len(held_out & training) <= 2
    for seed in (0, 7):  # the question is the task generator's own, for the seed the episode drew
        obs, _ = env.reset(seed=seed)
        assert obs == rg.create_dataset("basic_arithmetic", seed=env._dataset.seed, size=1)[0]["question"].strip()


def _sum_expressions(numbers, target):
    """Expressions `a ± b ± c ...` over every number once that evaluate to `target`."""
    for order in itertools.permutations(numbers):
        for signs in itertools.product("+-", repeat=len(numbers) - 1):
            text = str(order[0]) + "".join(f" {s} {n}" for s, n in zip(signs, order[1:]))
            if eval(text) == target:
                yield text


def test_answers_are_scored_by_the_tasks_verifier_not_by_string_match():
    env = make("reasoning_gym", task="countdown")
    for seed in range(200):  # a puzzle that a plain sum/difference also solves, other than the reference
        env.reset(seed=seed)
        reference = normalize_answer(env.expert_action())
        meta = env._entry["metadata"]
        other = next((e for e in _sum_expressions(meta["numbers"], meta["target"])
                      if normalize_answer(e) != reference), None)
        if other is not None:
            break
    assert other is not None
    _obs, reward, term, _trunc, info = env.step(other)
    assert term and info["success"] and reward == 1.0
    env.reset(seed=seed)
    _obs, reward, term, _trunc, info = env.step(f"{other} + 0")  # a number not given: the verifier refuses
    assert not info["success"] and reward == 0.0


def test_wrong_answers_get_feedback_and_retries_then_the_episode_ends():
    env = make("reasoning_gym", task="leg_counting", max_attempts=3)
    env.reset(seed=1)
    answer = env.expert_action()
    obs, reward, term, trunc, info = env.step(str(int(answer) + 1))
    assert (obs, reward, term, trunc, info["success"]) == (DEFAULT_FEEDBACK, 0.0, False, False, False)
    _obs, reward, term, _trunc, info = env.step(answer)  # second attempt: gamma^1
    assert term and info["success"] and reward == pytest.approx(0.5)


def test_partial_credit_pays_the_verifiers_score_on_a_single_attempt():
    env = make("reasoning_gym", task="spell_backward", partial_credit=True, max_attempts=1)
    env.reset(seed=3)
    answer = env.expert_action()
    near = answer[:-1]
    expected = env._dataset.score_answer(near, env._entry)
    assert 0 < expected < 1
    _obs, reward, term, trunc, info = env.step(near)
    assert reward == pytest.approx(expected) and trunc and not term and not info["success"]
    with pytest.raises(ValueError, match="max_attempts=1"):
        make("reasoning_gym", task="spell_backward", partial_credit=True)


def test_a_verifier_that_raises_scores_a_wrong_answer(monkeypatch):
    env = make("reasoning_gym", task="basic_arithmetic", max_attempts=2)
    env.reset(seed=0)

    def crash(*_args):
        raise RecursionError("deep")

    monkeypatch.setattr(env._dataset, "score_answer", crash)
    _obs, reward, term, trunc, info = env.step("((((1))))")
    assert (reward, term, trunc, info["success"], info["action_valid"]) == (0.0, False, False, False, True)


def test_bad_task_or_config_is_a_clear_error():
    with pytest.raises(ValueError, match="did you mean 'leg_counting'"):
        make("reasoning_gym", task="leg_countin")
    with pytest.raises(ValueError, match="rejected its config"):
        make("reasoning_gym", task="basic_arithmetic", no_such_field=3)
    env = make("reasoning_gym", task="basic_arithmetic", min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    obs, _ = env.reset(seed=0)
    assert sum(ch.isdigit() for ch in obs) == 2  # two one-digit terms, as configured


def test_a_training_run_on_a_reasoning_gym_task(tmp_path):
    from test_train import tiny_config

    from turnrl.train import train

    cfg = tiny_config(tmp_path / "run", iterations=1)
    cfg.env.name = "reasoning_gym"
    cfg.env.kwargs = {"task": "basic_arithmetic", "min_terms": 2, "max_terms": 2, "max_digits": 1}
    cfg.rollout.max_new_tokens = 8
    train(cfg, log=lambda *_: None)
    evals = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(evals) == {"untrained", "after_sft", "after_rl"}
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    first = samples[0]["episodes"][0]["transcript"][0][1]
    assert first.startswith("Calculate")  # the task's question is the observation

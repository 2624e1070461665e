"""Static question-answer data as a multi-turn env with unary feedback (UFO), plus answer matching.

UFO (arXiv 2507.14295) turns a single-turn QA dataset into an MDP: the model answers, a wrong
answer gets only a generic "try again" line, and the episode goes on with the history in
context until the first correct answer or the attempt limit. Success at attempt t pays γ^t, and
an episode-level repetition penalty rewards trying *different* answers.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
from abc import abstractmethod
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from .base import Env, StepResult, quote_action

DEFAULT_FEEDBACK = "Incorrect. Please think again."
DEFAULT_INSTRUCTION = ("You are solving math problems. Give only the final answer (a number) inside "
                       "<answer>...</answer>, e.g. <answer>42</answer>.")
MAX_ANSWER_CHARS = 200
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_FRACTION = re.compile(rf"({_NUMBER.pattern})/({_NUMBER.pattern})")
_BOXED = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_MAX_NUMBER_CHARS = 40  # longer digit strings are compared as text (no huge-int arithmetic)


class QAItem(NamedTuple):
    question: str
    answer: str


# ---------------------------------------------------------------------- answer matching


def _to_fraction(text: str) -> Fraction | None:
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    if _NUMBER.fullmatch(text):
        return Fraction(text.replace(",", ""))
    match = _FRACTION.fullmatch(text)
    if match:
        den = Fraction(match.group(2).replace(",", ""))
        return Fraction(match.group(1).replace(",", "")) / den if den != 0 else None
    return None


def normalize_answer(text: str) -> str:
    """Canonical form of an answer, so that equal answers compare equal as strings.

    Strips surrounding whitespace, one `\\boxed{...}`, dollar signs and a trailing period.
    Numbers (thousands commas allowed, decimals, simple fractions `a/b`) become exact
    fractions printed as `n` or `n/d`: "3.0", "3" and "+3" all give "3"; "1/2", "0.5" and
    "2/4" give "1/2"; "1,000" gives "1000". Anything else is lower-cased with all
    whitespace removed (UFO's rule): "New  York" and "new york" both give "newyork".
    """
    s = text.strip()
    boxed = _BOXED.match(s)
    if boxed:
        s = boxed.group(1).strip()
    s = s.replace("\\$", "").replace("$", "").strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    compact = "".join(s.split())
    value = _to_fraction(compact)
    if value is not None:
        return str(value)
    return compact.lower()


def answers_match(prediction: str, gold: str) -> bool:
    """True when the two answers have the same `normalize_answer` form."""
    return normalize_answer(prediction) == normalize_answer(gold)


# ---------------------------------------------------------------------- the env


class MultiTurnQAEnv(Env):
    """Base class: answer a question, retry after unary feedback (subclasses choose the questions).

    Subclasses implement `sample_item(rng) -> QAItem`. See `StaticQAEnv` (JSONL / Hugging Face
    data) and `turnrl.envs.math_qa.MathQAEnv` (procedural questions).
    """

    free_text = True
    multi_attempt = True
    partial_credit = False  # reward = gamma^t x answer_score (a verifier's partial credit) instead of success only

    def __init__(self, max_attempts: int = 5, gamma: float = 0.5, repetition_penalty: float = 0.5,
                 feedback: str = DEFAULT_FEEDBACK, max_answer_chars: int = MAX_ANSWER_CHARS,
                 instruction: str = DEFAULT_INSTRUCTION) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if repetition_penalty < 0.0:
            raise ValueError(f"repetition_penalty must be >= 0, got {repetition_penalty}")
        if not isinstance(feedback, str) or not feedback.strip() or "\n" in feedback:
            raise ValueError("feedback must be one non-empty line of text")
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
        self.max_attempts, self.gamma = max_attempts, float(gamma)
        self.repetition_penalty, self.feedback = float(repetition_penalty), feedback
        self.max_answer_chars, self.instruction = max_answer_chars, instruction
        self._item: QAItem | None = None
        self._answers: list[str] = []  # normalised valid answers so far
        self._done = self._success = False

    @abstractmethod
    def sample_item(self, rng: random.Random) -> QAItem:
        """The question of a new episode, drawn with the episode's own RNG."""

    def answer_score(self, answer: str) -> float:
        """How well `answer` (the reply's answer text) answers the current question, in [0, 1]; 1 = correct.
        Default: 1.0 when it matches the item's answer under `normalize_answer`; envs with their own verifier
        override it."""
        return float(normalize_answer(answer) == normalize_answer(self._require_reset().answer))

    # ------------------------------------------------------------------ gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        rng = random.Random(self._next_episode_seed(seed))
        self._item = self.sample_item(rng)
        self._answers = []
        self._done = self._success = False
        return self.render(), {"max_attempts": self.max_attempts}

    def step(self, action: str) -> StepResult:
        self._require_reset()
        if self._done:
            return self._after_done_step(self._success, not self._success, self._success)
        if not isinstance(action, str) or not action.strip() or len(action) > self.max_answer_chars:
            shown = quote_action(action) if isinstance(action, str) else repr(action)
            message = (f"Invalid answer '{shown}': give a non-empty final answer of at most "
                       f"{self.max_answer_chars} characters.")
            info = {"success": False, "action_valid": False, "action_effective": False}
            return StepResult(message + "\n" + self.render(), 0.0, False, False, info)

        attempt = len(self._answers)  # 0-based index of this answer
        self._answers.append(normalize_answer(action))
        score = self.answer_score(action)
        correct = score >= 1.0
        reward = self.gamma**attempt * (score if self.partial_credit else float(correct))
        self._done = correct or len(self._answers) >= self.max_attempts
        self._success = correct
        info = {"success": correct, "action_valid": True, "action_effective": True,
                "attempt": attempt, "attempts_left": self.max_attempts - len(self._answers)}
        if self._done:
            # UFO's episode-level penalty λ·(1 − E/T), paid once on the final step.
            distinct = len(set(self._answers))
            penalty = self.repetition_penalty * (1.0 - distinct / len(self._answers))
            reward -= penalty
            info.update(unique_answer_ratio=distinct / len(self._answers), repetition_penalty=penalty)
            return StepResult(self.render(), round(reward, 9), correct, not correct, info)
        return StepResult(self.feedback, reward, False, False, info)

    def render(self) -> str:
        item = self._require_reset()
        if not self._done:
            return item.question
        status = "Correct!" if self._success else f"Incorrect. No attempts left ({self.max_attempts} used)."
        return f"{item.question}\n{status}"

    def system_prompt(self) -> str:
        if self.max_attempts == 1:
            return self.instruction
        return (
            f"{self.instruction}\nIf your answer is wrong you are told \"{self.feedback}\" and may answer again; "
            f"you have at most {self.max_attempts} answers. An earlier correct answer is worth more, and "
            "repeating a wrong answer is penalised."
        )

    def expert_action(self) -> str:
        return self._require_reset().answer

    def _require_reset(self) -> QAItem:
        if self._item is None:
            raise RuntimeError("call reset() before using the environment")
        return self._item


# ---------------------------------------------------------------------- static data

SAMPLE_FILE = "math_qa_sample.jsonl"


def sample_path() -> Path:
    """Path of the small JSONL sample shipped in `turnrl/data/` (50 procedural questions)."""
    return Path(str(resources.files("turnrl").joinpath("data", SAMPLE_FILE)))


def load_jsonl(path: str | os.PathLike) -> tuple[QAItem, ...]:
    """Read `{"question": ..., "answer": ...}` lines (answers may be numbers); cached per file version."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ValueError(f"QA data file not found: {file}")
    stat = file.stat()
    return _load_jsonl_cached(str(file), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _load_jsonl_cached(path: str, _mtime_ns: int, _size: int) -> tuple[QAItem, ...]:
    items = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            items.append(_item_from_row(row, f"{path}:{lineno}"))
    if not items:
        raise ValueError(f"{path}: no questions found")
    return tuple(items)


def _item_from_row(row: object, where: str) -> QAItem:
    if not isinstance(row, dict) or "question" not in row or "answer" not in row:
        raise ValueError(f"{where}: expected an object with 'question' and 'answer'")
    question, answer = row["question"], row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"{where}: 'answer' must be a string or a number")
    if not isinstance(question, str) or not question.strip() or not str(answer).strip():
        raise ValueError(f"{where}: 'question' and 'answer' must be non-empty")
    return QAItem(question.strip(), str(answer).strip())


# Hugging Face datasets: (path, config, question column, answer extractor).
_HF_DATASETS = {
    "gsm8k": ("openai/gsm8k", "main", "question", lambda row: row["answer"].split("####")[-1]),
    "metamathqa": ("meta-math/MetaMathQA", None, "query",
                   lambda row: row["response"].split("The answer is:")[-1]),
}


def load_hf_qa(name: str, split: str = "train", limit: int | None = None) -> tuple[QAItem, ...]:
    """Questions from a Hugging Face dataset ("gsm8k" or "metamathqa"; needs `datasets` and network).

    MetaMathQA is filtered to its MATH-derived rows (`type` starting with "MATH_"), as UFO does.
    """
    if name not in _HF_DATASETS:
        raise ValueError(f"unknown Hugging Face QA dataset {name!r}; known: {', '.join(sorted(_HF_DATASETS))}")
    try:
        import datasets  # optional: only when the user asks for Hugging Face data
    except ImportError as err:
        raise ValueError(f"hf_dataset={name!r} needs the 'datasets' package: pip install datasets") from err
    path, config, question_key, extract = _HF_DATASETS[name]
    rows = datasets.load_dataset(path, config, split=split)
    items = []
    for row in rows:
        if name == "metamathqa" and not str(row.get("type", "")).startswith("MATH_"):
            continue
        items.append(_item_from_row({"question": row[question_key], "answer": extract(row).strip()}, name))
        if limit is not None and len(items) >= limit:
            break
    return tuple(items)


class StaticQAEnv(MultiTurnQAEnv):
    """Static QA data as a multi-turn env: answer, hear only "Incorrect. Please think again.", retry.

    The generic "static dataset → multi-turn env" adapter of UFO. Each reset draws one
    question uniformly with the episode seed. The answer is free text (`free_text = True`).

    Observation:
        The question text. After a wrong answer the observation is ONLY the feedback line
        (default "Incorrect. Please think again."); the question stays in the chat history.
    Actions:
        The final answer as free text (at most `max_answer_chars`, 200). Matching ignores
        case and whitespace, a `\\boxed{}`, `$` and a trailing period, thousands commas in
        numbers, and compares numbers exactly: "3.0" = "3", "1/2" = "0.5". An empty or
        overlong answer is invalid: reward 0, it does not count as an attempt.
    Rewards:
        A correct answer at attempt t (0-based) pays `gamma`^t (0.5^t). Wrong answers pay 0.
        On the final step (correct answer or last attempt) the episode-level repetition
        penalty `repetition_penalty` * (1 - E / T) is subtracted, where T is the number of
        valid answers given and E the number of distinct normalised answers among them (UFO,
        λ = 0.5). Example: "4", "4", "5" (correct) gives 0.25 - 0.5 * (1 - 2/3) = 0.0833.
        `info` on the final step has `unique_answer_ratio` (E / T) and `repetition_penalty`.
    Episode end:
        Terminated (success) at the first correct answer; truncated after `max_attempts` (5)
        wrong answers. Keep the rollout's turn budget >= max_attempts, or the penalty is
        never applied.
    Arguments:
        path: JSONL file with one {"question": str, "answer": str | number} per line
        (default: the 50-question sample shipped in turnrl/data/math_qa_sample.jsonl).
        hf_dataset: "gsm8k" or "metamathqa" to load from Hugging Face instead (needs the
        `datasets` package and network; a ValueError says so otherwise), with hf_split
        ("train") and hf_limit (None = all). max_attempts (5), gamma (0.5),
        repetition_penalty (0.5), feedback, max_answer_chars (200), instruction (the first
        line of the system prompt; default: solve math problems, answer inside <answer>).
    """

    name = "math_qa_jsonl"

    def __init__(self, path: str | None = None, hf_dataset: str | None = None, hf_split: str = "train",
                 hf_limit: int | None = None, max_attempts: int = 5, gamma: float = 0.5,
                 repetition_penalty: float = 0.5, feedback: str = DEFAULT_FEEDBACK,
                 max_answer_chars: int = MAX_ANSWER_CHARS, instruction: str = DEFAULT_INSTRUCTION) -> None:
        super().__init__(max_attempts, gamma, repetition_penalty, feedback, max_answer_chars, instruction)
        if path is not None and hf_dataset is not None:
            raise ValueError("give either path or hf_dataset, not both")
        if hf_dataset is not None:
            self.items = load_hf_qa(hf_dataset, hf_split, hf_limit)
        else:
            self.items = load_jsonl(sample_path() if path is None else path)
        if not self.items:
            raise ValueError("the QA data holds no questions")

    def sample_item(self, rng: random.Random) -> QAItem:
        return self.items[rng.randrange(len(self.items))]

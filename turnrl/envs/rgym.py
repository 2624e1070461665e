"""Reasoning Gym's procedural tasks (open-thought/reasoning-gym, ~100 of them) as turnrl envs, with their verifiers.

Reasoning Gym generates a question per seed (arithmetic, logic, ciphers, graphs, puzzles, ARC...) and scores an
answer with the task's own `score_answer`. Here each episode's seed is the task's seed, so held-out evaluation
seeds give questions training never saw, and a wrong answer gets UFO's unary feedback and another attempt
(turnrl.envs.qa.MultiTurnQAEnv). The package is optional (`pip install 'turnrl[reasoning]'`), imported when the
env is built.
"""

from __future__ import annotations

import random

from .qa import DEFAULT_FEEDBACK, MultiTurnQAEnv, QAItem

INSTRUCTION = ("You are solving reasoning problems. Give only the final answer inside <answer>...</answer>, in the "
               "format the question asks for.")


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as err:
        raise ValueError("env reasoning_gym needs the reasoning-gym package: pip install 'turnrl[reasoning]' "
                         f"({err})") from None
    return reasoning_gym


class ReasoningGymEnv(MultiTurnQAEnv):
    """One of Reasoning Gym's ~100 procedural tasks, scored by its own verifier, with retries (UFO feedback).

    Observation:
        The task's question for the episode's seed (Reasoning Gym states the answer format in it, e.g.
        "Calculate ( -6 + -77 - 8 + -38 )." or a Sokoban board asking for a move string). After a wrong
        answer the observation is ONLY the feedback line (default "Incorrect. Please think again.").
    Actions:
        The final answer as free text (at most `max_answer_chars`, 2000), scored by the task's
        `score_answer` (1.0 = correct; some tasks accept any valid solution, e.g. any expression that
        reaches a countdown target). An empty or overlong answer is invalid: reward 0, not an attempt.
    Rewards:
        A correct answer at attempt t (0-based) pays `gamma`^t (0.5^t); with `partial_credit` (needs
        max_attempts=1) the reward is the verifier's score itself, partial credit included. On the final step
        the repetition penalty `repetition_penalty` * (1 - E / T) is subtracted, as in `math_qa` (UFO).
    Episode end:
        Terminated (success) at the first answer scored 1.0; truncated after `max_attempts` (5) others.
    Arguments:
        task: a Reasoning Gym dataset name ("basic_arithmetic"; `reasoning_gym.factory.DATASETS` lists them,
        e.g. leg_counting, spell_backward, countdown, sudoku, knights_knaves, arc_1d). Any other keyword is the
        task's own config (e.g. min_terms=2, max_terms=2 for basic_arithmetic); an unknown one is a ValueError.
        partial_credit (False), max_attempts (5), gamma (0.5), repetition_penalty (0.5), feedback,
        max_answer_chars (2000), instruction (the system prompt's first line). The solver answers with the
        task's reference answer, which a few tasks (those accepting many solutions, e.g. graph_color) do not
        provide.
    """

    name = "reasoning_gym"

    def __init__(self, task: str = "basic_arithmetic", partial_credit: bool = False, max_attempts: int = 5,
                 gamma: float = 0.5, repetition_penalty: float = 0.5, feedback: str = DEFAULT_FEEDBACK,
                 max_answer_chars: int = 2000, instruction: str = INSTRUCTION, **task_config) -> None:
        super().__init__(max_attempts, gamma, repetition_penalty, feedback, max_answer_chars, instruction)
        if partial_credit and max_attempts != 1:
            raise ValueError("partial_credit pays the verifier's score of the one answer: set max_attempts=1")
        rg = _reasoning_gym()
        from reasoning_gym.factory import DATASETS
        if task not in DATASETS:
            import difflib
            close = difflib.get_close_matches(task, DATASETS, n=1)
            raise ValueError(f"unknown Reasoning Gym task {task!r}" + (f"; did you mean {close[0]!r}?" if close
                             else "") + " (reasoning_gym.factory.DATASETS lists them)")
        self.task, self.task_config, self.partial_credit = task, dict(task_config), bool(partial_credit)
        self._rg = rg
        self._dataset = self._entry = None
        self._new_dataset(0)  # the config is checked now, not at the first reset

    def _new_dataset(self, seed: int):
        try:
            # size=1: item 0 of a dataset seeded with `seed` is drawn from its own RNG seeded with it, so every
            # seed is a distinct question without a dataset of 10^9 precomputed items (some tasks build them)
            return self._rg.create_dataset(self.task, seed=seed, size=1, **self.task_config)
        except (TypeError, AssertionError, ValueError) as err:  # unknown config field / failed config validation
            raise ValueError(f"Reasoning Gym task {self.task!r} rejected its config {self.task_config}: "
                             f"{type(err).__name__}: {err}") from None

    def sample_item(self, rng: random.Random) -> QAItem:
        self._dataset = self._new_dataset(rng.randrange(2**31))
        self._entry = self._dataset[0]
        answer = self._entry.get("answer")
        return QAItem(str(self._entry["question"]).strip(), "" if answer is None else str(answer))

    def answer_score(self, answer: str) -> float:
        self._require_reset()
        try:
            score = float(self._dataset.score_answer(answer.strip(), self._entry))
        except Exception:  # a verifier that chokes on a malformed answer: a wrong answer, not a crashed episode
            return 0.0
        return min(1.0, max(0.0, score))

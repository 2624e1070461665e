"""Evaluation metrics for multi-turn question answering (UFO, arXiv 2507.14295).

Succ@k: an episode succeeds within k *sequential* attempts, the model seeing feedback between
them. Pass@k: at least one of k *independent* samples is correct (Chen et al. 2021's unbiased
estimator). The two differ in what the model knows at attempt k, which is UFO's point.

An episode is given as its per-answer correctness flags, in order: `[False, False, True]` is a
success at the third answer. All functions are pure and take plain Python sequences.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

Flags = Sequence[bool]


def first_success(flags: Flags) -> int | None:
    """0-based index of the first correct answer, or None if there is none."""
    for turn, correct in enumerate(flags):
        if correct:
            return turn
    return None


def succ_at_k(episodes: Sequence[Flags], k: int) -> float:
    """Fraction of episodes with a correct answer among their first k answers (Succ@k).

    `episodes[i]` holds episode i's correctness flags per answer, in order.
    Example: [[True], [False, True], [False, False, False]] gives Succ@1 = 1/3, Succ@2 = 2/3.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not episodes:
        raise ValueError("succ_at_k needs at least one episode")
    return sum(any(flags[:k]) for flags in episodes) / len(episodes)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n independent samples of which c are correct (Chen et al. 2021).

    pass@k = 1 - C(n - c, k) / C(n, k): the chance that k samples drawn without replacement
    from the n include a correct one. Computed as a product, which is stable for large n.
    Example: n=5, c=2, k=2 gives 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(samples: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems, each given as (n samples, c correct)."""
    if not samples:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(pass_at_k(n, c, k) for n, c in samples) / len(samples)


def mean_turns_to_success(episodes: Sequence[Flags]) -> float:
    """Mean number of answers (1-based) up to the first correct one, over successful episodes.

    Failed episodes are left out (report Succ@k next to it); NaN when none succeeded.
    Example: [[True], [False, False, True], [False]] gives (1 + 3) / 2 = 2.0.
    """
    turns = [t + 1 for t in (first_success(flags) for flags in episodes) if t is not None]
    return sum(turns) / len(turns) if turns else math.nan


def unique_answer_ratio(answers: Sequence[str], normalize: Callable[[str], str] | None = None) -> float:
    """Distinct answers / answers in one episode (UFO's E / T); 1.0 for an episode with no answers.

    Answers are compared after `normalize` (default: `turnrl.envs.qa.normalize_answer`, the
    env's own matching, so "3.0" and "3" are the same answer).
    Example: ["4", "4.0", "5"] gives 2/3.
    """
    if not answers:
        return 1.0
    if normalize is None:
        from turnrl.envs.qa import normalize_answer as normalize
    return len({normalize(a) for a in answers}) / len(answers)


def mean_unique_answer_ratio(episodes: Sequence[Sequence[str]],
                             normalize: Callable[[str], str] | None = None) -> float:
    """Mean of `unique_answer_ratio` over episodes (UFO's "non-repetitive answer ratio")."""
    if not episodes:
        raise ValueError("mean_unique_answer_ratio needs at least one episode")
    return sum(unique_answer_ratio(answers, normalize) for answers in episodes) / len(episodes)

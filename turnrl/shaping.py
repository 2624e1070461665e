"""Reward shaping of whole episodes: one pure function over `Trajectory.turn_rewards`.

The options come from the sibling systems of RAGEN (see docs/algorithms.md, "Reward shaping"):
UFO's turn decay and repetition penalty (arXiv 2507.14295) and ERA's dense-then-sparse schedule
(arXiv 2510.12693). Shaping runs once per iteration, right after the rollout and before the group
filter and the advantage estimator, so every estimator sees the same shaped per-turn channel.
"""

from __future__ import annotations

import dataclasses
import re

from turnrl.config import RewardConfig
from turnrl.trajectory import Trajectory

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def normalized_answer(reply: str) -> str:
    """The part of a reply that is compared for repetition: the last `<answer>…</answer>` body if the
    reply has one, else the whole reply; lower-cased with all whitespace removed (UFO's normaliser)."""
    answers = _ANSWER.findall(reply)
    text = answers[-1] if answers else reply
    return "".join(text.lower().split())


def repetition_fraction(t: Trajectory) -> float:
    """1 - distinct replies / replies over the episode's model replies (from `Trajectory.transcript`,
    compared with `normalized_answer`); 0 for an episode with at most one reply."""
    replies = [normalized_answer(text) for role, text in t.transcript if role == "assistant"]
    if len(replies) != t.num_turns:
        raise ValueError(f"the repetition penalty reads the replies from Trajectory.transcript, which holds "
                         f"{len(replies)} assistant entries for {t.num_turns} turns")
    if len(replies) <= 1:
        return 0.0
    return 1.0 - len(set(replies)) / len(replies)


def shape_rewards(trajs: list[Trajectory], cfg: RewardConfig, iteration: int) -> list[Trajectory]:
    """Returns the episodes with shaped `turn_rewards` (inputs are not modified; with every option off
    the very same objects are returned). Exactly, for an episode with turns t = 0 .. K-1:

    1. Dense -> sparse (ERA): when `cfg.dense_until > 0` and `iteration >= cfg.dense_until`, the turn
       rewards become `(0, …, 0, s)` with `s = 1.0` if the episode succeeded else `0.0`: the env's
       shaped rewards and the format penalties are dropped, only the success reward is left, on the
       last turn. Iterations `0 .. dense_until-1` keep the env rewards unchanged.
    2. Turn decay (UFO): if the episode succeeded, the reward of its last turn (the turn in which it
       succeeded: episodes end on success) is multiplied by `cfg.turn_decay ** (K-1)`. Other turns and
       failed episodes are unchanged. With 1.0/0.0 success rewards this is UFO's `gamma^t` reward.
    3. Repetition penalty (UFO): `cfg.repetition_penalty * repetition_fraction(t)` is subtracted from
       the last turn's reward (an episode-level penalty paid once, at the end).
    """
    if not cfg.active:
        return list(trajs)
    sparse = cfg.dense_until > 0 and iteration >= cfg.dense_until
    out = []
    for t in trajs:
        rewards = list(t.turn_rewards)
        if not rewards:
            out.append(t)
            continue
        if sparse:
            rewards = [0.0] * (len(rewards) - 1) + [1.0 if t.success else 0.0]
        if t.success and cfg.turn_decay != 1.0:
            rewards[-1] *= cfg.turn_decay ** (len(rewards) - 1)
        if cfg.repetition_penalty > 0:
            rewards[-1] -= cfg.repetition_penalty * repetition_fraction(t)
        out.append(dataclasses.replace(t, turn_rewards=tuple(rewards)))
    return out

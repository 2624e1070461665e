"""Credit assignment glue: from trajectories to each estimator's inputs, and its output back to tokens.

Coordinates are those of `turnrl.batch.Batch`: shifted token tensors `(B, L-1)` where position p
holds the target `ids[p + 1]`, the loss mask `loss_mask[p + 1]` and the value head's output at
input position p (the value of the context `ids[: p + 1]`). The reply of turn k spans
`ids[start:end]`, so its tokens sit at positions `start-1 .. end-2`, and position `start-1` (the
first of them) carries the value of the context right BEFORE the reply: the turn's state value.

Per-turn matrices are `(B, K)` with K the largest turn count of the batch; shorter episodes are
padded with masked turns. See docs/algorithms.md, "Wiring in the trainer".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from turnrl.algos.advantages import (bi_level_gae, gae, gigpo_advantages, grpo_advantages, rebn_advantages,
                                     reinforce_pp_advantages, rloo_advantages, turn_gae)
from turnrl.config import AlgoConfig
from turnrl.trajectory import Trajectory


@dataclass(frozen=True)
class TurnLayout:
    """Where each turn of each episode sits in the shifted token matrix."""

    rewards: Tensor   # (B, K) float, the turn's reward (0 on padding turns)
    mask: Tensor      # (B, K) bool, the turn exists and holds at least one model token
    first: Tensor     # (B, K) long, position of the turn's first token = its state-value position (0 if none)
    last: Tensor      # (B, K) long, position of the turn's last token (0 if none)
    turn_ids: Tensor  # (B, L-1) long, turn index of each reply-token position, -1 elsewhere


@dataclass(frozen=True)
class Credit:
    """What the update needs from an estimator."""

    advantages: Tensor          # (B, L-1) per model token (0 elsewhere); used by the ppo loss
    seq_advantages: Tensor      # (B,) per episode; used by the gspo loss
    turn_advantages: Tensor     # (B, K) mean advantage of each turn's tokens (0 on padding turns)
    turn_mask: Tensor           # (B, K) bool
    returns: Tensor | None = None     # (B, L-1) value targets (critic estimators)
    value_mask: Tensor | None = None  # (B, L-1) positions where the value head is trained

    def to(self, device: torch.device) -> "Credit":
        """The same credit with every tensor on `device` (itself when they are there already)."""
        if device.type == "cpu":
            return self
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self) if getattr(self, f.name) is not None})


def turn_layout(trajs: list[Trajectory], width: int) -> TurnLayout:
    """Per-turn tensors of a batch whose token matrix is `width` ids wide (shifted width `width - 1`)."""
    k = max([t.num_turns for t in trajs] + [1])
    b = len(trajs)
    rewards = torch.zeros(b, k)
    mask = torch.zeros(b, k, dtype=torch.bool)
    first = torch.zeros(b, k, dtype=torch.long)
    last = torch.zeros(b, k, dtype=torch.long)
    turn_ids = torch.full((b, width - 1), -1, dtype=torch.long)
    for row, t in enumerate(trajs):
        if len(t.turn_rewards) != t.num_turns:
            raise ValueError(f"trajectory {row} has {t.num_turns} turn spans but {len(t.turn_rewards)} turn rewards")
        for turn, ((start, end), r) in enumerate(zip(t.turn_spans, t.turn_rewards)):
            rewards[row, turn] = r
            if end > start:
                if start < 1 or end > width:
                    raise ValueError(f"turn span {(start, end)} of trajectory {row} must lie in [1, {width}]")
                mask[row, turn] = True
                first[row, turn], last[row, turn] = start - 1, end - 2
                turn_ids[row, start - 1: end - 1] = turn
    return TurnLayout(rewards, mask, first, last, turn_ids)


def broadcast_turns(turn_values: Tensor, layout: TurnLayout) -> Tensor:
    """(B, K) per-turn values -> (B, L-1): every reply token of turn k gets `turn_values[:, k]`, others 0."""
    picked = turn_values.gather(1, layout.turn_ids.clamp(min=0))
    return torch.where(layout.turn_ids >= 0, picked, torch.zeros_like(picked))


def turn_means(token_values: Tensor, layout: TurnLayout) -> Tensor:
    """(B, L-1) -> (B, K): mean of each turn's reply-token values (0 on padding turns)."""
    b, k = layout.mask.shape
    inside = layout.turn_ids >= 0
    index = layout.turn_ids.clamp(min=0)
    sums = torch.zeros(b, k, dtype=token_values.dtype).scatter_add_(1, index, torch.where(inside, token_values, 0.0))
    counts = torch.zeros(b, k, dtype=token_values.dtype).scatter_add_(1, index, inside.to(token_values.dtype))
    return torch.where(layout.mask, sums / counts.clamp(min=1), torch.zeros_like(sums))


def anchor_keys(trajs: list[Trajectory], k: int) -> Tensor:
    """(B, K) long GiGPO anchor-state keys: the observation text shown right before each reply (the last
    `user` entry of `Trajectory.transcript` before each `assistant` entry), numbered by first appearance.
    Equal texts get equal keys across the batch; `gigpo_advantages` compares steps only within a group."""
    table: dict[str, int] = {}
    keys = torch.zeros(len(trajs), k, dtype=torch.long)
    for row, t in enumerate(trajs):
        observation, turn = None, 0
        for role, text in t.transcript:
            if role == "user":
                observation = text
            elif role == "assistant":
                if observation is None or turn >= k:
                    break
                keys[row, turn] = table.setdefault(observation, len(table))
                turn += 1
        if turn != t.num_turns:
            raise ValueError(f"gigpo needs Trajectory.transcript with an observation before each of the "
                             f"{t.num_turns} replies of trajectory {row}; found {turn}")
    return keys


def sequence_advantages(trajs: list[Trajectory], estimator: str) -> Tensor:
    """(B,) trajectory-level advantages of the episode returns (sum of turn rewards)."""
    rewards = torch.tensor([t.total_reward for t in trajs], dtype=torch.float32)
    groups = torch.tensor([t.group_id for t in trajs], dtype=torch.long)
    if estimator == "grpo":
        return grpo_advantages(rewards, groups, normalize_std=True)
    if estimator == "dr_grpo":
        return grpo_advantages(rewards, groups, normalize_std=False)
    if estimator == "rloo":
        return rloo_advantages(rewards, groups)
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, groups)
    raise ValueError(f"estimator {estimator!r} is not trajectory-level")


def turn_end_rewards(trajs: list[Trajectory], width: int) -> Tensor:
    """(B, width-1) token rewards: each turn's reward on the last token of that turn's reply."""
    rewards = torch.zeros((len(trajs), width - 1))
    for row, t in enumerate(trajs):
        for (start, end), r in zip(t.turn_spans, t.turn_rewards):
            if end > start:
                rewards[row, end - 2] += r  # target index of ids[end - 1]
    return rewards


def compute_credit(trajs: list[Trajectory], mask: Tensor, values: Tensor | None, algo: AlgoConfig) -> Credit:
    """Advantages (and value targets) of one batch for `algo.estimator`.

    Args:
        trajs: the batch, in row order of the token matrices.
        mask: ``(B, L-1)`` shifted loss mask (1 on model tokens).
        values: ``(B, L-1)`` value-head outputs of the sampling policy (critic estimators), else None.
    """
    est = algo.estimator
    width = mask.shape[1] + 1
    layout = turn_layout(trajs, width)
    returns = value_mask = None
    if est in ("grpo", "dr_grpo", "rloo", "reinforce_pp"):
        seq_adv = sequence_advantages(trajs, est)
        advantages = seq_adv[:, None] * mask  # broadcast over the episode's model tokens
    elif est == "gae":  # token critic; each turn's reward on its last token, gamma per model token
        rewards = turn_end_rewards(trajs, width)
        advantages, returns = gae(rewards, _need(values, est), mask, gamma=algo.gamma, lam=algo.lam)
        value_mask = mask
    elif est == "bi_level_gae":  # turn GAE between turn-end values, token GAE inside each turn (VAGEN)
        advantages, returns = bi_level_gae(layout.rewards, _need(values, est), mask, layout.turn_ids.clamp(min=0),
                                           turn_gamma=algo.gamma, token_gamma=algo.token_gamma, lam=algo.lam)
        value_mask = mask
    elif est == "turn_gae":  # one state value per turn, read just before the reply (ERA)
        v = _need(values, est)
        turn_values = torch.where(layout.mask, v.gather(1, layout.first), torch.zeros_like(layout.rewards))
        turn_adv, turn_ret = turn_gae(layout.rewards, turn_values, layout.mask, gamma=algo.gamma, lam=algo.lam)
        advantages = broadcast_turns(turn_adv, layout) * mask
        value_mask = torch.zeros_like(mask)
        returns = torch.zeros_like(v)
        rows, cols = torch.nonzero(layout.mask, as_tuple=True)
        value_mask[rows, layout.first[rows, cols]] = 1.0
        returns[rows, layout.first[rows, cols]] = turn_ret[rows, cols].to(returns.dtype)
    elif est == "gigpo":  # episode group advantage + step advantage among equal anchor observations
        totals = torch.tensor([t.total_reward for t in trajs], dtype=torch.float32)
        groups = torch.tensor([t.group_id for t in trajs], dtype=torch.long)
        keys = anchor_keys(trajs, layout.mask.shape[1])
        turn_adv = gigpo_advantages(totals, groups, layout.rewards, keys, layout.mask, omega=algo.gigpo_omega,
                                    gamma=algo.gamma)
        advantages = broadcast_turns(turn_adv, layout) * mask
    elif est == "rebn":  # per-turn discounted returns, normalised over the batch
        turn_adv = rebn_advantages(layout.rewards, layout.mask, gamma=algo.gamma)
        advantages = broadcast_turns(turn_adv, layout) * mask
    else:
        raise ValueError(f"unknown estimator {est!r}")
    advantages = advantages.to(torch.float32)
    n_tok = mask.sum(1)
    # GSPO takes one advantage per sequence: the estimator's own for sequence-level estimators, else the
    # mean over the sequence's model tokens (a token-weighted mean of the turn advantages).
    seq = seq_adv if est in ("grpo", "dr_grpo", "rloo", "reinforce_pp") else (advantages * mask).sum(1) / n_tok.clamp(min=1)
    return Credit(advantages=advantages, seq_advantages=seq.to(torch.float32),
                  turn_advantages=turn_means(advantages, layout), turn_mask=layout.mask,
                  returns=returns, value_mask=value_mask)


def turn_spread(credit: Credit) -> float | None:
    """Mean over episodes with >= 2 turns of the std (population) of their per-turn mean advantages:
    0 for trajectory-level estimators, > 0 when an estimator tells an episode's turns apart."""
    m = credit.turn_mask
    n = m.sum(1)
    multi = n >= 2
    if not bool(multi.any()):
        return None
    a = torch.where(m, credit.turn_advantages, torch.zeros_like(credit.turn_advantages))
    mean = a.sum(1) / n.clamp(min=1)
    var = (torch.where(m, (a - mean[:, None]) ** 2, torch.zeros_like(a))).sum(1) / n.clamp(min=1)
    return float(var.sqrt()[multi].mean())


def _need(values: Tensor | None, estimator: str) -> Tensor:
    if values is None:
        raise ValueError(f"estimator {estimator!r} needs the value head's outputs")
    return values


def compute_row_credit(trajs: list[Trajectory], rows: list[tuple[int, int, int, int]], mask: Tensor,
                       values: Tensor | None, algo: AlgoConfig) -> Credit:
    """`compute_credit` for turn-as-sample batches (one row per turn, ERA/SkyRL style).

    Every estimator is computed on each episode, not on each row: the episode's replies are laid back to
    back in a compact sequence (a dummy first token, then reply 0, reply 1, ...), whose model tokens are
    exactly the episode's model tokens in order, with the value head's outputs taken from the turn rows.
    All estimators only read model-token positions (GAE skips the others; turn GAE reads the state value
    at a turn's first reply position, which in the turn row is the value of the exact prompt the model
    saw), so the episode's advantages and returns are those of the single-sequence form given the same
    values. They are then scattered back to the rows: each turn row gets its episode's advantage
    (sequence estimators) or its turn's (turn estimators) or its tokens' (token estimators).

    Args:
        rows: `turnrl.batch.Batch.rows`: (trajectory, turn, reply start, reply end) of each row, the
            reply in the row's own coordinates.
        mask, values: ``(R, L-1)`` shifted loss mask and value-head outputs of the rows.
    Returns:
        A `Credit` whose token tensors and `seq_advantages` are per row (the GSPO sequence of a row is
        its turn: the mean of its tokens' advantages) and whose turn tensors are per episode.
    """
    offsets = []  # per trajectory: offset of each reply in the compact sequence
    compact = []
    for t in trajs:
        offs, spans, off = [], [], 0
        for start, end in t.turn_spans:
            offs.append(off)
            spans.append((1 + off, 1 + off + (end - start)))
            off += end - start
        offsets.append(offs)
        compact.append(replace(t, ids=(0,) * (1 + off), loss_mask=(0,) + (1,) * off, logprobs=(0.0,) * (1 + off),
                               turn_spans=tuple(spans), row_starts=None))
    width = max(max(len(c.ids) for c in compact), 2)
    ep_mask = torch.zeros(len(trajs), width - 1)
    for e, c in enumerate(compact):
        ep_mask[e, : len(c.ids) - 1] = 1.0
    ep_values = None
    if values is not None:
        ep_values = torch.zeros(len(trajs), width - 1, dtype=values.dtype)
    for r, (e, k, start, end) in enumerate(rows):
        if k < 0:
            raise ValueError("compute_row_credit needs turn rows only; a batch cannot mix episode and turn rows")
        off = offsets[e][k]
        if values is not None:
            ep_values[e, off: off + end - start] = values[r, start - 1: end - 1]
    ep = compute_credit(compact, ep_mask, ep_values, algo)

    def to_rows(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        out = torch.zeros(mask.shape, dtype=x.dtype)
        for r, (e, k, start, end) in enumerate(rows):
            off = offsets[e][k]
            out[r, start - 1: end - 1] = x[e, off: off + end - start]
        return out

    advantages = to_rows(ep.advantages) * mask
    seq = (advantages * mask).sum(1) / mask.sum(1).clamp(min=1)
    return Credit(advantages=advantages, seq_advantages=seq.to(torch.float32), turn_advantages=ep.turn_advantages,
                  turn_mask=ep.turn_mask, returns=to_rows(ep.returns), value_mask=to_rows(ep.value_mask))

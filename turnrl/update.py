"""From trajectories to one PPO-style policy update: collate, advantages, micro-batched loss, step.

Token position t of the shifted tensors predicts ids[t + 1]; every per-token tensor here is `(B, L-1)`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from turnrl.algos.advantages import gae, grpo_advantages, rloo_advantages
from turnrl.algos.losses import aggregate, entropy_from_logits, kl_penalty, ppo_clip_loss, token_logprobs, value_loss
from turnrl.config import AlgoConfig, OptimConfig
from turnrl.rollout import Trajectory


@dataclass
class Batch:
    input_ids: torch.Tensor   # (B, L) right-padded
    attention: torch.Tensor   # (B, L)
    targets: torch.Tensor     # (B, L-1) = input_ids[:, 1:]
    mask: torch.Tensor        # (B, L-1) float, 1 where the target is a model token
    old_logprobs: torch.Tensor  # (B, L-1) sampling logprobs (0 off-mask)
    lengths: list[int]

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def collate(trajs: list[Trajectory], pad_id: int) -> Batch:
    lengths = [len(t.ids) for t in trajs]
    width = max(lengths)
    ids = torch.full((len(trajs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(trajs), width), dtype=torch.long)
    mask = torch.zeros((len(trajs), width), dtype=torch.float32)
    logp = torch.zeros((len(trajs), width), dtype=torch.float32)
    for row, t in enumerate(trajs):
        n = len(t.ids)
        ids[row, :n] = torch.tensor(t.ids)
        attn[row, :n] = 1
        mask[row, :n] = torch.tensor(t.loss_mask, dtype=torch.float32)
        logp[row, :n] = torch.tensor(t.logprobs, dtype=torch.float32)
    return Batch(ids, attn, ids[:, 1:], mask[:, 1:], logp[:, 1:], lengths)


def turn_end_rewards(trajs: list[Trajectory], width: int) -> torch.Tensor:
    """(B, width-1) token rewards: each turn's reward on the last token of that turn's reply."""
    rewards = torch.zeros((len(trajs), width - 1))
    for row, t in enumerate(trajs):
        for (start, end), r in zip(t.turn_spans, t.turn_rewards):
            if end > start:
                rewards[row, end - 2] += r  # target index of ids[end - 1]
    return rewards


def sequence_advantages(trajs: list[Trajectory], estimator: str) -> torch.Tensor:
    """(B,) trajectory-level advantages for the critic-free estimators."""
    rewards = torch.tensor([t.total_reward for t in trajs], dtype=torch.float32)
    groups = torch.tensor([t.group_id for t in trajs], dtype=torch.long)
    if estimator == "grpo":
        return grpo_advantages(rewards, groups, normalize_std=True)
    if estimator == "dr_grpo":
        return grpo_advantages(rewards, groups, normalize_std=False)
    if estimator == "rloo":
        return rloo_advantages(rewards, groups)
    raise ValueError(f"estimator {estimator!r} is not trajectory-level")


def micro_batches(lengths: list[int], rows: list[int], token_budget: int) -> list[list[int]]:
    """Groups rows of similar length so each micro-batch holds at most `token_budget` padded tokens."""
    rows = sorted(rows, key=lambda r: lengths[r])
    out, current, longest = [], [], 0
    for r in rows:
        longest_if_added = max(longest, lengths[r])
        if current and longest_if_added * (len(current) + 1) > token_budget:
            out.append(current)
            current, longest_if_added = [], lengths[r]
        current.append(r)
        longest = longest_if_added
    if current:
        out.append(current)
    return out


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def forward_no_grad(policy, lm, batch: Batch, rows_groups: list[list[int]], temperature: float,
                    with_values: bool, bf16: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs (and values) of the batch's targets under `lm` (the policy's or a reference's)."""
    logps = torch.zeros_like(batch.old_logprobs)
    values = torch.zeros_like(batch.old_logprobs) if with_values else None
    for rows in rows_groups:
        n = max(batch.lengths[r] for r in rows)
        ids, attn = batch.input_ids[rows, :n], batch.attention[rows, :n]
        with _autocast(bf16):
            if with_values:
                logits, vals = policy(ids, attn, with_values=True)
                values[rows, : n - 1] = vals[:, :-1].float()
            else:
                logits = lm(input_ids=ids, attention_mask=attn, use_cache=False).logits
        logps[rows, : n - 1] = token_logprobs(logits[:, :-1].float(), batch.targets[rows, : n - 1], temperature=temperature)
    return logps, values


def ppo_update(policy, optimizer, scheduler, trajs: list[Trajectory], *, algo: AlgoConfig, optim: OptimConfig,
               temperature: float, ref_lm=None, generator: torch.Generator | None = None) -> dict[str, float]:
    """One RL update on `trajs` (already filtered). Returns averaged loss statistics."""
    batch = collate(trajs, policy.pad_token_id)
    budget = optim.micro_batch_tokens
    all_rows = list(range(batch.size))
    stats: dict[str, list[float]] = {}

    # ---- advantages --------------------------------------------------------------------------------
    old_values = returns = None
    if algo.needs_critic:
        policy.eval()
        _, old_values = forward_no_grad(policy, policy.lm, batch, micro_batches(batch.lengths, all_rows, budget),
                                        temperature, True, optim.bf16)
        rewards = turn_end_rewards(trajs, batch.input_ids.shape[1])
        advantages, returns = gae(rewards, old_values, batch.mask, gamma=algo.gamma, lam=algo.lam)
    else:
        seq_adv = sequence_advantages(trajs, algo.estimator)
        advantages = seq_adv[:, None] * batch.mask  # broadcast over the episode's model tokens

    ref_logprobs = None
    if algo.kl_coef > 0:
        ref_logprobs, _ = forward_no_grad(None, ref_lm, batch, micro_batches(batch.lengths, all_rows, budget),
                                          temperature, False, optim.bf16)

    # ---- PPO epochs over mini-batches -------------------------------------------------------------
    policy.train()
    for epoch in range(algo.epochs):
        perm = torch.randperm(batch.size, generator=generator).tolist()
        n_mb = min(algo.minibatches, batch.size)
        for mb_index in range(n_mb):
            mb_rows = perm[mb_index::n_mb]
            num_seqs = len(mb_rows)
            num_tokens = max(1, int(batch.mask[mb_rows].sum().item()))
            totals: dict[str, float] = {}  # micro-batch parts of this mini-batch's losses (they add up)
            for rows in micro_batches(batch.lengths, mb_rows, budget):
                n = max(batch.lengths[r] for r in rows)
                ids, attn = batch.input_ids[rows, :n], batch.attention[rows, :n]
                mask = batch.mask[rows, : n - 1]
                with _autocast(optim.bf16):
                    logits, values = policy(ids, attn, with_values=algo.needs_critic)
                logits = logits[:, :-1].float()
                logps = token_logprobs(logits, batch.targets[rows, : n - 1], temperature=temperature)
                old = batch.old_logprobs[rows, : n - 1]
                pg, pg_stats = ppo_clip_loss(logps, old, advantages[rows, : n - 1], mask,
                                             clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip)
                agg = dict(num_seqs=num_seqs, num_tokens=num_tokens)
                loss = aggregate(pg, mask, algo.loss_agg, **agg)
                _add(totals, "loss/policy", loss.item())
                # Entropy is always logged; it is differentiated only when it enters the loss.
                with torch.set_grad_enabled(algo.entropy_coef > 0):
                    ent = aggregate(entropy_from_logits(logits / temperature) * mask, mask, algo.loss_agg, **agg)
                if algo.entropy_coef > 0:
                    loss = loss - algo.entropy_coef * ent
                _add(totals, "loss/entropy", ent.item())
                if algo.kl_coef > 0:
                    kl = aggregate(kl_penalty(logps, ref_logprobs[rows, : n - 1], kind=algo.kl_estimator) * mask,
                                   mask, algo.loss_agg, **agg)
                    loss = loss + algo.kl_coef * kl
                    _add(totals, "loss/kl", kl.item())
                if algo.needs_critic:
                    vl = value_loss(values[:, :-1].float(), old_values[rows, : n - 1], returns[rows, : n - 1], mask,
                                    clip=algo.value_clip)
                    vl = aggregate(vl, mask, algo.loss_agg, **agg)
                    loss = loss + algo.vf_coef * vl
                    _add(totals, "loss/value", vl.item())
                loss.backward()
                weight = len(rows) / num_seqs
                _append(stats, "actor/clip_frac", pg_stats["clip_frac"], weight)
                if epoch == 0 and mb_index == 0:
                    # Before the first step the policy is the sampler: any gap is engine/trainer numerics.
                    gap = ((logps.detach() - old).abs() * mask).sum() / mask.sum().clamp(min=1)
                    _append(stats, "actor/logprob_mismatch", gap.item(), weight)
            for key, value in totals.items():
                _append(stats, key, value)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), optim.max_grad_norm)
            if not math.isfinite(grad_norm.item()):
                optimizer.zero_grad(set_to_none=True)
                _append(stats, "actor/skipped_steps", 1.0)
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            _append(stats, "actor/grad_norm", grad_norm.item())
    out = {k: _mean(v) for k, v in stats.items()}
    out.setdefault("actor/skipped_steps", 0.0)
    out["actor/lr"] = scheduler.get_last_lr()[0]
    out["train/tokens"] = float(sum(batch.lengths))
    out["train/adv_abs_mean"] = float((advantages.abs() * batch.mask).sum() / batch.mask.sum().clamp(min=1))
    return out


def _add(totals, key, value):
    totals[key] = totals.get(key, 0.0) + value


def _append(stats, key, value, weight=1.0):
    stats.setdefault(key, []).append((value, weight))


def _mean(pairs):
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else 0.0

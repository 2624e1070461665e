"""From trajectories to one PPO-style policy update: collate (turnrl.batch), advantages (turnrl.credit), the
forwards (turnrl.forward), micro-batched loss, step.

Token position t of the shifted tensors predicts ids[t + 1]; every per-token tensor here is `(B, L-1)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from turnrl.algos.advantages import reverse_kl_advantages
from turnrl.algos.correction import mismatch_correction
from turnrl.algos.losses import (aggregate, gspo_loss, high_entropy_mask, kl_penalty, off_policy_sequence_mask,
                                 ppo_clip_loss, token_logprobs_entropy, value_loss)
from turnrl.attention import gqa_attention
from turnrl.batch import Batch, collate, episode_tokens
from turnrl.config import AlgoConfig, DistillConfig, OptimConfig
from turnrl.credit import Credit, compute_credit, compute_row_credit, turn_spread
from turnrl.forward import (model_token_forward, model_token_logprobs, plan, policy_values, reference_logprobs,
                            sharable_head, shared_head)
from turnrl.trajectory import Trajectory



@dataclass
class Targets:
    """Everything computed once per update, before the first optimizer step."""

    credit: Credit                    # advantages (+ value targets) from the estimator
    old_values: torch.Tensor | None   # (B, L-1) value head of the sampling policy (critic estimators)
    ref_logprobs: torch.Tensor | None  # (B, L-1) reference log-probs (kl_coef > 0)
    # algo.mismatch_correction (turnrl.algos.correction): the sampling policy's log-probs as the trainer computes
    # them (PPO's old log-probs then), the per-token policy-loss weights, the loss mask left after rejection
    old_logprobs: torch.Tensor | None = None
    loss_weights: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    # metrics computed here, once per update: mismatch/* and actor/logprob_mismatch (mismatch correction),
    # entropy_select/* (algo.top_entropy_frac), distill/* (on-policy distillation)
    stats: dict = dataclasses.field(default_factory=dict)


def prepare_targets(policy, batch: Batch, trajs: list[Trajectory], *, algo: AlgoConfig, optim: OptimConfig,
                    temperature: float, ref_lm=None, teacher=None, distill: DistillConfig | None = None) -> Targets:
    """Advantages and returns (turnrl.credit), old values and reference log-probs, all without grad. With a
    `teacher` (on-policy distillation, `distill`), its per-token reverse-KL advantages are added to the
    estimator's (or replace them: distill.task_reward=false)."""
    all_rows = list(range(batch.size))
    old_values = None
    if algo.needs_critic:
        policy.eval()
        head = shared_head(policy, batch, all_rows, algo=algo, optim=optim)
        old_values = policy_values(policy, batch, plan(batch, all_rows, optim.micro_batch_tokens, head), optim.bf16,
                                   share=head is not None)
    # the estimators run on the host (small (B, L) tensors built from the trajectories), then move to the model
    host_mask, host_values = batch.mask.cpu(), None if old_values is None else old_values.cpu()
    credit = (compute_row_credit(trajs, batch.rows, host_mask, host_values, algo) if batch.turn_rows
              else compute_credit(trajs, host_mask, host_values, algo)).to(batch.device)
    ref_logprobs = None
    head = None  # of the forwards below, which need no values
    select = algo.top_entropy_frac < 1
    if algo.kl_coef > 0 or algo.mismatch_correction != "off" or select:
        head = sharable_head(policy.lm, batch, all_rows, enabled=optim.shared_prefix)
    if algo.kl_coef > 0:
        ref_logprobs = reference_logprobs(ref_lm, batch, plan(batch, all_rows, optim.micro_batch_tokens, head),
                                          temperature, optim.bf16, share=head is not None)
    targets = Targets(credit, old_values, ref_logprobs)
    if algo.mismatch_correction != "off" or select:
        # One forward at the weights the update starts from: the sampler's (the trainer's view of the same policy),
        # or one update later with distributed.overlap (then the proximal policy of decoupled PPO).
        policy.eval()
        train_logps, entropies = model_token_logprobs(policy.lm, batch,
                                                      plan(batch, all_rows, optim.micro_batch_tokens, head),
                                                      temperature, optim.bf16, share=head is not None, entropy=True)
    if select:  # the high-entropy ("forking") tokens alone get the policy gradient; the others weigh 0
        chosen, threshold = high_entropy_mask(entropies, batch.mask, algo.top_entropy_frac)
        targets.loss_weights = chosen
        targets.stats.update({"entropy_select/threshold": threshold,
                              "entropy_select/kept_frac": float(chosen.sum() / batch.mask.sum().clamp(min=1))})
    if algo.mismatch_correction != "off":
        weights, keep, stats = mismatch_correction(train_logps, batch.old_logprobs, batch.mask,
                                                   mode=algo.mismatch_correction, low=algo.mismatch_low,
                                                   high=algo.mismatch_high)
        stats = {f"mismatch/{k}": v for k, v in stats.items()} | {
            "actor/logprob_mismatch": logprob_gap(train_logps, batch.old_logprobs, batch.mask)}
        if targets.loss_weights is not None:
            weights = weights * targets.loss_weights
        targets.old_logprobs, targets.loss_weights, targets.loss_mask = train_logps, weights, keep
        targets.stats.update(stats)
    if teacher is not None:
        add_distillation(targets, teacher, batch, distill or DistillConfig(), optim=optim,
                         temperature=temperature)
    return targets


def add_distillation(targets: Targets, teacher, batch: Batch, distill: DistillConfig, *, optim: OptimConfig,
                     temperature: float) -> None:
    """On-policy distillation: one forward of `teacher` (a `turnrl.reference.Reference`) over the batch, without
    grad, and its per-token reverse-KL advantages added to `targets`' (or in their place: distill.task_reward)."""
    all_rows = list(range(batch.size))
    head = sharable_head(teacher.lm, batch, all_rows, enabled=optim.shared_prefix)
    teacher_logps = reference_logprobs(teacher, batch, plan(batch, all_rows, optim.micro_batch_tokens, head),
                                       temperature, optim.bf16, share=head is not None)
    # the student's log-probs as PPO's ratio uses them (the trainer's, when the mismatch correction recomputed them)
    student = batch.old_logprobs if targets.old_logprobs is None else targets.old_logprobs
    distilled = reverse_kl_advantages(student, teacher_logps, batch.mask, coef=distill.coef)
    credit = targets.credit
    task = credit.advantages if distill.task_reward else torch.zeros_like(credit.advantages)
    targets.credit = dataclasses.replace(credit, advantages=task + distilled)
    n = batch.mask.sum().clamp(min=1)
    targets.stats.update({"distill/reverse_kl": float(((student - teacher_logps) * batch.mask).sum() / n),
                          "distill/teacher_logprob": float((teacher_logps * batch.mask).sum() / n)})


def logprob_gap(logprobs: torch.Tensor, sampled: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |logprob - sampling logprob| over the masked tokens (actor/logprob_mismatch)."""
    return float(((logprobs - sampled).abs() * mask).sum() / mask.sum().clamp(min=1))


def without_rejected(batch: Batch, targets: Targets) -> Batch:
    """`batch` with the tokens the mismatch correction rejected taken out of its loss mask (and out of its
    episodes' token counts): they leave every loss term and its denominators."""
    if targets.loss_mask is None:
        return batch
    return dataclasses.replace(batch, mask=targets.loss_mask,
                               seq_tokens=episode_tokens(targets.loss_mask, batch.episode_of, batch.num_episodes))


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """Parameters of `module` get no gradient inside the block (critic warm-up: only the value head learns)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def minibatch_backward(policy, batch: Batch, targets: Targets, mb_rows: list[int], *, algo: AlgoConfig,
                       optim: OptimConfig, temperature: float, critic_only: bool = False,
                       stats: dict | None = None, log_mismatch: bool = False,
                       num_seqs: int | None = None) -> dict[str, float]:
    """Forward + backward of one mini-batch, in micro-batches of at most `optim.micro_batch_tokens` padded tokens.

    Gradients accumulate in `.grad`. Every loss term is aggregated with the mini-batch's totals as
    denominators, so the accumulated gradient does not depend on how the rows are split into micro-batches.

    The "sequence" of the seq-mean aggregation modes is the episode, also when each turn is its own row
    (turn-as-sample): `num_seqs` counts the mini-batch's episodes (default: the distinct episodes of
    `mb_rows`; give it when episodes without rows count too), and seq-mean-token-mean divides a turn row's
    token losses by its whole episode's model-token count (`Batch.seq_tokens`). So an episode weighs the same
    whether it is one row or one row per turn, and full history trained as turn rows gives the same loss as
    the single-sequence form (tests/test_context.py). GSPO's sequence ratio is the exception: it is taken
    over each row, i.e. over each turn with turn rows.
    With `critic_only` (critic warm-up) the language model is frozen and only the value loss is optimised;
    the policy terms are still computed for logging. Returns the mini-batch's losses; per-micro-batch
    statistics are appended to `stats`.
    """
    stats = {} if stats is None else stats
    credit = targets.credit
    episode_of = batch.episode_of
    if num_seqs is None:
        num_seqs = len({episode_of[r] for r in mb_rows})
    num_tokens = max(1, int(batch.mask[mb_rows].sum().item()))
    num_value_tokens = max(1, int(credit.value_mask[mb_rows].sum().item())) if algo.needs_critic else 1
    seq_tokens = batch.seq_tokens if batch.turn_rows else None
    seq_value_tokens = None
    if batch.turn_rows and algo.needs_critic:
        seq_value_tokens = episode_tokens(credit.value_mask, episode_of, batch.num_episodes)
    totals: dict[str, float] = {}  # micro-batch parts of this mini-batch's losses (they add up)
    head = shared_head(policy, batch, mb_rows, algo=algo, optim=optim)
    share = head is not None
    with _frozen(policy.lm) if critic_only else contextlib.nullcontext():
        for rows in plan(batch, mb_rows, optim.micro_batch_tokens, head):
            # Losses are taken in the rows' window layout (rows, width); logits exist at model-token positions only.
            f = model_token_forward(policy.lm, batch, rows, share=share, bf16=optim.bf16,
                                    values_of=policy if algo.needs_critic else None)
            window, on, values = f.window, f.on, f.values
            mask = window(batch.mask)
            # (model tokens,) logprobs and entropies in one pass over the (model tokens, vocab) logits
            token_logps, token_ent = token_logprobs_entropy(f.logits, window(batch.targets)[on],
                                                            temperature=temperature)
            logps = _scatter(on, token_logps)
            old = window(batch.old_logprobs if targets.old_logprobs is None else targets.old_logprobs)
            if algo.loss == "gspo":
                pg, pg_stats = gspo_loss(logps, old, credit.seq_advantages[rows], mask,
                                         clip_low=algo.clip_low, clip_high=algo.clip_high)
            else:
                pg, pg_stats = ppo_clip_loss(logps, old, window(credit.advantages), mask,
                                             clip_low=algo.clip_low, clip_high=algo.clip_high,
                                             dual_clip=algo.dual_clip)
            if targets.loss_weights is not None:  # TIS weights (mismatch_correction='tis'), 0/1 of top_entropy_frac
                pg = pg * window(targets.loss_weights)
            masked_frac = None
            if algo.off_policy_mask is not None:  # DeepSeek-V3.2: drifted rows' negative-advantage tokens leave
                advantages = (window(credit.advantages) if algo.loss != "gspo"
                              else credit.seq_advantages[rows][:, None].expand_as(logps))
                kept, _ = off_policy_sequence_mask(logps, window(batch.old_logprobs), advantages, mask,
                                                   threshold=algo.off_policy_mask)
                pg = pg * kept
                masked_frac = float((mask.sum() - kept.sum()) / mask.sum().clamp(min=1))
            agg = dict(num_seqs=num_seqs, num_tokens=num_tokens,
                       seq_tokens=None if seq_tokens is None else seq_tokens[rows])
            loss = aggregate(pg, mask, algo.loss_agg, **agg)
            _add(totals, "loss/policy", loss.item())
            # Entropy is always logged; it is differentiated only when it enters the loss.
            if not (algo.entropy_coef > 0 and not critic_only):
                token_ent = token_ent.detach()
            ent = aggregate(_scatter(on, token_ent), mask, algo.loss_agg, **agg)
            if algo.entropy_coef > 0:
                loss = loss - algo.entropy_coef * ent
            _add(totals, "loss/entropy", ent.item())
            if algo.kl_coef > 0:
                kl = aggregate(kl_penalty(logps, window(targets.ref_logprobs), kind=algo.kl_estimator) * mask,
                               mask, algo.loss_agg, **agg)
                loss = loss + algo.kl_coef * kl
                _add(totals, "loss/kl", kl.item())
            if critic_only:
                loss = torch.zeros((), device=token_logps.device)  # the policy terms above are logged, not optimised
            if algo.needs_critic:
                vmask = window(credit.value_mask)
                vl = value_loss(values, window(targets.old_values), window(credit.returns), vmask,
                                clip=algo.value_clip)
                vl = aggregate(vl, vmask, algo.loss_agg, num_seqs=num_seqs, num_tokens=num_value_tokens,
                               seq_tokens=None if seq_value_tokens is None else seq_value_tokens[rows])
                loss = loss + algo.vf_coef * vl
                _add(totals, "loss/value", vl.item())
            if loss.requires_grad:
                loss.backward()
            weight = len(rows) / len(mb_rows)
            if masked_frac is not None:
                _append(stats, "actor/off_policy_masked_frac", masked_frac, weight)
            _append(stats, "actor/clip_frac", pg_stats["clip_frac"], weight)
            if log_mismatch:
                # Before the first step the policy is the sampler: any gap is engine/trainer numerics.
                _append(stats, "actor/logprob_mismatch", logprob_gap(logps.detach(), old, mask), weight)
    return totals


def ppo_update(policy, optimizer, scheduler, trajs: list[Trajectory], *, algo: AlgoConfig, optim: OptimConfig,
               temperature: float, ref_lm=None, generator: torch.Generator | None = None,
               critic_only: bool = False, teacher=None, distill: DistillConfig | None = None,
               turn_advantages: list | None = None) -> dict[str, float]:
    """One RL update on `trajs` (already filtered). Returns averaged loss statistics.

    `critic_only` (critic warm-up, ERA): the optimizer steps the value head only; the policy is unchanged.
    `teacher` (a `turnrl.reference.Reference`) and `distill`: on-policy distillation (`prepare_targets`).
    `turn_advantages`, a list, is extended with each trajectory's per-turn mean advantage (None for a turn
    without a model token or with a non-finite value), in `trajs` order: what the sample episodes show.
    """
    if all(t.row_starts is not None and not t.row_starts for t in trajs):
        return {}  # turn-as-sample episodes that ended before their first turn: no training row
    # Grouped-query attention without repeat_kv copies (turnrl.attention), for the forwards and the backward
    # passes alike (a gradient-checkpointed layer recomputes its forward during backward).
    with gqa_attention(policy.lm):
        batch = collate(trajs, policy.pad_token_id, policy.device)
        stats: dict[str, list[float]] = {}

        # ---- advantages --------------------------------------------------------------------------------
        targets = prepare_targets(policy, batch, trajs, algo=algo, optim=optim, temperature=temperature, ref_lm=ref_lm,
                                  teacher=teacher, distill=distill)
        batch = without_rejected(batch, targets)
        if turn_advantages is not None:
            turn_advantages.extend(per_turn(targets.credit, trajs))

        # ---- PPO epochs over mini-batches -------------------------------------------------------------
        # A NaN/inf in the advantages (or value targets), in a mini-batch's loss or in its gradients skips
        # the optimizer step (weights, Adam moments and the lr schedule stay as they were) and is counted in
        # actor/skipped_steps; the trainer stops the run after optim.max_bad_updates such updates in a row.
        # Mini-batches are drawn over episodes; with turn rows an episode's rows stay together (see minibatch_backward).
        policy.train()
        n_mb = min(algo.minibatches, batch.num_episodes)
        rows_of: list[list[int]] = [[] for _ in range(batch.num_episodes)]
        for row, episode in enumerate(batch.episode_of):
            rows_of[episode].append(row)
        skipped = 0
        if not targets_finite(targets, batch):
            skipped = algo.epochs * n_mb
        for epoch in range(algo.epochs if not skipped else 0):
            perm = torch.randperm(batch.num_episodes, generator=generator).tolist()
            for mb_index in range(n_mb):
                episodes = perm[mb_index::n_mb]
                mb_rows = [row for e in episodes for row in rows_of[e]]
                if not mb_rows:  # only turn-as-sample episodes without a turn: nothing to train on
                    continue
                totals = minibatch_backward(policy, batch, targets, mb_rows, algo=algo, optim=optim,
                                            temperature=temperature, critic_only=critic_only, stats=stats,
                                            log_mismatch=epoch == 0 and mb_index == 0 and targets.old_logprobs is None,
                                            num_seqs=len(episodes))
                for key, value in totals.items():
                    _append(stats, key, value)
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), optim.max_grad_norm)
                if not (math.isfinite(grad_norm.item()) and all(math.isfinite(v) for v in totals.values())):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                _append(stats, "actor/grad_norm", grad_norm.item())
    credit = targets.credit
    out = {k: _mean(v) for k, v in stats.items()}
    out.update(targets.stats)  # its logprob_mismatch: over all model tokens, before any step
    out["actor/skipped_steps"] = float(skipped)
    out["actor/lr"] = scheduler.get_last_lr()[0]
    out["train/tokens"] = float(sum(batch.lengths))
    out["train/adv_abs_mean"] = float((credit.advantages.abs() * batch.mask).sum() / batch.mask.sum().clamp(min=1))
    spread = turn_spread(credit)
    if spread is not None:
        out["train/adv_turn_std"] = spread
    return out


def per_turn(credit: Credit, trajs: list[Trajectory]) -> list[list[float | None]]:
    """Each trajectory's per-turn mean advantages (`Credit.turn_advantages`), None where a turn has no model token
    or the value is not finite."""
    adv, mask = credit.turn_advantages.tolist(), credit.turn_mask.tolist()
    return [[a if m and math.isfinite(a) else None for a, m in zip(adv[e], mask[e])][:t.num_turns]
            for e, t in enumerate(trajs)]


def targets_finite(targets: Targets, batch: Batch) -> bool:
    """Advantages (and value targets) are finite wherever they are used (model tokens)."""
    credit, on = targets.credit, batch.mask > 0
    parts = [credit.advantages[on]]
    if credit.seq_advantages is not None:
        parts.append(credit.seq_advantages)
    if credit.returns is not None:
        parts.append(credit.returns[credit.value_mask > 0])
    return all(bool(torch.isfinite(p).all()) for p in parts)


def _scatter(on: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A (rows, width) float tensor holding `values` where `on` is True and 0 elsewhere (differentiable)."""
    return torch.zeros(on.shape, dtype=values.dtype, device=values.device).masked_scatter(on, values)


def _add(totals, key, value):
    totals[key] = totals.get(key, 0.0) + value


def _append(stats, key, value, weight=1.0):
    stats.setdefault(key, []).append((value, weight))


def _mean(pairs):
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else 0.0

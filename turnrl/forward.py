"""The update's forwards over a collated `Batch` (turnrl.batch): the shared-prompt forward's windows, logits and
log-probabilities at the positions that predict a model token, value-head outputs, and the micro-batch plans
around shared prompts. Used by the update (turnrl.update), SFT (turnrl.sft), the collapse diagnostics and
on-policy distillation's teacher.

Token position t of the shifted tensors predicts ids[t + 1]; every per-token tensor here is `(B, L-1)`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from turnrl.algos.losses import token_logprobs_entropy
from turnrl.attention import gqa_attention
from turnrl.batch import Batch, micro_batches
from turnrl.config import AlgoConfig, OptimConfig
from turnrl.lm_parts import lm_parts, logits_at
from turnrl.shared_prefix import (checkpointing, head_length, plan_micro_batches, shared_prefix_hidden,
                                  shares_under_checkpointing, windows, worth_sharing)


def _autocast(enabled: bool, device: torch.device):
    """bf16 autocast (optim.bf16, sft.bf16) on the batch's device."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@dataclass
class ModelTokens:
    """The forward of some rows of a batch at the positions that predict a model token (`model_token_forward`)."""

    logits: torch.Tensor  # (N, V), N = on.sum(), in row-major order of `on`
    on: torch.Tensor  # (R, W) bool: the model-token positions in the rows' window layout
    window: Callable[[torch.Tensor], torch.Tensor]  # a (B, L-1) batch tensor -> its (R, W) window over the rows
    values: torch.Tensor | None  # (R, W) value-head outputs in the window layout (with `values_of`)


@dataclass
class Windows:
    """Last hidden states of some rows over their loss windows (`window_hidden`)."""

    hidden: torch.Tensor  # (R, W, hidden); the logits instead for a model lm_parts cannot split
    window: Callable[[torch.Tensor], torch.Tensor]  # a (B, L-1) batch tensor -> its (R, W) window over the rows
    starts: torch.Tensor  # (R,) the shifted column where each row's window starts


def window_hidden(lm, batch: Batch, rows: list[int]) -> Windows:
    """The shared-prompt forward of `rows` (planned by `plan`): their prompts' common head once, each distinct
    first prompt once, then every row's continuation (turnrl.shared_prefix). A row's window runs from its last
    prompt position (which predicts the first sampled token) to its end; columns past the end read as 0."""
    hidden, starts, width = shared_prefix_hidden(lm, batch.input_ids, batch.lengths, rows, batch.prompt_len,
                                                 batch.prompt_id)
    ends = torch.tensor([batch.lengths[r] - 1 for r in rows], device=batch.device)
    return Windows(hidden, lambda t: windows(t, rows, starts, width, ends), starts)


def model_token_forward(lm, batch: Batch, rows: list[int], *, share: bool, bf16: bool,
                        values_of=None) -> ModelTokens:
    """The forward of `rows` for a loss on their model tokens: the vocabulary-sized head runs only where a model
    token is predicted (the prompt, env replies and padding never enter a loss). With `share` (rows planned by
    `plan`), the prompts run as in the update: their common head once and each distinct first prompt once
    (`window_hidden`); the window of a row then runs from its last prompt position to its end. Without it the
    window is the rows' first L-1 columns. `values_of`: a policy whose value head runs too, on the same hidden
    states (every position a value loss reads lies in the window: see `critic_can_share`)."""
    if share and values_of is not None and not critic_can_share(lm):
        raise ValueError("this model's value head needs its full forward: lm_parts cannot split it")
    with _autocast(bf16, batch.device):
        if share:
            w = window_hidden(lm, batch, rows)
            window = w.window
        else:
            n = max(batch.lengths[r] for r in rows)
            window = lambda t: t[rows, : n - 1]  # noqa: E731
        on = window(batch.mask) > 0
        values = None
        if share:
            logits = lm_parts(lm).head(w.hidden[on])
            if values_of is not None:
                values = values_of.values(w.hidden)
        elif values_of is not None:
            logits, values = values_of(batch.input_ids[rows, :n], batch.attention[rows, :n], with_values=True,
                                       at=predicting(on))
            values = values[:, :-1]
        else:
            logits = logits_at(lm, batch.input_ids[rows, :n], batch.attention[rows, :n], predicting(on))[0]
    return ModelTokens(logits, on, window, values)


def model_token_logits(lm, batch: Batch, rows: list[int], *, share: bool, bf16: bool):
    """Logits at the positions of `rows` that predict a model token (`model_token_forward`), flat: (logits (N, V),
    their targets (N,), batch rows (N,), columns (N,) in the (B, L-1) target layout)."""
    f = model_token_forward(lm, batch, rows, share=share, bf16=bf16)
    b, w = batch.mask.shape
    index = f.window(torch.arange(b, device=batch.device)[:, None].expand(b, w))[f.on]
    cols = f.window(torch.arange(w, device=batch.device)[None].expand(b, w))[f.on]
    return f.logits, f.window(batch.targets)[f.on], index, cols


@torch.no_grad()
def model_token_logprobs(lm, batch: Batch, rows_groups: list[list[int]], temperature: float, bf16: bool,
                         share: bool = False, *, entropy: bool = False):
    """(B, L-1) logprobs of the batch's targets under `lm` at model-token positions, 0 elsewhere, one forward per
    micro-batch of `rows_groups` (`model_token_logits`; `share` as there). With `entropy`: (logprobs, (B, L-1)
    entropies of the same positions)."""
    logps = torch.zeros_like(batch.old_logprobs)
    ents = torch.zeros_like(batch.old_logprobs) if entropy else None
    for rows in rows_groups:
        logits, targets, index, cols = model_token_logits(lm, batch, rows, share=share, bf16=bf16)
        lp, ent = token_logprobs_entropy(logits, targets, temperature=temperature, entropy=entropy)
        logps[index, cols] = lp
        if entropy:
            ents[index, cols] = ent
    return (logps, ents) if entropy else logps


def reference_logprobs(ref, batch: Batch, rows_groups: list[list[int]], temperature: float,
                       bf16: bool, share: bool = False) -> torch.Tensor:
    """`model_token_logprobs` under `ref` (a `turnrl.reference.Reference`: its context swaps in the reference
    weights once for all micro-batches)."""
    with ref.context(), gqa_attention(ref.lm):
        return model_token_logprobs(ref.lm, batch, rows_groups, temperature, bf16, share)


@torch.no_grad()
def policy_values(policy, batch: Batch, rows_groups: list[list[int]], bf16: bool, share: bool = False) -> torch.Tensor:
    """(B, L-1) value-head outputs of `policy` (the LM head does not run). With `share` (rows planned by `plan`),
    only over the rows' windows (`window_hidden`), 0 on the prompt positions before them, which no estimator
    reads (`critic_can_share`); else at every position."""
    values = torch.zeros_like(batch.old_logprobs)
    for rows in rows_groups:
        with _autocast(bf16, batch.device):
            if share:
                w = window_hidden(policy.lm, batch, rows)
                vals = policy.values(w.hidden)
                for i, r in enumerate(rows):
                    start = int(w.starts[i])
                    n = batch.lengths[r] - 1 - start
                    values[r, start:start + n] = vals[i, :n]
                continue
            n = max(batch.lengths[r] for r in rows)
            attn = batch.attention[rows, :n]
            no_logits = torch.zeros_like(attn, dtype=torch.bool)
            _, vals = policy(batch.input_ids[rows, :n], attn, with_values=True, at=no_logits)
        values[rows, : n - 1] = vals[:, :-1].float()
    return values


def shared_head(policy, batch: Batch, rows: list[int], *, algo: AlgoConfig, optim: OptimConfig) -> int | None:
    """`sharable_head` for the update's forward (and the critic's old values), or None when a critic estimator
    cannot share (`critic_can_share`)."""
    head = sharable_head(policy.lm, batch, rows, enabled=optim.shared_prefix)
    return None if head is not None and algo.needs_critic and not critic_can_share(policy.lm) else head


def critic_can_share(lm) -> bool:
    """Whether the value head can run on the shared-prompt forward's hidden states: it needs the LM's last hidden
    state, which `lm_parts` gives only when it can split the LM into body and head. The rows' windows then hold
    every position a critic estimator reads: the model-token positions (GAE, bi-level GAE) and each turn's first
    reply position (turn GAE), all at or after the last prompt position (turnrl.credit)."""
    return bool(lm_parts(lm).split)


def sharable_head(lm, batch: Batch, rows: list[int], *, enabled: bool = True) -> int | None:
    """None when the shared-prefix forward does not apply to `rows`, else the length of the head all their first
    prompts share (0 when only identical prompts are shared). It applies when `enabled`, when some rows share a
    prompt or all prompts share a head, and under gradient checkpointing only where the prompts' keys/values can
    pass through the checkpointed layers (`shares_under_checkpointing`)."""
    if (not enabled or batch.prompt_id is None
            or (checkpointing(lm) and not shares_under_checkpointing(lm))):
        return None
    head = head_length(batch.input_ids, rows, batch.prompt_len)
    return head if worth_sharing(rows, batch.prompt_id, head) else None


def plan(batch: Batch, rows: list[int], token_budget: int, head: int | None) -> list[list[int]]:
    """Micro-batches of `rows`: packed group by group around the shared prompts when `head` is not None
    (`plan_micro_batches`), else length-sorted (`micro_batches`)."""
    if head is None:
        return micro_batches(batch.lengths, rows, token_budget)
    return plan_micro_batches(rows, batch.lengths, batch.prompt_len, batch.prompt_id, token_budget, head=head)


def predicting(targets_on: torch.Tensor) -> torch.Tensor:
    """(B, n) positions whose logits predict a marked target, from a (B, n-1) mask over the targets (position t
    predicts target t, the token at t+1; the last position predicts nothing)."""
    return torch.nn.functional.pad(targets_on, (0, 1))

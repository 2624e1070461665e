"""Policy / value losses and token-level helpers for LLM RL.

All functions are pure. Shapes: ``B`` rows, ``T`` token positions, ``V`` vocab.
``mask`` is ``(B, T)`` bool/float with 1 on model tokens that are trained on;
per-token losses are returned as ``(B, T)`` matrices with 0 where mask == 0 and
reduced with :func:`aggregate`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ppo_clip_loss",
    "high_entropy_mask",
    "off_policy_sequence_mask",
    "aggregate",
    "kl_penalty",
    "entropy_from_logits",
    "token_logprobs",
    "token_logprobs_entropy",
    "value_loss",
    "gspo_loss",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k2", "k3")
# exp() of a log-ratio above this overflows nothing but produces useless
# 1e8-sized ratios; verl clamps to the same +-20 window.
_MAX_LOG_RATIO = 20.0


def _bool_mask(mask: Tensor, like: Tensor) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match {tuple(like.shape)}")
    return mask != 0


def _masked_mean_float(x: Tensor, m: Tensor) -> float:
    n = int(m.sum())
    return float(x.detach()[m].sum() / n) if n > 0 else 0.0


def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                  clip_low: float = 0.2, clip_high: float = 0.28,
                  dual_clip: float | None = None) -> tuple[Tensor, dict]:
    """Per-token PPO clipped surrogate loss with decoupled (clip-higher) and dual clipping.

    Papers: Schulman et al., "Proximal Policy Optimization Algorithms"
    (arXiv 1707.06347); clip-higher from Yu et al., "DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale" (arXiv 2503.14476); dual-clip from
    Ye et al., "Mastering Complex Control in MOBA Games with Deep Reinforcement
    Learning" (arXiv 1912.09729).

        rho  = exp(logp - logp_old)
        L    = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))
        dual: if A < 0, L = min(L, -dual_clip * A)

    Args:
        logprobs: ``(B, T)`` log-probs under the current policy (with grad).
        old_logprobs: ``(B, T)`` log-probs under the behaviour policy.
        advantages: ``(B, T)`` advantages broadcast to tokens.
        mask: ``(B, T)`` 1 on trained tokens.
        dual_clip: constant c > 1, or None to disable.
    Returns:
        ``(loss, stats)``: loss ``(B, T)`` (0 where mask == 0); stats floats
        ``clip_frac`` (masked fraction where the clipped PPO branch is strictly
        larger, i.e. the token gets no gradient from the ratio),
        ``dual_clip_frac`` (masked fraction where the dual clip bound is active),
        ``approx_kl`` (masked mean of old - new, the k1 estimator of KL(old||new)).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = _bool_mask(mask, logprobs)
    adv = advantages.detach()
    # where() before exp so garbage (e.g. -inf) on padding cannot create nan/inf
    # (gradient through the unselected branch is exactly 0).
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1) & m
    dual_active = torch.zeros_like(m)
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual_active = (adv < 0) & (loss > cap) & m
        loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
    loss = torch.where(m, loss, torch.zeros_like(loss))
    n = int(m.sum())
    stats = {
        "clip_frac": float(clipped.sum()) / n if n else 0.0,
        "dual_clip_frac": float(dual_active.sum()) / n if n else 0.0,
        "approx_kl": _masked_mean_float(-log_ratio, m),
    }
    return loss, stats


def high_entropy_mask(entropy: Tensor, mask: Tensor, frac: float) -> tuple[Tensor, float]:
    """The model tokens whose entropy is among the highest ``frac`` of the batch's: the "forking" tokens that
    alone get the policy gradient in Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive
    Effective Reinforcement Learning for LLM Reasoning" (arXiv 2506.01939; their best setting keeps 20%).

    The threshold is the ``1 - frac`` quantile (linear interpolation, ``torch.quantile``) of the entropies of all
    masked tokens; a token is kept when its entropy is at or above it, so ties at the threshold are all kept.

    Args:
        entropy: ``(B, T)`` per-token entropies of the policy; mask: ``(B, T)`` 1 on model tokens;
        frac: in ``(0, 1]``; 1 keeps every model token.
    Returns:
        ``(keep, threshold)``: ``(B, T)`` float mask (a subset of ``mask``) and the entropy threshold (0.0 when
        ``mask`` is empty).
    """
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    m = _bool_mask(mask, entropy)
    values = entropy.detach()[m].float()
    if values.numel() == 0:
        return m.to(torch.float32), 0.0
    threshold = torch.quantile(values, 1.0 - frac) if frac < 1 else values.min()
    keep = m & (entropy.detach() >= threshold.to(entropy.dtype))
    return keep.to(torch.float32), float(threshold)


def off_policy_sequence_mask(logprobs: Tensor, sampled_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                             threshold: float) -> tuple[Tensor, Tensor]:
    """Off-policy sequence masking of DeepSeek-AI 2025, "DeepSeek-V3.2: Pushing the Frontier of Open Large Language
    Models" (arXiv 2512.02556): a token with a negative advantage leaves the policy loss when its row has drifted
    too far from the policy that sampled it,

        keep[i, t] = 0  if  A[i, t] < 0  and  mean_t' (log pi_sampled - log pi_theta)[i, t'] > threshold,

    the mean over the row's masked tokens (a per-token KL(pi_sampled || pi_theta) estimate of the row). Positive
    advantages always stay: a stale or mismatched sample can only push down what the current policy no longer
    does through tokens the old policy liked. ``sampled_logprobs`` are the sampler's (the inference engine's), so
    the divergence covers both staleness and the sampler/trainer mismatch.

    Args:
        logprobs: ``(B, T)`` current log-probs (gradient ignored); sampled_logprobs, advantages, mask: ``(B, T)``.
    Returns:
        ``(keep, row_kl)``: ``(B, T)`` float, 1 where the token stays (0 off the mask), and ``(B,)`` each row's
        divergence (0 for a row without masked tokens).
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    m = _bool_mask(mask, logprobs)
    gap = torch.where(m, sampled_logprobs.detach() - logprobs.detach(), torch.zeros_like(logprobs))
    row_kl = gap.sum(-1) / m.sum(-1).clamp(min=1)
    drop = (advantages.detach() < 0) & (row_kl > threshold)[:, None]
    return (m & ~drop).to(torch.float32), row_kl


def aggregate(loss: Tensor, mask: Tensor, mode: str, *, num_seqs: int | None = None,
              num_tokens: int | None = None, seq_tokens: Tensor | None = None) -> Tensor:
    """Reduce a per-token loss ``(B, T)`` to a scalar, micro-batch additive.

    Loss aggregation modes as compared in DAPO (arXiv 2503.14476, token-level
    loss) and Dr.GRPO "Understanding R1-Zero-Like Training" (arXiv 2503.20783).

    * ``"token-mean"``: sum of masked token losses / ``num_tokens``.
    * ``"seq-mean-token-mean"``: sum over rows of (row's masked token mean) / ``num_seqs``.
    * ``"seq-mean-token-sum"``: sum over rows of (row's masked token sum) / ``num_seqs``.

    The denominators are NOT computed from the micro-batch when given: pass the
    totals of the whole mini-batch so that summing the aggregated micro-batch
    losses equals (value and gradient) aggregating the mini-batch at once. When
    None they default to this batch's counts: ``num_tokens`` = number of masked
    tokens, ``num_seqs`` = number of rows with at least one masked token.
    Rows with no masked token contribute 0 to the numerator; they count in the
    denominator only if the caller includes them in ``num_seqs``.

    Several rows may make up one sequence (turn-as-sample training: one row per
    turn of an episode). Then pass ``num_seqs`` = number of sequences and
    ``seq_tokens`` ``(B,)`` = masked-token count of each row's whole sequence:
    "seq-mean-token-mean" divides a row's token sum by its sequence's count, so
    the result equals aggregating the sequences as single rows.

    Args:
        loss: ``(B, T)``; mask: ``(B, T)``.
    Returns:
        0-dim tensor (0 if the denominator is 0).
    """
    m = _bool_mask(mask, loss)
    mf = m.to(loss.dtype)
    masked = torch.where(m, loss, torch.zeros_like(loss))  # ignore nan/inf on padding
    if mode == "token-mean":
        denom = int(m.sum()) if num_tokens is None else num_tokens
        return masked.sum() / max(denom, 1)
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        tok = mf.sum(-1)
        denom = int((tok > 0).sum()) if num_seqs is None else num_seqs
        per_seq = masked.sum(-1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / (tok if seq_tokens is None else seq_tokens.to(tok.dtype)).clamp(min=1)
        return per_seq.sum() / max(denom, 1)
    raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {AGG_MODES}")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token sample estimators of KL(pi || pi_ref) from tokens sampled from pi.

    Reference: Schulman, "Approximating KL Divergence" (blog post, 2020); k3 is
    the estimator used by GRPO (DeepSeekMath, arXiv 2402.03300).

        k1 = logp - logp_ref                      (unbiased, high variance, can be < 0)
        k2 = 0.5 * (logp - logp_ref)^2            (biased, >= 0)
        k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1   (unbiased, >= 0)

    Args:
        logprobs, ref_logprobs: same shape, e.g. ``(B, T)``.
    Returns:
        Tensor of the same shape (no masking; multiply/aggregate with your mask).
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if kind == "k3":
        d = ref_logprobs - logprobs
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_KINDS}")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last axis, numerically stable.

    H = -sum_v p_v log p_v with log p = logits - logsumexp(logits) (log_softmax),
    so no exp overflow for large logits. Entries with p == 0 (e.g. logits of
    -inf) contribute 0 instead of 0 * -inf = nan.

    Args:
        logits: ``(..., V)``.
    Returns:
        ``(...)``.
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def token_logprobs(logits: Tensor, targets: Tensor, *, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) gathered at ``targets``.

    Used by every policy-gradient method; the temperature must match sampling
    so that log-probs are those of the behaviour policy.

    The (B, T) form of :func:`token_logprobs_entropy` (without the entropy): blocks of positions are upcast
    (half / bfloat16 logits to float32, for an accurate logsumexp) and reduced one at a time, so besides the
    input only a small temporary exists, and autograd keeps only the logits themselves.

    Args:
        logits: ``(B, T, V)``; targets: ``(B, T)`` long token ids.
    Returns:
        ``(B, T)`` log-probabilities (float32 for half inputs, else logits' dtype).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and targets (B, T), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    logp, _ = token_logprobs_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     temperature=temperature, entropy=False)
    return logp.view(logits.shape[:2])


# Elements of the (rows, vocab) float32 working block of token_logprobs_entropy: 2 MB, so that the upcast, the
# exponentials and the sums of one block stay in a core's L2 cache instead of streaming the whole (N, V) logits
# through memory once per element-wise op. On this project's 2-core CPU (2 MB L2 per core), for 1,400 positions
# of SmolLM2's 49k vocabulary, forward + backward took ~0.17 s with 2 MB blocks against ~0.25 s with 4 MB and
# ~0.4 s with 8 MB blocks (docs/performance.md).
_BLOCK_ELEMENTS = 1 << 19


def token_logprobs_entropy(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
                           entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """(log softmax(z) at ``targets``, entropy of softmax(z)) with z = logits / temperature, row by row: the
    policy-gradient log-probabilities and the entropy bonus of PPO (arXiv 1707.06347) in one pass.

    The same values as gathering ``log_softmax(z)`` and :func:`entropy_from_logits` (tests/test_losses.py), computed
    over blocks of rows with a hand-written backward, because autograd of those two materialises several
    (N, V) float32 tensors (the upcast, log_softmax, its exp, the products) and reads each back from memory;
    here every block is upcast, exponentiated and reduced while it is in cache, and the backward recomputes the
    softmax from the saved logsumexp instead of storing it:

        d logp / dz = onehot(target) - p,    d H / dz = -p (log p + H)

    Args:
        logits: ``(N, V)`` of any float dtype (bfloat16 logits are upcast to float32 one block at a time);
        targets: ``(N,)`` token ids; entropy: also return the entropy (else ``None``).
    Returns:
        ``(N,)`` log-probabilities and ``(N,)`` entropies (or ``None``), float32 for half inputs, else in
        ``logits``' dtype. Both are
        differentiable with respect to ``logits``; the gradient has ``logits``' dtype.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, V) and targets (N,), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp, ent = _LogprobEntropy.apply(logits, targets, float(temperature), bool(entropy))
    return logp, (ent if entropy else None)


def _blocks(n: int, vocab: int):
    step = max(1, _BLOCK_ELEMENTS // max(1, vocab))
    return (slice(i, min(n, i + step)) for i in range(0, n, step))


def _scaled(x: Tensor, temperature: float) -> Tensor:
    z = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return z / temperature if temperature != 1.0 else z


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy):
        n, vocab = logits.shape
        targets = targets.long()
        dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        logp = torch.empty(n, dtype=dtype, device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.zeros_like(logp)
        for b in _blocks(n, vocab):
            z = _scaled(logits[b], temperature)
            lse[b] = torch.logsumexp(z, dim=-1)
            logp[b] = z.gather(-1, targets[b, None]).squeeze(-1) - lse[b]
            if with_entropy:
                z = z - lse[b, None]  # log p (a new tensor: z may be the logits themselves)
                ent[b] = -(z.exp() * z).nan_to_num_(0.0).sum(-1)  # p log p -> 0 where p == 0 (logit -inf)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, targets, lse, ent = ctx.saved_tensors
        if grad_logp is None and grad_ent is None:
            return None, None, None, None
        grad = torch.empty_like(logits)
        n, vocab = logits.shape
        for b in _blocks(n, vocab):
            logp = _scaled(logits[b], ctx.temperature) - lse[b, None]
            p = logp.exp()
            # dL/dz = g_logp (onehot - p) - g_H p (log p + H) = -p (g_logp + g_H (log p + H)) + g_logp onehot
            if grad_ent is not None:
                g = (logp + ent[b, None]).mul_(grad_ent[b, None])
                if grad_logp is not None:
                    g += grad_logp[b, None]
                g = g.mul_(p).neg_().nan_to_num_(0.0)  # 0 where p == 0 (logit -inf)
            else:
                g = p.mul_(-grad_logp[b, None])
            if grad_logp is not None:
                g.scatter_add_(-1, targets[b, None], grad_logp[b, None])
            if ctx.temperature != 1.0:
                g /= ctx.temperature
            grad[b] = g
        return grad, None, None, None


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               clip: float | None = 0.2) -> Tensor:
    """Per-token clipped value (critic) loss.

    Paper: PPO (arXiv 1707.06347); value clipping as in the OpenAI baselines
    implementation ("Implementation Matters in Deep Policy Gradients", arXiv 2005.12729).

        L = 0.5 * max((v - R)^2, (old + clip(v - old, -c, c) - R)^2)

    Taking the max keeps the update pessimistic: a value already moved more than
    c away from ``old_values`` gets no gradient pulling it further.

    Args:
        values, old_values, returns, mask: ``(B, T)``; ``clip=None`` -> 0.5*(v-R)^2.
    Returns:
        ``(B, T)``, 0 where mask == 0.
    """
    m = _bool_mask(mask, values)
    ret = returns.detach()
    unclipped = (values - ret) ** 2
    if clip is None:
        loss = unclipped
    else:
        old = old_values.detach()
        v_clip = old + (values - old).clamp(-clip, clip)
        loss = torch.maximum(unclipped, (v_clip - ret) ** 2)
    return torch.where(m, 0.5 * loss, torch.zeros_like(loss))


def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages_seq: Tensor, mask: Tensor, *,
              clip_low: float, clip_high: float) -> tuple[Tensor, dict]:
    """GSPO: PPO-style clipping on a length-normalised sequence importance ratio.

    Paper: Zheng et al., "Group Sequence Policy Optimization" (arXiv 2507.18071).

        s_i = exp( (1/|y_i|) * sum_t (logp_{i,t} - logp_old_{i,t}) )
        L_i = max(-A_i * s_i, -A_i * clip(s_i, 1 - clip_low, 1 + clip_high))

    The paper's clip ranges are tiny (e.g. 3e-4 / 4e-4) because s_i is a
    geometric mean of token ratios. ``L_i`` is written on every masked token of
    row i, so ``aggregate(loss, mask, "seq-mean-token-mean")`` gives exactly the
    paper's objective (1/G) sum_i L_i (value and gradient).

    Args:
        logprobs, old_logprobs, mask: ``(B, T)``; advantages_seq: ``(B,)``.
    Returns:
        ``(loss, stats)``: loss ``(B, T)`` (0 where mask == 0), stats floats
        ``clip_frac`` (fraction of non-empty rows clipped) and ``approx_kl``
        (token-masked mean of old - new).
    """
    m = _bool_mask(mask, logprobs)
    if advantages_seq.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages_seq must be (B,), got {tuple(advantages_seq.shape)}")
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    n_tok = m.sum(-1)
    seq_log_ratio = log_ratio.sum(-1) / n_tok.clamp(min=1).to(log_ratio.dtype)
    s = torch.exp(seq_log_ratio.clamp(max=_MAX_LOG_RATIO))
    adv = advantages_seq.detach().to(s.dtype)
    pg1 = -adv * s
    pg2 = -adv * s.clamp(1.0 - clip_low, 1.0 + clip_high)
    seq_loss = torch.maximum(pg1, pg2)
    loss = torch.where(m, seq_loss[:, None].expand_as(log_ratio), torch.zeros_like(log_ratio))
    rows = n_tok > 0
    n_rows = int(rows.sum())
    stats = {
        "clip_frac": float(((pg2 > pg1) & rows).sum()) / n_rows if n_rows else 0.0,
        "approx_kl": _masked_mean_float(-log_ratio, m),
    }
    return loss, stats

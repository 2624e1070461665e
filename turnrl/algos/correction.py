"""Correction for the gap between the sampler's and the trainer's log-probabilities (train/inference mismatch).

A rollout engine (vLLM in bf16, the HF engine in bf16, another kernel or batch layout) reports log-probabilities
that differ from the ones the trainer computes for the very same tokens and weights, so "on-policy" data is
slightly off-policy. With a correction on, the update recomputes the log-probabilities with the trainer at the
weights it starts from (`logp_train`: the sampler's weights, or one update later when rollouts overlap updates),
uses them as PPO's old log-probabilities, and corrects for the sampler with the ratio

    rho = pi_train(a) / pi_rollout(a) = exp(logp_train - logp_rollout)   (per model token)

in one of three ways (`mismatch_correction`); all are pure functions of the two log-probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("tis", "icepop", "geo-mask")
# (low, high) bounds when the config leaves them unset; tis uses only `high` (its cap).
DEFAULT_BOUNDS = {"tis": (None, 2.0), "icepop": (0.5, 5.0), "geo-mask": (0.999, 1.001)}
# The keys of `mismatch_correction`'s stats (logged as mismatch/<key>).
STATS = ("ratio_mean", "ratio_min", "ratio_max", "k3_kl", "affected_frac")
# The same +-20 window on log-ratios as the PPO loss (turnrl.algos.losses): larger ones only overflow.
_MAX_LOG_RATIO = 20.0


def bounds(mode: str, low: float | None = None, high: float | None = None) -> tuple[float | None, float]:
    """The band `mode` uses: `low` and `high` where given, the mode's defaults (`DEFAULT_BOUNDS`) where None."""
    if mode not in MODES:
        raise ValueError(f"mismatch correction mode must be one of {MODES}, got {mode!r}")
    default_low, default_high = DEFAULT_BOUNDS[mode]
    return (default_low if low is None else low), (default_high if high is None else high)


def mismatch_correction(train_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, mode: str,
                        low: float | None = None, high: float | None = None) -> tuple[Tensor, Tensor, dict]:
    """Per-token loss weights and the loss mask that correct for the sampler/trainer gap.

    Modes (papers):
    - ``tis``: truncated importance sampling, weight ``min(rho, high)`` on each token's policy loss (Yao, Liu et
      al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", the fengyao.notion.site
      blog; verl's `rollout_is` truncate mode). Nothing is masked.
    - ``icepop``: token masking, a token whose ``rho`` leaves ``[low, high]`` leaves the loss (Ling Team 2025,
      "Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale Thinking Model", arXiv 2510.18855).
    - ``geo-mask``: sequence masking on the geometric mean of a row's ratios, ``exp(mean log rho)``; a row outside
      ``[low, high]`` leaves the loss whole (Liu, Li et al. 2025, "When Speed Kills Stability: Demystifying RL
      Collapse from the Training-Inference Mismatch", masked importance sampling with geometric rejection).

    Args:
        train_logprobs, rollout_logprobs: ``(B, T)`` log-probs of the sampled tokens under the trainer (at the
            weights the update starts from) and as the engine reported them.
        mask: ``(B, T)`` 1 on model tokens.
        low, high: the band (tis: ``high`` is the cap); None = the mode's default (`DEFAULT_BOUNDS`).
    Returns:
        ``(weights, keep, stats)``: ``weights`` ``(B, T)`` detached multipliers of the per-token policy loss (tis;
        1 otherwise), ``keep`` ``(B, T)`` float, the model tokens left in the loss (the mask minus the rejected
        ones; a loss aggregated over ``keep`` leaves rejected tokens out of its denominators too); ``stats``
        floats over the model tokens: ``ratio_mean``, ``ratio_min``, ``ratio_max`` (token ratios),
        ``k3_kl`` (mean ``rho - 1 - log rho``, the k3 estimate of KL(rollout || train)) and ``affected_frac``
        (tis: truncated tokens; masks: rejected tokens).
    """
    low, high = bounds(mode, low, high)
    on = mask > 0
    log_ratio = torch.where(on, train_logprobs.detach() - rollout_logprobs.detach(), torch.zeros_like(train_logprobs))
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    weights = torch.ones_like(ratio)
    keep = on.clone()
    if mode == "tis":
        affected = on & (ratio > high)
        weights = torch.where(on, ratio.clamp(max=high), weights)
    elif mode == "icepop":
        affected = on & ((ratio < low) | (ratio > high))
        keep &= ~affected
    else:  # geo-mask: one decision per row
        count = on.sum(1)
        geo = torch.exp(log_ratio.sum(1) / count.clamp(min=1))
        row_out = (count > 0) & ((geo < low) | (geo > high))
        affected = on & row_out[:, None]
        keep &= ~affected
    n = int(on.sum())
    values = ratio[on]
    stats = {
        "ratio_mean": float(values.mean()) if n else 1.0,
        "ratio_min": float(values.min()) if n else 1.0,
        "ratio_max": float(values.max()) if n else 1.0,
        "k3_kl": float((values - 1 - log_ratio[on]).mean()) if n else 0.0,
        "affected_frac": float(affected.sum()) / n if n else 0.0,
    }
    return weights, keep.to(mask.dtype if mask.is_floating_point() else torch.float32), stats

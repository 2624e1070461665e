"""Group filters for rollout batches (StarPO-S variance filtering, DAPO dynamic sampling).

All functions are pure. Shapes: ``rewards`` ``(N,)`` float per trajectory,
``group_ids`` ``(N,)`` long. Filters return the *group ids* to keep (1-D long,
sorted ascending); turn them into a per-trajectory mask with
``torch.isin(group_ids, kept_ids)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["filter_by_reward_std", "group_reward_stats", "dynamic_sampling_keep"]


def _group_std(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Return (unique sorted group ids ``(G,)``, unbiased reward std per group ``(G,)``).

    Computed in float64. A constant group (min == max), including a group of
    size 1 whose torch.std would be nan, has std exactly 0: the rounding
    residue of the float mean must not make a no-signal group look useful.
    """
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} "
                         "must be equal 1-D shapes")
    r = rewards.detach().to(torch.float64)
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    g = uniq.numel()
    count = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / count
    sq = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, inv, (r - mean[inv]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    gmin = torch.full((g,), float("inf"), dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amin")
    gmax = torch.full((g,), float("-inf"), dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amax")
    std = torch.where(gmin == gmax, torch.zeros_like(std), std)
    return uniq, std


def filter_by_reward_std(rewards: Tensor, group_ids: Tensor, keep: float, *,
                         drop_zero_std: bool = False) -> Tensor:
    """StarPO-S variance-based trajectory filtering: keep the most uncertain groups.

    Paper: Wang et al., "RAGEN: Understanding Self-Evolution in LLM Agents via
    Multi-Turn Reinforcement Learning" (StarPO-S, arXiv 2504.20073).

    Groups (rollouts of one prompt / env seed) are ranked by the unbiased std of
    their raw trajectory rewards, descending; ties are broken by the smaller
    group id first. The top ``max(1, int(round(keep * G)))`` groups are kept -
    note Python's ``round`` rounds halves to even (keep=0.5, G=5 keeps 2; G=7
    keeps 4). With ``drop_zero_std`` groups whose std is 0 are removed AFTER the
    top-k cut, so fewer (possibly zero) groups may be returned.

    Args:
        rewards: ``(N,)`` raw per-trajectory rewards.
        group_ids: ``(N,)`` long.
        keep: fraction of groups to keep, in [0, 1] (0 still keeps 1 group).
    Returns:
        ``(n_kept,)`` long kept group ids, ascending (empty if N == 0 or all dropped).
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    uniq, std = _group_std(rewards, group_ids)
    if uniq.numel() == 0:
        return uniq.to(torch.long)
    n_keep = max(1, int(round(keep * uniq.numel())))
    # uniq is ascending and the sort is stable, so equal stds keep smaller id first.
    order = torch.sort(std, descending=True, stable=True).indices[:n_keep]
    kept, kept_std = uniq[order], std[order]
    if drop_zero_std:
        kept = kept[kept_std > 0]
    return torch.sort(kept).values.to(torch.long)


def group_reward_stats(rewards: Tensor, group_ids: Tensor) -> dict[str, float]:
    """Logging statistics of within-group reward spread (for StarPO-S / collapse monitoring).

    Paper: RAGEN / StarPO-S (arXiv 2504.20073) - a falling in-group reward std
    is their early warning of the "echo trap" collapse.

    Args:
        rewards: ``(N,)``; group_ids: ``(N,)`` long.
    Returns:
        ``{"reward_std_mean", "reward_std_max", "zero_std_frac", "num_groups"}``
        as Python floats (unbiased in-group std; all 0.0 for an empty batch).
    """
    uniq, std = _group_std(rewards, group_ids)
    if uniq.numel() == 0:
        return {"reward_std_mean": 0.0, "reward_std_max": 0.0, "zero_std_frac": 0.0, "num_groups": 0.0}
    return {
        "reward_std_mean": float(std.mean()),
        "reward_std_max": float(std.max()),
        "zero_std_frac": float((std == 0).to(torch.float64).mean()),
        "num_groups": float(uniq.numel()),
    }


def dynamic_sampling_keep(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO dynamic sampling: ids of groups whose rewards are not all equal.

    Paper: Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale" (arXiv 2503.14476). A group with zero reward variance has all-zero
    group-relative advantages and contributes no gradient, so DAPO drops it (and
    keeps sampling until the batch is full - the re-sampling is the caller's job).

    Args:
        rewards: ``(N,)``; group_ids: ``(N,)`` long.
    Returns:
        ``(n_kept,)`` long group ids, ascending. Size-1 groups are dropped.
    """
    uniq, std = _group_std(rewards, group_ids)
    return uniq[std > 0].to(torch.long)

"""Advantage estimators for multi-turn LLM-agent RL.

Every function here is pure (no global state, inputs are never modified) and
returns new tensors that carry no autograd history: advantages and returns are
regression / policy-gradient *targets*, so they are computed on detached inputs.

Conventions used throughout:

* ``N`` - number of trajectories (episodes), ``G`` - number of distinct groups.
* ``B, T`` - batch rows and token positions of a padded token matrix.
* ``B, K`` - batch rows and turns of a padded per-turn matrix.
* "mask" tensors may be bool or float; any non-zero entry counts as valid.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "grpo_advantages",
    "rloo_advantages",
    "gae",
    "turn_gae",
    "bi_level_gae",
    "gigpo_advantages",
    "reinforce_pp_advantages",
    "rebn_advantages",
]


# --------------------------------------------------------------------------- helpers
def _float(x: Tensor) -> Tensor:
    """Detached tensor; int/bool inputs become float32 (floats keep their dtype)."""
    x = x.detach()
    return x if x.is_floating_point() else x.to(torch.float32)


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary (possibly sparse / negative) group ids to 0..G-1."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(uniq.numel())


def _group_centered(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return (r - group mean, group count, group is constant, inverse index), per item.

    ``constant`` is decided with min == max rather than std == 0 because the
    floating mean of e.g. three 0.1s is not exactly 0.1: dividing that rounding
    residue by (std + eps) would turn a "no signal" group into noise.
    """
    r = _float(rewards)
    if r.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(r.shape)} and group_ids {tuple(group_ids.shape)} differ")
    inv, g = _group_index(group_ids)
    count = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    total = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, inv, r)
    gmin = torch.full((g,), float("inf"), dtype=r.dtype, device=r.device)
    gmax = torch.full((g,), float("-inf"), dtype=r.dtype, device=r.device)
    gmin = gmin.scatter_reduce(0, inv, r, reduce="amin")
    gmax = gmax.scatter_reduce(0, inv, r, reduce="amax")
    dev = r - (total / count)[inv]
    constant = (gmin == gmax)[inv]
    return torch.where(constant, torch.zeros_like(dev), dev), count, constant, inv


def _masked_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
                cut: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GAE over the valid (mask != 0) entries of each row, skipping invalid ones.

    ``rewards, values, mask, cut``: ``(B, L)``. ``cut[b, t]`` True means the chain
    stops at valid position t (next value 0 and no advantage carried from later),
    used by bi-level GAE at turn ends. Rewards on invalid positions are added to
    the closest *preceding* valid position of the same row; a non-zero reward
    with no preceding valid position raises, because it would silently vanish.
    Cost O(B*L) with a Python loop over L only.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, mask {tuple(mask.shape)} "
            "must be equal 2-D shapes")
    dtype = torch.promote_types(torch.promote_types(_float(rewards).dtype, _float(values).dtype),
                                torch.float32)
    r = rewards.detach().to(dtype)
    v = values.detach().to(dtype)
    m = mask.detach() != 0
    # Values on invalid positions are meaningless (often garbage from the critic
    # head on prompt tokens) - zero them so they can never leak into returns.
    v = torch.where(m, v, torch.zeros_like(v))
    b, length = r.shape
    adv = torch.zeros_like(r)
    next_value = r.new_zeros(b)
    next_adv = r.new_zeros(b)
    carry = r.new_zeros(b)  # rewards seen on invalid positions after t, not yet credited
    zero = r.new_zeros(b)
    for t in range(length - 1, -1, -1):
        mt = m[:, t]
        if cut is not None:
            ct = cut[:, t] & mt
            next_value = torch.where(ct, zero, next_value)
            next_adv = torch.where(ct, zero, next_adv)
        delta = r[:, t] + carry + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(mt, a, zero)
        next_value = torch.where(mt, v[:, t], next_value)
        next_adv = torch.where(mt, a, next_adv)
        carry = torch.where(mt, zero, carry + r[:, t])
    if bool((carry != 0).any()):
        rows = torch.nonzero(carry != 0).flatten().tolist()
        raise ValueError(f"non-zero reward before the first valid (mask=1) position in rows {rows}; "
                         "put rewards on or after a model token")
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv, returns


# --------------------------------------------------------------------------- PART 1
def grpo_advantages(rewards: Tensor, group_ids: Tensor, *, normalize_std: bool = True,
                    eps: float = 1e-6) -> Tensor:
    """Group-relative advantage of GRPO / Dr.GRPO.

    Papers: "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
    Language Models" (GRPO, arXiv 2402.03300); "Understanding R1-Zero-Like
    Training: A Critical Perspective" (Dr.GRPO, arXiv 2503.20783).

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps), std unbiased (``torch.std``);
    with ``normalize_std=False`` (Dr.GRPO) A_i = r_i - mean_g(r).

    Args:
        rewards: ``(N,)`` scalar reward per trajectory.
        group_ids: ``(N,)`` long, trajectories with equal id form a group
            (e.g. rollouts of the same prompt / env seed); ids need not be contiguous.
    Returns:
        ``(N,)`` advantages. Groups whose rewards are all equal (including
        groups of size 1) get exactly 0.
    """
    dev, count, constant, inv = _group_centered(rewards, group_ids)
    if not normalize_std:
        return dev
    g = count.numel()
    sq = torch.zeros(g, dtype=dev.dtype, device=dev.device).index_add_(0, inv, dev * dev)
    # (count - 1) is 0 only for singleton groups, which are "constant" anyway.
    std = torch.sqrt(sq / (count - 1).clamp(min=1))[inv]
    return torch.where(constant, torch.zeros_like(dev), dev / (std + eps))


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE Leave-One-Out advantage.

    Paper: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs" (arXiv 2402.14740).

    A_i = r_i - (1/(n-1)) * sum_{j != i, j in g} r_j  = n/(n-1) * (r_i - mean_g r).

    Args:
        rewards: ``(N,)``; group_ids: ``(N,)`` long.
    Returns:
        ``(N,)``; size-1 groups and constant groups get exactly 0.
    """
    dev, count, _, inv = _group_centered(rewards, group_ids)
    n = count[inv]
    # n/(n-1)*(r - mean) is algebraically the leave-one-out form; n == 1 gives dev == 0.
    return dev * n / (n - 1).clamp(min=1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float,
        lam: float) -> tuple[Tensor, Tensor]:
    """Token-level Generalized Advantage Estimation over model tokens only.

    Paper: Schulman et al., "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation" (arXiv 1506.02438).

    Multi-turn rows interleave model tokens (mask 1) with prompt / environment
    tokens (mask 0). Masked positions are *skipped*: for a model token t, the
    next value is the value of the next model token of the same row (0 after
    the last one), i.e. the chain behaves as if env tokens were deleted, so
    gamma is applied once per model token, never per env token.

        delta_t = r'_t + gamma * V(next model token) - V_t
        A_t     = delta_t + gamma * lam * A(next model token)

    Reward rule: r'_t = rewards[t] + all rewards on the masked positions between
    t and the next model token. A reward on a masked position is thus credited
    (undiscounted) to the closest preceding model token - e.g. an env reward
    placed on the observation tokens that answer turn k goes to turn k's last
    token. A non-zero reward with no preceding model token raises ValueError.

    Args:
        rewards: ``(B, T)`` float token rewards.
        values: ``(B, T)`` critic values (ignored where mask == 0).
        mask: ``(B, T)`` bool/float, 1 on model (action) tokens.
    Returns:
        ``(advantages, returns)`` each ``(B, T)``, 0 where mask == 0, and
        returns = advantages + values on model tokens.
    """
    return _masked_gae(rewards, values, mask, gamma, lam)


def turn_gae(turn_rewards: Tensor, turn_values: Tensor, turn_mask: Tensor, *, gamma: float,
             lam: float) -> tuple[Tensor, Tensor]:
    """Turn-level GAE for a critic with one value per turn (ERA-style turn critic).

    Paper: Schulman et al., GAE (arXiv 1506.02438), applied to the turn-level MDP
    (one action = one whole model turn).

    Same recursion and skip rule as :func:`gae`, on the turn axis: padding turns
    (turn_mask 0) are skipped, their rewards are credited to the preceding valid turn.

    Args:
        turn_rewards, turn_values: ``(B, K)``; turn_mask: ``(B, K)`` bool/float.
    Returns:
        ``(advantages, returns)`` each ``(B, K)``, 0 on padding turns.
    """
    return _masked_gae(turn_rewards, turn_values, turn_mask, gamma, lam)


# --------------------------------------------------------------------------- PART 2
def bi_level_gae(turn_rewards: Tensor, token_values: Tensor, mask: Tensor, turn_ids: Tensor, *,
                 turn_gamma: float, token_gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Bi-level GAE: turn-level GAE across turns, token-level GAE inside each turn.

    Paper: VAGEN, "Reinforcing World Model Reasoning for Multi-Turn VLM Agents"
    (arXiv 2510.16907); same scheme as the RAGEN/VAGEN ``bi_level_gae`` estimator.

    Exactly:

    1. The value of turn k is the token value at the LAST model token of turn k,
       ``V_k = token_values[b, last_k]``. Turns without model tokens are skipped
       (their reward goes to the preceding turn, as in :func:`gae`).
    2. Turn level: GAE over turns with ``turn_gamma`` and ``lam``:
       ``delta_k = r_k + turn_gamma * V_{k+1} - V_k``, giving turn advantages
       ``A_k`` and turn returns ``G_k = A_k + V_k``.
    3. Token level, inside each turn separately: a GAE chain with ``token_gamma``
       and ``lam`` whose only reward is ``G_k`` on the last token of the turn and
       which does not bootstrap past the turn end (next value 0 there). Hence the
       last token of turn k gets exactly ``A_k``, and an earlier token t of the
       turn gets ``sum_l (token_gamma*lam)^l delta_{t+l}`` with
       ``delta = token_gamma * V_{t+1} - V_t`` (``G_k - V_last`` at the end).

    Unlike the reference code, no whitening is applied at the end (do it yourself
    if wanted). Tokens of one turn must be contiguous model tokens of the row.

    Args:
        turn_rewards: ``(B, K)`` reward of each turn.
        token_values: ``(B, T)`` critic values per token.
        mask: ``(B, T)`` 1 on model tokens.
        turn_ids: ``(B, T)`` long, turn index in ``[0, K)`` of each model token
            (ignored where mask == 0).
    Returns:
        ``(advantages, returns)`` each ``(B, T)``, zero where mask == 0.
    """
    if token_values.shape != mask.shape or turn_ids.shape != mask.shape or mask.dim() != 2:
        raise ValueError("token_values, mask and turn_ids must share one (B, T) shape")
    b, t_len = mask.shape
    k = turn_rewards.shape[1]
    if turn_rewards.dim() != 2 or turn_rewards.shape[0] != b:
        raise ValueError(f"turn_rewards must be (B, K) with B={b}, got {tuple(turn_rewards.shape)}")
    m = mask.detach() != 0
    tid = turn_ids.detach().long()
    if bool(((tid < 0) | (tid >= k))[m].any()):
        raise ValueError(f"turn_ids on model tokens must lie in [0, {k})")
    # last model-token position of every (row, turn); -1 if the turn has none
    pos = torch.arange(t_len, device=mask.device).expand(b, t_len)
    flat = (torch.arange(b, device=mask.device)[:, None] * k + tid.clamp(0, max(k - 1, 0)))[m]
    last = torch.full((b * k,), -1, dtype=torch.long, device=mask.device)
    last = last.scatter_reduce(0, flat, pos[m], reduce="amax").view(b, k)
    turn_valid = last >= 0
    v = _float(token_values)
    turn_values = torch.where(turn_valid, v.gather(1, last.clamp(min=0)), torch.zeros_like(last, dtype=v.dtype))
    _, turn_ret = _masked_gae(turn_rewards, turn_values, turn_valid, turn_gamma, lam)
    tok_r = torch.zeros(b, t_len, dtype=turn_ret.dtype, device=mask.device)
    is_last = torch.zeros(b, t_len, dtype=torch.bool, device=mask.device)
    rows, cols = torch.nonzero(turn_valid, as_tuple=True)
    tok_r[rows, last[rows, cols]] = turn_ret[rows, cols]
    is_last[rows, last[rows, cols]] = True
    return _masked_gae(tok_r, v, m, token_gamma, lam, cut=is_last)


def gigpo_advantages(episode_rewards: Tensor, group_ids: Tensor, step_rewards: Tensor,
                     anchor_keys: Tensor, step_mask: Tensor, *, omega: float = 1.0,
                     gamma: float = 0.95, normalize_std: bool = True,
                     eps: float = 1e-6) -> Tensor:
    """GiGPO: episode-level group advantage + step-level anchor-state advantage.

    Paper: Feng et al., "Group-in-Group Policy Optimization for LLM Agent
    Training" (GiGPO, arXiv 2505.10978).

    * Episode level: ``A^E_i = grpo_advantages(episode_rewards, group_ids)``.
    * Step level: the discounted return of step k of episode i,
      ``R_{i,k} = sum_{j>=k} gamma^(j-k) r_{i,j}`` (padding steps skipped). Steps
      of the SAME group with the SAME anchor key (identical environment state)
      form a step group; ``A^S`` is the GRPO advantage of ``R`` inside each step
      group. A step whose anchor state occurs once in its group gets A^S = 0
      (verl-agent instead uses the raw return there; we keep "no comparison -
      no signal", matching :func:`grpo_advantages`).
    * ``A_{i,k} = A^E_i + omega * A^S_{i,k}``.

    Args:
        episode_rewards: ``(N,)`` total reward per episode.
        group_ids: ``(N,)`` long group of each episode.
        step_rewards: ``(N, K)`` immediate reward of each step (turn).
        anchor_keys: ``(N, K)`` long, hashed environment state seen at each step.
        step_mask: ``(N, K)`` bool/float, 1 on real steps, 0 on padding.
        normalize_std: False uses mean-only normalisation (F_norm = 1) at both levels.
    Returns:
        ``(N, K)`` per-step advantages, 0 on padding steps.
    """
    n, k = step_rewards.shape
    if anchor_keys.shape != (n, k) or step_mask.shape != (n, k) or episode_rewards.shape != (n,):
        raise ValueError("episode_rewards (N,), step_rewards/anchor_keys/step_mask (N, K) expected")
    m = step_mask.detach() != 0
    a_e = grpo_advantages(episode_rewards, group_ids, normalize_std=normalize_std, eps=eps)
    # discounted return-to-go == GAE with V = 0 and lam = 1
    ret, _ = _masked_gae(step_rewards, torch.zeros_like(_float(step_rewards)), m, gamma, 1.0)
    keys = torch.stack([group_ids.detach().long()[:, None].expand(n, k)[m],
                        anchor_keys.detach().long()[m]], dim=1)
    a_s = torch.zeros_like(ret)
    if keys.shape[0] > 0:
        _, step_gid = torch.unique(keys, dim=0, return_inverse=True)
        a_s[m] = grpo_advantages(ret[m], step_gid, normalize_std=normalize_std, eps=eps)
    out = a_e.to(ret.dtype)[:, None] + omega * a_s
    return torch.where(m, out, torch.zeros_like(out))


def reinforce_pp_advantages(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """REINFORCE++-baseline: group-mean baseline, then batch-wide normalisation.

    Paper: Hu, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models" (arXiv 2501.03262).

    d_i = r_i - mean_g(r);  A_i = (d_i - mean_batch(d)) / (std_batch(d) + eps)
    (unbiased std). Normalising by the *batch* std instead of each group's std
    keeps groups with a tiny spread from being blown up (the GRPO failure mode).
    Done per trajectory here; OpenRLHF whitens per token (long answers weigh more).

    Args:
        rewards: ``(N,)``; group_ids: ``(N,)`` long.
    Returns:
        ``(N,)``; exactly 0 when every group is constant.
    """
    d, _, _, _ = _group_centered(rewards, group_ids)
    if d.numel() < 2 or bool((d == 0).all()):
        return torch.zeros_like(d)
    return (d - d.mean()) / (d.std() + eps)


def rebn_advantages(turn_rewards: Tensor, turn_mask: Tensor, *, gamma: float,
                    eps: float = 1e-6) -> Tensor:
    """ReBN - Return Batch Normalisation of per-turn discounted returns.

    Definition implemented (stated because the name is used loosely): for each
    valid turn k, ``G_k = sum_{j>=k, valid} gamma^(j-k) r_j`` (padding turns
    skipped; their rewards go to the preceding turn as in :func:`gae`), then
    ``A_k = (G_k - mean(G)) / (std(G) + eps)`` with mean / unbiased std over
    ALL valid turns of the batch (critic-free REINFORCE with a batch-normalised
    return, so turns are compared across the whole batch, not only in a group).
    Paper: GEM, "GEM: A Gym for Agentic LLMs" (arXiv 2510.01051), which argues this
    per-turn-return REINFORCE + ReBN is a better multi-turn default than GRPO.

    Args:
        turn_rewards: ``(B, K)``; turn_mask: ``(B, K)`` 1 on real turns.
    Returns:
        ``(B, K)`` advantages, 0 on padding turns.
    """
    m = turn_mask.detach() != 0
    ret, _ = _masked_gae(turn_rewards, torch.zeros_like(_float(turn_rewards)), m, gamma, 1.0)
    g = ret[m]
    out = torch.zeros_like(ret)
    if g.numel() < 2 or bool((g == g[0]).all()):
        return out  # no spread, no signal (also avoids nan std of a single turn)
    out[m] = (g - g.mean()) / (g.std() + eps)
    return out


def reverse_kl_advantages(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, *,
                          coef: float = 1.0) -> Tensor:
    """On-policy distillation: per-token advantage ``coef * (log pi_teacher(x_t) - log pi_student(x_t))``.

    ``x_t`` is the token the student sampled; ``student_logprobs`` are the sampling policy's log-probabilities
    of it and ``teacher_logprobs`` the teacher's, in the same context. Minus the per-token reverse KL
    estimate ``log pi_S - log pi_T`` used as a reward with discount 0 (each token is credited only with its
    own term), so the policy-gradient loss lowers KL(pi_S || pi_T) on the student's own samples: mode-seeking,
    dense (one signal per token) and on-policy. Papers: Agarwal et al. 2024, "On-Policy Distillation of Language
    Models: Learning from Self-Generated Mistakes" (GKD, arXiv 2306.13649); Gu et al. 2024, "MiniLLM: Knowledge
    Distillation of Large Language Models" (arXiv 2306.08543, reverse KL); Lu & Thinking Machines Lab 2025,
    "On-Policy Distillation" (per-token reverse KL as the advantage, added to or replacing the task reward).

    Args:
        student_logprobs, teacher_logprobs: ``(B, T)``; mask: ``(B, T)`` 1 on model tokens.
    Returns:
        ``(B, T)`` advantages, 0 off the mask.
    """
    m = mask.detach() != 0
    gap = _float(teacher_logprobs.detach()) - _float(student_logprobs.detach())
    return torch.where(m, coef * gap, torch.zeros_like(gap))

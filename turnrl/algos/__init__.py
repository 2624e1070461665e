"""Algorithm building blocks of turnrl: advantages, group filters and losses.

Pure functions on torch tensors; see docs/algorithms.md for formulas and papers.
"""

from turnrl.algos.advantages import (
    bi_level_gae,
    gae,
    gigpo_advantages,
    grpo_advantages,
    rebn_advantages,
    reinforce_pp_advantages,
    reverse_kl_advantages,
    rloo_advantages,
    turn_gae,
)
from turnrl.algos.correction import mismatch_correction
from turnrl.algos.filters import dynamic_sampling_keep, filter_by_reward_std, group_reward_stats
from turnrl.algos.losses import (
    aggregate,
    entropy_from_logits,
    gspo_loss,
    kl_penalty,
    ppo_clip_loss,
    token_logprobs,
    value_loss,
)

__all__ = [
    "aggregate",
    "bi_level_gae",
    "dynamic_sampling_keep",
    "entropy_from_logits",
    "filter_by_reward_std",
    "gae",
    "gigpo_advantages",
    "group_reward_stats",
    "grpo_advantages",
    "gspo_loss",
    "kl_penalty",
    "mismatch_correction",
    "ppo_clip_loss",
    "rebn_advantages",
    "reinforce_pp_advantages",
    "reverse_kl_advantages",
    "rloo_advantages",
    "token_logprobs",
    "turn_gae",
    "value_loss",
]

"""Pure RLHF math on tensors (losses, advantages, KL) and the KL coefficient controllers."""

from crslight.rl.functional import (
    entropy_from_logits,
    gae,
    group_normalized_advantages,
    kl_penalty,
    last_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from crslight.rl.kl_controller import AdaptiveKLController, FixedKLController, KLController

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "entropy_from_logits",
    "gae",
    "group_normalized_advantages",
    "kl_penalty",
    "last_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "ppo_policy_loss",
    "ppo_value_loss",
]

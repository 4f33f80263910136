r"""The RLHF math of crslight, as pure functions on tensors.

**The MDP.** Each recommender reply is generated token by token, so PPO runs on a token-level MDP:
the state is the dialogue so far plus the reply tokens already written, the action is the next token.
Which tokens are actions is given by ``response_mask`` ``(b, t)``: 1 on tokens the policy generated,
0 on the prompt, on padding and, in multi-turn episodes, on the user's turns (the environment's move,
not the agent's). All functions below read this mask and nothing else about the layout, so left or
right padding and several reply segments per row are all fine.

**The reward** (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022)::

    r_t = -beta * KL_t                 on every response token t
    r_T += R_phi(dialogue, reply)      on the last response token T of the row

R_phi is trained on implicit feedback (dwell time, sentiment shift, acceptance) and is only
trustworthy near the dialogues it saw. The per-token KL penalty to the reference policy pi_ref (the
SFT model, i.e. the base with adapters off) is what keeps the policy there: without it PPO finds
the replies R_phi over-scores — reward hacking — and the text degenerates. ``KL_t`` is a one-sample
estimate of ``KL(pi || pi_ref)`` at token t, with the log-ratio ``d = log pi - log pi_ref``:

- ``k1 = d``: unbiased, but a single sample can be negative;
- ``k3 = (exp(-d) - 1) + d``: also unbiased for ``KL(pi || pi_ref)`` under samples from pi, never
  negative and of lower variance (Schulman, "Approximating KL divergence", 2020).

Summed over a reply either gives an unbiased estimate of the sequence KL, which is what the adaptive
controller (``kl_controller.py``) steers toward its target.

**Advantages.** GAE (Schulman et al. 2016) with a learned value head::

    delta_t = r_t + gamma * V(s_next) - V(s_t);   A_t = delta_t + gamma * lam * A_next

where ``next`` is the next *response* token of the row: masked positions are skipped, not treated as
zero-reward steps, so a multi-turn episode bootstraps across the user's turn. After the last response
token the episode ends (``V = 0``); there is no bootstrapping from truncated replies. ``returns =
A + V`` are the value targets. Advantages are then whitened over all response tokens of the batch
(:func:`masked_whiten`), as TRL does.

**Losses.** The clipped PPO surrogate and the clipped value loss (Schulman et al. 2017), averaged
over all response tokens of the minibatch (a token-level mean, as TRL's PPO: long replies weigh
more than short ones, and every token's gradient has the same scale).

**GRPO.** :func:`group_normalized_advantages` is the critic-free alternative (Shao et al. 2024):
several replies to one state, each advantage the reply's score standardised within its group.

**Left out on purpose.** An entropy bonus (entropy is computed for logging only), dual-clip PPO,
reward clipping and reward whitening policies (a module may whiten scores with ``shift_mean=False``),
and any per-sequence length normalisation: each adds a knob whose effect on a 135M recommender we
have not measured.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is set; NaN or inf at masked-out positions do not leak in.

    Args:
        values: Any shape.
        mask: Same shape, 0/1 or bool.
        dim: Dimension to reduce; ``None`` reduces everything.

    Returns:
        The masked sum.
    """
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set.

    Args:
        values: Any shape.
        mask: Same shape, 0/1 or bool.
        dim: Dimension to reduce; ``None`` reduces everything.

    Returns:
        The masked mean; 0 where the mask is empty (never NaN).
    """
    count = mask.to(values.dtype)
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over all positions where ``mask`` is set.

    Args:
        values: Any shape.
        mask: Same shape, 0/1 or bool.
        unbiased: Apply Bessel's correction ``n / (n - 1)``. With ``n <= 1`` the variance is 0 either way.

    Returns:
        A scalar tensor.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        variance = variance * n / (n - 1).clamp(min=1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Standardises ``values`` with the mean and (unbiased) variance over the masked positions.

    Args:
        values: Any shape.
        mask: Same shape, 0/1 or bool.
        shift_mean: Subtract the mean (advantages). ``False`` only rescales and keeps the mean, the
            usual choice for rewards, whose sign carries meaning.
        eps: Added to the variance.

    Returns:
        Whitened values of the same shape; 0 at masked-out positions.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label under the logits, without materialising a full log-softmax.

    Computes ``logit[label] - logsumexp(logits)`` one row at a time in float32 (TRL's
    ``selective_log_softmax``): the peak extra memory is one ``(t, vocab)`` row, not ``(b, t, vocab)``,
    and the backward pass keeps no log-softmax output around. Alignment is the caller's: for a causal
    LM pass ``logits[:, :-1]`` and ``input_ids[:, 1:]``.

    Args:
        logits: ``(b, t, vocab)``.
        labels: ``(b, t)`` token ids. Negative ids (the ``-100`` ignore index) are read as 0; mask them.
        temperature: The sampling temperature, so that the log-probs are those of the sampler.

    Returns:
        ``(b, t)`` float32 log-probabilities.
    """
    if temperature != 1.0:
        logits = logits / temperature
    labels = labels.clamp(min=0)
    rows = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position, ``logsumexp(z) - sum(softmax(z) * z)``.

    Args:
        logits: ``(b, t, vocab)``.

    Returns:
        ``(b, t)`` float32 entropies, computed row by row to bound memory.
    """
    rows = []
    for row_logits in logits:
        row_logits = row_logits.float()
        probs = torch.softmax(row_logits, dim=-1)
        rows.append(torch.logsumexp(row_logits, dim=-1) - (probs * row_logits).sum(-1))
    return torch.stack(rows)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from the log-probs of the sampled tokens.

    Args:
        logprobs: ``(b, t)`` log-probs under the policy that sampled the tokens.
        ref_logprobs: ``(b, t)`` log-probs under the reference policy.
        estimator: ``"k1"`` (``d = logprobs - ref_logprobs``) or ``"k3"`` (``exp(-d) - 1 + d``, >= 0).

    Returns:
        ``(b, t)``.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """``(b, t) -> (b,)``: position of the last set entry of each row (0 for an empty row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), positions, 0).amax(dim=-1)


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO rewards: ``-kl_coef * KL_t`` on every response token, plus the score on the last one.

    Args:
        scores: ``(b,)`` sequence-level rewards (R_phi, plus any direct signal rewards).
        logprobs: ``(b, t)`` log-probs of the sampled tokens under the rollout policy.
        ref_logprobs: ``(b, t)`` the same under the reference policy.
        response_mask: ``(b, t)``, 1 on generated tokens. A row without any gets no reward at all.
        kl_coef: beta, the weight of the KL penalty (``KLController.value``).
        estimator: The per-token KL estimator, see :func:`kl_penalty`.

    Returns:
        ``(rewards, kl)``, both ``(b, t)`` and 0 off the response; ``kl`` is the unweighted per-token
        estimate, for logging and for the adaptive KL controller (``masked_sum(kl, mask, 1).mean()``).
    """
    mask = response_mask.bool()
    kl = torch.where(mask, kl_penalty(logprobs, ref_logprobs, estimator), 0.0)
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    score = torch.where(mask.any(-1), scores.to(rewards.dtype), 0.0)
    rewards = rewards.index_put((rows, last_index(mask)), score, accumulate=True)
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens of each row.

    Runs the usual backward recursion but steps only through positions where ``response_mask`` is
    set: the "next" state of a response token is the next response token of the same row (skipping
    prompt, padding and user turns), and after the row's last response token ``V = 0``. For one
    right-padded reply per row this is exactly TRL's GAE.

    Args:
        rewards: ``(b, t)`` per-token rewards (:func:`per_token_rewards`); read only on the mask.
        values: ``(b, t)`` value-head outputs at the rollout; read only on the mask.
        response_mask: ``(b, t)``.
        gamma: Discount per response token.
        lam: GAE's bias-variance trade-off (0: one-step TD, 1: Monte Carlo returns).

    Returns:
        ``(advantages, returns)``, both ``(b, t)``, detached, 0 off the mask; ``returns = advantages
        + values``. Whiten the advantages afterwards if wanted.
    """
    rewards, values = rewards.detach(), values.detach()
    mask = response_mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        step = mask[:, t]
        advantages[:, t] = torch.where(step, advantage, 0.0)
        next_advantage = torch.where(step, advantage, next_advantage)
        next_value = torch.where(step, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: ``mean(max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)))``.

    Args:
        logprobs: ``(b, t)`` log-probs under the policy being updated (with grad).
        old_logprobs: ``(b, t)`` log-probs at the rollout.
        advantages: ``(b, t)``.
        mask: ``(b, t)`` response mask.
        clip: epsilon of the ratio clip.

    Returns:
        ``(loss, clipfrac, approx_kl)``: the loss (token mean), the fraction of tokens where the clip
        was active, and ``KL(old || new)`` estimated with k3 (``ratio - 1 - log ratio``); the last two
        detached, for logging and early stopping.
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(loss.dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss: ``0.5 * mean(max((V - R)^2, (V_old + clamp(V - V_old, -clip, clip) - R)^2))``.

    The clip keeps one update from moving the value far from the rollout's estimate, like the ratio
    clip does for the policy.

    Args:
        values: ``(b, t)`` values of the head being updated (with grad).
        old_values: ``(b, t)`` values at the rollout.
        returns: ``(b, t)`` targets from :func:`gae`.
        mask: ``(b, t)`` response mask.
        clip: Largest move of a value away from ``old_values`` that still lowers the loss.

    Returns:
        The scalar loss.
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def group_normalized_advantages(
    scores: torch.Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """GRPO advantages: each score minus its group's mean, divided by the group's std.

    Args:
        scores: ``(b,)`` with ``b = groups * group_size``; the replies of one group are contiguous.
        group_size: Replies sampled per state.
        eps: Added to the std (a group of equal scores gets advantage 0).
        scale_by_std: ``False`` only centres (Dr. GRPO, which argues the std rescaling biases toward
            groups with little spread).

    Returns:
        ``(b,)`` advantages; broadcast them over the reply's tokens.
    """
    if scores.ndim != 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    if scale_by_std and group_size < 2:
        raise ValueError("group_size must be at least 2 to estimate a group std")
    grouped = scores.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)

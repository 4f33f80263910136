"""Reward-model losses as pure functions on score tensors.

**Bradley-Terry** (Bradley & Terry 1952; the reward-model loss of Ouyang et al. 2022 and of TRL's ``RewardTrainer``):
the probability that the chosen reply beats the rejected one is ``sigmoid(r_c - r_r)``, and the loss is its negative
log-likelihood. An optional ``margin`` (a constant, or per pair, e.g. the label gap; Llama 2's margin loss) asks the
chosen reply to win by at least that much before the loss fades::

    L_BT = mean( -log sigmoid(r_c - r_r - margin) )

Bradley-Terry only sees differences, so the scores' offset is free and can drift. TRL's reward *centring* term
(Eisenstein et al. 2023, "Helping or Herding?") pins it near zero, which keeps R_phi's scale comparable across runs
and stops PPO's reward from carrying a large constant::

    L = L_BT + c * mean( (r_c + r_r)^2 )

**Pointwise regression** fits the composite label itself (mean squared error over the samples that have one). It
uses the label's magnitude, not just its order, at the price of trusting a weak label's scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | float = 0.0,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Mean Bradley-Terry loss of ``p`` pairs, with an optional margin and reward-centring term.

    Args:
        chosen: ``(p,)`` scores of the preferred replies.
        rejected: ``(p,)`` scores of the other replies.
        margin: a constant or ``(p,)`` margins the chosen score must exceed the rejected one by.
        center_rewards_coefficient: weight ``c`` of ``mean((r_c + r_r)^2)``; None or 0 for none.

    Returns:
        The scalar loss (0 for ``p = 0``, still attached to the graph).
    """
    if chosen.numel() == 0:
        return chosen.sum() + rejected.sum()
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def regression_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error between scores and labels over the samples whose label is not NaN.

    Args:
        scores: ``(n,)``.
        labels: ``(n,)``, NaN where a sample has no label.

    Returns:
        The scalar loss (0, attached to the graph, when no sample has a label).
    """
    known = ~labels.isnan()
    if not known.any():
        return scores.sum() * 0.0
    return F.mse_loss(scores[known], labels[known].to(scores.dtype))


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``(p,)`` 1.0 where the chosen score is strictly higher, 0.5 on ties, else 0.0."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()

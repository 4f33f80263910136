import math

import pytest
import torch

from crslight.rl.reward_losses import bradley_terry_loss, pairwise_accuracy, regression_loss

CHOSEN = torch.tensor([1.0, 0.0, 2.0])
REJECTED = torch.tensor([0.0, 0.0, 3.0])


def nll(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x))."""
    return math.log1p(math.exp(-x))


def test_bradley_terry_by_hand():
    # differences 1, 0, -1: -log sigmoid = 0.31326, 0.69315, 1.31326; mean 0.77322
    expected = (nll(1.0) + nll(0.0) + nll(-1.0)) / 3
    assert expected == pytest.approx(0.77322, abs=1e-5)
    assert bradley_terry_loss(CHOSEN, REJECTED).item() == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_margin_and_centring_by_hand():
    # margin 0.5: differences 0.5, -0.5, -1.5 -> 0.47408, 0.97408, 1.70141; mean 1.04986
    with_margin = (nll(0.5) + nll(-0.5) + nll(-1.5)) / 3
    assert bradley_terry_loss(CHOSEN, REJECTED, margin=0.5).item() == pytest.approx(with_margin, abs=1e-6)
    # per-pair margins 0, 1, 0: differences 1, -1, -1
    per_pair = (nll(1.0) + nll(-1.0) + nll(-1.0)) / 3
    assert bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([0.0, 1.0, 0.0])).item() == pytest.approx(per_pair)
    # centring: (1 + 0)^2, (0 + 0)^2, (2 + 3)^2 -> mean 26 / 3; times 0.1 = 0.86667
    centred = bradley_terry_loss(CHOSEN, REJECTED, center_rewards_coefficient=0.1).item()
    assert centred == pytest.approx(0.77322 + 0.86667, abs=1e-4)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    bradley_terry_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # d/dc of -log sigmoid(c - r) / 3 = -(1 - sigmoid(c - r)) / 3; at c - r = 0 that is -1/6
    assert chosen.grad[1].item() == pytest.approx(-1 / 6)


def test_empty_pairs_give_zero_loss_attached_to_the_graph():
    scores = torch.zeros(0, requires_grad=True)
    loss = bradley_terry_loss(scores, scores)
    assert loss.item() == 0.0 and loss.requires_grad


def test_regression_skips_missing_labels():
    # (1 - 0)^2 and (0 - 1)^2 count; the NaN label does not: mean 1.0
    scores = torch.tensor([1.0, 2.0, 0.0])
    assert regression_loss(scores, torch.tensor([0.0, math.nan, 1.0])).item() == pytest.approx(1.0)
    assert regression_loss(scores, torch.full((3,), math.nan)).item() == 0.0


def test_pairwise_accuracy_counts_ties_as_half():
    assert pairwise_accuracy(CHOSEN, REJECTED).tolist() == [1.0, 0.5, 0.0]

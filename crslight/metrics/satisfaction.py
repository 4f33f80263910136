"""Mean satisfaction rating over episodes (other per-episode means, such as acceptance, are torchmetrics'
``MeanMetric``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric


class Satisfaction(Metric):
    """The mean satisfaction rating of episodes (the simulator's 1-5 satisfaction, or users' own ratings); NaN skipped.

    ``satisfaction = sum of the non-NaN values / their number`` (NaN before any value).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total_value", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor | Sequence[float]) -> None:
        """Adds per-sample values (any shape; NaN = unknown, skipped)."""
        values = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1).to(self.total.device)
        known = ~values.isnan()
        self.total_value += values[known].sum()
        self.total += known.sum()

    def compute(self) -> torch.Tensor:
        return (self.total_value / self.total).float() if self.total > 0 else torch.tensor(math.nan)

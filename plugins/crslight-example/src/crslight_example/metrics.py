"""An example metric: the mean length of generated replies, in words."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric


class MeanReplyLength(Metric):
    """The mean number of whitespace-separated words per generated reply.

    Both states are sums (``dist_reduce_fx="sum"``), so the value is exact across DDP ranks.
    """

    is_differentiable = False
    higher_is_better = None  # neither: too short is curt, too long is rambling
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("words", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("replies", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, replies: Sequence[str]) -> None:
        """Adds generated replies."""
        self.words += sum(len(r.split()) for r in replies)
        self.replies += len(replies)

    def compute(self) -> torch.Tensor:
        return (self.words / self.replies).float() if self.replies > 0 else torch.tensor(math.nan)

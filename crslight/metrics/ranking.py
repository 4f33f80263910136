"""Ranking metrics of the CRSLab / UniCRS protocol: one sample per (recommender turn, item it mentions), the whole
catalogue ranked, one relevant item per sample.

The rank of the target is ``1 + #{items scored higher} + #{other items scored the same}``: ties count against the
target, so a constant scorer gets the worst rank, not the best. With an ``exclude`` mask (the items mentioned earlier in
the dialogue) those items leave the ranking, and a sample whose target is itself excluded is skipped: that is the
stricter "new items only" variant reported beside the plain one.

Every state is a sum (``dist_reduce_fx="sum"``), so the metrics reduce exactly across DDP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from crslight.models.retrieval import target_ranks

__all__ = ["ItemCoverage", "MRRAtK", "NDCGAtK", "RecallAtK", "target_ranks"]


class _RankingMetric(Metric):
    """Shared update / compute: a sum of per-sample gains for each cut-off, and the sample count."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    metric_name = ""

    def __init__(self, k: Sequence[int] = (1, 10, 50), **kwargs):
        super().__init__(**kwargs)
        if not k or min(k) < 1:
            raise ValueError(f"k must be a non-empty list of positive cut-offs, got {k!r}")
        self.k = [int(x) for x in k]
        self.add_state("gains", torch.zeros(len(self.k), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    @staticmethod
    def gain(ranks: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError

    def update(self, scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None) -> None:
        """Adds a batch.

        Args:
            scores: ``(b, n_items)`` item scores, higher is better.
            target: ``(b,)`` long, the relevant item's column.
            exclude: optional ``(b, n_items)`` bool mask of items to drop from the ranking (items mentioned earlier);
                samples whose target is masked are skipped.
        """
        ranks = target_ranks(scores.detach(), target, exclude)
        ranks = ranks[torch.isfinite(ranks)].to(self.gains.device)
        self.gains += torch.stack([self.gain(ranks, k).sum() for k in self.k])
        self.total += ranks.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"<name>@<k>": mean gain}`` for each cut-off (NaN before any sample)."""
        means = (self.gains / self.total).float() if self.total > 0 else torch.full_like(self.gains, math.nan).float()
        return {f"{self.metric_name}@{k}": means[i] for i, k in enumerate(self.k)}


class RecallAtK(_RankingMetric):
    """Recall@k (= hit rate with one relevant item): the fraction of samples whose target ranks in the top k.

    Args:
        k: the cut-offs; ``compute()`` returns ``{"recall@1": ..., "recall@10": ...}``.
    """

    metric_name = "recall"

    @staticmethod
    def gain(ranks: torch.Tensor, k: int) -> torch.Tensor:
        return (ranks <= k).to(torch.float64)


class NDCGAtK(_RankingMetric):
    """NDCG@k with one relevant item: ``1 / log2(1 + rank)`` if ``rank <= k`` else 0 (the ideal DCG is 1).

    Args:
        k: the cut-offs; ``compute()`` returns ``{"ndcg@1": ..., ...}``.
    """

    metric_name = "ndcg"

    @staticmethod
    def gain(ranks: torch.Tensor, k: int) -> torch.Tensor:
        return torch.where(ranks <= k, 1.0 / torch.log2(1.0 + ranks), 0.0).to(torch.float64)


class MRRAtK(_RankingMetric):
    """MRR@k: the mean of ``1 / rank`` if ``rank <= k`` else 0.

    Args:
        k: the cut-offs; ``compute()`` returns ``{"mrr@1": ..., ...}``.
    """

    metric_name = "mrr"

    @staticmethod
    def gain(ranks: torch.Tensor, k: int) -> torch.Tensor:
        return torch.where(ranks <= k, 1.0 / ranks, 0.0).to(torch.float64)


class ItemCoverage(Metric):
    """Catalogue coverage: the number of distinct items ever recommended in a top k, over the catalogue size.

    ``update`` takes either ``(b, n_items)`` float scores (the top ``k`` of each row count, excluded items left out)
    or a long tensor of item columns actually recommended (any shape; negative entries are padding).

    Args:
        num_items: the catalogue size.
        k: the cut-off for score input.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_items: int, k: int = 10, **kwargs):
        super().__init__(**kwargs)
        if num_items < 1 or k < 1:
            raise ValueError("num_items and k must be positive")
        self.num_items = num_items
        self.k = k
        self.add_state("counts", torch.zeros(num_items, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, exclude: torch.Tensor | None = None) -> None:
        """Adds recommendations: ``(b, n_items)`` scores, or long item columns."""
        if preds.is_floating_point():
            if preds.ndim != 2 or preds.shape[1] != self.num_items:
                raise ValueError(f"expected scores (b, {self.num_items}), got {tuple(preds.shape)}")
            scores = preds.detach()
            if exclude is not None:
                scores = scores.masked_fill(exclude.bool(), -math.inf)
            top = scores.topk(min(self.k, self.num_items), dim=1)
            items = top.indices[torch.isfinite(top.values)]
        else:
            items = preds.reshape(-1).long()
            items = items[items >= 0]
        self.counts += torch.bincount(items.to(self.counts.device), minlength=self.num_items).to(self.counts.dtype)

    def compute(self) -> torch.Tensor:
        return ((self.counts > 0).sum() / self.num_items).float()

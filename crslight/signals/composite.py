"""The weak label the reward model learns: a weighted mean of normalised implicit signals.

Signals live on different scales (a log time ratio, VADER points, a fraction, a cosine), so each one is normalised
with statistics fitted on the training split, then the normalised signals are averaged with the weights set in the
config. A signal that is not defined for a sample (NaN) is left out of that sample's average and the remaining
weights are renormalised, i.e. for sample ``i`` with present signals ``P_i``::

    label_i = sum_{j in P_i} w_j z_ij / sum_{j in P_i} |w_j|         (NaN when P_i is empty)

Normalisation ``z_ij``:

- ``zscore``: ``(x - mean_j) / std_j`` with the non-NaN train mean and standard deviation of signal ``j``.
- ``rank``: ``2 F_j(x) - 1`` in [-1, 1], where ``F_j`` is the train empirical CDF (mid-rank for ties), held as
  ``n_quantiles`` quantiles and interpolated. Robust to heavy tails (dwell times) and to coarse signals.

The fitted statistics are buffers, so a module that holds a ``CompositeLabel`` saves and restores them with its
checkpoint (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from crslight.signals.base import SignalBatch, SignalExtractor


class CompositeLabel(nn.Module):
    """A NaN-aware weighted mean of normalised signals, fitted on the train split.

    Args:
        signals: the signal extractors (YAML: a list of ``class_path`` / ``init_args``).
        weights: one weight per signal (equal weights when None). A negative weight turns a signal around.
        normalization: ``zscore`` or ``rank`` (see the module docstring).
        n_quantiles: quantiles kept per signal for ``rank``.
    """

    def __init__(self, signals: list[SignalExtractor], weights: list[float] | None = None,
                 normalization: Literal["zscore", "rank"] = "zscore", n_quantiles: int = 1025):
        super().__init__()
        if not signals:
            raise ValueError("CompositeLabel needs at least one signal")
        if weights is None:
            weights = [1.0] * len(signals)
        if len(weights) != len(signals):
            raise ValueError(f"got {len(weights)} weights for {len(signals)} signals")
        if normalization not in ("zscore", "rank"):
            raise ValueError(f"normalization must be 'zscore' or 'rank', got {normalization!r}")
        if sum(abs(w) for w in weights) == 0:
            raise ValueError("at least one weight must be non-zero")
        self.signals = list(signals)
        self.normalization = normalization
        s = len(signals)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        self.register_buffer("mean", torch.zeros(s))
        self.register_buffer("std", torch.ones(s))
        self.register_buffer("quantiles", torch.full((s, n_quantiles), float("nan")))
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def names(self) -> list[str]:
        """The signals' names, in order."""
        return [s.name for s in self.signals]

    def signal_values(self, batch: SignalBatch) -> torch.Tensor:
        """``(b, s)`` raw signal values, NaN where a signal is undefined."""
        return torch.stack([signal(batch) for signal in self.signals], dim=1)

    @torch.no_grad()
    def fit(self, batch: SignalBatch | torch.Tensor) -> CompositeLabel:
        """Fits the normalisation on a train batch (or on its ``(b, s)`` raw values); returns ``self``.

        A signal that is never defined in the batch keeps mean 0 / std 1 and an empty CDF (it then normalises to 0
        for ``zscore`` and stays missing for ``rank``).
        """
        values = batch if isinstance(batch, torch.Tensor) else self.signal_values(batch)
        values = values.to(self.mean.device, torch.float64)
        probs = torch.linspace(0, 1, self.quantiles.shape[1], dtype=torch.float64, device=values.device)
        for j in range(values.shape[1]):
            column = values[:, j][~values[:, j].isnan()]
            if column.numel() == 0:
                continue
            self.mean[j] = column.mean()
            std = column.std(unbiased=False) if column.numel() > 1 else torch.zeros((), dtype=torch.float64)
            self.std[j] = std if std > 1e-12 else 1.0
            self.quantiles[j] = torch.quantile(column, probs).float()
        self.fitted.fill_(True)
        return self

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        """``(b, s)`` raw values → normalised values (NaN stays NaN)."""
        values = values.to(self.mean.device, torch.float32)
        if self.normalization == "zscore":
            return (values - self.mean) / self.std
        out = torch.full_like(values, float("nan"))
        for j in range(values.shape[1]):
            q = self.quantiles[j].contiguous()
            if q.isnan().any():
                continue
            x = values[:, j].contiguous()
            n = q.numel() - 1
            # mid-rank position of x among the quantiles: average of the left and right insertion points,
            # linearly interpolated between neighbouring quantiles
            lo = torch.searchsorted(q, x, right=False).float()
            hi = torch.searchsorted(q, x, right=True).float()
            left = (lo - 1).clamp(0, n).long()
            right = lo.clamp(0, n).long()
            span = (q[right] - q[left]).clamp_min(1e-12)
            frac = ((x - q[left]) / span).clamp(0, 1)
            strict = torch.where(lo == hi, left.float() + frac, (lo + hi - 1) / 2)
            cdf = (strict / n).clamp(0, 1)
            out[:, j] = torch.where(x.isnan(), x, 2 * cdf - 1)
        return out

    def combine(self, normalized: torch.Tensor) -> torch.Tensor:
        """``(b, s)`` normalised values → ``(b,)`` labels: weighted mean over the present signals (NaN if none)."""
        present = ~normalized.isnan()
        weights = self.weights.to(normalized.device)
        numerator = (normalized.nan_to_num(0.0) * weights).sum(1)
        denominator = (present.float() * weights.abs()).sum(1)
        return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-12), float("nan"))

    def forward(self, batch: SignalBatch | torch.Tensor) -> torch.Tensor:
        """The ``(b,)`` composite label of a batch (or of its ``(b, s)`` raw signal values)."""
        if not bool(self.fitted):
            raise RuntimeError("CompositeLabel.fit(train_batch) must run before labelling (or load a fitted state)")
        values = batch if isinstance(batch, torch.Tensor) else self.signal_values(batch)
        return self.combine(self.normalize(values))

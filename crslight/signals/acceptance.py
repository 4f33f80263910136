"""Whether the seeker accepted the recommendation, from the weak labels a dataset or a simulator provides."""

from __future__ import annotations

import math

from crslight.schema import NOT_SAID
from crslight.signals.base import SignalBatch, SignalExtractor


class AcceptanceSignal(SignalExtractor):
    """Acceptance of the reply's recommendations, from the best label available, in this order:

    1. ``accepted`` (1 / 0) when a user simulator reports it.
    2. ReDial's questionnaire (Li et al., NeurIPS 2018): the mean of ``liked`` over the reply's items whose answer is
       0 or 1 (2 = did not say is skipped). With ``suggested_only`` only items the recommender proposed
       (``suggested`` = 1) count; with ``seen_weight`` < 1 an item the seeker has seen already counts that much of a
       like (a liked recommendation the seeker already knew is less of a new acceptance).
    3. OpenDialKG's dialogue rating (Moon et al., ACL 2019) rescaled to [0, 1]: ``(rating - low) / (high - low)``,
       the same for every transition of the dialogue (the weakest label: it rates the whole dialogue).

    Range [0, 1]. Unit: probability-like acceptance. NaN when none of these is known.

    Args:
        suggested_only: use only questionnaire answers of items with ``suggested`` = 1.
        seen_weight: weight of ``liked`` for an item with ``seen`` = 1 (1 ignores ``seen``).
        rating_scale: ``(low, high)`` of the dialogue rating.
        use_rating: fall back to the dialogue rating when no item label applies.
    """

    range = (0.0, 1.0)
    unit = "acceptance"

    def __init__(self, suggested_only: bool = False, seen_weight: float = 1.0,
                 rating_scale: tuple[float, float] = (1.0, 5.0), use_rating: bool = True):
        if rating_scale[1] <= rating_scale[0]:
            raise ValueError(f"rating_scale must be (low, high) with low < high, got {rating_scale!r}")
        self.suggested_only = suggested_only
        self.seen_weight = seen_weight
        self.rating_scale = tuple(rating_scale)
        self.use_rating = use_rating

    def _questionnaire(self, items: list[str], labels: dict[str, dict]) -> float:
        values = []
        for item in dict.fromkeys(items):
            answer = labels.get(item)
            if answer is None or answer["liked"] == NOT_SAID:
                continue
            if self.suggested_only and answer["suggested"] != 1:
                continue
            liked = float(answer["liked"])
            values.append(liked * (self.seen_weight if answer["seen"] == 1 else 1.0))
        return sum(values) / len(values) if values else math.nan

    def extract(self, batch: SignalBatch) -> list[float]:
        low, high = self.rating_scale
        out = []
        rows = zip(batch.items, batch.labels, batch.rating, batch.accepted, strict=True)
        for items, labels, rating, accepted in rows:
            if accepted is not None and not math.isnan(accepted):
                out.append(float(accepted))
                continue
            value = self._questionnaire(items, labels)
            if math.isnan(value) and self.use_rating and rating is not None and not math.isnan(rating):
                value = min(1.0, max(0.0, (rating - low) / (high - low)))
            out.append(value)
        return out

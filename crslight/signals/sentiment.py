"""The seeker's sentiment after the reply (VADER), and how it moved."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

from crslight.signals.base import SignalBatch, SignalExtractor, last_turn


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=65536)
def compound(text: str) -> float:
    """VADER's compound polarity of ``text`` in [-1, 1] (Hutto & Gilbert, ICWSM 2014)."""
    return float(_analyzer().polarity_scores(text)["compound"])


class SentimentShiftSignal(SignalExtractor):
    """VADER compound polarity of the seeker's reaction, or its shift from the seeker's previous turn.

    VADER (Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text",
    ICWSM 2014) is a lexicon and rule model tuned for short informal text; its *compound* score normalises the summed
    valence to [-1, 1]. With ``c(x)`` that score::

        mode="shift":     value = c(reaction) - c(last seeker turn before the reply)     range [-2, 2]
        mode="polarity":  value = c(reaction)                                             range [-1, 1]

    Unit: VADER compound points. NaN when the dialogue ended after the reply (no reaction), and for ``shift`` also
    when the seeker had not spoken before the reply.

    Args:
        mode: ``shift`` (how the reply moved the seeker's mood) or ``polarity`` (the mood after it).
    """

    range = (-2.0, 2.0)
    unit = "VADER compound"

    def __init__(self, mode: Literal["shift", "polarity"] = "shift"):
        if mode not in ("shift", "polarity"):
            raise ValueError(f"mode must be 'shift' or 'polarity', got {mode!r}")
        self.mode = mode

    def extract(self, batch: SignalBatch) -> list[float]:
        out = []
        for context, reaction in zip(batch.context, batch.reaction, strict=True):
            if reaction is None:
                out.append(math.nan)
                continue
            value = compound(reaction)
            if self.mode == "shift":
                previous = last_turn(context)
                value = math.nan if previous is None else value - compound(previous["text"])
            out.append(value)
        return out

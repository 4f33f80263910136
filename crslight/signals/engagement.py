"""Behavioural engagement: how much the seeker wrote back, whether they asked, whether they stayed."""

from __future__ import annotations

import math
import re

from crslight.signals.base import SignalBatch, SignalExtractor

_QUESTION = re.compile(r"\?|^\s*(what|which|who|how|why|when|where|is|are|was|does|do|did|have|has|can|could|would|"
                       r"should|any)\b", re.IGNORECASE | re.MULTILINE)


def asks_question(text: str) -> bool:
    """True when ``text`` has a question mark or a sentence that opens with a question word."""
    return any(_QUESTION.search(s) for s in re.split(r"(?<=[.!?])\s+", text))


class EngagementSignal(SignalExtractor):
    """A weighted mean of three engagement cues of the seeker's reaction::

        length    L = min(1, log(1 + words(reaction)) / log(1 + reference_words))
        question  Q = 1 if the reaction asks a follow-up question (a "?" or a sentence opening with a question
                    word), else 0
        continue  C = 1 if the dialogue goes on after the reaction, else 0
        value     = (w_L L + w_Q Q + w_C C) / (w_L + w_Q + w_C)

    When the seeker left after the reply (no reaction) the value is 0: leaving is the least engaged answer, so it is
    defined, not missing. Range [0, 1]. Unit: fraction of the maximum engagement.

    Args:
        reference_words: a reaction this long (or longer) counts as fully engaged on length.
        weights: ``(w_L, w_Q, w_C)``.
    """

    range = (0.0, 1.0)
    unit = "fraction"

    def __init__(self, reference_words: int = 20, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)):
        if reference_words < 1:
            raise ValueError("reference_words must be at least 1")
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be three non-negative numbers with a positive sum, got {weights!r}")
        self.reference_words = reference_words
        self.weights = tuple(float(w) for w in weights)

    def extract(self, batch: SignalBatch) -> list[float]:
        w_len, w_q, w_cont = self.weights
        out = []
        for reaction, continues in zip(batch.reaction, batch.continues, strict=True):
            if reaction is None:
                out.append(0.0)
                continue
            length = min(1.0, math.log1p(len(reaction.split())) / math.log1p(self.reference_words))
            question = float(asks_question(reaction))
            out.append((w_len * length + w_q * question + w_cont * float(continues)) / (w_len + w_q + w_cont))
        return out

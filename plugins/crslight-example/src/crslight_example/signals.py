"""An example signal: how much of the reply asks the seeker something."""

from __future__ import annotations

import math
import re

from crslight.signals import SignalBatch, SignalExtractor

_SENTENCE = re.compile(r"[^.!?]+[.!?]*")


class QuestionRateSignal(SignalExtractor):
    """The share of the reply's sentences that are questions (end with ``?``).

    A recommender that asks ("What did you like about it?") elicits preferences instead of guessing; too high a rate
    is an interrogation. ``value = questions / sentences`` over the reply's sentences (split at ``.``, ``!``, ``?``).

    Range [0, 1]. Unit: fraction of sentences. NaN for an empty reply.

    Args:
        min_words: sentences shorter than this are ignored ("Hi!"); at least 1.
    """

    range = (0.0, 1.0)
    unit = "fraction of sentences"

    def __init__(self, min_words: int = 1):
        if min_words < 1:
            raise ValueError("min_words must be at least 1")
        self.min_words = min_words

    def extract(self, batch: SignalBatch) -> list[float]:
        out = []
        for reply in batch.reply:
            sentences = [s.strip() for s in _SENTENCE.findall(reply) if len(s.split()) >= self.min_words]
            out.append(sum(s.endswith("?") for s in sentences) / len(sentences) if sentences else math.nan)
        return out

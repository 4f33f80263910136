"""Dwell time, normalised by how long the reply takes to read."""

from __future__ import annotations

import math

from crslight.signals.base import SignalBatch, SignalExtractor


def reading_time(text: str, words_per_minute: float = 238.0) -> float:
    """Seconds an average adult needs to read ``text`` silently (whitespace words / reading rate)."""
    return len(text.split()) * 60.0 / words_per_minute


class DwellTimeSignal(SignalExtractor):
    """How long the seeker stayed with the reply, relative to how long it takes to read.

    Raw dwell time grows with the length of what is read, so it mixes interest with content length; Yi et al.
    ("Beyond clicks: dwell time for personalization", RecSys 2014) normalise dwell time for content length before
    using it as a satisfaction signal. Here the expected time is the reply's reading time at an average silent reading
    rate (238 words per minute, Brysbaert 2019), and the signal is the log of the ratio::

        value = log((dwell + s) / (words(reply) * 60 / wpm + s))

    with ``s`` seconds of smoothing (so an empty reply or a zero gap stays finite). 0 means the seeker took exactly the
    expected reading time; +1 about e times longer. In chat the gap also holds the time the seeker spends typing the
    reaction, which is part of engaging with the reply.

    Range: the real line ([-2.7, 4.9] on ReDial train). Unit: natural log of a time ratio. NaN when the dwell time is
    unknown (no timing, or the dialogue ended) or negative (clock noise).

    Args:
        words_per_minute: the reading rate for the expected time.
        smoothing_seconds: ``s`` above, added to both sides of the ratio.
        max_dwell_seconds: dwell times above this are treated as unknown (the seeker was away); None keeps all.
    """

    range = (-math.inf, math.inf)
    unit = "log time ratio"

    def __init__(self, words_per_minute: float = 238.0, smoothing_seconds: float = 1.0,
                 max_dwell_seconds: float | None = 600.0):
        if words_per_minute <= 0 or smoothing_seconds <= 0:
            raise ValueError("words_per_minute and smoothing_seconds must be positive")
        self.words_per_minute = words_per_minute
        self.smoothing_seconds = smoothing_seconds
        self.max_dwell_seconds = max_dwell_seconds

    def extract(self, batch: SignalBatch) -> list[float]:
        out = []
        for reply, dwell in zip(batch.reply, batch.dwell_time, strict=True):
            too_long = self.max_dwell_seconds is not None and dwell > self.max_dwell_seconds
            if dwell is None or math.isnan(dwell) or dwell < 0 or too_long:
                out.append(math.nan)
                continue
            expected = reading_time(reply, self.words_per_minute)
            out.append(math.log((dwell + self.smoothing_seconds) / (expected + self.smoothing_seconds)))
        return out

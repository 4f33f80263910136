"""Dwell time: how long a user waits after a recommender turn before answering, fitted on real ReDial gaps.

The gap is ``next.time - reply.end_time`` between the last message of a recommender turn and the first message of
the seeker's next turn (ReDial ``timeOffset``, whole seconds). It covers reading, thinking and typing the first
message, which is exactly what a dwell-time signal sees in real logs.

Model: a *zero-inflated log-normal* per condition. About 2 % of real gaps are 0 s (two messages sent within the same
second; a log-normal cannot put mass there), so a gap is 0 with probability ``p_zero`` and otherwise
``exp(N(mu, sigma))``; ``mu`` and ``sigma`` are the maximum-likelihood estimates (mean and standard deviation of
``log gap``) over the positive gaps. Conditions, from the seeker's questionnaire answers on the items the recommender
turn mentions:

- ``accept``: some item is liked (``liked = 1``) and not already seen (``seen != 1``): a suggestion taken up;
- ``reject``: items are labelled, none of them accepted (already seen, or not liked);
- ``other``: the turn mentions no labelled item (chit-chat, questions).

On the ReDial train split (2,727 dialogues, 15,643 gaps) an accepted suggestion is followed by a slightly longer
dwell than a rejected one (median 15 s vs 14 s) and both by a longer one than chit-chat (10 s): the effect real
users show is small, and the simulator reproduces it rather than inventing a larger one. :data:`REDIAL_DWELL` holds
the fitted parameters so the simulators work without the data; :func:`redial_dwell` refits from a ReDial folder
(once per process; a test checks that the constants match a fresh fit). Sampled dwell times are continuous; round
them to compare with the whole-second real gaps (``benchmarks/simulator_stats.py`` reports both KS statistics).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from crslight.schema import RECOMMENDER, SEEKER

CONDITIONS = ("accept", "reject", "other")


@dataclass(frozen=True)
class LogNormalFit:
    """One condition's zero-inflated log-normal: gap = 0 with probability ``p_zero``, else ``exp(N(mu, sigma))``.

    Attributes:
        p_zero: share of gaps of 0 s.
        mu: mean of ``log gap`` over the positive gaps.
        sigma: standard deviation of ``log gap`` over the positive gaps.
        n: number of gaps fitted.
    """

    p_zero: float
    mu: float
    sigma: float
    n: int

    @property
    def median(self) -> float:
        """Median of the positive part, in seconds."""
        return math.exp(self.mu)

    def sample(self, rng: np.random.Generator, size: int | None = None) -> float | np.ndarray:
        """Draws dwell times in seconds (one float, or an array of ``size``)."""
        zero = rng.random(size) < self.p_zero
        value = rng.lognormal(self.mu, self.sigma, size)
        return np.where(zero, 0.0, value) if size is not None else (0.0 if zero else float(value))


@dataclass(frozen=True)
class DwellModel:
    """Dwell-time distributions per condition (``accept``, ``reject``, ``other``)."""

    accept: LogNormalFit
    reject: LogNormalFit
    other: LogNormalFit

    def sample(self, rng: np.random.Generator, condition: str) -> float:
        """One dwell time in seconds after a turn of the given condition."""
        return float(self.fit_of(condition).sample(rng))

    def fit_of(self, condition: str) -> LogNormalFit:
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}: expected one of {', '.join(CONDITIONS)}")
        return getattr(self, condition)

    def to_dict(self) -> dict:
        """JSON-ready parameters."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DwellModel:
        return cls(**{c: LogNormalFit(**data[c]) for c in CONDITIONS})


#: Fitted on the ReDial train split held in ``../shared/data/redial`` (``fit_dwell(load_corpus("redial", root,
#: "train"))``); ``tests/simulator/test_dwell.py`` refits and compares.
REDIAL_DWELL = DwellModel(
    accept=LogNormalFit(p_zero=0.0168, mu=2.5940, sigma=0.9182, n=3035),
    reject=LogNormalFit(p_zero=0.0173, mu=2.5534, sigma=0.9351, n=4869),
    other=LogNormalFit(p_zero=0.0277, mu=2.2929, sigma=1.0195, n=7739),
)


def condition_of(reply: dict, labels: dict[str, dict]) -> str:
    """The condition of a recommender turn from the questionnaire answers on the items it mentions."""
    answers = [labels[i] for i in reply["items"] if i in labels]
    if not answers:
        return "other"
    return "accept" if any(a["liked"] == 1 and a["seen"] != 1 for a in answers) else "reject"


def real_gaps(dialogues) -> dict[str, np.ndarray]:
    """Gaps (seconds) between each recommender turn and the seeker's next turn, per condition.

    Args:
        dialogues: a ``Dataset`` (or list of dicts) in the canonical schema with ``turns`` and ``labels``.
    """
    out: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    for turns, labels in zip(dialogues["turns"], dialogues["labels"], strict=True):
        by_item = {a["item"]: a for a in labels}
        for reply, nxt in zip(turns, turns[1:], strict=False):
            if reply["role"] != RECOMMENDER or nxt["role"] != SEEKER:
                continue
            gap = nxt["time"] - reply["end_time"]
            if math.isfinite(gap) and gap >= 0:
                out[condition_of(reply, by_item)].append(gap)
    return {c: np.asarray(v, dtype=float) for c, v in out.items()}


def fit_gaps(gaps: np.ndarray) -> LogNormalFit:
    """Maximum-likelihood zero-inflated log-normal of one sample of gaps (seconds, ``>= 0``)."""
    gaps = np.asarray(gaps, dtype=float)
    if gaps.size == 0:
        raise ValueError("no gaps to fit")
    positive = np.log(gaps[gaps > 0])
    if positive.size < 2:
        raise ValueError("need at least two positive gaps to fit a log-normal")
    return LogNormalFit(
        p_zero=round(float((gaps <= 0).mean()), 4),
        mu=round(float(positive.mean()), 4),
        sigma=round(float(positive.std()), 4),
        n=int(gaps.size),
    )


def fit_dwell(corpus) -> DwellModel:
    """Fits one :class:`LogNormalFit` per condition on a corpus (``crslight.data.Corpus``) with real time offsets."""
    gaps = real_gaps(corpus.dialogues)
    return DwellModel(**{c: fit_gaps(gaps[c]) for c in CONDITIONS})


@lru_cache(maxsize=4)
def _fit_cached(root: str) -> DwellModel:
    from crslight.data import load_corpus

    return fit_dwell(load_corpus("redial", root, "train"))


def redial_dwell(root: str | Path | None = None) -> DwellModel:
    """The ReDial dwell model: refitted from the train split of ``root`` (once per process and folder), or the stored
    :data:`REDIAL_DWELL` when ``root`` is None."""
    return REDIAL_DWELL if root is None else _fit_cached(str(Path(root).expanduser().resolve()))

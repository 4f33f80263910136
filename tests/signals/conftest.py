"""Hand-built transitions and the shared MiniLM encoder for the signal tests."""

import math

import pytest

from crslight.schema import turn
from crslight.signals import SignalBatch


def _make_batch(**columns) -> SignalBatch:
    """A SignalBatch whose unspecified fields are neutral (no context, no reaction, nothing known).

    The batch size is the length of the first column given.
    """
    b = len(next(iter(columns.values())))
    defaults = {
        "context": [[turn("seeker", "Hi, any movie for tonight?", time=0.0)] for _ in range(b)],
        "reply": ["How about Heat?"] * b,
        "items": [[] for _ in range(b)],
        "item_names": [[] for _ in range(b)],
        "reaction": [None] * b,
        "dwell_time": [math.nan] * b,
        "labels": [{} for _ in range(b)],
        "rating": [math.nan] * b,
        "accepted": [math.nan] * b,
        "continues": [False] * b,
    }
    defaults.update(columns)
    return SignalBatch(**defaults)


@pytest.fixture
def make_batch():
    """``make_batch(reply=[...], reaction=[...])``: a SignalBatch with neutral defaults for the other fields."""
    return _make_batch

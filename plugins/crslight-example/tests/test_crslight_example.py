"""Tests of the template plugin: hand-computed values, and that crslight finds it once installed."""

import math

import pytest
import torch
from crslight.signals import SignalBatch

from crslight_example import MeanReplyLength, QuestionRateSignal


def batch_of(replies: list[str]) -> SignalBatch:
    b = len(replies)
    return SignalBatch(context=[[] for _ in replies], reply=replies, items=[[] for _ in replies],
                       item_names=[[] for _ in replies], reaction=[None] * b, dwell_time=[math.nan] * b,
                       labels=[{} for _ in replies], rating=[math.nan] * b, accepted=[math.nan] * b,
                       continues=[False] * b)


def test_question_rate_hand_values():
    values = QuestionRateSignal()(batch_of(["Have you seen Alien? It is great.", "Try Heat!", ""]))
    # 1 question of 2 sentences; 0 of 1; an empty reply has no sentence → NaN
    assert values[:2].tolist() == [0.5, 0.0]
    assert math.isnan(values[2])


def test_question_rate_min_words_skips_short_sentences():
    values = QuestionRateSignal(min_words=2)(batch_of(["Hi! What genre do you like?"]))
    assert values.tolist() == [1.0]  # "Hi!" is ignored


def test_mean_reply_length_merges_like_ddp():
    whole, a, b = MeanReplyLength(), MeanReplyLength(), MeanReplyLength()
    whole.update(["one two", "three four five", "six"])
    a.update(["one two", "three four five"])
    b.update(["six"])
    a.merge_state(b)
    assert whole.compute() == pytest.approx(2.0) and a.compute() == pytest.approx(2.0)


def test_registered_with_crslight():
    from crslight.plugins import get, load_plugins

    load_plugins(reload=True)
    assert get("signals", "QuestionRateSignal") is QuestionRateSignal
    assert get("metrics", "MeanReplyLength") is MeanReplyLength
    assert isinstance(QuestionRateSignal()(batch_of(["Why?"])), torch.Tensor)

"""Dwell time, sentiment, engagement and acceptance on hand-built transitions (expected values worked out here)."""

import math

import pytest

from crslight.schema import turn
from crslight.signals import AcceptanceSignal, DwellTimeSignal, EngagementSignal, SentimentShiftSignal


def test_dwell_time_is_log_ratio_to_reading_time(make_batch):
    batch = make_batch(reply=["one two three four", "", "a b", "a b", "a b"], dwell_time=[3.0, 0.0, math.nan, -2.0, 900])
    values = DwellTimeSignal(words_per_minute=240)(batch)  # 4 words at 4 words/s: 1 s to read
    assert values[0] == pytest.approx(math.log((3 + 1) / (1 + 1)))  # dwelt 3 s on 1 s of text: log 2
    assert values[1] == pytest.approx(0.0)  # an empty reply left at once: as expected
    assert all(math.isnan(v) for v in values[2:])  # unknown, negative (clock noise), longer than 600 s (away)


def test_dwell_time_longer_reply_needs_longer_dwell(make_batch):
    batch = make_batch(reply=["word " * 5, "word " * 100], dwell_time=[20.0, 20.0])
    short, long = DwellTimeSignal()(batch).tolist()
    assert short > 0 > long  # 20 s: a lot for 5 words (1.3 s to read), little for 100 (25 s)


def test_sentiment_shift_and_polarity(make_batch):
    context = [turn("seeker", "I hate horror movies.", time=0), turn("recommender", "Try Up", time=5)]
    batch = make_batch(context=[context, context, [turn("recommender", "Hi")]],
                       reaction=["I love it!", None, "ok"])
    shift = SentimentShiftSignal()(batch)
    # VADER compound: "I love it!" 0.6696, "I hate horror movies." -0.8126
    assert shift[0] == pytest.approx(0.6696 - -0.8126, abs=1e-4)
    assert math.isnan(shift[1])  # no reaction: the seeker left
    assert math.isnan(shift[2])  # the seeker had not spoken before: nothing to shift from
    polarity = SentimentShiftSignal(mode="polarity")(batch)
    assert polarity[0] == pytest.approx(0.6696, abs=1e-4) and polarity[2] == pytest.approx(0.296, abs=1e-4)
    assert math.isnan(polarity[1])
    with pytest.raises(ValueError, match="mode"):
        SentimentShiftSignal(mode="mood")


def test_engagement_hand_values(make_batch):
    batch = make_batch(
        reaction=["w " * 20 + "what else is like it?", "ok", None, "No thanks."],
        continues=[True, False, False, True],
    )
    values = EngagementSignal(reference_words=20)(batch)
    # 1: 25 words (length capped at 1) + question + continues → 3/3
    assert values[0] == pytest.approx(1.0)
    # 2: 1 word: log(2)/log(21), no question, the dialogue ends → (0.2277 + 0 + 0) / 3
    assert values[1] == pytest.approx(math.log(2) / math.log(21) / 3)
    assert values[2] == 0.0  # the seeker left after the reply: least engaged, not missing
    # 4: 2 words, no question, continues → (log 3 / log 21 + 0 + 1) / 3
    assert values[3] == pytest.approx((math.log(3) / math.log(21) + 1) / 3)
    only_questions = EngagementSignal(weights=(0, 1, 0))(batch)
    assert only_questions.tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("text, asks", [("Is it scary", True), ("Nice. Which one is better?", True),
                                        ("I do like it.", False), ("Whatever works", False)])
def test_engagement_question_detection(make_batch, text, asks):
    value = EngagementSignal(weights=(0, 1, 0))(make_batch(reaction=[text]))
    assert value.item() == float(asks)


def test_acceptance_label_precedence(make_batch):
    liked = {"a": {"suggested": 1, "seen": 0, "liked": 1}, "b": {"suggested": 0, "seen": 1, "liked": 0},
             "c": {"suggested": 1, "seen": 0, "liked": 2}}
    batch = make_batch(
        items=[["a", "b", "c"], ["a", "b"], ["c"], ["c"], []],
        labels=[liked, liked, liked, liked, {}],
        rating=[math.nan, 2.0, math.nan, 4.0, math.nan],
        accepted=[math.nan, 0.0, math.nan, math.nan, math.nan],
    )
    values = AcceptanceSignal()(batch)
    assert values[0] == pytest.approx(0.5)  # liked a (1) and b (0); c "did not say" is skipped
    assert values[1] == 0.0  # the simulator's verdict wins over the questionnaire
    assert math.isnan(values[2])  # only "did not say", no rating
    assert values[3] == pytest.approx((4 - 1) / (5 - 1))  # OpenDialKG-style rating fallback
    assert math.isnan(values[4])
    assert AcceptanceSignal(suggested_only=True)(batch)[0] == 1.0  # b was not suggested by the recommender
    assert AcceptanceSignal(seen_weight=0.5)(batch[:1]).item() == pytest.approx(0.5)  # b seen but liked 0
    assert math.isnan(AcceptanceSignal(use_rating=False)(batch)[3])

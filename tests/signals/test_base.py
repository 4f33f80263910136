"""SignalBatch, the SignalExtractor contract, and transitions() from schema dialogues."""

import math

import datasets
import pytest
import torch

from crslight.schema import CATALOGUE_FEATURES, DIALOGUE_FEATURES, turn
from crslight.signals import SignalBatch, SignalExtractor, coverage, transitions

DIALOGUE = {
    "dialogue_id": "d1",
    "turns": [
        turn("recommender", "Hi! What do you like?", time=0, end_time=2),
        turn("seeker", "I like sci-fi like Alien", items=["10"], time=10, end_time=12),
        turn("recommender", "Then watch Aliens and Heat", items=["11", "12"], time=20, end_time=25),
        turn("seeker", "Seen Aliens, loved it", time=40, end_time=41),
        turn("recommender", "Great, enjoy!", time=50, end_time=50),
    ],
    "labels": [
        {"item": "10", "suggested": 0, "seen": 1, "liked": 1},
        {"item": "11", "suggested": 1, "seen": 1, "liked": 1},
        {"item": "12", "suggested": 1, "seen": 0, "liked": 2},
    ],
    "rating": math.nan,
}
CATALOGUE = [
    {"item_id": i, "name": n, "popularity": 1.0, "attributes": ""}
    for i, n in [("10", "Alien (1979)"), ("11", "Aliens (1986)"), ("12", "Heat (1995)")]
]


class Corpus:  # the two attributes transitions() reads from crslight.data.Corpus
    # columns the schema may add later (the test only knows these four) are left empty
    dialogues = datasets.Dataset.from_list([{k: DIALOGUE.get(k) for k in DIALOGUE_FEATURES}], features=DIALOGUE_FEATURES)
    catalogue = datasets.Dataset.from_list(CATALOGUE, features=CATALOGUE_FEATURES)


def test_transitions_one_per_recommender_turn_after_the_first():
    batch = transitions(Corpus())
    # turns 2 and 4 are recommender turns; turn 0 is the dialogue's first turn and has no context
    assert len(batch) == 2
    assert batch.reply == ["Then watch Aliens and Heat", "Great, enjoy!"]
    assert [len(c) for c in batch.context] == [2, 4]
    assert batch.items[0] == ["11", "12"]
    assert batch.item_names[0] == ["Aliens (1986)", "Heat (1995)"]
    assert batch.reaction == ["Seen Aliens, loved it", None]
    assert batch.dwell_time[0] == 40 - 25  # reaction start - reply end
    assert math.isnan(batch.dwell_time[1])
    # the dialogue ends with the recommender's turn 4, so nothing follows the reaction at turn 3
    assert batch.continues == [True, False]
    assert batch.labels[0] == {"11": {"suggested": 1, "seen": 1, "liked": 1},
                               "12": {"suggested": 1, "seen": 0, "liked": 2}}
    assert batch.labels[1] == {}
    assert all(math.isnan(x) for x in batch.accepted + batch.rating)


def test_transitions_from_plain_dialogues_and_max_items():
    batch = transitions([DIALOGUE], max_items=1)
    assert len(batch) == 1
    assert batch.item_names[0] == ["11", "12"]  # no catalogue: ids stand in for names


def test_signal_batch_checks_lengths_and_slices(make_batch):
    batch = make_batch(reply=["a", "b", "c"])
    assert len(batch[1:]) == 2 and batch[[2, 0]].reply == ["c", "a"]
    assert [len(c) for c in batch.chunks(2)] == [2, 1]
    assert SignalBatch.concat([batch[:1], batch[1:]]).reply == ["a", "b", "c"]
    with pytest.raises(ValueError, match="one length"):
        SignalBatch(**{**vars(batch), "reply": ["a"]})


class Broken(SignalExtractor):
    def extract(self, batch):
        return [1.0]


class Constant(SignalExtractor):
    def __init__(self, value: float = 0.5):
        self.value = value

    def extract(self, batch):
        return [self.value] * len(batch)


def test_extractor_output_is_checked(make_batch):
    batch = make_batch(reply=["a", "b"])
    values = Constant()(batch)
    assert values.dtype == torch.float32 and values.shape == (2,)
    with pytest.raises(ValueError, match="1 values for a batch of 2"):
        Broken()(batch)
    assert repr(Constant(0.25)) == "Constant(value=0.25)"


def test_coverage_is_the_defined_fraction():
    assert coverage(torch.tensor([1.0, math.nan, 0.0, math.nan])) == 0.5
    assert math.isnan(coverage(torch.zeros(0)))

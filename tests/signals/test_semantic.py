"""SemanticRelevanceSignal with the real MiniLM (loaded once per session)."""

import math

import pytest
import torch

from crslight.schema import turn
from crslight.signals import SemanticRelevanceSignal


def context(*seeker_texts):
    turns = []
    for text in seeker_texts:
        turns += [turn("seeker", text), turn("recommender", "Tell me more.")]
    return turns[:-1]


def test_relevant_items_score_higher(minilm, make_batch):
    want = context("I love superhero movies with lots of action")  # the default min_words=3 keeps it
    batch = make_batch(context=[want, want, want, [turn("recommender", "Hi")]],
                       item_names=[["Spider-Man: Homecoming (2017)", "The Avengers (2012)"],
                                   ["Pride and Prejudice (2005)"], [], ["Heat (1995)"]],
                       reply=["a", "b", "c", "d"])
    values = SemanticRelevanceSignal(dtype="float32")(batch)
    assert values[0] > values[1] + 0.1
    assert math.isnan(values[2])  # no item: target="items" rates recommendations only
    assert math.isnan(values[3])  # the seeker has not said anything yet
    assert -1 <= values[0] <= 1


def test_value_is_cosine_of_mean_embeddings(minilm, make_batch):
    signal = SemanticRelevanceSignal(context_turns=2, min_words=1, dtype="float32")
    texts = ["old seeker turn", "I want a funny film", "something romantic", "Notting Hill (1999)", "Up (2009)"]
    batch = make_batch(context=[context(*texts[:3])], item_names=[texts[3:]])
    e = torch.nn.functional.normalize(torch.as_tensor(minilm.encode(texts)), dim=1)
    want = torch.nn.functional.normalize(e[1:3].mean(0), dim=0)  # only the last two seeker turns
    offer = torch.nn.functional.normalize(e[3:].mean(0), dim=0)
    assert signal(batch).item() == pytest.approx(float(want @ offer), abs=1e-4)


def test_reply_targets_and_encoding_once(minilm, make_batch, monkeypatch):
    signal = SemanticRelevanceSignal(target="items_or_reply", dtype="float32")
    want = context("any good thriller?")
    batch = make_batch(context=[want, want], reply=["Try Se7en, a dark thriller.", "Hello"], item_names=[[], ["Se7en"]])
    values = signal(batch)
    assert not values.isnan().any()  # the first reply names no item: its text stands in
    encoded = []
    model = signal._encoder
    original = type(model).encode

    def counting(self, texts):
        encoded.extend(t for t in texts if t not in self._cache)
        return original(self, texts)

    monkeypatch.setattr(type(model), "encode", counting)
    assert torch.equal(signal(batch), values)  # deterministic
    assert encoded == []  # every text came from the cache
    reply_values = SemanticRelevanceSignal(target="reply", dtype="float32")(batch)
    assert reply_values[0] == pytest.approx(values[0].item(), abs=1e-5)
    with pytest.raises(ValueError, match="target"):
        SemanticRelevanceSignal(target="names")


def test_short_seeker_turns_do_not_count_as_wants(minilm, make_batch):
    signal = SemanticRelevanceSignal(context_turns=1, min_words=3, dtype="float32")
    batch = make_batch(context=[context("I want a scary horror movie", "yes"), context("ok")],
                       item_names=[["The Conjuring (2013)"], ["Heat (1995)"]])
    values = signal(batch)
    alone = signal(make_batch(context=[context("I want a scary horror movie")], item_names=[["The Conjuring (2013)"]]))
    assert values[0] == pytest.approx(alone.item(), abs=1e-6)  # "yes" is skipped, the request before it counts
    assert math.isnan(values[1])  # nothing of 3 words or more


def test_bfloat16_stays_close_to_float32(minilm, make_batch):
    want = context("Can you recommend a funny animated movie for kids?")
    batch = make_batch(context=[want, want], item_names=[["Toy Story (1995)", "Up (2009)"], ["Heat (1995)"]])
    full = SemanticRelevanceSignal(dtype="float32")(batch)
    half = SemanticRelevanceSignal(dtype="bfloat16")(batch)
    assert (full - half).abs().max() < 0.02
    assert half[0] > half[1]

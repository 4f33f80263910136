"""DistinctN, Coherence (real MiniLM, loaded once per session) and Satisfaction."""

import math

import pytest
import torch

from crslight.metrics import Coherence, DistinctN, Satisfaction
from crslight.metrics.text import tokens
from crslight.schema import turn


def test_tokens():
    assert tokens("Hi, there!") == ["hi", ",", "there", "!"]


def test_distinct_hand_values_and_merge():
    metric = DistinctN(n=[1, 2])
    metric.update(["a b a", "a b"])
    # unigrams: a b a a b → 2 distinct of 5; bigrams: (a b) (b a) (a b) → 2 of 3
    out = metric.compute()
    assert out["distinct-1"] == pytest.approx(2 / 5) and out["distinct-2"] == pytest.approx(2 / 3)
    rank0, rank1 = DistinctN(n=[1, 2]), DistinctN(n=[1, 2])
    rank0.update(["a b a"])
    rank1.update(["a b"])  # n-grams seen on both ranks count once
    rank0.merge_state(rank1)
    merged = rank0.compute()
    assert merged["distinct-1"] == pytest.approx(2 / 5) and merged["distinct-2"] == pytest.approx(2 / 3)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(DistinctN(n=[1]).compute()["distinct-1"])


def test_coherence_is_mean_cosine(minilm):
    contexts = [[turn("seeker", "Hi"), turn("recommender", "Hello!"), turn("seeker", "I want a scary horror movie")],
                "Can you suggest a romantic comedy?"]
    replies = ["The Conjuring is a terrifying horror film.", "Notting Hill is a sweet romantic comedy."]
    metric = Coherence(context_turns=2)
    metric.update(contexts, replies)
    texts = ["Hello!\nI want a scary horror movie", contexts[1]]  # the last 2 turns, joined by newlines
    a = torch.nn.functional.normalize(torch.as_tensor(minilm.encode(texts)), dim=1)
    b = torch.nn.functional.normalize(torch.as_tensor(minilm.encode(replies)), dim=1)
    assert metric.compute() == pytest.approx((a * b).sum(1).mean().item(), abs=1e-4)
    swapped = Coherence(context_turns=2)
    swapped.update(contexts, replies[::-1])
    assert swapped.compute() < metric.compute() - 0.1  # off-topic replies are less coherent


def test_satisfaction_skips_nan_and_merges():
    metric, other = Satisfaction(), Satisfaction()
    metric.update(torch.tensor([1.0, 0.0, math.nan]))
    other.update([1.0, 1.0])
    metric.merge_state(other)
    assert metric.compute() == pytest.approx(3 / 4)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(Satisfaction().compute())

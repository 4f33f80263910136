"""Reward pairs: what each kind guarantees, determinism by seed, the label cache, batching, and real ReDial pairs."""

import json
import math

import numpy as np
import pytest
import torch

from crslight.data import load_corpus
from crslight.data import synthetic as synth
from crslight.data.datamodules import Synthetic
from crslight.data.pairs import (
    PAIR_KINDS,
    PairOptions,
    RewardBatch,
    build_pairs,
    collate,
    eval_batches,
    make_pair_data,
    signal_values,
    transition_index,
)
from crslight.signals import AcceptanceSignal, CompositeLabel, DwellTimeSignal, EngagementSignal, transitions

N_DIALOGUES, N_ITEMS = 80, 60


def cheap_label() -> CompositeLabel:
    return CompositeLabel([DwellTimeSignal(), EngagementSignal(), AcceptanceSignal()], weights=[1.0, 1.0, 2.0])


def corpus_of(split: str):
    return load_corpus("synthetic", split=split, n_dialogues=N_DIALOGUES, n_items=N_ITEMS)


@pytest.fixture(scope="module")
def train_data():
    return make_pair_data(corpus_of, "train", PairOptions(label=cheap_label()))


def test_transition_index_follows_the_signal_transitions():
    corpus = corpus_of("valid")
    batch = transitions(corpus)
    index = transition_index(corpus.dialogues)
    turns = corpus.dialogues["turns"]
    assert len(index) == len(batch)
    assert all(turns[d][t]["text"] == reply and turns[d][:t] == context
               for (d, t), reply, context in zip(index, batch.reply, batch.context, strict=True))


def test_every_kind_is_built_and_keeps_its_promise(train_data):
    counts = train_data.counts()
    assert all(counts[kind] > 0 for kind in PAIR_KINDS), counts
    corpus = corpus_of("train")
    catalogue = corpus.catalogue.to_list()
    ranks = np.array([it["popularity"] for it in catalogue]).argsort().argsort() / (len(catalogue) - 1)
    row = {it["item_id"]: i for i, it in enumerate(catalogue)}
    for chosen, rejected, kind in train_data.pairs:
        assert chosen.dialogue == rejected.dialogue
        if kind == "ordered":  # two real turns, the better-labelled one chosen
            assert chosen.real and rejected.real and chosen.label - rejected.label >= 0.5
            continue
        assert rejected.context is chosen.context or chosen.context is rejected.context  # one context, two replies
        if kind == "swap":  # the liked recommendation against a disliked one of the same seeker
            assert chosen.real and not rejected.real and chosen.liked and all(chosen.liked)
        elif kind == "negative":  # a reply from another dialogue, against a well-received real one
            assert chosen.real and not rejected.real and chosen.label >= 0.0
            assert bool(chosen.items) == bool(rejected.items)  # like for like: "mentions a movie" cannot decide
            # never the same reply (the scenario's stock closers repeat across dialogues): a pair of identical inputs
            assert (chosen.reply, chosen.items) != (rejected.reply, rejected.items)
        elif kind == "synthetic":  # the higher-utility recommendation wins, by at least utility_gap
            persona = json.loads(corpus.dialogues[chosen.dialogue]["persona"])
            values = []
            for sample in (chosen, rejected):
                item = catalogue[row[sample.items[0]]]
                assert item["name"] in sample.reply
                values.append(synth.utility(persona, item, float(ranks[row[item["item_id"]]])))
            assert values[0] - values[1] >= 1.0


def test_pairs_are_deterministic_by_seed():
    corpus = corpus_of("valid")
    label = cheap_label().fit(signal_values(corpus_of("train"), cheap_label()))
    labels = label(signal_values(corpus, label))

    def replies(seed):
        return [(c.reply, r.reply, k) for c, r, k in build_pairs(corpus, labels, PairOptions(label, seed=seed)).pairs]

    assert replies(0) == replies(0)
    assert replies(0) != replies(1)


def test_signal_values_are_cached_per_signal(monkeypatch):
    corpus = corpus_of("valid")
    first = signal_values(corpus, cheap_label())
    monkeypatch.setattr(DwellTimeSignal, "extract", lambda self, batch: pytest.fail("recomputed a cached signal"))
    torch.testing.assert_close(signal_values(corpus, cheap_label()), first, equal_nan=True)


def test_collate_indexes_the_right_samples(train_data):
    groups = train_data.groups[:3]
    batch = collate(groups)
    assert isinstance(batch, RewardBatch)
    flat = [s for g in groups for s in g.samples]
    pairs = [(g.samples[c], g.samples[r], k) for g in groups for c, r, k in g.pairs]
    assert len(batch.reply) == len(flat) and batch.chosen.numel() == len(pairs)
    for (chosen, rejected, kind), c, r, k in zip(pairs, batch.chosen, batch.rejected, batch.kind, strict=True):
        assert batch.reply[c] == chosen.reply and batch.reply[r] == rejected.reply and k == kind
    assert batch.liked.tolist() == [a for s in flat for a in s.liked]
    assert torch.equal(batch.label.isnan(), torch.tensor([math.isnan(s.label) for s in flat]))


def test_eval_batches_pack_whole_dialogues(train_data):
    batches = eval_batches(train_data.groups, max_samples=20)
    assert sorted(i for b in batches for i in b) == list(range(len(train_data.groups)))
    sizes = [sum(len(train_data.groups[i].samples) for i in b) for b in batches]
    assert all(size <= 20 or len(b) == 1 for size, b in zip(sizes, batches, strict=True))


def test_datamodule_pairs_task():
    dm = Synthetic(task="pairs", n_dialogues=N_DIALOGUES, n_items=N_ITEMS, batch_size=8,
                   pairs=PairOptions(label=cheap_label(), kinds=["negative", "ordered"]))
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert train.chosen.numel() == 8 and len(train.reply) == 16
    assert set(train.kind.tolist()) <= {PAIR_KINDS.index("negative"), PAIR_KINDS.index("ordered")}
    val = list(dm.val_dataloader())
    assert sum(int(b.real.sum()) for b in val) == dm._data["valid"].counts()["samples"]
    assert sum(b.chosen.numel() for b in val) == len(dm._data["valid"].pairs)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown pair kinds"):
        PairOptions(label=cheap_label(), kinds=["negative", "bogus"])


def test_redial_pairs(redial_root):
    def redial(split):
        return load_corpus("redial", redial_root, split)

    data = make_pair_data(redial, "valid", PairOptions(label=cheap_label(), seed=0))
    counts = data.counts()
    assert counts["samples"] == len(transitions(redial("valid")))
    assert counts["swap"] > 10 and counts["negative"] > 200 and counts["ordered"] > 200
    negatives = [(c, r) for c, r, kind in data.pairs if kind == "negative"]
    assert all(bool(c.items) == bool(r.items) for c, r in negatives)
    assert all((c.reply, c.items) != (r.reply, r.items) for c, r in negatives)  # stock phrases are redrawn
    liked = [a for g in data.groups for s in g.samples for a in s.liked]
    assert 0 < sum(liked) < len(liked)  # both answers occur: the AUC is defined

"""Ranking metrics: hand-computed values, a direct Python reimplementation on random data, and DDP-style merging."""

import math
import random

import pytest
import torch

from crslight.metrics import ItemCoverage, MRRAtK, NDCGAtK, RecallAtK, target_ranks


def test_hand_computed():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3],   # target 2 scores 0.5: one item above → rank 2
                           [0.8, 0.2, 0.4, 0.6],   # target 0: rank 1
                           [0.1, 0.2, 0.3, 0.4]])  # target 0: rank 4
    target = torch.tensor([2, 0, 0])
    assert target_ranks(scores, target).tolist() == [2.0, 1.0, 4.0]
    recall, ndcg, mrr = RecallAtK(k=[1, 3]), NDCGAtK(k=[1, 3]), MRRAtK(k=[1, 3])
    for metric in (recall, ndcg, mrr):
        metric.update(scores, target)
    assert recall.compute()["recall@1"] == pytest.approx(1 / 3)
    assert recall.compute()["recall@3"] == pytest.approx(2 / 3)
    assert ndcg.compute()["ndcg@1"] == pytest.approx(1 / 3)
    assert ndcg.compute()["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1) / 3)  # 1/log2(1+2) for rank 2
    assert mrr.compute()["mrr@3"] == pytest.approx((1 / 2 + 1) / 3)
    assert list(mrr.compute()) == ["mrr@1", "mrr@3"]


def test_ties_count_against_the_target():
    scores = torch.zeros(2, 5)  # a constant scorer must not look perfect
    assert target_ranks(scores, torch.tensor([0, 4])).tolist() == [5.0, 5.0]
    recall = RecallAtK(k=[1])
    recall.update(scores, torch.tensor([0, 4]))
    assert recall.compute()["recall@1"] == 0.0


def test_exclude_drops_items_and_skips_mentioned_targets():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.9, 0.8, 0.1]])
    target = torch.tensor([1, 0])
    exclude = torch.tensor([[True, False, False],    # item 0 was mentioned earlier: target 1 moves to rank 1
                            [True, False, False]])   # the target itself was mentioned: sample skipped
    assert target_ranks(scores, target, exclude).tolist() == [1.0, math.inf]
    recall = RecallAtK(k=[1])
    recall.update(scores, target, exclude)
    assert recall.compute()["recall@1"] == 1.0 and recall.total == 1


def reference(scores: list[list[float]], target: list[int], exclude: list[list[bool]], k: int):
    """Recall, NDCG and MRR at k written out item by item."""
    hits = ndcg = rr = 0.0
    n = 0
    for row, t, ex in zip(scores, target, exclude, strict=True):
        if ex[t]:
            continue
        n += 1
        rank = 1 + sum(1 for j, s in enumerate(row) if j != t and not ex[j] and s >= row[t])
        if rank <= k:
            hits += 1
            ndcg += 1 / math.log2(rank + 1)
            rr += 1 / rank
    return hits / n, ndcg / n, rr / n


def test_matches_reference_on_random_data():
    gen = torch.Generator().manual_seed(0)
    b, n_items, ks = 64, 30, [1, 5, 10]
    scores = torch.randint(0, 8, (b, n_items), generator=gen).float()  # coarse scores: many ties
    target = torch.randint(0, n_items, (b,), generator=gen)
    exclude = torch.rand(b, n_items, generator=gen) < 0.2
    for use_exclude in (False, True):
        ex = exclude if use_exclude else torch.zeros_like(exclude)
        metrics = [RecallAtK(k=ks), NDCGAtK(k=ks), MRRAtK(k=ks)]
        for m in metrics:
            m.update(scores, target, ex if use_exclude else None)
        for k in ks:
            expected = reference(scores.tolist(), target.tolist(), ex.tolist(), k)
            got = [m.compute()[f"{name}@{k}"].item() for m, name in zip(metrics, ("recall", "ndcg", "mrr"),
                                                                           strict=True)]
            assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("cls", [RecallAtK, NDCGAtK, MRRAtK])
def test_states_reduce_like_ddp(cls):
    gen = torch.Generator().manual_seed(1)
    scores, target = torch.rand(40, 20, generator=gen), torch.randint(0, 20, (40,), generator=gen)
    whole, rank0, rank1 = cls(k=[1, 5]), cls(k=[1, 5]), cls(k=[1, 5])
    whole.update(scores, target)
    rank0.update(scores[:25], target[:25])  # unequal shards, as with an uneven last batch
    rank1.update(scores[25:], target[25:])
    rank0.merge_state(rank1)  # applies each state's dist_reduce_fx, as the DDP sync does
    for key, value in whole.compute().items():
        assert rank0.compute()[key] == pytest.approx(value.item(), abs=1e-7)
    assert all(fx == "sum" or getattr(fx, "__name__", "") == "dim_zero_sum" for fx in whole._reductions.values())


def test_empty_metric_is_nan_and_bad_k_rejected():
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(RecallAtK(k=[1]).compute()["recall@1"])
    with pytest.raises(ValueError):
        RecallAtK(k=[0])


def test_item_coverage_from_scores_and_ids():
    coverage = ItemCoverage(num_items=6, k=2)
    coverage.update(torch.tensor([[0.9, 0.8, 0.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.8, 0.0, 0.0, 0.0]]))
    assert coverage.compute() == pytest.approx(3 / 6)  # items 0, 1, 2
    coverage.update(torch.tensor([[0.9, 0.8, 0.7, 0.0, 0.0, 0.0]]), exclude=torch.tensor([[1, 1, 0, 0, 0, 0]]).bool())
    assert coverage.compute() == pytest.approx(4 / 6)  # 2 and 3 once 0 and 1 are excluded
    ids = ItemCoverage(num_items=6, k=2)
    ids.update(torch.tensor([[5, -1], [0, -1]]))  # item ids, -1 is padding
    assert ids.compute() == pytest.approx(2 / 6)
    merged = ItemCoverage(num_items=6, k=2)
    merged.update(torch.tensor([0, 1, 2, 3]))
    merged.merge_state(ids)  # (compute caches its result: merge before the first compute)
    assert merged.compute() == pytest.approx(5 / 6)


def test_item_coverage_random_matches_set_of_topk():
    rng = random.Random(0)
    scores = torch.tensor([[rng.random() for _ in range(50)] for _ in range(7)])
    coverage = ItemCoverage(num_items=50, k=3)
    coverage.update(scores)
    expected = {j for row in scores.tolist() for j in sorted(range(50), key=lambda j: -row[j])[:3]}
    assert coverage.compute() == pytest.approx(len(expected) / 50)

"""The benchmark scripts without TRL: the crslight sides run on the tiny model, and a missing TRL is reported."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ppo_vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ppo_vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crslight_side_runs_fixed_length_steps(bench, tmp_path):
    args = argparse.Namespace(batch_size=2, new_tokens=4, ppo_epochs=1, warmup=1, steps=1, precision="32-true",
                              critic="shared", optimizer_in_backward=True, threads=1, seed=0, prompt_length=64,
                              dialogues=30)
    spec = bench.prepare("tiny", args, tmp_path)
    assert len(spec["prompts"]) == 4 and len({len(ids) for ids, _, _ in spec["prompts"]}) == 1  # no padding
    threads = torch.get_num_threads()
    try:
        result = bench.run_crslight(spec)
    finally:
        torch.set_num_threads(threads)
    assert result["samples_per_s"] > 0 and result["samples_per_cpu_s"] > 0
    assert result["peak_rss_mb"] >= result["rss_after_load_mb"] > 0
    assert len(result["step_s"]) == 1
    # min_new_tokens in the policy folder's generation config: every reply is exactly new_tokens long, as in TRL
    assert result["response_length"] == [4.0, 4.0]


def test_missing_trl_names_the_install_command(bench, tmp_path):
    with pytest.raises(SystemExit) as error:
        bench.check_trl(tmp_path)
    message = str(error.value)
    assert f"pip install --target {tmp_path} trl==1.12.0 --no-deps" in message
    assert sys.executable in message


def test_throughput_skips_the_warmup_steps(bench):
    # steps end at 10, 12, 13 s; one warm-up step: 2 steps of 4 prompts in 13 - 10 = 3 s
    assert bench.throughput([10.0, 12.0, 13.0], warmup=1, batch_size=4) == pytest.approx(8 / 3)
    with pytest.raises(ValueError):
        bench.throughput([10.0], warmup=1, batch_size=4)


def test_select_prompts_takes_one_length_first(bench):
    samples = [SimpleNamespace(ids=[0] * n, name=i) for i, n in enumerate([5, 7, 7, 6, 7, 9])]
    assert [s.name for s in bench.select_prompts(samples, 3)] == [1, 2, 4]  # the three of length 7
    assert [s.name for s in bench.select_prompts(samples, 5)] == [0, 1, 2, 3, 4]  # then lengths 6 and 5 (|7 - n| = 1, 2)


def test_table_has_the_ratios(bench):
    side = {"samples_per_s": 2.0, "peak_rss_mb": 1000.0}
    row = {"label": "tiny", "crslight": {**side, "samples_per_s": 3.0}, "trl": side, "speed_ratio": 1.5,
           "rss_ratio": 1.0, "cpu_speed_ratio": 1.25}
    assert bench.table([row]).splitlines()[-1] == "| tiny | 3.00 | 2.00 | 1.50x | 1000 | 1000 | 1.00x | 1.25x |"


def test_memory_ablation_runs_a_variant(tmp_path):
    import json
    import subprocess

    script = SCRIPT.parent / "ppo_memory.py"
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(script), "--model", "tiny", "--variants", "neither", "--runs", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith("| neither |")
    result = json.loads(out.read_text())["neither"]
    assert len(result["peak_rss_mb"]) == 1 and result["peak_rss_mb"][0] > 0


@pytest.fixture(scope="module")
def cooccurrence():
    spec = importlib.util.spec_from_file_location("cooccurrence_baseline", SCRIPT.parent / "cooccurrence_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dialogue(*turns):
    """Alternating seeker / recommender turns, each a list of item ids."""
    return [{"role": "seeker" if t % 2 == 0 else "recommender", "text": "", "items": list(items)}
            for t, items in enumerate(turns)]


# A and B always come together; C is the most popular recommendation (4 recommender mentions against B's 3) but
# meets A once; D meets C once; E is in the catalogue and never mentioned.
TINY_TRAIN = SimpleNamespace(dialogues={"turns": [
    _dialogue(["A"], ["B"]),
    _dialogue(["A"], ["B"]),
    _dialogue(["A"], ["B", "C"]),
    _dialogue([], ["C"]),
    _dialogue([], ["C"]),
    _dialogue([], ["C", "D"]),
]})
TINY_INDEX = {item: i for i, item in enumerate("ABCDE")}


@pytest.mark.parametrize("method", ["itemknn", "ease"])
def test_cooccurrence_ranks_the_cooccurring_item_above_the_popular_one(cooccurrence, method):
    popularity = cooccurrence.popularity_scores(TINY_TRAIN, TINY_INDEX)
    assert popularity.argmax() == TINY_INDEX["C"]
    model, _ = cooccurrence.fit(method, cooccurrence.mention_matrix(TINY_TRAIN.dialogues["turns"], TINY_INDEX), 1.0, None)
    scorer = cooccurrence.CooccurrenceScorer(model, TINY_INDEX, popularity)
    sample = cooccurrence.RecSample(dialogue=0, turn=1, item="B", previous_items=("A",))
    order = scorer([sample])[0].argsort(descending=True).tolist()
    assert [order[0], order[1]] == [TINY_INDEX["B"], TINY_INDEX["C"]]  # then C, which met A once
    assert scorer.fallbacks == 0


def test_ease_weights_are_the_closed_form(cooccurrence):
    # items A, B in 3 dialogues together: G = XᵀX + 1·I = [[4, 3], [3, 4]], P = G⁻¹ = [[4, -3], [-3, 4]] / 7,
    # B_AB = -P_AB / P_BB = (3/7) / (4/7) = 0.75, diagonal 0; C (never mentioned) is left out of the inverse
    mentions = cooccurrence.mention_matrix([_dialogue(["A"], ["B"])] * 3, {"A": 0, "B": 1, "C": 2})
    model = cooccurrence.EASE(l2=1.0).fit(mentions)
    assert model.items.tolist() == [0, 1]
    assert model.weights == pytest.approx(np.array([[0.0, 0.75], [0.75, 0.0]]))
    context = cooccurrence.context_matrix([cooccurrence.RecSample(0, 1, "B", ("A",))], {"A": 0, "B": 1, "C": 2})
    assert model.predict(context) == pytest.approx(np.array([[0.0, 0.75, 0.0]]))
    # Steck's closed form is, column by column, the ridge regression of an item's column on the other items' columns
    mentions = cooccurrence.mention_matrix(TINY_TRAIN.dialogues["turns"], TINY_INDEX).toarray()[:, :4]  # A B C D
    weights = cooccurrence.EASE(l2=1.0).fit(sp.csr_matrix(mentions)).weights
    for j in range(4):
        others = [i for i in range(4) if i != j]
        x = mentions[:, others]
        ridge = np.linalg.solve(x.T @ x + np.eye(3), x.T @ mentions[:, j])
        assert weights[others, j] == pytest.approx(ridge) and weights[j, j] == 0


def test_itemknn_keeps_the_nearest_neighbours(cooccurrence):
    # cosine to C: A 1/sqrt(3·4) = 0.29, B 1/sqrt(3·4) = 0.29, D 1/sqrt(1·4) = 0.5; one neighbour keeps D only
    mentions = cooccurrence.mention_matrix(TINY_TRAIN.dialogues["turns"], TINY_INDEX)
    full = cooccurrence.ItemKNN().fit(mentions).similarity.toarray()
    assert full[TINY_INDEX["C"]] == pytest.approx([12**-0.5, 12**-0.5, 0.0, 0.5, 0.0])
    pruned = cooccurrence.ItemKNN(neighbours=1).fit(mentions).similarity.toarray()
    assert pruned[TINY_INDEX["C"]] == pytest.approx([0.0, 0.0, 0.0, 0.5, 0.0])


@pytest.mark.parametrize("method", ["itemknn", "ease"])
def test_context_without_known_items_gets_the_popularity_ranking(cooccurrence, method):
    popularity = cooccurrence.popularity_scores(TINY_TRAIN, TINY_INDEX)
    model, _ = cooccurrence.fit(method, cooccurrence.mention_matrix(TINY_TRAIN.dialogues["turns"], TINY_INDEX), 1.0, None)
    scorer = cooccurrence.CooccurrenceScorer(model, TINY_INDEX, popularity)
    # no item before the turn; only E, which no training dialogue mentions; an id outside the catalogue
    samples = [cooccurrence.RecSample(0, 1, "B", ()), cooccurrence.RecSample(0, 3, "D", ("E",)),
               cooccurrence.RecSample(0, 3, "C", ("Z",))]
    scores = scorer(samples)
    assert scorer.fallbacks == 3
    for row in scores:
        assert row.argsort(descending=True).tolist() == popularity.argsort(descending=True).tolist()  # C B A D E
    ranked = cooccurrence.evaluate_ranking(samples, TINY_INDEX, cooccurrence.CooccurrenceScorer(model, TINY_INDEX,
                                                                                                popularity))
    assert ranked == cooccurrence.evaluate_ranking(samples, TINY_INDEX, lambda c: popularity.expand(len(c), -1))


def test_remention_ranks_the_context_items_first(cooccurrence):
    popularity = cooccurrence.popularity_scores(TINY_TRAIN, TINY_INDEX)
    model = cooccurrence.EASE(1.0).fit(cooccurrence.mention_matrix(TINY_TRAIN.dialogues["turns"], TINY_INDEX))
    sample = cooccurrence.RecSample(0, 3, "E", ("E", "A"))
    plain = cooccurrence.CooccurrenceScorer(model, TINY_INDEX, popularity)([sample])[0]
    first = cooccurrence.CooccurrenceScorer(model, TINY_INDEX, popularity, remention=True)([sample])[0]
    assert plain.argmax() == TINY_INDEX["B"]
    # A and E first, in the model's order: both score 0 (no self-weight, E never mentioned in training), so the
    # popularity tie-break decides (neither is ever recommended: catalogue order, A before E); then B, A's partner
    assert first.argsort(descending=True).tolist()[:3] == [TINY_INDEX["A"], TINY_INDEX["E"], TINY_INDEX["B"]]


def test_cooccurrence_cli_on_synthetic(cooccurrence, tmp_path, isolated_cache, capsys):
    out = tmp_path / "cooccurrence.json"
    assert cooccurrence.main(["--dataset", "synthetic", "--n-eval-dialogues", "50", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["popularity", "itemknn", "itemknn + re-mention", "ease", "ease + re-mention"]
    samples = rows["popularity"]["samples"]
    assert samples > 0 and all(r["samples"] == samples for r in rows.values())
    for method in ("itemknn", "ease"):
        assert 0 < rows[method]["fallback_samples"] < samples and rows[method]["fit_seconds"] > 0
        # the re-mention rule moves only items the _new variant leaves out
        plain, first = rows[method], rows[f"{method} + re-mention"]
        assert {k: v for k, v in plain.items() if k.endswith("_new")} == {
            k: v for k, v in first.items() if k.endswith("_new")}
    table = capsys.readouterr().out.splitlines()
    assert "| metric | popularity | itemknn | itemknn + re-mention | ease | ease + re-mention |" in table
    assert f"| samples | {samples} | {samples} | {samples} | {samples} | {samples} |" in table


def test_decoding_benchmark_times_both_samplers(tmp_path):
    spec = importlib.util.spec_from_file_location("decoding", SCRIPT.parent / "decoding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "decoding.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert module.main(["--model", "tiny", "--batch", "2", "--new-tokens", "4", "--repeats", "1",
                            "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())["results"]
    for precision in ("float32", "bf16-autocast"):
        row = results[precision]
        assert row["speedup"] == pytest.approx(row["generate"]["seconds"] / row["engine"]["seconds"], rel=0.02)
        assert row["engine"]["tokens_per_s"] == pytest.approx(2 * 4 / row["engine"]["seconds"], rel=0.02)
        assert row["engine_hf"]["tokens_per_s"] == pytest.approx(2 * 4 / row["engine_hf"]["seconds"], rel=0.02)
        assert row["engine_of_floor"] == pytest.approx(row["matmul_floor"]["seconds"] / row["engine"]["seconds"],
                                                       rel=0.02)


def test_item_acceptance_checks_the_best_items_against_the_users_targets():
    from crslight.models.retrieval import ItemHead
    from crslight.schema import turn

    spec = importlib.util.spec_from_file_location("item_acceptance", SCRIPT.parent / "item_acceptance.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ids = ["A", "B", "C", "D"]
    catalogue = {"item_id": ids, "name": ids, "popularity": [1.0] * 4, "attributes": [""] * 4}
    # the seeker liked A (seen), had seen C, and liked B without having seen it: B is the target at the reply
    labels = [{"item": "A", "suggested": 0, "seen": 1, "liked": 1}, {"item": "C", "suggested": 0, "seen": 1, "liked": 2},
              {"item": "B", "suggested": 1, "seen": 0, "liked": 1}]
    dialogue = {"dialogue_id": "1", "turns": [turn("seeker", "I loved A", ["A"]), turn("recommender", "Try B", ["B"])],
                "labels": labels}
    corpus = SimpleNamespace(catalogue=catalogue, item_index={i: k for k, i in enumerate(ids)}, dialogues=[dialogue])
    head = ItemHead(4, torch.arange(4), torch.arange(4))
    head.bias.data = torch.tensor([9.0, 1.0, 2.0, 0.0])  # A first, but it was mentioned: C, then B
    rates = script.split_rates(head, corpus, (1, 2), (1.0,))
    assert rates["start points"] == 1
    assert rates["accepted@1"] == 0.0 and rates["accepted@2"] == 1.0 and rates["best item seen"] == 1.0
    best, target, effective = rates["T=1"]
    expected = torch.softmax(torch.tensor([1.0, 2.0, 0.0]), 0)  # A masked out
    assert best == pytest.approx(float(expected[1])) and target == pytest.approx(float(expected[0]))
    assert 1.0 < effective < 3.0
    head.bias.data = torch.tensor([0.0, 3.0, 2.0, 0.0])
    assert script.split_rates(head, corpus, (1,))["accepted@1"] == 1.0


def test_reward_benchmark_gives_both_sides_the_same_pairs_and_runs_crslights_real_step(tmp_path):
    """benchmarks/reward_vs_trl.py without TRL: the pairs TRL would get are crslight's own encoding of the same
    batches (the crslight child checks it), and crslight's side trains on them."""
    spec = importlib.util.spec_from_file_location("reward_vs_trl", SCRIPT.parent / "reward_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(batch_size=4, steps=1, warmup=1, precision="32-true", threads=1, seed=0, max_tokens=96,
                              lr=1e-5, dialogues=40)
    prepared = module.prepare("tiny", args, tmp_path)
    assert len(prepared["pairs"]) == 8 and all(c != r and 0 < len(c) <= 96 for c, r in prepared["pairs"])
    threads = torch.get_num_threads()
    try:
        result = module.run_crslight(prepared)
        with pytest.raises(RuntimeError, match="not the pairs TRL gets"):
            module.run_crslight({**prepared, "pairs": prepared["pairs"][::-1]})
    finally:
        torch.set_num_threads(threads)
    assert result["samples_per_s"] > 0 and len(result["step_s"]) == 1
    assert module.table([{"label": "tiny", "crslight": {"samples_per_s": 3.0, "peak_rss_mb": 900.0},
                          "trl": {"samples_per_s": 2.0, "peak_rss_mb": 1000.0}, "speed_ratio": 1.5,
                          "rss_ratio": 0.9}]).splitlines()[-1] == "| tiny | 3.00 | 2.00 | 1.50x | 900 | 1000 | 0.90x |"

"""Measures the user simulator against real data and prints one JSON object.

- ``dwell``: two-sample Kolmogorov-Smirnov statistic between dwell times drawn from the fitted model and the real
  ReDial test-split gaps (one draw per real gap, under the same condition), on the continuous draws and rounded to
  whole seconds like the real ``timeOffset``; per condition; and, as the floor any fit is up against, the KS between
  the real train and test gaps themselves.
- ``acceptance``: acceptance rate, satisfaction, turns and endings of the ``random``, ``popularity`` (train-split
  acceptance counts) and ``popularity-catalogue`` baselines on ReDial and on the synthetic scenario.
- ``linker``: precision and recall of the item linker on every ReDial test recommender turn (the turn text, with
  titles substituted for ``@ids``, against the turn's ``items``), and its speed; with ``--opendialkg``, the build and
  link time on the 100k-entity OpenDialKG catalogue.

Usage (from the repository root)::

    python benchmarks/simulator_stats.py --episodes 1000 --seed 0 [--opendialkg]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from crslight.data import load_corpus
from crslight.simulator.cli import simulate
from crslight.simulator.dwell import CONDITIONS, real_gaps, redial_dwell
from crslight.simulator.linker import ItemLinker

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
BASELINES = ("random", "popularity", "popularity-catalogue")


def dwell_stats(root: Path, seed: int) -> dict:
    model = redial_dwell(root)
    real = real_gaps(load_corpus("redial", root, "test").dialogues)
    train = real_gaps(load_corpus("redial", root, "train").dialogues)
    rng = np.random.default_rng(seed)
    simulated = {c: np.asarray(model.fit_of(c).sample(rng, len(real[c]))) for c in CONDITIONS}
    all_real = np.concatenate([real[c] for c in CONDITIONS])
    all_sim = np.concatenate([simulated[c] for c in CONDITIONS])
    return {
        "model": model.to_dict(),
        "test_gaps": int(all_real.size),
        "ks": round(float(stats.ks_2samp(all_sim, all_real).statistic), 4),
        "ks_rounded": round(float(stats.ks_2samp(np.round(all_sim), all_real).statistic), 4),
        "ks_rounded_by_condition": {
            c: round(float(stats.ks_2samp(np.round(simulated[c]), real[c]).statistic), 4) for c in CONDITIONS
        },
        "ks_real_train_vs_test": round(
            float(stats.ks_2samp(np.concatenate(list(train.values())), all_real).statistic), 4
        ),
        "median_real": float(np.median(all_real)),
        "median_simulated": round(float(np.median(all_sim)), 2),
    }


def linker_stats(root: Path) -> dict:
    corpus = load_corpus("redial", root, "test")
    start = time.perf_counter()
    linker = ItemLinker.from_catalogue(corpus.catalogue)
    build = time.perf_counter() - start
    turns = [t for ts in corpus.dialogues["turns"] for t in ts if t["role"] == "recommender"]
    start = time.perf_counter()
    predicted = [set(linker.link(t["text"])) for t in turns]
    elapsed = time.perf_counter() - start
    gold = [set(t["items"]) for t in turns]
    tp = sum(len(p & g) for p, g in zip(predicted, gold, strict=True))
    n_pred, n_gold = sum(map(len, predicted)), sum(map(len, gold))
    return {
        "turns": len(turns), "gold_mentions": n_gold, "predicted_mentions": n_pred,
        "precision": round(tp / n_pred, 4), "recall": round(tp / n_gold, 4),
        "build_seconds": round(build, 2), "link_seconds": round(elapsed, 2),
    }


def opendialkg_linker_stats(root: Path) -> dict:
    corpus = load_corpus("opendialkg", root, "test")
    start = time.perf_counter()
    linker = ItemLinker.from_catalogue(corpus.catalogue)
    build = time.perf_counter() - start
    texts = [t["text"] for ts in corpus.dialogues["turns"] for t in ts if t["role"] == "recommender"]
    start = time.perf_counter()
    linked = linker.link_batch(texts)
    return {"entities": len(linker), "turns": len(texts), "build_seconds": round(build, 2),
            "link_seconds": round(time.perf_counter() - start, 2),
            "mean_links_per_turn": round(float(np.mean([len(x) for x in linked])), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redial-root", type=Path, default=DATA / "redial")
    parser.add_argument("--opendialkg-root", type=Path, default=DATA / "opendialkg")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--max-turns", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--opendialkg", action="store_true", help="also time the linker on OpenDialKG")
    args = parser.parse_args()
    redial = args.redial_root.resolve()
    out: dict = {"dwell": dwell_stats(redial, args.seed), "linker": linker_stats(redial), "acceptance": {}}
    for dataset, root in (("redial", str(redial)), ("synthetic", None)):
        out["acceptance"][dataset] = {
            policy: {k: v for k, v in simulate(dataset, root, policy, args.episodes, args.max_turns, args.seed,
                                                  "test").items() if k not in ("dataset", "split", "policy")}
            for policy in BASELINES
        }
    if args.opendialkg:
        out["linker_opendialkg"] = opendialkg_linker_stats(args.opendialkg_root.resolve())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

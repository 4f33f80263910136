"""Statistics of the built-in implicit signals on a real split, and how the composite label tracks ``liked``.

For every transition (recommender turn → seeker reaction) of the split it computes each built-in signal and reports
mean, standard deviation and coverage (non-NaN fraction), with the seconds each took. It then fits a z-scored
:class:`~crslight.signals.CompositeLabel` of the *implicit* signals (dwell time, sentiment shift, engagement,
semantic relevance; equal weights) on the split, and correlates it with the seeker's questionnaire ``liked`` answer
for every (transition, item) pair whose answer is 0 or 1: Pearson's r against a binary variable, i.e. the
point-biserial correlation. The acceptance signal is left out of that composite because it *is* ``liked`` on ReDial;
a composite that includes it is reported separately as a sanity check of the plumbing (it leaks the label).

Usage::

    python benchmarks/signal_stats.py --dataset redial --root ../shared/data/redial --split train [--threads 1]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from scipy import stats  # noqa: E402

from crslight.data import load_corpus  # noqa: E402
from crslight.signals import (  # noqa: E402
    AcceptanceSignal,
    CompositeLabel,
    DwellTimeSignal,
    EngagementSignal,
    SemanticRelevanceSignal,
    SentimentShiftSignal,
    coverage,
    transitions,
)


def summary(values: torch.Tensor) -> dict:
    known = values[~values.isnan()].double()
    return {
        "mean": round(float(known.mean()), 4) if known.numel() else None,
        "std": round(float(known.std(unbiased=False)), 4) if known.numel() else None,
        "coverage": round(coverage(values), 4),
    }


def point_biserial(label: torch.Tensor, batch, min_pairs: int = 10) -> dict:
    """Correlation of a per-transition value with ``liked`` over (transition, item) pairs with liked in {0, 1}."""
    xs, ys = [], []
    for i, (items, answers) in enumerate(zip(batch.items, batch.labels, strict=True)):
        for item in dict.fromkeys(items):
            liked = answers.get(item, {}).get("liked")
            if liked in (0, 1) and not math.isnan(label[i]):
                xs.append(float(label[i]))
                ys.append(liked)
    if len(xs) < min_pairs or len(set(ys)) < 2:
        return {"r": None, "p": None, "pairs": len(xs)}
    r, p = stats.pointbiserialr(ys, xs)
    return {"r": round(float(r), 4), "p": float(f"{p:.3g}"), "pairs": len(xs), "liked_rate": round(sum(ys) / len(ys), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="redial")
    parser.add_argument("--root", default="../shared/data/redial")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-transitions", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's choice). 1 by default: on a small machine shared with "
                             "other jobs, two OpenMP threads wait on each other and the MiniLM pass takes minutes")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    corpus = load_corpus(args.dataset, args.root, args.split)
    load_seconds = time.perf_counter() - start

    start, cpu_start = time.perf_counter(), time.process_time()
    batch = transitions(corpus, max_items=args.max_transitions)
    implicit = {
        "DwellTimeSignal": DwellTimeSignal(),
        "SentimentShiftSignal": SentimentShiftSignal(),
        "EngagementSignal": EngagementSignal(),
        "SemanticRelevanceSignal": SemanticRelevanceSignal(),
    }
    signals = {**implicit, "AcceptanceSignal": AcceptanceSignal()}
    extra = {"SentimentShiftSignal(mode=polarity)": SentimentShiftSignal(mode="polarity")}  # reported, not combined
    values, seconds = {}, {}
    for name, signal in {**signals, **extra}.items():
        t = time.perf_counter()
        values[name] = signal(batch)
        seconds[name] = round(time.perf_counter() - t, 2)
    signal_seconds, signal_cpu = time.perf_counter() - start, time.process_time() - cpu_start

    raw = torch.stack([values[n] for n in implicit], dim=1)
    composite = CompositeLabel(list(implicit.values())).fit(raw)
    label = composite(raw)
    leaky_raw = torch.stack([values[n] for n in signals], dim=1)
    leaky = CompositeLabel(list(signals.values())).fit(leaky_raw)(leaky_raw)

    print(json.dumps({
        "dataset": args.dataset,
        "split": args.split,
        "dialogues": len(corpus.dialogues),
        "transitions": len(batch),
        "seconds": {"load_corpus": round(load_seconds, 2), "transitions_and_signals": round(signal_seconds, 2),
                    "transitions_and_signals_cpu": round(signal_cpu, 2), "per_signal": seconds,
                    "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "encoder_dtype": implicit["SemanticRelevanceSignal"]._encoder.dtype},
        "signals": {name: {**summary(v), "corr_liked": point_biserial(v, batch)} for name, v in values.items()},
        "composite_implicit": {**summary(label), "corr_liked": point_biserial(label, batch),
                               "signals": list(implicit), "normalization": "zscore", "weights": "equal"},
        "composite_with_acceptance_leaky": {**summary(leaky), "corr_liked": point_biserial(leaky, batch)},
    }, indent=2))


if __name__ == "__main__":
    main()

"""The results table of docs/results.md, from the files the measuring commands wrote.

Inputs: per dataset, the ``comparison.json`` of ``crslight pipeline`` (base zero-shot, SFT, SFT + PPO) and the JSON of
``benchmarks/popularity_baseline.py``. Output: the markdown table (printed) and a JSON list of rows ``{"dataset",
"model", metric: value}`` that ``crslight plot --results`` draws as a bar chart.

    python benchmarks/results_table.py \\
        --dataset redial runs/pipeline/redial/comparison.json runs/popularity_redial.json \\
        --dataset opendialkg runs/pipeline/opendialkg/comparison.json runs/popularity_opendialkg.json \\
        --json runs/figures/results.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

METRICS = ("recall@1", "recall@10", "recall@50", "ndcg@10", "mrr@10", "item_coverage", "reward", "satisfaction",
           "acceptance", "coherence", "distinct-2")
MODELS = {"popularity": "popularity", "base": "SmolLM2 zero-shot", "sft": "SFT", "rlhf": "SFT + PPO (ours)"}


def rows_of(dataset: str, comparison: str | Path, popularity: str | Path) -> list[dict]:
    """One row per model: the popularity baseline, then the pipeline's three policies."""
    results = {"popularity": {k.removeprefix("test/"): v for k, v in json.loads(Path(popularity).read_text()).items()}}
    results.update(json.loads(Path(comparison).read_text())["results"])
    return [{"dataset": dataset, "model": MODELS[key], **{m: results[key].get(m) for m in METRICS}}
            for key in MODELS if key in results]


def markdown(rows: list[dict]) -> str:
    lines = ["| dataset | model | " + " | ".join(METRICS) + " |", "|---|---|" + "---:|" * len(METRICS)]
    for row in rows:
        cells = ["–" if row[m] is None or (isinstance(row[m], float) and math.isnan(row[m])) else f"{row[m]:.3f}"
                 for m in METRICS]
        lines.append(f"| {row['dataset']} | {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", nargs=3, action="append", required=True,
                        metavar=("NAME", "COMPARISON_JSON", "POPULARITY_JSON"))
    parser.add_argument("--json", default=None, help="write the rows here (input of `crslight plot --results`)")
    args = parser.parse_args(argv)
    rows = [row for name, comparison, popularity in args.dataset for row in rows_of(name, comparison, popularity)]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

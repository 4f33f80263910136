"""``crslight compare``: the tests of several policies side by side, with paired bootstrap intervals.

Every ``crslight test`` writes ``test_metrics.json`` and, when it ran simulator episodes, ``test_episodes.jsonl``
(one record per episode) into its run folder. Episode ``i`` of any test is seeded by ``(0, i)``, so two tests of the
same split and episode count met the same simulated users, and their difference is a paired one::

    crslight compare runs/redial/sft_test runs/redial/ppo_test --names sft rlhf

prints the metrics of every run (acceptance, satisfaction and reward with a 95% percentile-bootstrap interval over
the episodes) and every run's paired difference from the first (``--baseline`` names another), as
``crslight pipeline`` does at its end; ``--json FILE`` writes the same as JSON. A run folder is a test's log folder
(``SAVE_DIR/NAME/version_N``) or the folder above it, which stands for its newest version holding a test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from crslight.pipeline import comparison_table, differences_table, paired_intervals


class CompareError(ValueError):
    """A run folder or its files cannot be compared; the message names the path and what was expected."""


def _version(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def test_folder(path: str | Path) -> Path:
    """The folder holding a test's ``test_metrics.json``: ``path`` itself, else its newest ``version_N`` that does."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{path}: no such folder: expected the log folder of a `crslight test` run")
    if (path / "test_metrics.json").is_file():
        return path
    versions = sorted((p for p in path.glob("version_*") if (p / "test_metrics.json").is_file()), key=_version)
    if not versions:
        raise CompareError(f"{path}: holds no test_metrics.json, nor does any version_N folder in it: expected the "
                           "log folder of a `crslight test` run")
    return versions[-1]


def _read_json(path: Path) -> dict:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CompareError(f"{path}: not a JSON object of test metrics ({error})") from None
    if not isinstance(metrics, dict):
        raise CompareError(f"{path}: expected a JSON object of test metrics, got {type(metrics).__name__}")
    return metrics


def _read_episodes(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    from crslight.modules.evaluation import load_episode_records  # torch: only when there is something to read

    try:
        records = load_episode_records(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CompareError(f"{path}: not one JSON episode record per line ({error})") from None
    for line, record in enumerate(records, 1):
        missing = [k for k in ("episode", "dialogue_id", "accepted", "satisfaction", "turns")
                   if not isinstance(record, dict) or k not in record]
        if missing:
            raise CompareError(f"{path}, record {line}: expected an episode record with the fields {missing}")
    return records


def compare(runs: list[str | Path], names: list[str] | None = None, baseline: str | None = None,
            n_resamples: int = 2000, seed: int = 0) -> dict:
    """The report of several tests: ``{"results": {name: metrics}, "intervals": {name: {metric: [mean, lo, hi]}},
    "differences_vs_BASELINE": {name: {metric: [mean, lo, hi]}}, "episodes": {name: n}, "runs": {name: folder}}``.

    Raises:
        CompareError: a run folder without a test, two runs of one name, an unknown baseline, unreadable files, or
            runs whose episodes are not the same users (other episode indices or dialogues).
    """
    folders = [test_folder(run) for run in runs]
    names = list(names) if names else [Path(run).name for run in runs]
    if len(names) != len(folders):
        raise CompareError(f"--names: {len(names)} names for {len(folders)} runs")
    if len(set(names)) != len(names):
        raise CompareError(f"two runs share a name ({', '.join(names)}): give each its own with --names")
    baseline = baseline or names[0]
    if baseline not in names:
        raise CompareError(f"--baseline {baseline!r}: not one of the runs ({', '.join(names)})")
    results, episodes = {}, {}
    for name, folder in zip(names, folders, strict=True):
        metrics = _read_json(folder / "test_metrics.json")
        results[name] = {k.removeprefix("test/"): v for k, v in metrics.items()}
        episodes[name] = _read_episodes(folder / "test_episodes.jsonl")
    try:
        intervals, differences = paired_intervals(episodes, baseline=baseline, n_resamples=n_resamples, seed=seed)
    except ValueError as error:
        raise CompareError(f"the runs did not meet the same simulated users ({error}): compare tests of one split "
                           "with the same number of episodes") from None
    return {"results": results, "intervals": intervals, f"differences_vs_{baseline}": differences,
            "baseline": baseline, "episodes": {name: len(records) for name, records in episodes.items()},
            "runs": {name: str(folder) for name, folder in zip(names, folders, strict=True)}}


def report_text(report: dict) -> str:
    """The comparison table, then the paired differences from the baseline (when any run has episodes)."""
    text = comparison_table(report["results"], intervals=report["intervals"])
    baseline = report["baseline"]
    differences = report.get(f"differences_vs_{baseline}")
    if differences and any(differences.values()):
        text += "\n\n" + differences_table(differences, baseline)
    counts = ", ".join(f"{name} {n}" for name, n in report["episodes"].items())
    return text + f"\n\nepisodes per run: {counts} (intervals: 95% percentile bootstrap; differences paired)"


def configure_parser(parser) -> None:
    parser.add_argument("runs", nargs="+", help="log folders of `crslight test` runs (or the folder above them)")
    parser.add_argument("--names", nargs="+", default=None, help="a column name per run (default: the folder names)")
    parser.add_argument("--baseline", default=None, help="the run the differences are taken from (default: the first)")
    parser.add_argument("--json", default=None, help="also write the report to this JSON file")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seeds the resampling")

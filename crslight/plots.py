"""Training curves from Lightning ``CSVLogger`` runs, and bar charts of results tables.

:func:`plot_run` reads every ``metrics.csv`` under a log folder. ``CSVLogger`` writes one row per ``log_metrics`` call
with ``step`` (and ``epoch`` when a Trainer logs) and one column per metric key ever logged; a row leaves the metrics it
did not log empty, so each metric is a sparse series (training metrics every few steps, ``val/...`` once per
validation). A column ``stage/name[_step|_epoch]`` is one series of the figure ``name``: ``train/reward`` and
``val/reward`` share ``reward.png``, ``train/loss_step`` and ``train/loss_epoch`` share ``loss.png``. Each series is
drawn raw (faint) and smoothed with TensorBoard's debiased exponential moving average.

Which figures: the RL curves, every metric whose name has the word ``score``, ``reward``, ``kl`` or ``accept...`` in it, when the
run has any; otherwise the ``loss`` curves (SFT, reward model); otherwise everything. ``metrics=`` picks words
explicitly.

:func:`plot_results` draws a results table (a JSON list of rows ``{"dataset", "model", "recall@10", ...}``): one
subplot per dataset, one group of bars per metric, one bar per model, the value written on each bar. Rows repeated for
one (dataset, model), e.g. several seeds, become their mean with the standard deviation as an error bar.

Figures are drawn on matplotlib's non-interactive Agg canvas without pyplot, so plotting never opens a window and never
changes the backend of the process that calls it (a notebook keeps its own).
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

RL_WORDS = ("score", "reward", "kl", "accept")
"""Words that mark a run's RL curves (a metric name word equal to, or starting with, one of them; ``kl`` exactly)."""

FALLBACK_WORDS = ("loss",)
"""Curves drawn when a run logged no RL metric."""

NOT_METRICS = frozenset({"dataset", "model", "seed", "split", "run", "episodes", "max_turns", "n"})
"""Keys of a results row that are never drawn as bars."""

SUFFIXES = ("_step", "_epoch")
"""Lightning's suffixes when a metric is logged both ``on_step`` and ``on_epoch``."""

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """A ``CSVLogger`` ``metrics.csv`` as columns of floats; empty or non-numeric cells are NaN."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0].keys()) if rows else []

    def number(cell: str | None) -> float:
        try:
            return float(cell) if cell not in (None, "") else math.nan
        except ValueError:
            return math.nan

    return {c: np.array([number(r.get(c)) for r in rows], dtype=float) for c in columns if c is not None}


def smooth(values: np.ndarray, weight: float = 0.6) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased so that it starts at the first value."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out = np.empty_like(values, dtype=float)
    last, debias = 0.0, 1.0
    for i, v in enumerate(values):
        last = last * weight + (1 - weight) * v
        debias *= weight
        out[i] = last / (1 - debias)
    return out


def split_column(column: str) -> tuple[str, str, str]:
    """``"train/reward_step"`` → ``("reward", "train", "step")``; ``"loss"`` → ``("loss", "", "")``."""
    stage, _, name = column.rpartition("/")
    variant = ""
    for suffix in SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            name, variant = name[: -len(suffix)], suffix[1:]
    return name, stage, variant


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]


def _matches(name: str, words: Sequence[str]) -> bool:
    return any(w == k or (k != "kl" and w.startswith(k)) for w in _words(name) for k in words)


def choose_figures(columns: Sequence[str], metrics: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Figure name → its columns, in drawing order (module docstring); ``metrics`` overrides the choice of words."""
    figures: dict[str, list[str]] = defaultdict(list)
    for column in columns:
        if column in ("step", "epoch"):
            continue
        figures[split_column(column)[0]].append(column)
    if metrics is not None:
        chosen = [n for n in figures if _matches(n, metrics)]
    else:
        chosen = [n for n in figures if _matches(n, RL_WORDS)] or [n for n in figures if _matches(n, FALLBACK_WORDS)]
        chosen = chosen or list(figures)

    def order(name: str) -> tuple[int, str]:
        ranks = [i for i, k in enumerate(RL_WORDS) if _matches(name, [k])]
        return (ranks[0] if ranks else len(RL_WORDS), name)

    return {n: figures[n] for n in sorted(chosen, key=order)}


def _figure(width: float, height: float):
    """A pyplot-free figure on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9@._-]+", "_", name).strip("_") or "metric"


def _draw_curves(data: dict[str, np.ndarray], name: str, columns: list[str], title: str, out: Path, smoothing: float):
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    x_all = data["step"] if "step" in data else np.arange(len(next(iter(data.values()))), dtype=float)
    drawn = 0
    for i, column in enumerate(sorted(columns, key=lambda c: split_column(c)[1:])):
        y = data[column]
        keep = np.isfinite(y) & np.isfinite(x_all)
        if not keep.any():
            continue
        x, y = x_all[keep], y[keep]
        _, stage, variant = split_column(column)
        label = (stage or name) + (f" ({variant})" if variant else "")
        color = f"C{i % 10}"
        marker = "o" if len(y) <= 20 else None
        if len(y) > 1:
            ax.plot(x, y, color=color, alpha=0.25, linewidth=1.0)
        ax.plot(x, smooth(y, smoothing) if len(y) > 2 else y, color=color, linewidth=1.8, marker=marker, markersize=3,
                label=label)
        drawn += 1
    if not drawn:
        return None
    ax.set(title=title, xlabel="step", ylabel=name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=110)
    return out


def find_runs(log_dir: str | Path) -> list[Path]:
    """Every ``metrics.csv`` at or under ``log_dir``, sorted."""
    log_dir = Path(log_dir)
    if log_dir.is_file() and log_dir.name.endswith(".csv"):
        return [log_dir]
    if not log_dir.is_dir():
        raise FileNotFoundError(f"no log folder at {log_dir}")
    return sorted(log_dir.rglob("metrics.csv"))


def plot_run(
    log_dir: str | Path,
    out_dir: str | Path,
    metrics: Sequence[str] | None = None,
    smoothing: float = 0.6,
) -> list[Path]:
    """Writes the training curves of every ``CSVLogger`` run under ``log_dir`` as PNG files.

    Args:
        log_dir: a run folder (holding ``metrics.csv``), a folder of runs (``lightning_logs/``, searched recursively)
            or a ``metrics.csv`` file.
        out_dir: where the PNGs go. A run's figures are ``out_dir/<name>.png`` for a run at ``log_dir`` itself, and
            ``out_dir/<run folder relative to log_dir>/<name>.png`` otherwise (``out_dir/ppo/version_0/reward.png``).
        metrics: words that pick the figures (``["reward", "loss"]``); default: module docstring.
        smoothing: the moving average's weight in [0, 1); 0 draws the raw series only.

    Returns:
        The PNG files written.

    Raises:
        FileNotFoundError: ``log_dir`` does not exist or holds no ``metrics.csv``.
    """
    log_dir, out_dir = Path(log_dir), Path(out_dir)
    runs = find_runs(log_dir)
    if not runs:
        raise FileNotFoundError(f"no metrics.csv under {log_dir} (write one with Lightning's CSVLogger)")
    written = []
    for csv_path in runs:
        data = read_metrics(csv_path)
        if not data:
            continue
        rel = csv_path.parent.relative_to(log_dir) if log_dir.is_dir() else Path()
        target = out_dir / rel
        target.mkdir(parents=True, exist_ok=True)
        run_name = str(rel) if str(rel) != "." else csv_path.parent.name
        for name, columns in choose_figures(list(data), metrics).items():
            png = _draw_curves(data, name, columns, f"{run_name}: {name}", target / f"{_safe(name)}.png", smoothing)
            if png is not None:
                written.append(png)
    return written


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_results(results_json: str | Path) -> list[dict]:
    """The rows of a results table: a JSON list of objects, or an object with such a list under ``"results"``."""
    rows = json.loads(Path(results_json).read_text())
    if isinstance(rows, dict) and isinstance(rows.get("results"), list):
        rows = rows["results"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{results_json}: expected a JSON list of objects like {{\"dataset\", \"model\", ...}}")
    missing = [i for i, r in enumerate(rows) if "model" not in r]
    if missing:
        raise ValueError(f"{results_json}: rows {missing[:5]} have no \"model\"")
    return rows


def plot_results(
    results_json: str | Path,
    out_png: str | Path,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draws a results table as grouped bars: a subplot per dataset, a group per metric, a bar per model.

    Args:
        results_json: a JSON list of rows ``{"dataset": ..., "model": ..., "<metric>": number, ...}``. A row without
            ``dataset`` belongs to the dataset ``""``; keys in :data:`NOT_METRICS` and values that are not finite
            numbers are not drawn.
        out_png: the PNG file to write (its folder is created).
        metrics: the metrics to draw, in this order; default: every numeric key, in order of first appearance.
        title: the figure's title.

    Returns:
        ``out_png``.
    """
    rows = read_results(results_json)
    if metrics is None:
        metrics = list(dict.fromkeys(k for r in rows for k, v in r.items() if k not in NOT_METRICS and _is_number(v)))
    if not metrics:
        raise ValueError(f"{results_json}: no numeric metric to draw")
    datasets = list(dict.fromkeys(str(r.get("dataset", "")) for r in rows))
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        for m in metrics:
            if _is_number(r.get(m)):
                values[str(r.get("dataset", "")), str(r["model"]), m].append(float(r[m]))

    group = np.arange(len(metrics), dtype=float)
    fig = _figure(max(6.0, 1.0 + len(metrics) * (0.5 + 0.35 * len(models))), 0.6 + 3.4 * len(datasets))
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, dataset in zip(axes, datasets, strict=True):
        present = [m for m in models if any((dataset, m, metric) in values for metric in metrics)]
        width = 0.8 / max(1, len(present))
        for j, model in enumerate(present):
            cells = [values.get((dataset, model, m), []) for m in metrics]
            has = np.array([bool(c) for c in cells])
            heights = np.array([np.mean(c) if c else 0.0 for c in cells])
            errors = np.array([np.std(c) if len(c) > 1 else 0.0 for c in cells])
            x = group + (j - (len(present) - 1) / 2) * width
            bars = ax.bar(x[has], heights[has], width, yerr=errors[has] if (errors > 0).any() else None,
                          capsize=2, color=f"C{models.index(model) % 10}", label=model)
            ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
        ax.set_xticks(group, metrics, rotation=20 if len(metrics) > 4 else 0)
        ax.set_title(dataset or "results")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
        ax.legend(fontsize=8, ncols=min(len(present), 4))
    if title:
        fig.suptitle(title)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def configure_parser(parser) -> None:
    """Adds ``crslight plot``'s arguments to ``parser`` (``crslight plot --logs DIR [--results FILE] --out DIR``)."""
    parser.add_argument("--logs", default=None, metavar="DIR", help="a CSVLogger run folder or a folder of runs (lightning_logs/)")
    parser.add_argument("--results", default=None, metavar="FILE", help="a results table: JSON list of {dataset, model, metrics...}")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="WORD", help="words that pick the curves (default: RL, else loss)")
    parser.add_argument("--smoothing", type=float, default=0.6, help="moving-average weight in [0, 1)")


def run(args) -> int:
    """Runs ``crslight plot`` on parsed arguments; prints the files written, one a line. Returns the exit code."""
    if args.logs is None and args.results is None:
        print("crslight plot: nothing to plot; give --logs DIR and/or --results FILE", file=sys.stderr)
        return 2
    written: list[Path] = []
    try:
        if args.logs is not None:
            written += plot_run(args.logs, args.out, metrics=args.metrics, smoothing=args.smoothing)
        if args.results is not None:
            written.append(plot_results(args.results, Path(args.out) / "results.png"))
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        print(f"crslight plot: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0



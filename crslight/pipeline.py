"""The whole method in one command: SFT → reward model → PPO → test of the base, SFT and RLHF policies.

``crslight pipeline --dataset synthetic`` runs, in one process, exactly the stage commands a user would type::

    crslight fit  -c configs/D/sft.yaml                       # the supervised baseline and PPO's warm start
    crslight fit  -c configs/D/reward.yaml                    # R_phi from the implicit-signal weak labels
    crslight fit  -c configs/D/ppo.yaml --model.init_from SFT --model.reward_model R_PHI
    crslight test -c configs/D/sft.yaml                       # the base model, zero-shot (no checkpoint)
    crslight test -c configs/D/sft.yaml --ckpt_path SFT
    crslight test -c configs/D/ppo.yaml --ckpt_path PPO       # SFT + PPO: ours

with every run's logs under ``--out`` (``OUT/<stage>/version_N``). The three tests share one evaluation setting
(``--eval-episodes``, ``--eval-max-turns``, ``--eval-max-new-tokens``) and one judge, the R_phi just trained
(``reward``: its mean score of the test episodes' replies), so the columns compare. Then the reference policies meet
the very same simulated users (``crslight.modules.evaluation.run_episodes``, same split, seed, turn limit and
simulator, judged by the same R_phi; records in ``OUT/test_<name>/``): ``popularity`` (the most accepted train item,
with the popularity ranking of ``benchmarks/popularity_baseline.py`` when the repository has it) and, on the synthetic
scenario, ``oracle`` (the most popular item of the genre and mood the seeker stated; ``AttributeOraclePolicy``).

The comparison (printed, and written to ``OUT/comparison.json`` and ``OUT/comparison.md``) has one column per policy
and, for acceptance, satisfaction and reward, a 95% percentile-bootstrap interval over the episodes of each
``test_episodes.jsonl``; below it, every policy's paired difference from SFT with its interval
(``crslight.metrics.bootstrap``: episode ``i`` is the same user for every policy, so the pairs share their noise).
Extra ``--x.y=v`` arguments after ``--`` go to every stage (e.g. ``-- --trainer.precision=32``); ``--sft``,
``--reward`` and ``--ppo`` take a quoted string of arguments for one stage's fit (``--sft="--trainer.max_steps=200"``,
with the ``=``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import time
from pathlib import Path
from typing import NamedTuple

STAGES = ("sft", "reward", "ppo")
POLICIES = ("base", "sft", "rlhf")
#: Metrics with a bootstrap interval, and what they are in an episode record (``reward`` weighted by its replies).
INTERVAL_METRICS = {"acceptance": "accepted", "satisfaction": "satisfaction", "reward": "reward"}
# what the comparison shows, in this order (keys of test_metrics.json without the ``test/`` prefix)
COLUMNS = ("recall@1", "recall@10", "recall@50", "ndcg@10", "mrr@10", "recall@10_new", "item_coverage",
           "reward", "satisfaction", "acceptance", "coherence", "distinct-2")


def _run(command: str, config: Path, out: Path, name: str, extra: list[str]):
    """``crslight COMMAND -c CONFIG`` in this process, logging to ``OUT/NAME/version_N``."""
    from crslight.lightning_cli import run_lightning_cli

    return run_lightning_cli([command, "-c", str(config), f"--trainer.logger.init_args.save_dir={out}",
                              f"--trainer.logger.init_args.name={name}", *extra])


def _fit(config: Path, out: Path, name: str, extra: list[str]):
    cli = _run("fit", config, out, name, extra)
    callback = cli.trainer.checkpoint_callback
    path = (callback.best_model_path or callback.last_model_path) if callback is not None else ""
    if not path:
        raise RuntimeError(f"the {name} stage ({config}) saved no checkpoint: its config needs a ModelCheckpoint")
    return Path(path)


class Steps:
    """Runs a command's steps, keeping each one's wall time (``seconds[step]``) and printing it when it ends."""

    def __init__(self, command: str):
        self.command, self.seconds = command, {}

    def __call__(self, step: str, fn, *args):
        start = time.time()
        result = fn(*args)
        self.seconds[step] = round(time.time() - start, 1)
        print(f"[crslight {self.command}] {step}: {self.seconds[step]:.0f} s", flush=True)
        return result


class TestRun(NamedTuple):
    """What one policy's test left: its metrics (``test/`` prefix removed), its episode records, its DataModule."""

    metrics: dict[str, float]
    records: list[dict]
    datamodule: object


def _test(config: Path, out: Path, name: str, extra: list[str]) -> TestRun:
    from crslight.lightning_cli import run_dir
    from crslight.modules.evaluation import load_episode_records

    cli = _run("test", config, out, name, extra)
    folder = run_dir(cli.trainer)
    metrics = json.loads((folder / "test_metrics.json").read_text())
    episodes = folder / "test_episodes.jsonl"
    records = load_episode_records(episodes) if episodes.is_file() else []
    return TestRun({k.removeprefix("test/"): v for k, v in metrics.items()}, records, cli.datamodule)


def _popularity_ranking(train, test) -> dict[str, float]:
    """The popularity baseline's ranking metrics, from ``benchmarks/popularity_baseline.py`` (a script, not part of
    the package: empty when this is not a repository checkout)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "popularity_baseline.py"
    if not script.is_file():
        return {}
    spec = importlib.util.spec_from_file_location("popularity_baseline", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {k: v for k, v in module.popularity_ranking(train, test).items() if k != "samples"}


def _reference(name: str, datamodule, out: Path, episodes: int, max_turns: int, reward_model: str) -> TestRun:
    """A reference policy on the policy tests' episodes (same split, seed, turn limit, simulator and R_phi), written
    to ``OUT/test_NAME/`` as a test writes its run: ``test_metrics.json`` and ``test_episodes.jsonl``."""
    from crslight.modules.evaluation import EPISODE_SEED, ConversationEvaluator, run_episodes, save_episode_records
    from crslight.simulator.policies import make_policy

    test, train = datamodule.corpus("test"), datamodule.corpus("train")
    policy = make_policy(name, test, root=datamodule.root, train=train)
    conversation = ConversationEvaluator(reward_model=reward_model)
    conversation.update(run_episodes(policy, test, episodes, max_turns, EPISODE_SEED, root=datamodule.root))
    metrics = {k: float(v) for k, v in conversation.compute().items()}
    if name == "popularity":
        metrics.update(_popularity_ranking(train, test))
    metrics = {k: None if math.isnan(v) else v for k, v in sorted(metrics.items())}  # as test_metrics.json has them
    folder = out / f"test_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test_metrics.json").write_text(json.dumps({f"test/{k}": v for k, v in metrics.items()}, indent=2) + "\n")
    save_episode_records(folder / "test_episodes.jsonl", conversation.records)
    return TestRun(metrics, conversation.records, datamodule)


def paired_intervals(episodes: dict[str, list[dict]], baseline: str = "sft", n_resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> tuple[dict, dict]:
    """Bootstrap intervals of every policy's acceptance, satisfaction and reward, and of its paired difference from
    ``baseline``, from the policies' episode records.

    A metric is left out for a policy whose records lack it (no R_phi: no ``reward``). ``reward`` is weighted by the
    episode's replies (``turns``), so its mean is the per-reply mean ``test/reward``.

    Args:
        episodes: policy → its episode records (``crslight.modules.evaluation.episode_record``), any order.
        baseline: the policy the differences are taken from (absent: no differences).
        n_resamples: bootstrap resamples.
        level: the intervals' coverage.
        seed: seeds the resampling (the same for every policy and metric).

    Returns:
        ``(intervals, differences)``: ``{policy: {metric: (mean, lo, hi)}}``, and the same of ``policy - baseline``
        for every other policy.

    Raises:
        ValueError: when a policy's episodes are not the baseline's (other indices or dialogues).
    """
    from crslight.metrics.bootstrap import bootstrap_ci, paired_difference_ci

    def columns(records: list[dict]) -> dict[str, tuple[list, list, list | None]]:
        records = sorted(records, key=lambda r: r["episode"])
        ids = [(r["episode"], r["dialogue_id"]) for r in records]
        out = {}
        for metric, key in INTERVAL_METRICS.items():
            values = [r.get(key) for r in records]
            if values and not any(_missing(v) for v in values):
                out[metric] = (ids, values, [r["turns"] for r in records] if metric == "reward" else None)
        return out

    data = {policy: columns(records) for policy, records in episodes.items() if records}
    intervals = {policy: {m: bootstrap_ci(v, n_resamples, level, seed, weights=w) for m, (_, v, w) in cols.items()}
                 for policy, cols in data.items()}
    differences: dict[str, dict] = {}
    for policy, cols in data.items():
        if policy == baseline or baseline not in data:
            continue
        differences[policy] = {}
        for metric, (ids, values, weights) in cols.items():
            if metric in data[baseline]:
                base_ids, base_values, base_weights = data[baseline][metric]
                differences[policy][metric] = paired_difference_ci(
                    values, base_values, ids_a=ids, ids_b=base_ids, n_resamples=n_resamples, level=level, seed=seed,
                    weights_a=weights, weights_b=base_weights)
    return intervals, differences


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def comparison_table(results: dict[str, dict[str, float]], columns: tuple[str, ...] = COLUMNS,
                     intervals: dict[str, dict[str, tuple[float, float, float]]] | None = None) -> str:
    """A markdown table: one row per metric, one column per policy (``results[policy][metric]``); a metric with an
    interval (``intervals[policy][metric] = (mean, lo, hi)``) reads ``mean [lo, hi]``."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for column in columns:
        if not any(column in r for r in results.values()):
            continue
        cells = []
        for name in names:
            value = results[name].get(column)
            interval = (intervals or {}).get(name, {}).get(column)
            if interval is not None:
                cells.append(f"{interval[0]:.3f} [{interval[1]:.2f}, {interval[2]:.2f}]")
            else:
                cells.append("n/a" if _missing(value) else f"{value:.3f}")
        lines.append(f"| {column} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences_table(differences: dict[str, dict[str, tuple[float, float, float]]], baseline: str = "sft",
                      metrics: tuple[str, ...] = tuple(INTERVAL_METRICS)) -> str:
    """A markdown table of paired differences from ``baseline``: ``+0.050 [+0.01, +0.09]`` per policy and metric."""
    names = list(differences)
    lines = [f"| Δ vs {baseline.upper()} | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in metrics:
        if not any(metric in d for d in differences.values()):
            continue
        cells = [f"{d[metric][0]:+.3f} [{d[metric][1]:+.2f}, {d[metric][2]:+.2f}]" if metric in d else "n/a"
                 for d in differences.values()]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_kl(metrics_csv: Path) -> dict[str, float]:
    """The PPO run's KL to the SFT policy per reply, from its ``metrics.csv``: ``kl`` (the words, nats per reply) and
    ``item_kl`` (the item distribution at each recommendation, with item groups) of the last iteration, and the largest
    ``kl`` of any iteration. Empty when the file or the columns are missing."""
    import csv

    if not metrics_csv.is_file():
        return {}
    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    out: dict[str, float] = {}
    for key in ("kl", "item_kl"):
        values = [float(row[f"train/{key}"]) for row in rows if row.get(f"train/{key}")]
        if values:
            out[key] = values[-1]
            out[f"max_{key}"] = max(values)
    return out


def report_tables(report: dict) -> str:
    """The comparison table of a pipeline report, then its paired differences from SFT and those of the trained
    policies from popularity (when there are any), then PPO's KL to the SFT policy."""
    table = comparison_table(report["results"], intervals=report.get("intervals"))
    for baseline in ("sft", "popularity"):
        if report.get(f"differences_vs_{baseline}"):
            table += "\n\n" + differences_table(report[f"differences_vs_{baseline}"], baseline)
    kl = report.get("ppo_kl") or {}
    if "kl" in kl:
        table += (f"\n\nPPO's KL to the SFT policy per reply (training, last iteration): {kl['kl']:.3f} nats over the "
                  f"words (largest {kl['max_kl']:.3f})")
        if "item_kl" in kl:
            table += f", {kl['item_kl']:.3f} over the item distribution at a recommendation (largest {kl['max_item_kl']:.3f})"
    return table


def pipeline(dataset: str = "synthetic", out: str | Path | None = None, configs: str | Path | None = None,
             eval_episodes: int = 200, eval_max_turns: int = 2, eval_max_new_tokens: int = 40,
             extra: list[str] | None = None, stage_args: dict[str, list[str]] | None = None,
             base_episodes: int = 0) -> dict:
    """Runs the chain and returns ``{"results": {policy: metrics}, "intervals": {policy: {metric: [mean, lo, hi]}},
    "differences_vs_sft": {policy: {metric: [mean, lo, hi]}}, "differences_vs_popularity": {"sft" | "rlhf": {...}},
    "episodes": n, "seconds": {step: s},
    "checkpoints": {...}}``.

    ``extra`` goes to every stage, ``stage_args[stage]`` to the fit of ``sft``, ``reward`` or ``ppo`` only. The base
    model is tested on the ranking and on ``base_episodes`` episodes (0: none; its replies never recommend through the
    slot it has not learned, so its conversation costs the most and says the least)."""
    configs = Path(configs or Path("configs") / dataset)
    missing = [str(configs / f"{s}.yaml") for s in STAGES if not (configs / f"{s}.yaml").is_file()]
    if missing:
        raise FileNotFoundError(f"crslight pipeline: missing config(s) {', '.join(missing)} (run it from the "
                                "repository root, or pass --configs DIR holding sft.yaml, reward.yaml and ppo.yaml)")
    out = Path(out or Path("runs") / "pipeline" / dataset)
    out.mkdir(parents=True, exist_ok=True)
    extra = list(extra or [])
    stage_args = {stage: list((stage_args or {}).get(stage) or []) for stage in STAGES}
    evaluation = [f"--model.init_args.evaluation.episodes={eval_episodes}",
                  f"--model.init_args.evaluation.max_turns={eval_max_turns}",
                  f"--model.init_args.evaluation.max_new_tokens={eval_max_new_tokens}"]
    timed = Steps("pipeline")
    seconds = timed.seconds
    ckpt: dict[str, Path] = {}

    no_validation = ["--trainer.limit_val_batches=0"]  # each policy is judged by the tests below instead
    ckpt["sft"] = timed("fit sft", _fit, configs / "sft.yaml", out, "sft", [*no_validation, *extra, *stage_args["sft"]])
    ckpt["reward"] = timed("fit reward", _fit, configs / "reward.yaml", out, "reward", [*extra, *stage_args["reward"]])
    policy_sources = [f"--model.init_from={ckpt['sft']}", f"--model.reward_model={ckpt['reward']}"]
    ckpt["ppo"] = timed("fit ppo", _fit, configs / "ppo.yaml", out, "ppo",
                        [*policy_sources, *no_validation, *extra, *stage_args["ppo"]])
    evaluation.append(f"--model.init_args.evaluation.reward_model={ckpt['reward']}")  # one R_phi judges all three
    runs = {
        "base": timed("test base", _test, configs / "sft.yaml", out, "test_base",
                      [*evaluation, f"--model.init_args.evaluation.episodes={min(base_episodes, eval_episodes)}",
                       *extra]),
        "sft": timed("test sft", _test, configs / "sft.yaml", out, "test_sft",
                     [f"--ckpt_path={ckpt['sft']}", *evaluation, *extra]),
        "rlhf": timed("test rlhf", _test, configs / "ppo.yaml", out, "test_rlhf",
                      [f"--ckpt_path={ckpt['ppo']}", *policy_sources, *evaluation, *extra]),
    }
    if eval_episodes > 0:  # the reference policies on the SFT test's split and episodes
        datamodule = runs["sft"].datamodule
        references = ["popularity", "oracle"] if datamodule.corpus("test").name == "synthetic" else ["popularity"]
        for name in references:
            runs[name] = timed(f"test {name}", _reference, name, datamodule, out, eval_episodes, eval_max_turns,
                               str(ckpt["reward"]))
    records = {name: run.records for name, run in runs.items()}
    intervals, differences = paired_intervals(records)
    # the trained policies against the reference every recommender must beat
    vs_popularity = {policy: d for policy, d in paired_intervals(records, "popularity")[1].items()
                     if policy in ("sft", "rlhf")}
    seconds["total"] = round(sum(seconds.values()), 1)
    report = {"dataset": dataset, "results": {name: run.metrics for name, run in runs.items()},
              "intervals": intervals, "differences_vs_sft": differences,
              "differences_vs_popularity": vs_popularity, "episodes": len(runs["sft"].records),
              "seconds": seconds, "checkpoints": {k: str(v) for k, v in ckpt.items()},
              "ppo_kl": training_kl(ckpt["ppo"].parent.parent / "metrics.csv")}
    (out / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "comparison.md").write_text(report_tables(report) + "\n")
    return report


def configure_parser(parser) -> None:
    """Adds ``crslight pipeline``'s arguments to ``parser``."""
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "redial", "opendialkg", "logs"],
                        help="the configs/DATASET folder to run (logs: your own, docs/logs.md)")
    parser.add_argument("--configs", default=None, help="folder with sft.yaml, reward.yaml, ppo.yaml "
                                                        "(default: configs/DATASET)")
    parser.add_argument("--out", default=None, help="where the runs go (default: runs/pipeline/DATASET)")
    parser.add_argument("--eval-episodes", type=int, default=200,
                        help="simulator episodes per policy test (the same episodes for every policy)")
    parser.add_argument("--base-episodes", type=int, default=0,
                        help="simulator episodes of the base model's test (0: its ranking only)")
    parser.add_argument("--eval-max-turns", type=int, default=2)
    parser.add_argument("--eval-max-new-tokens", type=int, default=40)
    for stage in STAGES:
        parser.add_argument(f"--{stage}", default="", metavar="ARGS",
                            help=f"arguments for the {stage} fit only, after '=': --{stage}=\"--trainer.max_steps=100\"")
    parser.add_argument("overrides", nargs="*", default=[], help="after --: --x.y=v given to every stage")


def run(args) -> int:
    """Runs ``crslight pipeline`` on parsed arguments and prints the tables. Returns the exit code."""
    report = pipeline(args.dataset, args.out, args.configs, args.eval_episodes, args.eval_max_turns,
                      args.eval_max_new_tokens, args.overrides,
                      {stage: shlex.split(getattr(args, stage)) for stage in STAGES}, args.base_episodes)
    out = Path(args.out or Path("runs") / "pipeline" / args.dataset)
    print(f"\n{args.dataset}: base (zero-shot) / SFT / RLHF (SFT + PPO) and references, test split, "
          f"{report['episodes']} paired episodes, 95% bootstrap intervals ({report['seconds']['total'] / 60:.1f} min "
          "in all)\n")
    print(report_tables(report))
    print(f"\nwritten: {out / 'comparison.json'}, {out / 'comparison.md'}")
    return 0

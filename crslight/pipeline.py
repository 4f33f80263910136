"""The whole method in one command: SFT → reward model → PPO → test of the base, SFT and RLHF policies.

``crslight pipeline --dataset synthetic`` runs, in one process, exactly the stage commands a user would type::

    crslight fit  -c configs/D/sft.yaml                       # the supervised baseline and PPO's warm start
    crslight fit  -c configs/D/reward.yaml                    # R_phi from the implicit-signal weak labels
    crslight fit  -c configs/D/ppo.yaml --model.init_from SFT --model.reward_model R_PHI
    crslight test -c configs/D/sft.yaml                       # the base model, zero-shot (no checkpoint)
    crslight test -c configs/D/sft.yaml --ckpt_path SFT
    crslight test -c configs/D/ppo.yaml --ckpt_path PPO       # SFT + PPO: ours

with every run's logs under ``--out`` (``OUT/<stage>/version_N``), and then prints the base / SFT / RLHF comparison of
the three ``test_metrics.json`` files (also written to ``OUT/comparison.json`` and ``OUT/comparison.md``). The three
tests share one evaluation setting (``--eval-episodes``, ``--eval-max-turns``, ``--eval-max-new-tokens``) and one
judge, the R_phi just trained (``reward``: its mean score of the test episodes' replies), so the columns compare. Extra ``--x.y=v`` arguments after ``--`` go to every stage (e.g.
``-- --trainer.precision=32``); ``--sft``, ``--reward`` and ``--ppo`` take a quoted string of arguments for one
stage's fit (``--sft="--trainer.max_steps=200"``, with the ``=``).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path

STAGES = ("sft", "reward", "ppo")
POLICIES = ("base", "sft", "rlhf")
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


def _test(config: Path, out: Path, name: str, extra: list[str]) -> dict[str, float]:
    from crslight.lightning_cli import run_dir

    cli = _run("test", config, out, name, extra)
    metrics = json.loads((run_dir(cli.trainer) / "test_metrics.json").read_text())
    return {k.removeprefix("test/"): v for k, v in metrics.items()}


def comparison_table(results: dict[str, dict[str, float]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A markdown table: one row per metric, one column per policy (``results[policy][metric]``)."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for column in columns:
        if not any(column in r for r in results.values()):
            continue
        cells = []
        for name in names:
            value = results[name].get(column)
            cells.append("n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}")
        lines.append(f"| {column} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pipeline(dataset: str = "synthetic", out: str | Path | None = None, configs: str | Path | None = None,
             eval_episodes: int = 32, eval_max_turns: int = 2, eval_max_new_tokens: int = 40,
             extra: list[str] | None = None, stage_args: dict[str, list[str]] | None = None) -> dict:
    """Runs the chain and returns ``{"results": {policy: metrics}, "seconds": {step: s}, "checkpoints": {...}}``.

    ``extra`` goes to every stage, ``stage_args[stage]`` to the fit of ``sft``, ``reward`` or ``ppo`` only."""
    configs = Path(configs or Path("configs") / dataset)
    missing = [str(configs / f"{s}.yaml") for s in STAGES if not (configs / f"{s}.yaml").is_file()]
    if missing:
        raise FileNotFoundError(f"crslight pipeline: missing config(s) {', '.join(missing)} (run it from the "
                                "repository root, or pass --configs DIR holding sft.yaml, reward.yaml and ppo.yaml)")
    out = Path(out or Path("runs") / "pipeline" / dataset)
    out.mkdir(parents=True, exist_ok=True)
    extra = list(extra or [])
    stage_args = {stage: list((stage_args or {}).get(stage) or []) for stage in STAGES}
    evaluation = [f"--model.eval_episodes={eval_episodes}", f"--model.eval_max_turns={eval_max_turns}",
                  f"--model.eval_max_new_tokens={eval_max_new_tokens}"]
    seconds: dict[str, float] = {}
    ckpt: dict[str, Path] = {}

    def timed(step: str, fn, *args):
        start = time.time()
        result = fn(*args)
        seconds[step] = round(time.time() - start, 1)
        print(f"[crslight pipeline] {step}: {seconds[step]:.0f} s", flush=True)
        return result

    no_validation = ["--trainer.limit_val_batches=0"]  # each policy is judged by the tests below instead
    ckpt["sft"] = timed("fit sft", _fit, configs / "sft.yaml", out, "sft", [*no_validation, *extra, *stage_args["sft"]])
    ckpt["reward"] = timed("fit reward", _fit, configs / "reward.yaml", out, "reward", [*extra, *stage_args["reward"]])
    policy_sources = [f"--model.init_from={ckpt['sft']}", f"--model.reward_model={ckpt['reward']}"]
    ckpt["ppo"] = timed("fit ppo", _fit, configs / "ppo.yaml", out, "ppo",
                        [*policy_sources, *no_validation, *extra, *stage_args["ppo"]])
    evaluation.append(f"--model.eval_reward_model={ckpt['reward']}")  # one R_phi judges all three policies
    results = {
        "base": timed("test base", _test, configs / "sft.yaml", out, "test_base", [*evaluation, *extra]),
        "sft": timed("test sft", _test, configs / "sft.yaml", out, "test_sft",
                     [f"--ckpt_path={ckpt['sft']}", *evaluation, *extra]),
        "rlhf": timed("test rlhf", _test, configs / "ppo.yaml", out, "test_rlhf",
                      [f"--ckpt_path={ckpt['ppo']}", *policy_sources, *evaluation, *extra]),
    }
    seconds["total"] = round(sum(seconds.values()), 1)
    report = {"dataset": dataset, "results": results, "seconds": seconds,
              "checkpoints": {k: str(v) for k, v in ckpt.items()}}
    (out / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    table = comparison_table(results)
    (out / "comparison.md").write_text(table + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crslight pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "redial", "opendialkg"])
    parser.add_argument("--configs", default=None, help="folder with sft.yaml, reward.yaml, ppo.yaml "
                                                        "(default: configs/DATASET)")
    parser.add_argument("--out", default=None, help="where the runs go (default: runs/pipeline/DATASET)")
    parser.add_argument("--eval-episodes", type=int, default=32, help="simulator episodes per policy test")
    parser.add_argument("--eval-max-turns", type=int, default=2)
    parser.add_argument("--eval-max-new-tokens", type=int, default=40)
    for stage in STAGES:
        parser.add_argument(f"--{stage}", default="", metavar="ARGS",
                            help=f"arguments for the {stage} fit only, after '=': --{stage}=\"--trainer.max_steps=100\"")
    parser.add_argument("overrides", nargs="*", help="after --: --x.y=v given to every stage")
    args = parser.parse_args(argv)
    report = pipeline(args.dataset, args.out, args.configs, args.eval_episodes, args.eval_max_turns,
                      args.eval_max_new_tokens, args.overrides,
                      {stage: shlex.split(getattr(args, stage)) for stage in STAGES})
    out = Path(args.out or Path("runs") / "pipeline" / args.dataset)
    print(f"\n{args.dataset}: base (zero-shot) / SFT / RLHF (SFT + PPO), test split "
          f"({report['seconds']['total'] / 60:.1f} min in all)\n")
    print(comparison_table(report["results"]))
    print(f"\nwritten: {out / 'comparison.json'}, {out / 'comparison.md'}")
    return 0

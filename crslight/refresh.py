"""Refresh: R_phi and the policy brought up to date on new interaction logs, behind a gate.

``crslight refresh --logs NEW_DIR`` runs, in one process, the stage commands a team would type after a week of new
logs (docs/logs.md)::

    crslight fit  -c configs/logs/reward.yaml --data.root NEW --model.init_from CURRENT_R_PHI     # warm start
    crslight fit  -c configs/logs/ppo.yaml    --data.root NEW --model.init_from CURRENT_POLICY \\
                                              --model.reward_model NEW_R_PHI                     # a short PPO
    crslight test ... CURRENT_POLICY    crslight test ... CANDIDATE                              # the gate

The gate tests the current policy and the candidate on the same held-out conversations (the new logs' test split,
the same simulated users with the same seeds, both judged by the new R_phi) and takes the paired bootstrap interval of
the candidate's difference on the gate metric (``--gate-metric``, acceptance by default). The candidate is promoted
unless it is worse beyond the interval: unless the whole 95% interval of ``candidate - current`` lies below zero.
Promoted, the candidate and the new R_phi become the current pair; otherwise the current pair stays, and the new
R_phi with it stays unused.

Every refresh writes into its own folder ``OUT/vNNN`` (``reward/``, ``ppo/``, ``test_current/``,
``test_candidate/``, and ``refresh.json`` / ``refresh.md`` with the decision and its figures); nothing earlier is
touched. The current pair is the newest version's ``current`` (or ``--policy`` / ``--reward`` for the first refresh,
e.g. ``crslight pipeline --dataset logs``'s checkpoints).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from crslight.errors import DataError
from crslight.pipeline import (
    INTERVAL_METRICS,
    Steps,
    _fit,
    _test,
    comparison_table,
    differences_table,
    paired_intervals,
)

#: the configs a refresh reads from ``--configs``
CONFIGS = ("reward.yaml", "ppo.yaml", "sft.yaml")
VERSION = re.compile(r"^v(\d{3,})$")


def versions(out: Path) -> list[Path]:
    """The refresh folders under ``out`` (``v001``, ``v002``, ...), oldest first."""
    found = [p for p in out.iterdir() if p.is_dir() and VERSION.match(p.name)] if out.is_dir() else []
    return sorted(found, key=lambda p: int(VERSION.match(p.name).group(1)))


def current_pair(out: Path) -> dict[str, str] | None:
    """The current policy and R_phi: the newest finished refresh's ``current`` (None before the first)."""
    for folder in reversed(versions(out)):
        record = folder / "refresh.json"
        if record.is_file():
            return json.loads(record.read_text())["current"]
    return None


def _policy_kind(checkpoint: str) -> dict:
    """``{"stage": "ppo" | "sft", ...}`` of a policy checkpoint (a ``.ckpt`` or a run folder), with a PPO policy's
    starting point and R_phi as it was trained."""
    from crslight.guards import load_weights
    from crslight.models.loading import find_checkpoint

    path = find_checkpoint(checkpoint)
    if path is None:
        raise DataError(checkpoint, "not a crslight policy checkpoint or run folder (expected a .ckpt of "
                                    "crslight fit with an SFT or PPO config)")
    hparams = load_weights(path).get("hyper_parameters") or {}
    if "kl_coef" in hparams:
        return {"stage": "ppo", "checkpoint": str(path), "init_from": hparams.get("init_from"),
                "reward_model": hparams.get("reward_model")}
    if "item_head_epochs" in hparams or "ranking_loss_weight" in hparams:
        return {"stage": "sft", "checkpoint": str(path)}
    raise DataError(path, "not a policy checkpoint (an SFT or PPO run's .ckpt); is it an R_phi?")


def refresh(logs: str | Path, out: str | Path = "runs/refresh", configs: str | Path = "configs/logs",
            policy: str | None = None, reward: str | None = None, eval_episodes: int = 200, eval_max_turns: int = 2,
            eval_max_new_tokens: int = 32, gate_metric: str = "acceptance", extra: list[str] | None = None,
            stage_args: dict[str, list[str]] | None = None) -> dict:
    """One refresh (module docstring); returns what ``refresh.json`` holds.

    Args:
        logs: the new logs (a folder in crslight's log format).
        out: the folder of the refresh versions.
        configs: the folder holding ``reward.yaml``, ``ppo.yaml`` and ``sft.yaml`` (the data class reads ``root``).
        policy: the current policy checkpoint (default: the newest version's current one).
        reward: the current R_phi checkpoint (default: the newest version's current one).
        eval_episodes: simulated episodes of each gate test (the same users for both policies).
        eval_max_turns: replies per gate episode at most.
        eval_max_new_tokens: reply length in the gate.
        gate_metric: ``acceptance``, ``satisfaction`` or ``reward`` (the new R_phi's mean per reply).
        extra: ``--x.y=v`` arguments for every stage.
        stage_args: arguments for the ``reward`` or ``ppo`` fit only.

    Raises:
        DataError: no current policy or R_phi, a missing config, or logs that are not a folder.
    """
    logs, out, configs = Path(logs), Path(out), Path(configs)
    if gate_metric not in INTERVAL_METRICS:
        raise ValueError(f"--gate-metric must be one of {', '.join(INTERVAL_METRICS)}, got {gate_metric!r}")
    if not logs.exists():
        raise DataError(logs, "no such logs folder or file (crslight data validate --dataset logs --root DIR checks one)")
    for name in CONFIGS:
        if not (configs / name).is_file():
            raise DataError(configs / name, "missing: --configs needs reward.yaml, ppo.yaml and sft.yaml "
                                            "(configs/logs has them)")
    previous = current_pair(out) or {}
    policy, reward = policy or previous.get("policy"), reward or previous.get("reward")
    if not policy or not reward:
        raise DataError(out, "no current policy and R_phi: give --policy and --reward for the first refresh (e.g. "
                             "crslight pipeline --dataset logs's runs/pipeline/logs/ppo and .../reward)")
    current = _policy_kind(policy)
    done = versions(out)
    folder = out / f"v{int(VERSION.match(done[-1].name).group(1)) + 1 if done else 1:03d}"
    folder.mkdir(parents=True)
    extra = [f"--data.init_args.root={logs}", *(extra or [])]
    stage_args = {stage: list((stage_args or {}).get(stage) or []) for stage in ("reward", "ppo")}
    timed = Steps("refresh")

    new_reward = timed("fit reward", _fit, configs / "reward.yaml", folder, "reward",
                       [f"--model.init_args.init_from={reward}", *extra, *stage_args["reward"]])
    trained_with = [f"--model.init_from={current['checkpoint']}", f"--model.reward_model={new_reward}"]
    candidate = timed("fit ppo", _fit, configs / "ppo.yaml", folder, "ppo",
                      [*trained_with, "--trainer.limit_val_batches=0", *extra, *stage_args["ppo"]])
    evaluation = [f"--model.init_args.evaluation.episodes={eval_episodes}",
                  f"--model.init_args.evaluation.max_turns={eval_max_turns}",
                  f"--model.init_args.evaluation.max_new_tokens={eval_max_new_tokens}",
                  f"--model.init_args.evaluation.reward_model={new_reward}"]
    current_args = [f"--ckpt_path={current['checkpoint']}"]
    if current["stage"] == "ppo":  # as it was trained (a PPO run may start from the base model: no init_from)
        current_args += [f"--model.{key}={current[key]}" for key in ("init_from", "reward_model") if current[key]]
    runs = {
        "current": timed("test current", _test, configs / f"{current['stage']}.yaml", folder, "test_current",
                         [*current_args, *evaluation, *extra]),
        "candidate": timed("test candidate", _test, configs / "ppo.yaml", folder, "test_candidate",
                           [f"--ckpt_path={candidate}", *trained_with, *evaluation, *extra]),
    }
    intervals, differences = paired_intervals({name: run.records for name, run in runs.items()}, "current")
    if gate_metric not in differences.get("candidate", {}):
        raise DataError(configs / "ppo.yaml", f"the gate has no {gate_metric} to compare: the tests ran no simulated "
                                              "episodes (--eval-episodes must be > 0, the config needs a simulator)")
    mean, low, high = differences["candidate"][gate_metric]
    promoted = high >= 0.0
    pair = {"policy": str(candidate), "reward": str(new_reward)} if promoted else {"policy": str(policy),
                                                                                     "reward": str(reward)}
    record = {
        "version": folder.name, "logs": str(logs), "previous": {"policy": str(policy), "reward": str(reward)},
        "trained": {"reward": str(new_reward), "policy": str(candidate)},
        "gate": {"metric": gate_metric, "episodes": len(runs["current"].records), "difference": [mean, low, high],
                 "rule": "promote unless the 95% interval of candidate - current lies below 0",
                 "promoted": promoted},
        "results": {name: run.metrics for name, run in runs.items()}, "intervals": intervals,
        "differences_vs_current": differences, "current": pair, "seconds": timed.seconds,
    }
    (folder / "refresh.json").write_text(json.dumps(record, indent=2) + "\n")
    (folder / "refresh.md").write_text(report_text(record) + "\n")
    return record


def report_text(record: dict) -> str:
    """The gate's tables (current and candidate side by side, the paired difference) and its decision."""
    gate = record["gate"]
    mean, low, high = gate["difference"]
    verdict = "promoted: the candidate and the new R_phi are now current" if gate["promoted"] else \
        "kept: the candidate is worse beyond the interval; the current policy and R_phi stay"
    return "\n\n".join([
        comparison_table(record["results"], intervals=record["intervals"]),
        differences_table(record["differences_vs_current"], "current"),
        f"gate ({gate['metric']}, {gate['episodes']} paired episodes): {mean:+.3f} [{low:+.3f}, {high:+.3f}] -> "
        f"{verdict}",
    ])


def configure_parser(parser) -> None:
    """Adds ``crslight refresh``'s arguments to ``parser``."""
    parser.add_argument("--logs", required=True, help="the new logs folder (crslight's log format, docs/logs.md)")
    parser.add_argument("--out", default="runs/refresh", help="the folder of refresh versions (v001, v002, ...)")
    parser.add_argument("--configs", default="configs/logs", help="folder with reward.yaml, ppo.yaml and sft.yaml")
    parser.add_argument("--policy", default=None,
                        help="the current policy checkpoint or run folder (default: the newest version's current)")
    parser.add_argument("--reward", default=None,
                        help="the current R_phi checkpoint or run folder (default: the newest version's current)")
    parser.add_argument("--eval-episodes", type=int, default=200, help="simulated episodes of each gate test")
    parser.add_argument("--eval-max-turns", type=int, default=2)
    parser.add_argument("--eval-max-new-tokens", type=int, default=32)
    parser.add_argument("--gate-metric", default="acceptance", choices=list(INTERVAL_METRICS))
    for stage in ("reward", "ppo"):
        parser.add_argument(f"--{stage}-args", default="", metavar="ARGS",
                            help=f"arguments for the {stage} fit only, after '=': --{stage}-args=\"--trainer.max_steps=20\"")
    parser.add_argument("overrides", nargs="*", default=[], help="after --: --x.y=v given to every stage")


def run(args) -> int:
    """Runs ``crslight refresh`` on parsed arguments and prints the gate. Returns the exit code."""
    record = refresh(args.logs, args.out, args.configs, args.policy, args.reward, args.eval_episodes,
                     args.eval_max_turns, args.eval_max_new_tokens, args.gate_metric, args.overrides,
                     {stage: shlex.split(getattr(args, f"{stage}_args")) for stage in ("reward", "ppo")})
    print(f"\nrefresh {record['version']} on {record['logs']} "
          f"({sum(record['seconds'].values()) / 60:.1f} min in all)\n")
    print(report_text(record))
    print(f"\nwritten: {Path(args.out) / record['version'] / 'refresh.json'}")
    return 0

"""The ``crslight`` command.

``fit`` / ``test`` / ``validate`` / ``predict`` are LightningCLI subcommands over any stage (``SFTModule``,
``RewardModule``, ``PPOModule``) and any DataModule, named by short class name in YAML. The other commands are small
tools: ``data stats`` / ``validate`` / ``export-logs``, ``plugins``, ``simulate``, ``chat``, ``export``, ``plot``, ``compare``, ``ablate``; ``pipeline``
runs the whole method (SFT, reward model, PPO, and the test of each policy) in one command.

Plugins are imported from their entry points before anything parses, so their classes resolve by short name.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

TOOLS = ("data", "plugins", "simulate", "chat", "export", "plot", "compare", "ablate", "pipeline", "refresh")


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {value!r}")


def _command(subcommands, name: str, help: str) -> ArgumentParser:
    """A subcommand's parser: its options, plus ``-c CONFIG`` (a YAML file of them) and ``--print_config``."""
    parser = ArgumentParser(description=help)
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="a YAML file of this command's options (--print_config writes one)")
    subcommands.add_subcommand(name, parser, help=help)
    return parser


def tool_parser() -> ArgumentParser:
    """The parser of every ``crslight`` command except LightningCLI's ``fit`` / ``test`` / ``validate`` /
    ``predict`` (which are jsonargparse too): one flag style, ``-c`` and ``--print_config`` everywhere."""
    parser = ArgumentParser(prog="crslight", description="RLHF from implicit feedback for recommenders.",
                            epilog="Training and testing: crslight {fit,validate,test,predict} -c CONFIG, the "
                            "LightningCLI subcommands (crslight fit --help).")
    sub = parser.add_subcommands(dest="command", required=True)

    data = ArgumentParser(description="inspect a data source")
    sub.add_subcommand("data", data, help="inspect a data source")
    actions = data.add_subcommands(dest="action", required=True)
    stats = _command(actions, "stats", "print one JSON object with a split's counts")
    validate = _command(actions, "validate", "check a source without training: every problem with file, line and "
                        "field; exit code 2 when the data cannot be used")
    for command in (stats, validate):
        command.add_argument("--dataset", required=True, help="redial, opendialkg, synthetic, logs, or a dataset an "
                             "installed plugin registers (crslight plugins lists them)")
        command.add_argument("--root", default=None, help="folder of the official download, or for logs a folder of "
                             "interaction logs or one conversations file (docs/logs.md); not for synthetic")
        command.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
        command.add_argument("--n-dialogues", type=int, default=1000, help="synthetic: train dialogues")
        command.add_argument("--catalogue", default="recommended", choices=["recommended", "entities"],
                             help="opendialkg: the entities recommender turns mention (published convention) or all "
                             "entities")
    stats.add_argument("--split", default="train", choices=["train", "valid", "test"])
    stats.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows and report how many")
    export_logs = _command(actions, "export-logs", "write a source in the interaction-log format (docs/logs.md)")
    export_logs.add_argument("--dataset", required=True, choices=["synthetic"])
    export_logs.add_argument("--out", required=True, help="a new (or empty) folder")
    export_logs.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    export_logs.add_argument("--n-dialogues", type=int, default=1000, help="synthetic: train dialogues")
    export_logs.add_argument("--n-items", type=int, default=400, help="synthetic: catalogue size")
    export_logs.add_argument("--n-eval-dialogues", type=int, default=None,
                             help="synthetic: valid and test dialogues (default: a fifth of --n-dialogues)")

    plugins = _command(sub, "plugins", "list registered signals and metrics with their packages")
    plugins.add_argument("--json", action="store_true")

    sim = _command(sub, "simulate", "run episodes against a user simulator and print a JSON summary")
    sim.add_argument("--dataset", default="synthetic", choices=["redial", "opendialkg", "synthetic", "logs"])
    sim.add_argument("--root", default=None, help="the dataset's folder; for logs, the logs folder (docs/logs.md)")
    sim.add_argument("--split", default="test", choices=["train", "valid", "test"])
    sim.add_argument("--policy", default="popularity",
                     help="random, popularity, popularity-catalogue, oracle (synthetic), or a model folder / alias")
    sim.add_argument("--episodes", type=int, default=200)
    sim.add_argument("--max-turns", type=int, default=3)
    sim.add_argument("--seed", type=int, default=0)

    chat = _command(sub, "chat", "talk to a trained recommender in the terminal")
    chat.add_argument("--policy", required=True, help="a transformers folder (see `crslight export`) or alias")
    chat.add_argument("--dataset", default="synthetic", choices=["redial", "opendialkg", "synthetic", "logs"])
    chat.add_argument("--root", default=None, help="catalogue source for linking titles to ids")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 decodes greedily")
    chat.add_argument("--seed", type=int, default=None, help="seed each reply's sampling")

    export = _command(sub, "export", "write a checkpoint's policy as a transformers folder")
    export.add_argument("--ckpt", required=True)
    export.add_argument("--out", required=True)

    from crslight.compare import configure_parser as configure_compare
    from crslight.pipeline import configure_parser as configure_pipeline
    from crslight.plots import configure_parser as configure_plot  # light: matplotlib is imported when drawing
    from crslight.refresh import configure_parser as configure_refresh

    configure_plot(_command(sub, "plot", "draw training curves (CSVLogger runs) and results bar charts as PNGs"))
    configure_compare(_command(sub, "compare", "tests side by side, with paired bootstrap intervals"))
    _ablate_arguments(_command(sub, "ablate", "R_phi's held-out accuracy with each signal removed from the weak label"))
    configure_pipeline(_command(sub, "pipeline", "the whole method: SFT, R_phi, PPO, then the test of every policy "
                                "on the same simulated users"))
    configure_refresh(_command(sub, "refresh", "new logs: R_phi warm-started, a short PPO, and a gate that promotes "
                               "the new policy unless it is worse beyond the interval"))
    return parser


def _ablate_arguments(parser) -> None:
    """``crslight ablate CONFIG [--max-steps N] [--split S] [--signals A B] [--out F] [-- --key=value ...]``: here,
    not in crslight/ablation.py, whose Lightning import every other command would pay for at parse time."""
    parser.add_argument("reward_config", help="the R_phi config to ablate (configs/<dataset>/reward.yaml)")
    parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps per variant")
    parser.add_argument("--split", default="valid", choices=["valid", "test"], help="held-out split evaluated")
    parser.add_argument("--signals", nargs="*", default=None, help="only ablate these signals (class names)")
    parser.add_argument("--limit-eval-batches", type=float, default=1.0, help="a fraction (<= 1) or a count")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="config overrides after --, e.g. -- --model.backbone=tiny")


def _ablate(args) -> int:
    """Runs ``crslight ablate`` on parsed arguments; prints the JSON report. Returns the exit code."""
    from crslight.ablation import ablate

    limit = args.limit_eval_batches if args.limit_eval_batches <= 1 else int(args.limit_eval_batches)
    report = ablate(args.reward_config, args.max_steps, args.split, args.signals, args.overrides, limit)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def run_tool(argv: list[str]) -> int:
    parsed = tool_parser().parse_args(argv)
    command, args = parsed.command, parsed[parsed.command]
    if command == "data":
        from crslight.data import DataError, load_corpus

        action, args = args.action, args[args.action]
        if action != "stats":
            return _data_tool(action, args)
        try:
            corpus = load_corpus(args.dataset, args.root, args.split, skip_bad_rows=args.skip_bad_rows,
                                 seed=args.seed, n_dialogues=args.n_dialogues, catalogue=args.catalogue)
        except (DataError, ValueError) as e:  # a bad file, or an unknown dataset or option
            print(f"crslight data stats: {e}", file=sys.stderr)
            return 2
        print(json.dumps(corpus.stats(), default=_json_default))
        return 0
    if command == "plugins":
        from crslight.plugins import plugins_listing

        print(plugins_listing(as_json=args.json))
        return 0
    if command == "simulate":
        from crslight.simulator.cli import simulate

        print(json.dumps(simulate(dataset=args.dataset, root=args.root, policy=args.policy, episodes=args.episodes,
                                  max_turns=args.max_turns, seed=args.seed, split=args.split)))
        return 0
    if command == "chat":
        from crslight.chat import chat

        return chat(args.policy, dataset=args.dataset, root=args.root, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, seed=args.seed)
    if command == "export":
        from crslight.export import export
        from crslight.modules.policy import NotAPolicyCheckpoint

        try:
            print(export(Path(args.ckpt), Path(args.out)))
        except (NotAPolicyCheckpoint, FileNotFoundError) as error:  # an R_phi's checkpoint, an empty run folder
            print(f"crslight export: {error}", file=sys.stderr)
            return 2
        return 0
    if command == "plot":
        from crslight.plots import run as run_plot

        return run_plot(args)
    if command == "compare":
        from crslight.compare import CompareError, compare, report_text

        try:
            report = compare(args.runs, names=args.names, baseline=args.baseline, n_resamples=args.resamples,
                             seed=args.seed)
        except CompareError as error:
            print(f"crslight compare: {error}", file=sys.stderr)
            return 2
        print(report_text(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        return 0
    if command == "ablate":  # R_phi with each signal removed from the label (crslight/ablation.py)
        return _ablate(args)
    if command == "pipeline":  # SFT -> reward -> PPO -> test of base / SFT / RLHF (crslight/pipeline.py)
        from crslight.pipeline import run as run_pipeline

        return run_pipeline(args)
    if command == "refresh":  # new logs: R_phi, PPO, gate (crslight/refresh.py)
        from crslight.refresh import run as run_refresh

        return run_refresh(args)
    raise AssertionError(command)


def _data_tool(action: str, args) -> int:
    """``data validate`` and ``data export-logs``."""
    from crslight.data import DataError

    if action == "validate":
        from crslight.data.validate import validate

        options = {"seed": args.seed, "n_dialogues": args.n_dialogues, "catalogue": args.catalogue}
        result = validate(args.dataset, args.root, **options)
        *problems, verdict = result.lines()
        print("\n".join(problems + [json.dumps(result.counts, default=_json_default), verdict]))
        return 0 if result.usable else 2
    from crslight.data.export_logs import export_synthetic

    try:
        counts = export_synthetic(args.out, seed=args.seed, n_dialogues=args.n_dialogues, n_items=args.n_items,
                                  n_eval_dialogues=args.n_eval_dialogues)
    except DataError as e:
        print(f"crslight data export-logs: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the crslight command itself (not a call from Python): reuse freed memory, docs/benchmarks.md
        from crslight.models.memory import keep_heap

        keep_heap()
    args = sys.argv[1:] if argv is None else list(argv)
    from crslight.errors import DataError
    from crslight.guards import NonFiniteError

    try:
        return _dispatch(args, argv)
    except (DataError, NonFiniteError, pickle.UnpicklingError) as error:  # the cause, not a traceback
        if os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
            raise
        print(f"crslight: error: {error_message(error)} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2


#: set to 1 to see the traceback of an error that crslight otherwise reports in one message
DEBUG_ENV = "CRSLIGHT_DEBUG"


def error_message(error: BaseException) -> str:
    """The one-line report of an error that ends a command with exit code 2: bad input, a run that cannot go on, or
    a checkpoint or cache file that a weights-only load refused (it holds Python objects beyond tensors)."""
    if isinstance(error, pickle.UnpicklingError):
        return (f"{error}: this file holds Python objects beyond weights, and crslight loads weights only "
                "(torch.load weights_only=True); load only checkpoints and caches that you or crslight wrote")
    return str(error)


def _dispatch(args: list[str], argv: list[str] | None) -> int:
    if not args or args[0] in TOOLS or args[0] in ("-h", "--help"):
        return run_tool(args)
    from crslight.lightning_cli import run_lightning_cli

    run_lightning_cli(argv)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())

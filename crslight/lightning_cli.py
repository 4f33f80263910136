"""LightningCLI for every stage: ``crslight fit|validate|test|predict -c CONFIG [--x.y=v ...]``.

Models and DataModules are chosen in YAML by class name (``model: {class_path: PPOModule, init_args: ...}``);
plugins are imported first so that their classes resolve by short name too. ``test`` also writes
``test_metrics.json`` (a flat ``{"test/recall@10": ...}``) into the run's log folder, and, for a policy tested with
simulator episodes, ``test_episodes.jsonl`` (one record per episode, ``crslight.modules.evaluation.episode_record``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import torch
from jsonargparse import set_docstring_parse_options
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

from crslight.guards import naming_refused_file
from crslight.models.lora import RETIRED_LORA_ARGUMENTS, upgrade_lora_hparams

log = logging.getLogger(__name__)


def _import_parts() -> None:
    """Imports everything a config may name by short class name: crslight's own classes, then the plugins."""
    import crslight.data.datamodules  # noqa: F401

    try:
        import crslight.modules  # noqa: F401
    except ImportError as e:  # a stage whose dependencies are missing must not break the others
        log.warning("crslight.modules could not be imported: %s", e)
    try:
        from crslight.plugins import load_plugins
    except ImportError:
        return
    load_plugins()


def run_dir(trainer: Trainer) -> Path:
    """The folder of this run's logs (the logger's version folder), else the trainer's root dir."""
    folder = trainer.log_dir or trainer.default_root_dir
    return Path(folder)


def write_test_metrics(trainer: Trainer) -> Path:
    """Writes the trainer's ``test/...`` metrics as flat JSON (``NaN`` as ``null``) into the run's log folder."""
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        if not key.startswith("test/"):
            continue
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        metrics[key] = None if math.isnan(value) else value
    out = run_dir(trainer) / "test_metrics.json"
    if trainer.is_global_zero:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")
        print(f"test metrics written to {out}")
    return out


def write_test_episodes(trainer: Trainer, records: list[dict]) -> Path:
    """Writes the test's per-episode records (``crslight.modules.evaluation.episode_record``, every rank's, by episode
    index) as ``test_episodes.jsonl`` beside ``test_metrics.json``; rank 0 writes."""
    from crslight.modules.evaluation import save_episode_records

    out = run_dir(trainer) / "test_episodes.jsonl"
    if trainer.is_global_zero:
        save_episode_records(out, records)
        print(f"test episodes written to {out}")
    return out


def constructor_error(error: BaseException) -> tuple[str, BaseException] | None:
    """``(class name, error)`` when the innermost cause of ``error`` was raised inside a class's ``__init__`` (a
    model, DataModule or signal rejecting its arguments), else ``None``."""
    while error.__cause__ is not None:
        error = error.__cause__
    owner = None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "__init__" and "self" in tb.tb_frame.f_locals:
            owner = type(tb.tb_frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return (owner, error) if owner is not None else None


def cpu_precision(precision, accelerator) -> object:
    """``precision`` for this machine: bf16 autocast (``bf16-mixed``, ``bf16-true``) on a CPU without native bf16
    instructions (AVX512-BF16 or AMX) becomes ``32-true``, with a message, because such CPUs emulate bf16 matrix
    products several times slower than float32 ones (``python benchmarks/decoding.py`` prints the ratio);
    ``CRSLIGHT_CPU_BF16=keep`` keeps it. Any other precision, or a run on a GPU, is unchanged."""
    import os

    from crslight.models.encoder import native_bf16

    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if (str(precision).startswith("bf16") and on_cpu and not native_bf16("cpu")
            and os.environ.get("CRSLIGHT_CPU_BF16") != "keep"):
        print(f"crslight: trainer.precision {precision} -> 32-true: this CPU has no native bf16 instructions, so "
              "float32 is several times faster (CRSLIGHT_CPU_BF16=keep keeps bf16)", file=sys.stderr)
        return "32-true"
    return precision


def policy_tokenizer(model: str, tokenizer: str | None) -> str:
    """``data.init_args.tokenizer`` of a config: the policy's, ``model.init_args.model`` (the DataModule writes the token
    ids the policy reads, so the two never differ). A config that also states the DataModule's tokenizer may name the
    same model or leave the default; any other name ends the command with a message naming both options."""
    from crslight.data.datamodules import DEFAULT_TOKENIZER

    if tokenizer not in (None, model, DEFAULT_TOKENIZER):
        raise ValueError(f"data.init_args.tokenizer ({tokenizer}) follows model.init_args.model ({model}): leave it "
                         "out; the policy and its DataModule share one tokenizer, the one in the model's folder "
                         "(docs/configs.md)")
    return model


def drop_retired_arguments(model_config) -> None:
    """Lets ``--ckpt_path`` read a checkpoint written before arguments were retired (its hyper-parameters arrive as
    ``dict_kwargs`` the class no longer takes): R_phi's ``bf16`` and the flat ``eval_*`` settings are dropped
    (``trainer.precision`` and the command's ``evaluation`` group decide), the flat
    ``lora_r`` / ``lora_alpha`` / ``lora_dropout`` / ``lora_target_modules`` become the ``lora`` group, and PPO's
    ``simulator_args`` become the named simulator's ``init_args``."""
    from crslight.modules.evaluation import RETIRED_EVAL_ARGUMENTS

    extra = model_config.get("dict_kwargs") if model_config is not None else None
    if not extra:
        return
    extra.pop("bf16", None)
    for key in RETIRED_EVAL_ARGUMENTS:  # test-time settings: the command's own evaluation group applies
        extra.pop(key, None)
    retired = {key: extra.pop(key) for key in RETIRED_LORA_ARGUMENTS if key in extra}
    if retired and model_config.get("init_args.lora") is True:  # lora: true, lora_r: 8 -> lora: {r: 8, ...}
        model_config["init_args"]["lora"] = upgrade_lora_hparams({"lora": True, **retired})["lora"]
    simulator_args = extra.pop("simulator_args", None)
    simulator = model_config.get("init_args.simulator")
    if simulator_args and simulator is not None and not isinstance(simulator, str):
        for key, value in simulator_args.items():
            simulator["init_args"][key] = value


def checked_checkpoint(ckpt_path: str) -> Path | str:
    """``--ckpt_path``'s checkpoint file (a run folder stands for its newest ``.ckpt``); a path that is missing, an
    empty folder, or a file that is not a whole PyTorch checkpoint (text, random bytes, a truncated copy) ends the
    command here with a message and exit code 2, instead of a traceback from deep inside ``torch.load``."""
    import zipfile

    from crslight.models.loading import find_checkpoint

    def fail(why: str) -> None:
        print(f"error: --ckpt_path {ckpt_path}: {why}", file=sys.stderr)
        sys.exit(2)

    if "://" in str(ckpt_path):  # a remote checkpoint (fsspec): Lightning reads it
        return ckpt_path
    path = Path(ckpt_path)
    if not path.exists():
        fail("no such file or folder")
    try:
        found = find_checkpoint(path)
    except FileNotFoundError as error:
        fail(str(error))
    if found is None:
        fail("a transformers model folder, not a training checkpoint (use it as model.init_args.init_from)")
    if not zipfile.is_zipfile(found):  # torch.save writes a zip archive; a truncated one lost its directory
        fail(f"{found} is not a complete PyTorch checkpoint (not a zip archive: truncated, or not a checkpoint)")
    return found


class CRSLightningCLI(LightningCLI):
    """LightningCLI with crslight's conventions (plugins loaded, ``test_metrics.json`` and ``test_episodes.jsonl``
    written after ``test``)."""

    def add_arguments_to_parser(self, parser) -> None:
        """``data.init_args.tokenizer`` follows ``model.init_args.model`` (:func:`policy_tokenizer`) for every stage whose
        module has a ``model`` and whose DataModule has a ``tokenizer``; elsewhere (R_phi reads text) the link is
        skipped."""
        parser.link_arguments(("model.init_args.model", "data.init_args.tokenizer"), "data.init_args.tokenizer",
                              compute_fn=policy_tokenizer, apply_on="parse")

    def instantiate_classes(self) -> None:
        """A constructor that rejects its arguments ends the command with its own message, naming the class, instead
        of jsonargparse's union-type error around two tracebacks."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            found = constructor_error(error)
            if found is None:
                raise
            owner, cause = found
            print(f"error: {owner}: {cause}", file=sys.stderr)
            sys.exit(2)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model's arguments with the checkpoint's hyperparameters (the test-time ``evaluation``
        group is not one of them, so the command's own applies). A bad ``ckpt_path`` ends the command first
        (:func:`checked_checkpoint`), the checkpoint loads weights only, the linked tokenizer follows the checkpoint's
        model, and arguments retired since the checkpoint was written are dropped or moved."""
        subcommand = self.config.get("subcommand")
        # ``--ckpt_path runs/sft/synthetic``: a run folder stands for its newest checkpoint, as ``init_from`` does
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last", "best", "hpc", "registry"):
            self.config[subcommand]["ckpt_path"] = str(checked_checkpoint(ckpt_path))
            if self.config[subcommand].get("weights_only") is None:  # weights only, whatever torch's default
                self.config[subcommand]["weights_only"] = True
        init_args = self.config[subcommand].get("model.init_args") if subcommand else None
        # the checkpoint's model may replace the config's: the linked tokenizer (policy_tokenizer) must follow it
        from crslight.data.datamodules import DEFAULT_TOKENIZER

        data = self.config[subcommand].get("data.init_args") if subcommand else None
        policy = init_args.get("model") if init_args is not None else None
        linked = policy is not None and data is not None and data.get("tokenizer") == policy
        if linked:
            data["tokenizer"] = DEFAULT_TOKENIZER
        with naming_refused_file(f"--ckpt_path {self.config[subcommand].get('ckpt_path')}" if subcommand else ""):
            super()._parse_ckpt_path()
        drop_retired_arguments(self.config[subcommand].get("model") if subcommand else None)
        model = self.config[subcommand].get("model") if subcommand else None
        if model is not None and str(model.get("class_path", "")).endswith("RewardModule") and ckpt_path:
            model["init_args"]["init_from"] = None  # the checkpoint holds every R_phi weight: no warm start to read
        data = self.config[subcommand].get("data.init_args") if subcommand else None
        if linked and data.get("tokenizer") == DEFAULT_TOKENIZER:  # no hyper-parameters read: the config's policy
            data["tokenizer"] = self.config[subcommand]["model.init_args"].get("model", policy)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None and config.get("trainer") is not None:
            trainer = config["trainer"]
            trainer["precision"] = cpu_precision(trainer.get("precision"), trainer.get("accelerator"))

    def after_test(self) -> None:
        write_test_metrics(self.trainer)
        records = getattr(getattr(self.model, "evaluator", None), "episode_records", None)
        if records:
            write_test_episodes(self.trainer, records)


def run_lightning_cli(argv: list[str] | None = None) -> CRSLightningCLI:
    set_docstring_parse_options(attribute_docstrings=True)
    _import_parts()
    return CRSLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
        auto_configure_optimizers=False,
    )

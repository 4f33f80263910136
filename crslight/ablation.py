"""Signal ablation of the reward model: retrain R_phi with each signal removed from the composite label.

``crslight ablate configs/redial/reward.yaml`` (or :func:`ablate`) trains one R_phi per variant with the config's
model and data, a small budget (``max_steps``) and the same seed: the full label, then the label without each signal
(the remaining weights kept as they are; the composite renormalises them per sample). Every variant is evaluated on the
held-out split (``valid`` by default; ``test`` when asked) twice:

- on the pairs of *its own* label — ``pairwise_accuracy``: how learnable the label is without that signal;
- on the pairs of the *full* label — ``pairwise_accuracy_full_label``, ``spearman_full_label``: how much of the full
  target the other signals still teach, which is the signal's contribution;

and against the questionnaire — ``auc_liked`` — which no label choice moves. Raw signal values are cached per signal
(:mod:`crslight.data.pairs`), so the variants only refit the normalisation and rebuild the pairs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule, Trainer

log = logging.getLogger(__name__)


def _instantiate(config_path: str | Path, overrides: list[str]):
    from jsonargparse import set_docstring_parse_options

    from crslight.lightning_cli import CRSLightningCLI, _import_parts

    set_docstring_parse_options(attribute_docstrings=True)
    _import_parts()
    return CRSLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           run=False, auto_configure_optimizers=False,
                           args=["-c", str(config_path), *overrides, "--trainer.logger=false"])


def _without(label, index: int | None):
    """The composite label with signal ``index`` removed (a fresh, unfitted copy; None: all signals)."""
    from crslight.signals import CompositeLabel

    keep = [i for i in range(len(label.signals)) if i != index]
    return CompositeLabel([label.signals[i] for i in keep], [float(label.weights[i]) for i in keep],
                          normalization=label.normalization, n_quantiles=label.quantiles.shape[1])


def _evaluate(trainer: Trainer, model, datamodule, split: str) -> dict[str, float]:
    run = trainer.test if split == "test" else trainer.validate
    metrics = run(model, datamodule=datamodule, verbose=False)[0]
    prefix = "test/" if split == "test" else "val/"
    return {k.removeprefix(prefix): float(v) for k, v in metrics.items()}


def ablate(
    config_path: str | Path,
    max_steps: int = 100,
    split: str = "valid",
    signals: list[str] | None = None,
    overrides: list[str] | None = None,
    limit_eval_batches: int | float = 1.0,
) -> dict:
    """Retrains R_phi once with the full label and once without each signal; see the module docstring.

    Args:
        config_path: a reward config (``configs/<dataset>/reward.yaml``).
        max_steps: optimizer steps per variant.
        split: held-out split evaluated: ``valid`` or ``test``.
        signals: only ablate these signals (by class name); None ablates each.
        overrides: extra ``--key=value`` arguments for the config (``--model.backbone=tiny`` ...).
        limit_eval_batches: evaluation batches per variant (a fraction or a count).

    Returns:
        ``{"config", "max_steps", "split", "signals", "results": {"full" | "-Signal": {metric: value}}}``.
    """
    overrides = list(overrides or [])
    reference = _instantiate(config_path, overrides)
    full = reference.datamodule.pairs.label
    names = [s.name for s in full.signals]
    unknown = set(signals or []) - set(names)
    if unknown:
        raise ValueError(f"signals {sorted(unknown)} are not in the config's label; it has {', '.join(names)}")
    variants: list[tuple[str, int | None]] = [("full", None)]
    variants += [(f"-{name}", i) for i, name in enumerate(names) if signals is None or name in signals]
    results = {}
    for variant, index in variants:
        cli = _instantiate(config_path, overrides)  # re-seeds: same initial weights and batch order for every variant
        cli.datamodule.pairs.label = _without(full, index)
        trainer = Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          limit_test_batches=limit_eval_batches)
        trainer.fit(cli.model, datamodule=cli.datamodule)
        trainer.limit_val_batches = limit_eval_batches
        own = _evaluate(trainer, cli.model, cli.datamodule, split)
        row = {"pairwise_accuracy": own.get("pairwise_accuracy")}
        ref = own if index is None else _evaluate(trainer, cli.model, reference.datamodule, split)
        row.update({"pairwise_accuracy_full_label": ref.get("pairwise_accuracy"),
                    "spearman_full_label": ref.get("spearman"), "auc_liked": ref.get("auc_liked")})
        results[variant] = row
        log.info("ablation %s: %s", variant, row)
    return {"config": str(config_path), "max_steps": max_steps, "split": split, "signals": names, "results": results}

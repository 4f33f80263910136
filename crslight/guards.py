"""Finite-value guards: a NaN or infinite reward, score or loss stops training with an error that names it, before
it reaches the weights.

A NaN loss that reaches ``backward`` and the optimizer writes NaN into every weight it touches; the run then fails far
from the cause (a sampler rejecting a NaN probability) or, worse, finishes and logs ``inf``. Every stage therefore
checks what it is about to learn from: the scores PPO turns into advantages (:func:`check_scores`: R_phi's output and
each signal's values; a signal's NaN means "missing" and counts as 0, an infinite value is an error) and each loss
before its backward pass (:func:`check_loss`). The run stops with :class:`NonFiniteError`; the command line prints it
without a traceback and exits with code 2 (:func:`crslight.cli.main`), and the checkpoints already written stay.

Files are guarded too: :func:`load_weights` is crslight's one ``torch.load``, weights only whatever the installed torch's
default, and a refused file (one that holds Python objects: a planted payload) is named in the error.
"""

from __future__ import annotations

import math
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


class NonFiniteError(RuntimeError):
    """A reward, score or loss that training was about to use is NaN or infinite."""


def check_scores(values: torch.Tensor, source: str, allow_nan: bool = False) -> None:
    """Raises :class:`NonFiniteError` when ``values`` (one score per reply, from ``source``) has an infinite value, or a
    NaN unless ``allow_nan`` (a signal's "not observed")."""
    bad = torch.isinf(values) if allow_nan else ~torch.isfinite(values)
    if bool(bad.any()):
        kinds = [name for name, hit in (("NaN", values.isnan().any() and not allow_nan),
                                        ("+inf", (values == math.inf).any()), ("-inf", (values == -math.inf).any())) if hit]
        raise NonFiniteError(f"{source} gave non-finite scores: {int(bad.sum())} of {values.numel()} values are "
                             f"{'/'.join(kinds)}; training stops before they reach the policy (check the reward "
                             "model's checkpoint and the signal's inputs)")


def check_loss(loss: torch.Tensor, stage: str, step: int, parts: dict[str, torch.Tensor] | None = None) -> None:
    """Raises :class:`NonFiniteError` when ``loss`` is NaN or infinite, before its backward pass and optimizer step;
    the message names the stage, the optimizer step and the loss terms that are not finite."""
    if bool(torch.isfinite(loss.detach()).all()):
        return
    terms = [name for name, value in (parts or {}).items()
             if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value.detach()).all())]
    which = f" (non-finite terms: {', '.join(terms)})" if terms else ""
    raise NonFiniteError(f"{stage}: the loss at optimizer step {step} is {float(loss.detach().float().sum())}{which}; "
                         "training stops before the weights change (lower the learning rate, check the data and the "
                         "rewards; the last checkpoint written is intact)")


def _require(options: dict[str, float | None], above_zero: bool) -> None:
    what = "above 0" if above_zero else "0 or more"
    for name, value in options.items():
        ok = isinstance(value, int | float) and math.isfinite(value) and (value > 0 if above_zero else value >= 0)
        if value is not None and not ok:
            raise ValueError(f"{name} must be a finite number{' ' if above_zero else ', '}{what}, got {value!r}")


def require_positive(**options: float | None) -> None:
    """Raises ``ValueError`` naming the first option (keyword) that is not a finite number above 0 (None is allowed:
    "not set"); constructors call it, so the command line reports ``error: Class: lr must be ...``."""
    _require(options, above_zero=True)


def require_non_negative(**options: float | None) -> None:
    """Like :func:`require_positive`, for options that may be 0."""
    _require(options, above_zero=False)


@contextmanager
def naming_refused_file(path: str | Path):
    """Re-raises a weights-only load's refusal (:class:`pickle.UnpicklingError`) with ``path`` in front, so the message
    names the file that holds more than weights."""
    try:
        yield
    except pickle.UnpicklingError as error:
        lines = str(error).strip().splitlines()
        raise pickle.UnpicklingError(f"{path}: {lines[0] if lines else type(error).__name__}") from error


def load_weights(path: str | Path, map_location: str | torch.device | None = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, whatever the torch version's
    default (before torch 2.6 it unpickled anything); a refused file raises :class:`pickle.UnpicklingError` naming
    ``path``."""
    with naming_refused_file(path):
        return torch.load(path, map_location=map_location, weights_only=True)

"""What every stage's manual optimization shares: the learning-rate schedule, the run's optimizer-step count, and the
step itself (clip, step, zero the gradients, advance the schedule).

SFT, R_phi and PPO all optimize manually (``automatic_optimization = False``), so Lightning leaves these to the
module; they live here once so the three stages cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(warmup_steps: int, total_steps: int, min_lr_ratio: float, schedule: str) -> Callable[[int], float]:
    """The learning-rate multiplier per optimizer step: a linear warm-up over ``warmup_steps``, then ``constant``, or a
    ``linear`` or ``cosine`` decay to ``min_lr_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return factor


def total_optimizer_steps(trainer: Trainer | None, accumulate_grad_batches: int = 1) -> int:
    """The run's optimizer steps: ``max_steps`` (with manual optimization it counts optimizer steps), else the
    trainer's estimated batches over ``accumulate_grad_batches``; 1 without a trainer or an estimate."""
    if trainer is None:
        return 1
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    batches = trainer.estimated_stepping_batches
    return max(1, math.ceil(batches / accumulate_grad_batches)) if math.isfinite(batches) else 1


def adamw_with_schedule(params: Iterable[Any], total_steps: int, warmup_steps: int, min_lr_ratio: float = 1.0,
                        schedule: str = "constant", **adamw: Any) -> dict:
    """``configure_optimizers``' answer: AdamW over ``params`` (tensors or parameter groups) with
    :func:`lr_multiplier` stepped once per optimizer step."""
    optimizer = torch.optim.AdamW(params, **adamw)
    scheduler = LambdaLR(optimizer, lr_multiplier(warmup_steps, total_steps, min_lr_ratio, schedule))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def optimizer_step(module: LightningModule, optimizer, gradient_clip_val: float | None) -> None:
    """One manual optimizer step: clip the gradients' global norm (when ``gradient_clip_val``), step, zero the
    gradients, advance the learning-rate schedule."""
    if gradient_clip_val:
        module.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm="norm")
    optimizer.step()
    optimizer.zero_grad()
    module.lr_schedulers().step()

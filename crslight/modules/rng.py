"""Every rank's RNG states in a checkpoint, so that a resumed run draws the random numbers an uninterrupted one draws.

Dropout (LoRA's, R_phi's head), sampled replies and simulated users draw from torch, numpy and ``random``; Lightning
saves none of their states. Every crslight stage calls these two functions from its checkpoint hooks
(:class:`~crslight.modules.policy.PolicyModule` for SFT and PPO, :class:`~crslight.modules.reward.RewardModule`):

    def on_save_checkpoint(self, checkpoint):
        save_rng_states(checkpoint)

    def on_load_checkpoint(self, checkpoint):
        restore_rng_states(self, checkpoint)

The states are tensors and plain Python values: a checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule

RNG_KEY = "crslight_rng"


def rng_state() -> dict[str, Any]:
    """The current RNG states of torch (CPU and CUDA), numpy and ``random``, as tensors and plain Python values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_states(checkpoint: dict[str, Any]) -> None:
    """Puts every rank's RNG states into ``checkpoint`` under :data:`RNG_KEY`, a list indexed by rank.

    Call it from ``on_save_checkpoint``: every rank runs that hook (rank 0 writes the file), so under DDP the states
    are gathered here.
    """
    state = rng_state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        checkpoint[RNG_KEY] = states
    else:
        checkpoint[RNG_KEY] = [state]


def restore_rng_states(module: LightningModule, checkpoint: dict[str, Any]) -> None:
    """Restores this rank's RNG states from ``checkpoint`` when a ``Trainer`` resumes ``fit`` from it; evaluating a
    checkpoint or loading its weights (``load_from_checkpoint``) leaves the RNGs alone. A checkpoint written with fewer
    ranks gives the others rank 0's states; one without states (older, or not crslight's) changes nothing."""
    states = checkpoint.get(RNG_KEY)
    if states and module._trainer is not None and module.trainer.state.fn == "fit":
        rank = module.trainer.global_rank
        set_rng_state(states[rank] if rank < len(states) else states[0])

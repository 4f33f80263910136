"""A tiny SFT, PPO or R_phi run in a process of its own, for tests/modules/test_crash_resume.py.

    python crash_run.py STAGE MODE FOLDER POLICY [REWARD]

STAGE is ``sft``, ``ppo`` or ``reward`` (R_phi: a tiny random Llama over POLICY's tokenizer). MODE ``crash`` runs
the whole run without a stop (its final checkpoint: ``FOLDER/straight.ckpt``), then the same run again, writing a
checkpoint every few optimizer steps into ``FOLDER/checkpoints``, until a SIGKILL ends the process a step or two after
the newest one, mid-epoch. MODE ``resume`` runs it from the newest checkpoint in ``FOLDER/checkpoints`` to the end
(its final checkpoint: ``FOLDER/resumed.ckpt``).
"""

import os
import signal
import sys

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from crslight.data.datamodules import Synthetic
from crslight.data.pairs import PairOptions
from crslight.models.loading import find_checkpoint
from crslight.models.lora import LoRAConfig
from crslight.modules.evaluation import EvalConfig
from crslight.modules.ppo import PPOModule
from crslight.modules.reward import RewardModule
from crslight.modules.sft import SFTModule
from crslight.signals import AcceptanceSignal, CompositeLabel, DwellTimeSignal, EngagementSignal

# Optimizer steps: SFT and R_phi take one a batch; PPO one an iteration here (2 replies, minibatch 2, one PPO epoch).
RUNS = {
    # 4 batches an epoch, 9 steps, validation every 3 (right after each checkpoint, as in configs/*/sft.yaml):
    # checkpoints at 3 and 6 (epoch 1, 2 of its 4 batches trained), killed as step 8 begins
    "sft": {"trainer": {"max_steps": 9, "val_check_interval": 3, "check_val_every_n_epoch": None,
                        "limit_val_batches": 1},
            "every": 3, "kill_at": 7, "data": {"task": "sft", "n_dialogues": 8}},
    # 3 iterations an epoch (limit_train_batches, as in configs/*/ppo.yaml), 3 epochs: a checkpoint at 4 (epoch 1,
    # 1 of its 3 iterations trained), killed as step 6 begins
    "ppo": {"trainer": {"max_epochs": 3, "limit_train_batches": 3, "limit_val_batches": 0},
            "every": 4, "kill_at": 5, "data": {"task": "prompts", "n_dialogues": 30}},
    # as SFT: 4 batches of 2 pairs an epoch (limit_train_batches: the 8 dialogues give 18); the label of three cheap
    # signals (no sentence model to load)
    "reward": {"trainer": {"max_steps": 9, "limit_train_batches": 4, "val_check_interval": 3,
                           "check_val_every_n_epoch": None, "limit_val_batches": 1},
               "every": 3, "kill_at": 7,
               "data": {"task": "pairs", "n_dialogues": 8, "n_items": 30, "pairs": PairOptions(
                   label=CompositeLabel([DwellTimeSignal(), EngagementSignal(), AcceptanceSignal()], [1.0, 1.0, 2.0]))}},
}


class KillAt(Callback):
    """SIGKILL as optimizer step ``step + 1`` begins, as if the machine went away: no exception, no hook, nothing
    written on the way out."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def make_module(stage: str, policy: str, reward: str | None):
    if stage == "reward":  # the head's dropout: the RNG state matters as well as the batches
        return RewardModule(backbone="tiny", backbone_tokenizer=policy, head_dropout=0.1, lr=1e-3, head_lr=1e-2,
                            warmup_steps=2)
    if stage == "sft":  # LoRA dropout: the RNG state matters as well as the batches
        return SFTModule(model=policy, lr=1e-3, warmup_steps=2, lora=LoRAConfig(r=4, dropout=0.1),
                         evaluation=EvalConfig(episodes=2, max_turns=1, max_new_tokens=4))
    # no simulator: each iteration replies to its batch's prompts, so the batches decide what PPO learns
    return PPOModule(model=policy, reward_model=reward, max_new_tokens=6, minibatch_size=2, micro_batch_size=1,
                     ppo_epochs=1, lr=1e-3, lora=LoRAConfig(r=4), kl_target=1.0, kl_horizon=10,
                     reward_normalization="zscore", warmup_steps=3)


def run(stage: str, kind: str, folder: str, policy: str, reward: str | None) -> None:
    """One run: ``straight``, ``crash`` (checkpoints, then SIGKILL) or ``resumed``."""
    spec = RUNS[stage]
    seed_everything(0)
    data = Synthetic(tokenizer=policy, batch_size=2, max_length=96, **spec["data"])
    checkpoints = os.path.join(folder, "checkpoints")
    callbacks = []
    if kind != "straight":
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="{step}", every_n_train_steps=spec["every"],
                                         save_top_k=-1))
    if kind == "crash":
        callbacks.append(KillAt(spec["kill_at"]))
    trainer = Trainer(accelerator="cpu", num_sanity_val_steps=0, logger=False, callbacks=callbacks,
                      enable_checkpointing=kind != "straight", enable_progress_bar=False, enable_model_summary=False,
                      **spec["trainer"])
    ckpt_path = str(find_checkpoint(checkpoints)) if kind == "resumed" else None
    trainer.fit(make_module(stage, policy, reward), data, ckpt_path=ckpt_path, weights_only=True)
    if kind == "crash":
        raise SystemExit("the run was to be killed, and finished")
    trainer.save_checkpoint(os.path.join(folder, f"{kind}.ckpt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    stage, mode, folder, policy, *rest = sys.argv[1:]
    reward = rest[0] if rest else None
    if mode == "crash":
        run(stage, "straight", folder, policy, reward)
        run(stage, "crash", folder, policy, reward)
    else:
        run(stage, "resumed", folder, policy, reward)

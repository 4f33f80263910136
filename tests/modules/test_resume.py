"""Checkpoints hold the whole state: 2 steps + resume 2 steps ends exactly where 4 steps straight end."""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from crslight.data.datamodules import Synthetic
from crslight.models.lora import LoRAConfig
from crslight.modules.policy import STATE_KEY
from crslight.modules.ppo import PPOModule
from crslight.modules.rng import RNG_KEY
from crslight.modules.sft import SFTModule
from crslight.signals import AcceptanceSignal

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(make_module, data_options, epochs, ckpt_in=None, ckpt_out=None):
    """``epochs`` epochs of one batch each, from scratch or resumed from ``ckpt_in``."""
    seed_everything(0)
    module = make_module()
    data = Synthetic(n_dialogues=30, batch_size=2, max_length=96, **data_options)
    trainer = Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=1, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data, ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return module, trainer


def _assert_same(straight, resumed):
    a, b = dict(straight.named_parameters()), dict(resumed.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming"


def test_ppo_resume_continues_exactly(tiny_policy, tiny_reward, tmp_path):
    def make():
        return PPOModule(model=tiny_policy, reward_model=tiny_reward, signals=[AcceptanceSignal()], signal_weights=[0.5],
                         simulator="PersonaSimulator", max_turns=2, max_new_tokens=6, minibatch_size=2,
                         micro_batch_size=1, ppo_epochs=1, lr=1e-3, lora=LoRAConfig(r=4), kl_target=1.0, kl_horizon=10,
                         reward_normalization="zscore", warmup_steps=3)

    data = {"task": "prompts", "tokenizer": tiny_policy}
    straight, straight_trainer = _run(make, data, epochs=4)
    ckpt = tmp_path / "half.ckpt"
    half, _ = _run(make, data, epochs=2, ckpt_out=ckpt)
    resumed, trainer = _run(make, data, epochs=4, ckpt_in=ckpt)

    _assert_same(straight, resumed)
    assert resumed.iterations == straight.iterations == 4
    assert trainer.global_step == straight_trainer.global_step >= 4  # optimizer steps: minibatches x iterations
    assert resumed.kl_controller.value == straight.kl_controller.value != half.kl_controller.value
    assert resumed.reward_moments.state_dict() == straight.reward_moments.state_dict()
    # with LoRA the checkpoint is lean: adapters (the slot token's row among them), value head and item scores only,
    # plus optimizer, controller, moments and RNG
    saved = torch.load(ckpt, weights_only=True)  # checkpoints load safely
    assert all("lora_" in key or "trainable_tokens" in key or key.startswith(("value_head.", "item_head."))
               for key in saved["state_dict"])
    assert saved[STATE_KEY]["iterations"] == 2 and saved[RNG_KEY] and saved["optimizer_states"]


def test_sft_resume_continues_exactly(tiny_policy, tmp_path):
    def make():
        return SFTModule(model=tiny_policy, lr=1e-3, warmup_steps=2, lora=LoRAConfig(r=4, dropout=0.1))

    data = {"task": "sft", "tokenizer": tiny_policy}
    straight, _ = _run(make, data, epochs=4)
    ckpt = tmp_path / "half.ckpt"
    _run(make, data, epochs=2, ckpt_out=ckpt)
    resumed, _ = _run(make, data, epochs=4, ckpt_in=ckpt)
    _assert_same(straight, resumed)

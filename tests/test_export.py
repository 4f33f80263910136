"""``crslight export``: a checkpoint becomes a transformers folder that loads and generates like the trained policy."""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from transformers import AutoModelForCausalLM, AutoTokenizer

from crslight.cli import main
from crslight.data.datamodules import Synthetic
from crslight.export import export
from crslight.models.lora import LoRAConfig
from crslight.modules.policy import merge_lora
from crslight.modules.ppo import PPOModule
from crslight.modules.sft import SFTModule
from crslight.signals import AcceptanceSignal

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_and_save(module, task, policy, path):
    seed_everything(0)
    data = Synthetic(task=task, tokenizer=policy, n_dialogues=20, batch_size=2, max_length=96)
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    trainer.save_checkpoint(path)
    return module


def _check_round_trip(module, out, tokenizer):
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in exported.named_parameters())
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "A calm movie, please."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    trained = merge_lora(module.policy).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-4)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.chat_template == tokenizer.chat_template
    generated = exported.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    assert exported.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_export_merges_sft_lora(tiny_policy, tiny_tokenizer, tmp_path):
    module = SFTModule(model=tiny_policy, lr=1e-2, lora=LoRAConfig(r=4, dropout=0.0))
    module = _train_and_save(module, "sft", tiny_policy, tmp_path / "sft.ckpt")
    assert export(tmp_path / "sft.ckpt", tmp_path / "out") == str(tmp_path / "out")
    _check_round_trip(module, tmp_path / "out", tiny_tokenizer)
    # LoRA did change the model: the export is not the base it started from
    base = AutoModelForCausalLM.from_pretrained(tiny_policy)
    assert not torch.equal(base.model.layers[0].self_attn.q_proj.weight,
                           AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[0].self_attn.q_proj.weight)


def test_a_checkpoint_with_the_old_flat_lora_arguments_still_loads_and_exports(tiny_policy, tiny_tokenizer, tmp_path):
    """Checkpoints written before the ``lora`` group (``lora: true, lora_r: 4, ...``) load with their own rank."""
    from crslight.guards import load_weights
    from crslight.modules.policy import load_policy_checkpoint

    module = SFTModule(model=tiny_policy, lr=1e-2, lora=LoRAConfig(r=4, alpha=8, dropout=0.0))
    module = _train_and_save(module, "sft", tiny_policy, tmp_path / "sft.ckpt")
    checkpoint = load_weights(tmp_path / "sft.ckpt")
    assert checkpoint["hyper_parameters"]["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0,
                                                      "target_modules": "all-linear"}  # a plain dict
    checkpoint["hyper_parameters"].update(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                          lora_target_modules="all-linear")
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = load_policy_checkpoint(tmp_path / "old.ckpt")
    assert loaded.hparams.lora == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    export(tmp_path / "old.ckpt", tmp_path / "out")
    _check_round_trip(module, tmp_path / "out", tiny_tokenizer)


def test_export_ppo_checkpoint_through_the_cli(tiny_policy, tiny_tokenizer, tmp_path, capsys):
    # with its signal weights, as the shipped configs set them (the signal objects are not hyper-parameters)
    module = PPOModule(model=tiny_policy, signals=[AcceptanceSignal()], signal_weights=[1.0],
                       simulator="PersonaSimulator", max_turns=1,
                       max_new_tokens=4, minibatch_size=2, micro_batch_size=2, ppo_epochs=1, lr=1e-3)
    module = _train_and_save(module, "prompts", tiny_policy, tmp_path / "ppo.ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "ppo.ckpt"), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    _check_round_trip(module, tmp_path / "out", tiny_tokenizer)


def test_export_writes_the_item_scores_beside_the_policy(tiny_policy, tmp_path):
    from crslight.models.retrieval import load_item_scores

    module = SFTModule(model=tiny_policy, lr=1e-2, lora=LoRAConfig(r=4, dropout=0.0))
    module = _train_and_save(module, "sft", tiny_policy, tmp_path / "sft.ckpt")
    export(tmp_path / "sft.ckpt", tmp_path / "out")
    head, item_ids, names = load_item_scores(tmp_path / "out")
    catalogue = Synthetic(n_dialogues=20).corpus("test").catalogue
    assert item_ids == catalogue["item_id"] and names == catalogue["name"]
    for key, value in module.item_head.state_dict().items():
        assert torch.equal(head.state_dict()[key], value), key


@pytest.mark.parametrize("kind", ["empty-folder", "missing"])
def test_export_without_a_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, kind):
    ckpt = tmp_path / ("run" if kind == "empty-folder" else "model.ckpt")
    if kind == "empty-folder":
        ckpt.mkdir()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crslight export: ") and str(ckpt) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

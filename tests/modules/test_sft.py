"""SFTModule: the loss reads only the recommender's tokens, and a short fit lowers it and moves every trainable weight."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from crslight.data.datamodules import IGNORE_INDEX, Synthetic
from crslight.guards import NonFiniteError
from crslight.models.lora import LoRAConfig
from crslight.modules.optim import lr_multiplier
from crslight.modules.sft import SFTModule, lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lm_loss_by_hand():
    # vocabulary 3, one row of 4 positions; only the labels at positions 1 and 3 count (read from logits 0 and 2)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [9.0, 9.0, 9.0], [0.0, 0.0, 1.0], [5.0, -5.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 0, IGNORE_INDEX, 2]])
    loss, n_tokens = lm_loss(logits, labels)
    # CE(logits[0], 0) = log(e^2 + 2) - 2 = 0.2395;  CE(logits[2], 2) = log(2 + e) - 1 = 0.5514;  mean 0.3954
    expected = (math.log(math.e**2 + 2) - 2 + math.log(2 + math.e) - 1) / 2
    assert n_tokens == 2
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    # logits at positions 1 and 3 predict ignored (or no) labels: no gradient reaches them
    assert logits.grad[0, 1].abs().sum() == 0 and logits.grad[0, 3].abs().sum() == 0


def test_loss_counts_only_recommender_tokens(tiny_policy):
    dm = Synthetic(task="sft", tokenizer=tiny_policy, n_dialogues=10, batch_size=2, max_length=512)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    module = SFTModule(model=tiny_policy)
    module.configure_model()
    module.policy.eval()
    _, loss, _, n_tokens = module.loss(batch)
    # the same loss, by hand: per-token cross-entropy of every position, kept only where the label is a token
    logits = module(batch.input_ids, batch.attention_mask)[:, :-1]
    targets = batch.labels[:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    keep = targets != IGNORE_INDEX
    assert n_tokens == keep.sum() and 0 < keep.sum() < (batch.attention_mask[:, 1:] == 1).sum()
    assert loss.item() == pytest.approx(per_token[keep].mean().item(), rel=1e-5)
    # the learned tokens are the recommender's replies and nothing of the seeker's turns or the system prompt; a
    # recommended title is written in after its slot token, never learned as words
    learned = dm.tokenizer.decode(batch.labels[0][batch.labels[0] != IGNORE_INDEX])
    whole = dm.tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    replies = [part.removeprefix("assistant\n") for part in whole.split("<|im_start|>") if part.startswith("assistant")]
    titles = [name for name in dm.item_names.values() if name in whole]
    for title in titles:
        replies = [reply.replace(" " + title, "") for reply in replies]
    assert replies and titles and learned == "".join(replies) and "<|item|>" in learned


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fit_lowers_the_loss_and_moves_every_trainable_weight(tiny_policy, lora):
    seed_everything(0)
    dm = Synthetic(task="sft", tokenizer=tiny_policy, n_dialogues=8, batch_size=2, max_length=96, max_samples=8)
    module = SFTModule(model=tiny_policy, lr=1e-2 if lora else 3e-3, accumulate_grad_batches=2, warmup_steps=1,
                       lora=LoRAConfig(r=4, alpha=8, dropout=0.0) if lora else None)
    module.configure_model()
    dm.setup("fit")
    probe = next(iter(dm.val_dataloader()))
    module.policy.eval()
    with torch.no_grad():
        before_loss = module.loss(probe).total.item()
    module.policy.train()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.fit(module, dm)
    # 4 batches per epoch, 2 per optimizer step: max_steps-style counting of optimizer steps
    assert trainer.global_step == 3 * 2
    module.policy.eval()
    with torch.no_grad():
        after_loss = module.loss(probe).total.item()
    assert after_loss < before_loss - 0.1
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} did not change"
    if lora:
        # only the adapters train with LoRA, and the slot token's embedding row (a new token has none to adapt)
        assert all("lora_" in n or "trainable_tokens" in n or n.startswith("item_head.") for n in before)
        assert any("trainable_tokens" in n for n in before)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/ppl", "val/loss", "val/ppl"} <= metrics.keys()
    assert metrics["val/ppl"].item() == pytest.approx(math.exp(metrics["val/loss"].item()), rel=1e-4)


def test_item_scores_fitted_on_the_whole_training_split(tiny_policy):
    """After the last LM step the item scores train on every slot state of the training split: on those samples the
    target's rank improves far beyond what the few LM steps gave, and the checkpointed head is the fitted one."""
    from crslight.models.retrieval import rank_scores

    seed_everything(0)
    dm = Synthetic(task="sft", tokenizer=tiny_policy, n_dialogues=60, n_items=30, batch_size=2, max_length=512)
    module = SFTModule(model=tiny_policy, lr=1e-3, ranking_loss_weight=0.0, item_head_epochs=60, item_head_lr=3e-2)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)

    def mean_target_rank():
        module.policy.eval()
        ranks = []
        with torch.no_grad():
            for batch in dm.loader("train", shuffle=False):
                if batch.rec_row is not None:
                    scores = rank_scores(module.policy, module.item_head, batch)
                    target = scores.gather(1, batch.rec_target[:, None])
                    ranks.append((scores > target).sum(1).float())
        return torch.cat(ranks).mean().item()

    from crslight.models.retrieval import ItemHead

    module.configure_model()
    catalogue = dm.corpus("train").catalogue
    module.item_head = ItemHead.for_catalogue(module.policy, module.tokenizer, catalogue["name"],
                                              catalogue["attributes"])  # what fit's configure_model would build
    dm.setup("fit")
    before = mean_target_rank()  # the zero-shot scores: no better than chance over 30 items
    trainer.fit(module, dm)
    fit = module.item_head_fit
    assert fit["samples"] == len(dm.corpus("train").rec_samples) and fit["last_loss"] < fit["first_loss"] - 0.3
    after = mean_target_rank()
    assert after < 0.6 * before, (before, after)


def test_item_scores_fitted_on_the_context_alone(tiny_policy, monkeypatch):
    """``item_head_fits: context``: no pass of the policy; the map is zero, the bias is the popularity prior of the
    training targets, and only the link weight and the mention bonus train (a dialogue's items decide the ranking)."""
    from crslight.models import retrieval

    seed_everything(0)
    dm = Synthetic(task="sft", tokenizer=tiny_policy, n_dialogues=60, n_items=30, batch_size=2, max_length=512)
    module = SFTModule(model=tiny_policy, lr=1e-3, ranking_loss_weight=0.0, item_head_epochs=20, item_head_lr=5e-2,
                       item_links=5, item_head_fits="context", item_prior=0.5)
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    monkeypatch.setattr("crslight.models.retrieval.turn_hidden_states", lambda *a, **k: pytest.fail("the policy ran"))
    trainer.fit(module, dm)
    head = module.item_head
    corpus = dm.corpus("train")
    targets = torch.tensor([corpus.item_index[s.item] for s in corpus.rec_samples])
    assert module.item_head_fit["samples"] == len(targets)
    assert torch.equal(head.proj.weight, torch.zeros_like(head.proj.weight))
    assert torch.allclose(head.bias, 0.5 * torch.bincount(targets, minlength=head.num_items).float().log1p())
    assert float(head.link_weight) != 1.0 and float(head.mention_bonus) != 0.0
    with pytest.raises(ValueError, match="trains must be 'all' or 'context'"):
        retrieval.fit_item_head(head, retrieval.SlotData(torch.zeros(1, 64), targets[:1], torch.full((1, 1), -1)),
                                torch.zeros(5, 64), 1, 0.1, trains="bias")


@pytest.mark.parametrize("tune", [0, 3])
def test_item_scores_with_a_text_part_fit_then_rank_and_carry_over_to_ppo(tiny_policy, tmp_path, tune):
    """``item_text_turns``: the text part fits first (with ``item_text_tune_epochs``, its encoder fine-tuned), its
    weight is chosen on the validation split, ``crslight test`` ranks with it (from the checkpoint as well), and a PPO
    run started from the checkpoint gets the same scores (text part and tuned encoder included)."""
    from crslight.modules.ppo import PPOModule

    seed_everything(0)
    dm = Synthetic(task="sft", tokenizer=tiny_policy, n_dialogues=60, n_items=30, batch_size=2, max_length=512)
    settings = dict(model=tiny_policy, lr=1e-3, ranking_loss_weight=0.5, item_head_epochs=5, item_head_lr=5e-2,
                    item_links=5, item_head_fits="context", item_text_turns=2, item_text_epochs=20,
                    item_text_tune_epochs=tune, item_text_tune_lr=1e-4)
    module = SFTModule(**settings)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, dm)
    fit = module.item_head_fit
    assert module.item_head.reads_text and fit["text_last_loss"] < fit["text_first_loss"]
    assert fit["held_out_samples"] == len(dm.corpus("valid").rec_samples)
    assert fit["held_out_recall"] >= fit["held_out_recall_without_text"]
    assert float(module.item_head.text_scale.detach()) == pytest.approx(0.0) or fit["text_weight"] > 0
    assert (module.item_head.text_encoder is not None) == bool(tune)
    result = trainer.test(module, dm, verbose=False)[0]
    assert 0 < result["test/recall@50"] <= 1
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    # a fresh module with the same settings (a text part, no tuned encoder yet) tested from the checkpoint ranks alike
    again = Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path / "again", enable_progress_bar=False,
                    enable_model_summary=False).test(SFTModule(**settings), dm, ckpt_path=str(checkpoint),
                                                     verbose=False)[0]
    assert again["test/recall@50"] == result["test/recall@50"] and again["test/mrr@50"] == result["test/mrr@50"]
    ppo = PPOModule(model=tiny_policy, init_from=str(checkpoint), signals=[], lora=LoRAConfig(r=4))
    ppo.configure_model()
    assert ppo.item_head.reads_text and int(ppo.item_head.text_turns) == 2
    assert (ppo.item_head.text_encoder is not None) == bool(tune)
    for name, value in module.item_head.state_dict().items():
        assert torch.equal(ppo.item_head.state_dict()[name], value), name


def test_warmup_then_cosine():
    factor = lr_multiplier(warmup_steps=2, total_steps=6, min_lr_ratio=0.1, schedule="cosine")
    # warmup 1/2, 2/2; then cosine from 1 down to 0.1 over steps 2..6
    assert [round(factor(s), 4) for s in (0, 1, 2, 4, 6)] == [0.5, 1.0, 1.0, 0.55, 0.1]


REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(REPO.glob("configs/*/sft.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.parent.name for p in CONFIGS])
def test_sft_configs_instantiate(path, monkeypatch):
    from jsonargparse import set_docstring_parse_options
    from lightning.pytorch import LightningDataModule, LightningModule

    from crslight.lightning_cli import CRSLightningCLI, _import_parts

    monkeypatch.chdir(REPO)
    set_docstring_parse_options(attribute_docstrings=True)
    _import_parts()
    cli = CRSLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          run=False, auto_configure_optimizers=False, args=["-c", str(path), "--trainer.logger=false"])
    assert isinstance(cli.model, SFTModule) and cli.model.policy is None  # the policy loads in configure_model
    assert cli.datamodule.task == "sft" and cli.datamodule.tokenizer_name == cli.model.hparams.model
    assert len(CONFIGS) == 4  # logs, opendialkg, redial, synthetic


def test_a_non_finite_loss_stops_sft_before_the_optimizer_steps(tiny_policy, monkeypatch):
    seed_everything(0)
    dm = Synthetic(task="sft", tokenizer=tiny_policy, n_dialogues=8, batch_size=2, max_length=96, max_samples=8)
    module = SFTModule(model=tiny_policy, lr=1e-2, accumulate_grad_batches=2, warmup_steps=1)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loss, calls = module.loss, []

    def nan_on_second_batch(batch):  # the first micro-batch of the step is fine, the second is NaN
        calls.append(1)
        out = loss(batch)
        return out._replace(total=out.total * math.nan) if len(calls) == 2 else out

    monkeypatch.setattr(module, "loss", nan_on_second_batch)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(NonFiniteError, match="SFT: the loss at optimizer step 0 is nan"):
        trainer.fit(module, dm)
    assert all(torch.equal(param, before[name]) for name, param in module.named_parameters())

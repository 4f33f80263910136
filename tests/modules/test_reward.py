"""RewardModule: hand-computed losses, a short fit that lowers the loss and moves every trainable weight, checkpoints
that score identically after loading, the scoring API PPO uses, and every reward YAML parsing into its classes."""

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader

from crslight.data.pairs import PAIR_KINDS, Group, RewardSample, collate
from crslight.models.lora import LoRAConfig
from crslight.modules.reward import RewardModule
from crslight.signals import SignalBatch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*/reward.yaml"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread. With two, every small op waits on the other thread, which on a busy CPU costs a
    scheduler slice each time (a 20 ms forward became 0.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def turns(*texts: str) -> list[dict]:
    return [{"role": "seeker" if i % 2 == 0 else "recommender", "text": t, "items": []} for i, t in enumerate(texts)]


CONTEXT_A = turns("Hi! I'm feeling down, can you suggest a comedy?")
CONTEXT_B = turns("I love horror movies", "Have you seen It (2017)?", "Yes, loved it. Something scarier?")


def pair_group() -> Group:
    """Two pairs: in each context, a fitting reply against one that ignores the seeker."""
    samples = [
        RewardSample(CONTEXT_A, "Try Airplane! (1980), a very funny comedy.", label=1.0, liked=(1,)),
        RewardSample(CONTEXT_A, "The weather is nice today.", real=False),
        RewardSample(CONTEXT_B, "Hereditary (2018) is much scarier.", label=0.5, liked=(0,)),
        RewardSample(CONTEXT_B, "Goodbye.", label=-1.0),
    ]
    return Group(samples, [(0, 1, 1), (2, 3, 2)])


@pytest.fixture(scope="module")
def batch():
    return collate([pair_group()])


def test_batch_layout(batch):
    assert batch.chosen.tolist() == [0, 2] and batch.rejected.tolist() == [1, 3]
    assert [PAIR_KINDS[k] for k in batch.kind] == ["negative", "ordered"]
    assert batch.liked_index.tolist() == [0, 2] and batch.liked.tolist() == [1, 0]
    assert batch.real.tolist() == [True, False, True, True] and math.isnan(batch.label[1])


def test_losses_by_hand(batch):
    module = RewardModule(backbone="tiny", center_rewards_coefficient=0.1)
    scores = torch.tensor([1.0, 0.0, 2.0, 3.0])
    # pairs (1, 0) and (2, 3): -log sigmoid(1) = 0.31326, -log sigmoid(-1) = 1.31326 -> mean 0.81326
    # centring 0.1 * mean((1 + 0)^2, (2 + 3)^2) = 0.1 * 13 = 1.3
    assert module.losses(scores, batch).item() == pytest.approx(0.81326 + 1.3, abs=1e-4)
    module.hparams.loss = "regression"
    # labels 1, NaN, 0.5, -1: (1 - 1)^2, (2 - 0.5)^2, (3 + 1)^2 -> (0 + 2.25 + 16) / 3 = 6.08333
    assert module.losses(scores, batch).item() == pytest.approx(6.08333, abs=1e-4)
    module.hparams.loss, module.hparams.regression_weight = "both", 0.5
    assert module.losses(scores, batch).item() == pytest.approx(0.81326 + 1.3 + 0.5 * 6.08333, abs=1e-4)


def test_training_loss_equals_the_formula_on_the_models_scores(batch):
    module = RewardModule(backbone="tiny", center_rewards_coefficient=0.0, head_dropout=0.0).eval()
    with torch.no_grad():
        scores = module.score_texts(batch.context, batch.reply)
        loss = module.losses(scores, batch)
    by_hand = -torch.nn.functional.logsigmoid(scores[[0, 2]] - scores[[1, 3]]).mean()
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)


def fit(module: RewardModule, steps: int, tmp_path=None, **trainer_kwargs) -> Trainer:
    seed_everything(0)
    loader = DataLoader([pair_group()] * steps, batch_size=1, collate_fn=collate)
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=tmp_path is not None,
                      default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


@pytest.mark.parametrize(("tokenizer", "options"), [
    ("smollm2", {}),
    ("minilm", {"encoding": "siamese"}),
    ("smollm2", {"lora": LoRAConfig(r=4, alpha=8, dropout=0.0)}),
], ids=["decoder-cross", "encoder-siamese", "lora"])
def test_fit_lowers_the_loss_and_moves_every_trainable_weight(batch, tokenizer, options):
    module = RewardModule(backbone="tiny", backbone_tokenizer=tokenizer, lr=3e-3, head_lr=3e-3, warmup_steps=0,
                          head_dropout=0.0, **options)
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    module.eval()
    with torch.no_grad():
        before = module.losses(module.score_texts(batch.context, batch.reply), batch).item()
    module.train()
    trainer = fit(module, steps=6)
    assert trainer.global_step == 6
    module.eval()
    with torch.no_grad():
        after = module.losses(module.score_texts(batch.context, batch.reply), batch).item()
    assert after < before - 0.05
    unchanged = [n for n, p in module.named_parameters() if n in trainable and torch.equal(p, trainable[n])]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    assert all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen)
    if options.get("lora"):
        assert frozen and all("lora_" in n or n.startswith("head.") for n in trainable)


def test_trainable_layers_freezes_the_embeddings_and_lower_blocks():
    module = RewardModule(backbone="tiny", trainable_layers=1)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any(".layers.1." in n for n in trainable) and "head.proj.weight" in trainable
    assert "backbone.norm.weight" in trainable  # the final norm comes after the blocks: it trains
    assert not any(".layers.0." in n or "embed" in n for n in trainable)


def test_a_frozen_backbone_trains_only_the_head():
    module = RewardModule(backbone="tiny", trainable_layers=0)
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {"head.proj.weight", "head.proj.bias"}
    assert not module.backbone.training  # no dropout on features nothing trains


def test_siamese_starts_as_the_cosine_of_context_and_reply(batch):
    module = RewardModule(backbone="tiny", backbone_tokenizer="minilm", encoding="siamese").eval()
    enc = module.encode(batch.context, batch.reply)
    with torch.no_grad():
        u = module._pooled(enc["input_ids"], enc["attention_mask"], token_type_ids=enc["token_type_ids"])
        v = module._pooled(enc["reply_input_ids"], enc["reply_attention_mask"])
        cosine = torch.nn.functional.cosine_similarity(u[enc["context_index"]], v)
        assert torch.allclose(module(**enc), cosine, atol=1e-5)
    assert enc["input_ids"].shape[0] == 2 and enc["context_index"].tolist() == [0, 0, 1, 1]  # each context once


def test_checkpoint_round_trip_gives_identical_scores(batch, tmp_path):
    module = RewardModule(backbone="tiny", lr=1e-3, warmup_steps=0)
    trainer = fit(module, steps=2, tmp_path=tmp_path)
    ckpt = tmp_path / "reward.ckpt"
    trainer.save_checkpoint(ckpt)
    expected = module.score(batch)
    loaded = RewardModule.load(ckpt)
    assert not loaded.training
    assert torch.equal(loaded.score(batch), expected)
    assert torch.equal(RewardModule.load(tmp_path).score(batch), expected)  # a folder: its newest checkpoint


def test_init_from_warm_starts_from_a_trained_r_phi(batch, tmp_path):
    """A refresh's R_phi starts from the previous one's weights; its own checkpoint then loads without that file."""
    module = RewardModule(backbone="tiny", lr=1e-2, head_lr=1e-2, warmup_steps=0)
    trainer = fit(module, steps=2, tmp_path=tmp_path)
    first = tmp_path / "first.ckpt"
    trainer.save_checkpoint(first)
    trained = module.eval().score(batch)
    assert not torch.allclose(RewardModule(backbone="tiny").eval().score(batch), trained)  # training moved it
    warm = RewardModule(backbone="tiny", init_from=str(tmp_path), lr=1e-2, warmup_steps=0)  # a folder: newest .ckpt
    assert torch.equal(warm.eval().score(batch), trained)
    trainer = fit(warm.train(), steps=1, tmp_path=tmp_path / "second")
    second = tmp_path / "second.ckpt"
    trainer.save_checkpoint(second)
    expected = warm.eval().score(batch)
    first.unlink()
    assert torch.equal(RewardModule.load(second).score(batch), expected)  # the run's init_from is not read again
    with pytest.raises(ValueError, match="does not fit this configuration"):
        RewardModule(backbone="tiny", backbone_tokenizer="minilm", init_from=str(second))
    with pytest.raises(ValueError, match="no such R_phi checkpoint"):
        RewardModule(backbone="tiny", init_from=str(tmp_path / "missing.ckpt"))


def test_an_r_phi_with_the_old_flat_lora_arguments_still_loads(batch, tmp_path):
    from crslight.guards import load_weights

    module = RewardModule(backbone="tiny", lora=LoRAConfig(r=4, alpha=8), lr=1e-3, warmup_steps=0)
    trainer = fit(module, steps=1, tmp_path=tmp_path)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = load_weights(tmp_path / "new.ckpt")
    checkpoint["hyper_parameters"].update(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    expected = module.eval().score(batch)
    assert torch.equal(RewardModule.load(tmp_path / "old.ckpt").score(batch), expected)


def test_trainer_precision_decides_the_backbones_and_the_head_stays_float32(batch):
    """No flag of R_phi's own: ``trainer.precision: bf16-mixed`` runs the backbone under bf16 autocast (Lightning's
    precision plugin), while pooling and the head compute in float32; ``32-true`` runs all in float32."""
    seen = {}
    for precision in ("bf16-mixed", "32-true"):
        module = RewardModule(backbone="tiny", lr=1e-3, warmup_steps=0, head_dropout=0.0)
        dtypes = seen.setdefault(precision, {})

        def backbone_hook(mod, args, out, dtypes=dtypes) -> None:
            dtypes.setdefault("backbone", out.dtype)

        def head_hook(mod, args, out, dtypes=dtypes) -> None:
            dtypes.setdefault("head", (args[0].dtype, out.dtype))

        linear = next(m for m in module.backbone.modules() if isinstance(m, torch.nn.Linear))  # a projection
        linear.register_forward_hook(backbone_hook)
        module.head.register_forward_hook(head_hook)
        fit(module, steps=1, precision=precision)
    assert seen["bf16-mixed"] == {"backbone": torch.bfloat16, "head": (torch.float32, torch.float32)}
    assert seen["32-true"] == {"backbone": torch.float32, "head": (torch.float32, torch.float32)}


def test_a_checkpoint_written_with_the_old_bf16_flag_still_loads(batch, tmp_path):
    module = RewardModule(backbone="tiny", lr=1e-3, warmup_steps=0)
    trainer = fit(module, steps=1, tmp_path=tmp_path)
    ckpt = tmp_path / "reward.ckpt"
    trainer.save_checkpoint(ckpt)
    old = torch.load(ckpt, weights_only=True)
    old["hyper_parameters"]["bf16"] = False  # an argument R_phi had before trainer.precision decided
    torch.save(old, ckpt)
    assert torch.equal(RewardModule.load(ckpt).score(batch), module.score(batch))


def test_score_reads_signal_batches_turns_or_strings(batch):
    module = RewardModule(backbone="tiny")
    b = len(batch.reply)
    signal_batch = SignalBatch(context=batch.context, reply=batch.reply, items=[[]] * b, item_names=[[]] * b,
                               reaction=[None] * b, dwell_time=[math.nan] * b, labels=[{}] * b,
                               rating=[math.nan] * b, accepted=[math.nan] * b, continues=[False] * b)
    from crslight.data.pairs import render_context

    rendered = [render_context(c, module.hparams.context_turns) for c in batch.context]
    scores = module.score(signal_batch)
    assert scores.shape == (b,) and scores.dtype == torch.float32
    assert torch.equal(module.score(contexts=rendered, replies=batch.reply), scores)
    module.hparams.score_batch_size = 3  # chunking changes nothing (right padding, last-token pooling)
    assert torch.allclose(module.score(batch), scores, atol=1e-5)
    assert module.training  # score() restores the mode it found


def test_encoding_keeps_the_reply_and_cuts_the_context_from_the_left():
    module = RewardModule(backbone="tiny", backbone_tokenizer="minilm", max_tokens=24, max_reply_tokens=8)
    long_context = turns(" ".join(f"word{i}" for i in range(50)))
    enc = module.encode([long_context], ["the reply stays whole"])
    text = module.tokenizer.decode(enc["input_ids"][0])
    assert enc["input_ids"].shape[1] == 24
    assert text.endswith("[SEP] the reply stays whole [SEP]") and "word49" in text and "word0 " not in text
    assert enc["token_type_ids"][0, -1] == 1  # the reply is the second segment


def test_validation_logs_every_metric(batch):
    module = RewardModule(backbone="tiny")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, DataLoader([pair_group()], batch_size=1, collate_fn=collate))[0]
    expected = {"val/pairwise_accuracy", "val/pairwise_accuracy_negative", "val/pairwise_accuracy_ordered",
                "val/loss", "val/spearman", "val/auc_liked"}
    assert expected <= set(metrics)
    assert "val/pairwise_accuracy_swap" not in metrics  # no pair of that kind: not logged as a misleading 0
    scores = module.score(batch)
    assert metrics["val/pairwise_accuracy"] == pytest.approx(
        ((scores[0] > scores[1]).float() + (scores[2] > scores[3]).float()).item() / 2)
    assert metrics["val/auc_liked"] == pytest.approx(float(scores[0] > scores[2]))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.parent.name for p in CONFIGS])
def test_reward_configs_instantiate(path, monkeypatch):
    from jsonargparse import set_docstring_parse_options

    from crslight.lightning_cli import CRSLightningCLI, _import_parts
    from crslight.signals import CompositeLabel

    monkeypatch.chdir(REPO)
    set_docstring_parse_options(attribute_docstrings=True)
    _import_parts()
    cli = CRSLightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          run=False, auto_configure_optimizers=False,
                          args=["-c", str(path), "--model.backbone=tiny", "--trainer.logger=false"])
    assert isinstance(cli.model, RewardModule)
    assert cli.datamodule.task == "pairs"
    label = cli.datamodule.pairs.label
    assert isinstance(label, CompositeLabel) and len(label.weights) == len(label.signals) >= 3


def test_ablate_retrains_without_each_signal(monkeypatch):
    """The ablated variant trains on a label without the signal (its training targets differ from the full run's) and
    is scored twice: on pairs of its own label and on pairs of the full label; each reported accuracy is the one of
    its own evaluation."""
    import crslight.ablation as ablation

    fits, evaluations = [], []

    class RecordingTrainer(Trainer):
        def fit(self, model, datamodule=None, **kwargs):
            super().fit(model, datamodule=datamodule, **kwargs)
            label = datamodule.pairs.label
            train = datamodule._data[datamodule.splits["fit"]]
            fits.append({"signals": label.names, "weights": [float(w) for w in label.weights],
                         "labels": torch.tensor([s.label for g in train.groups for s in g.samples if s.real])})

    def recording_evaluate(trainer, model, datamodule, split):
        metrics = evaluate(trainer, model, datamodule, split)
        evaluations.append((datamodule.pairs.label.names, split, metrics["pairwise_accuracy"]))
        return metrics

    evaluate = ablation._evaluate
    monkeypatch.setattr(ablation, "Trainer", RecordingTrainer)
    monkeypatch.setattr(ablation, "_evaluate", recording_evaluate)
    monkeypatch.chdir(REPO)
    small = ["--model.backbone=tiny", "--data.n_dialogues=30", "--data.n_items=40", "--data.batch_size=4"]
    report = ablation.ablate(REPO / "configs/synthetic/reward.yaml", max_steps=2, signals=["AcceptanceSignal"],
                             overrides=small)
    names = ["DwellTimeSignal", "SentimentShiftSignal", "EngagementSignal", "AcceptanceSignal"]
    assert report["signals"] == names
    assert set(report["results"]) == {"full", "-AcceptanceSignal"}
    # what each variant trained on: the full label, then the label without acceptance, the other weights kept
    full_fit, ablated_fit = fits
    assert full_fit["signals"] == names and ablated_fit["signals"] == names[:3]
    assert ablated_fit["weights"] == full_fit["weights"][:3]
    assert full_fit["labels"].shape == ablated_fit["labels"].shape
    assert not torch.allclose(full_fit["labels"], ablated_fit["labels"], equal_nan=True)
    # what each variant was scored on: the full run once, the ablated run on its own label then on the full label
    assert [(e[0], e[1]) for e in evaluations] == [(names, "valid"), (names[:3], "valid"), (names, "valid")]
    full, ablated = report["results"]["full"], report["results"]["-AcceptanceSignal"]
    assert full["pairwise_accuracy"] == full["pairwise_accuracy_full_label"] == evaluations[0][2]
    assert ablated["pairwise_accuracy"] == evaluations[1][2]
    assert ablated["pairwise_accuracy_full_label"] == evaluations[2][2]
    assert all(0.0 <= row[k] <= 1.0 for row in (full, ablated) for k in ("pairwise_accuracy", "auc_liked"))
    with pytest.raises(ValueError, match="not in the config's label"):
        ablation.ablate(REPO / "configs/synthetic/reward.yaml", max_steps=1, signals=["NoSuchSignal"], overrides=small)


def test_read_items_scores_the_recommended_item_from_the_catalogue(tmp_path):
    """With read_items R_phi reads each recommended item's name and attributes: the same words naming another item
    score differently, and the catalogue travels in the checkpoint."""
    from crslight.data.datamodules import Synthetic

    data = Synthetic(task="pairs", n_dialogues=20, n_items=30, batch_size=4)
    module = RewardModule(backbone="tiny", read_items=True, lr=1e-3, warmup_steps=0)
    seed_everything(0)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, data)
    catalogue = data.corpus("train").catalogue
    first, second = catalogue[0], catalogue[1]
    assert module.item_facts[first["item_id"]].startswith(first["name"] + ": ")
    words = "How about this one? It's a great movie."
    texts = module.reply_texts([words, words, words], [[first["item_id"]], [second["item_id"]], []])
    assert texts[0] == f"{words} | {module.item_facts[first['item_id']]}" and texts[2] == words
    context = turns("Hi! I'm so bored tonight. Can you recommend a comedy movie?")
    scores = module.score(contexts=[context] * 2, replies=[words] * 2,
                          items=[[first["item_id"]], [second["item_id"]]])
    assert scores[0] != scores[1]
    ckpt = tmp_path / "r.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = RewardModule.load(ckpt)
    assert loaded.item_facts == module.item_facts
    assert torch.allclose(loaded.score(contexts=[context] * 2, replies=[words] * 2,
                                       items=[[first["item_id"]], [second["item_id"]]]), scores, atol=1e-5)

"""The reward model R_phi: a transformers backbone and a scalar head, trained on pairs ranked by implicit feedback.

**What it scores.** R_phi(s_t, a_t) reads the dialogue so far (the last ``context_turns`` turns) and the recommender's
reply, and returns one number: how well the seeker is expected to react. It never sees the reaction, so PPO can score
a reply it has just generated. Two encodings. ``cross``: one input — an encoder (MiniLM: 22M parameters, fast on
CPU) reads ``[CLS] context [SEP] reply [SEP]`` mean-pooled, a decoder (SmolLM2) reads ``context\\nRecommender:
reply<eos>`` at its last real token, where causal attention has seen everything. ``siamese``: context and reply are
encoded apart and mean-pooled, as sentence-transformers trained MiniLM, normalised to ``u`` and ``v``; the head reads
``[u, v, u * v]`` and starts as the cosine ``u . v``, MiniLM's zero-shot relevance of the reply to the conversation,
which on ReDial is the best single predictor of the seeker's ``liked`` answers that we found (docs/reward.md). The
context is cut from the left and the reply from the right, so the reply always fits.

**What it learns.** The pairs of :mod:`crslight.data.pairs` (same-context swaps and negatives, turns of one dialogue
ordered by the composite implicit label) with the Bradley-Terry loss of :mod:`crslight.rl.reward_losses`, optionally
with a margin and TRL's reward-centring term; or pointwise regression on the label; or both.

**How.** Manual optimization, the Lightning way: one ``manual_backward`` per batch, global-norm clipping, AdamW, and a
linear warmup then cosine/linear decay stepped by hand (so ``trainer.max_steps`` counts optimizer steps). The head
gets its own learning rate: it starts random while the backbone is pretrained. On two CPU cores the cost is the
backbone's forward and backward; ``trainable_layers`` freezes the embeddings and lower layers (no backward through
them; 0 freezes the whole backbone, the ReDial default), and ``lora`` trains adapters instead. Precision is the
trainer's, as for every stage: ``trainer.precision: bf16-mixed`` runs the backbone under bfloat16 autocast (and so does
a PPO run's, when it scores with R_phi); the pooling, the head and the loss stay float32.

**Evaluation** (``val/...``, ``test/...``): pairwise accuracy (overall and per pair kind), Spearman correlation with the
held-out composite labels of real replies, and AUROC of the reply's score against the questionnaire's ``liked``
answers (items with ``liked`` in {0, 1}; one entry per item a reply mentions).

**For PPO.** ``RewardModule.load(path)`` (a ``.ckpt`` or a folder holding one) and ``score(batch)`` on anything with
``context`` (turn lists or rendered strings) and ``reply`` — a :class:`~crslight.signals.SignalBatch`, say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.regression import SpearmanCorrCoef
from transformers import BertConfig, BertModel

from crslight.data.pairs import PAIR_KINDS, RewardBatch, render_context
from crslight.guards import check_loss, load_weights, naming_refused_file, require_positive
from crslight.models.heads import ScalarHead, gather_last_token
from crslight.models.loading import find_checkpoint, load_backbone, load_tokenizer, tiny_causal_lm
from crslight.models.lora import LoRAConfig, apply_lora, lora_config, lora_hparam, upgrade_lora_hparams
from crslight.models.memory import lean_mlps
from crslight.models.retrieval import attribute_words
from crslight.modules.optim import adamw_with_schedule, optimizer_step, total_optimizer_steps
from crslight.modules.rng import restore_rng_states, save_rng_states
from crslight.rl.reward_losses import bradley_terry_loss, pairwise_accuracy, regression_loss

TINY = "tiny"
"""Backbone alias for tests and smoke runs: a random 2-layer model (hidden 64) over the tokenizer's vocabulary, a
Llama for a decoder's tokenizer and a BERT for an encoder's (one with a CLS token)."""


def tiny_backbone(tokenizer, encoder: bool, seed: int = 0) -> nn.Module:
    """The random model of the ``tiny`` alias (see :data:`TINY`), reproducible by ``seed``."""
    if not encoder:
        return tiny_causal_lm(tokenizer, seed=seed).base_model
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(config, add_pooling_layer=False)


def _stage_metrics() -> nn.ModuleDict:
    metrics = {"accuracy": MeanMetric(), "loss": MeanMetric(), "spearman": SpearmanCorrCoef(), "auc": BinaryAUROC(),
               "liked": SumMetric(), "disliked": SumMetric()}
    metrics.update({f"accuracy_{kind}": MeanMetric() for kind in PAIR_KINDS})
    return nn.ModuleDict(metrics)


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The backbone's list of transformer blocks and its qualified name."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    return None


ITEM_FACTS_KEY = "crslight_item_facts"


class RewardModule(LightningModule):
    """R_phi: backbone + scalar head, trained on :class:`~crslight.data.pairs.RewardBatch` pairs (module docstring).

    Args:
        backbone: An alias (``minilm``, ``smollm2``), a transformers folder, a hub id, or ``tiny`` (a random 2-layer
            model for tests: a Llama, or a BERT when ``backbone_tokenizer`` is an encoder's).
        backbone_tokenizer: The tokenizer's source; None uses ``backbone``'s (``smollm2``'s for ``tiny``).
        encoding: ``cross``: context and reply in one input (attention across both). ``siamese``: each encoded
            alone, pooled and L2-normalised to ``u``, ``v``; the head reads ``[u, v, u * v]`` and starts as the
            cosine ``u . v`` (sentence encoders such as MiniLM already rank relevant replies that way).
        pooling: ``mean`` over real tokens, ``cls`` (first token), ``last`` (last real token); ``auto`` is ``mean``
            for encoders (tokenizers with a CLS token) and ``last`` for decoders.
        context_turns: Dialogue turns kept before the reply (then cut to ``max_tokens`` tokens from the left).
        max_tokens: Tokens per (context, reply) input, special tokens included.
        max_reply_tokens: The reply is cut to this many tokens (from the right).
        loss: ``bradley_terry`` on pairs, ``regression`` (MSE to the composite label), or ``both`` (their sum, the
            regression term weighted by ``regression_weight``).
        margin: Bradley-Terry margin: the chosen reply must win by this much before the loss fades.
        center_rewards_coefficient: Weight of TRL's centring term ``mean((r_c + r_r)^2)``; None or 0 for none.
        regression_weight: Weight of the regression term when ``loss`` is ``both``.
        lr: Peak learning rate of the backbone (AdamW).
        head_lr: Peak learning rate of the scalar head; None uses ``lr``.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        betas: AdamW betas.
        warmup_steps: Optimizer steps of linear warmup.
        lr_schedule: After warmup: ``constant``, ``linear`` or ``cosine`` decay over the run's optimizer steps.
        min_lr_ratio: The decay ends at ``lr * min_lr_ratio``.
        gradient_clip_val: Clip the gradients' global norm to this; None or 0 for no clipping.
        trainable_layers: Train only the top N transformer blocks (embeddings and lower blocks frozen); None trains
            all; 0 freezes the backbone (only the head trains: no backward pass through the backbone). Ignored with
            ``lora``.
        lora: Train LoRA adapters (and the head) instead of the backbone's weights (``r``, ``alpha``, ``dropout``,
            ``target_modules``; ``true`` for the defaults; ``null``: no adapters).
        head_dropout: Dropout on the pooled state before the head.
        dtype: Parameter dtype of the backbone.
        score_batch_size: Samples per forward pass in :meth:`score`.
        init_seed: Seed of the ``tiny`` backbone's random weights.
        trust_remote_code: Allow custom modelling code from the model folder.
        read_items: Read the recommended items themselves, not only the words around them: each reply is scored with
            ``" | "`` and the catalogue's name and attributes of every item it recommends appended (``The Silent River
            (2013): calm drama 2010s``), so a reply naming the wrong item for this seeker scores lower whatever its
            words say. The catalogue comes from the DataModule at ``fit`` and is saved in the checkpoint.
        init_from: Start from a trained R_phi's weights (a ``RewardModule`` checkpoint, or a run folder: its newest
            ``.ckpt``) instead of the backbone's: a refresh on new logs warm-starts here (``crslight refresh``). The
            architecture options must be the ones it was trained with; the optimizer and schedule start afresh.
    """

    def __init__(
        self,
        backbone: str = "minilm",
        backbone_tokenizer: str | None = None,
        encoding: Literal["cross", "siamese"] = "cross",
        pooling: Literal["auto", "mean", "cls", "last"] = "auto",
        context_turns: int | None = 4,
        max_tokens: int = 128,
        max_reply_tokens: int = 48,
        loss: Literal["bradley_terry", "regression", "both"] = "bradley_terry",
        margin: float = 0.0,
        center_rewards_coefficient: float | None = 0.01,
        regression_weight: float = 1.0,
        lr: float = 5e-5,
        head_lr: float | None = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 20,
        lr_schedule: Literal["constant", "linear", "cosine"] = "cosine",
        min_lr_ratio: float = 0.1,
        gradient_clip_val: float | None = 1.0,
        trainable_layers: int | None = None,
        lora: LoRAConfig | bool | None = None,
        head_dropout: float = 0.1,
        dtype: str = "float32",
        score_batch_size: int = 64,
        init_seed: int = 0,
        trust_remote_code: bool = False,
        read_items: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        require_positive(lr=lr)
        if encoding not in ("cross", "siamese"):
            raise ValueError(f"encoding must be 'cross' or 'siamese', got {encoding!r}")
        if loss not in ("bradley_terry", "regression", "both"):
            raise ValueError(f"loss must be 'bradley_terry', 'regression' or 'both', got {loss!r}")
        if max_reply_tokens >= max_tokens:
            raise ValueError("max_reply_tokens must be smaller than max_tokens")
        lora = lora_hparam(lora)  # a plain dict in the hyper-parameters (weights-only checkpoints)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(backbone_tokenizer or ("smollm2" if backbone == TINY else backbone),
                                        padding_side="right", trust_remote_code=trust_remote_code)
        self.tokenizer.truncation_side = "right"
        self.is_encoder = self.tokenizer.cls_token is not None and self.tokenizer.sep_token is not None
        self.pooling = pooling if pooling != "auto" else ("mean" if self.is_encoder else "last")
        if backbone == TINY:
            model = tiny_backbone(self.tokenizer, self.is_encoder, init_seed)
        else:
            model = load_backbone(backbone, dtype=dtype, trust_remote_code=trust_remote_code)
        lean_mlps(model)  # the same gradients with fewer saved activations (crslight.models.memory)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # BERT's pooler is not used: it would be a parameter that never trains
        if lora:
            model = apply_lora(model, lora_config(lora))
        elif trainable_layers is not None:
            self._freeze_lower(model, trainable_layers)
        # from_pretrained returns eval mode: a backbone that trains gets its dropout back; a frozen one stays deterministic
        self.backbone = model.train(any(p.requires_grad for p in model.parameters()))
        hidden = model.config.hidden_size
        self.head = ScalarHead(3 * hidden if encoding == "siamese" else hidden, dropout=head_dropout)
        if encoding == "siamese":  # start as the backbone's cosine similarity of context and reply: sum(u * v)
            with torch.no_grad():
                self.head.proj.weight.zero_()
                self.head.proj.weight[:, 2 * hidden:] = 1.0
        self.metrics = nn.ModuleDict({"val": _stage_metrics(), "test": _stage_metrics()})
        self.item_facts: dict[str, str] = {}
        if init_from:
            self.warm_start(init_from)

    def warm_start(self, path: str | Path) -> None:
        """Loads a trained R_phi's weights (and its catalogue facts) into this one (``init_from``).

        Raises:
            ValueError: the checkpoint is not an R_phi of this architecture (the message names it and what differs).
        """
        checkpoint = find_checkpoint(path)
        if checkpoint is None:
            raise ValueError(f"init_from {path}: no such R_phi checkpoint or run folder")
        state = load_weights(checkpoint)
        weights = state.get("state_dict") if isinstance(state, dict) else None
        if not weights or not any(k.startswith("head.") for k in weights):
            raise ValueError(f"init_from {checkpoint}: not a RewardModule checkpoint (no R_phi head in its weights)")
        try:
            self.load_state_dict(weights)
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
            raise ValueError(f"init_from {checkpoint}: its R_phi does not fit this configuration (keep its backbone, "
                             f"encoding and lora options): {first}") from None
        self.item_facts = dict(state.get(ITEM_FACTS_KEY, {}))

    @staticmethod
    def _freeze_lower(model: nn.Module, trainable_layers: int) -> None:
        """Freezes every parameter before the top ``trainable_layers`` blocks (embeddings included)."""
        found = _layer_list(model)
        if found is None:
            raise ValueError("trainable_layers: could not find the backbone's list of transformer blocks")
        prefix, layers = found
        first_trained = len(layers) - trainable_layers
        before_layers = True
        for name, param in model.named_parameters():
            if name.startswith(prefix + "."):
                before_layers = False
                index = int(name[len(prefix) + 1:].split(".")[0])
                param.requires_grad_(index >= first_trained)
            elif before_layers or trainable_layers == 0:  # 0: the whole backbone, final norm included
                param.requires_grad_(False)

    # -- scoring ------------------------------------------------------------------------------------------------------
    def _tokenize(self, texts: list[str], max_length: int, side: str) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        tok.truncation_side = side
        enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        tok.truncation_side = "right"
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def encode(self, contexts: list, replies: list[str]) -> dict[str, torch.Tensor]:
        """Tokenises (context, reply) inputs: contexts are turn lists (rendered here) or already rendered strings.

        Returns:
            ``cross``: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for encoders that use them), each
            ``(b, t)``. ``siamese``: those of the ``c`` distinct contexts ``(c, t)``, ``context_index`` ``(b,)`` (the
            row of each sample's context), ``reply_input_ids`` and ``reply_attention_mask`` ``(b, r)``.
        """
        hp, tok = self.hparams, self.tokenizer
        contexts = [c if isinstance(c, str) else render_context(c, hp.context_turns) for c in contexts]
        eos = "" if self.is_encoder else (tok.eos_token or "")
        if hp.encoding == "siamese":  # a context shared by several replies (a pair's two sides) is encoded once
            unique = {c: i for i, c in enumerate(dict.fromkeys(contexts))}
            enc = self._tokenize([c + eos for c in unique], hp.max_tokens, "left")
            reply = self._tokenize([r + eos for r in replies], hp.max_reply_tokens, "right")
            index = torch.tensor([unique[c] for c in contexts], device=self.device)
            return {**enc, "reply_input_ids": reply["input_ids"], "reply_attention_mask": reply["attention_mask"],
                    "context_index": index}
        cut = tok(list(replies), add_special_tokens=False, truncation=True, max_length=hp.max_reply_tokens)
        replies = [r if len(ids) < hp.max_reply_tokens else tok.decode(ids)
                   for r, ids in zip(replies, cut["input_ids"], strict=True)]
        if not self.is_encoder:
            texts = [f"{c}\nRecommender: {r}{eos}" for c, r in zip(contexts, replies, strict=True)]
            return self._tokenize(texts, hp.max_tokens, "left")
        tok.truncation_side = "left"
        enc = tok(contexts, replies, truncation="only_first", max_length=hp.max_tokens, padding=True,
                  return_tensors="pt")
        tok.truncation_side = "right"
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        # under the trainer's precision (bf16 autocast with ``bf16-mixed``); pooled in float32
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state.float()
        if self.pooling == "last":
            return gather_last_token(hidden, attention_mask)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reply_input_ids: torch.Tensor | None = None,
                reply_attention_mask: torch.Tensor | None = None, context_index: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """``(b,)`` scores of tokenised inputs (see :meth:`encode`)."""
        pooled = self._pooled(input_ids, attention_mask, **kwargs)
        if reply_input_ids is not None:
            u = F.normalize(pooled, dim=-1)
            u = u if context_index is None else u[context_index]
            v = F.normalize(self._pooled(reply_input_ids, reply_attention_mask), dim=-1)
            pooled = torch.cat([u, v, u * v], dim=-1)
        with torch.autocast(self.device.type, enabled=False):  # the head in float32 under any autocast
            return self.head(pooled)

    def score_texts(self, contexts: list, replies: list[str]) -> torch.Tensor:
        """``(b,)`` scores of (context, reply) inputs, with gradients (training and evaluation use it)."""
        return self(**self.encode(contexts, replies))

    # -- the items a reply recommends ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.read_items and not self.item_facts and hasattr(datamodule, "corpus"):
            catalogue = datamodule.corpus(datamodule.splits["fit"]).catalogue
            attributes = catalogue["attributes"] if "attributes" in catalogue.column_names else [None] * len(catalogue)
            self.item_facts = {item: f"{name}: {attribute_words(attrs)}" if attribute_words(attrs) else name
                               for item, name, attrs in zip(catalogue["item_id"], catalogue["name"], attributes,
                                                            strict=True)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.item_facts:
            checkpoint[ITEM_FACTS_KEY] = self.item_facts
        save_rng_states(checkpoint)  # the dropout after a resume is the uninterrupted run's (crslight.modules.rng)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.item_facts = dict(checkpoint.get(ITEM_FACTS_KEY, {}))
        restore_rng_states(self, checkpoint)  # resuming fit only: load() and test leave the RNGs alone

    def reply_texts(self, replies: list[str], items: list[list[str]] | None) -> list[str]:
        """What R_phi reads of each reply: the reply, and with ``read_items`` the facts of the items it recommends."""
        if not self.hparams.read_items or not items:
            return list(replies)
        if not self.item_facts:
            raise ValueError("read_items: this R_phi has no catalogue (fit it with a crslight DataModule)")
        out = []
        for reply, its in zip(replies, items, strict=True):
            facts = [self.item_facts[i] for i in its if i in self.item_facts]
            out.append(f"{reply} | {'; '.join(facts)}" if facts else reply)
        return out

    @torch.no_grad()
    def score(self, batch=None, replies: list[str] | None = None, contexts: list | None = None,
              items: list[list[str]] | None = None) -> torch.Tensor:
        """R_phi's scores for PPO: ``score(batch)`` on anything with ``context``, ``reply`` and ``items`` (a
        ``SignalBatch``, a ``RewardBatch``), or ``score(contexts=..., replies=..., items=...)``.

        Contexts are schema turn lists or rendered strings. Runs in eval mode, in chunks of ``score_batch_size``.

        Returns:
            ``(b,)`` float32 scores, on the module's device.
        """
        if batch is not None:
            contexts, replies, items = batch.context, batch.reply, getattr(batch, "items", None)
        if contexts is None or replies is None:
            raise ValueError("score needs a batch with context and reply, or contexts= and replies=")
        replies = self.reply_texts(replies, items)
        contexts = [c if isinstance(c, str) else render_context(c, self.hparams.context_turns) for c in contexts]
        # one context's replies together (a siamese R_phi encodes it once per chunk), similar lengths together (less
        # padding); scores are put back in the input's order
        order = sorted(range(len(replies)), key=lambda i: (len(contexts[i]), contexts[i], len(replies[i])))
        was_training = self.training
        self.eval()
        size = self.hparams.score_batch_size
        out = torch.zeros(len(replies), device=self.device)
        try:
            for start in range(0, len(order), size):
                chunk = order[start: start + size]
                out[chunk] = self.score_texts([contexts[i] for i in chunk], [replies[i] for i in chunk]).float()
        finally:
            self.train(was_training)
        return out

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device | None = "cpu") -> RewardModule:
        """A trained R_phi in eval mode, from a ``.ckpt`` or a folder holding checkpoints (its newest ``.ckpt``)."""
        path = find_checkpoint(path) or Path(path)
        hparams = upgrade_lora_hparams(dict(load_weights(path).get("hyper_parameters") or {}))
        with naming_refused_file(path):
            # init_from=None: the file holds every weight, its run's starting point is not needed (nor read)
            return cls.load_from_checkpoint(path, map_location=map_location, weights_only=True, init_from=None,
                                            lora=hparams.get("lora")).eval()

    # -- training -----------------------------------------------------------------------------------------------------
    def losses(self, scores: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
        """The configured loss of a batch's scores."""
        hp = self.hparams
        loss = scores.new_zeros(())
        if hp.loss in ("bradley_terry", "both"):
            loss = loss + bradley_terry_loss(scores[batch.chosen], scores[batch.rejected], hp.margin,
                                             hp.center_rewards_coefficient)
        if hp.loss in ("regression", "both"):
            weight = hp.regression_weight if hp.loss == "both" else 1.0
            loss = loss + weight * regression_loss(scores, batch.label.to(scores.device))
        return loss

    def training_step(self, batch: RewardBatch, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        scores = self.score_texts(batch.context, self.reply_texts(batch.reply, batch.items))
        loss = self.losses(scores, batch)
        check_loss(loss, "R_phi", self.global_step, {"scores": scores})
        self.manual_backward(loss)
        optimizer_step(self, opt, self.hparams.gradient_clip_val)
        scores = scores.detach()
        self.log("train/loss", loss.detach(), prog_bar=True)
        if batch.chosen.numel():
            accuracy = pairwise_accuracy(scores[batch.chosen], scores[batch.rejected]).mean()
            self.log("train/accuracy", accuracy, prog_bar=True)
        self.log("train/reward_mean", scores.mean())
        self.log("train/lr", opt.param_groups[0]["lr"])
        return loss.detach()

    # -- evaluation ---------------------------------------------------------------------------------------------------
    def _eval_step(self, stage: str, batch: RewardBatch) -> None:
        metrics = self.metrics[stage]
        scores = self.score_texts(batch.context, self.reply_texts(batch.reply, batch.items)).float()
        if batch.chosen.numel():
            correct = pairwise_accuracy(scores[batch.chosen], scores[batch.rejected])
            metrics["accuracy"].update(correct)
            for code, kind in enumerate(PAIR_KINDS):
                of_kind = batch.kind.to(scores.device) == code
                if of_kind.any():
                    metrics[f"accuracy_{kind}"].update(correct[of_kind])
            metrics["loss"].update(self.losses(scores, batch), weight=batch.chosen.numel())
        label = batch.label.to(scores.device)
        known = batch.real.to(scores.device) & ~label.isnan()
        if known.any():
            metrics["spearman"].update(scores[known], label[known])
        if batch.liked.numel():
            liked = batch.liked.to(scores.device)
            metrics["auc"].update(scores[batch.liked_index], liked)
            metrics["liked"].update(liked.sum())
            metrics["disliked"].update((1 - liked).sum())

    def _log_epoch(self, stage: str) -> None:
        metrics = self.metrics[stage]
        values = {}
        for name in ["accuracy", "loss"] + [f"accuracy_{kind}" for kind in PAIR_KINDS]:
            if metrics[name].update_called:
                values[f"{stage}/{'pairwise_' if name.startswith('accuracy') else ''}{name}"] = metrics[name].compute()
        if metrics["spearman"].update_called:
            values[f"{stage}/spearman"] = metrics["spearman"].compute()
        if metrics["auc"].update_called and metrics["liked"].compute() > 0 and metrics["disliked"].compute() > 0:
            values[f"{stage}/auc_liked"] = metrics["auc"].compute()
        for name, value in values.items():
            self.log(name, value.float(), prog_bar=name.endswith("/pairwise_accuracy"))
        for metric in metrics.values():
            metric.reset()

    def validation_step(self, batch: RewardBatch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: RewardBatch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # -- optimizer ----------------------------------------------------------------------------------------------------
    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the run (``max_steps`` counts optimizer steps with manual optimization)."""
        return total_optimizer_steps(self._trainer)

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for param in self.backbone.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [
            {"params": decay, "lr": hp.lr, "weight_decay": hp.weight_decay},
            {"params": no_decay, "lr": hp.lr, "weight_decay": 0.0},
            {"params": list(self.head.parameters()), "lr": hp.head_lr or hp.lr, "weight_decay": 0.0},
        ]
        return adamw_with_schedule([g for g in groups if g["params"]], self.total_optimizer_steps(), hp.warmup_steps,
                                   hp.min_lr_ratio, hp.lr_schedule, betas=tuple(hp.betas))

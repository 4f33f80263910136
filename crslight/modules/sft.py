"""Supervised fine-tuning of the policy on the recommender's turns: the "traditional SFT" baseline and PPO's warm start.

The loss is the token-mean cross-entropy over the recommender's tokens only (``SFTBatch.labels`` is ``-100`` on the
system prompt, the seeker's turns, role headers and padding), so the model learns to answer like the recommender and
never to imitate the user. Optimization is manual, the Lightning way (one optimizer step per
``accumulate_grad_batches`` batches, gradient clipping, a warmup + cosine LR schedule stepped by hand), which keeps
SFT, reward-model and PPO training on the same footing. Validation reports the token-weighted loss over the whole
split and its perplexity.

Mixed precision is the Trainer's: ``trainer.precision: bf16-mixed`` runs every forward under bf16 autocast.
"""

from __future__ import annotations

import time
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from crslight.data.datamodules import IGNORE_INDEX, SFTBatch
from crslight.guards import check_loss, require_non_negative, require_positive
from crslight.models.cooccurrence import ease, mention_matrix, top_links
from crslight.models.lora import LoRAConfig, lora_hparam
from crslight.models.retrieval import SlotData, fit_item_scores, retrieval_loss, slot_features
from crslight.modules.evaluation import EvalConfig, eval_config
from crslight.modules.optim import adamw_with_schedule, optimizer_step, total_optimizer_steps
from crslight.modules.policy import PolicyModule


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean next-token cross-entropy over the positions whose label is not ``-100``.

    Args:
        logits: ``(b, t, vocab)``.
        labels: ``(b, t)`` unshifted labels (position ``i`` is predicted from position ``i - 1``).

    Returns:
        ``(loss, n_tokens)``: the mean (0 when no token counts) and how many tokens it averages.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    n_tokens = (shift_labels != IGNORE_INDEX).sum()
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / n_tokens.clamp(min=1), n_tokens


class SFTLoss(NamedTuple):
    """One batch's SFT objective: ``total = lm + ranking_loss_weight * rank``; ``rank`` is None without samples."""

    total: torch.Tensor
    lm: torch.Tensor
    rank: torch.Tensor | None
    n_tokens: torch.Tensor


class SFTModule(PolicyModule):
    """Fine-tunes the policy on recommender turns (``task: sft`` batches); see the module docstring.

    Args:
        model: Policy: an alias (``smollm2``), a transformers folder or a hub id. Also the tokenizer's source.
        init_from: Start from these weights instead of ``model``'s: a crslight checkpoint (LoRA merged) or a folder.
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: Optimizer steps of linear warmup.
        lr_schedule: After warmup: ``constant``, ``linear`` or ``cosine`` decay over the run's optimizer steps.
        min_lr_ratio: The decay ends at ``lr * min_lr_ratio``.
        accumulate_grad_batches: Batches per optimizer step (gradient accumulation).
        gradient_clip_val: Clip the gradients' global norm to this; ``None`` or 0 for no clipping.
        dtype: Parameter dtype of the policy; for bf16 autocast use ``trainer.precision: bf16-mixed``.
        lora: Train LoRA adapters (``r``, ``alpha``, ``dropout``, ``target_modules``; ``true`` for the defaults)
            instead of all weights (``null``).
        gradient_checkpointing: Recompute activations in the backward pass (less memory, slower).
        trust_remote_code: Allow custom modelling code from the model folder.
        ranking_loss_weight: Weight of the item-ranking head's catalogue cross-entropy beside the LM loss (0: off); its
            gradient reaches the policy too, so a heavy weight slows the language model (docs/training.md).
        item_head_epochs: After the last optimizer step, fit the item scores on every recommendation sample of the
            training split for this many epochs (0: off): the trained policy reads each dialogue once, its hidden
            states at the recommendation slots are kept, and the item scores train on them alone (:func:`~crslight.
            models.retrieval.fit_item_head`), so they see the whole split although the LM steps see a few batches.
        item_head_lr: Learning rate of that fit (AdamW).
        item_head_dialogues: Read only the first N training dialogues for it (None: all).
        item_links: Before that fit, link each item to its ``item_links`` strongest co-mentioned items (EASE over all
            training dialogues, :mod:`crslight.models.cooccurrence`): the item scores then read which items the
            dialogue has mentioned, with a learned weight (0: no links).
        item_links_l2: EASE's L2 weight.
        item_head_fits: What that fit trains: ``all`` (the map from hidden states, the per-item bias and the two
            context weights) or ``context`` (only the link weight and the mention bonus; the map is set to zero, so
            the scores read the items the dialogue mentioned and not the hidden state, and the bias is
            ``item_prior`` times the log of one plus each item's count among the training targets). ``context`` is
            for small training splits with a large catalogue, where a free bias per item and a hidden x hidden map
            fitted on a few thousand samples rank the test split worse than the co-mentions alone (ReDial: 10,639
            training samples, 6,924 items). PPO can still train the bias and the map.
        item_prior: With ``item_head_fits: context``, the weight of the popularity prior in the bias (0: none).
        item_text_turns: Give the item scores a text part that reads the context's last ``item_text_turns`` turns
            through a sentence encoder (:mod:`crslight.models.retrieval`), for a new head (0: none; a list such as
            ``[3, 8]``: the last 3 and the last 8 turns together). It is fitted
            alone for ``item_text_epochs`` epochs before the rest, and weighted beside it by the validation split.
        item_text_model: That sentence encoder: ``minilm`` or a local sentence-transformers folder.
        item_text_epochs: Epochs of the text part's fit (on the frozen encoder's embeddings).
        item_text_tune_epochs: Instead, fine-tune a copy of the sentence encoder with the text part for this many
            epochs (:func:`~crslight.models.retrieval.tune_text_encoder`; about 6 minutes an epoch on ReDial's
            training split on a 2-core CPU); the tuned encoder is saved with the item scores (0: keep it frozen).
        item_text_tune_lr: The tuned encoder's learning rate.
        evaluation: ``test``'s simulator episodes after the ranking (:class:`~crslight.modules.evaluation.EvalConfig`:
            ``episodes``, ``max_turns``, ``max_new_tokens``, ``reward_model``).
    """

    trains_item_head = True

    def __init__(
        self,
        model: str = "smollm2",
        init_from: str | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "linear", "cosine"] = "cosine",
        min_lr_ratio: float = 0.1,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = 1.0,
        dtype: str = "float32",
        lora: LoRAConfig | bool | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        ranking_loss_weight: float = 1.0,
        item_head_epochs: int = 0,
        item_head_lr: float = 1e-2,
        item_head_dialogues: int | None = None,
        item_links: int = 0,
        item_links_l2: float = 200.0,
        item_head_fits: Literal["all", "context"] = "all",
        item_prior: float = 0.0,
        item_text_turns: int | list[int] = 0,
        item_text_model: str = "minilm",
        item_text_epochs: int = 8,
        item_text_tune_epochs: int = 0,
        item_text_tune_lr: float = 3e-5,
        evaluation: EvalConfig | None = None,
    ) -> None:
        require_positive(lr=lr)
        require_non_negative(weight_decay=weight_decay, warmup_steps=warmup_steps,
                             item_text_tune_epochs=item_text_tune_epochs)
        require_positive(item_text_tune_lr=item_text_tune_lr)
        lora = lora_hparam(lora)  # a plain dict in the hyper-parameters (weights-only checkpoints)
        super().__init__(model, init_from, dtype, lora, gradient_checkpointing, trust_remote_code, item_text_turns,
                         item_text_model)
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        # the test's settings are the command's, never the checkpoint's: not a hyper-parameter
        self.save_hyperparameters(ignore=["evaluation"])
        self.evaluation = eval_config(evaluation)
        self.val_loss = MeanMetric()  # the language-model loss alone: val/ppl is a perplexity
        self.val_rank_loss = MeanMetric()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The policy's logits ``(b, t, vocab)``."""
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def loss(self, batch: SFTBatch) -> SFTLoss:
        """The batch's :class:`SFTLoss`: cross-entropy on the recommender's tokens only, plus the ranking head's
        catalogue cross-entropy at every recommendation sample (weight ``ranking_loss_weight``)."""
        weight = self.hparams.ranking_loss_weight
        if not weight or self.item_head is None:
            loss, n_tokens = lm_loss(self(batch.input_ids, batch.attention_mask), batch.labels)
            return SFTLoss(loss, loss, None, n_tokens)
        if batch.rec_row is None:  # no sample here: a zero term keeps every DDP rank's gradients in step
            loss, n_tokens = lm_loss(self(batch.input_ids, batch.attention_mask), batch.labels)
            return SFTLoss(loss + 0.0 * sum(p.sum() for p in self.item_head.parameters()), loss, None, n_tokens)
        out = self.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                          output_hidden_states=True)
        loss, n_tokens = lm_loss(out.logits, batch.labels)
        hidden = out.hidden_states[-1][batch.rec_row, batch.rec_position]  # post-norm: what the LM head reads
        scores = self.item_head(hidden, self.policy.get_output_embeddings().weight, batch.rec_previous,
                                self.item_head.encode_contexts(batch.rec_context))
        rank = retrieval_loss(scores, batch.rec_target)
        return SFTLoss(loss + weight * rank, loss, rank, n_tokens)

    # -- training ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: SFTBatch, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        accumulate = self.hparams.accumulate_grad_batches
        loss = self.loss(batch)
        check_loss(loss.total, "SFT", self.global_step, {"language model": loss.lm, "catalogue": loss.rank})
        self.manual_backward(loss.total / accumulate)
        last = batch_idx + 1 == self.trainer.num_training_batches
        if (batch_idx + 1) % accumulate == 0 or last:
            optimizer_step(self, opt, self.hparams.gradient_clip_val)
            if self.hparams.item_head_epochs and self.trainer.global_step >= self.total_optimizer_steps():
                self.fit_item_head()  # before the last checkpoint is written, so it holds the fitted scores
        lm = loss.lm.detach()
        self.log("train/loss", loss.total.detach(), prog_bar=True, sync_dist=True)
        self.log("train/lm_loss", lm, sync_dist=True)
        self.log("train/ppl", torch.exp(lm), sync_dist=True)
        if loss.rank is not None:  # this rank's value: a batch without samples logs nothing, so no collective here
            self.log("train/rank_loss", loss.rank.detach())
        self.log("train/tokens", loss.n_tokens.float(), reduce_fx="sum", sync_dist=True)
        self.log("train/lr", opt.param_groups[0]["lr"], prog_bar=True)
        return loss.total

    def validation_step(self, batch: SFTBatch, batch_idx: int) -> None:
        loss = self.loss(batch)
        if loss.n_tokens > 0:
            self.val_loss.update(loss.lm, weight=loss.n_tokens)
        if loss.rank is not None:
            self.val_rank_loss.update(loss.rank, weight=len(batch.rec_target))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # token-weighted over the whole split, reduced over ranks
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss), sync_dist=True)
        if self.hparams.ranking_loss_weight and self.item_head is not None:  # the same on every rank
            self.log("val/rank_loss", self.val_rank_loss.compute(), sync_dist=True)
        self.val_rank_loss.reset()

    def fit_item_head(self) -> None:
        """Fits the item scores on the policy's slot states over the training split (``item_head_epochs``); the text
        part's weight, if the scores have one, on the validation split."""
        hp, dm = self.hparams, self.trainer.datamodule
        if self.item_head is None or not hasattr(dm, "corpus"):
            return
        start = time.time()
        split = dm.splits["fit"]
        tune = hp.get("item_text_tune_epochs", 0) if self.item_head.reads_text else 0
        train = self.slot_data(split, hp.item_head_dialogues, encode=not tune)  # a tuned encoder re-reads them
        valid = self.slot_data(dm.splits["validate"], encode=not tune) if self.item_head.reads_text else None
        if hp.item_links:  # which items the training split mentions together (all of it: no model pass needed)
            index = dm.corpus(split).item_index
            items, weights = ease(mention_matrix(dm.corpus(split).dialogues["turns"], index), hp.item_links_l2)
            self.item_head.set_links(*top_links(items, weights, self.item_head.num_items, hp.item_links))
        with torch.enable_grad():
            fit = fit_item_scores(self.item_head, train, valid, self.policy.get_output_embeddings().weight,
                                  hp.item_head_epochs, hp.item_head_lr, hp.item_head_fits, hp.item_prior,
                                  hp.item_text_epochs, seed=self.trainer.global_step, tune_epochs=tune,
                                  tune_lr=hp.get("item_text_tune_lr", 3e-5),
                                  log=lambda message: rank_zero_info(f"tuning the text encoder: {message}"))
        fit["seconds"] = time.time() - start
        self.item_head_fit = fit
        text = (f"; text weight {fit['text_weight']} (held-out Recall@1+10+50 {fit['held_out_recall_without_text']:.3f}"
                f" -> {fit['held_out_recall']:.3f} on {fit['held_out_samples']} samples)" if "text_weight" in fit else "")
        rank_zero_info(f"item scores fitted on {fit['samples']} slot states of the {split} split: loss "
                       f"{fit['first_loss']:.3f} -> {fit['last_loss']:.3f} in {hp.item_head_epochs} epochs{text}, "
                       f"{fit['seconds']:.1f} s")

    def slot_data(self, split: str, dialogues: int | None = None, encode: bool = True) -> SlotData:
        """The recommendation samples of a split's first ``dialogues`` dialogues (None: all) as the item scores read
        them; the policy runs over them only when the scores read its hidden states (``item_head_fits: all``);
        ``encode`` False leaves the context embeddings out (:func:`~crslight.models.retrieval.slot_features`)."""
        dm = self.trainer.datamodule
        corpus = dm.corpus(split)
        rows = corpus.dialogues if not dialogues else corpus.dialogues.select(range(min(dialogues,
                                                                                         len(corpus.dialogues))))
        samples = [dm.encode_sft(turns, corpus.item_index, dm.max_length) for turns in rows["turns"]]
        order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))  # little padding
        batches = (dm.collate([samples[i] for i in order[lo : lo + dm.batch_size * 4]])
                   for lo in range(0, len(order), dm.batch_size * 4))
        if self.hparams.item_head_fits == "context":  # the scores do not read the hidden states: no pass of the policy
            return slot_features(None, batches, self.item_head, self.item_head.proj.in_features, encode)
        was_training = self.policy.training
        self.policy.eval()
        with self.trainer.precision_plugin.forward_context():
            data = slot_features(self.policy, batches, self.item_head, encode=encode)
        self.policy.train(was_training)
        return data

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the run (``max_steps`` counts optimizer steps with manual optimization)."""
        return total_optimizer_steps(self._trainer, self.hparams.accumulate_grad_batches)

    def configure_optimizers(self):
        hp = self.hparams
        params = self.trainable_parameters()
        return adamw_with_schedule(params, self.total_optimizer_steps(), hp.warmup_steps, hp.min_lr_ratio,
                                   hp.lr_schedule, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))

"""What the stages that train the policy share: loading it, LoRA, lean checkpoints, RNG state, a merged copy.

:class:`PolicyModule` is the one small base class of :class:`~crslight.modules.sft.SFTModule` and
:class:`~crslight.modules.ppo.PPOModule`. It builds the policy lazily in ``configure_model`` (so parsing a config is
cheap and DDP wraps a model that exists), and makes a checkpoint hold everything a run needs to continue exactly:

- the weights that training changes — the whole policy, or with LoRA only the adapters (plus any other trainable
  part such as a value head), because the frozen base is rebuilt from ``model`` / ``init_from``;
- every rank's RNG states (torch, CUDA, numpy, ``random``), restored when a ``Trainer`` resumes
  (:mod:`crslight.modules.rng`, shared with R_phi);
- ``crslight_module``, the class that wrote it, so :func:`crslight.export.export` rebuilds it without a config;
- whatever a subclass adds in :meth:`extra_state` (PPO: KL controller, reward statistics, counters).

Lightning saves the optimizer, LR scheduler and loop counters itself.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from transformers import PreTrainedModel

from crslight.guards import load_weights
from crslight.models.engine import Engine
from crslight.models.loading import find_checkpoint, fit_vocabulary, load_causal_lm, load_tokenizer
from crslight.models.lora import LoRAConfig, apply_lora, has_adapters, lora_config, upgrade_lora_hparams
from crslight.models.memory import lean_mlps
from crslight.models.retrieval import ItemHead, text_windows
from crslight.models.tokenize import ITEM_TOKEN, title_text
from crslight.modules.evaluation import EvalConfig, PolicyEvaluator
from crslight.modules.rng import restore_rng_states, save_rng_states

MODULE_KEY = "crslight_module"
CATALOGUE_KEY = "crslight_catalogue"
STATE_KEY = "crslight_state"


def merge_lora(model: nn.Module) -> PreTrainedModel:
    """A plain transformers model with any LoRA adapters merged into its weights (the input is not modified)."""
    model = copy.deepcopy(model)
    if has_adapters(model):
        model = model.merge_and_unload()
    return model


class NotAPolicyCheckpoint(ValueError):
    """A checkpoint without a policy in it: an R_phi's (``RewardModule``), or one crslight did not write."""


def load_policy_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LightningModule:
    """Rebuilds the module that wrote a crslight checkpoint (``SFTModule``, ``PPOModule``) with its weights, in eval
    mode. A LoRA checkpoint gets its frozen base from the run's ``model`` / ``init_from``; a full one from ``model``.

    Raises:
        NotAPolicyCheckpoint: the file holds no policy (an R_phi checkpoint says so).
    """
    checkpoint = load_weights(path, map_location)
    class_path = checkpoint.get(MODULE_KEY)
    if class_path is None:
        if {"backbone", "encoding"} <= set(checkpoint.get("hyper_parameters", {})):  # RewardModule's arguments
            raise NotAPolicyCheckpoint(
                f"{path} is an R_phi (RewardModule) checkpoint: it scores replies and holds no policy; use it as PPO's "
                "reward_model or as evaluation.reward_model of crslight test")
        raise NotAPolicyCheckpoint(f"{path} was not written by a crslight policy module (no {MODULE_KEY!r} entry)")
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    hparams = upgrade_lora_hparams(dict(checkpoint.get("hyper_parameters", {})))
    if not hparams.get("lora"):
        hparams["init_from"] = None  # every weight is in the file: no need to load the run's starting point
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {key: value for key, value in hparams.items() if key in accepted}
    if "signal_weights" in kwargs and "signals" not in kwargs:  # the signal objects are not saved as hyper-parameters;
        kwargs["signal_weights"] = None                         # neither they nor their weights change the policy
    module = cls(**kwargs)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)
    return module.to(map_location).eval()


def load_initial_policy(
    init_from: str, dtype: str | torch.dtype, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, ItemHead | None]:
    """The starting policy: a crslight checkpoint (``.ckpt``, or the newest under a run folder; LoRA merged) or a
    transformers folder / alias; with the checkpoint's item-ranking head when it has one."""
    checkpoint = find_checkpoint(init_from)
    if checkpoint is not None:
        module = load_policy_checkpoint(checkpoint)
        policy = merge_lora(module.policy)
        policy = policy.to(dtype=getattr(torch, str(dtype).removeprefix("torch."))) if dtype != "auto" else policy
        return policy, module.item_head
    return load_causal_lm(init_from, dtype=dtype, trust_remote_code=trust_remote_code), None


#: item-score parts added after the first checkpoints were written: an older checkpoint without them still loads
ITEM_HEAD_LATER = ("item_head.link_", "item_head.mention_bonus")


class Hidden:
    """Holds a module outside the LightningModule: not in its ``state_dict``, not moved by Lightning, not in DDP."""

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        self.module = module


class PolicyModule(LightningModule):
    """Base of the modules that train a causal LM ``policy`` (see the module docstring).

    ``item_head`` ranks the catalogue from the policy's hidden states (``crslight.models.retrieval``); it is built for
    the DataModule's catalogue, carried over from an ``init_from`` checkpoint, and trained only where
    ``trains_item_head`` (SFT).

    Args:
        model: Policy: an alias (``smollm2``), a transformers folder or a hub id. Also the tokenizer's source.
        init_from: Start from these weights instead of ``model``'s: a crslight checkpoint (LoRA merged) or a folder.
        dtype: Parameter dtype of the policy (``float32``; ``bfloat16`` halves memory). For bf16 autocast with float32
            weights set ``trainer.precision: bf16-mixed`` instead.
        lora: Train LoRA adapters (:class:`~crslight.models.lora.LoRAConfig`: ``r``, ``alpha``, ``dropout``,
            ``target_modules``; ``true`` for its defaults) instead of all weights (``null``).
        gradient_checkpointing: Recompute activations in the backward pass (less memory, ~30% slower).
        trust_remote_code: Allow custom modelling code from the model folder.
        item_text_turns: A new item head (none carried over from ``init_from``) gets a text part reading the
            context's last ``item_text_turns`` turns (0: none; a list such as ``[3, 8]``: several windows together;
            :mod:`crslight.models.retrieval`).
        item_text_model: The sentence encoder of the item scores' text part: ``minilm`` or a local
            sentence-transformers folder (the one the head was fitted with).
    """

    trains_item_head = False

    def __init__(
        self,
        model: str = "smollm2",
        init_from: str | None = None,
        dtype: str = "float32",
        lora: LoRAConfig | bool | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        item_text_turns: int | list[int] = 0,
        item_text_model: str = "minilm",
    ) -> None:
        super().__init__()
        text_windows(item_text_turns)  # a bad window ends the command with a message (crslight.lightning_cli)
        self.automatic_optimization = False
        self.policy: PreTrainedModel | None = None
        self.item_head: ItemHead | None = None
        self.evaluator: PolicyEvaluator | None = None
        self.item_catalogue: dict[str, list[str]] | None = None  # from a checkpoint: {"item_id": [...], "name": [...]}
        self._tokenizer = None
        # With LoRA a checkpoint holds only the trainable weights; the frozen base comes back from model / init_from.
        self.strict_loading = lora_config(lora) is None

    # -- building ---------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The policy's tokenizer (left padding, a pad token distinct from the end-of-turn token)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.model, trust_remote_code=self.hparams.trust_remote_code,
                                             item_token=True)
        return self._tokenizer

    def load_base_policy(self) -> PreTrainedModel:
        """The policy before LoRA: ``init_from``'s weights when given, else ``model``'s."""
        hp = self.hparams
        if hp.init_from:
            policy, self.item_head = load_initial_policy(hp.init_from, hp.dtype, hp.trust_remote_code)
            return policy
        return load_causal_lm(hp.model, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code)

    def configure_model(self) -> None:
        """Builds ``self.policy`` once (Lightning calls this before DDP wrapping and before restoring a checkpoint)."""
        if self.policy is not None:
            return
        hp = self.hparams
        catalogue = self.catalogue()
        title_starts = None
        if catalogue is not None:  # the slot token starts where a title would: as the mean first token of the titles
            title_starts = [ids[0] for ids in self.tokenizer([title_text(n) for n in catalogue["name"]],
                                                             add_special_tokens=False)["input_ids"] if ids]
        policy = fit_vocabulary(self.load_base_policy(), self.tokenizer, title_starts)
        slot = self.tokenizer.convert_tokens_to_ids(ITEM_TOKEN)
        lean_mlps(policy)  # the same gradients with fewer saved activations (crslight.models.memory)
        if hp.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.config.use_cache = False
        if hp.lora:
            if hp.gradient_checkpointing:
                policy.enable_input_require_grads()
            policy = apply_lora(policy, lora_config(hp.lora), trainable_tokens=[slot])
        self.policy = policy.train()  # from_pretrained returns eval mode; PPO switches dropout off itself
        self.build_extra()
        if self.item_head is None:
            if catalogue is not None:  # the item scores over the DataModule's catalogue (crslight.models.retrieval)
                attributes = catalogue["attributes"] if "attributes" in catalogue.column_names else None
                self.item_head = ItemHead.for_catalogue(policy, self.tokenizer, catalogue["name"], attributes,
                                                        text_turns=self.hparams.get("item_text_turns", 0),
                                                        text_model=self.text_model)
        if self.item_head is not None:
            self.item_head.text_model = self.text_model
            self.item_head.requires_grad_(self.trains_item_head)

    @property
    def text_model(self) -> str:
        """The sentence encoder of the item scores' text part."""
        return self.hparams.get("item_text_model", "minilm")

    def catalogue(self):
        """The DataModule's item catalogue (a ``datasets.Dataset``); None without a crslight DataModule."""
        trainer = getattr(self, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "corpus"):
            return None
        return datamodule.corpus("test").catalogue

    def engine(self, **settings) -> Engine:
        """The decoding engine over this policy and its item scores (:mod:`crslight.models.engine`)."""
        catalogue = self.catalogue() if self.item_head is not None else None
        names = catalogue["name"] if catalogue is not None else None
        head = self.item_head if names is not None else None
        return Engine(self.policy, self.tokenizer, head, names, **settings)

    def build_extra(self) -> None:
        """Hook for subclasses: build the parts that depend on the policy (value head, reference, reward model)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def checkpoint_keys(self) -> set[str] | None:
        """The ``state_dict`` keys a checkpoint keeps; ``None`` keeps them all (no LoRA).

        Subclasses drop parts that are rebuilt, never trained (a frozen reference copy, the reward model).
        """
        if not self.hparams.lora:
            return None
        keep = {name for name, p in self.named_parameters() if p.requires_grad}
        return keep | {name for name in self.state_dict() if name.startswith("item_head.")}

    def extra_state(self) -> dict[str, Any]:
        """Hook for subclasses: mutable state beyond weights and optimizers (restored by :meth:`load_extra_state`)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`extra_state` returned."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint[MODULE_KEY] = f"{cls.__module__}.{cls.__qualname__}"
        keep = self.checkpoint_keys()
        if keep is not None:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[STATE_KEY] = self.extra_state()
        catalogue = self.catalogue()
        if catalogue is not None:  # ids and names in the item scores' row order: export and chat write titles
            checkpoint[CATALOGUE_KEY] = {"item_id": list(catalogue["item_id"]), "name": list(catalogue["name"])}
        elif self.item_catalogue is not None:
            checkpoint[CATALOGUE_KEY] = self.item_catalogue
        save_rng_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        has_text = "item_head.text_items" in state
        tuned = any(k.startswith("item_head.text_encoder.") for k in state)
        if "item_head.title_ids" in state and (self.item_head is None or self.item_head.reads_text != has_text
                                               or (self.item_head.text_encoder is not None) != tuned):
            # shaped like the checkpoint's head (a head built for the catalogue may lack its text part or its tuned
            # text encoder)
            self.item_head = ItemHead.from_state_dict(state, "item_head.", self.text_model).requires_grad_(
                self.trains_item_head)
        elif self.item_head is not None and "item_head.link_index" in state:
            # links are fitted at the end of SFT: a head built fresh for the catalogue has none yet
            self.item_head.set_links(state["item_head.link_index"], state["item_head.link_value"])
        self.load_extra_state(checkpoint.get(STATE_KEY, {}))
        self.item_catalogue = checkpoint.get(CATALOGUE_KEY, self.item_catalogue)
        restore_rng_states(self, checkpoint)  # resuming fit, not evaluating

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Like ``nn.Module.load_state_dict``; without strictness it still insists on every weight a checkpoint keeps."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if not strict:
            keep = self.checkpoint_keys()
            missing = sorted(set(result.missing_keys) & keep) if keep is not None else result.missing_keys
            missing = [k for k in missing if not k.startswith(ITEM_HEAD_LATER)]
            if missing:
                raise RuntimeError(f"checkpoint lacks trained weights: {missing[:5]} ({len(missing)} in all)")
        return result

    # -- evaluation -------------------------------------------------------------------------------------------------
    def on_test_start(self) -> None:
        if self.item_head is None:
            raise RuntimeError("testing a policy needs a crslight DataModule (ReDial, OpenDialKG, Synthetic) for the "
                               "catalogue its ranking head scores")
        hp = self.hparams
        settings = getattr(self, "evaluation", None) or EvalConfig()
        self.evaluator = PolicyEvaluator(
            len(self.item_head.title_offsets), episodes=settings.episodes, max_turns=settings.max_turns,
            max_new_tokens=settings.max_new_tokens, reward_model=settings.reward_model or hp.get("reward_model"),
        ).to(self.device)
        # LoRA adapters folded into the weights for the test (undone in on_test_end): same outputs, one matmul per layer
        self._merged_for_test = has_adapters(self.policy)
        if self._merged_for_test:
            self.policy.merge_adapter()

    def on_test_end(self) -> None:
        if getattr(self, "_merged_for_test", False):
            self.policy.unmerge_adapter()
            self._merged_for_test = False

    def test_step(self, batch, batch_idx: int) -> None:
        """Ranks the catalogue at every recommendation sample of a dialogue batch (``crslight.modules.evaluation``)."""
        self.evaluator.step(self.policy, self.item_head, batch)

    def on_test_epoch_end(self) -> None:
        """Ranking metrics, then simulator episodes (satisfaction, coherence, distinct-2), logged as ``test/...``.
        The episodes' generation runs under the trainer's precision (bf16 autocast with ``bf16-mixed``), as
        ``test_step`` does; Lightning applies it to steps only."""
        with self.trainer.precision_plugin.forward_context():
            metrics = self.evaluator.finish(self.policy, self.tokenizer, self.trainer.datamodule,
                                            rank=self.global_rank, world_size=self.trainer.world_size,
                                            item_head=self.item_head)
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, sync_dist=False)  # torchmetrics reduced them

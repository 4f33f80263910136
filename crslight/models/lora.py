"""LoRA through peft, and the adapters-off view of a model that serves as PPO's reference policy.

With LoRA the frozen base weights *are* the reference policy pi_ref: switching the adapters off for
one forward pass gives its logits without a second copy of the model in memory (TRL does the same
with ``peft_model.disable_adapter()``). :func:`disabled_adapters` does this for a peft model or for
any module that contains one (a LightningModule holding the policy and a value head, say), and puts
every adapter flag and ``requires_grad`` flag back exactly as it found them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers import PreTrainedModel

_ADAPTER_LAYERS = (BaseTunerLayer, AuxiliaryTrainingWrapper)


@dataclass
class LoRAConfig:
    """LoRA adapters: what a module's ``lora`` option holds (``lora: {r: 16, alpha: 32}`` in YAML; ``lora: true`` is
    these defaults, ``lora: null`` or ``false`` trains every weight instead).

    Args:
        r: Rank of the update matrices.
        alpha: Scaling numerator; the update is multiplied by ``alpha / r``.
        dropout: Dropout on the adapters' input (keep 0 for PPO: its ratios need a deterministic policy).
        target_modules: Modules to adapt; ``all-linear`` is every linear layer but the output head, ``None`` peft's
            default for the architecture (``q_proj``/``v_proj`` on Llama).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str | None = "all-linear"


#: the flat LoRA arguments of checkpoints written before :class:`LoRAConfig`, and the field each one became
RETIRED_LORA_ARGUMENTS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                          "lora_target_modules": "target_modules"}


def lora_config(value: LoRAConfig | dict | bool | None) -> LoRAConfig | None:
    """A ``lora`` option as a :class:`LoRAConfig`, or None for no adapters: ``True`` is the defaults, a dict (a
    checkpoint's hyper-parameters) its fields."""
    if value is None or value is False:
        return None
    if value is True:
        return LoRAConfig()
    if isinstance(value, dict):
        return LoRAConfig(**value)
    if isinstance(value, LoRAConfig):
        return value
    raise TypeError(f"lora must be true/false, null or a mapping of {', '.join(LoRAConfig.__dataclass_fields__)}; "
                    f"got {value!r}")


def lora_hparam(value: LoRAConfig | dict | bool | None) -> dict | None:
    """A ``lora`` option as saved in hyper-parameters: a plain dict (checkpoints load with ``weights_only=True``,
    which refuses any class of ours), or None."""
    config = lora_config(value)
    return asdict(config) if config is not None else None


def upgrade_lora_hparams(hparams: dict) -> dict:
    """A checkpoint's hyper-parameters with the retired flat arguments (``lora: true, lora_r: 8, ...``) folded into
    ``lora`` (``{"r": 8, ...}``), so checkpoints written before :class:`LoRAConfig` load; others are unchanged."""
    retired = {field: hparams.pop(key) for key, field in RETIRED_LORA_ARGUMENTS.items() if key in hparams}
    if retired and hparams.get("lora") is True:
        hparams["lora"] = asdict(LoRAConfig(**retired))
    return hparams


def apply_lora(
    model: PreTrainedModel,
    config: LoRAConfig,
    trainable_tokens: list[int] | None = None,
) -> PeftModel:
    """Wraps ``model`` with fresh LoRA adapters; only the adapters are trainable afterwards.

    The base weights are frozen and shared, so :func:`disabled_adapters` gives the reference policy.
    New adapters start as an identity (LoRA's B matrix is zero), so right after this call the
    model's outputs equal the base model's.

    Args:
        model: A transformers model. Causal LMs become ``PeftModelForCausalLM`` (``generate`` works),
            anything else a feature-extraction peft model.
        config: The adapters (:class:`LoRAConfig`).
        trainable_tokens: Token ids whose embedding rows train too (input and tied output rows; peft's
            ``trainable_token_indices``): a token added to the vocabulary, such as the recommendation slot, has no
            trained embedding to adapt. Their trained rows are saved with the adapters and merged with them.

    Returns:
        The peft model wrapping ``model`` (which is modified in place).
    """
    is_causal_lm = bool(getattr(model, "can_generate", lambda: False)())
    config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        trainable_token_indices=list(trainable_tokens) if trainable_tokens else None,
        task_type=TaskType.CAUSAL_LM if is_causal_lm else TaskType.FEATURE_EXTRACTION,
    )
    return get_peft_model(model, config)


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` contains any peft adapter layer."""
    return any(isinstance(module, _ADAPTER_LAYERS) for module in model.modules())


@contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Runs the enclosed block with every LoRA adapter in ``model`` switched off.

    Inside the block ``model`` computes the base model's outputs (the PPO reference policy); on exit,
    even after an exception, each adapter is enabled or disabled as it was before and every
    parameter's ``requires_grad`` is restored (peft's own toggle would re-enable gradients on
    adapters that had been frozen). Train/eval mode is not touched.

    Example:
        >>> with torch.no_grad(), disabled_adapters(policy):
        ...     ref_logits = policy(input_ids, attention_mask=attention_mask).logits

    Args:
        model: A peft model, or any module that contains adapter layers.

    Yields:
        ``model`` itself.

    Raises:
        ValueError: If ``model`` has no adapters: it would silently be its own reference, so keep a
            frozen copy for the reference instead.
    """
    layers = [module for module in model.modules() if isinstance(module, _ADAPTER_LAYERS)]
    if not layers:
        raise ValueError("model has no LoRA adapters; without LoRA the reference policy must be a separate copy")
    was_disabled = [layer.disable_adapters for layer in layers]
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, disabled in zip(layers, was_disabled, strict=True):
            layer.enable_adapters(not disabled)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)

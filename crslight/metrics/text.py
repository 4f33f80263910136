"""Metrics of generated replies: Distinct-n and context coherence."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from crslight.models.encoder import SentenceEncoder

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (``"Hi, there!"`` → ``["hi", ",", "there", "!"]``)."""
    return _TOKEN.findall(text.lower())


def _stable_hash(ngram: tuple[str, ...]) -> int:
    """A 63-bit hash that is the same in every process (Python's ``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(ngram).encode(), digest_size=8).digest(), "little") >> 1


class DistinctN(Metric):
    """Distinct-n (Li et al., NAACL 2016): distinct n-grams over all n-grams of all generated replies.

    ``distinct-n = |{n-grams of the corpus}| / (number of n-grams in the corpus)`` over the lower-cased word and
    punctuation tokens of the replies. Each update keeps the hashes of its distinct n-grams (``cat`` states, so the
    count is exact across DDP ranks) and adds its n-gram count (``sum``).

    Args:
        n: the n-gram orders; ``compute()`` returns ``{"distinct-1": ..., "distinct-2": ...}``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, n: Sequence[int] = (1, 2), **kwargs):
        super().__init__(**kwargs)
        if not n or min(n) < 1:
            raise ValueError(f"n must be a non-empty list of positive orders, got {n!r}")
        self.n = [int(x) for x in n]
        for order in self.n:
            self.add_state(f"hashes_{order}", [], dist_reduce_fx="cat")
            self.add_state(f"count_{order}", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, replies: Sequence[str]) -> None:
        """Adds generated replies."""
        toks = [tokens(r) for r in replies]
        for order in self.n:
            grams = [tuple(t[i : i + order]) for t in toks for i in range(len(t) - order + 1)]
            distinct = sorted({_stable_hash(g) for g in grams})
            getattr(self, f"hashes_{order}").append(torch.tensor(distinct, dtype=torch.long, device=self.device))
            setattr(self, f"count_{order}", getattr(self, f"count_{order}") + len(grams))

    def compute(self) -> dict[str, torch.Tensor]:
        out = {}
        for order in self.n:
            count = getattr(self, f"count_{order}")
            hashes = getattr(self, f"hashes_{order}")
            if isinstance(hashes, list):
                hashes = dim_zero_cat(hashes) if hashes else torch.zeros(0, dtype=torch.long)
            value = hashes.unique().numel() / count if count > 0 else torch.tensor(math.nan)
            out[f"distinct-{order}"] = torch.as_tensor(value, dtype=torch.float32)
        return out


def context_text(context: str | Sequence[dict], turns: int) -> str:
    """A context as text: a string as given, or the last ``turns`` schema turns' texts joined by newlines."""
    if isinstance(context, str):
        return context
    return "\n".join(t["text"] for t in list(context)[-turns:])


class Coherence(Metric):
    """Semantic coherence of replies with their context: the mean MiniLM cosine between context and reply.

    For a sample with context turns ``c_1 .. c_m`` and reply ``r``::

        coherence = e(c_{m-T+1} + "\\n" + ... + "\\n" + c_m) . e(r)

    where ``T = context_turns`` and ``e`` is the L2-normalised all-MiniLM-L6-v2 sentence embedding (mean pooling,
    inputs truncated to the model's 256 word pieces). The metric is the mean over samples; range [-1, 1]. It measures
    topical fit with the recent dialogue, not correctness.

    Args:
        context_turns: the most recent turns used as context (``T``).
        model: ``"minilm"`` or a local sentence-transformers folder.
        batch_size: texts per encoder forward pass.
        dtype: the encoder's precision (``float32`` by default: an evaluation number should not depend on the CPU;
            ``auto`` / ``bfloat16`` are about twice as fast on CPUs with native bf16).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, context_turns: int = 2, model: str = "minilm", batch_size: int = 64, dtype: str = "float32",
                 **kwargs):
        super().__init__(**kwargs)
        self.context_turns = context_turns
        self._encoder = SentenceEncoder(model, batch_size=batch_size, dtype=dtype, cache_size=10_000)
        self.add_state("total_cosine", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, contexts: Sequence[str | Sequence[dict]], replies: Sequence[str]) -> None:
        """Adds samples: contexts as text or as lists of schema turns, and the replies to them."""
        if len(contexts) != len(replies):
            raise ValueError(f"got {len(contexts)} contexts and {len(replies)} replies")
        if not replies:
            return
        texts = [context_text(c, self.context_turns) for c in contexts]
        a = self._encoder.encode(texts)
        b = self._encoder.encode(list(replies))
        self.total_cosine += (a * b).sum(1).double().sum().to(self.total.device)
        self.total += len(replies)

    def compute(self) -> torch.Tensor:
        return (self.total_cosine / self.total).float() if self.total > 0 else torch.tensor(math.nan)

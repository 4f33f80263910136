"""How well the recommendation matches what the seeker asked for, in MiniLM embedding space."""

from __future__ import annotations

import math
from typing import Literal

import torch

from crslight.models.encoder import SentenceEncoder
from crslight.schema import SEEKER
from crslight.signals.base import SignalBatch, SignalExtractor


class SemanticRelevanceSignal(SignalExtractor):
    """Cosine similarity between what was recommended and what the seeker said they want.

    With ``e(x)`` the L2-normalised all-MiniLM-L6-v2 embedding (mean pooling; Reimers & Gurevych, EMNLP 2019)::

        want      = normalise(mean of e(t) over the last ``context_turns`` seeker turns before the reply that have at
                    least ``min_words`` words: "hi" or "yes" says nothing about what the seeker wants)
        offer     = normalise(mean of e(name) over the reply's item names)      (target="items")
                    e(reply)                                                     (target="reply", or "items_or_reply"
                                                                                   when the reply names no item)
        value     = want . offer

    Range [-1, 1] (in practice [-0.1, 0.8]). Unit: cosine. NaN when the seeker has not said anything of
    ``min_words`` words before the reply, and,
    for ``target="items"``, when the reply mentions no item (the signal rates recommendations, not chit-chat).

    Every distinct text is encoded once (batched) and its embedding cached, so a turn that is context for several
    replies costs one forward pass.

    Args:
        model: ``"minilm"`` or a local sentence-transformers folder.
        target: what stands for the recommendation: the item names, the reply text, or the names when there are any
            and else the reply.
        context_turns: how many of the seeker's most recent turns describe what they want.
        min_words: seeker turns shorter than this are skipped when picking those turns.
        batch_size: texts per encoder forward pass.
        device: where the encoder runs.
        dtype: the encoder's precision: ``auto`` (bfloat16 on a CPU with native bf16 instructions, where it is about
            twice as fast, else float32), ``float32`` or ``bfloat16``. Cosines differ by less than 0.005 between the
            two; pin ``float32`` for bit-identical labels across machines.
    """

    range = (-1.0, 1.0)
    unit = "cosine"

    def __init__(self, model: str = "minilm", target: Literal["items", "reply", "items_or_reply"] = "items",
                 context_turns: int = 2, min_words: int = 3, batch_size: int = 64, device: str = "cpu",
                 dtype: Literal["auto", "float32", "bfloat16"] = "auto"):
        if target not in ("items", "reply", "items_or_reply"):
            raise ValueError(f"target must be 'items', 'reply' or 'items_or_reply', got {target!r}")
        if context_turns < 1:
            raise ValueError("context_turns must be at least 1")
        self.model = model
        self.target = target
        self.context_turns = context_turns
        self.min_words = min_words
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self._encoder = SentenceEncoder(model, batch_size=batch_size, device=device, dtype=dtype)

    def _offer(self, reply: str, names: list[str]) -> list[str]:
        if self.target == "reply" or (self.target == "items_or_reply" and not names):
            return [reply]
        return list(names)

    def extract(self, batch: SignalBatch) -> list[float]:
        wants, offers = [], []
        for context, reply, names in zip(batch.context, batch.reply, batch.item_names, strict=True):
            offer = self._offer(reply, names)
            seeker = [t["text"] for t in context if t["role"] == SEEKER and len(t["text"].split()) >= self.min_words]
            want = seeker[-self.context_turns :]
            # a transition without an offer or a want is NaN: encode nothing for it
            wants.append(want if offer else [])
            offers.append(offer if want else [])
        texts = list(dict.fromkeys(t for group in wants + offers for t in group))
        if not texts:
            return [math.nan] * len(batch)
        index = {t: i for i, t in enumerate(texts)}
        embeddings = self._encoder.encode(texts)
        out = []
        for want, offer in zip(wants, offers, strict=True):
            if not want or not offer:
                out.append(math.nan)
                continue
            a = torch.nn.functional.normalize(embeddings[[index[t] for t in want]].mean(0), dim=0)
            b = torch.nn.functional.normalize(embeddings[[index[t] for t in offer]].mean(0), dim=0)
            out.append(float(a @ b))
        return out

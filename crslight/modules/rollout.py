"""Rollouts for PPO: replies decoded by the engine, and the token layout PPO trains on.

One *sample* is one recommender reply: the prompt the policy saw (token ids exactly as fed to the engine) and the
reply it produced (ids up to and including the end-of-turn token). Multi-turn episodes give one sample per turn; the
episode ties them together through the turn-level return (``PPOModule``). Samples are packed as

    [pad ... prompt | reply ... pad]        prompts left-padded to a common width ``start``, replies right-padded

so every action token sits at a column ``>= start`` and a forward pass needs logits for the last ``t - start + 1``
positions only (``logits_to_keep``), not for the long prompts.

**Recommendations are actions too.** A reply that recommends holds the slot token, then the title of the item the
policy's item scores drew there (:mod:`crslight.models.engine`). The slot token is a sampled action; the title's tokens
were written in, so ``response_mask`` is 0 on them; and the item drawn is recorded as a *slot* (row, column of the slot
token, catalogue row, rows that could not be drawn), whose log-probability PPO adds to the slot token's.

DDP: each rank decodes its own rollouts; the engine's loop has no collective operation, so ranks that need different
numbers of decoding steps never wait for each other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from crslight.models.engine import EnginePolicy, Generation

__all__ = ["EnginePolicy", "Samples", "pack", "position_ids"]


class Samples(NamedTuple):
    """Packed samples (``b`` replies).

    Attributes:
        input_ids: ``(b, t)`` prompt (left-padded to ``start``) then reply (right-padded).
        attention_mask: ``(b, t)`` 1 on real tokens.
        response_mask: ``(b, t)`` 1 on the sampled reply tokens (the actions); 0 on titles written in.
        start: the column of every reply's first token.
        slots: ``(s, 3)`` long: per recommendation, its row, the column of its slot token, the catalogue row drawn.
        slot_exclude: ``(s, m)`` catalogue rows the draw could not take (``-1``-padded).
        slot_alternatives: ``(s, k)`` the further items drawn at each slot (``item_alternatives``; ``k = 0``
            without), shown to the same user to compare items in one state.
        slot_text: ``(s, d)`` the context's embedding at each slot when the item scores read text (``(0, 0)``
            otherwise).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    start: int
    slots: torch.Tensor = torch.zeros(0, 3, dtype=torch.long)
    slot_exclude: torch.Tensor = torch.full((0, 1), -1, dtype=torch.long)
    slot_alternatives: torch.Tensor = torch.zeros(0, 0, dtype=torch.long)
    slot_text: torch.Tensor = torch.zeros(0, 0)

    @property
    def slot_items(self) -> torch.Tensor:
        """``(s, 1 + k)``: per slot, the item drawn, then its alternatives."""
        return torch.cat([self.slots[:, 2:3], self.slot_alternatives], dim=1)

    def slots_of(self, rows: torch.Tensor | list[int]) -> torch.Tensor:
        """Indices of the slots in ``rows``, in the order :meth:`select` keeps them."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return torch.isin(self.slots[:, 0], rows).nonzero().flatten() if len(self.slots) else rows.new_zeros(0)

    def select(self, rows: torch.Tensor | list[int]) -> Samples:
        """The rows ``rows``, with columns that are padding in all of them cut off (``start`` moves with the cut)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        ids, mask, resp = self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows]
        real = mask.any(0).nonzero()
        left, right = min(int(real.min()), self.start - 1), int(real.max()) + 1
        new_row = torch.full((self.input_ids.shape[0],), -1, dtype=torch.long)
        new_row[rows] = torch.arange(len(rows))
        keep = self.slots_of(rows)
        slots = self.slots[keep].clone()
        if len(slots):
            slots[:, 0] = new_row[slots[:, 0]]
            slots[:, 1] -= left
        text = self.slot_text[keep] if self.slot_text.numel() else self.slot_text
        return Samples(ids[:, left:right], mask[:, left:right], resp[:, left:right], self.start - left, slots,
                       self.slot_exclude[keep], self.slot_alternatives[keep], text)


def pack(prompts: list[list[int]], replies: list[list[int]] | list[Generation], pad_id: int) -> Samples:
    """Lays out prompts and replies (token lists, or the engine's :class:`Generation` with their slots) as
    :class:`Samples`."""
    generations = [r if isinstance(r, Generation) else Generation(list(r), [True] * len(r)) for r in replies]
    replies = [g.tokens for g in generations]
    start = max(len(p) for p in prompts)
    width = start + max(max(len(r) for r in replies), 1)
    b = len(prompts)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    response_mask = torch.zeros((b, width), dtype=torch.long)
    for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        input_ids[i, start - len(prompt) : start] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, start - len(prompt) : start + len(reply)] = 1
        if reply:
            input_ids[i, start : start + len(reply)] = torch.tensor(reply, dtype=torch.long)
            response_mask[i, start : start + len(reply)] = torch.tensor(generations[i].sampled, dtype=torch.long)
    slots = [(i, start + offset, item) for i, g in enumerate(generations) for offset, item in g.slots]
    excluded = [rows or [-1] for g in generations for rows in g.excluded]
    width = max((len(x) for x in excluded), default=1)
    alternatives = [rows for g in generations for rows in g.alternatives]
    if len(alternatives) != len(slots) or len({len(a) for a in alternatives}) > 1:
        alternatives = [[] for _ in slots]  # alternatives only when every slot has the same number
    texts = [g.text for g in generations for _ in g.slots]
    text = torch.stack(texts) if texts and all(t is not None for t in texts) else torch.zeros(0, 0)
    return Samples(input_ids, attention_mask, response_mask, start,
                   torch.tensor(slots, dtype=torch.long).reshape(-1, 3),
                   torch.tensor([x + [-1] * (width - len(x)) for x in excluded], dtype=torch.long).reshape(-1, width),
                   torch.tensor(alternatives, dtype=torch.long).reshape(len(slots), len(alternatives[0]) if slots else 0),
                   text)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``generate`` counts them for left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

"""The signal contract: a :class:`SignalBatch` of transitions in, one float per transition out.

A *transition* is one recommender reply and what followed it: the dialogue so far (``context``), the reply, the items
it mentions, and the seeker's reaction (their next turn, its timing, their questionnaire answers). Real dialogues give
transitions through :func:`transitions`; the user simulator builds the same :class:`SignalBatch` from an episode.

A :class:`SignalExtractor` maps a batch to a ``(b,)`` float tensor. It is deterministic, and returns NaN where the
signal is not defined for a sample (no reaction, no timing, no label ...): the *coverage* of a signal is its non-NaN
fraction, and :class:`~crslight.signals.composite.CompositeLabel` treats NaN as missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from crslight.schema import RECOMMENDER, SEEKER


@dataclass
class SignalBatch:
    """``b`` transitions, field-wise (every field is a list of length ``b``).

    Attributes:
        context: the schema turns before the reply (``{role, text, items, time, end_time}`` dicts).
        reply: the recommender's reply text.
        items: item ids the reply mentions.
        item_names: the names of those items (same order as ``items``).
        reaction: the seeker's next turn text; None when the dialogue ended after the reply.
        dwell_time: seconds between the end of the reply and the reaction; NaN when unknown.
        labels: questionnaire answers for the reply's items, ``{item: {"suggested", "seen", "liked"}}``
            (1 yes, 0 no, 2 did not say); empty when there are none.
        rating: the dialogue's rating on its source's scale; NaN when none.
        accepted: 1 / 0 when a simulator says whether the recommendation was accepted; NaN when unknown.
        continues: True when the dialogue goes on after the reaction (the seeker did not leave).
    """

    context: list[list[dict]]
    reply: list[str]
    items: list[list[str]]
    item_names: list[list[str]]
    reaction: list[str | None]
    dwell_time: list[float]
    labels: list[dict[str, dict]]
    rating: list[float]
    accepted: list[float]
    continues: list[bool]

    def __post_init__(self) -> None:
        lengths = {f.name: len(getattr(self, f.name)) for f in fields(self)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"SignalBatch fields must have one length, got {lengths}")

    def __len__(self) -> int:
        return len(self.reply)

    def __getitem__(self, index: slice | list[int]) -> SignalBatch:
        """The sub-batch of a slice or of a list of indices."""
        if isinstance(index, slice):
            return SignalBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})
        return SignalBatch(**{f.name: [getattr(self, f.name)[i] for i in index] for f in fields(self)})

    def chunks(self, size: int):
        """Yields consecutive sub-batches of at most ``size`` transitions."""
        for start in range(0, len(self), size):
            yield self[start : start + size]

    @staticmethod
    def concat(batches: list[SignalBatch]) -> SignalBatch:
        """One batch of all transitions of ``batches``, in order."""
        return SignalBatch(**{f.name: [x for b in batches for x in getattr(b, f.name)] for f in fields(SignalBatch)})


class SignalExtractor:
    """Base of every implicit-feedback signal (plugins subclass it and implement :meth:`extract`).

    Subclasses document, as class attributes, what the number means: ``range`` (the closed interval of defined
    values), ``unit`` and ``higher_is_better`` (whether a larger value is more positive feedback). Constructor
    arguments are the YAML keys.
    """

    range: ClassVar[tuple[float, float]] = (-math.inf, math.inf)
    unit: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True

    @property
    def name(self) -> str:
        """The signal's name in reports (its class name)."""
        return type(self).__name__

    def extract(self, batch: SignalBatch) -> torch.Tensor | list[float]:
        """The signal of every transition in ``batch``: ``b`` floats, NaN where undefined."""
        raise NotImplementedError

    def __call__(self, batch: SignalBatch) -> torch.Tensor:
        """Runs :meth:`extract` and checks its output.

        Returns:
            ``(b,)`` float32 tensor, NaN where the signal is not defined for a sample.
        """
        values = torch.as_tensor(self.extract(batch), dtype=torch.float32).reshape(-1)
        if values.numel() != len(batch):
            raise ValueError(f"{self.name} returned {values.numel()} values for a batch of {len(batch)}")
        return values

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def coverage(values: torch.Tensor) -> float:
    """The fraction of samples where a signal is defined (non-NaN); NaN for an empty tensor."""
    return float((~values.isnan()).float().mean()) if values.numel() else math.nan


def last_turn(context: list[dict], role: str = SEEKER) -> dict | None:
    """The last turn of ``role`` in a context, or None."""
    for t in reversed(context):
        if t["role"] == role:
            return t
    return None


def transitions(corpus: Any, max_items: int | None = None) -> SignalBatch:
    """One transition per recommender turn (except a dialogue's first turn) of a corpus's dialogues.

    The reaction is the first seeker turn after the reply (None when there is none: the seeker left); the dwell time
    is that turn's ``time`` minus the reply's ``end_time``; the dialogue ``continues`` when any turn follows the
    reaction. ``labels`` keeps the questionnaire answers of the reply's items; ``accepted`` is NaN (only a simulator
    knows it).

    Args:
        corpus: a :class:`crslight.data.Corpus` (item names from its catalogue), or a dialogues ``datasets.Dataset``
            / list of schema dialogues (item ids stand in for names).
        max_items: keep only the first ``max_items`` transitions, in corpus order; None keeps all.
    """
    dialogues = getattr(corpus, "dialogues", corpus)
    catalogue = getattr(corpus, "catalogue", None)
    names: dict[str, str] = {}
    if catalogue is not None:
        names = dict(zip(catalogue["item_id"], catalogue["name"], strict=True))
    columns = {f.name: [] for f in fields(SignalBatch)}
    if isinstance(dialogues, list):
        rows = ((d["turns"], d.get("labels", []), d.get("rating", math.nan)) for d in dialogues)
    else:
        rows = zip(dialogues["turns"], dialogues["labels"], dialogues["rating"], strict=True)
    for turns, labels, rating in rows:
        answers = {lab["item"]: {k: int(lab[k]) for k in ("suggested", "seen", "liked")} for lab in labels}
        rating = math.nan if rating is None else float(rating)
        for t in range(1, len(turns)):
            if max_items is not None and len(columns["reply"]) >= max_items:
                return SignalBatch(**columns)
            reply = turns[t]
            if reply["role"] != RECOMMENDER:
                continue
            r = next((j for j in range(t + 1, len(turns)) if turns[j]["role"] == SEEKER), None)
            reaction = turns[r] if r is not None else None
            items = list(reply["items"])
            dwell = math.nan
            if reaction is not None and reaction["time"] is not None and reply["end_time"] is not None:
                dwell = float(reaction["time"]) - float(reply["end_time"])
            columns["context"].append(turns[:t])
            columns["reply"].append(reply["text"])
            columns["items"].append(items)
            columns["item_names"].append([names.get(i, i) for i in items])
            columns["reaction"].append(None if reaction is None else reaction["text"])
            columns["dwell_time"].append(dwell)
            columns["labels"].append({i: answers[i] for i in items if i in answers})
            columns["rating"].append(rating)
            columns["accepted"].append(math.nan)
            columns["continues"].append(r is not None and r + 1 < len(turns))
    return SignalBatch(**columns)

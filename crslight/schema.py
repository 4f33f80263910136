"""The one canonical schema every source is converted to.

A *dialogue* is a row of a Hugging Face ``datasets.Dataset`` (Arrow-backed, memory-mapped from the cache)::

    dialogue_id: str
    turns: list of {role: "seeker" | "recommender", text: str, items: list[str],
                    time: float  (seconds from the dialogue's start of the turn's first message; NaN if unknown),
                    end_time: float  (offset of the turn's last message; NaN if unknown)}
    labels: list of {item: str, suggested: int, seen: int, liked: int}
            per-item questionnaire answers (ReDial; the synthetic scenario emits the same form):
            1 = yes, 0 = no, 2 = did not say  (``suggested`` 1 = proposed by the recommender)
    rating: float   dialogue-level satisfaction on the source's scale (OpenDialKG ``dialog_rating`` 1..5); NaN if none
    persona: str    JSON of the seeker's latent persona (synthetic scenario only; "" for real sources)

The *catalogue* is a ``Dataset`` with ``item_id: str``, ``name: str``, ``popularity: float`` (mentions in the source's
own counts, or the generator's popularity), and ``attributes: str`` (free text such as ``"genre=comedy; era=1990s"``,
empty when the source has none).

A *recommendation sample* follows the CRSLab / UniCRS protocol: one per (recommender turn, item that turn mentions).
It is a view on the dialogues (indices, not copied text): see :func:`rec_samples`.

Layering: the schema stands below the data layer and the signals, which both read schema turns; it imports neither
(only ``datasets``), so ``crslight.data`` may use the signals (``crslight.data.pairs``) without a cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import datasets

SEEKER = "seeker"
RECOMMENDER = "recommender"
Role = Literal["seeker", "recommender"]

#: Questionnaire code for "did not say" (ReDial's own convention).
NOT_SAID = 2

TURN_FEATURES = {
    "role": datasets.Value("string"),
    "text": datasets.Value("string"),
    "items": datasets.Sequence(datasets.Value("string")),
    "time": datasets.Value("float32"),
    "end_time": datasets.Value("float32"),
}
LABEL_FEATURES = {
    "item": datasets.Value("string"),
    "suggested": datasets.Value("int8"),
    "seen": datasets.Value("int8"),
    "liked": datasets.Value("int8"),
}
DIALOGUE_FEATURES = datasets.Features(
    {
        "dialogue_id": datasets.Value("string"),
        "turns": datasets.List(TURN_FEATURES),
        "labels": datasets.List(LABEL_FEATURES),
        "rating": datasets.Value("float32"),
        "persona": datasets.Value("string"),
    }
)
CATALOGUE_FEATURES = datasets.Features(
    {
        "item_id": datasets.Value("string"),
        "name": datasets.Value("string"),
        "popularity": datasets.Value("float32"),
        "attributes": datasets.Value("string"),
    }
)


def turn(role: Role, text: str, items: list[str] | None = None, time: float = math.nan, end_time: float | None = None):
    """Builds one turn as the schema's plain dict."""
    return {
        "role": role,
        "text": text,
        "items": list(items or []),
        "time": float(time),
        "end_time": float(time if end_time is None else end_time),
    }


@dataclass(frozen=True)
class RecSample:
    """One recommendation sample: the recommender turn ``turn`` of dialogue ``dialogue`` mentions ``item``.

    The context is ``turns[:turn]`` of that dialogue; ``previous_items`` are the items mentioned in it (by either side).
    """

    dialogue: int
    turn: int
    item: str
    previous_items: tuple[str, ...]

    @property
    def is_new(self) -> bool:
        """True when the target was not mentioned earlier in the dialogue (the stricter protocol variant)."""
        return self.item not in self.previous_items


def context_lines(turns: list[dict]) -> list[str]:
    """``"role: text"`` per turn of a dialogue context: what item scores with a text part read (the last few)."""
    return [f"{turn['role']}: {turn['text']}" for turn in turns]


def rec_samples_of(dialogue_index: int, turns: list[dict]) -> list[RecSample]:
    """The recommendation samples of one dialogue, in turn order (first recommender turn excluded only if it has no items)."""
    out: list[RecSample] = []
    seen: list[str] = []
    for t, tr in enumerate(turns):
        if tr["role"] == RECOMMENDER and t > 0:
            prev = tuple(dict.fromkeys(seen))
            for item in dict.fromkeys(tr["items"]):
                out.append(RecSample(dialogue_index, t, item, prev))
        seen.extend(tr["items"])
    return out


def rec_samples(dialogues: datasets.Dataset) -> list[RecSample]:
    """All recommendation samples of a split (one per recommender turn and item it mentions, context non-empty)."""
    out: list[RecSample] = []
    for i, turns in enumerate(dialogues["turns"]):
        out.extend(rec_samples_of(i, turns))
    return out

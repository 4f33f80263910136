"""The user-simulator interface: a hidden user state, a reaction to each recommender reply, a satisfaction score.

A simulator is the environment's transition function s_t → a_t → s_{t+1}: given the dialogue so far and the policy's
reply (with the catalogue items the item linker found in it), it answers with an utterance *and* the implicit signals
a real user would leave behind: dwell time before answering, sentiment, whether a suggestion was accepted, whether the
user keeps talking or leaves. Those are exactly the fields the signal extractors read from real logs, so a reward
model trained on real dialogues can score simulated ones.

Design choices:

- **State is explicit and per episode** (:class:`UserState`), and every random draw goes through the episode's own
  ``numpy.random.Generator``: a simulator object holds no mutable state, so episodes are reproducible and can be run
  in any batch composition.
- **Hidden information stays hidden.** The state holds what the user wants (targets) and what they have seen or
  disliked; the policy only ever sees the dialogue turns.
- **Batched hook.** :meth:`UserSimulator.react_batch` defaults to a loop over :meth:`UserSimulator.react`; a
  simulator backed by a language model overrides it to generate all utterances in one ``generate`` call.
- **One satisfaction formula** for every built-in (:func:`satisfaction`), on the 1-5 scale of OpenDialKG ratings and
  of the synthetic scenario: ``3 + 2 * accepted - 0.7 * unsuccessful turns - 0.5 * left``, clipped to [1, 5]. It is
  the synthetic generator's rating without its noise, plus a penalty for driving the user away.

Plugins: a third-party simulator subclasses :class:`UserSimulator` and declares an entry point in the group
``crslight.simulators`` (entry-point name = class name), as the built-ins do in crslight's ``pyproject.toml``;
:func:`crslight.simulator.env.simulator_class` resolves a name through the plugin registry. This module knows none of
its subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from crslight.schema import RECOMMENDER


@dataclass
class Reaction:
    """The simulated user's answer to one recommender reply.

    Attributes:
        text: the user's utterance.
        kind: ``accept``, ``reject`` (items suggested, none taken) or ``other`` (no item in the reply): the dwell
            condition.
        accepted: whether the user took up a suggestion (ends the episode).
        left: whether the user leaves after this answer (ends the episode).
        sentiment: the user's latent sentiment in [-1, 1] (the utterance is worded to match).
        dwell_time: seconds between the end of the reply and the user's answer.
        items: the catalogue items the simulator read in the reply.
        labels: questionnaire-style answers per item of the reply, ``{item: {"suggested", "seen", "liked"}}``
            (1 yes, 0 no, 2 did not say), as in ``crslight.signals.base.SignalBatch``.
        mentions: catalogue items the utterance names (the user turn's ``items``).
    """

    text: str
    kind: str
    accepted: bool
    left: bool
    sentiment: float
    dwell_time: float
    items: list[str] = field(default_factory=list)
    labels: dict[str, dict] = field(default_factory=dict)
    mentions: list[str] = field(default_factory=list)

    @property
    def continues(self) -> bool:
        """Whether the user keeps engaging (did not leave); an acceptance counts as engaging."""
        return not self.left


@dataclass
class UserState:
    """What one simulated user knows and wants, and how the episode went so far (mutable, one per episode).

    Attributes:
        dialogue_id: the real or synthetic dialogue the user is grounded in.
        targets: items the user would accept (hidden from the policy).
        seen: items the user has already seen (rejected as such).
        disliked: items the user did not like.
        liked: items the user has seen and liked (told to the recommender as hints).
        persona: the synthetic persona, when there is one.
        hinted: hints already given.
        suggested: items suggested so far, in order.
        failures: replies that did not end in an acceptance.
        accepted: item accepted, if any.
        left: whether the user left.
    """

    dialogue_id: str
    targets: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    disliked: set[str] = field(default_factory=set)
    liked: list[str] = field(default_factory=list)
    persona: dict | None = None
    hinted: set[str] = field(default_factory=set)
    suggested: list[str] = field(default_factory=list)
    failures: int = 0
    accepted: str | None = None
    left: bool = False


def satisfaction(accepted: bool, failures: int, left: bool) -> float:
    """Episode satisfaction on a 1-5 scale (module docstring)."""
    return float(np.clip(3.0 + 2.0 * accepted - 0.7 * failures - 0.5 * left, 1.0, 5.0))


def catalogue_rows(catalogue) -> list[dict]:
    """Catalogue rows as dicts from a ``datasets.Dataset``, a dict of columns or a list of row dicts."""
    if isinstance(catalogue, list):
        return [dict(r) for r in catalogue]
    columns = {k: list(catalogue[k]) for k in ("item_id", "name", "popularity", "attributes")}
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def accepted_turn(dialogue: dict) -> int | None:
    """Index of the first recommender turn that mentions an item the seeker accepted (liked, not seen), if any."""
    accepted = {a["item"] for a in dialogue.get("labels") or [] if a["liked"] == 1 and a["seen"] != 1}
    for t, tr in enumerate(dialogue["turns"]):
        if tr["role"] == RECOMMENDER and accepted.intersection(tr["items"]):
            return t
    return None


class UserSimulator(ABC):
    """Base class of user simulators (one level of inheritance: subclasses implement :meth:`start` and
    :meth:`react`)."""

    def prefix_points(self, dialogue: dict) -> list[int]:
        """Where an episode may start in ``dialogue``: indices ``t`` of recommender turns (the context is
        ``turns[:t]``). Empty when the dialogue cannot ground a user. Default: every recommender turn after the first
        turn, up to the first one that names an accepted item."""
        turns = dialogue["turns"]
        last = accepted_turn(dialogue)
        stop = len(turns) if last is None else last + 1
        return [t for t in range(1, stop) if turns[t]["role"] == RECOMMENDER]

    @abstractmethod
    def start(self, dialogue: dict, prefix_len: int, rng: np.random.Generator) -> UserState:
        """The hidden state of the user of ``dialogue`` for an episode whose context is ``turns[:prefix_len]``."""

    @abstractmethod
    def react(
        self, state: UserState, context: list[dict], reply: str, items: list[str], rng: np.random.Generator
    ) -> Reaction:
        """The user's reaction to ``reply`` (which mentions ``items``); updates ``state``."""

    def react_batch(
        self,
        states: list[UserState],
        contexts: list[list[dict]],
        replies: list[str],
        items: list[list[str]],
        rngs: list[np.random.Generator],
    ) -> list[Reaction]:
        """:meth:`react` for a batch of episodes (override to batch model calls)."""
        return [self.react(*args) for args in zip(states, contexts, replies, items, rngs, strict=True)]

    def satisfaction(self, state: UserState) -> float:
        """The episode's satisfaction on the 1-5 scale (see :func:`satisfaction`)."""
        return satisfaction(state.accepted is not None, state.failures, state.left)


"""The conversation environment: episodes of policy replies and simulated user reactions, batched and seeded.

An episode starts from a dialogue prefix — the context before a recommender turn of a real (or synthetic) dialogue —
and alternates a policy reply (a_t) with the simulated user's reaction (s_{t+1}) for up to ``max_turns`` replies. It
ends on the first of: the user **accepts** a suggestion, the user **leaves**, or the **turn limit**; the ending is
recorded. Every step yields a :class:`Transition` carrying the implicit signals of the reaction, and
:func:`signal_fields` / :func:`to_signal_batch` lay transitions out as the signal extractors'
``crslight.signals.base.SignalBatch``, so simulated episodes are scored by the same code as real logs.

Reproducibility: episode ``i`` draws everything — which dialogue, where in it, every simulator decision — from its
own ``numpy.random.default_rng([seed, i])``. Episodes run in lock-step batches only to batch the policy's calls;
as long as the policy answers a context the same way in any batch (the baselines do; a sampling LM does not), the
episodes are identical for every batch size. Dialogues are eligible when the simulator finds a prefix to start from
(``UserSimulator.prefix_points``); the episode picks one uniformly, then a prefix uniformly.

Time: simulated turns continue the prefix's clock. A reply takes ``len(words) / typing_speed`` seconds to write, the
user's turn starts ``dwell_time`` seconds after the reply ends, so ``next.time - reply.end_time`` of a simulated
dialogue is its dwell time, exactly as in the real ReDial gaps the dwell model was fitted on.

One factory, :func:`build_environment`, assembles the environment of a corpus split for every user of it: ``crslight
simulate``, the test episodes of ``crslight test`` and the pipeline (``crslight.modules.evaluation.run_episodes``),
and PPO's rollouts (``PPOModule.setup``). It picks the dataset's default simulator (:func:`default_simulator`: a
:class:`~crslight.simulator.GroundedSimulator` for ReDial, with the dwell model refitted from the train split of
``root``, and for OpenDialKG, with a neutral style and the ReDial dwell model since OpenDialKG has no timestamps; a
:class:`~crslight.simulator.PersonaSimulator` for the synthetic scenario) or one by class name, and the catalogue's
item linker (:func:`linker_for`, built once per process).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crslight import plugins
from crslight.schema import RECOMMENDER, SEEKER, turn
from crslight.simulator.base import Reaction, UserSimulator, UserState, catalogue_rows
from crslight.simulator.dwell import REDIAL_DWELL, redial_dwell
from crslight.simulator.grounded import GroundedSimulator
from crslight.simulator.linker import ItemLinker
from crslight.simulator.persona import PersonaSimulator

Policy = Callable[[list[list[dict]]], list[str]]
SimulatorFactory = Callable[[Any], UserSimulator]
"""A user simulator still missing its item catalogue: called with the split's catalogue, it returns the simulator. In
a config it is a class path with the simulator's other arguments (``{class_path: GroundedSimulator, init_args:
{leave_step: 0.2}}``, or only the class name), which jsonargparse turns into such a callable; in Python a class or a
``functools.partial`` of one."""
ENDINGS = ("accept", "leave", "turn_limit")


@dataclass
class Transition:
    """One step: the context, the policy's reply (with the items read in it) and the user's reaction.

    Attributes:
        episode: index of the episode.
        step: 0-based reply number within the episode.
        context: the dialogue before the reply (schema turns).
        reply: the policy's reply.
        items: catalogue ids the linker found in the reply.
        item_names: their names.
        reaction: the simulated user's reaction (utterance and signals).
        rating: the episode's satisfaction (1-5), filled in when the episode ends (NaN before).
        alternatives: per recommendation of a reply that carries alternatives (``Reply.alternatives``), the same user
            in the same state shown the reply itself and then each alternative (:meth:`ConversationEnv.item_groups`).
    """

    episode: int
    step: int
    context: list[dict]
    reply: str
    items: list[str]
    item_names: list[str]
    reaction: Reaction
    rating: float = math.nan
    alternatives: list[list[Transition]] = field(default_factory=list)


@dataclass
class Episode:
    """One finished episode.

    Attributes:
        index: the episode's index (its seed is ``(seed, index)``).
        dialogue_id: the dialogue it started from.
        prefix_len: number of real turns in the starting context.
        turns: the whole dialogue: the prefix, then a recommender and a seeker turn per step.
        transitions: one per step.
        ending: ``accept``, ``leave`` or ``turn_limit``.
        satisfaction: the user's satisfaction (1-5).
        state: the user's final hidden state.
    """

    index: int
    dialogue_id: str
    prefix_len: int
    turns: list[dict]
    transitions: list[Transition] = field(default_factory=list)
    ending: str | None = None
    satisfaction: float = math.nan
    state: UserState | None = None

    @property
    def accepted(self) -> bool:
        return self.ending == "accept"

    @property
    def steps(self) -> int:
        return len(self.transitions)


class ConversationEnv:
    """Runs policies against a user simulator on episodes drawn from a split's dialogues.

    Args:
        dialogues: the split's dialogues (``Corpus.dialogues`` or a list of schema dicts).
        catalogue: the item catalogue (for item names; ``Corpus.catalogue``, dict of columns or list of rows).
        simulator: the user simulator.
        linker: reads items in replies; built from the catalogue when None.
        max_turns: replies per episode at most.
        seed: base seed; episode ``i`` uses ``default_rng([seed, i])``.
        typing_speed: words per second at which a reply is written (for turn times).
    """

    def __init__(
        self,
        dialogues,
        catalogue,
        simulator: UserSimulator,
        linker: ItemLinker | None = None,
        max_turns: int = 5,
        seed: int = 0,
        typing_speed: float = 2.0,
    ):
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        self.dialogues = dialogues.to_list() if hasattr(dialogues, "to_list") else list(dialogues)
        self.names = {r["item_id"]: r["name"] for r in catalogue_rows(catalogue)}
        self.simulator = simulator
        self.linker = linker or ItemLinker.from_catalogue(catalogue)
        self.max_turns, self.seed, self.typing_speed = max_turns, seed, typing_speed
        self.starts: list[tuple[int, list[int]]] = []
        for d, dialogue in enumerate(self.dialogues):
            points = simulator.prefix_points(dialogue)
            if points:
                self.starts.append((d, points))
        if not self.starts:
            raise ValueError("no dialogue can start an episode with this simulator (no prefix points)")

    @classmethod
    def from_corpus(cls, corpus, simulator: UserSimulator, **kwargs) -> ConversationEnv:
        """An environment over a ``crslight.data.Corpus`` split."""
        return cls(corpus.dialogues, corpus.catalogue, simulator, **kwargs)

    def _begin(self, index: int) -> tuple[Episode, UserState, np.random.Generator]:
        rng = np.random.default_rng([self.seed, index])
        d, points = self.starts[int(rng.integers(len(self.starts)))]
        prefix_len = points[int(rng.integers(len(points)))]
        dialogue = self.dialogues[d]
        state = self.simulator.start(dialogue, prefix_len, rng)
        prefix = [dict(t, items=list(t["items"])) for t in dialogue["turns"][:prefix_len]]
        return Episode(index, dialogue["dialogue_id"], prefix_len, prefix, state=state), state, rng

    def _clock(self, turns: list[dict]) -> float:
        times = [t["end_time"] for t in turns if math.isfinite(t["end_time"])]
        return times[-1] if times else 0.0

    def rollout(self, policy: Policy, episodes: int | Sequence[int], batch_size: int = 32) -> list[Episode]:
        """Runs episodes ``range(episodes)`` (or the given indices) and returns them in that order.

        Args:
            policy: ``policy(contexts) -> replies`` (batched).
            episodes: how many episodes, or which episode indices.
            batch_size: episodes run in lock-step (one policy call per step of a batch).
        """
        indices = list(range(episodes)) if isinstance(episodes, int) else list(episodes)
        out: list[Episode] = []
        for lo in range(0, len(indices), batch_size):
            out.extend(self._run_batch(policy, indices[lo : lo + batch_size]))
        return out

    def items_of(self, replies: list[str]) -> list[list[str]]:
        """The items each reply recommends: those it carries (``crslight.models.engine.Reply.items``: the policy's
        own choice, named in its text), else what the linker reads in its words."""
        linked = self.linker.link_batch([r for r in replies if getattr(r, "items", None) is None])[::-1]
        return [list(r.items) if getattr(r, "items", None) is not None else linked.pop() for r in replies]

    def item_groups(self, episodes: list[Episode], states: list[UserState], rngs: list[np.random.Generator],
                    step: int, contexts: list[list[dict]], replies: list[str]) -> list[list[list[Transition]]]:
        """Per reply, per recommendation that has alternatives: the user's reaction to the reply itself and to each
        alternative (the same words, another item at that slot), every one from a copy of the user's state and
        random generator as they are before the reply: the same user, the same moment, the same chance draws, so
        the group differs only in the item. Nothing of the episode itself changes. A reaction that ends the episode
        (acceptance, leaving, the last turn) is rated with the satisfaction the episode would end with; others NaN.
        """
        jobs = [(k, s, option) for k, reply in enumerate(replies)
                for s, alternatives in enumerate(getattr(reply, "alternatives", None) or [])
                for option in [reply, *alternatives]]
        out: list[list[list[Transition]]] = [
            [[] for _ in getattr(reply, "alternatives", None) or []] for reply in replies]
        if not jobs:
            return out
        copies = [copy.deepcopy(states[k]) for k, _, _ in jobs]
        rngs = [copy.deepcopy(rngs[k]) for k, _, _ in jobs]
        options = [option for _, _, option in jobs]
        reactions = self.simulator.react_batch(copies, [contexts[k] for k, _, _ in jobs], options,
                                               self.items_of(options), rngs)
        for (k, s, option), state, reaction in zip(jobs, copies, reactions, strict=True):
            ends = reaction.accepted or reaction.left or step == self.max_turns - 1
            items = list(reaction.items)
            out[k][s].append(Transition(episodes[k].index, step, contexts[k], option, items,
                                        [self.names.get(i, i) for i in items], reaction,
                                        self.simulator.satisfaction(state) if ends else math.nan))
        return out

    def _run_batch(self, policy: Policy, indices: list[int]) -> list[Episode]:
        running = [self._begin(i) for i in indices]
        active = list(range(len(running)))
        for step in range(self.max_turns):
            if not active:
                break
            episodes = [running[k][0] for k in active]
            contexts = [list(e.turns) for e in episodes]
            replies = policy(contexts)
            if len(replies) != len(contexts):
                raise ValueError(f"policy returned {len(replies)} replies for {len(contexts)} contexts")
            items = self.items_of(replies)
            groups = self.item_groups(episodes, [running[k][1] for k in active], [running[k][2] for k in active],
                                      step, contexts, replies)
            reactions = self.simulator.react_batch(
                [running[k][1] for k in active], contexts, list(replies), items, [running[k][2] for k in active]
            )
            still = []
            for k, episode, context, reply, its, reaction, group in zip(
                active, episodes, contexts, replies, items, reactions, groups, strict=True
            ):
                start = self._clock(episode.turns) + len(reply.split()) / self.typing_speed
                episode.turns.append(turn(RECOMMENDER, reply, its, time=start))
                answer = start + reaction.dwell_time
                episode.turns.append(turn(SEEKER, reaction.text, reaction.mentions, time=answer))
                names = [self.names.get(i, i) for i in its]
                episode.transitions.append(Transition(episode.index, step, context, reply, its, names, reaction,
                                                      alternatives=group))
                if reaction.accepted:
                    episode.ending = "accept"
                elif reaction.left:
                    episode.ending = "leave"
                elif step == self.max_turns - 1:
                    episode.ending = "turn_limit"
                else:
                    still.append(k)
            active = still
        finished = []
        for episode, state, _ in running:
            episode.satisfaction = self.simulator.satisfaction(state)
            for t in episode.transitions:
                t.rating = episode.satisfaction
            finished.append(episode)
        return finished


def summarise(episodes: list[Episode]) -> dict:
    """Acceptance rate, mean satisfaction, mean turns (replies) per episode, and how many episodes ended each way."""
    n = len(episodes)
    transitions = [t for e in episodes for t in e.transitions]
    return {
        "episodes": n,
        "acceptance_rate": sum(e.accepted for e in episodes) / n if n else math.nan,
        "mean_satisfaction": float(np.mean([e.satisfaction for e in episodes])) if n else math.nan,
        "mean_turns": float(np.mean([e.steps for e in episodes])) if n else math.nan,
        "endings": {k: sum(e.ending == k for e in episodes) for k in ENDINGS},
        "mean_dwell_time": float(np.mean([t.reaction.dwell_time for t in transitions])) if transitions else math.nan,
        "mean_sentiment": float(np.mean([t.reaction.sentiment for t in transitions])) if transitions else math.nan,
    }


def signal_fields(transitions: list[Transition]) -> dict[str, list]:
    """Transitions as the columns of ``crslight.signals.base.SignalBatch`` (lists of length b)."""
    return {
        "context": [t.context for t in transitions],
        "reply": [t.reply for t in transitions],
        "items": [list(t.items) for t in transitions],
        "item_names": [list(t.item_names) for t in transitions],
        "reaction": [t.reaction.text for t in transitions],
        "dwell_time": [float(t.reaction.dwell_time) for t in transitions],
        "labels": [dict(t.reaction.labels) for t in transitions],
        "rating": [float(t.rating) for t in transitions],
        "accepted": [float(t.reaction.accepted) for t in transitions],
        "continues": [t.reaction.continues for t in transitions],
    }


def to_signal_batch(transitions: list[Transition]):
    """Transitions as a ``crslight.signals.base.SignalBatch`` (imported here: the signals layer is optional)."""
    from crslight.signals.base import SignalBatch

    return SignalBatch(**signal_fields(transitions))


_LINKERS: dict[tuple[str, str], ItemLinker] = {}


def linker_for(corpus) -> ItemLinker:
    """The item linker of a corpus's catalogue, built once per process (OpenDialKG's takes seconds)."""
    key = (corpus.name, getattr(corpus.catalogue, "_fingerprint", str(id(corpus.catalogue))))
    if key not in _LINKERS:
        _LINKERS[key] = ItemLinker.from_catalogue(corpus.catalogue)
    return _LINKERS[key]


def default_simulator(corpus, root: str | None = None) -> UserSimulator:
    """The built-in simulator for a corpus (module docstring)."""
    if corpus.name == "synthetic":
        return PersonaSimulator(corpus.catalogue)
    if corpus.name == "redial":
        return GroundedSimulator(corpus.catalogue, dwell=redial_dwell(root) if root else REDIAL_DWELL)
    return GroundedSimulator(corpus.catalogue, dwell=REDIAL_DWELL, style="opendialkg", noun="one")


def simulator_class(name: str) -> type[UserSimulator]:
    """The simulator class registered as ``name`` in the entry-point group ``crslight.simulators``, through the plugin
    registry (:func:`crslight.plugins.get`); the built-ins (``GroundedSimulator``, ``LMSimulator``,
    ``PersonaSimulator``) are declared there like any plugin.

    Raises:
        ValueError: no simulator of that name (the message lists the known ones), or its plugin failed to import.
        TypeError: the entry point is not a :class:`UserSimulator` subclass.
    """
    group = plugins.GROUPS["simulators"]
    try:
        cls = plugins.get(group, name)
    except plugins.UnknownPluginError as err:
        if name in plugins.load_plugins()[group]:  # declared, failed to import: the registry's message says why
            raise ValueError(f"simulator {name!r}: {err}") from None
        known = ", ".join(plugins.available(group)) or "none installed"
        raise ValueError(f"unknown simulator {name!r}: the {group} entry points are {known}; a config may also say "
                         f"auto for the dataset's default") from None
    if not (isinstance(cls, type) and issubclass(cls, UserSimulator)):
        plugin = plugins.load_plugins()[group][name]
        raise TypeError(f"entry point {name!r} ({plugin.class_path}, from {plugin.distribution}) is not a "
                        f"UserSimulator")
    return cls


def build_environment(corpus, simulator: str | SimulatorFactory = "auto", root: str | None = None,
                      max_turns: int = 5, seed: int = 0) -> ConversationEnv:
    """The conversation environment over a corpus split: the one way crslight assembles it (module docstring).

    Args:
        corpus: the split (``crslight.data.Corpus``) whose dialogues start the episodes.
        simulator: ``auto`` for the dataset's default (:func:`default_simulator`); a simulator class name (an entry
            point of ``crslight.simulators``, built-ins included: :func:`simulator_class`), built with its defaults;
            or a :data:`SimulatorFactory` (a config's ``class_path`` + ``init_args``, a ``functools.partial``),
            called with the split's catalogue.
        root: the dataset's folder (ReDial's default simulator refits its dwell model from the train split there).
        max_turns: replies per episode at most.
        seed: base seed; episode ``i`` uses ``default_rng([seed, i])``.

    Raises:
        ValueError: an unknown simulator name (the message lists the known ones).
        TypeError: the factory built something that is not a :class:`UserSimulator`.
    """
    if simulator == "auto":
        user = default_simulator(corpus, root)
    else:
        factory = simulator_class(simulator) if isinstance(simulator, str) else simulator
        user = factory(corpus.catalogue)
        if not isinstance(user, UserSimulator):
            raise TypeError(f"simulator {simulator!r} built a {type(user).__name__}, not a UserSimulator")
    return ConversationEnv.from_corpus(corpus, user, linker=linker_for(corpus), max_turns=max_turns, seed=seed)

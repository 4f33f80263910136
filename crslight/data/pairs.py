"""Reward-model data: (context, reply) samples scored by the composite implicit label, and preference pairs of them.

A *sample* is one recommender reply in its context (the turns before it; the reward model renders them with
:func:`render_context` and keeps as many as it is configured to). A real sample (one per recommender turn, in the
order of :func:`crslight.signals.transitions`) carries the composite weak label of the seeker's reaction (a
:class:`~crslight.signals.CompositeLabel` fitted on the *train* split's signals, weights from YAML) and the
questionnaire ``liked`` answers (0/1) of the items it mentions. The reward model sees only context and reply, never the
reaction: R_phi(s_t, a_t) must score a reply PPO has just generated, before any user reacts.

Pairs (chosen, rejected), all anchored in one dialogue and built deterministically from ``seed`` and the split:

- ``swap`` — one context, two replies of the *same seeker's* dialogue: the real reply whose items the seeker said they
  liked (all answered items liked) against another reply of that dialogue whose items they said they disliked (none
  liked), moved into the first one's context. The seeker, their tastes and the conversation are held fixed; only the
  recommendation differs, which is the cleanest preference the questionnaire gives. Rare on ReDial (few dislikes).
- ``negative`` — one context: the real reply (label >= ``positive_threshold``) against a reply drawn from *another*
  dialogue of the split (negative sampling, as in next-utterance classification; Lowe et al., SIGDIAL 2015). The
  negative is drawn among replies that, like the real one, do or do not mention items, so "mentions a movie" or
  length cannot tell them apart: what remains is whether the reply fits what this seeker said. A draw with the
  same words and items as the real reply (a stock phrase such as "Enjoy the movie!") is redrawn: two identical
  inputs cannot be ordered, so such a pair is pure label noise.
- ``ordered`` — two real recommender turns of one dialogue, each in its own context, whose composite labels differ by
  at least ``min_gap``: the better-received one is chosen (at most ``max_ordered_per_dialogue`` pairs a dialogue,
  drawn at random). Comparing turns of one conversation holds the user fixed, so user-level habits (typing speed,
  verbosity) that inflate signals do not decide the order.
- ``synthetic`` — the synthetic scenario only (personas known): the real reply against the same reply with its item
  swapped for a random catalogue item (name and attribute words substituted) whose utility for the persona
  (``crslight.data.synthetic.utility``) differs by at least ``utility_gap``; the higher-utility reply is chosen. Here
  the ground truth is exact rather than weak.

Deliberately left out: pairs across dialogues with different contexts (their label difference is mostly the users'),
and reactions inside the model input (see above). Samples built for a pair have label NaN: they never happened.

On ReDial, ``ordered`` pairs raise R_phi's agreement with the label but bring its AUC against ``liked`` down to
chance, so ``configs/redial/reward.yaml`` trains on ``swap`` and ``negative`` only (figures in ``docs/reward.md``).

Layering: this is the one data module that reads :mod:`crslight.signals` (``transitions``, ``CompositeLabel``), because
a pair's order *is* a signal label; signals import only the schema (:mod:`crslight.schema`, below both), never the
data layer, so there is no cycle.

Labels and their raw signal values are cached per signal (``$CRSLIGHT_CACHE/signals``), keyed by the corpus and the
signal's arguments, so re-runs, ``crslight test`` and ablations (:mod:`crslight.ablation`) do not recompute them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from crslight.data import synthetic
from crslight.data.cache import cache_root
from crslight.data.corpus import Corpus
from crslight.data.resumable import ResumableLoader, ShuffleSampler
from crslight.guards import load_weights
from crslight.schema import RECOMMENDER
from crslight.signals import (
    AcceptanceSignal,
    CompositeLabel,
    DwellTimeSignal,
    EngagementSignal,
    SemanticRelevanceSignal,
    SentimentShiftSignal,
    transitions,
)

log = logging.getLogger(__name__)

PAIR_KINDS = ("swap", "negative", "ordered", "synthetic")
"""Pair kinds, in the order of their integer codes in :class:`RewardBatch` ``kind``."""
SPLIT_OFFSET = {"train": 0, "valid": 1, "test": 2}


def default_label() -> CompositeLabel:
    """The five built-in signals with equal weights, z-scored (what a config without ``label`` gets)."""
    return CompositeLabel([DwellTimeSignal(), SentimentShiftSignal(), EngagementSignal(), AcceptanceSignal(),
                           SemanticRelevanceSignal()])


@dataclass
class PairOptions:
    """How reward samples and pairs are built (the ``pairs`` argument of a DataModule with ``task: pairs``).

    Attributes:
        label: the composite weak label: its signals by short class name, their weights and normalisation. It is
            fitted on the train split's signals. None: the five built-in signals, equal weights.
        kinds: the pair kinds to build (``swap``, ``negative``, ``ordered``, ``synthetic``; see the module docstring).
        min_gap: smallest label difference for an ``ordered`` pair.
        positive_threshold: a real reply is paired against negatives only when its label is at least this
            (None: every labelled reply).
        negatives_per_turn: negatives drawn for each real reply.
        max_ordered_per_dialogue: at most this many ``ordered`` pairs per dialogue.
        max_swaps_per_dialogue: at most this many ``swap`` pairs per dialogue.
        utility_gap: smallest utility difference for a ``synthetic`` pair.
        seed: seed of every random draw (negatives, subsets); each split draws from its own stream.
        cache: keep raw signal values on disk (``$CRSLIGHT_CACHE/signals``).
    """

    label: CompositeLabel | None = None
    kinds: list[str] = field(default_factory=lambda: ["swap", "negative", "ordered", "synthetic"])
    min_gap: float = 0.5
    positive_threshold: float | None = 0.0
    negatives_per_turn: int = 1
    max_ordered_per_dialogue: int = 4
    max_swaps_per_dialogue: int = 4
    utility_gap: float = 1.0
    seed: int = 0
    cache: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(PAIR_KINDS)
        if unknown:
            raise ValueError(f"unknown pair kinds {sorted(unknown)}: expected some of {', '.join(PAIR_KINDS)}")
        if self.label is None:
            self.label = default_label()


@dataclass(frozen=True, eq=False)
class RewardSample:
    """One reply in its context.

    Attributes:
        context: the schema turns before the reply (``{role, text, items, ...}`` dicts; shared, do not mutate).
        reply: the recommender's reply text.
        label: the composite weak label of the seeker's reaction; NaN when unknown or for a constructed reply.
        liked: the questionnaire ``liked`` answers (0/1) of the reply's items (real samples only).
        items: the item ids the reply mentions.
        dialogue: row of the dialogue in the split.
        turn: index of the turn whose context is used.
        real: True for a reply that was actually given in this context.
    """

    context: list[dict]
    reply: str
    label: float = math.nan
    liked: tuple[int, ...] = ()
    items: tuple[str, ...] = ()
    dialogue: int = -1
    turn: int = -1
    real: bool = True


class Group(NamedTuple):
    """Samples scored together and the pairs among them (``(chosen, rejected, kind code)``, local indices)."""

    samples: list[RewardSample]
    pairs: list[tuple[int, int, int]]


class RewardBatch(NamedTuple):
    """``n`` (context, reply) samples to score and ``p`` preference pairs among them.

    Training batches hold ``p`` pairs as ``n = 2p`` samples; evaluation batches hold whole dialogues (every real
    reply once, plus the constructed ones), so each sample is scored once. Text is tokenised by the reward model, so
    that training and PPO's calls to ``RewardModule.score`` see one encoding.

    Attributes:
        context: ``n`` contexts, each a list of schema turns.
        reply: ``n`` replies.
        label: ``(n,)`` composite labels, NaN where unknown.
        real: ``(n,)`` bool, True for replies actually given in their context.
        chosen: ``(p,)`` sample index of each pair's preferred reply.
        rejected: ``(p,)`` sample index of the other reply.
        kind: ``(p,)`` index into :data:`PAIR_KINDS`.
        liked_index: ``(m,)`` sample index of each questionnaire answer.
        liked: ``(m,)`` the answer, 0 or 1.
        items: ``n`` lists of the item ids each reply recommends.
    """

    context: list[list[dict]]
    reply: list[str]
    label: torch.Tensor
    real: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    kind: torch.Tensor
    liked_index: torch.Tensor
    liked: torch.Tensor
    items: list[list[str]] = []


def collate(groups: list[Group]) -> RewardBatch:
    """Concatenates groups into one :class:`RewardBatch` (pair indices shifted to the batch)."""
    samples: list[RewardSample] = []
    pairs: list[tuple[int, int, int]] = []
    for group in groups:
        pairs += [(c + len(samples), r + len(samples), k) for c, r, k in group.pairs]
        samples += group.samples
    liked = [(i, a) for i, s in enumerate(samples) for a in s.liked]
    long = torch.long

    def column(values: list, dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype)

    return RewardBatch(
        context=[s.context for s in samples],
        reply=[s.reply for s in samples],
        label=column([s.label for s in samples], torch.float32),
        real=column([s.real for s in samples], torch.bool),
        chosen=column([p[0] for p in pairs], long),
        rejected=column([p[1] for p in pairs], long),
        kind=column([p[2] for p in pairs], long),
        liked_index=column([i for i, _ in liked], long),
        liked=column([a for _, a in liked], long),
        items=[list(s.items) for s in samples],
    )


def render_context(turns: list[dict], context_turns: int | None = None) -> str:
    """The last ``context_turns`` turns as ``"Seeker: ...\\nRecommender: ..."`` (all turns when None)."""
    if context_turns is not None:
        turns = turns[-context_turns:] if context_turns > 0 else []
    return "\n".join(f"{'Recommender' if t['role'] == RECOMMENDER else 'Seeker'}: {t['text']}" for t in turns)


def transition_index(dialogues) -> list[tuple[int, int]]:
    """``(dialogue, turn)`` of every transition, in the order of :func:`crslight.signals.transitions`."""
    return [(d, t) for d, turns in enumerate(dialogues["turns"]) for t in range(1, len(turns))
            if turns[t]["role"] == RECOMMENDER]


# -- labels -------------------------------------------------------------------------------------------------------
def _signal_key(corpus: Corpus, signal) -> str:
    fingerprint = getattr(corpus.dialogues, "_fingerprint", None) or str(len(corpus.dialogues))
    text = f"{corpus.name}|{corpus.split}|{fingerprint}|{type(signal).__module__}.{signal!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def signal_values(corpus: Corpus, label: CompositeLabel, cache: bool = True) -> torch.Tensor:
    """``(n, s)`` raw values of the label's signals on every transition of ``corpus`` (cached per signal)."""
    folder = cache_root() / "signals"
    batch = None
    columns = []
    for signal in label.signals:
        path = folder / f"{_signal_key(corpus, signal)}.pt"
        if cache and path.is_file():
            columns.append(load_weights(path))
            continue
        if batch is None:
            batch = transitions(corpus)
        values = signal(batch)
        if cache:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            os.close(fd)
            torch.save(values, tmp)
            os.replace(tmp, path)
        columns.append(values)
    return torch.stack(columns, dim=1)


def fitted_label(label: CompositeLabel, train: Corpus, cache: bool = True) -> CompositeLabel:
    """Fits ``label`` on the train split's signals (once: a fitted label is returned as is)."""
    if not bool(label.fitted):
        label.fit(signal_values(train, label, cache))
    return label


def composite_labels(corpus: Corpus, label: CompositeLabel, cache: bool = True) -> torch.Tensor:
    """``(n,)`` composite labels of every transition of ``corpus`` (``label`` must be fitted)."""
    return label(signal_values(corpus, label, cache))


# -- pairs --------------------------------------------------------------------------------------------------------
@dataclass
class PairData:
    """One split's samples grouped by dialogue, each group with its pairs."""

    groups: list[Group]

    @property
    def pairs(self) -> list[tuple[RewardSample, RewardSample, str]]:
        """Every pair as ``(chosen, rejected, kind)``."""
        return [(g.samples[c], g.samples[r], PAIR_KINDS[k]) for g in self.groups for c, r, k in g.pairs]

    def pair_groups(self) -> list[Group]:
        """One two-sample group per pair (the training dataset: shuffled pairs)."""
        return [Group([g.samples[c], g.samples[r]], [(0, 1, k)]) for g in self.groups for c, r, k in g.pairs]

    def counts(self) -> dict[str, int]:
        """Pairs per kind, and real samples."""
        out = {kind: 0 for kind in PAIR_KINDS}
        for _, _, kind in self.pairs:
            out[kind] += 1
        out["samples"] = sum(s.real for g in self.groups for s in g.samples)
        return out


def _liked(items: list[str], answers: dict[str, dict]) -> tuple[int, ...]:
    return tuple(int(answers[i]["liked"]) for i in dict.fromkeys(items) if i in answers and answers[i]["liked"] in (0, 1))


def _append(samples: list[RewardSample], sample: RewardSample) -> int:
    samples.append(sample)
    return len(samples) - 1


def _substitute(reply: str, old: dict, new: dict) -> str:
    """The reply with ``old``'s name and attribute words replaced by ``new``'s (synthetic templates)."""
    text = reply.replace(old["name"], new["name"])
    old_attrs, new_attrs = synthetic.attributes(old), synthetic.attributes(new)
    for key, value in old_attrs.items():
        if key in new_attrs and value != new_attrs[key]:
            text = re.sub(rf"\b{re.escape(value)}\b", new_attrs[key], text)
    return text


def build_pairs(corpus: Corpus, labels: torch.Tensor, options: PairOptions) -> PairData:
    """Samples and pairs of one split, given the composite label of each transition (see the module docstring).

    Args:
        corpus: the split.
        labels: ``(n,)`` one label per transition of :func:`transition_index` (NaN where unknown).
        options: what to build.
    """
    dialogues = corpus.dialogues
    index = transition_index(dialogues)
    if len(index) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(index)} transitions of {corpus.name}/{corpus.split}")
    rng = np.random.default_rng([options.seed, SPLIT_OFFSET.get(corpus.split, 3)])
    all_turns = dialogues["turns"]
    answers = [{a["item"]: a for a in labs} for labs in dialogues["labels"]]
    by_dialogue: dict[int, list[int]] = defaultdict(list)
    for n, (d, _) in enumerate(index):
        by_dialogue[d].append(n)
    ctx = [all_turns[d][:t] for d, t in index]
    reply = [all_turns[d][t]["text"] for d, t in index]
    items = [tuple(all_turns[d][t]["items"]) for d, t in index]
    has_items = [bool(x) for x in items]
    pools = {flag: np.array([n for n in range(len(index)) if has_items[n] == flag]) for flag in (False, True)}
    kinds = set(options.kinds)
    code = {k: i for i, k in enumerate(PAIR_KINDS)}
    synth = _SyntheticSwap(corpus, options.utility_gap) if "synthetic" in kinds and corpus.name == "synthetic" else None
    groups = []
    for d in range(len(dialogues)):
        members = by_dialogue.get(d, [])
        samples = [RewardSample(ctx[n], reply[n], float(labels[n]), _liked(items[n], answers[d]), items[n], d,
                                index[n][1]) for n in members]
        pairs: list[tuple[int, int, int]] = []

        if "swap" in kinds:
            good = [i for i, s in enumerate(samples) if s.liked and all(samples[i].liked)]
            bad = [i for i, s in enumerate(samples) if s.liked and not any(samples[i].liked)]
            swaps = [(g, b) for g in good for b in bad]
            if len(swaps) > options.max_swaps_per_dialogue:
                swaps = [swaps[j] for j in sorted(rng.choice(len(swaps), options.max_swaps_per_dialogue, False))]
            for g, b in swaps:
                moved = RewardSample(samples[g].context, samples[b].reply, items=samples[b].items, dialogue=d,
                                     turn=samples[g].turn, real=False)
                pairs.append((g, _append(samples, moved), code["swap"]))
        if "negative" in kinds:
            for i, n in enumerate(members):
                s = samples[i]
                if options.positive_threshold is not None and not s.label >= options.positive_threshold:
                    continue
                pool = pools[has_items[n]]
                for _ in range(options.negatives_per_turn):
                    for _attempt in range(8):  # a draw from the same dialogue, or the same reply, is redrawn
                        other = int(pool[rng.integers(len(pool))])
                        if index[other][0] != d and (reply[other], items[other]) != (reply[n], items[n]):
                            break
                    else:
                        continue
                    neg = RewardSample(s.context, reply[other], items=items[other], dialogue=d, turn=s.turn,
                                       real=False)
                    pairs.append((i, _append(samples, neg), code["negative"]))
        if "ordered" in kinds:
            ordered = [(i, j) for i in range(len(members)) for j in range(len(members))
                       if samples[i].label - samples[j].label >= options.min_gap]
            if len(ordered) > options.max_ordered_per_dialogue:
                ordered = [ordered[j] for j in sorted(rng.choice(len(ordered), options.max_ordered_per_dialogue, False))]
            pairs += [(i, j, code["ordered"]) for i, j in ordered]
        if synth is not None:
            for i, n in enumerate(members):
                swapped = synth.swap(d, all_turns[d][index[n][1]], rng)
                if swapped is not None:
                    text, item, better = swapped
                    j = _append(samples, RewardSample(samples[i].context, text, items=(item,), dialogue=d,
                                                      turn=samples[i].turn, real=False))
                    pairs.append((j, i, code["synthetic"]) if better else (i, j, code["synthetic"]))
        if samples:
            groups.append(Group(samples, pairs))
    return PairData(groups)


class _SyntheticSwap:
    """Counterfactual replies for the synthetic scenario: the same reply recommending another catalogue item."""

    def __init__(self, corpus: Corpus, utility_gap: float):
        self.items = corpus.catalogue.to_list()
        self.row = {it["item_id"]: i for i, it in enumerate(self.items)}
        pops = np.array([it["popularity"] for it in self.items])
        self.ranks = pops.argsort().argsort() / max(1, len(pops) - 1)
        self.personas = corpus.dialogues["persona"]
        self.gap = utility_gap

    def utility(self, persona: dict, row: int) -> float:
        return synthetic.utility(persona, self.items[row], float(self.ranks[row]))

    def swap(self, d: int, reply_turn: dict, rng: np.random.Generator) -> tuple[str, str, bool] | None:
        """``(counterfactual reply, its item, True if it is the better one)``, or None when no item qualifies."""
        if not self.personas[d] or len(reply_turn["items"]) != 1 or reply_turn["items"][0] not in self.row:
            return None
        persona = json.loads(self.personas[d])
        row = self.row[reply_turn["items"][0]]
        value = self.utility(persona, row)
        seen = set(persona.get("seen", []))
        for _ in range(16):
            other = int(rng.integers(len(self.items)))
            if other == row or other in seen:
                continue
            other_value = self.utility(persona, other)
            if abs(other_value - value) >= self.gap:
                new = self.items[other]
                return _substitute(reply_turn["text"], self.items[row], new), new["item_id"], other_value > value
        return None


def eval_batches(groups: list[Group], max_samples: int) -> list[list[int]]:
    """Packs whole dialogue groups, in order, into batches of at most ``max_samples`` samples (one group at least)."""
    batches: list[list[int]] = []
    size = 0
    for i, group in enumerate(groups):
        if batches and size + len(group.samples) <= max_samples:
            batches[-1].append(i)
            size += len(group.samples)
        else:
            batches.append([i])
            size = len(group.samples)
    return batches


def pair_loader(data: PairData, train: bool, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Training: shuffled pairs, ``batch_size`` a batch. Evaluation: whole dialogues, about ``2 * batch_size``
    samples a batch, each sample scored once."""
    if train:  # resumes mid-epoch (crslight.data.resumable)
        groups = data.pair_groups()
        return ResumableLoader(groups, batch_size=batch_size, sampler=ShuffleSampler(groups), collate_fn=collate,
                               num_workers=num_workers)
    return DataLoader(data.groups, batch_sampler=eval_batches(data.groups, 2 * batch_size), collate_fn=collate,
                      num_workers=num_workers)


def make_pair_data(corpus_of: Callable[[str], Corpus], split: str, options: PairOptions) -> PairData:
    """Everything for one split: fit the label on train (once), label the split's transitions, build the pairs.

    Args:
        corpus_of: ``split -> Corpus`` (a DataModule's ``corpus``).
        split: the split to build.
        options: how.
    """
    label = fitted_label(options.label, corpus_of("train"), options.cache)
    corpus = corpus_of(split)
    data = build_pairs(corpus, composite_labels(corpus, label, options.cache), options)
    log.info("reward pairs %s/%s: %s", corpus.name, split, data.counts())
    return data


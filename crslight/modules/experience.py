"""PPO's experience: replies sampled in the simulator (or to single prompts), their scores, and turn-level returns.

Kept apart from :mod:`crslight.modules.ppo` so that the module holds the optimisation and this file the data flow,
as pure functions over explicit arguments (none of them receives the module):

1. **collect** (:func:`collect_episodes` in a simulator environment, :func:`collect_replies` without one): the engine
   policy's replies, one row each in :class:`~crslight.modules.rollout.Samples` → a :class:`Rollout`;
2. **score** (:func:`score_episodes`, :func:`score`): R_phi and the direct signals, weighted by a :class:`Scorer`
   → :class:`Episodes`;
3. **make the experience** (:func:`make_experience`): from the rollout-time log-probabilities and values
   (:class:`RolloutLogprobs`), the KL, the shaped turn-level returns and the advantages → an :class:`Experience`,
   what PPO's update reads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch.utils.data import DistributedSampler

from crslight.guards import check_scores
from crslight.models.engine import Generation, Reply
from crslight.modules.rollout import EnginePolicy, Samples, pack
from crslight.rl import gae, group_normalized_advantages, kl_penalty, masked_whiten, per_token_rewards
from crslight.signals.base import SignalBatch, SignalExtractor
from crslight.simulator.env import ConversationEnv, to_signal_batch


@dataclass
class Rollout:
    """One step's replies before scoring, one row each, grouped into episodes.

    Attributes:
        samples: the packed prompt + reply tokens, ``b`` rows.
        replies: the ``b`` replies as the signal extractors and R_phi read them (context, reply, the user's reaction).
        episode: ``(b,)`` the episode of each reply, ``0..e-1``; GRPO groups are consecutive episodes.
        turn: ``(b,)`` the reply's turn in its episode.
        ended: ``(b,)`` whether the reply ended with the end-of-turn token (False: cut at ``max_new_tokens``).
        metrics: scalars to log (simulator acceptance, turns, end-of-turn rate ...).
        alternatives: with item alternatives, ``groups * (1 + k)`` rows: per slot of ``samples``, the same user's
            reaction to the reply itself and then to each alternative (:meth:`~crslight.simulator.ConversationEnv.
            item_groups`); ``None`` without.
        groups: the number of slot groups in ``alternatives``.
    """

    samples: Samples
    replies: SignalBatch
    episode: torch.Tensor
    turn: torch.Tensor
    ended: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    alternatives: SignalBatch | None = None
    groups: int = 0


@dataclass
class Episodes:
    """One step's scored replies, one row each, grouped into episodes.

    Attributes:
        samples: the packed prompt + reply tokens, ``b`` rows.
        scores: ``(b,)`` each reply's score (R_phi plus weighted signals), before normalisation.
        episode: ``(b,)`` the episode of each reply, ``0..e-1``; GRPO groups are consecutive episodes.
        turn: ``(b,)`` the reply's turn in its episode.
        ended: ``(b,)`` whether the reply ended with the end-of-turn token (False: cut at ``max_new_tokens``).
        metrics: scalars to log (mean R_phi reward, signals, simulator acceptance ...).
        slot_scores: ``(s, 1 + k)`` with item alternatives: per slot of ``samples``, the score of the same user's
            reaction to the reply itself and to each alternative (:meth:`~crslight.simulator.ConversationEnv.
            item_groups`); ``(s, 0)`` without.
    """

    samples: Samples
    scores: torch.Tensor
    episode: torch.Tensor
    turn: torch.Tensor
    ended: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    slot_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))

    def episode_returns(self, returns: torch.Tensor) -> torch.Tensor:
        """``(e,)`` each episode's return: that of its first reply (``returns`` are per reply)."""
        n = int(self.episode.max()) + 1
        out = torch.zeros(n, dtype=returns.dtype)
        first = self.turn == 0
        out[self.episode[first]] = returns[first]
        return out


@dataclass
class RolloutLogprobs:
    """The policy's and the reference's forward passes over a rollout's samples, before any update (no grad).

    Attributes:
        logprobs: ``(b, w)`` the policy's log-probabilities of the actions on the reply grid (``w = t - start``).
        ref_logprobs: ``(b, w)`` the reference's.
        entropy: ``(b, w)`` the policy's token entropy.
        values: ``(b, w)`` the value head's estimates (float32); ``None`` without a critic.
        slot_logprobs: ``(s, 1 + k)`` with item alternatives: the policy's log-probability of the item drawn at each
            slot and of its alternatives, in :meth:`Samples.slots_of` order; else ``None``.
        slot_ref_logprobs: ``(s, n_items)`` with item alternatives: the reference's item distribution at each slot.
        slot_hidden: ``(s, h)`` with item alternatives: the policy's hidden state at each slot (float32).
    """

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None = None
    slot_logprobs: torch.Tensor | None = None
    slot_ref_logprobs: torch.Tensor | None = None
    slot_hidden: torch.Tensor | None = None


#: :class:`Experience` fields on the reply grid ``(b, w)``: a micro-batch takes their rows (:meth:`Experience.select`).
TOKEN_FIELDS = ("logprobs", "ref_logprobs", "entropy", "values", "returns", "mask", "kl", "advantages")


@dataclass
class Experience:
    """What PPO's update reads: one step's rollout-time tensors, on the policy's device.

    Attributes:
        logprobs: ``(b, w)`` the rollout policy's log-probabilities of the actions (``w = t - start``).
        ref_logprobs: ``(b, w)`` the reference's.
        entropy: ``(b, w)`` the rollout policy's token entropy.
        mask: ``(b, w)`` bool: the sampled reply tokens (the actions).
        kl: ``(b, w)`` the per-token KL estimate to the reference (``kl_estimator``), 0 off the mask.
        advantages: ``(b, w)`` GAE advantages (whitened), or GRPO's group-standardised episode return; 0 off the mask.
        returns_per_reply: ``(b,)`` each reply's shaped turn-level return ``G_k``.
        values: ``(b, w)`` the value head's estimates; ``None`` without a critic.
        returns: ``(b, w)`` GAE's value targets; ``None`` without a critic.
        slot_logprobs: ``(s, 1 + k)`` with item alternatives: the log-probability of the item drawn at each slot and
            of its alternatives; else ``None``.
        slot_ref_logprobs: ``(s, n_items)`` with item alternatives: the reference's item distribution at each slot.
        slot_hidden: ``(s, h)`` with item alternatives: the policy's hidden state at each slot.
        slot_advantages: ``(s, 1 + k)`` with item alternatives: each item's score standardised within its slot's group.
    """

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns_per_reply: torch.Tensor
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    slot_logprobs: torch.Tensor | None = None
    slot_ref_logprobs: torch.Tensor | None = None
    slot_hidden: torch.Tensor | None = None
    slot_advantages: torch.Tensor | None = None

    def select(self, rows: list[int], width: int) -> Experience:
        """Rows ``rows`` of the fields on the reply grid (:data:`TOKEN_FIELDS`), cut to their first ``width`` columns
        (a micro-batch, :meth:`Samples.select`); the per-reply and per-slot fields stay whole."""
        cut = {name: getattr(self, name)[rows][:, :width] for name in TOKEN_FIELDS if getattr(self, name) is not None}
        return replace(self, **cut)


@dataclass(frozen=True)
class ExperienceConfig:
    """The hyper-parameters that turn scores into returns and advantages (``PPOModule``'s arguments of these names)."""

    advantage_estimator: Literal["gae", "grpo"] = "gae"
    group_size: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    turn_discount: float = 1.0
    whiten_advantages: bool = True
    kl_estimator: Literal["k1", "k3"] = "k1"
    reward_normalization: Literal["none", "scale", "zscore"] = "none"
    reward_clip: float | None = None
    missing_eos_penalty: float | None = None

    @classmethod
    def from_hparams(cls, hparams) -> ExperienceConfig:
        """The fields of this name from a module's ``hparams``."""
        return cls(**{f.name: hparams[f.name] for f in fields(cls)})


class RunningMoments:
    """Running mean and variance of all scores seen (Chan et al.'s parallel update), for reward normalisation."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, values: torch.Tensor) -> None:
        values = values.double().reshape(-1)
        n = values.numel()
        if n == 0:
            return
        mean, var = float(values.mean()), float(values.var(unbiased=False))
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total if total > 1 and m2 > 0 else self.var
        self.count = total

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def turn_returns(scores: torch.Tensor, episode: torch.Tensor, turn: torch.Tensor, discount: float) -> torch.Tensor:
    """``G_k = s_k + discount * G_{k+1}`` within each episode.

    Example: one episode of three replies with scores ``[1, 0, 2]`` and discount 0.5 gives
    ``G_2 = 2``, ``G_1 = 0 + 0.5 * 2 = 1``, ``G_0 = 1 + 0.5 * 1 = 1.5``.

    Args:
        scores: ``(b,)`` per reply.
        episode: ``(b,)`` episode ids.
        turn: ``(b,)`` turn of each reply in its episode.
        discount: per-turn discount.

    Returns:
        ``(b,)`` float32 returns.
    """
    returns = torch.zeros_like(scores, dtype=torch.float32)
    for e in episode.unique().tolist():
        rows = (episode == e).nonzero().flatten()
        rows = rows[turn[rows].argsort(descending=True)]
        future = 0.0
        for r in rows.tolist():
            future = float(scores[r]) + discount * future
            returns[r] = future
    return returns


def shaped_returns(episodes: Episodes, moments: RunningMoments, config: ExperienceConfig,
                   gather: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per reply: the turn score, normalised by running moments of all ranks' scores (``gather``) and clipped as
    ``config`` says, then the turn-level return ``G_k`` (:func:`turn_returns`)."""
    scores = episodes.scores.clone()
    if config.reward_normalization != "none":
        moments.update(gather(scores))
        std = max(moments.std, 1e-6)
        scores = (scores - moments.mean) / std if config.reward_normalization == "zscore" else scores / std
    if config.reward_clip:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    if config.missing_eos_penalty is not None:
        scores = scores + config.missing_eos_penalty * (~episodes.ended).float()
    return turn_returns(scores, episodes.episode, episodes.turn, config.turn_discount)


def make_experience(episodes: Episodes, rollout: RolloutLogprobs, config: ExperienceConfig, kl_coef: float,
                    moments: RunningMoments, gather: Callable[[torch.Tensor], torch.Tensor]) -> Experience:
    """KL, returns and advantages of one PPO step.

    Args:
        episodes: the step's scored replies.
        rollout: the policy's and the reference's log-probabilities (and values) on ``episodes.samples``.
        config: how scores become returns and advantages.
        kl_coef: beta, the KL weight in the per-token reward (GAE).
        moments: the running statistics of the scores (``reward_normalization``); updated with this step's.
        gather: one tensor ``(b,)`` → every rank's, concatenated (``all_gather`` under DDP; the identity alone).

    Returns:
        The :class:`Experience`, on the device of ``rollout``.
    """
    samples = episodes.samples
    device = rollout.logprobs.device
    mask = samples.response_mask[:, samples.start :].to(device).bool()
    returns = shaped_returns(episodes, moments, config, gather).to(device)
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, config.kl_estimator).masked_fill(~mask, 0.0)
    token_returns = None
    if config.advantage_estimator == "gae":
        rewards, _ = per_token_rewards(returns, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef,
                                       config.kl_estimator)
        advantages, token_returns = gae(rewards, rollout.values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    else:  # GRPO: the episode's return standardised within its group, on every token of its replies
        group = group_normalized_advantages(episodes.episode_returns(returns.cpu()), config.group_size)
        advantages = group[episodes.episode].to(device)[:, None].expand_as(mask).float()
    slot_advantages = None
    if episodes.slot_scores.numel():  # each item against the others shown to the same user in the same state
        groups = episodes.slot_scores
        slot_advantages = group_normalized_advantages(groups.flatten(), groups.shape[1]).reshape(groups.shape).to(
            device)
    return Experience(rollout.logprobs, rollout.ref_logprobs, rollout.entropy, mask, kl,
                      torch.where(mask, advantages, 0.0), returns, rollout.values, token_returns,
                      rollout.slot_logprobs, rollout.slot_ref_logprobs, rollout.slot_hidden, slot_advantages)


@dataclass
class Scorer:
    """What a reply's score is made of: R_phi and the direct signals, with their weights.

    Attributes:
        reward_model: R_phi (a ``RewardModule``: ``score(SignalBatch) -> (b,)``); ``None`` for none.
        reward_weight: R_phi's weight; 0 keeps it as a judge only (logged as ``reward``, not in the score).
        signals: direct signals of the user's reaction.
        signal_weights: one weight per signal.
        expected_items: with item groups, a reply that recommends scores the mean of its slots' groups (the same
            user's reaction to the item drawn and to each alternative, all drawn from the same distribution): an
            unbiased estimate of its expected score over the item draw (:func:`expected_item_scores`).
    """

    reward_model: Any = None
    reward_weight: float = 1.0
    signals: list[SignalExtractor] = field(default_factory=list)
    signal_weights: list[float] = field(default_factory=list)
    expected_items: bool = False


def _single_turn_batch(contexts: list[list[dict]], replies: list[Reply], names: dict[str, str]) -> SignalBatch:
    items = [list(r.items) for r in replies]
    b = len(replies)
    return SignalBatch(context=contexts, reply=replies, items=items, item_names=[[names.get(i, i) for i in x]
                       for x in items], reaction=[None] * b, dwell_time=[math.nan] * b, labels=[{} for _ in range(b)],
                       rating=[math.nan] * b, accepted=[math.nan] * b, continues=[False] * b)


def score(scorer: Scorer, batch: SignalBatch, judge: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Each reply's score: ``reward_weight`` times R_phi plus the weighted direct signals (NaN counted as 0), and their
    means for logs: ``score`` (the mean score), ``reward`` (R_phi's mean, when R_phi scored), ``signal/NAME``. With
    ``reward_weight`` 0, R_phi only judges, and not at all unless ``judge`` (item alternatives, whose R_phi score would
    change nothing)."""
    weight = scorer.reward_weight
    if (scorer.reward_model is None or not weight) and not scorer.signals:
        raise ValueError("PPOModule has no reward: set reward_model (a RewardModule checkpoint) with a reward_weight "
                         "other than 0, and/or signals")
    start = time.perf_counter()
    scores = torch.zeros(len(batch))
    metrics: dict[str, float] = {}
    if scorer.reward_model is not None and (weight or judge):
        with torch.no_grad():
            reward = scorer.reward_model.score(batch).float().cpu()
        check_scores(reward, "R_phi (reward_model)")
        scores += weight * reward
        metrics["reward"] = float(reward.mean())
    for signal, signal_weight in zip(scorer.signals, scorer.signal_weights, strict=True):
        values = signal(batch)
        check_scores(values, f"signal {signal.name}", allow_nan=True)
        metrics[f"signal/{signal.name}"] = float(values.nan_to_num(0.0).mean())
        scores += signal_weight * values.nan_to_num(0.0)
    metrics["score"] = float(scores.mean())  # what PPO maximises; ``reward`` is only ever R_phi's mean
    metrics["seconds_scoring"] = time.perf_counter() - start
    return scores, metrics


def expected_item_scores(scores: torch.Tensor, slot_rows: torch.Tensor, slot_scores: torch.Tensor) -> torch.Tensor:
    """Each reply's score in expectation over its item draws: for a reply that recommends, the mean over its slots of
    each slot group's mean score; the others keep theirs.

    A slot's group is the same user's reaction to the reply with the item drawn there and with each alternative, all
    drawn with replacement from the slot's item distribution, every other slot keeping its draw; so each group's mean
    is an unbiased estimate of the reply's expected score given its words, and so is their mean. Where a reply's
    words decide only how many items it names and where (the item scores fixed), this is what the words control, and
    it varies far less than the one draw's outcome (an acceptance in twenty episodes).

    Example: scores ``[0, 1, 0]``, one slot in reply 0 with group scores ``[0, 1, 1, 0]`` and two in reply 1 with
    ``[1, 0]`` and ``[1, 1]`` give ``[0.5, 0.75, 0]``.

    Args:
        scores: ``(b,)`` each reply's score for its own draws.
        slot_rows: ``(s,)`` the reply of each slot.
        slot_scores: ``(s, 1 + k)`` per slot, the scores of the reply itself and of its ``k`` alternatives.
    """
    if not slot_scores.numel():
        return scores
    total = torch.zeros_like(scores).index_add_(0, slot_rows, slot_scores.float().mean(1).to(scores.dtype))
    count = torch.zeros_like(scores).index_add_(0, slot_rows, torch.ones(len(slot_rows), dtype=scores.dtype))
    return torch.where(count > 0, total / count.clamp(min=1), scores)


def score_episodes(rollout: Rollout, scorer: Scorer) -> Episodes:
    """Scores a rollout's replies (and, with item alternatives, every reaction of their groups) with ``scorer``;
    with ``scorer.expected_items`` a reply that recommends scores its expectation over the item draws
    (:func:`expected_item_scores`; ``score_drawn`` logs the mean of the draws' own)."""
    metrics: dict[str, float] = {}
    slot_scores = torch.zeros(len(rollout.samples.slots), 0)
    if rollout.alternatives is not None:
        group_scores, group_metrics = score(scorer, rollout.alternatives, judge=False)
        metrics["seconds_scoring_alternatives"] = group_metrics["seconds_scoring"]
        slot_scores = group_scores.reshape(rollout.groups, -1)
    scores, score_metrics = score(scorer, rollout.replies)
    if scorer.expected_items:
        score_metrics["score_drawn"] = score_metrics["score"]
        scores = expected_item_scores(scores, rollout.samples.slots[:, 0], slot_scores)
        score_metrics["score"] = float(scores.mean())
    metrics = {**rollout.metrics, **metrics, **score_metrics}
    return Episodes(rollout.samples, scores, rollout.episode, rollout.turn, rollout.ended, metrics, slot_scores)


def _rollout(prompts: list[list[int]], replies: list[Generation], episode: list[int], turn: list[int],
             batch: SignalBatch, metrics: dict[str, float], pad_token_id: int, eos_token_id: int,
             alternatives: SignalBatch | None = None, groups: int = 0) -> Rollout:
    """Packs the replies (:func:`~crslight.modules.rollout.pack`) with what the scorer reads and the rollout's logs."""
    metrics["items_named"] = sum(bool(items) for items in batch.items) / max(1, len(batch))
    ended = torch.tensor([bool(r.tokens) and r.tokens[-1] == eos_token_id for r in replies])
    metrics["eos_rate"] = float(ended.float().mean())
    return Rollout(pack(prompts, replies, pad_token_id), batch, torch.tensor(episode), torch.tensor(turn), ended,
                   metrics, alternatives, groups)


def episode_indices(step: int, size: int, world_size: int = 1, rank: int = 0) -> list[int]:
    """This rank's environment episodes at step ``step``, ``size`` of them: the step's ``size * world_size`` episodes
    follow those of every earlier step, and a ``DistributedSampler`` deals them out to the ranks (rank ``r`` takes
    every ``world_size``-th, from ``r``), so no episode (no simulated user) is met twice across ranks and steps.

    Example: ``size`` 3 on 2 ranks, step 1: rank 0 runs episodes ``[6, 8, 10]``, rank 1 ``[7, 9, 11]``; in one
    process step ``n`` runs ``n * size + i``.
    """
    sampler = DistributedSampler(range(size * world_size), num_replicas=world_size, rank=rank, shuffle=False)
    return [step * size * world_size + i for i in sampler]


def collect_replies(policy: EnginePolicy, contexts: list[list[dict]], names: dict[str, str], pad_token_id: int,
                    eos_token_id: int) -> Rollout:
    """One reply of ``policy`` to each context, without a simulator: reply ``i`` is episode ``i``'s only turn.

    Args:
        policy: the engine policy (``record=True``, no call made yet).
        contexts: schema turns before each reply.
        names: item id → name (the items the replies name, for the signals).
        pad_token_id: the tokenizer's padding id (packing).
        eos_token_id: its end-of-turn id (whether a reply ended or was cut).
    """
    texts = policy(contexts)
    prompts, replies = [p for p, _, _ in policy.calls[0]], [g for _, g, _ in policy.calls[0]]
    n = len(prompts)
    return _rollout(prompts, replies, list(range(n)), [0] * n, _single_turn_batch(contexts, texts, names), {},
                    pad_token_id, eos_token_id)


def collect_episodes(policy: EnginePolicy, env: ConversationEnv, indices: list[int], pad_token_id: int,
                     eos_token_id: int) -> Rollout:
    """Episodes ``indices`` of ``policy`` in the simulator's environment, run in one lock-step batch; one row per
    reply, and with item alternatives (carried by the replies) the reactions to each slot's group.

    Args:
        policy: the engine policy (``record=True``, no call made yet).
        env: the environment.
        indices: the environment's episode indices (a GRPO group repeats one index ``group_size`` times).
        pad_token_id: the tokenizer's padding id (packing).
        eos_token_id: its end-of-turn id (whether a reply ended or was cut).
    """
    episodes = env.rollout(policy, indices, batch_size=len(indices))
    prompts, replies, episode, turn = [], [], [], []
    groups: list = []
    for k, steps in enumerate(policy.match(episodes)):
        for step, (prompt, generation, _) in enumerate(steps):
            prompts.append(prompt)
            replies.append(generation)
            episode.append(k)
            turn.append(step)
            groups.extend(episodes[k].transitions[step].alternatives)  # per slot, in the samples' order
    metrics: dict[str, float] = {}
    alternatives = None
    if groups:
        reactions = [t for group in groups for t in group]
        alternatives = to_signal_batch(reactions)
        metrics["item_group_accept"] = sum(t.reaction.accepted for t in reactions) / len(reactions)
    metrics["accept"] = sum(e.accepted for e in episodes) / len(episodes)
    metrics["satisfaction"] = sum(e.satisfaction for e in episodes) / len(episodes)
    metrics["turns"] = sum(e.steps for e in episodes) / len(episodes)
    metrics["leave"] = sum(e.ending == "leave" for e in episodes) / len(episodes)
    batch = to_signal_batch([t for e in episodes for t in e.transitions])
    return _rollout(prompts, replies, episode, turn, batch, metrics, pad_token_id, eos_token_id, alternatives,
                    len(groups))

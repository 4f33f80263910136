"""PPO's experience: replies sampled in the simulator (or to single prompts), their scores, and turn-level returns.

Kept apart from :mod:`crslight.modules.ppo` so that the module holds the optimisation and this file the data flow:
prompts or simulated episodes → :class:`~crslight.modules.rollout.Samples` (one row per reply) → scores from R_phi and
the direct signals → :class:`Episodes`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from crslight.data.datamodules import PromptBatch
from crslight.models.engine import Reply
from crslight.modules.rollout import EnginePolicy, Samples, pack
from crslight.rl import gae, group_normalized_advantages, kl_penalty, masked_whiten, per_token_rewards
from crslight.signals.base import SignalBatch
from crslight.simulator.env import ConversationEnv, build_environment, to_signal_batch


@dataclass
class Episodes:
    """One step's replies, one row each, grouped into episodes.

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


def shaped_returns(episodes: Episodes, moments: RunningMoments, hp, gather) -> torch.Tensor:
    """Per reply: the turn score, normalised by running moments of all ranks' scores (``gather``) and clipped as
    ``hp`` says, then the turn-level return ``G_k`` (:func:`turn_returns`)."""
    scores = episodes.scores.clone()
    if hp.reward_normalization != "none":
        moments.update(gather(scores))
        std = max(moments.std, 1e-6)
        scores = (scores - moments.mean) / std if hp.reward_normalization == "zscore" else scores / std
    if hp.reward_clip:
        scores = scores.clamp(-hp.reward_clip, hp.reward_clip)
    if hp.missing_eos_penalty is not None:
        scores = scores + hp.missing_eos_penalty * (~episodes.ended).float()
    return turn_returns(scores, episodes.episode, episodes.turn, hp.turn_discount)


def make_experience(module, batch: PromptBatch) -> tuple[Episodes, dict[str, torch.Tensor]]:
    """Rollout, scores, KL, advantages and returns for one PPO step of ``module`` (a ``PPOModule``).

    Returns:
        The episodes, and per-token tensors on the reply grid ``(b, w)``: ``logprobs``, ``ref_logprobs``, ``entropy``,
        ``values`` and ``returns`` (with a critic), ``mask``, ``kl`` and ``advantages``; plus ``returns_per_reply``
        ``(b,)``.
    """
    hp = module.hparams
    module.eval()  # no dropout anywhere: the first minibatch's ratios are exactly 1
    start = time.perf_counter()
    episodes = module.collect(batch)
    collected = time.perf_counter()
    samples = episodes.samples
    exp = module.score_samples(samples)
    episodes.metrics["seconds_rollout"] = collected - start
    episodes.metrics["seconds_logprobs"] = time.perf_counter() - collected
    mask = samples.response_mask[:, samples.start :].to(module.device).bool()
    gather = lambda x: module.all_gather(x.to(module.device)).reshape(-1).cpu()  # noqa: E731
    returns = shaped_returns(episodes, module.reward_moments, hp, gather).to(module.device)
    exp["mask"] = mask
    exp["kl"] = kl_penalty(exp["logprobs"], exp["ref_logprobs"], hp.kl_estimator).masked_fill(~mask, 0.0)
    if module.uses_critic:
        rewards, _ = per_token_rewards(returns, exp["logprobs"], exp["ref_logprobs"], mask,
                                       module.kl_controller.value, hp.kl_estimator)
        advantages, exp["returns"] = gae(rewards, exp["values"], mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    else:  # GRPO: the episode's return standardised within its group, on every token of its replies
        group = group_normalized_advantages(episodes.episode_returns(returns.cpu()), hp.group_size)
        advantages = group[episodes.episode].to(module.device)[:, None].expand_as(mask).float()
    exp["advantages"] = torch.where(mask, advantages, 0.0)
    exp["returns_per_reply"] = returns
    if episodes.slot_scores.numel():  # each item against the others shown to the same user in the same state
        groups = episodes.slot_scores
        exp["slot_advantages"] = group_normalized_advantages(groups.flatten(), groups.shape[1]).reshape(
            groups.shape).to(module.device)
    return episodes, exp


class EpisodeSources:
    """The DataModule's splits, and a simulator environment over each, built on first use per stage.

    Args:
        datamodule: a crslight DataModule (``ReDial``, ``OpenDialKG``, ``Synthetic``).
        simulator: simulator class name, ``auto`` for the dataset's default, ``None`` for no simulator.
        simulator_args: keyword arguments of the simulator beside the catalogue.
        max_turns: replies per episode at most.
        seed: the environment's seed.
    """

    def __init__(self, datamodule, simulator: str | None, simulator_args: dict | None, max_turns: int, seed: int):
        if not hasattr(datamodule, "corpus"):
            raise TypeError("PPOModule needs a crslight DataModule (ReDial, OpenDialKG, Synthetic) with task: prompts")
        self.datamodule, self.simulator, self.simulator_args = datamodule, simulator, simulator_args or {}
        self.max_turns, self.seed = max_turns, seed
        self._corpora: dict = {}
        self._envs: dict = {}

    def corpus(self, stage: str):
        """The split of ``stage`` (``fit`` or ``validate``)."""
        if stage not in self._corpora:
            self._corpora[stage] = self.datamodule.corpus(self.datamodule.splits[stage])
        return self._corpora[stage]

    def environment(self, stage: str) -> ConversationEnv | None:
        """The simulator's environment over ``stage``'s split; ``None`` without a simulator."""
        if self.simulator is None:
            return None
        if stage not in self._envs:
            self._envs[stage] = build_environment(self.corpus(stage), self.simulator, self.simulator_args,
                                                  root=getattr(self.datamodule, "root", None),
                                                  max_turns=self.max_turns, seed=self.seed)
        return self._envs[stage]


def _single_turn_batch(contexts: list[list[dict]], replies: list[Reply], names: dict[str, str]) -> SignalBatch:
    items = [list(r.items) for r in replies]
    b = len(replies)
    return SignalBatch(context=contexts, reply=replies, items=items, item_names=[[names.get(i, i) for i in x]
                       for x in items], reaction=[None] * b, dwell_time=[math.nan] * b, labels=[{} for _ in range(b)],
                       rating=[math.nan] * b, accepted=[math.nan] * b, continues=[False] * b)


def score(module, batch: SignalBatch, judge: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Each reply's score: ``reward_weight`` times R_phi plus the weighted direct signals (NaN counted as 0), and their
    means for logs. With ``reward_weight`` 0, R_phi only judges (its mean is logged as ``reward``), and not at all
    unless ``judge`` (item alternatives, whose R_phi score would change nothing)."""
    weight = module.hparams.reward_weight
    if (module.reward_model is None or not weight) and not module.signals:
        raise ValueError("PPOModule has no reward: set reward_model (a RewardModule checkpoint) with a reward_weight "
                         "other than 0, and/or signals")
    start = time.perf_counter()
    scores = torch.zeros(len(batch))
    metrics: dict[str, float] = {}
    if module.reward_model is not None and (weight or judge):
        with torch.no_grad():
            reward = module.reward_model.score(batch).float().cpu()
        scores += weight * reward
        metrics["reward"] = float(reward.mean())
    for signal, signal_weight in zip(module.signals, module.signal_weights, strict=True):
        values = signal(batch)
        metrics[f"signal/{signal.name}"] = float(values.nan_to_num(0.0).mean())
        scores += signal_weight * values.nan_to_num(0.0)
    metrics["score"] = float(scores.mean())
    metrics.setdefault("reward", metrics["score"])
    metrics["seconds_scoring"] = time.perf_counter() - start
    return scores, metrics


def collect_episodes(module, batch: PromptBatch, stage: str, first_episode: int) -> Episodes:
    """Samples replies and scores them (see :class:`~crslight.modules.ppo.PPOModule`).

    Args:
        module: the ``PPOModule``.
        batch: prompts; with a simulator only their number counts (the environment draws the episodes).
        stage: ``fit`` or ``validate``: whose split the prompts and episodes come from.
        first_episode: the environment's index of the first episode; episode ``i`` of the batch is
            ``first_episode + i`` (each repeated ``group_size`` times for GRPO).
    """
    hp, tokenizer, trainer = module.hparams, module.tokenizer, module.trainer
    env = module.sources.environment(stage)
    corpus = module.sources.corpus(stage)
    alternatives = hp.item_alternatives if stage == "fit" else 0
    engine = module.engine(max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_k=hp.top_k,
                           item_temperature=hp.item_temperature, item_alternatives=alternatives)
    policy = EnginePolicy(engine, trainer.datamodule.encode_prompt, corpus.catalogue["item_id"], record=True)
    repeat = hp.group_size if hp.advantage_estimator == "grpo" and stage == "fit" else 1
    metrics: dict[str, float] = {}
    groups: list = []
    if env is None:
        contexts = [corpus.dialogues[int(d)]["turns"][: int(t)]
                    for d, t in zip(batch.dialogue_index, batch.turn_index, strict=True) for _ in range(repeat)]
        texts = policy(contexts)
        prompts, replies = [p for p, _, _ in policy.calls[0]], [g for _, g, _ in policy.calls[0]]
        names = dict(zip(corpus.catalogue["item_id"], corpus.catalogue["name"], strict=True))
        signal_batch = _single_turn_batch(contexts, texts, names)
        episode, turn = list(range(len(prompts))), [0] * len(prompts)
    else:
        indices = [first_episode + i for i in range(len(batch.input_ids)) for _ in range(repeat)]
        episodes = env.rollout(policy, indices, batch_size=len(indices))
        prompts, replies, episode, turn = [], [], [], []
        for k, steps in enumerate(policy.match(episodes)):
            for step, (prompt, generation, _) in enumerate(steps):
                prompts.append(prompt)
                replies.append(generation)
                episode.append(k)
                turn.append(step)
                groups.extend(episodes[k].transitions[step].alternatives)  # per slot, in the samples' order
        signal_batch = to_signal_batch([t for e in episodes for t in e.transitions])
        if groups:
            group_scores, group_metrics = score(module, to_signal_batch([t for group in groups for t in group]),
                                                judge=False)
            metrics["seconds_scoring_alternatives"] = group_metrics["seconds_scoring"]
            slot_scores = group_scores.reshape(len(groups), -1)
            metrics["item_group_accept"] = sum(t.reaction.accepted for g in groups for t in g) / slot_scores.numel()
        metrics["accept"] = sum(e.accepted for e in episodes) / len(episodes)
        metrics["satisfaction"] = sum(e.satisfaction for e in episodes) / len(episodes)
        metrics["turns"] = sum(e.steps for e in episodes) / len(episodes)
        metrics["leave"] = sum(e.ending == "leave" for e in episodes) / len(episodes)
    scores, score_metrics = score(module, signal_batch)
    metrics.update(score_metrics)
    metrics["items_named"] = sum(bool(items) for items in signal_batch.items) / max(1, len(signal_batch))
    eos = tokenizer.eos_token_id
    ended = torch.tensor([bool(r.tokens) and r.tokens[-1] == eos for r in replies])
    metrics["eos_rate"] = float(ended.float().mean())
    samples = pack(prompts, replies, tokenizer.pad_token_id)
    if not groups:
        slot_scores = torch.zeros(len(samples.slots), 0)
    return Episodes(samples, scores, torch.tensor(episode), torch.tensor(turn), ended, metrics, slot_scores)

"""Test-time evaluation shared by every policy stage (base zero-shot, SFT, PPO).

Two parts, both logged under ``test/`` and so written to ``test_metrics.json`` by ``crslight test``:

- **Ranking** (CRSLab / UniCRS protocol): the policy's catalogue scores at every recommender turn
  (``crslight.models.retrieval``), Recall / NDCG / MRR at 1, 10, 50, item coverage of the top 10; the same three with
  items mentioned earlier removed are reported with the suffix ``_new``. Each dialogue is encoded once.
- **Conversation** (user simulator): ``episodes`` episodes of the policy (sampling its replies with ``generate``)
  against the dataset's simulated users: satisfaction (1-5), acceptance rate, mean turns, distinct-2 of the replies,
  and coherence (MiniLM cosine between the context and the reply, ``crslight.metrics.Coherence``); with a reward
  model, ``reward``: R_phi's mean score of those replies, so that base, SFT and PPO are judged by the same R_phi.
  Every episode also leaves a record (:func:`episode_record`: index, dialogue, accepted, satisfaction, turns, reward,
  items), gathered from every DDP rank and written by ``crslight test`` as ``test_episodes.jsonl``: episode ``i`` is
  seeded by ``(seed, i)``, so two policies' records pair up by index, which ``crslight pipeline`` uses for paired
  bootstrap intervals (``crslight.metrics.bootstrap``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchmetrics import MeanMetric

from crslight.metrics import Coherence, DistinctN, ItemCoverage, MRRAtK, NDCGAtK, RecallAtK, Satisfaction
from crslight.models.retrieval import previous_mask

KS = (1, 10, 50)
#: The base seed of the test episodes (``PolicyEvaluator``'s default): reference policies run the same episodes.
EPISODE_SEED = 0


@dataclass
class EvalConfig:
    """What ``crslight test`` runs after ranking the catalogue: a policy module's ``evaluation`` option
    (``evaluation: {episodes: 500}`` in YAML, ``--model.init_args.evaluation.episodes=500`` on the command line). These
    are settings of the test being run, not of the model: they are not saved as hyper-parameters, so a test with
    ``--ckpt_path`` runs the command's own.

    Args:
        episodes: Simulator episodes for acceptance, satisfaction, coherence and distinct-2 (0: ranking only).
        max_turns: Policy replies per episode at most.
        max_new_tokens: Longest sampled reply.
        reward_model: R_phi (a ``RewardModule`` checkpoint or run folder) whose mean score of the episodes' replies is
            ``test/reward``; None: none for SFT, PPO's own ``reward_model``.
    """

    episodes: int = 32
    max_turns: int = 2
    max_new_tokens: int = 40
    reward_model: str | None = None


def eval_config(value: EvalConfig | dict | None) -> EvalConfig:
    """An ``evaluation`` option as an :class:`EvalConfig` (a dict: its fields; None: the defaults)."""
    return value if isinstance(value, EvalConfig) else EvalConfig(**(value or {}))


#: the flat test-time arguments of checkpoints written before :class:`EvalConfig`
RETIRED_EVAL_ARGUMENTS = ("eval_episodes", "eval_max_turns", "eval_max_new_tokens", "eval_reward_model")


class RankingEvaluator(nn.Module):
    """Ranking metrics of the plain and the ``_new`` protocol variant, reduced across DDP ranks.

    Args:
        num_items: the catalogue size.
        k: the cut-offs.
    """

    def __init__(self, num_items: int, k: tuple[int, ...] = KS):
        super().__init__()
        self.num_items = num_items
        self.plain = nn.ModuleList([RecallAtK(k), NDCGAtK(k), MRRAtK(k)])
        self.new = nn.ModuleList([RecallAtK(k), NDCGAtK(k), MRRAtK(k)])
        self.coverage = ItemCoverage(num_items, k=10)

    def update(self, scores: torch.Tensor, target: torch.Tensor, previous: torch.Tensor) -> None:
        """``scores (n, n_items)``, ``target (n,)``, ``previous (n, m)`` (``-1``-padded item rows)."""
        exclude = previous_mask(previous, self.num_items)
        for metric in self.plain:
            metric.update(scores, target)
        for metric in self.new:
            metric.update(scores, target, exclude=exclude)
        self.coverage.update(scores.float())

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for metric in self.plain:
            out.update(metric.compute())
        for metric in self.new:
            out.update({f"{k}_new": v for k, v in metric.compute().items()})
        out["item_coverage"] = self.coverage.compute()
        return out

    def reset(self) -> None:
        for metric in [*self.plain, *self.new, self.coverage]:
            metric.reset()


class ConversationEvaluator(nn.Module):
    """Simulator episodes of the policy: satisfaction, acceptance, turns, distinct-2, coherence.

    Args:
        coherence_model: sentence encoder for coherence (alias or folder); empty to skip coherence.
        reward_model: a ``RewardModule`` checkpoint (or a run folder) whose mean score of the replies is ``reward``.
    """

    def __init__(self, coherence_model: str = "minilm", reward_model: str | None = None):
        super().__init__()
        self.reward_model_path = reward_model
        self.reward = MeanMetric(nan_strategy="ignore") if reward_model else None
        self.satisfaction = Satisfaction()
        self.acceptance = MeanMetric()
        self.turns = MeanMetric()
        self.distinct = DistinctN(n=(2,))
        self.coherence = Coherence(model=coherence_model) if coherence_model else None
        self.records: list[dict] = []  # one per episode of this rank, in the order added (episode_record)

    def update(self, episodes) -> None:
        """Adds finished ``crslight.simulator.env.Episode`` objects (their metrics and one record each)."""
        if not episodes:
            return
        self.satisfaction.update([e.satisfaction for e in episodes])
        self.acceptance.update([float(e.accepted) for e in episodes])
        self.turns.update([float(e.steps) for e in episodes])
        transitions = [t for e in episodes for t in e.transitions]
        self.distinct.update([t.reply for t in transitions])
        if self.coherence is not None:
            self.coherence.update([t.context for t in transitions], [t.reply for t in transitions])
        if self.reward is not None and transitions:
            from crslight.modules.reward import RewardModule

            scorer = RewardModule.load(self.reward_model_path)
            scores = scorer.score(contexts=[t.context for t in transitions], replies=[t.reply for t in transitions],
                                  items=[t.items for t in transitions])
            scores = scores.float().cpu().tolist()
            self.reward.update(scores)
            starts = [0]
            for e in episodes:
                starts.append(starts[-1] + e.steps)
            self.records.extend(episode_record(e, sum(scores[a:b]) / (b - a) if b > a else math.nan)
                                for e, a, b in zip(episodes, starts[:-1], starts[1:], strict=True))
        else:
            self.records.extend(episode_record(e) for e in episodes)

    def compute(self) -> dict[str, torch.Tensor]:
        out = {
            "satisfaction": self.satisfaction.compute(),
            "acceptance": self.acceptance.compute(),
            "turns": self.turns.compute(),
            **self.distinct.compute(),
        }
        if self.coherence is not None:
            out["coherence"] = self.coherence.compute()
        if self.reward is not None:
            out["reward"] = self.reward.compute()
        return out

    def reset(self) -> None:
        for metric in (self.satisfaction, self.acceptance, self.turns, self.distinct, self.coherence, self.reward):
            if metric is not None:
                metric.reset()
        self.records = []


def episode_record(episode, reward: float | None = None) -> dict:
    """One line of ``test_episodes.jsonl`` for a finished ``crslight.simulator.env.Episode``.

    Args:
        episode: the episode.
        reward: R_phi's mean score of its replies; None (no reward model) leaves the key out.

    Returns:
        ``{"episode", "dialogue_id", "accepted" (0/1), "satisfaction", "turns" (replies), "ending", "items" (the
        catalogue ids read in each reply)[, "reward"]}``; the means of ``accepted`` and ``satisfaction`` over the
        records are ``test/acceptance`` and ``test/satisfaction``, and the ``turns``-weighted mean of ``reward`` is
        ``test/reward`` (a mean over replies).
    """
    record = {"episode": int(episode.index), "dialogue_id": str(episode.dialogue_id), "accepted": int(episode.accepted),
              "satisfaction": float(episode.satisfaction), "turns": int(episode.steps), "ending": episode.ending,
              "items": [list(t.items) for t in episode.transitions]}
    if reward is not None:
        record["reward"] = None if math.isnan(reward) else float(reward)
    return record


def gather_records(records: list[dict]) -> list[dict]:
    """Every rank's episode records, sorted by episode index (``all_gather_object`` when ``torch.distributed`` is
    initialized; every rank must call it then). Without DDP: this rank's records, sorted."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shares: list[list[dict] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, list(records))
        records = [r for share in shares for r in share or []]
    return sorted(records, key=lambda r: r["episode"])


def save_episode_records(path: str | Path, records: list[dict]) -> Path:
    """Writes records as JSON lines (one episode per line; NaN as ``null``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in records]
    path.write_text("".join(json.dumps(r) + "\n" for r in clean))
    return path


def load_episode_records(path: str | Path) -> list[dict]:
    """The records of a ``test_episodes.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_episodes(policy_fn, corpus, episodes: int, max_turns: int, seed: int, root: str | None = None,
                 rank: int = 0, world_size: int = 1, batch_size: int = 256) -> list:
    """Runs this rank's share of ``episodes`` simulator episodes (episode ``i`` on rank ``i % world_size``) in the
    dataset's default environment (:func:`~crslight.simulator.env.build_environment`)."""
    from crslight.simulator.env import build_environment

    env = build_environment(corpus, "auto", root=root, max_turns=max_turns, seed=seed)
    return env.rollout(policy_fn, list(range(rank, episodes, world_size)), batch_size=batch_size)


class PolicyEvaluator(nn.Module):
    """What ``crslight test`` reports for a policy: ranking from its item head, then simulator episodes.

    Args:
        num_items: the catalogue size.
        episodes: simulator episodes after ranking (0 skips the conversation metrics).
        max_turns: policy replies per episode at most.
        max_new_tokens: longest sampled reply.
        coherence_model: sentence encoder of the coherence metric ("" skips it).
        reward_model: R_phi (a ``RewardModule`` checkpoint or run folder) scoring the episodes' replies; None skips it.
        seed: seeds the episodes and the policy's sampling.
    """

    def __init__(self, num_items: int, episodes: int = 32, max_turns: int = 2, max_new_tokens: int = 40,
                 coherence_model: str = "minilm", reward_model: str | None = None, seed: int = EPISODE_SEED):
        super().__init__()
        self.ranking = RankingEvaluator(num_items)
        self.conversation = ConversationEvaluator(coherence_model, reward_model) if episodes else None
        self.episodes, self.max_turns, self.max_new_tokens, self.seed = episodes, max_turns, max_new_tokens, seed
        self.episode_records: list[dict] = []  # every rank's episode records after ``finish``, by episode index

    @torch.no_grad()
    def step(self, policy, head, batch) -> None:
        """Ranks the catalogue at every recommendation sample of a dialogue batch (``SFTBatch``)."""
        from crslight.models.retrieval import rank_scores

        if batch.rec_row is None:
            return
        self.ranking.update(rank_scores(policy, head, batch), batch.rec_target, batch.rec_previous)

    @torch.no_grad()
    def finish(self, policy, tokenizer, datamodule, rank: int = 0, world_size: int = 1,
               item_head=None) -> dict[str, torch.Tensor]:
        """Computes the ranking metrics, runs this rank's episodes, and returns every metric (reduced over ranks);
        every rank's episode records are then in ``episode_records``.

        In the episodes the policy's replies are decoded by the engine (:mod:`crslight.models.engine`): words
        sampled (temperature 0.8, top-k 50), and at a recommendation slot the best item of its scores (``item_head``)
        that the dialogue has not mentioned yet."""
        from crslight.models.engine import Engine, EnginePolicy

        out = self.ranking.compute()
        self.ranking.reset()
        if self.conversation is not None and datamodule is not None:
            was_training = policy.training
            policy.eval()
            corpus = datamodule.corpus("test")
            engine = Engine(policy, tokenizer, item_head, corpus.catalogue["name"] if item_head is not None else None,
                            max_new_tokens=self.max_new_tokens, temperature=0.8, top_k=50, greedy_items=True)
            lm = EnginePolicy(engine, datamodule.encode_prompt, corpus.catalogue["item_id"], seed=self.seed + rank)
            self.conversation.update(run_episodes(lm, corpus, self.episodes, self.max_turns, self.seed,
                                                  root=datamodule.root, rank=rank, world_size=world_size))
            out.update(self.conversation.compute())
            self.episode_records = gather_records(self.conversation.records)
            self.conversation.reset()
            policy.train(was_training)
        return out

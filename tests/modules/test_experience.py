"""PPO's data flow as pure functions: episode indices, collecting, scoring and the experience, on tiny inputs."""

import math

import pytest
import torch

from crslight.guards import NonFiniteError
from crslight.models.engine import Generation
from crslight.modules.experience import (
    Episodes,
    Experience,
    ExperienceConfig,
    Rollout,
    RolloutLogprobs,
    RunningMoments,
    Scorer,
    collect_episodes,
    collect_replies,
    episode_indices,
    expected_item_scores,
    make_experience,
    score,
    score_episodes,
)
from crslight.modules.rollout import EnginePolicy, pack
from crslight.signals import AcceptanceSignal
from crslight.signals.base import SignalBatch, SignalExtractor


def test_episode_indices_deal_each_step_out_to_the_ranks():
    # one process: step n runs n * b + i, as PPO always has
    assert episode_indices(0, 3) == [0, 1, 2] and episode_indices(2, 3) == [6, 7, 8]
    # 2 ranks, 3 episodes each: step 1 holds episodes 6..11, rank 0 takes the even ones, rank 1 the odd ones
    assert episode_indices(1, 3, world_size=2, rank=0) == [6, 8, 10]
    assert episode_indices(1, 3, world_size=2, rank=1) == [7, 9, 11]
    seen = [i for step in range(4) for rank in range(3) for i in episode_indices(step, 5, 3, rank)]
    assert sorted(seen) == list(range(4 * 5 * 3))  # no user twice across ranks and steps, none skipped


class _Reward:
    """R_phi stand-in: scores each reply by its length."""

    def score(self, batch):
        return torch.tensor([float(len(r)) for r in batch.reply])


def _batch(replies: list[str], accepted: list[float]) -> SignalBatch:
    b = len(replies)
    return SignalBatch(
        context=[[] for _ in replies],
        reply=replies,
        items=[[] for _ in replies],
        item_names=[[] for _ in replies],
        reaction=[None] * b,
        dwell_time=[math.nan] * b,
        labels=[{} for _ in replies],
        rating=[math.nan] * b,
        accepted=accepted,
        continues=[False] * b,
    )


def test_score_weighs_r_phi_and_the_signals():
    batch = _batch(["ab", "abcd"], [1.0, math.nan])  # R_phi 2 and 4; acceptance 1 and NaN (counted as 0)
    scores, metrics = score(Scorer(_Reward(), 0.5, [AcceptanceSignal()], [2.0]), batch)
    assert scores.tolist() == [0.5 * 2 + 2.0 * 1, 0.5 * 4 + 0.0]
    assert metrics["reward"] == 3.0 and metrics["signal/AcceptanceSignal"] == 0.5 and metrics["score"] == 2.5
    # weight 0: R_phi judges (its mean is logged) but does not score; not even that for alternatives (judge=False)
    judged, metrics = score(Scorer(_Reward(), 0.0, [AcceptanceSignal()], [1.0]), batch)
    assert judged.tolist() == [1.0, 0.0] and metrics["reward"] == 3.0
    _, metrics = score(Scorer(_Reward(), 0.0, [AcceptanceSignal()], [1.0]), batch, judge=False)
    assert "reward" not in metrics and metrics["score"] == 0.5  # ``reward`` is R_phi's mean, never the score
    with pytest.raises(ValueError, match="no reward"):
        score(Scorer(_Reward(), 0.0), batch)


def _rollout(groups: int = 0) -> Rollout:
    """Three replies: episode 0 has two turns, episode 1 one; with ``groups``, the first reply recommends at that many
    slots, each shown with one alternative."""
    samples = pack([[5, 6], [7], [8, 9]], [[11, 12, 2], [13, 2], [14]], pad_id=0)
    if groups:
        samples = samples._replace(
            slots=torch.tensor([[0, 2, 1]] * groups),
            slot_exclude=torch.full((groups, 1), -1),
            slot_alternatives=torch.tensor([[3]] * groups),
        )
    alternatives = _batch(["a", "abc"] * groups, [1.0, 0.0] * groups) if groups else None
    return Rollout(
        samples,
        _batch(["a", "bb", "ccc"], [0.0, 1.0, 0.0]),
        torch.tensor([0, 0, 1]),
        torch.tensor([0, 1, 0]),
        torch.tensor([True, True, False]),
        {"accept": 0.5},
        alternatives,
        groups,
    )


def test_score_episodes_scores_the_replies_and_each_item_group():
    episodes = score_episodes(_rollout(groups=2), Scorer(_Reward(), 1.0, [AcceptanceSignal()], [1.0]))
    assert isinstance(episodes, Episodes) and episodes.scores.tolist() == [1.0, 3.0, 3.0]
    assert episodes.slot_scores.tolist() == [[2.0, 3.0], [2.0, 3.0]]  # per slot: the reply itself, its alternative
    assert episodes.metrics["accept"] == 0.5 and "seconds_scoring_alternatives" in episodes.metrics
    assert score_episodes(_rollout(), Scorer(_Reward())).slot_scores.shape == (0, 0)


def test_expected_item_scores_average_each_slot_group():
    scores = torch.tensor([0.0, 1.0, 0.0])
    # reply 0: one slot; reply 1: two slots; reply 2 recommends nothing and keeps its score
    slot_scores = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    out = expected_item_scores(scores, torch.tensor([0, 1, 1]), slot_scores)
    assert out.tolist() == [0.5, 0.75, 0.0]
    assert expected_item_scores(scores, torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)) is scores


def test_score_episodes_with_expected_items_scores_a_recommending_reply_by_its_groups():
    rollout = _rollout(groups=2)  # reply 0 recommends at 2 slots, each group scoring [1, 0]; its own reaction 0
    drawn = score_episodes(rollout, Scorer(None, 1.0, [AcceptanceSignal()], [1.0]))
    expected = score_episodes(rollout, Scorer(None, 1.0, [AcceptanceSignal()], [1.0], expected_items=True))
    assert drawn.scores.tolist() == [0.0, 1.0, 0.0]  # the reply's own reaction: not accepted
    assert expected.scores.tolist() == [0.5, 1.0, 0.0]  # its groups' mean; the replies without a slot keep theirs
    assert expected.metrics["score"] == 0.5 and expected.metrics["score_drawn"] == pytest.approx(1 / 3)
    assert torch.equal(expected.slot_scores, drawn.slot_scores)


def _logprobs(samples, values: bool = True) -> RolloutLogprobs:
    width = samples.input_ids.shape[1] - samples.start
    logprobs = torch.full((3, width), -1.0)
    return RolloutLogprobs(logprobs, logprobs - 0.5, torch.ones(3, width), torch.zeros(3, width) if values else None)


def test_make_experience_with_a_critic_by_hand():
    episodes = Episodes(
        _rollout().samples,
        torch.tensor([1.0, 2.0, 0.0]),
        torch.tensor([0, 0, 1]),
        torch.tensor([0, 1, 0]),
        torch.tensor([True, True, False]),
    )
    config = ExperienceConfig(gamma=1.0, lam=1.0, whiten_advantages=False, kl_estimator="k1")
    gathered = []
    exp = make_experience(
        episodes, _logprobs(episodes.samples), config, 0.0, RunningMoments(), lambda x: gathered.append(x) or x
    )
    assert isinstance(exp, Experience) and not gathered  # no reward normalisation: nothing to gather
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)  # replies of 3, 2 and 1 tokens
    assert torch.equal(exp.mask, mask) and exp.logprobs.shape == exp.kl.shape == exp.advantages.shape == (3, 3)
    # G = [1 + 2, 2, 0]; with beta 0, zero values and gamma = lam = 1, every token's advantage is its reply's return
    assert exp.returns_per_reply.tolist() == [3.0, 2.0, 0.0]
    expected = torch.tensor([[3.0, 3.0, 3.0], [2.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(exp.advantages, expected) and torch.equal(exp.returns, expected)
    assert torch.equal(exp.kl, torch.where(mask, 0.5, 0.0))  # k1: log pi - log pi_ref, 0 off the replies
    assert exp.slot_advantages is None and exp.slot_logprobs is None
    part = exp.select([2, 0], 2)  # a micro-batch: its rows, cut to its reply width; per reply fields stay whole
    assert part.mask.tolist() == [[True, False], [True, True]] and part.returns_per_reply.shape == (3,)


def test_make_experience_grpo_and_item_groups():
    scored = score_episodes(_rollout(groups=1), Scorer(None, 1.0, [AcceptanceSignal()], [1.0]))
    episodes = Episodes(
        scored.samples,
        torch.tensor([1.0, 2.0, 0.0]),
        scored.episode,
        scored.turn,
        scored.ended,
        slot_scores=torch.tensor([[1.0, 0.0]]),
    )
    config = ExperienceConfig(advantage_estimator="grpo", group_size=2, reward_normalization="zscore")
    moments, gathered = RunningMoments(), []
    exp = make_experience(
        episodes, _logprobs(episodes.samples, values=False), config, 0.1, moments, lambda x: gathered.append(x) or x
    )
    assert len(gathered) == 1 and moments.count == 3  # the scores of every rank feed the running moments
    assert exp.values is None and exp.returns is None
    # z-scored scores [1, 2, 0] -> [0, 1.2247, -1.2247]; episode returns (first turn) [1.2247, -1.2247], one group of 2:
    # standardised to [0.7071, -0.7071] on every token of the episode's replies
    assert exp.advantages[exp.mask].tolist() == pytest.approx([0.7071] * 5 + [-0.7071], abs=1e-4)
    assert exp.slot_advantages.shape == (1, 2)
    assert exp.slot_advantages[0].tolist() == pytest.approx([0.7071, -0.7071], abs=1e-4)


class _CountingEngine:
    """``generate`` that answers each prompt with its length and the end-of-turn token 2; recommends nothing."""

    model = torch.nn.Linear(1, 1)

    def generate(self, prompts, exclude, generator, contexts=None):
        return [Generation([len(p), 2], [True, True]) for p in prompts]

    def decode(self, generation):
        return f"Hello {generation.tokens[0]}"


def test_collect_episodes_and_replies_lay_out_one_row_per_reply():
    from crslight.data import load_corpus
    from crslight.simulator.env import build_environment

    corpus = load_corpus("synthetic", None, "test", n_dialogues=10, n_items=40)
    env = build_environment(corpus, max_turns=2, seed=0)
    policy = EnginePolicy(_CountingEngine(), lambda turns: [1] * len(turns), corpus.catalogue["item_id"], record=True)
    rollout = collect_episodes(policy, env, [4, 4, 9], pad_token_id=0, eos_token_id=2)
    episodes = env.rollout(
        EnginePolicy(_CountingEngine(), lambda turns: [1] * len(turns), corpus.catalogue["item_id"]), [4, 4, 9]
    )  # the same episodes again: the simulator is seeded by the episode index
    turns = [e.steps for e in episodes]
    assert rollout.episode.tolist() == [k for k, n in enumerate(turns) for _ in range(n)]
    assert rollout.turn.tolist() == [t for n in turns for t in range(n)]
    assert rollout.samples.input_ids.shape[0] == len(rollout.replies) == sum(turns)
    assert rollout.ended.all() and rollout.alternatives is None
    assert rollout.metrics["accept"] == sum(e.accepted for e in episodes) / 3 and rollout.metrics["eos_rate"] == 1.0
    replies = collect_replies(
        EnginePolicy(_CountingEngine(), lambda turns: [1] * len(turns), ["a"], record=True),
        [[{"items": []}], [{"items": []}] * 3],
        {"a": "A"},
        pad_token_id=0,
        eos_token_id=2,
    )
    assert replies.episode.tolist() == [0, 1] and replies.turn.tolist() == [0, 0]
    assert replies.samples.input_ids[:, replies.samples.start].tolist() == [1, 3]  # each reply after its own prompt


class _BrokenReward:
    """R_phi stand-in whose second score is ``value``."""

    def __init__(self, value: float):
        self.value = value

    def score(self, batch):
        return torch.tensor([1.0, self.value])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_score_refuses_a_non_finite_r_phi_score(value):
    with pytest.raises(NonFiniteError, match=r"R_phi .*1 of 2 values"):
        score(Scorer(_BrokenReward(value), 1.0), _batch(["a", "b"], [1.0, 0.0]))


def test_score_refuses_an_infinite_signal_but_reads_its_nan_as_missing():
    class Infinite(SignalExtractor):
        def extract(self, batch):
            return [math.inf, math.nan]

    with pytest.raises(NonFiniteError, match="signal Infinite gave non-finite scores: 1 of 2 values are \\+inf"):
        score(Scorer(None, 1.0, [Infinite()], [1.0]), _batch(["a", "b"], [1.0, 0.0]))
    scores, _ = score(Scorer(None, 1.0, [AcceptanceSignal()], [1.0]), _batch(["a", "b"], [math.nan, 1.0]))
    assert scores.tolist() == [0.0, 1.0]

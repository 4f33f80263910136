"""``crslight simulate``: run a policy against the simulated users of a dataset split and summarise the episodes.

The environment is :func:`crslight.simulator.env.build_environment`'s, with the simulator that fits each source (a
``GroundedSimulator`` for ReDial, OpenDialKG and logs, a ``PersonaSimulator`` for the synthetic scenario: see there). The
policy is a name (:data:`~crslight.simulator.policies.POLICIES`) or anything
:func:`crslight.models.loading.load_causal_lm` loads (``smollm2``, a model folder, a ``.gguf`` file), built by
:func:`crslight.simulator.policies.make_policy`. This module holds the command only; library code never imports it.
"""

from __future__ import annotations

from crslight.simulator.env import build_environment, summarise
from crslight.simulator.policies import make_policy


def simulate(
    dataset: str,
    root: str | None,
    policy: str,
    episodes: int,
    max_turns: int,
    seed: int,
    split: str,
    batch_size: int = 32,
) -> dict:
    """Runs ``episodes`` episodes of ``policy`` against the dataset's simulated users.

    Args:
        dataset: ``redial``, ``opendialkg``, ``synthetic`` or ``logs`` (a team's own, docs/logs.md).
        root: the dataset's folder, or the logs folder (None for ``synthetic``).
        policy: ``random``, ``popularity``, ``popularity-catalogue``, ``oracle`` (synthetic), ``smollm2`` or a
            transformers model folder.
        episodes: number of episodes.
        max_turns: policy replies per episode at most.
        seed: seeds episode sampling, the simulator and the random policy.
        split: ``train``, ``valid`` or ``test``.
        batch_size: episodes run in lock-step (policy batch size).

    Returns:
        ``{"dataset", "split", "policy", "seed", "max_turns", "episodes", "acceptance_rate", "mean_satisfaction",
        "mean_turns", "endings": {"accept", "leave", "turn_limit"}, "mean_dwell_time", "mean_sentiment"}``.
    """
    from crslight.data import load_corpus

    corpus = load_corpus(dataset, root, split)
    env = build_environment(corpus, "auto", root=root, max_turns=max_turns, seed=seed)
    result = summarise(env.rollout(make_policy(policy, corpus, seed, root), episodes, batch_size=batch_size))
    return {"dataset": dataset, "split": split, "policy": policy, "seed": seed, "max_turns": max_turns, **result}

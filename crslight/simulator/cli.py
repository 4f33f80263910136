"""``crslight simulate``: run a policy against the simulated users of a dataset split and summarise the episodes.

The environment is :func:`crslight.simulator.env.build_environment`'s, with the simulator that fits each source (a
``GroundedSimulator`` for ReDial and OpenDialKG, a ``PersonaSimulator`` for the synthetic scenario: see there). The
policy is a name (:data:`POLICIES`) or anything :func:`crslight.models.loading.load_causal_lm` loads (``smollm2``, a
model folder, a ``.gguf`` file), run as an :class:`LMPolicy`.
"""

from __future__ import annotations

from pathlib import Path

from crslight.simulator.env import Policy, build_environment, summarise
from crslight.simulator.policies import (
    RECOMMENDER_PROMPT,
    AttributeOraclePolicy,
    LMPolicy,
    PopularityPolicy,
    RandomPolicy,
    interaction_counts,
)

#: Built-in policy names: ``random`` (uniform over unmentioned items), ``popularity`` (most accepted in the train
#: split, :func:`~crslight.simulator.policies.interaction_counts`), ``popularity-catalogue`` (the catalogue's
#: ``popularity`` column), ``oracle`` (synthetic only: the most popular item of the genre and mood the seeker stated,
#: :class:`~crslight.simulator.policies.AttributeOraclePolicy`).
POLICIES = ("random", "popularity", "popularity-catalogue", "oracle")
NOUNS = {"redial": "movie", "synthetic": "movie", "opendialkg": "one"}


def make_policy(name: str, corpus, seed: int = 0, root: str | None = None, train=None) -> Policy:
    """A policy by name (see :data:`POLICIES`), else a model name / folder run as an :class:`LMPolicy` (an exported
    crslight policy, which carries its item scores, through the decoding engine).

    Args:
        name: a built-in name or a model name / folder.
        corpus: the split the episodes come from (its catalogue is the policy's).
        seed: seeds ``random`` and an LM's sampling.
        root: the dataset's folder (for loading the train split).
        train: the train split whose acceptances rank ``popularity`` (default: loaded from ``root`` with the
            default options; pass the DataModule's when it has its own, e.g. a smaller synthetic scenario).

    Raises:
        ValueError: for ``oracle`` on a dataset other than ``synthetic``, or a path that is not a model folder.
    """
    noun = NOUNS.get(corpus.name, "movie")
    if name == "random":
        return RandomPolicy(corpus.catalogue, seed=seed, noun=noun)
    if name == "popularity":
        from crslight.data import load_corpus

        if train is None:
            train = corpus if corpus.split == "train" else load_corpus(corpus.name, root, "train")
        return PopularityPolicy(corpus.catalogue, interaction_counts(train.dialogues), noun=noun)
    if name == "popularity-catalogue":
        return PopularityPolicy(corpus.catalogue, noun=noun)
    if name == "oracle":
        if corpus.name != "synthetic":
            raise ValueError(f"the oracle policy reads the genre and mood that synthetic seekers state; it needs "
                             f"--dataset synthetic, not {corpus.name!r}")
        return AttributeOraclePolicy(corpus.catalogue, noun=noun)
    path = Path(name).expanduser()
    if (path.is_absolute() or name.startswith(".")) and not path.exists():
        raise ValueError(f"unknown policy {name!r}: not one of {', '.join(POLICIES)}, and no such model folder")
    from crslight.models.retrieval import load_item_scores

    item_scores = load_item_scores(path) if path.is_dir() else None
    if item_scores is not None:  # an exported crslight policy: recommend through its item scores, as in training
        return engine_policy(name, item_scores, seed)
    return LMPolicy.from_pretrained(name, seed=seed)


def engine_policy(folder: str, item_scores: tuple, seed: int = 0) -> Policy:
    """An exported policy folder with its item scores (``crslight export``) as an environment policy: replies decoded
    by the engine (temperature 0.8, top-k 50), the best item not yet mentioned drawn at each recommendation slot."""
    from crslight.data.tokenize import encode_prompt
    from crslight.models.engine import Engine, EnginePolicy
    from crslight.models.loading import load_causal_lm, load_tokenizer

    head, item_ids, names = item_scores
    model, tokenizer = load_causal_lm(folder).eval(), load_tokenizer(folder, padding_side="left", item_token=True)
    engine = Engine(model, tokenizer, head, names, max_new_tokens=64, temperature=0.8, top_k=50, greedy_items=True)
    slot_names = dict(zip(item_ids, names, strict=True))
    return EnginePolicy(engine, lambda turns: encode_prompt(tokenizer, turns, RECOMMENDER_PROMPT, 768, slot_names),
                        item_ids, seed=seed)


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
        dataset: ``redial``, ``opendialkg`` or ``synthetic``.
        root: the dataset's folder (None for ``synthetic``).
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

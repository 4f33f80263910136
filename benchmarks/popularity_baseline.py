"""The popularity row of the results table, measured like ``crslight test`` measures a policy.

Ranking: every catalogue item is scored by how often the training split's recommender turns mention it (CRSLab's
popularity baseline: item frequency among the training recommendation targets), and the test split's samples (one per
recommender turn and item it mentions) go through the same ``RankingEvaluator`` as a policy's scores: Recall / NDCG /
MRR at 1, 10, 50, the ``_new`` variant, item coverage. Conversation: the same simulator episodes as ``crslight test``
(``crslight.modules.evaluation.run_episodes``) with the popularity policy of ``crslight simulate``, which recommends
the most accepted training item not yet mentioned: satisfaction and acceptance.

    python benchmarks/popularity_baseline.py --dataset redial --root ../shared/data/redial
    python benchmarks/popularity_baseline.py --dataset synthetic

Prints one JSON object with the keys of ``test_metrics.json`` (``test/recall@10`` ...); ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable

import torch

from crslight.data import load_corpus
from crslight.modules.evaluation import ConversationEvaluator, RankingEvaluator, run_episodes
from crslight.schema import RecSample, rec_samples
from crslight.simulator.policies import PopularityPolicy, interaction_counts


def popularity_scores(train, index: dict[str, int]) -> torch.Tensor:
    """``(n_items,)``: how often the training split's recommender turns mention each item, ties in catalogue order.

    Args:
        train: the training ``Corpus``.
        index: item id → catalogue column (``corpus.item_index``).
    """
    counts = Counter(s.item for s in rec_samples(train.dialogues) if s.item in index)
    scores = torch.zeros(len(index))
    for item, n in counts.items():
        scores[index[item]] = float(n)
    scores += torch.linspace(0, 1e-3, len(index)).flip(0)  # ties in catalogue order, as the simulator's policy breaks them
    return scores


def evaluate_ranking(samples: list[RecSample], index: dict[str, int],
                     score: Callable[[list[RecSample]], torch.Tensor], batch_size: int = 512) -> dict[str, float]:
    """Ranking metrics (``RankingEvaluator``, as ``crslight test``) of a scorer on recommendation samples.

    Args:
        samples: the samples to rank (each ``item`` in ``index``).
        index: item id → catalogue column.
        score: a batch of samples → ``(b, n_items)`` scores, higher is better.
        batch_size: samples scored at once.

    Returns:
        ``recall@k``, ``ndcg@k``, ``mrr@k``, their ``_new`` variants, ``item_coverage`` and ``samples``.
    """
    evaluator = RankingEvaluator(len(index))
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        previous = [[index[i] for i in s.previous_items if i in index] or [-1] for s in chunk]
        width = max(len(p) for p in previous)
        evaluator.update(score(chunk), torch.tensor([index[s.item] for s in chunk]),
                         torch.tensor([p + [-1] * (width - len(p)) for p in previous]))
    out = {k: float(v) for k, v in evaluator.compute().items()}
    out["samples"] = len(samples)
    return out


def popularity_ranking(train, test) -> dict[str, float]:
    """Ranking metrics of the train-frequency ranking on every test recommendation sample."""
    index = test.item_index
    scores = popularity_scores(train, index)
    samples = [s for s in rec_samples(test.dialogues) if s.item in index]
    return evaluate_ranking(samples, index, lambda chunk: scores.expand(len(chunk), -1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=["redial", "opendialkg", "synthetic"])
    parser.add_argument("--root", default=None, help="the official download (not for synthetic)")
    parser.add_argument("--catalogue", default="recommended", choices=["recommended", "entities"],
                        help="opendialkg: the entities recommender turns mention (published convention) or all")
    parser.add_argument("--episodes", type=int, default=32, help="simulator episodes, as crslight test's default")
    parser.add_argument("--max-turns", type=int, default=2, help="replies per episode, as crslight test's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-eval-dialogues", type=int, default=None,
                        help="synthetic: test dialogues, as the config's data.n_eval_dialogues (default: 200)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    start = time.time()
    train, test = (load_corpus(args.dataset, args.root, split, n_eval_dialogues=args.n_eval_dialogues,
                               catalogue=args.catalogue)
                   for split in ("train", "test"))
    metrics = popularity_ranking(train, test)
    policy = PopularityPolicy(test.catalogue, interaction_counts(train.dialogues))
    conversation = ConversationEvaluator()
    conversation.update(run_episodes(policy, test, args.episodes, args.max_turns, args.seed, root=args.root))
    metrics.update({k: float(v) for k, v in conversation.compute().items()})
    report = {f"test/{k}": v for k, v in sorted(metrics.items())}
    report["seconds"] = round(time.time() - start, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

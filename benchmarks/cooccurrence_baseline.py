"""Co-occurrence reference recommenders (item-kNN and EASE), ranked like ``crslight test`` ranks a policy.

What they learn from: the training split's item mentions only. Each training dialogue is one "user" whose items are
every catalogue item mentioned in it, by either role: a binary dialogue × item matrix ``X``. No text, no ratings, no
questionnaire answers. Two models of which items go together:

- **item-kNN**: the cosine similarity of the items' columns of ``X``, self-similarity removed; with ``--neighbours k``
  each item keeps only its ``k`` most similar items. An item's score is the sum of its similarities to the items
  mentioned in the sample's context.
- **EASE** (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): the item-item weights ``B`` of
  ``min ||X - XB||² + l2 ||B||²`` with ``diag(B) = 0``, in closed form: ``P = (XᵀX + l2 I)⁻¹``,
  ``B_ij = -P_ij / P_jj``. An item's score is ``x_context · B``. ``B`` is fitted over the items the training split
  mentions only (a dense float64 matrix of that size, inverted once): an item no training dialogue mentions has a zero
  column in ``X``, so its row and column of ``B`` are zero anyway and leaving it out is exact.

How samples are ranked: the project's protocol and metric code (``popularity_baseline.evaluate_ranking``, i.e.
``RankingEvaluator``): one sample per test recommender turn and catalogue item it mentions, the whole catalogue
ranked, Recall / NDCG / MRR at 1, 10, 50 and the ``_new`` variant that leaves out the items mentioned earlier in the
dialogue. The context of a sample is the set of catalogue items mentioned before that turn (``RecSample.previous_items``).

Popularity, as tie-break and fallback: every score gets ``1e-6 × (popularity rank) / n_items`` added, the ranking of
``popularity_baseline.popularity_scores`` (training recommender-turn mentions, ties in catalogue order). That is far
below any co-occurrence difference that matters, so it only orders the items the context says nothing about; a sample
whose context has no catalogue item, or none the training split mentions, gets exactly the popularity baseline's
ranking (counted as ``fallback_samples``).

The re-mention rule, reported as separate rows (``+ re-mention``): the items mentioned in the context are ranked first
(among themselves in the model's order), since many ReDial recommender turns repeat a title the seeker just named.
It only moves items that the ``_new`` variant leaves out, so the ``_new`` metrics of a model and its re-mention row
are the same; the plain ones show how much of a score is repetition.

    python benchmarks/cooccurrence_baseline.py --dataset redial --root ../shared/data/redial --method all \\
        --out runs/cooccurrence_redial.json
    python benchmarks/cooccurrence_baseline.py --dataset synthetic

Prints a markdown table (one column per model, the popularity baseline's ranking first); ``--out`` writes the rows
as JSON, each with the ``test_metrics.json`` metric names, the sample counts and the fit time.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from popularity_baseline import evaluate_ranking, popularity_ranking, popularity_scores  # noqa: E402

from crslight.data import load_corpus  # noqa: E402
from crslight.models.cooccurrence import ease, mention_matrix  # noqa: E402
from crslight.schema import RecSample  # noqa: E402

#: Weight of the popularity tie-break (times the popularity rank / catalogue size, so at most this).
TIE_BREAK = 1e-6
#: Rows of the table, in order (the JSON has every metric).
TABLE_METRICS = [f"{m}@{k}{v}" for v in ("", "_new") for m in ("recall", "ndcg", "mrr") for k in (1, 10, 50)]


def context_matrix(samples: list[RecSample], index: dict[str, int]) -> sp.csr_matrix:
    """``(b, n_items)`` binary: the catalogue items mentioned before each sample's turn."""
    rows = [r for r, s in enumerate(samples) for i in s.previous_items if i in index]
    cols = [index[i] for s in samples for i in s.previous_items if i in index]
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(samples), len(index)))


class ItemKNN:
    """Cosine item-item similarity of the dialogue × item matrix; a score sums the similarities to the context's items.

    Args:
        neighbours: keep only each item's ``neighbours`` most similar items (``None``: all of them).
    """

    def __init__(self, neighbours: int | None = None):
        self.neighbours = neighbours
        self.similarity: sp.csr_matrix | None = None

    def fit(self, mentions: sp.csr_matrix) -> ItemKNN:
        """Fits on ``(n_dialogues, n_items)`` binary mentions."""
        cooccurrence = (mentions.T @ mentions).tocsr()
        norms = np.sqrt(cooccurrence.diagonal())
        inverse = sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0))
        similarity = (inverse @ cooccurrence @ inverse).tocsr()
        similarity = (similarity - sp.diags(similarity.diagonal())).tocsr()
        if self.neighbours is not None:
            for row in range(similarity.shape[0]):
                start, end = similarity.indptr[row], similarity.indptr[row + 1]
                if end - start > self.neighbours:
                    values = similarity.data[start:end]
                    values[np.argsort(-values, kind="stable")[self.neighbours:]] = 0.0
        similarity.eliminate_zeros()
        self.similarity = similarity
        return self

    def predict(self, context: sp.csr_matrix) -> np.ndarray:
        """``(b, n_items)`` scores of ``(b, n_items)`` binary contexts."""
        return (context @ self.similarity).toarray()


class EASE:
    """Steck's EASE: ``B = -P / diag(P)`` with ``P = (XᵀX + l2 I)⁻¹`` and a zero diagonal; a score is ``x · B``.

    Args:
        l2: the L2 weight ``λ`` (Steck uses a few hundred on data of this density).
    """

    def __init__(self, l2: float = 200.0):
        self.l2 = l2
        self.num_items = 0
        self.items: np.ndarray | None = None
        self.weights: np.ndarray | None = None

    def fit(self, mentions: sp.csr_matrix) -> EASE:
        """Fits on ``(n_dialogues, n_items)`` binary mentions, over the items they mention."""
        self.num_items = mentions.shape[1]
        self.items, self.weights = ease(mentions, self.l2)
        return self

    def predict(self, context: sp.csr_matrix) -> np.ndarray:
        """``(b, n_items)`` scores of ``(b, n_items)`` binary contexts."""
        out = np.zeros((context.shape[0], self.num_items))
        out[:, self.items] = context[:, self.items] @ self.weights
        return out


class CooccurrenceScorer:
    """A fitted model's scores of a batch of samples, with the popularity tie-break and the optional re-mention rule.

    Args:
        model: a fitted ``ItemKNN`` or ``EASE``.
        index: item id → catalogue column.
        popularity: ``(n_items,)`` popularity scores (``popularity_baseline.popularity_scores``).
        remention: rank the context's items first.
    """

    def __init__(self, model: ItemKNN | EASE, index: dict[str, int], popularity: torch.Tensor,
                 remention: bool = False):
        self.model = model
        self.index = index
        ranks = popularity.argsort().argsort().double() + 1  # 1 = least popular
        self.tie_break = TIE_BREAK * ranks / len(ranks)
        self.remention = remention
        self.fallbacks = 0

    def __call__(self, samples: list[RecSample]) -> torch.Tensor:
        """``(b, n_items)`` float64 scores of the samples' contexts."""
        context = context_matrix(samples, self.index)
        cooccurrence = torch.from_numpy(self.model.predict(context))
        self.fallbacks += int((cooccurrence == 0).all(1).sum())
        scores = cooccurrence + self.tie_break
        if self.remention:
            mentioned = torch.from_numpy(context.toarray() > 0)
            scores += mentioned * (1.0 + 2.0 * scores.abs().amax(1, keepdim=True))
        return scores


def fit(method: str, mentions: sp.csr_matrix, l2: float, neighbours: int | None) -> tuple[ItemKNN | EASE, float]:
    """The fitted model of ``method`` (``itemknn`` or ``ease``) and its fit time in seconds."""
    start = time.perf_counter()
    model = ItemKNN(neighbours) if method == "itemknn" else EASE(l2)
    model.fit(mentions)
    return model, time.perf_counter() - start


def compare(train, test, methods: list[str], l2: float = 200.0, neighbours: int | None = None) -> list[dict]:
    """One row per model: the popularity ranking, then each method without and with the re-mention rule.

    Args:
        train: the training ``Corpus`` (the models' only data).
        test: the ``Corpus`` whose samples are ranked.
        methods: ``itemknn`` and/or ``ease``.
        l2: EASE's L2 weight.
        neighbours: item-kNN's neighbourhood size (``None``: all).
    """
    index = test.item_index
    samples = test.rec_samples
    new = sum(s.is_new for s in samples)
    batch_size = max(1, min(512, 2**22 // len(index)))  # (b, n_items) float64 scores of 32 MiB at most
    start = time.perf_counter()
    mentions = mention_matrix(train.dialogues["turns"], index)
    matrix_seconds = time.perf_counter() - start
    rows = [{"model": "popularity", **popularity_ranking(train, test), "samples_new": new,
             "fallback_samples": len(samples)}]
    popularity = popularity_scores(train, index)
    for method in methods:
        model, seconds = fit(method, mentions, l2, neighbours)
        for remention in (False, True):
            scorer = CooccurrenceScorer(model, index, popularity, remention)
            start = time.perf_counter()
            metrics = evaluate_ranking(samples, index, scorer, batch_size)
            rows.append({"model": method + (" + re-mention" if remention else ""), "method": method,
                         "remention": remention, **metrics, "samples_new": new,
                         "fallback_samples": scorer.fallbacks, "fit_seconds": round(matrix_seconds + seconds, 3),
                         "rank_seconds": round(time.perf_counter() - start, 3)})
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table: one row per metric, one column per model."""
    lines = ["| metric | " + " | ".join(r["model"] for r in rows) + " |", "|---|" + "---:|" * len(rows)]
    for key in [*TABLE_METRICS, "item_coverage"]:
        lines.append(f"| {key} | " + " | ".join(f"{r[key]:.3f}" for r in rows) + " |")
    for key in ("samples", "samples_new", "fallback_samples", "fit_seconds"):
        lines.append(f"| {key} | " + " | ".join(str(r.get(key, "–")) for r in rows) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=["redial", "opendialkg", "synthetic"])
    parser.add_argument("--root", default=None, help="the official download (not for synthetic)")
    parser.add_argument("--catalogue", default="recommended", choices=["recommended", "entities"],
                        help="opendialkg: the entities recommender turns mention (published convention) or all")
    parser.add_argument("--method", default="all", choices=["itemknn", "ease", "all"])
    parser.add_argument("--split", default="test", choices=["valid", "test"],
                        help="the split ranked (choose --l2 / --neighbours on valid)")
    parser.add_argument("--l2", type=float, default=200.0, help="EASE's L2 weight")
    parser.add_argument("--neighbours", type=int, default=None, help="item-kNN: most similar items kept per item")
    parser.add_argument("--n-eval-dialogues", type=int, default=None,
                        help="synthetic: test dialogues, as the config's data.n_eval_dialogues (default: 200)")
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    start = time.time()
    train, test = (load_corpus(args.dataset, args.root, split, n_eval_dialogues=args.n_eval_dialogues,
                               catalogue=args.catalogue)
                   for split in ("train", args.split))
    methods = ["itemknn", "ease"] if args.method == "all" else [args.method]
    rows = compare(train, test, methods, args.l2, args.neighbours)
    report = {"dataset": args.dataset, "split": args.split, "catalogue": args.catalogue, "l2": args.l2,
              "neighbours": args.neighbours,
              "train_dialogues": len(train.dialogues), "items": len(test.item_index),
              "train_items": int((mention_matrix(train.dialogues["turns"], test.item_index).sum(0) > 0).sum()),
              "rows": rows, "seconds": round(time.time() - start, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.dataset} {args.split}: {report['train_dialogues']} training dialogues, {report['train_items']} of "
          f"{report['items']} items mentioned in them; {report['seconds']} s, peak RSS {report['peak_rss_mb']} MB\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

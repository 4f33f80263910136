"""Which items are mentioned together: EASE over a training split's dialogues, kept as each item's strongest links.

Steck's EASE (WWW 2019) fits an item-item matrix ``B`` on the dialogue × item mention matrix ``X`` in closed form,
``B = -P / diag(P)`` with ``P = (XᵀX + λI)⁻¹`` and a zero diagonal; a context that mentions the items ``x`` scores
item ``i`` by ``(x · B)_i``. On ReDial it is the strongest signal of what a recommender turn names next besides the
movies the seeker just mentioned (docs/benchmarks.md, "Reference recommenders").

:func:`ease` is the reference recommender of ``benchmarks/cooccurrence_baseline.py``; :func:`top_links` keeps each
item's ``k`` strongest weights, which is what the policy's item scores carry (:class:`~crslight.models.retrieval.
ItemHead`): ``n_items × k`` numbers in the checkpoint instead of a dense ``n_items²`` matrix.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp
import torch


def mention_matrix(dialogues: Iterable[list[dict]], index: dict[str, int]) -> sp.csr_matrix:
    """``(n_dialogues, n_items)`` binary: 1 where the dialogue mentions the catalogue item (in any turn, either role).

    Args:
        dialogues: each dialogue's turns (schema dicts with ``items``).
        index: item id → catalogue column.
    """
    rows: list[int] = []
    cols: list[int] = []
    n = 0
    for n, turns in enumerate(dialogues, start=1):
        items = {index[i] for t in turns for i in t["items"] if i in index}
        rows.extend([n - 1] * len(items))
        cols.extend(items)
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, len(index)))


def ease(mentions: sp.csr_matrix, l2: float = 200.0) -> tuple[np.ndarray, np.ndarray]:
    """EASE on ``(n_dialogues, n_items)`` binary mentions, over the items they mention (the others get no weight).

    Returns:
        ``(items, weights)``: the catalogue columns fitted, and their ``(m, m)`` weight matrix (zero diagonal).
    """
    items = np.flatnonzero(np.asarray(mentions.sum(0)).ravel())
    x = mentions[:, items]
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += l2
    precision = np.linalg.inv(gram)
    weights = precision / -np.diag(precision)
    np.fill_diagonal(weights, 0.0)
    return items, weights


def top_links(items: np.ndarray, weights: np.ndarray, num_items: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's ``k`` largest positive weights to other items (EASE rows): ``(num_items, k)`` target columns
    (``-1`` where there are fewer) and their weights (0 there)."""
    k = max(0, min(k, len(items)))
    index = torch.full((num_items, k), -1, dtype=torch.long)
    value = torch.zeros(num_items, k)
    if k == 0:
        return index, value
    order = np.argsort(-weights, axis=1)[:, :k]
    top = np.take_along_axis(weights, order, axis=1)
    keep = top > 0
    index[torch.as_tensor(items)] = torch.as_tensor(np.where(keep, items[order], -1), dtype=torch.long)
    value[torch.as_tensor(items)] = torch.as_tensor(np.where(keep, top, 0.0), dtype=torch.float32)
    return index, value

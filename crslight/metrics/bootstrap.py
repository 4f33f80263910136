"""Percentile-bootstrap intervals of a mean, and of a paired difference of means, over evaluation episodes.

Why a bootstrap: the conversation metrics are means over a few hundred simulator episodes, and an acceptance rate of
0.41 against 0.37 says nothing until one knows how much it moves from one draw of episodes to the next. Resampling the
episodes with replacement and taking the 2.5th and 97.5th percentiles of the resampled means gives that spread without
assuming normality (acceptance is 0/1, satisfaction a 1-5 score).

Why paired: every policy meets the same simulated users (episode ``i`` is seeded by ``(seed, i)``), so two policies'
episode ``i`` share a dialogue, a starting point and a persona. :func:`paired_difference_ci` resamples episode
*indices* and takes both policies' values at the same indices, which removes the between-user variance both share: a
difference can be clearly non-zero even where the two marginal intervals overlap.

Weights: a per-episode value that is itself a mean over the episode's replies (R_phi's reward) is averaged with the
number of replies as its weight, ``sum(w * v) / sum(w)``, so the point estimate is the per-reply mean ``crslight test``
logs, and the bootstrap still resamples whole episodes (replies of one episode are not independent).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Largest index block drawn at once (resamples x values), to keep memory flat for long value lists.
_BLOCK = 1 << 22


def _column(values: Sequence[float], weights: Sequence[float] | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError(f"{name}: no values to bootstrap")
    if np.isnan(v).any():
        raise ValueError(f"{name}: values contain NaN (drop unknown episodes first)")
    if w.shape != v.shape:
        raise ValueError(f"{name}: {w.size} weights for {v.size} values")
    if not (w > 0).all():
        raise ValueError(f"{name}: weights must be positive")
    return v, w


def _interval(columns: list[tuple[np.ndarray, np.ndarray, float]], n_resamples: int, level: float,
              seed: int) -> tuple[float, float, float]:
    """``sum_j sign_j * weighted_mean_j`` on the data and its percentile interval over shared index resamples."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    n = columns[0][0].size
    point = sum(sign * float((v * w).sum() / w.sum()) for v, w, sign in columns)
    rng = np.random.default_rng(seed)
    estimates = []
    block = max(1, _BLOCK // n)
    for start in range(0, n_resamples, block):
        idx = rng.integers(0, n, size=(min(block, n_resamples - start), n))
        estimates.append(sum(sign * (v[idx] * w[idx]).sum(1) / w[idx].sum(1) for v, w, sign in columns))
    lo, hi = np.quantile(np.concatenate(estimates), [(1.0 - level) / 2, (1.0 + level) / 2])
    return point, float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], n_resamples: int = 2000, level: float = 0.95, seed: int = 0,
                 weights: Sequence[float] | None = None) -> tuple[float, float, float]:
    """The mean of ``values`` and its percentile-bootstrap interval.

    Args:
        values: one value per episode.
        n_resamples: bootstrap resamples (each draws ``len(values)`` values with replacement).
        level: the interval's coverage (0.95: the 2.5th and 97.5th percentiles of the resampled means).
        seed: seeds the resampling; the same arguments always give the same interval.
        weights: per-value weights (e.g. replies per episode); the mean is then ``sum(w * v) / sum(w)``.

    Returns:
        ``(mean, lo, hi)``.

    Raises:
        ValueError: on no values, NaN values, non-positive or mismatched weights, or a level outside (0, 1).
    """
    v, w = _column(values, weights, "values")
    return _interval([(v, w, 1.0)], n_resamples, level, seed)


def paired_difference_ci(a: Sequence[float], b: Sequence[float], ids_a: Sequence | None = None,
                         ids_b: Sequence | None = None, n_resamples: int = 2000, level: float = 0.95, seed: int = 0,
                         weights_a: Sequence[float] | None = None,
                         weights_b: Sequence[float] | None = None) -> tuple[float, float, float]:
    """The mean of ``a_i - b_i`` over paired episodes and its percentile-bootstrap interval.

    Each resample draws episode indices with replacement and takes ``a`` and ``b`` at the same indices. Without
    weights the statistic is ``mean(a_i - b_i)``; with weights, ``weighted_mean(a) - weighted_mean(b)`` of the
    resampled episodes.

    Args:
        a: one value per episode of the first system.
        b: the second system's values of the same episodes, in the same order.
        ids_a: episode ids of ``a`` (e.g. ``(episode, dialogue_id)``); checked against ``ids_b`` when both are given.
        ids_b: episode ids of ``b``.
        n_resamples: bootstrap resamples.
        level: the interval's coverage.
        seed: seeds the resampling.
        weights_a: per-episode weights of ``a``.
        weights_b: per-episode weights of ``b``.

    Returns:
        ``(mean difference, lo, hi)``.

    Raises:
        ValueError: when ``a`` and ``b`` differ in length, when the episode ids differ (the episodes are not paired),
            or on the input errors of :func:`bootstrap_ci`.
    """
    va, wa = _column(a, weights_a, "a")
    vb, wb = _column(b, weights_b, "b")
    if va.size != vb.size:
        raise ValueError(f"paired values differ in length: {va.size} episodes against {vb.size}")
    if ids_a is not None and ids_b is not None:
        ids_a, ids_b = list(ids_a), list(ids_b)
        if len(ids_a) != va.size or len(ids_b) != vb.size:
            raise ValueError(f"{len(ids_a)} and {len(ids_b)} episode ids for {va.size} paired values")
        wrong = next((k for k, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)) if x != y), None)
        if wrong is not None:
            raise ValueError(f"the episodes are not paired: position {wrong} is episode {ids_a[wrong]!r} in a and "
                             f"{ids_b[wrong]!r} in b")
    return _interval([(va, wa, 1.0), (vb, wb, -1.0)], n_resamples, level, seed)

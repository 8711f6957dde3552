"""Weighted metrics, subject bootstrap intervals and the Benjamini-Hochberg adjustment: the one home of the
statistics that the probe, fairness and discover stages share.

A bootstrap replicate is a weight vector over the same rows (how often each row's subject was drawn), so every
metric here takes a (B, n) weight matrix and scores all B replicates at once: one sort serves every AUC
replicate, one sparse product every recall. Subjects, not rows, are resampled: a subject's images are not
independent.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import scipy.sparse
from scipy.stats import false_discovery_control


def _group_matrix(codes: np.ndarray, n_groups: int) -> scipy.sparse.csr_matrix:
    n = len(codes)
    return scipy.sparse.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, n_groups))


def weighted_auc(scores: np.ndarray, positive: np.ndarray, W: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of weights W (B, n) at once (Mann-Whitney with ties counted half).

    Bootstrap replicates are weight vectors over the same rows, so one sort serves all of them.
    """
    uniq, inv = np.unique(scores, return_inverse=True)
    G = _group_matrix(inv, len(uniq))
    pos_w = (G.T @ (W * positive).T).T  # (B, groups)
    neg_w = (G.T @ (W * ~positive).T).T
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    P, N = pos_w.sum(1), neg_w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos_w * (neg_below + 0.5 * neg_w)).sum(1) / (P * N)


def balanced_accuracy_w(y: np.ndarray, pred: np.ndarray, W: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced accuracy (mean per-class recall over classes present) for each row of weights W."""
    Y = _group_matrix(y, n_classes)
    total = (Y.T @ W.T).T
    hit = (Y.T @ (W * (pred == y)).T).T
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(total > 0, hit / total, np.nan)
    return np.nanmean(recall, axis=1)


def macro_auc_w(y: np.ndarray, scores: np.ndarray, W: np.ndarray, n_classes: int) -> np.ndarray:
    """Binary: AUC of the positive-class score; multi-class: one-vs-rest macro average over classes present."""
    if n_classes == 2:
        return weighted_auc(scores[:, 0] if scores.ndim == 2 else scores, y == 1, W)
    per_class = [weighted_auc(scores[:, k], y == k, W) for k in range(n_classes) if 0 < (y == k).sum() < len(y)]
    return np.nanmean(np.stack(per_class), axis=0) if per_class else np.full(W.shape[0], np.nan)


def bootstrap_weights(subject_codes: np.ndarray, n_boot: int, rng: np.random.Generator, block: int | None = None) -> Iterator[np.ndarray]:
    """Row weights of bootstrap replicates that resample subjects (all of a subject's rows together), in
    blocks of replicates so memory stays at block × n_test (default: ~4M weights, ≤ 200 replicates)."""
    n_subjects = int(subject_codes.max()) + 1 if len(subject_codes) else 0
    if block is None:
        block = int(np.clip(4_000_000 // max(len(subject_codes), 1), 10, 200))
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        counts = rng.multinomial(n_subjects, np.full(n_subjects, 1.0 / n_subjects), size=b).astype(np.float64)
        yield counts[:, subject_codes]


def with_ci(stat, n_rows: int, subject_codes: np.ndarray, n_boot: int, rng) -> tuple[float, float, float]:
    """(value, 2.5th, 97.5th percentile) of a weighted statistic `stat(W) -> (B,)`: its value at unit weights
    and its subject bootstrap replicates (NaN bounds without replicates or when none is finite)."""
    value = float(stat(np.ones((1, n_rows)))[0])
    if n_boot <= 0 or n_rows == 0:
        return value, np.nan, np.nan
    reps = np.concatenate([stat(W) for W in bootstrap_weights(subject_codes, n_boot, rng)])
    lo, hi = percentile_interval(reps, 2.5, 97.5)
    return value, lo, hi


def percentile_interval(reps: np.ndarray, lo_pct: float, hi_pct: float) -> tuple[float, float]:
    """Percentiles of the finite bootstrap replicates; (NaN, NaN) when none is finite."""
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(reps, [lo_pct, hi_pct])
    return float(lo), float(hi)


def percentile_ci(reps: np.ndarray, level: float) -> tuple[float, float]:
    """Two-sided percentile interval at `level` (0.95: the 2.5th and 97.5th percentiles) of finite replicates."""
    return percentile_interval(reps, 100 * (1 - level) / 2, 100 * (1 + level) / 2)


def holm_adjust(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), 1-D; NaN stays NaN and does not count."""
    p = np.asarray(p, float)
    q = np.full(len(p), np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok):
        order = ok[np.argsort(p[ok], kind="stable")]
        m = len(order)
        q[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return q


def bh_adjust(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values along `axis` (scipy's `false_discovery_control`). NaN marks a test
    that was not run: it stays NaN and does not count towards the number of tests (1-D input only)."""
    p = np.asarray(p, float)
    if p.ndim != 1:
        return false_discovery_control(p, axis=axis, method="bh")
    q = np.full(len(p), np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q

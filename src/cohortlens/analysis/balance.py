"""Balanced training sets for the probe stage: every training row is used once, imbalance is met with weights.

* classification: class weights (scikit-learn's 'balanced'): every class carries the same total weight;
* regression: capped inverse-density weights. A probe trained on the raw distribution of a skewed target
  (age, body weight) learns to predict values near the mean (paper 003). The earlier remedy resampled an equal
  number of rows per equal-width bin of the target range; on a long-tailed cohort such as NAKO's body weight
  that copied one subject of the outermost bin ~900 times and never drew 58 % of the subjects. Weights keep
  every row exactly once; the cap bounds how much a sparsely populated tail can count, so a handful of extreme
  subjects cannot dominate the fit the way their 900 copies did.

Exact backend above `exact_max_train` rows: the kernel SVM cannot take every row, so a subsample is drawn
without replacement, as even across classes / target bins as their sizes allow (`stratified_subsample`).
"""

from __future__ import annotations

import numpy as np

# A row of the sparsest part of the target range counts at most this many times as much as one of the most
# crowded part (config `probe: weight_cap`).
DEFAULT_WEIGHT_CAP = 10.0


def range_bins(y: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index (0..n_bins-1) of each value in equal-width bins over [min, max] of y."""
    lo, hi = float(np.min(y)), float(np.max(y))
    if hi <= lo:
        return np.zeros(len(y), dtype=np.int64)
    edges = np.linspace(lo, hi, n_bins + 1)[1:-1]
    return np.searchsorted(edges, y, side="right").astype(np.int64)


def density_weights(y: np.ndarray, n_bins: int, cap: float = DEFAULT_WEIGHT_CAP) -> np.ndarray:
    """Per-row weights of a regression target: ∝ 1 / density of the target, capped, mean 1.

    The density is the share of rows in the row's equal-width bin over the target range (the bins the earlier
    range-balanced resampling used: uncapped, these weights give every occupied bin the same total weight, the
    resampling's aim, in expectation). Weights are clipped at `cap` × the smallest weight (the most crowded
    bin's), so max / min ≤ cap, then scaled to mean 1 so an SVM's C and the ridge penalty keep their meaning.
    """
    if cap < 1:
        raise ValueError(f"weight cap must be ≥ 1 (1 = no balancing), not {cap}")
    y = np.asarray(y, dtype=np.float64)
    if len(y) == 0:
        return np.ones(0)
    bins = range_bins(y, n_bins)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    w = 1.0 / counts[bins]
    w = np.minimum(w, cap * w.min())
    return w / w.mean()


def weighted_mean_sd(y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of y under weights w (sd 1.0 for a constant target)."""
    mu = float(np.average(y, weights=w))
    sd = float(np.sqrt(np.average((y - mu) ** 2, weights=w)))
    return mu, (sd if sd > 0 else 1.0)


def class_weights(y_codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-row weights giving every class the same total weight (sklearn's 'balanced'), mean weight 1."""
    counts = np.bincount(y_codes, minlength=n_classes).astype(np.float64)
    per_class = np.where(counts > 0, len(y_codes) / (np.count_nonzero(counts) * np.maximum(counts, 1)), 0.0)
    return per_class[y_codes]


def balanced_sample(groups: np.ndarray, n_per_group: int, rng: np.random.Generator) -> np.ndarray:
    """Indices with exactly n_per_group rows from every non-empty group: without replacement where the group
    is large enough, with replacement (duplicates) where it is smaller. The probe's classification cap takes
    the distinct rows of it (large classes undersampled, nothing duplicated)."""
    out = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        out.append(rng.choice(members, n_per_group, replace=len(members) < n_per_group))
    return np.sort(np.concatenate(out)) if out else np.empty(0, dtype=np.int64)


def stratified_subsample(groups: np.ndarray, n_total: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of min(n_total, len(groups)) distinct rows spread as evenly across groups as their sizes
    allow: groups smaller than the common quota keep every row, the larger ones share the rest equally."""
    n = len(groups)
    if n_total >= n:
        return np.arange(n)
    uniq, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    take = np.zeros(len(uniq), dtype=np.int64)
    remaining = int(n_total)
    order = np.argsort(counts, kind="stable")
    for i, g in enumerate(order):  # smallest group first: what it cannot use goes to the larger ones
        left = len(order) - i
        quota = remaining if left == 1 else remaining // left
        take[g] = min(int(counts[g]), quota)
        remaining -= take[g]
    out = [rng.choice(np.flatnonzero(inv == g), take[g], replace=False) for g in range(len(uniq)) if take[g]]
    return np.sort(np.concatenate(out)) if out else np.empty(0, dtype=np.int64)

"""Repeated subject-level cross-validation of one attribute's probe: the probe stage's scores for cohorts whose
test split is too small for stable numbers (config `probe: cv_below_test_subjects`, `cv_folds`, `cv_repeats`).

The pool: every row of the attribute with a recorded value in train, val and test together (classes: those of
the train split, as for the fixed split). Subjects, not rows, are assigned to folds (`cv_fold_assignment`:
scikit-learn's StratifiedGroupKFold, stratified by the class or by the target's quintile, a fresh shuffle per
repeat). Each training part is handled exactly like the train split of the fixed-split probe (`fit_tuned` with
no val: C and γ tuned on a held-out fifth of the training part's subjects, then refitted on the whole training
part with the same balancing), so no held-out subject informs its own fit or tuning.

Value: the metric computed on each fold's held-out rows, averaged over all folds × repeats. CI: a 95% percentile
interval from a subject bootstrap of that same average (a resampled subject carries its weight into the fold that
holds it in every repeat, the fitted models held fixed, as the fixed-split CI holds its model fixed). A
repeat-based interval was not used: repeats share almost all their training data, so their spread measures the
partitioning, not the cohort. Should the percentile interval of the average miss the average itself (possible
for a skewed statistic) it is widened to include it.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from cohortlens.analysis.probe_backends import FeatureSpace, predict_codes
from cohortlens.analysis.probe_fit import PreparedAttribute, fit_tuned
from cohortlens.analysis.probe_settings import ProbeSettings
from cohortlens.analysis.stats import balanced_accuracy_w, macro_auc_w, with_ci
from cohortlens.analysis.table import AnalysisTable

TEST_SPLIT = "test_split"


def cv_label(n_folds: int, n_repeats: int) -> str:
    """The metrics' `evaluation` value of a repeated-CV row, e.g. repeated_cv(5x5)."""
    return f"repeated_cv({n_folds}x{n_repeats})"


def needs_cv(table: AnalysisTable, prep: PreparedAttribute, settings: ProbeSettings) -> bool:
    """Whether the attribute's test split has fewer subjects than `cv_below_test_subjects` (0: never)."""
    if settings.cv_below_test_subjects <= 0:
        return False
    n = len(np.unique(table.frame["subject_id"].to_numpy()[prep.rows["test"]]))
    return n < settings.cv_below_test_subjects


def cv_pool(prep: PreparedAttribute) -> np.ndarray:
    """The rows cross-validated: every row with a recorded (train-seen) value in train, val and test."""
    return np.sort(np.concatenate([prep.rows[s] for s in ("train", "val", "test")]))


def _strata(prep: PreparedAttribute, rows: np.ndarray) -> np.ndarray:
    if prep.kind == "classification":
        return prep.codes[rows]
    y = prep.values[rows]
    edges = np.quantile(y, [0.2, 0.4, 0.6, 0.8])
    return np.searchsorted(edges, y, side="right")


def cv_fold_assignment(subjects: np.ndarray, strata: np.ndarray, n_folds: int, n_repeats: int,
                       seed: int) -> tuple[np.ndarray, int]:
    """(folds (n_repeats, n_rows), folds used): each repeat a subject-grouped, stratified k-fold assignment of the
    rows (all rows of a subject in one fold). Fewer folds than asked when a stratum has fewer subjects."""
    from sklearn.model_selection import StratifiedGroupKFold

    uniq, first = np.unique(subjects, return_index=True)
    per_stratum = np.bincount(np.unique(strata[first], return_inverse=True)[1])
    n_folds = int(max(2, min(n_folds, per_stratum.min(), len(uniq))))
    folds = np.full((n_repeats, len(subjects)), -1, dtype=np.int64)
    for r in range(n_repeats):
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed + r)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class" for thin regression strata
            for f, (_, held) in enumerate(splitter.split(np.zeros(len(subjects)), strata, subjects)):
                folds[r, held] = f
    return folds, n_folds


def cv_metrics(table: AnalysisTable, prep: PreparedAttribute, space: FeatureSpace, settings: ProbeSettings, *,
               model: str, region: str) -> tuple[list[dict], dict]:
    """The attribute's metrics rows (dicts of `probe.METRICS_SCHEMA`) from repeated subject-level CV, and what
    ran (params)."""
    pool = cv_pool(prep)
    subjects = table.frame["subject_id"].to_numpy()[pool]
    subj_codes = np.unique(subjects, return_inverse=True)[1]
    folds, n_folds = cv_fold_assignment(subjects, _strata(prep, pool), settings.cv_folds, settings.cv_repeats,
                                        settings.seed)
    label = cv_label(n_folds, settings.cv_repeats)
    # no val inside a training part: fit_tuned tunes on a held-out fifth of its subjects
    fold_settings = dataclasses.replace(settings, min_val=max(1, settings.min_val))
    empty = np.zeros(0, dtype=np.int64)
    k = len(prep.classes)
    parts, n_train, chance_mae, tuned = [], [], [], []
    for r in range(folds.shape[0]):
        for f in range(n_folds):
            held_pos = np.flatnonzero(folds[r] == f)
            fit = pool[folds[r] != f]
            fold_prep = dataclasses.replace(prep, rows={"train": fit, "val": empty, "test": pool[held_pos]})
            C, g, _, (D,), mu, sd = fit_tuned(table, space, fold_prep, fold_settings, [pool[held_pos]])
            n_train.append(len(fit))
            tuned.append([C, g])
            if prep.kind == "classification":
                parts.append((held_pos, prep.codes[pool[held_pos]], D))
            else:
                y = prep.values[pool[held_pos]]
                parts.append((held_pos, np.abs(D[:, 0] * sd + mu - y), None))
                chance_mae.append(float(np.mean(np.abs(y - np.mean(prep.values[fit])))))

    def averaged(fold_stat):
        def stat(W):
            with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmean(np.stack([fold_stat(W[:, pos], a, D) for pos, a, D in parts]), axis=0)
        return stat

    if prep.kind == "classification":
        stats = [("balanced_accuracy", averaged(lambda W, y, D: balanced_accuracy_w(y, predict_codes(D, k), W, k)),
                  1.0 / k),
                 ("roc_auc", averaged(lambda W, y, D: macro_auc_w(y, D, W, k)), 0.5)]
    else:
        stats = [("mae", averaged(lambda W, err, _: (W @ err) / W.sum(1)), float(np.mean(chance_mae)))]
    rng = np.random.default_rng(settings.seed)
    rows = []
    for metric, stat, chance in stats:
        v, lo, hi = with_ci(stat, len(pool), subj_codes, settings.n_bootstrap, rng)
        if np.isfinite(lo) and np.isfinite(v):
            lo, hi = min(lo, v), max(hi, v)
        rows.append({"model": model, "region": region, "attribute": prep.spec.name, "kind": prep.kind,
                     "metric": metric, "value": v, "ci_low": lo, "ci_high": hi,
                     "n_train": int(round(float(np.mean(n_train)))), "n_test": len(pool), "chance": chance,
                     "backend": space.backend, "evaluation": label})
    params = {"evaluation": label, "cv_pool": "train+val+test", "cv_subjects": int(subj_codes.max()) + 1,
              "cv_tuned": tuned}
    return rows, params

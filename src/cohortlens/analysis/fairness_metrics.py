"""Per-group metrics of the fairness stage, twice: point values with fairlearn's MetricFrame, and the same
definitions on confusion counts weighted by bootstrap row weights (B, n), vectorised (a MetricFrame per
replicate costs ~50 ms, and fairlearn's own n_boot resamples rows, not subjects). A test checks both agree.

TPR/FNR are NaN in a group without positives and FPR in a group without negatives; fairlearn returns 0 there,
which would invent a disparity.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from fairlearn.metrics import (
    MetricFrame,
    count,
    false_negative_rate,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, balanced_accuracy_score, mean_absolute_error, roc_auc_score

from cohortlens.analysis.stats import weighted_auc

CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "tpr", "fnr", "fpr", "selection_rate", "count")
REGRESSION_METRICS = ("mae", "mean_error", "count")


def _auc(y_true, score) -> float:
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return math.nan
    return float(roc_auc_score(y_true, score))


def metric_frame_binary(y_true: np.ndarray, y_pred: np.ndarray, score: np.ndarray | None, groups: np.ndarray
                         ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Point values per group and overall with fairlearn's MetricFrame (NaN where a rate is undefined)."""
    metrics = {
        "accuracy": accuracy_score, "balanced_accuracy": balanced_accuracy_score, "tpr": true_positive_rate,
        "fnr": false_negative_rate, "fpr": false_positive_rate, "selection_rate": selection_rate, "count": count,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class groups: sklearn warns, the value is still defined
        mf = MetricFrame(metrics=metrics, y_true=y_true, y_pred=y_pred, sensitive_features=groups)
        by_group = {str(g): {m: float(v) for m, v in row.items()} for g, row in mf.by_group.iterrows()}
        overall = {m: float(v) for m, v in mf.overall.items()}
        if score is not None:
            auc = MetricFrame(metrics=_auc, y_true=y_true, y_pred=score, sensitive_features=groups)
            for g, v in auc.by_group.items():
                by_group[str(g)]["roc_auc"] = float(v)
            overall["roc_auc"] = float(auc.overall)
    for g, vals in [*by_group.items(), (None, overall)]:
        rows = np.ones(len(y_true), bool) if g is None else (groups == g)
        if not y_true[rows].any():
            vals["tpr"] = vals["fnr"] = math.nan
        if y_true[rows].all():
            vals["fpr"] = math.nan
        vals.setdefault("roc_auc", math.nan)
    return by_group, overall


def bootstrap_binary(y_true, y_pred, score, group_codes, n_groups, W) -> dict[str, np.ndarray]:
    """The same metrics as metric_frame_binary for each row of row weights W (B, n): (B, n_groups) each."""
    G = np.zeros((len(y_true), n_groups))
    G[np.arange(len(y_true)), group_codes] = 1.0

    def total(mask):
        return (W * mask) @ G

    tp, fn = total(y_true & y_pred), total(y_true & ~y_pred)
    fp, tn = total(~y_true & y_pred), total(~y_true & ~y_pred)
    n = tp + fn + fp + tn
    pos, neg = tp + fn, fp + tn
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(pos > 0, tp / pos, np.nan)
        tnr = np.where(neg > 0, tn / neg, np.nan)
        out = {
            "accuracy": np.where(n > 0, (tp + tn) / n, np.nan),
            "tpr": tpr,
            "fnr": 1.0 - tpr,
            "fpr": 1.0 - tnr,
            "selection_rate": np.where(n > 0, (tp + fp) / n, np.nan),
            "count": n,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # both recalls undefined: empty group
            out["balanced_accuracy"] = np.nanmean(np.stack([tpr, tnr]), axis=0)
    if score is not None:
        auc = np.full((W.shape[0], n_groups), np.nan)
        for k in range(n_groups):
            rows = group_codes == k
            if y_true[rows].any() and not y_true[rows].all():
                auc[:, k] = weighted_auc(score[rows], y_true[rows], W[:, rows])
        out["roc_auc"] = auc
    else:
        out["roc_auc"] = np.full((W.shape[0], n_groups), np.nan)
    return out


def metric_frame_regression(y_true, y_pred, groups) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """MAE, mean error (bias) and count per group and overall with fairlearn's MetricFrame."""
    metrics = {"mae": mean_absolute_error, "mean_error": lambda t, p: float(np.mean(np.asarray(p) - np.asarray(t))),
               "count": count}
    mf = MetricFrame(metrics=metrics, y_true=y_true, y_pred=y_pred, sensitive_features=groups)
    by_group = {str(g): {m: float(v) for m, v in row.items()} for g, row in mf.by_group.iterrows()}
    return by_group, {m: float(v) for m, v in mf.overall.items()}


def bootstrap_regression(y_true, y_pred, group_codes, n_groups, W) -> dict[str, np.ndarray]:
    """The same metrics as metric_frame_regression for each row of row weights W (B, n): (B, n_groups) each."""
    G = np.zeros((len(y_true), n_groups))
    G[np.arange(len(y_true)), group_codes] = 1.0
    n = W @ G
    err = y_pred - y_true
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"mae": np.where(n > 0, (W * np.abs(err)) @ G / n, np.nan),
                "mean_error": np.where(n > 0, (W * err) @ G / n, np.nan), "count": n}

"""The CheXpert competition score of an embedding: ROC AUC of the probe's test predictions for each of the five
competition findings (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion; Irvin et al. 2019) and
their mean, as the probe stage's `mean_auc` metric row (one per model × region, 95% subject-bootstrap CI) and a
column of the model table.

Per finding, the test rows labelled positive or negative are scored with the probe's decision value for the class
`positive` (`class_scores` in the order of the probe's classes, which the probe records in its params). After the
U-Ones / U-Zeros policies the probe is binary; under `keep` it also has the class `uncertain`, whose test rows are
left out here (U-Ignore evaluation) and the positive class's one-vs-rest decision scores the rest. The AUC is
scikit-learn's `roc_auc_score`. The mean is reported only when all five findings have an AUC in the region (both
labels in its test split): a mean over fewer is not the competition's number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from cohortlens.analysis.stats import with_ci
from cohortlens.io.chexpert import COMPETITION_COLUMNS

__all__ = ["COMPETITION_ATTRIBUTE", "COMPETITION_LABEL", "MEAN_AUC_METRIC", "SUMMARY_KIND", "competition_metrics",
           "finding_aucs"]

# the metrics row: attribute, kind and metric (metrics.parquet), and the model table's column label
COMPETITION_ATTRIBUTE = "chexpert_competition"
SUMMARY_KIND = "summary"
MEAN_AUC_METRIC = "mean_auc"
COMPETITION_LABEL = "CheXpert mean AUC (5 competition findings) ↑"
POSITIVE, NEGATIVE = "positive", "negative"


@dataclass
class _Scored:
    """One finding's evaluable test rows: is-positive, the positive class's score, the subject of each row."""

    attribute: str
    y: np.ndarray
    score: np.ndarray
    subjects: np.ndarray
    images: np.ndarray


def _scored(preds: pl.DataFrame, attribute: str, classes: Sequence[str] | None, split: str) -> _Scored | None:
    """The finding's rows of `split` labelled positive/negative with the score of `positive`; None when the probe
    has no class `positive` or no class scores."""
    if not classes or POSITIVE not in classes:
        return None
    rows = preds.filter((pl.col("attribute") == attribute) & (pl.col("split") == split)
                        & pl.col("y_true").is_in([POSITIVE, NEGATIVE]) & pl.col("class_scores").is_not_null())
    if rows.height == 0:
        return None
    scores = np.asarray(rows["class_scores"].to_list(), dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(classes):
        raise ValueError(f"{attribute}: class_scores have {scores.shape[1:]} columns, the probe's classes are "
                         f"{list(classes)}")
    return _Scored(attribute, (rows["y_true"] == POSITIVE).to_numpy(), scores[:, list(classes).index(POSITIVE)],
                   rows["subject_id"].to_numpy(), rows["image_uid"].to_numpy())


def _auc(s: _Scored, w: np.ndarray | None = None) -> float:
    """roc_auc_score with row weights (bootstrap multiplicities); NaN when a label is missing."""
    if w is None:
        w = np.ones(len(s.y))
    keep = w > 0
    y = s.y[keep]
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s.score[keep], sample_weight=w[keep]))


def finding_aucs(predictions: pl.DataFrame, classes: Mapping[str, Sequence[str]],
                 findings: Sequence[str] = COMPETITION_COLUMNS, split: str = "test") -> pl.DataFrame:
    """(attribute, auc, n_positive, n_negative) per finding probed with a class `positive` in one region's
    predictions; `classes` maps each attribute to the probe's class order (params[region][attribute]['classes'])."""
    out = []
    for attribute in findings:
        s = _scored(predictions, attribute, classes.get(attribute), split)
        if s is not None:
            out.append({"attribute": attribute, "auc": _auc(s), "n_positive": int(s.y.sum()),
                        "n_negative": int((~s.y).sum())})
    return pl.DataFrame(out, schema={"attribute": pl.Utf8, "auc": pl.Float64, "n_positive": pl.Int64,
                                     "n_negative": pl.Int64})


def competition_metrics(predictions: pl.DataFrame, classes: Mapping[str, Sequence[str]], *, model: str, region: str,
                        backend: str, n_bootstrap: int, seed: int, split: str = "test") -> list[dict]:
    """The mean ROC AUC over the five competition findings as a metrics row (value, subject-bootstrap CI), or []
    when one of them has no AUC in this region's predictions."""
    scored = [_scored(predictions, a, classes.get(a), split) for a in COMPETITION_COLUMNS]
    if any(s is None or np.isnan(_auc(s)) for s in scored):
        return []
    # one bootstrap over the subjects of all five findings: a resampled subject brings all its rows
    subject_codes = np.unique(np.concatenate([s.subjects for s in scored]), return_inverse=True)[1]
    bounds = np.cumsum([0, *(len(s.y) for s in scored)])

    def mean_auc(W: np.ndarray) -> np.ndarray:
        return np.array([np.mean([_auc(s, w[lo:hi]) for s, lo, hi in zip(scored, bounds[:-1], bounds[1:])])
                         for w in W])

    value, lo, hi = with_ci(mean_auc, int(bounds[-1]), subject_codes, n_bootstrap, np.random.default_rng(seed))
    n_test = len(np.unique(np.concatenate([s.images for s in scored])))
    return [{"model": model, "region": region, "attribute": COMPETITION_ATTRIBUTE, "kind": SUMMARY_KIND,
             "metric": MEAN_AUC_METRIC, "value": value, "ci_low": lo, "ci_high": hi, "n_train": None,
             "n_test": n_test, "chance": 0.5, "backend": backend}]

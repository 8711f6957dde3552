"""Fitting one attribute's probe: the attribute as a target (`prepare_attribute`), its balanced training task
(`make_task`) and the tuned fit (`fit_tuned`): C and γ chosen on the val split (or on a held-out fifth of the
train subjects when val is small), decisions of the final model on the requested rows.

Training is balanced by weights on every training row (`balance`): class weights for classification, capped
inverse-density weights of the target for regression (without them the regressor learns to predict the mean
age). No row is copied; only the exact backend's row cap (`exact_max_train`) subsamples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cohortlens.analysis.balance import (
    balanced_sample,
    class_weights,
    density_weights,
    range_bins,
    stratified_subsample,
    weighted_mean_sd,
)
from cohortlens.analysis.probe_backends import FeatureSpace, Task, grid_decisions, predict_codes
from cohortlens.analysis.probe_settings import ProbeSettings
from cohortlens.analysis.stats import balanced_accuracy_w, macro_auc_w
from cohortlens.analysis.table import AnalysisTable, AttributeSpec, present

log = logging.getLogger(__name__)


@dataclass
class PreparedAttribute:
    """One attribute of an AnalysisTable as the probe sees it: its rows per split, class codes or values."""

    spec: AttributeSpec
    kind: str
    rows: dict[str, np.ndarray]  # split -> rows with the attribute recorded
    codes: np.ndarray | None  # classification: class code per table row (-1 missing)
    classes: list[str]
    values: np.ndarray  # regression: float target per row (NaN missing)


def prepare_attribute(table: AnalysisTable, attribute: str) -> PreparedAttribute | None:
    """The attribute's rows and target, or None when it cannot be probed (one class / no spread in train).
    Classes are those seen in train, in declared order; a class unseen in train is left out of val/test."""
    spec = table.spec(attribute)
    raw = table.values(attribute)
    ok = present(raw)
    rows = {s: np.flatnonzero(ok & table.split_mask(s)) for s in ("train", "val", "test")}
    if spec.is_categorical:
        train_classes = set(raw[rows["train"]])
        classes = [c for c in (spec.categories or ()) if c in train_classes]
        classes += sorted(train_classes - set(classes))
        if len(classes) < 2:
            log.warning("probe %s: fewer than two classes in the train split; skipped", attribute)
            return None
        lookup = {c: i for i, c in enumerate(classes)}
        codes = np.array([lookup.get(v, -1) if v is not None else -1 for v in raw], dtype=np.int64)
        # a class unseen in training cannot be predicted; its rows are left out of val/test scoring
        rows = {s: r[codes[r] >= 0] for s, r in rows.items()}
        return PreparedAttribute(spec, "classification", rows, codes, classes, np.full(len(raw), np.nan))
    if len(rows["train"]) < 2 or np.ptp(raw[rows["train"]]) == 0:
        log.warning("probe %s: no spread in the train split; skipped", attribute)
        return None
    return PreparedAttribute(spec, "regression", rows, None, [], raw.astype(np.float64))


def make_task(prep: PreparedAttribute, fit_rows: np.ndarray, settings: ProbeSettings, rng, cap: int | None) -> tuple[Task, float, float]:
    """Balanced training problem on fit_rows; returns the task and the regression target's (mean, sd)."""
    if prep.kind == "classification":
        codes = prep.codes[fit_rows]
        k = len(prep.classes)
        if cap and len(fit_rows) > cap:
            keep = balanced_sample(codes, max(1, cap // k), rng)
            keep = np.unique(keep)  # undersample the large classes; weights balance what remains
            fit_rows, codes = fit_rows[keep], codes[keep]
        return Task("classification", fit_rows, codes, class_weights(codes, k), k), 0.0, 1.0
    y = prep.values[fit_rows]
    if cap and len(fit_rows) > cap:
        # exact SVR cannot take every row: a subsample favouring the sparse parts of the range, no row twice
        keep = stratified_subsample(range_bins(y, settings.n_bins), cap, rng)
        fit_rows, y = fit_rows[keep], y[keep]
    w = density_weights(y, settings.n_bins, settings.weight_cap) if settings.balance_regression else np.ones(len(y))
    # standardised under the weights: the SVR tube (epsilon, in sd) refers to the distribution it is fitted to
    mu, sd = weighted_mean_sd(y, w)
    return Task("regression", fit_rows, (y - mu) / sd, w), mu, sd


def _tuning_split(table: AnalysisTable, prep: PreparedAttribute, settings: ProbeSettings) -> tuple[np.ndarray, np.ndarray, str]:
    """(fit rows, tuning rows, where): the val split, or a held-out fifth of train subjects when val is small."""
    if len(prep.rows["val"]) >= settings.min_val:
        return prep.rows["train"], prep.rows["val"], "val"
    train = prep.rows["train"]
    subjects = table.frame["subject_id"].to_numpy()[train]
    uniq = np.unique(subjects)
    held = np.random.default_rng(settings.seed + 1).choice(uniq, max(1, len(uniq) // 5), replace=False)
    mask = np.isin(subjects, held)
    return train[~mask], train[mask], "train-holdout"


def fit_tuned(table: AnalysisTable, space: FeatureSpace, prep: PreparedAttribute, settings: ProbeSettings,
              eval_rows: Sequence[np.ndarray], fit_rows: np.ndarray | None = None):
    """Tune (C, γ) and return (C, γ multiple, tuned_on, decisions on each eval row set, target mean, sd) of
    the model trained on `fit_rows` (default: the train split)."""
    rng = np.random.default_rng(settings.seed)
    cap = settings.exact_max_train if space.backend == "exact" else None
    grid = [(C, g) for g in settings.gamma_grid for C in settings.C_grid]
    tune_fit, tune_rows, where = _tuning_split(table, prep, settings)
    full_fit = prep.rows["train"] if fit_rows is None else fit_rows
    reuse = where == "val" and fit_rows is None  # the tuning fits already are the final fits
    task, mu, sd = make_task(prep, tune_fit, settings, rng, cap)
    y_tune = prep.codes[tune_rows] if prep.kind == "classification" else (prep.values[tune_rows] - mu) / sd
    best = None
    for C, g, decs in grid_decisions(space, task, grid, [tune_rows, *(eval_rows if reuse else [])]):
        score = _tune_score(task, decs[0], y_tune)
        if best is None or score > best[0] + 1e-12:
            best = (score, C, g, decs[1:])
    _, C, g, decs = best
    if not reuse:
        task, mu, sd = make_task(prep, full_fit, settings, np.random.default_rng(settings.seed), cap)
        decs = next(grid_decisions(space, task, [(C, g)], list(eval_rows)))[2]
    return C, g, where, decs, mu, sd


def _tune_score(task: Task, D: np.ndarray, y: np.ndarray) -> float:
    return tuning_score(task.kind, task.n_classes, D, y)


def tuning_score(kind: str, n_classes: int, D: np.ndarray, y: np.ndarray) -> float:
    """How good decisions D are on tuning rows with targets y (class codes, or standardised values), higher is
    better: balanced accuracy (AUC breaks ties) or negative MAE. The probes' C/γ and the baselines' weight decay
    are chosen by it."""
    one = np.ones((1, len(y)))
    if kind == "classification":
        ba = balanced_accuracy_w(y, predict_codes(D, n_classes), one, n_classes)[0]
        auc = macro_auc_w(y, D, one, n_classes)[0]
        return float(ba + 1e-3 * np.nan_to_num(auc))
    return -float(np.mean(np.abs(D[:, 0] - y)))


"""The probe stage: how much of each attribute an embedding holds, measured with RBF-kernel probes (paper 003).

Per model × region × attribute: categorical attributes are classified (RBF SVC → balanced accuracy, ROC AUC
one-vs-rest macro), continuous ones and dates regressed (RBF SVR → MAE). Features are standardised on the
train split, C and γ are tuned on the val split (`probe_fit`), scores are taken on the test split with 95%
bootstrap CIs that resample test *subjects* (`stats`). Which kernel machine fits (`probe_backends`: cuML,
exact scikit-learn SVMs, or Nyström features + ridge above `exact_max_train` rows) is recorded per metric
(`backend` column) and named in the model table (`model_table.BACKEND_NAMES`): an approx result is a kernel
ridge, not an SVM. Settings: `probe_settings.ProbeSettings` (config `probe:`). A classifier's params record its
class order (`classes`: the columns of `class_scores`). Where a region has probes of the five CheXpert competition
findings, `chexpert_auc` adds their mean ROC AUC on the test predictions as one more metrics row.
Where an attribute's test split has fewer subjects than `cv_below_test_subjects`, its metrics come from repeated
subject-level cross-validation over train+val+test instead (`probe_cv`); the `evaluation` column says which
(`test_split` or e.g. `repeated_cv(5x5)`). Its predictions stay those of the fixed-split model.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import polars as pl

from cohortlens.analysis.chexpert_auc import competition_metrics
from cohortlens.analysis.probe_backends import FeatureSpace, feature_space, predict_codes
from cohortlens.analysis.probe_cv import TEST_SPLIT, cv_metrics, needs_cv
from cohortlens.analysis.probe_fit import PreparedAttribute, fit_tuned, prepare_attribute
from cohortlens.analysis.probe_settings import ProbeSettings
from cohortlens.analysis.stats import balanced_accuracy_w, macro_auc_w, with_ci
from cohortlens.analysis.table import AnalysisTable, load_analysis_table, regions_of
from cohortlens.io.tables import read_parquet_metadata, write_parquet
from cohortlens.types import ALL_REGIONS, PathLike

log = logging.getLogger(__name__)

METRICS_SCHEMA = {
    "model": pl.Utf8, "region": pl.Utf8, "attribute": pl.Utf8, "kind": pl.Utf8, "metric": pl.Utf8,
    "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "n_train": pl.Int64, "n_test": pl.Int64,
    "chance": pl.Float64, "backend": pl.Utf8, "evaluation": pl.Utf8,
}
PREDICTIONS_SCHEMA = {
    "model": pl.Utf8, "region": pl.Utf8, "attribute": pl.Utf8, "subject_id": pl.Utf8, "image_uid": pl.Utf8,
    "split": pl.Utf8, "y_true": pl.Utf8, "y_pred": pl.Utf8, "score": pl.Float64,
    "y_true_value": pl.Float64, "y_pred_value": pl.Float64, "class_scores": pl.List(pl.Float64),
}


@dataclass
class ProbeResult:
    """One attribute's probe: its metrics rows, val/test predictions, the backend and the tuned parameters."""

    metrics: pl.DataFrame
    predictions: pl.DataFrame
    backend: str
    params: dict = field(default_factory=dict)


def probe_attribute(
    table: AnalysisTable,
    attribute: str,
    settings: ProbeSettings | Mapping | None = None,
    *,
    space: FeatureSpace | None = None,
    region: str | None = None,
) -> ProbeResult | None:
    """Probe one attribute of an AnalysisTable: metrics with CIs and val/test predictions (None if the
    attribute cannot be probed, e.g. a single class in train)."""
    settings = ProbeSettings.from_config(settings)
    prep = prepare_attribute(table, attribute)
    if prep is None:
        return None
    if space is None:
        space = feature_space(table, settings)
    region = region or _region_label(table)
    test, val = prep.rows["test"], prep.rows["val"]
    if len(test) == 0:
        log.warning("probe %s/%s: no test images with a value in region %s; not scored", table.model, attribute,
                    region or _region_label(table))
        return None
    C, g, where, (D_test, D_val), mu, sd = fit_tuned(table, space, prep, settings, [test, val])
    model = table.model or ""
    params = {"C": C, "gamma": g * space.gamma_scale, "gamma_multiple": g, "tuned_on": where, "backend": space.backend,
              "evaluation": TEST_SPLIT}
    if needs_cv(table, prep, settings):
        # too few test subjects for stable numbers: the metrics come from repeated subject-level CV
        rows, cv_params = cv_metrics(table, prep, space, settings, model=model, region=region)
        metrics = pl.DataFrame(rows, schema=METRICS_SCHEMA)
        params.update(cv_params)
    else:
        metrics = score_decisions(table, prep, test, D_test, mu, sd, settings, model=model, region=region,
                                  n_train=len(prep.rows["train"]), backend=space.backend)
    predictions = pl.concat([
        prediction_frame(table, prep, r, D, split, model, region, mu, sd)
        for r, D, split in ((val, D_val, "val"), (test, D_test, "test"))
    ])
    if prep.kind == "classification":
        params["classes"] = list(prep.classes)  # the order of class_scores' columns
    log.info("probe %s/%s/%s: %s", model, region, attribute, ", ".join(
        f"{m}={v:.3f} [{lo:.3f}, {hi:.3f}]" for m, v, lo, hi in metrics.select(
            "metric", "value", "ci_low", "ci_high").iter_rows()) + f" ({params})")
    return ProbeResult(metrics=metrics, predictions=predictions, backend=space.backend, params=params)


def score_decisions(table: AnalysisTable, prep: PreparedAttribute, test: np.ndarray, D_test: np.ndarray, mu: float,
                 sd: float, settings: ProbeSettings, *, model: str, region: str, n_train: int,
                 backend: str) -> pl.DataFrame:
    """The metrics rows (METRICS_SCHEMA) of one attribute's decisions on the test rows: balanced accuracy and ROC
    AUC (classification; `D_test` the binary decision or the per-class scores) or MAE (regression; `D_test[:, 0]`
    the standardised prediction, `· sd + mu` its value), each with a 95% bootstrap CI over test subjects. Shared by
    the probes and the supervised baselines, so both are scored alike (the probes: RBF decisions; the baselines:
    volume means of the network outputs)."""
    subj_codes = np.unique(table.frame["subject_id"].to_numpy()[test], return_inverse=True)[1]
    rng = np.random.default_rng(settings.seed)
    rows = []
    if prep.kind == "classification":
        k = len(prep.classes)
        y = prep.codes[test]
        pred = predict_codes(D_test, k)
        for metric, stat, chance in (
            ("balanced_accuracy", lambda W: balanced_accuracy_w(y, pred, W, k), 1.0 / k),
            ("roc_auc", lambda W: macro_auc_w(y, D_test, W, k), 0.5),
        ):
            v, lo, hi = with_ci(stat, len(test), subj_codes, settings.n_bootstrap, rng)
            rows.append((metric, v, lo, hi, chance))
    else:
        y = prep.values[test]
        pred = D_test[:, 0] * sd + mu
        err = np.abs(pred - y)
        v, lo, hi = with_ci(lambda W: (W @ err) / W.sum(1), len(test), subj_codes, settings.n_bootstrap, rng)
        # chance: predicting the train mean for everyone
        baseline = float(np.mean(np.abs(y - np.nanmean(prep.values[prep.rows["train"]])))) if len(y) else np.nan
        rows.append(("mae", v, lo, hi, baseline))
    return pl.DataFrame(
        [{"model": model, "region": region, "attribute": prep.spec.name, "kind": prep.kind, "metric": m, "value": v,
          "ci_low": lo, "ci_high": hi, "n_train": n_train, "n_test": len(test), "chance": ch, "backend": backend,
          "evaluation": TEST_SPLIT}
         for m, v, lo, hi, ch in rows],
        schema=METRICS_SCHEMA,
    )


def _region_label(table: AnalysisTable) -> str:
    regions = table.frame["region"].unique().to_list()
    return regions[0] if len(regions) == 1 else ALL_REGIONS


def prediction_frame(table, prep: PreparedAttribute, rows, D, split, model, region, mu, sd) -> pl.DataFrame:
    """Predictions (PREDICTIONS_SCHEMA) of one attribute on the given rows of one split, from decisions as
    `score_decisions` takes them."""
    keys = table.frame[rows].select("subject_id", "image_uid")
    n = len(rows)
    if prep.kind == "classification":
        k = len(prep.classes)
        pred = predict_codes(D, k)
        classes = np.asarray(prep.classes, dtype=object)
        # binary: the decision value for the second class; multi-class: the predicted class's own score
        score = D[:, 0] if k == 2 else D[np.arange(n), pred]
        class_scores = np.column_stack([-D[:, 0], D[:, 0]]) if k == 2 else D
        cols = dict(y_true=classes[prep.codes[rows]].tolist(), y_pred=classes[pred].tolist(), score=score,
                    y_true_value=[None] * n, y_pred_value=[None] * n, class_scores=class_scores.tolist())
    else:
        y = prep.values[rows]
        p = D[:, 0] * sd + mu
        cols = dict(y_true=[f"{v:.6g}" for v in y], y_pred=[f"{v:.6g}" for v in p], score=p,
                    y_true_value=y, y_pred_value=p, class_scores=[None] * n)
    return pl.DataFrame({"model": [model] * n, "region": [region] * n, "attribute": [prep.spec.name] * n,
                         "subject_id": keys["subject_id"], "image_uid": keys["image_uid"], "split": [split] * n,
                         **cols}, schema=PREDICTIONS_SCHEMA)


# ------------------------------------------------------------------------------------------- stage

def probe_table(table: AnalysisTable, attributes: Iterable[str], settings: ProbeSettings | Mapping | None = None,
                region: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Probe several attributes on one table sharing one FeatureSpace; returns (metrics, predictions, params)."""
    settings = ProbeSettings.from_config(settings)
    space = feature_space(table, settings)
    metrics, predictions, params = [], [], {}
    for attribute in attributes:
        res = probe_attribute(table, attribute, settings, space=space, region=region)
        if res is not None:
            metrics.append(res.metrics)
            predictions.append(res.predictions)
            params[attribute] = res.params
    empty_m, empty_p = pl.DataFrame(schema=METRICS_SCHEMA), pl.DataFrame(schema=PREDICTIONS_SCHEMA)
    return (pl.concat(metrics) if metrics else empty_m, pl.concat(predictions) if predictions else empty_p, params)


def _default_attributes(table: AnalysisTable, roles: Iterable[str] | None) -> list[str]:
    return [a for a, s in table.specs.items() if (roles is None or s.role in roles) and a in table.frame.columns]


def run_probes(
    embeddings: PathLike,
    subjects: PathLike,
    splits: PathLike,
    *,
    images: PathLike | None = None,
    attributes: Mapping | None = None,
    regions: Sequence[str] | None = None,
    probe_attributes: Sequence[str] | None = None,
    across_regions: bool = True,
    settings: ProbeSettings | Mapping | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Every attribute in every region (default: each region in the file) and, across regions, the region
    itself. `attributes` is the config `attributes:` mapping (default: subjects.parquet's metadata);
    `probe_attributes` restricts which ones are probed."""
    settings = ProbeSettings.from_config(settings)
    regions = list(regions) if regions is not None else regions_of(embeddings)
    metrics, predictions, params = [], [], {}
    for region in regions:
        table = load_analysis_table(embeddings, subjects, splits, images, region, attributes=attributes)
        names = list(probe_attributes) if probe_attributes is not None else _default_attributes(table, None)
        m, p, prm = probe_table(table, names, settings, region=region)
        m = pl.concat([m, _competition_row(m, p, prm, settings, table.model or "", region)])
        metrics.append(m), predictions.append(p)
        params[region] = prm
        del table
    if across_regions and len(regions) > 1:
        table = load_analysis_table(embeddings, subjects, splits, images, regions, attributes=attributes)
        m, p, prm = probe_table(table, ["region"], settings, region=ALL_REGIONS)
        metrics.append(m), predictions.append(p)
        params[ALL_REGIONS] = prm
    return pl.concat(metrics), pl.concat(predictions), params


def _competition_row(metrics: pl.DataFrame, predictions: pl.DataFrame, params: Mapping, settings: ProbeSettings,
                     model: str, region: str) -> pl.DataFrame:
    """The CheXpert competition mean AUC of this region's test predictions (no row without the five findings)."""
    classes = {a: p["classes"] for a, p in params.items() if "classes" in p}
    backend = metrics["backend"][0] if metrics.height else ""
    rows = competition_metrics(predictions, classes, model=model, region=region, backend=backend,
                               n_bootstrap=settings.n_bootstrap, seed=settings.seed)
    return pl.DataFrame([{**r, "evaluation": TEST_SPLIT} for r in rows], schema=METRICS_SCHEMA)


def write_probes(
    embeddings: PathLike,
    subjects: PathLike,
    splits: PathLike,
    metrics_out: PathLike,
    predictions_out: PathLike,
    **kwargs,
) -> pl.DataFrame:
    """The probe stage for one model: run_probes(...) and write metrics.parquet and predictions.parquet
    (tuned hyperparameters and settings in their metadata). Returns the metrics."""
    settings = ProbeSettings.from_config(kwargs.pop("settings", None))
    metrics, predictions, params = run_probes(embeddings, subjects, splits, settings=settings, **kwargs)
    meta = {"settings": dataclasses.asdict(settings), "params": params,
            "model": read_parquet_metadata(embeddings).get("model", Path(embeddings).parent.name)}
    write_parquet(metrics, metrics_out, metadata=meta)
    write_parquet(predictions, predictions_out, metadata=meta)
    return metrics


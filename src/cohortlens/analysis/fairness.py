"""The fairness stage: per-subgroup performance of target predictions over protected attributes.

For every target attribute (role `target`, or any attribute nominated in config `fairness.targets`) and every
protected attribute (sex, binned age, site, …), on the test split of the probe's predictions:

- per group (fairlearn MetricFrame): accuracy, balanced accuracy, ROC AUC, TPR, FNR, FPR, selection rate and
  count for classification targets; MAE and mean error (bias) for continuous targets;
- between groups: demographic parity difference and equalized odds difference (fairlearn's functions),
  equal-opportunity (TPR), accuracy, balanced-accuracy and AUC differences (max − min over groups);
- 95% bootstrap CIs that resample test *subjects* (all of a subject's images together);
- a difference is flagged when its CI excludes zero.

Decisions:
- Classification metrics are binary: a binary target's positive class is `fairness.positive[target]`, else
  the class named "positive" if declared, else the last declared category (sex [F, M] → M, the class the
  probe's score refers to). A multi-class target is scored one-vs-rest for each class (the `positive`
  column says which); its AUC uses the probe's per-class scores when their class order can be recovered.
- TPR/FNR are undefined (NaN) in a group without positives and FPR in a group without negatives; fairlearn
  returns 0 there, which would invent a disparity. Such groups drop out of that difference only.
- Groups with fewer than `min_group_size` test subjects are reported but left out of the differences.
- max − min over groups is never below zero, so its own bootstrap CI would (almost) never contain zero.
  The CI reported and tested is that of the *signed* gap between the two groups that define the point
  difference (re-measured in each replicate), at level 1 − α/m with m the number of group pairs
  (Bonferroni: picking the extreme pair out of k groups is m comparisons). Equalized odds uses whichever
  of the TPR and FPR gaps defines it, with m doubled.
- Point values come from MetricFrame; bootstrap replicates use the same definitions on confusion counts
  weighted by subject multiplicities (`fairness_metrics`).
- Continuous protected attributes (and dates) are binned: `fairness.bins[attr]` is a number of quantile bins
  (edges from the whole cohort, rounded to 3 significant digits) or a list of edges; default 3 quantile bins
  (`fairness_groups`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import polars as pl
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

from cohortlens.analysis.fairness_groups import bin_edges, protected_groups
from cohortlens.analysis.fairness_metrics import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    bootstrap_binary,
    bootstrap_regression,
    metric_frame_binary,
    metric_frame_regression,
)
from cohortlens.analysis.stats import bootstrap_weights, percentile_ci
from cohortlens.analysis.table import AttributeSpec, attribute_specs, attribute_values, join_attributes
from cohortlens.io.tables import read_parquet_metadata, write_parquet
from cohortlens.runtime import limit_threads
from cohortlens.types import PathLike

log = logging.getLogger(__name__)

GROUPS_SCHEMA = {
    "model": pl.Utf8, "region": pl.Utf8, "target": pl.Utf8, "positive": pl.Utf8, "protected": pl.Utf8,
    "group": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
    "n": pl.Int64,
}
SUMMARY_SCHEMA = {
    "model": pl.Utf8, "region": pl.Utf8, "target": pl.Utf8, "positive": pl.Utf8, "protected": pl.Utf8,
    "measure": pl.Utf8, "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "flagged": pl.Boolean,
    "group_high": pl.Utf8, "group_low": pl.Utf8, "n_groups": pl.Int64, "n": pl.Int64, "ci_level": pl.Float64,
}
OVERALL = "(all)"
# measure -> the per-group metric whose max - min it is (equalized odds is handled on its own)
CLASSIFICATION_DIFFERENCES = {
    "demographic_parity_difference": "selection_rate",
    "equal_opportunity_difference": "tpr",
    "accuracy_difference": "accuracy",
    "balanced_accuracy_difference": "balanced_accuracy",
    "roc_auc_difference": "roc_auc",
}
REGRESSION_DIFFERENCES = {"mae_difference": "mae", "mean_error_difference": "mean_error"}


@dataclass
class FairnessSettings:
    """Config `fairness:`; every field has the default used when the key is absent."""

    targets: list[str] | None = None  # None: attributes with role target
    protected: list[str] | None = None  # None: role protected + acquisition, minus the targets
    positive: dict = field(default_factory=dict)  # target -> positive class (or list of classes)
    bins: dict = field(default_factory=dict)  # attribute -> n quantile bins | list of edges
    default_bins: int = 3
    split: str = "test"
    n_boot: int = 1000
    alpha: float = 0.05
    min_group_size: int = 5
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping | "FairnessSettings" | None) -> "FairnessSettings":
        if isinstance(cfg, FairnessSettings):
            return cfg
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"fairness: unknown settings {sorted(unknown)}")
        out = cls(**cfg)
        out.positive = dict(out.positive or {})
        out.bins = dict(out.bins or {})
        return out


# ------------------------------------------------------------------------------------------- one evaluation subset

@dataclass
class EvaluationSubset:
    """One (region, target, positive class, protected attribute): test rows with everything aligned."""

    model: str
    region: str
    target: str
    positive: str | None
    protected: str
    kind: str  # classification | regression
    y_true: np.ndarray
    y_pred: np.ndarray
    score: np.ndarray | None
    groups: np.ndarray  # object labels
    group_order: list[str]
    subjects: np.ndarray  # subject id per row


def fairness_of_subset(subset: EvaluationSubset, settings: FairnessSettings, rng: np.random.Generator
                       ) -> tuple[list[dict], list[dict]]:
    """Group rows and summary rows for one evaluation subset."""
    present = np.array([g is not None for g in subset.groups], dtype=bool)
    y_true, y_pred = subset.y_true[present], subset.y_pred[present]
    score = subset.score[present] if subset.score is not None else None
    groups = subset.groups[present].astype(str)
    subjects = subset.subjects[present]
    order = [g for g in subset.group_order if g in set(groups)]
    if len(y_true) < 2 or not order:  # nothing to compare (and fairlearn's MetricFrame rejects a single row)
        return [], []
    code_of = {g: i for i, g in enumerate(order)}
    group_codes = np.array([code_of[g] for g in groups], dtype=np.int64)
    _, subject_codes = np.unique(subjects, return_inverse=True)
    subjects_per_group = np.array([len(np.unique(subjects[group_codes == k])) for k in range(len(order))])

    if subset.kind == "classification":
        by_group, overall = metric_frame_binary(y_true, y_pred, score, groups)
        metric_names = CLASSIFICATION_METRICS
    else:
        by_group, overall = metric_frame_regression(y_true, y_pred, groups)
        metric_names = REGRESSION_METRICS

    def replicate(W: np.ndarray, codes: np.ndarray, n_codes: int) -> dict[str, np.ndarray]:
        if subset.kind == "classification":
            return bootstrap_binary(y_true, y_pred, score, codes, n_codes, W)
        return bootstrap_regression(y_true, y_pred, codes, n_codes, W)

    single = np.zeros(len(y_true), np.int64)
    reps: dict[str, list] = {m: [] for m in metric_names}
    reps_all: dict[str, list] = {m: [] for m in metric_names}
    if settings.n_boot > 0:
        for W in bootstrap_weights(subject_codes, settings.n_boot, rng):
            for m, v in replicate(W, group_codes, len(order)).items():
                reps[m].append(v)
            for m, v in replicate(W, single, 1).items():
                reps_all[m].append(v)
    reps = {m: np.concatenate(v) if v else np.empty((0, len(order))) for m, v in reps.items()}
    reps_all = {m: np.concatenate(v)[:, 0] if v else np.empty(0) for m, v in reps_all.items()}

    base = dict(model=subset.model, region=subset.region, target=subset.target, positive=subset.positive,
                protected=subset.protected)
    level = 1 - settings.alpha
    group_rows = []
    for k, g in enumerate(order):
        for m in metric_names:
            value = by_group[g].get(m, math.nan)
            lo, hi = (value, value) if m == "count" else percentile_ci(reps[m][:, k], level)
            group_rows.append({**base, "group": g, "metric": m, "value": value, "ci_low": lo, "ci_high": hi,
                               "n": int(subjects_per_group[k])})
    for m in metric_names:
        value = overall.get(m, math.nan)
        lo, hi = (value, value) if m == "count" else percentile_ci(reps_all[m], level)
        group_rows.append({**base, "group": OVERALL, "metric": m, "value": value, "ci_low": lo, "ci_high": hi,
                           "n": int(len(np.unique(subjects)))})

    eligible = [k for k in range(len(order)) if subjects_per_group[k] >= settings.min_group_size]
    n_eligible_rows = int(np.isin(group_codes, eligible).sum())

    def gap(metric: str, extra_comparisons: int = 1) -> dict:
        """max - min of a per-group metric over eligible groups, CI of the signed extreme-pair gap."""
        vals = {k: by_group[order[k]].get(metric, math.nan) for k in eligible}
        vals = {k: v for k, v in vals.items() if np.isfinite(v)}
        if len(vals) < 2:
            return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "flagged": False,
                    "group_high": None, "group_low": None, "n_groups": len(vals), "ci_level": math.nan}
        ranked = sorted(vals, key=lambda k: (vals[k], k))  # two distinct groups even when values tie
        lo, hi = ranked[0], ranked[-1]
        pairs = len(vals) * (len(vals) - 1) // 2 * extra_comparisons
        ci_level = 1 - settings.alpha / pairs
        diff = reps[metric][:, hi] - reps[metric][:, lo] if len(reps[metric]) else np.empty(0)
        ci_low, ci_high = percentile_ci(diff, ci_level)
        return {"value": vals[hi] - vals[lo], "ci_low": ci_low, "ci_high": ci_high,
                "flagged": bool(np.isfinite(ci_low) and (ci_low > 0 or ci_high < 0)),
                "group_high": order[hi], "group_low": order[lo], "n_groups": len(vals), "ci_level": ci_level}

    summary_rows = []
    if subset.kind == "classification":
        for measure, metric in CLASSIFICATION_DIFFERENCES.items():
            summary_rows.append({**base, "measure": measure, **gap(metric), "n": n_eligible_rows})
        tpr_gap, fpr_gap = gap("tpr", 2), gap("fpr", 2)
        candidates = [x for x in (tpr_gap, fpr_gap) if np.isfinite(x["value"])]
        eod = max(candidates, key=lambda x: x["value"]) if candidates else tpr_gap
        summary_rows.append({**base, "measure": "equalized_odds_difference", **eod, "n": n_eligible_rows})
        # cross-check against fairlearn's own functions on the same rows (same definition, same numbers)
        keep = np.isin(group_codes, eligible)
        if len(eligible) >= 2 and keep.any():
            dpd = demographic_parity_difference(y_true[keep], y_pred[keep], sensitive_features=groups[keep])
            if np.isfinite(summary_rows[0]["value"]) and not math.isclose(dpd, summary_rows[0]["value"], abs_tol=1e-9):
                log.warning("fairness %s/%s: demographic parity %.6f differs from fairlearn %.6f",
                            subset.target, subset.protected, summary_rows[0]["value"], dpd)
            if all(y_true[keep & (group_codes == k)].any() and not y_true[keep & (group_codes == k)].all()
                   for k in eligible):
                eod_fl = equalized_odds_difference(y_true[keep], y_pred[keep], sensitive_features=groups[keep])
                if np.isfinite(eod["value"]) and not math.isclose(eod_fl, eod["value"], abs_tol=1e-9):
                    log.warning("fairness %s/%s: equalized odds %.6f differs from fairlearn %.6f",
                                subset.target, subset.protected, eod["value"], eod_fl)
    else:
        for measure, metric in REGRESSION_DIFFERENCES.items():
            summary_rows.append({**base, "measure": measure, **gap(metric), "n": n_eligible_rows})
    return group_rows, summary_rows


# ------------------------------------------------------------------------------------------- predictions

def _positive_classes(target: str, spec: AttributeSpec, observed: Iterable[str],
                      settings: FairnessSettings) -> list[str]:
    declared = list(spec.categories or ())
    classes = [c for c in declared if c in set(observed)] + sorted(set(observed) - set(declared))
    wanted = settings.positive.get(target)
    if wanted is not None:
        return [str(w) for w in ([wanted] if isinstance(wanted, str) else wanted)]
    if "positive" in classes:
        return ["positive"]
    if len(classes) == 2:
        return [(declared[-1] if declared and declared[-1] in classes else classes[-1])]
    return classes


def _probe_class_order(spec: AttributeSpec, observed: Iterable[str]) -> list[str]:
    """The probe's class order: declared categories (those seen) first, then the others sorted."""
    seen = set(observed)
    declared = [c for c in (spec.categories or ()) if c in seen]
    return declared + sorted(seen - set(declared))


def _class_score(preds: pl.DataFrame, spec: AttributeSpec, positive: str,
                 n_classes_all: list[str]) -> np.ndarray | None:
    """Score of `positive` per row: the binary score (sign flipped if it refers to the other class) or the
    probe's per-class score column when its class order is recoverable; None otherwise."""
    if "class_scores" in preds.columns and preds["class_scores"].null_count() < preds.height:
        lengths = preds["class_scores"].list.len().unique().to_list()
        if len(lengths) == 1:
            order = n_classes_all if len(n_classes_all) == lengths[0] else (
                list(spec.categories) if spec.categories and len(spec.categories) == lengths[0] else None)
            if order is not None and positive in order:
                k = order.index(positive)
                return np.asarray(preds["class_scores"].list.get(k).to_list(), dtype=np.float64)
        return None
    if "score" in preds.columns and len(n_classes_all) == 2 and preds["score"].null_count() == 0:
        s = preds["score"].to_numpy().astype(np.float64)
        return s if positive == n_classes_all[1] else -s
    return None


def fairness_tables(
    predictions: pl.DataFrame,
    subjects: pl.DataFrame,
    specs: Mapping[str, AttributeSpec],
    settings: FairnessSettings | Mapping | None = None,
    *,
    images: pl.DataFrame | None = None,
    model: str | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """groups and summary tables from a predictions frame (probe predictions.parquet: region, attribute,
    subject_id, image_uid, split, y_true, y_pred, score[, class_scores, y_true_value, y_pred_value])."""
    settings = FairnessSettings.from_config(settings)
    rng = np.random.default_rng(settings.seed)
    targets = settings.targets if settings.targets is not None else [a for a, s in specs.items() if s.role == "target"]
    protected_all = settings.protected if settings.protected is not None else [
        a for a, s in specs.items() if s.role in ("protected", "acquisition")]
    for name in [*targets, *protected_all]:
        if name not in specs:
            raise ValueError(f"fairness: attribute {name!r} is not declared (declared: {sorted(specs)})")

    preds = predictions
    if "split" in preds.columns and settings.split:
        preds = preds.filter(pl.col("split") == settings.split)
    if "model" not in preds.columns:
        preds = preds.with_columns(pl.lit(model or "model").alias("model"))
    if "image_uid" not in preds.columns:
        preds = preds.with_columns(pl.col("subject_id").alias("image_uid"))
    # the protected attributes, joined on subject (image-level ones on image_uid)
    joined_specs = {a: specs[a] for a in protected_all}
    keyed = preds.select("image_uid", "subject_id").unique(maintain_order=True)
    drop = [a for a in protected_all if a in keyed.columns]
    keyed = join_attributes(keyed.drop(drop), subjects, images, joined_specs)
    # quantile edges come from the whole cohort, so they do not move with the test split
    cohort_values = {}
    for a in protected_all:
        if specs[a].is_categorical:
            continue
        source = images if specs[a].level == "image" and images is not None else subjects
        cohort_values[a] = attribute_values(source if a in source.columns else keyed, specs[a])

    group_rows, summary_rows = [], []
    for target in targets:
        tspec = specs[target]
        tp = preds.filter(pl.col("attribute") == target)
        if tp.height == 0:
            log.warning("fairness: no %s predictions for target %s", settings.split, target)
            continue
        for (model_name, region), part in tp.group_by(["model", "region"], maintain_order=True):
            part = part.join(keyed, on=["image_uid", "subject_id"], how="left", suffix="_attr")
            subjects_col = part["subject_id"].to_numpy().astype(str)
            if tspec.is_categorical:
                y_true_s = np.asarray(part["y_true"].cast(pl.Utf8).to_list(), dtype=object)
                y_pred_s = np.asarray(part["y_pred"].cast(pl.Utf8).to_list(), dtype=object)
                observed = [v for v in np.concatenate([y_true_s, y_pred_s]) if v is not None]
                order = _probe_class_order(tspec, observed)
                tasks = [(pos, "classification") for pos in _positive_classes(target, tspec, observed, settings)]
            else:
                tasks = [(None, "regression")]
            for positive, kind in tasks:
                if kind == "classification":
                    ok = np.array([a is not None and b is not None for a, b in zip(y_true_s, y_pred_s)])
                    y_true = (y_true_s == positive)
                    y_pred = (y_pred_s == positive)
                    score = _class_score(part, tspec, positive, order)
                else:
                    tv = part["y_true_value"] if "y_true_value" in part.columns else part["y_true"]
                    pv = part["y_pred_value"] if "y_pred_value" in part.columns else part["y_pred"]
                    y_true = tv.cast(pl.Float64).fill_null(np.nan).to_numpy()
                    y_pred = pv.cast(pl.Float64).fill_null(np.nan).to_numpy()
                    ok = np.isfinite(y_true) & np.isfinite(y_pred)
                    score = None
                if score is not None:
                    ok &= np.isfinite(score)
                for prot in protected_all:
                    if prot == target:
                        continue
                    pspec = specs[prot]
                    values = attribute_values(part, pspec)
                    edges = None
                    if not pspec.is_categorical:
                        edges = bin_edges(cohort_values[prot], pspec, settings.bins.get(prot, settings.default_bins))
                    labels, group_order = protected_groups(values, pspec, edges)
                    subset = EvaluationSubset(
                        model=str(model_name), region=str(region), target=target, positive=positive, protected=prot,
                        kind=kind, y_true=y_true[ok], y_pred=y_pred[ok], score=score[ok] if score is not None else None,
                        groups=labels[ok], group_order=group_order, subjects=subjects_col[ok])
                    g, s = fairness_of_subset(subset, settings, rng)
                    group_rows += g
                    summary_rows += s
    return pl.DataFrame(group_rows, schema=GROUPS_SCHEMA), pl.DataFrame(summary_rows, schema=SUMMARY_SCHEMA)


def run_fairness(
    predictions: PathLike,
    subjects: PathLike,
    groups_out: PathLike,
    summary_out: PathLike,
    *,
    images: PathLike | None = None,
    attributes: Mapping | None = None,
    settings: FairnessSettings | Mapping | None = None,
    threads: int | None = None,
) -> pl.DataFrame:
    """The fairness stage for one model: predictions.parquet + subjects.parquet → groups.parquet and
    summary.parquet (settings in their metadata). Returns the summary. `threads` caps the BLAS pool."""
    with limit_threads(threads):
        return _run_fairness(predictions, subjects, groups_out, summary_out, images, attributes, settings)


def _run_fairness(predictions, subjects, groups_out, summary_out, images, attributes, settings) -> pl.DataFrame:
    settings = FairnessSettings.from_config(settings)
    specs = attribute_specs(attributes if attributes is not None else subjects)
    preds = pl.read_parquet(predictions)
    model = read_parquet_metadata(predictions).get("model")
    subj = pl.read_parquet(subjects)
    imgs = pl.read_parquet(images) if images is not None else None
    groups_df, summary_df = fairness_tables(preds, subj, specs, settings, images=imgs, model=model)
    meta = {"settings": settings.__dict__, "model": model}
    write_parquet(groups_df, groups_out, metadata=meta)
    write_parquet(summary_df, summary_out, metadata=meta)
    return summary_df

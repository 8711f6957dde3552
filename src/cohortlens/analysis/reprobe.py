"""Re-probe: the original embedding and each mitigated one, probed for the protected attributes (should fall
to chance) and the targets (should be kept), with the attackers of `attack`. One row per (region, method,
attribute, probe, metric): value before and after, the drop with its paired bootstrap interval, and the
after-value's interval and permutation p-value against chance.

The probes here are not the model table's (`probe`: one RBF SVM tuned on the val split, subject-bootstrap CI)
by design: erasure is judged by attackers that adapt to the erased embedding (hyper-parameters by CV inside
train, a second nonlinear family, a permutation test against chance), and by the linear probe that LEACE and
INLP defeat by construction; the model table measures how much an unmodified embedding encodes."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import polars as pl

from cohortlens.analysis.attack import HIGHER_IS_BETTER, PROBES, bootstrap_ci, fit_predict, metric_values, p_vs_chance
from cohortlens.analysis.table import AnalysisTable, AttributeSpec, load_analysis_table, present
from cohortlens.io.tables import read_parquet_metadata, write_parquet
from cohortlens.runtime import threaded
from cohortlens.types import PathLike

REPROBE_SCHEMA = {
    "model": pl.Utf8, "region": pl.Utf8, "method": pl.Utf8, "erased": pl.Utf8, "attribute": pl.Utf8,
    "role": pl.Utf8, "probe": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64, "chance": pl.Float64,
    "value_before": pl.Float64, "drop": pl.Float64, "n_train": pl.Int64, "n_test": pl.Int64,
    # 95 % bootstrap interval of value, permutation p-value of value against chance, paired interval of drop
    "ci_low": pl.Float64, "ci_high": pl.Float64, "p_vs_chance": pl.Float64,
    "drop_ci_low": pl.Float64, "drop_ci_high": pl.Float64,
}


def probe_predictions(X: np.ndarray, values: np.ndarray, spec: AttributeSpec, train: np.ndarray,
                      test: np.ndarray, seed: int = 0) -> dict:
    """probe → (test labels, test predictions) for every probe of `attack.PROBES`, plus the chance level of
    each metric; {} when the split leaves too little to fit or score."""
    ok = present(values)
    train, test = train & ok, test & ok
    if train.sum() < 3 or test.sum() < 2:
        return {}
    if spec.is_categorical:
        y = np.asarray([str(v) for v in values], dtype=object)
        classes = sorted(set(y[train]))
        if len(classes) < 2:
            return {}
        test = test & np.isin(y, classes)  # a class never seen in training cannot be predicted
        kind, chance = "classification", {"balanced_accuracy": 1.0 / len(classes)}
    else:
        y = np.where(ok, values, 0.0).astype(np.float64)
        kind = "regression"
        chance = {"mae": float(np.mean(np.abs(y[test] - y[train].mean()))), "r2": 0.0}
    out = {"chance": chance, "kind": kind}
    for probe in PROBES:
        pred = fit_predict(X, y, kind, probe, train, test, seed)
        if pred is not None:
            out[probe] = (y[test], pred)
    return out


def _method_label(path: PathLike) -> tuple[str, str]:
    mitigation = read_parquet_metadata(path).get("mitigation") or {}
    method = mitigation.get("method", Path(path).parent.name)
    return str(method), "+".join(mitigation.get("attributes", []))


@threaded
def reprobe(
    original: PathLike,
    mitigated: Sequence[PathLike] | Mapping[str, PathLike],
    subjects: PathLike,
    splits: PathLike,
    protected: Sequence[str],
    targets: Sequence[str],
    out_path: PathLike | None = None,
    *,
    images: PathLike | None = None,
    attributes: Mapping | None = None,
    regions: Iterable[str] | None = None,
    seed: int = 0,
) -> pl.DataFrame:
    """Probe the original and every mitigated embedding per region; one row per (region, method, attribute,
    probe, metric) with the value before mitigation and the drop (positive = performance lost: before −
    after for balanced accuracy and R², after − before for MAE). `mitigated` is a list of files (method from
    their metadata) or a mapping label → file. Writes `out_path` (reprobe.parquet) when given."""
    items = list(mitigated.items()) if isinstance(mitigated, Mapping) else [(None, p) for p in mitigated]
    base = load_analysis_table(original, subjects, splits, images, attributes=attributes)
    model = base.model or Path(original).parent.name
    roles = [(a, "protected") for a in protected] + [(a, "target") for a in targets]
    region_list = sorted(set(base.frame["region"].to_list())) if regions is None else list(regions)

    def predictions_of(table: AnalysisTable) -> dict:
        reg = table.frame["region"].to_numpy()
        train, test = table.split_mask("train"), table.split_mask("test")
        result = {}
        for region in region_list:
            rows = reg == region
            for attribute, _ in roles:
                values = table.values(attribute)[rows]
                result[(region, attribute)] = (
                    probe_predictions(table.X[rows], values, table.spec(attribute), train[rows], test[rows], seed),
                    int((train[rows] & present(values)).sum()), int((test[rows] & present(values)).sum()))
        return result

    before = predictions_of(base)
    rows_out = []
    for label, path in items:
        method, erased = _method_label(path)
        if label is not None:
            method = label
        table = load_analysis_table(path, subjects, splits, images, attributes=attributes)
        if not table.frame["image_uid"].equals(base.frame["image_uid"]):
            raise ValueError(f"{path}: rows differ from {original}; a mitigated file keeps the source's rows")
        for (region, attribute), (preds, n_train, n_test) in predictions_of(table).items():
            role = dict(roles)[attribute]
            prior = before[(region, attribute)][0]
            for probe in PROBES:
                if probe not in preds:
                    continue
                y, pred = preds[probe]
                pred_before = prior[probe][1] if probe in prior else None
                values_before = metric_values(preds["kind"], y, pred_before) if pred_before is not None else {}
                for metric, value in metric_values(preds["kind"], y, pred).items():
                    value_before = values_before.get(metric, np.nan)
                    drop = value_before - value if HIGHER_IS_BETTER[metric] else value - value_before
                    rows_out.append({"model": model, "region": region, "method": method, "erased": erased,
                                     "attribute": attribute, "role": role, "probe": probe, "metric": metric,
                                     "value": value, "chance": preds["chance"][metric], "value_before": value_before,
                                     "drop": drop, "n_train": n_train, "n_test": n_test,
                                     "p_vs_chance": p_vs_chance(metric, y, pred, seed=seed),
                                     **bootstrap_ci(metric, y, pred, pred_before, seed=seed)})
    frame = pl.DataFrame(rows_out, schema=REPROBE_SCHEMA) if rows_out else pl.DataFrame(schema=REPROBE_SCHEMA)
    if out_path is not None:
        write_parquet(frame, out_path, metadata={"model": model, "protected": list(protected),
                                                 "targets": list(targets), "seed": seed})
    return frame

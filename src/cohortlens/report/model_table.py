"""The model comparison section: paper 003's Table 1 (`analysis.model_table.model_table`) as HTML, each cell
value [95% CI] with the best model per region and column in bold, plus the ROC AUCs and chance levels. The probes
of the embeddings and the supervised baselines (networks trained on the images) share the table."""

from __future__ import annotations

import html
from typing import Iterable, Sequence

import numpy as np
import polars as pl

from cohortlens.analysis.chexpert_auc import COMPETITION_ATTRIBUTE, COMPETITION_LABEL
from cohortlens.analysis.model_table import (
    BACKEND_NAMES,
    KEY_COLUMNS,
    TABLE_METRICS,
    UNRECORDED,
    column_label,
    model_table,
    read_metrics,
)
from cohortlens.analysis.probe_cv import TEST_SPLIT
from cohortlens.report.fragments import not_run, read_frames, table
from cohortlens.report.units import column_with_unit, unit_of
from cohortlens.types import PathLike

TEST_SUBJECTS = "test subjects"


def test_subjects(metrics: pl.DataFrame, predictions: Sequence[PathLike] = ()) -> dict[tuple[str, str], str]:
    """{(model, region): how many test subjects the row's numbers rest on}: the distinct subjects of the test
    split in the probes' predictions (the bootstrap CIs resample them), per attribute, written as a range
    ("41–42") when attributes differ (missing values); without predictions, or where the row has attributes
    scored by repeated cross-validation (every subject with a value is held out once per repeat), the metrics'
    `n_test` (evaluated rows: images, one per subject in a region)."""
    def spans(counts: pl.DataFrame) -> dict[tuple[str, str], str]:
        out = {}
        for (model, region), part in counts.group_by("model", "region"):
            lo, hi = part["n"].min(), part["n"].max()
            out[(model, region)] = str(lo) if lo == hi else f"{lo}–{hi}"
        return out

    out = {}
    if "n_test" in metrics.columns:  # the fallback for a model without predictions
        out = spans(metrics.filter(pl.col("n_test").is_not_null()).select(
            "model", "region", "attribute", pl.col("n_test").alias("n")))
    if predictions:
        frame = pl.concat([pl.scan_parquet(p).select("model", "region", "attribute", "subject_id", "split")
                           for p in predictions], how="vertical_relaxed")
        out.update(spans(frame.filter(pl.col("split") == "test").group_by("model", "region", "attribute")
                         .agg(pl.col("subject_id").n_unique().alias("n")).collect()))
    if "evaluation" in metrics.columns and "n_test" in metrics.columns:
        # repeated cross-validation scores every subject of the attribute, not the test split's: its n_test
        cv = metrics.filter(pl.col("evaluation").is_not_null() & (pl.col("evaluation") != TEST_SPLIT))
        rows = metrics.join(cv.select("model", "region").unique(), on=["model", "region"], how="semi")
        out.update(spans(rows.filter(pl.col("n_test").is_not_null()).select(
            "model", "region", "attribute", pl.col("n_test").alias("n"))))
    return out


def model_table_html(metrics: pl.DataFrame | Iterable[PathLike], digits: int = 3,
                     predictions: Sequence[PathLike] = (), units: dict | None = None) -> str:
    """Model comparison table as an HTML fragment: supervision, type and the probe that ran, the test subjects behind the row
    (`test_subjects`), value [95% CI] per cell (an MAE in its attribute's unit, named in the header), the best
    model per region and column in bold."""
    metrics = read_metrics(metrics)
    wide = model_table(metrics)
    subjects = test_subjects(metrics, predictions)
    value_cols = wide.columns[len(KEY_COLUMNS):]
    ci = {(m, r, a): (lo, hi) for m, r, a, metric, lo, hi in metrics.select(
        "model", "region", "attribute", "metric", "ci_low", "ci_high").iter_rows()
        if metric in TABLE_METRICS.values()}
    attr_of = {column_label(a, m): a for a, m in metrics.select("attribute", "metric").unique().iter_rows()
               if m in TABLE_METRICS.values()}
    best = {}
    for col in value_cols:
        lower_better = col.endswith("↓")
        for region, part in wide.group_by("region"):
            vals = part[col].drop_nulls()
            if len(vals) > 1:
                best[(region[0], col)] = vals.min() if lower_better else vals.max()
    def header(col: str) -> str:
        return column_with_unit(col, unit_of(attr_of[col], units)) if col.endswith("↓") and col in attr_of else col

    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*KEY_COLUMNS, TEST_SUBJECTS])
    head += "".join(f"<th>{html.escape(header(c))}</th>" for c in value_cols)
    body = []
    for row in wide.iter_rows(named=True):
        cells = [f"<td>{html.escape(row[c] or '')}</td>" for c in KEY_COLUMNS]
        cells.append(f"<td>{html.escape(subjects.get((row['model'], row['region']), ''))}</td>")
        for col in value_cols:
            v = row[col]
            if v is None:
                cells.append("<td></td>")
                continue
            lo, hi = ci.get((row["model"], row["region"], attr_of[col]), (None, None))
            text = f"{v:.{digits}f}"
            if lo is not None and np.isfinite(lo):
                text += f" <span class='muted'>[{lo:.{digits}f}, {hi:.{digits}f}]</span>"
            if best.get((row["region"], col)) == v:
                text = f"<b>{text}</b>"
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table class='model-table'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def backends_used(frame: pl.DataFrame) -> str:
    """The probe backends of a metrics frame, as the table names them ('not recorded' for old files)."""
    if "backend" not in frame.columns:
        return UNRECORDED
    used = frame["backend"].drop_nulls().unique().to_list()
    order = list(BACKEND_NAMES)
    used.sort(key=lambda b: (order.index(b) if b in order else len(order), b))
    return ", ".join(BACKEND_NAMES.get(b, b) for b in used) or UNRECORDED


def model_table_section(metrics: Sequence[PathLike], baseline_metrics: Sequence[PathLike] = (),
                        predictions: Sequence[PathLike] = (), units: dict | None = None) -> str:
    """The probes' metrics files and the supervised baselines' (`results/baselines/{arch}/metrics.parquet`)."""
    if not metrics and not baseline_metrics:
        return not_run("probes")
    frame = read_frames([*metrics, *baseline_metrics])
    if frame.height == 0:
        return "<p class='muted'>the probes produced no metrics</p>"
    # the probes are not all SVMs: each row names the estimator that produced it
    behind = ("the distinct subjects of the test split in the probes' predictions" if predictions else
              "the test rows (images) of the metrics")
    parts = [f"<p>Probes in this run: <b>{html.escape(backends_used(frame))}</b>. Each number rests on the "
             f"<i>{TEST_SUBJECTS}</i> of its row ({behind}; a range when attributes have missing values), with a "
             f"95% bootstrap CI over them. Where a row's probe column names <code>repeated_cv(folds x repeats)</code>, "
             f"those attributes had too few test subjects (<code>probe: cv_below_test_subjects</code>): their value "
             f"is the mean over the folds of a repeated subject-level cross-validation over all subjects with a "
             f"value (train+val+test), its CI a subject bootstrap of that mean. Balanced accuracy ↑ for categorical attributes, MAE ↓ for continuous "
             f"ones in the attribute's unit; best model per region in bold (layout of Table 1, paper 003). The "
             f"probe column names the estimator that ran (backend auto): "
             f"{html.escape(BACKEND_NAMES['exact'])} up to the probe's <code>exact_max_train</code> training "
             f"rows, {html.escape(BACKEND_NAMES['approx'])} (kernel approximation, a least-squares kernel "
             f"machine rather than an SVM) above it, {html.escape(BACKEND_NAMES['cuml'])} on a GPU. Rows of "
             f"supervision <i>fully</i> and type <i>image</i> are the supervised baselines: networks trained on the "
             f"images per attribute with the probes' splits and balancing, weight decay chosen on val, a volume "
             f"predicted by the mean over its center slices (docs/findings.md, supervised baselines).</p>",
             model_table_html(frame, predictions=predictions, units=units)]
    if frame.filter(pl.col("attribute") == COMPETITION_ATTRIBUTE).height:
        parts.insert(1, f"<p>{html.escape(COMPETITION_LABEL)}: scikit-learn ROC AUC of each probe's test decision "
                        f"values for Atelectasis, Cardiomegaly, Consolidation, Edema and Pleural Effusion (rows "
                        f"labelled positive or negative after the manifest's uncertain/blank policies), averaged; "
                        f"95% subject-bootstrap CI (docs/chexpert.md).</p>")
    extra = frame.filter(pl.col("metric") == "roc_auc")
    if extra.height:
        parts.append("<details><summary>ROC AUC (one-vs-rest macro) and chance levels</summary>")
        cols = ["model", "region", "attribute", "value", "ci_low", "ci_high", "chance", "n_test", "backend", "evaluation"]
        parts.append(table(extra.select([c for c in cols if c in extra.columns]).sort("attribute", "region", "model"),
                           500))
        parts.append("</details>")
    return "".join(parts)

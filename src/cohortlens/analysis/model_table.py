"""The model comparison table of the probe stage, in the layout of paper 003's Table 1.

One row per (model, region): the probe that produced the row's numbers, then balanced accuracy (↑) for
categorical attributes and MAE (↓) for continuous ones. The probe column says which backend ran
(`BACKEND_NAMES`), because they are not the same estimator: above `exact_max_train` rows the CPU probe is a
ridge on Nyström RBF features (a least-squares kernel machine), and a reader comparing with the paper's SVM
numbers must be able to see that.
"""

from __future__ import annotations

import html as _html
import os
from typing import Iterable

import numpy as np
import polars as pl

PathLike = str | os.PathLike

# What each probe backend is (metrics.parquet's `backend` column), as the table and the report name it.
BACKEND_NAMES = {"exact": "SVM (RBF, exact)", "approx": "Nyström RBF + ridge", "cuml": "cuML SVM"}
# metrics.parquet written before the backend was recorded
UNRECORDED = "not recorded"
PROBE_COLUMN = "probe"

_METRIC_LABEL = {"balanced_accuracy": ("balanced accuracy", "↑"), "mae": ("MAE", "↓"), "roc_auc": ("ROC AUC", "↑")}
TABLE_METRICS = {"classification": "balanced_accuracy", "regression": "mae"}


def _column_label(attribute: str, metric: str) -> str:
    name, arrow = _METRIC_LABEL[metric]
    return f"{attribute} {name} {arrow}"


def _frame(metrics: pl.DataFrame | Iterable[PathLike]) -> pl.DataFrame:
    if isinstance(metrics, pl.DataFrame):
        return metrics
    # diagonal: a metrics file from before the backend column still reads (its probe is "not recorded")
    return pl.concat([pl.read_parquet(p) for p in metrics], how="diagonal_relaxed")


def probe_names(metrics: pl.DataFrame) -> pl.DataFrame:
    """(model, region, probe): the name of the backend(s) behind each row of the table. One table is probed on
    one backend, so a region has one name; should several appear (merged runs), all are listed."""
    keys = metrics.select("model", "region").unique(maintain_order=True)
    if "backend" not in metrics.columns:
        return keys.with_columns(pl.lit(UNRECORDED).alias(PROBE_COLUMN))
    named = metrics.select("model", "region", pl.col("backend").replace_strict(
        BACKEND_NAMES, default=pl.col("backend"), return_dtype=pl.Utf8).fill_null(UNRECORDED))
    return named.group_by("model", "region", maintain_order=True).agg(
        pl.col("backend").unique(maintain_order=True).sort().str.join(" / ").alias(PROBE_COLUMN))


def model_table(metrics: pl.DataFrame | Iterable[PathLike]) -> pl.DataFrame:
    """Models × regions against attributes in the layout of paper 003's Table 1: balanced accuracy (↑) for
    categorical attributes, MAE (↓) for continuous ones; one row per (model, region) with the probe that
    ran, column names carry the metric and its direction. Region classification sits in the 'all' row."""
    metrics = _frame(metrics)
    chosen = metrics.filter(
        ((pl.col("kind") == "classification") & (pl.col("metric") == TABLE_METRICS["classification"]))
        | ((pl.col("kind") == "regression") & (pl.col("metric") == TABLE_METRICS["regression"]))
    )
    order = (["region"] if "region" in chosen["attribute"].to_list() else []) + [
        a for a in dict.fromkeys(chosen.filter(pl.col("kind") == "classification")["attribute"].to_list()) if a != "region"
    ] + list(dict.fromkeys(chosen.filter(pl.col("kind") == "regression")["attribute"].to_list()))
    label = {a: _column_label(a, m) for a, m in chosen.select("attribute", "metric").unique().iter_rows()}
    # attributes become columns; a prefix keeps the 'region' attribute apart from the region key column
    wide = chosen.with_columns(("attr:" + pl.col("attribute")).alias("attribute")).pivot(
        on="attribute", index=["model", "region"], values="value")
    wide = wide.rename({c: c[5:] for c in wide.columns if c.startswith("attr:") and c[5:] != "region"})
    wide = wide.rename({"attr:region": "region_attribute"} if "attr:region" in wide.columns else {})
    cols = [("region_attribute" if a == "region" else a) for a in order
            if ("region_attribute" if a == "region" else a) in wide.columns]
    label["region_attribute"] = label.get("region", "")
    wide = wide.join(probe_names(chosen), on=["model", "region"], how="left")
    regions = list(dict.fromkeys(metrics["region"].to_list()))
    wide = wide.with_columns(pl.col("region").cast(pl.Enum(regions))).sort("region", "model").with_columns(
        pl.col("region").cast(pl.Utf8))
    return wide.select("model", "region", PROBE_COLUMN, *cols).rename({a: label[a] for a in cols})


def model_table_html(metrics: pl.DataFrame | Iterable[PathLike], digits: int = 3) -> str:
    """Model comparison table as an HTML fragment: the probe that ran, value [95% CI] per cell, the best model
    per region and column in bold."""
    metrics = _frame(metrics)
    table = model_table(metrics)
    value_cols = table.columns[3:]
    ci = {(m, r, a): (lo, hi) for m, r, a, metric, lo, hi in metrics.select(
        "model", "region", "attribute", "metric", "ci_low", "ci_high").iter_rows()
        if metric in TABLE_METRICS.values()}
    attr_of = {_column_label(a, m): a for a, m in metrics.select("attribute", "metric").unique().iter_rows()
               if m in TABLE_METRICS.values()}
    best = {}
    for col in value_cols:
        lower_better = col.endswith("↓")
        for region, part in table.group_by("region"):
            vals = part[col].drop_nulls()
            if len(vals) > 1:
                best[(region[0], col)] = vals.min() if lower_better else vals.max()
    head = "".join(f"<th>{_html.escape(c)}</th>" for c in table.columns)
    body = []
    for row in table.iter_rows(named=True):
        cells = [f"<td>{_html.escape(row[c])}</td>" for c in ("model", "region", PROBE_COLUMN)]
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

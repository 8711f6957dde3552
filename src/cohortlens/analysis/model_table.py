"""The model comparison table of the probe stage and the supervised baselines, in the layout of paper 003's Table 1.

One row per (model, region): its supervision and type (Table 1's columns: an embedding probed by a supervised
probe is `semi` / `embedding`, a network trained on the images `fully` / `image`), the probe that produced the
row's numbers, then balanced accuracy (↑) for categorical attributes and MAE (↓) for continuous ones. The probe
column says which backend ran (`BACKEND_NAMES`; the baselines': "network"), because they are not the same
estimator: above `exact_max_train` rows the CPU probe is a ridge on Nyström RBF features (a least-squares kernel
machine), and a reader comparing with the paper's SVM numbers must be able to see that. A row whose attributes were
scored by repeated subject-level cross-validation (too few test subjects, `probe_cv`) says so after the backend:
"; repeated_cv(5x5): age, sex". Summary rows of the probe stage (kind `summary`: the CheXpert competition mean AUC of `chexpert_auc`) become one
more column after the attributes, only where the metrics have them. The HTML rendering is the report's
(`cohortlens.report.model_table`).
"""

from __future__ import annotations

from typing import Iterable

import polars as pl

from cohortlens.analysis.chexpert_auc import (
    COMPETITION_ATTRIBUTE,
    COMPETITION_LABEL,
    MEAN_AUC_METRIC,
    SUMMARY_KIND,
)
from cohortlens.analysis.probe_cv import TEST_SPLIT
from cohortlens.types import PathLike

# What each probe backend is (metrics.parquet's `backend` column), as the table and the report name it.
BACKEND_NAMES = {"exact": "SVM (RBF, exact)", "approx": "Nyström RBF + ridge", "cuml": "cuML SVM",
                 "network": "trained network (volume = mean of its slices)"}
# metrics.parquet written before the backend was recorded
UNRECORDED = "not recorded"
PROBE_COLUMN = "probe"
# Table 1's supervision and type of a metrics file without these columns (a probe's: an embedding, semi-supervised)
PROBE_SUPERVISION, PROBE_TYPE = "semi", "embedding"
KEY_COLUMNS = ("model", "supervision", "type", "region", PROBE_COLUMN)

_METRIC_LABEL = {"balanced_accuracy": ("balanced accuracy", "↑"), "mae": ("MAE", "↓"), "roc_auc": ("ROC AUC", "↑"),
                 MEAN_AUC_METRIC: ("mean ROC AUC", "↑")}
TABLE_METRICS = {"classification": "balanced_accuracy", "regression": "mae", SUMMARY_KIND: MEAN_AUC_METRIC}
# summary rows' column labels, by their attribute
_SUMMARY_LABEL = {COMPETITION_ATTRIBUTE: COMPETITION_LABEL}


def column_label(attribute: str, metric: str) -> str:
    """The table's column name for an attribute's metric, with its direction (↑ / ↓)."""
    if metric == MEAN_AUC_METRIC and attribute in _SUMMARY_LABEL:
        return _SUMMARY_LABEL[attribute]
    name, arrow = _METRIC_LABEL[metric]
    return f"{attribute} {name} {arrow}"


def read_metrics(metrics: pl.DataFrame | Iterable[PathLike]) -> pl.DataFrame:
    """A metrics frame, or the metrics.parquet files concatenated (probes' and baselines'), with Table 1's
    `supervision` and `type` (a probe's file has neither: semi, embedding)."""
    if not isinstance(metrics, pl.DataFrame):
        # diagonal: a metrics file from before the backend column still reads (its probe is "not recorded")
        metrics = pl.concat([pl.read_parquet(p) for p in metrics], how="diagonal_relaxed")
    for col, default in (("supervision", PROBE_SUPERVISION), ("type", PROBE_TYPE)):
        value = pl.col(col).fill_null(default) if col in metrics.columns else pl.lit(default)
        metrics = metrics.with_columns(value.cast(pl.Utf8).alias(col))
    return metrics


def probe_names(metrics: pl.DataFrame) -> pl.DataFrame:
    """(model, region, probe): the name of the backend(s) behind each row of the table. One table is probed on
    one backend, so a region has one name; should several appear (merged runs), all are listed."""
    keys = metrics.select("model", "region").unique(maintain_order=True)
    if "backend" not in metrics.columns:
        return keys.with_columns(pl.lit(UNRECORDED).alias(PROBE_COLUMN))
    named = metrics.select("model", "region", pl.col("backend").replace_strict(
        BACKEND_NAMES, default=pl.col("backend"), return_dtype=pl.Utf8).fill_null(UNRECORDED))
    names = named.group_by("model", "region", maintain_order=True).agg(
        pl.col("backend").unique(maintain_order=True).sort().str.join(" / ").alias(PROBE_COLUMN))
    return names.join(evaluation_notes(metrics), on=["model", "region"], how="left").select(
        "model", "region", pl.concat_str(PROBE_COLUMN, pl.col("note").fill_null("")).alias(PROBE_COLUMN))


def evaluation_notes(metrics: pl.DataFrame) -> pl.DataFrame:
    """(model, region, note): '; repeated_cv(5x5): age, sex' for the attributes of a row scored by repeated
    cross-validation (`probe_cv`) instead of the test split; no row where all used the test split."""
    if "evaluation" not in metrics.columns:
        return pl.DataFrame(schema={"model": pl.Utf8, "region": pl.Utf8, "note": pl.Utf8})
    cv = metrics.filter(pl.col("evaluation").is_not_null() & (pl.col("evaluation") != TEST_SPLIT))
    per = cv.group_by("model", "region", "evaluation", maintain_order=True).agg(
        pl.col("attribute").unique().sort().str.join(", "))
    return per.group_by("model", "region", maintain_order=True).agg(
        pl.format("; {}: {}", "evaluation", "attribute").sort().str.join("").alias("note"))


def model_table(metrics: pl.DataFrame | Iterable[PathLike]) -> pl.DataFrame:
    """Models × regions against attributes in the layout of paper 003's Table 1: balanced accuracy (↑) for
    categorical attributes, MAE (↓) for continuous ones; one row per (model, region) with its supervision, type
    and the probe that ran (embeddings first, then the networks trained on the images), column names carry the
    metric and its direction. Region classification sits in the 'all' row;
    summary rows (the CheXpert competition mean AUC) are the last columns, present only when the metrics have them."""
    metrics = read_metrics(metrics)
    chosen = metrics.filter(pl.any_horizontal(
        [(pl.col("kind") == kind) & (pl.col("metric") == metric) for kind, metric in TABLE_METRICS.items()]))

    def of_kind(kind: str) -> list[str]:
        return list(dict.fromkeys(chosen.filter(pl.col("kind") == kind)["attribute"].to_list()))

    order = (["region"] if "region" in chosen["attribute"].to_list() else []) + [
        a for a in of_kind("classification") if a != "region"] + of_kind("regression") + of_kind(SUMMARY_KIND)
    label = {a: column_label(a, m) for a, m in chosen.select("attribute", "metric").unique().iter_rows()}
    # attributes become columns; a prefix keeps the 'region' attribute apart from the region key column
    wide = chosen.with_columns(("attr:" + pl.col("attribute")).alias("attribute")).pivot(
        on="attribute", index=["model", "region"], values="value")
    wide = wide.rename({c: c[5:] for c in wide.columns if c.startswith("attr:") and c[5:] != "region"})
    wide = wide.rename({"attr:region": "region_attribute"} if "attr:region" in wide.columns else {})
    cols = [("region_attribute" if a == "region" else a) for a in order
            if ("region_attribute" if a == "region" else a) in wide.columns]
    label["region_attribute"] = label.get("region", "")
    wide = wide.join(probe_names(chosen), on=["model", "region"], how="left")
    kinds = metrics.select("model", "supervision", "type").unique("model", keep="first", maintain_order=True)
    wide = wide.join(kinds, on="model", how="left")
    regions = list(dict.fromkeys(metrics["region"].to_list()))
    types = list(dict.fromkeys([PROBE_TYPE, *metrics["type"].to_list()]))
    wide = wide.with_columns(pl.col("region").cast(pl.Enum(regions)), pl.col("type").cast(pl.Enum(types))).sort(
        "region", "type", "model").with_columns(pl.col("region").cast(pl.Utf8), pl.col("type").cast(pl.Utf8))
    return wide.select(*KEY_COLUMNS, *cols).rename({a: label[a] for a in cols})

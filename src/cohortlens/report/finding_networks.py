"""What the networks trained after the discover stage add to the findings section (`finding_networks`): the
discordant subgroup's training curves (`results/findings/{model}/discordant-training-curves.csv` and its PNG) and,
beside a finding's mean image, its set-vs-rest classifier's GradCAM with the held-out balanced accuracy
(`results/findings/{model}/saliency.parquet`, PNGs in `saliency/`).

Publication page: a curve cell of fewer than k images is suppressed (accuracy and n) and the figure left out; a
GradCAM PNG (a mean over the set's test images) is shown only for at least k test images of the set."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Mapping

import polars as pl

from cohortlens.report.fragments import fmt, png, table


def curves_block(csv: Path | None, k: int, publication: bool = False) -> str:
    """The training-curves block of one model ('' when the stage did not run for it)."""
    if csv is None or not csv.is_file():
        return ""
    # the columns of analysis.subgroup_curves.CURVE_SCHEMA (not imported: it would import torch)
    frame = pl.read_csv(csv, schema_overrides={"epoch": pl.Int64, "accuracy": pl.Float64, "n": pl.Int64})
    head = "<h4>Training curves of the discordant subgroup (paper 003, Fig. 3)</h4>"
    if frame.height == 0:
        return head + ("<p class='muted'>No discordant subgroup among this model's findings, so no classifier was "
                       "followed per epoch.</p>")
    small = (frame["n"] > 0) & (frame["n"] < k) if publication else pl.lit(False)
    frame = frame.with_columns(pl.when(small).then(None).otherwise(pl.col("accuracy")).alias("accuracy"),
                               pl.when(small).then(pl.lit(f"< {k}")).otherwise(pl.col("n").cast(pl.Utf8)).alias("n"))
    parts = [head]
    for fid, one in frame.group_by("finding_id", maintain_order=True):
        first = one.filter((pl.col("epoch") == one["epoch"].min()) & (pl.col("split") == "train"))
        acc = {g: a for g, a in first.select("group", "accuracy").rows()}
        said = ", ".join(f"{g} {fmt(100 * a)} %" if a is not None else f"{g} suppressed" for g, a in acc.items())
        parts.append(f"<p><b>{html.escape(str(fid[0]))}</b>: a classifier of the recorded "
                     f"{html.escape(one['attribute'][0])} reaches on its training images after epoch "
                     f"{one['epoch'].min()}: {said} (paper 003: rest 96–98 %, flagged group 40–70 %). Accuracy per "
                     "image (mean logits over its center slices); n = images scored.</p>")
        wide = one.with_columns((pl.col("split") + " " + pl.col("group")).alias("cell")).pivot(
            on="cell", index="epoch", values="accuracy")
        parts.append(table(wide) + table(one.filter(pl.col("epoch") == one["epoch"].min())
                                         .select("split", "group", "n")))
    png_path = csv.with_suffix(".png")
    if png_path.is_file() and not (publication and frame["n"].str.starts_with("<").any()):
        parts.append(f"<figure class='evidence'>{png(png_path)}</figure>")
    return "".join(parts)


def saliency_rows(path: Path | None) -> dict[str, dict]:
    """finding_id -> its saliency index row (empty when the stage did not run)."""
    if path is None or not path.is_file():
        return {}
    return {r["finding_id"]: r for r in pl.read_parquet(path).iter_rows(named=True)}


def saliency_figure(row: Mapping | None, folder: Path, k: int, publication: bool = False) -> str:
    """The classifier's score and GradCAM PNG of one finding, for beside its mean image ('' without a row)."""
    if row is None:
        return ""
    if row["balanced_accuracy"] is None:
        text = f"set-vs-rest classifier: {html.escape(row['note'] or 'not scored')} (weak)"
    else:
        ci = f" [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]" if row["ci_low"] is not None else ""
        n_set = row["n_test_set"] if not publication or row["n_test_set"] >= k else f"&lt; {k}"
        verdict = ("<b class='bad'>weak</b>: an image classifier does not separate the set" if row["weak"]
                   else "<b class='ok'>separable</b>")
        text = (f"set-vs-rest classifier, held-out balanced accuracy {fmt(row['balanced_accuracy'])}{ci}, AUC "
                f"{fmt(row['roc_auc'])}, {row['n_test']} test images ({n_set} of the set): {verdict}")
    picture = ""
    path = folder / f"{row['finding_id']}.png"
    if path.is_file() and (not publication or row["n_test_set"] >= k):
        picture = png(path)
    return f"<figure><figcaption>{text}</figcaption>{picture}</figure>"

"""The report's settings (config `report:`, `DEFAULTS`) and the sections that show one stage's tables as
they are: fairness gaps, the mitigation re-probe, training curves, imported embeddings' quarantine. The larger sections have modules of their
own: `model_table`, `projections`, `findings` (with ground truth); their building blocks are in `fragments`.
Each section takes lists of files (possibly empty) and returns an HTML fragment; an empty list gives a short
"not run" note, so a cohort without ground truth or mitigation still gets a complete page.

Model, region and method are read from the file paths of the run's layout:
`results/projections/{model}/{region}/{method}.parquet`, `results/plots/{model}/{region}/{method}/`,
`results/probes/{model}/metrics.parquet`, `results/fairness/{model}/summary.parquet`,
`results/findings/{model}.parquet`, `results/findings/{model}-tests.parquet`, `results/findings/{model}/`,
`results/mitigation/{model}/reprobe.parquet`, `results/models/{model}/train_log.csv`.
"""

from __future__ import annotations

import html
import math
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from cohortlens.analysis.attack import ATTACKERS
from cohortlens.io.tables import read_parquet_metadata
from cohortlens.report.fragments import by_model, fmt, not_run, png, read_frames, table
from cohortlens.report.plotlyjs import figure_div
from cohortlens.report.publication import (
    cell_text,
    fairness_groups_public,
    fairness_summary_public,
    quarantine_reasons,
    show_suppressed,
)
from cohortlens.report.units import UNIT_METRICS, groups_with_unit, with_unit_column
from cohortlens.types import PathLike

# config `report:` keys beyond title / max_quarantine_rows, with their defaults (docs/report.md)
DEFAULTS = {
    "max_points": 5000,  # interactive projection: a seeded random subset beyond this many points
    # maps drawn with Plotly (one map per model and region, a dropdown chooses the method); the others as PNGs
    "interactive_methods": ["tsne", "umap"],
    "interactive_regions": None,  # None = "all" plus every region; or a list such as ["all"]
    "static_map_width": 480,  # static map PNGs are shrunk to this width (pixels) on the page
    "max_findings_images": 60,  # explanation PNGs inlined (largest effects first)
    "max_table_rows": 200,  # rows of the long tables (fairness groups, tests); the Parquet has all
    "alpha": 0.05,  # mitigation: an attacker beats chance below this permutation p-value
    "min_cell": 10,  # publication report and archive: counts and statistics of fewer participants are suppressed
}


def settings(cfg: Mapping | None) -> dict:
    out = dict(DEFAULTS)
    out.update({k: v for k, v in (cfg or {}).items() if k in DEFAULTS})
    return out


# ------------------------------------------------------------------------------------------ fairness

_SUMMARY_COLS = ["model", "region", "target", "positive", "protected", "measure", "value", "ci_low", "ci_high",
                 "flagged", "group_high", "group_low", "n"]


def fairness_section(summaries: Sequence[PathLike], groups: Sequence[PathLike], cfg: dict,
                     publication: bool = False, units: Mapping | None = None) -> str:
    """Flagged gaps first; per-group metrics folded. `publication`: groups of fewer than cfg['min_cell']
    participants suppressed, with the gaps between them (publication.fairness_*_public). `units`: bins of a
    continuous protected attribute carry its unit, an error (MAE) gap its target's (`unit` column)."""
    if not summaries:
        return not_run("fairness")
    summary = read_frames(summaries)
    if summary.height == 0:
        return "<p class='muted'>no fairness results (no target attributes?)</p>"
    g = read_frames(groups)
    k = cfg["min_cell"]
    if publication:
        summary = show_suppressed(fairness_summary_public(summary, g, k).with_columns(
            pl.col("flagged").fill_null(False)), k)
        g = show_suppressed(fairness_groups_public(g, k), k) if g.height else g
    n_flag = int(summary["flagged"].sum())
    parts = [f"<p>Gaps between protected groups of each target's probe predictions (fairlearn MetricFrame; "
             f"bootstrap CIs over subjects). <span class='{'bad' if n_flag else 'ok'}'>{n_flag} of "
             f"{summary.height} gaps flagged</span> (CI excludes zero; highlighted).</p>"]
    summary = summary.sort("flagged", "model", "region", "target", "protected", "measure",
                           descending=[True, False, False, False, False, False])
    if publication:
        n_low = int(summary["suppressed"].sum())
        parts.append(f"<p class='muted'>Groups of fewer than {k} participants are suppressed (n shown as &lt; {k}), "
                     f"and so are the {n_low} gaps that involve one.</p>")
    cols = [*_SUMMARY_COLS, "suppressed"] if publication else _SUMMARY_COLS
    summary = groups_with_unit(summary.select([c for c in cols if c in summary.columns]), "protected",
                               ("group_high", "group_low"), units)
    if summary["measure"].is_in(list(UNIT_METRICS)).any():
        summary = with_unit_column(summary, "target", "measure", units, after="value")
    parts.append(table(summary, cfg["max_table_rows"], row_class=lambda r: "flag" if r.get("flagged") else None))
    if g.height:
        g = groups_with_unit(g, "protected", ("group",), units)
        if "metric" in g.columns and g["metric"].is_in(list(UNIT_METRICS)).any():
            g = with_unit_column(g, "target", "metric", units, after="value")
        parts.append("<details><summary>per-group metrics</summary>")
        parts.append(table(g, cfg["max_table_rows"]))
        parts.append("</details>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------- mitigation

_REPROBE_COLS = ["model", "region", "method", "erased", "attribute", "role", "probe", "metric", "value_before",
                 "value", "ci_low", "ci_high", "chance", "p_vs_chance", "drop", "drop_ci_low", "drop_ci_high", "check"]


def reprobe_check(frame: pl.DataFrame, alpha: float = 0.05) -> pl.DataFrame:
    """A `check` column. Protected attributes are judged by the tuned attackers (RBF SVM, MLP): 'at chance'
    when the attacker's test predictions do not beat chance (permutation p > alpha), else 'readable'. The
    linear probe is what LEACE and INLP defeat by construction, so it is shown but never judged. Targets:
    'kept' when the drop's interval includes 0 or lies below it, else 'lost'."""
    if "p_vs_chance" not in frame.columns:  # a table from before the attackers: report, do not judge
        return frame.with_columns(pl.lit("not judged").alias("check"))
    protected, attacker = pl.col("role") == "protected", pl.col("probe").is_in(list(ATTACKERS))
    return frame.with_columns(
        pl.when(protected & attacker & (pl.col("p_vs_chance") > alpha)).then(pl.lit("at chance"))
        .when(protected & attacker).then(pl.lit("readable"))
        .when(protected).then(pl.lit("linear: not a verdict"))
        .when(pl.col("drop_ci_low") <= 0).then(pl.lit("kept"))
        .when(pl.col("drop_ci_low").is_not_null()).then(pl.lit("lost"))
        .otherwise(pl.lit("not judged")).alias("check")
    )


def mitigation_section(reprobes: Sequence[PathLike], cfg: dict, units: Mapping | None = None) -> str:
    if not reprobes:
        return not_run("mitigation")
    frame = read_frames(reprobes)
    if frame.height == 0:
        return "<p class='muted'>the re-probe table is empty</p>"
    frame = reprobe_check(frame, cfg["alpha"])
    judged = frame.filter(pl.col("check").is_in(["at chance", "readable"]))
    ok = judged.filter(pl.col("check") == "at chance").height
    parts = [f"<p>Re-probe after erasing the protected attribute(s): before → after per method and region, on the "
             f"test split, with 95 % bootstrap intervals. Protected attributes are judged by tuned attackers (RBF "
             f"SVM and MLP, hyper-parameters by cross-validation on the train split): <i>at chance</i> when their "
             f"predictions do not beat chance (permutation test, p &gt; {cfg['alpha']}) — "
             f"<span class='{'ok' if ok == judged.height else 'bad'}'>{ok} of {judged.height} attacks at "
             f"chance</span>. The linear probe is listed but not judged: LEACE and INLP defeat it by "
             f"construction. Targets: drop = performance lost (positive = worse) with its paired interval; "
             f"<i>kept</i> when the interval reaches 0 or below.</p>"]
    frame = frame.sort("model", "method", "role", "attribute", "region", "probe", "metric")
    # value, interval and drop of an MAE are in the attribute's unit
    frame = with_unit_column(frame.select([c for c in _REPROBE_COLS if c in frame.columns]), "attribute", "metric",
                             units)
    parts.append(table(frame, 1000,
                       row_class=lambda r: {"at chance": "good", "kept": "good", "readable": "flag",
                                            "lost": "flag"}.get(r["check"])))
    return "".join(parts)


# -------------------------------------------------------------------------------------- training logs

_INDEX_COLS = {"step", "of", "n_seen", "epoch", "lr", "img_per_s", "elapsed_s", "time", "wall_s"}


def _curve_columns(log_frame: pl.DataFrame) -> list[str]:
    numeric = [c for c, t in log_frame.schema.items() if t.is_numeric() and c not in _INDEX_COLS]
    losses = [c for c in numeric if "loss" in c.lower()]
    return (losses or numeric)[:6]


def training_section(train_logs: Sequence[PathLike], reconstructions: Mapping[str, PathLike],
                     publication: bool = False) -> tuple[str, int]:
    """A small loss curve per model (Plotly) and its reconstruction / QA grid (not in a publication: the grid
    shows participants' slices). Returns (html, figures)."""
    if not train_logs and not reconstructions:
        return not_run("training"), 0
    if publication and reconstructions:
        reconstructions = {}
        note = ("<p class='muted'>The reconstruction grids (participants' slices) are left out of the "
                "publication report.</p>")
    else:
        note = ""
    import plotly.graph_objects as go

    logs = by_model(train_logs)
    parts, n_figs = [], 0
    for model in sorted(set(logs) | set(reconstructions)):
        parts.append(f"<h3>{html.escape(model)}</h3>")
        if model in logs:
            try:
                frame = pl.read_csv(logs[model], infer_schema_length=10_000)
            except Exception as exc:
                frame = pl.DataFrame()
                parts.append(f"<p class='bad'>{html.escape(str(logs[model]))}: {html.escape(str(exc))}</p>")
            cols = _curve_columns(frame) if frame.height else []
            if cols:
                x_col = "step" if "step" in frame.columns else None
                if frame.height > 2000:
                    frame = frame.gather_every(math.ceil(frame.height / 2000))
                x = frame[x_col].to_numpy() if x_col else np.arange(frame.height)
                fig = go.Figure([go.Scatter(x=x, y=frame[c].to_numpy(), mode="lines", name=c) for c in cols])
                log_y = all("loss" in c.lower() for c in cols) and all(
                    (frame[c].drop_nulls() > 0).all() for c in cols)
                fig.update_layout(title=f"{model}: {', '.join(cols)}", template="plotly_white", width=720,
                                  height=320, margin=dict(l=50, r=20, t=40, b=40), xaxis_title=x_col or "row",
                                  yaxis_type="log" if log_y else "linear")
                parts.append(f"<div class='plot'>{figure_div(fig, f'train-{model}')}</div>")
                n_figs += 1
                parts.append(f"<p class='muted'>{frame.height} log rows; last: "
                             + html.escape(", ".join(f"{c} = {fmt(frame[c][-1])}" for c in cols)) + "</p>")
            elif frame.height:
                parts.append(table(frame, 20))
        if model in reconstructions:
            parts.append(f"<p>QA grid: input slices (top) and the model's reconstructions / decodes below</p>"
                         f"{png(reconstructions[model], f'{model} reconstructions', webp=True)}")
    return note + "".join(parts), n_figs


def imported_section(quarantines: Sequence[PathLike], cfg: dict, publication: bool = False,
                     max_rows: int = 50) -> str:
    """The imported models' rows accounted for (rows in = rows written + quarantined, from each quarantine
    table's metadata) and their quarantine: every row with its reason, or in a publication the kinds of reason
    with counts under `min_cell` suppressed."""
    if not quarantines:
        return ""
    k = cfg.get("min_cell", 10)
    parts, counts = ["<h3>Imported embeddings</h3>"], []
    for model, path in by_model(quarantines).items():
        meta = read_parquet_metadata(path)
        n_in, n_out, n_q = (meta.get(key) for key in ("rows_in", "rows_out", "quarantined"))
        balanced = None not in (n_in, n_out, n_q) and n_in == n_out + n_q
        counts.append({"model": model, "rows in": cell_text(n_in, k) if publication else str(n_in),
                       "written": cell_text(n_out, k) if publication else str(n_out),
                       "quarantined": cell_text(n_q, k) if publication else str(n_q),
                       "in = written + quarantined": "yes" if balanced else "NO"})
        frame = pl.read_parquet(path)
        if publication:
            reasons = quarantine_reasons(frame.with_columns(pl.lit(f"import {model}").alias("stage")), k)
            parts.append(f"<p class='muted'>{html.escape(model)}: quarantined rows per kind of reason</p>"
                         + table(show_suppressed(reasons, k)))
        elif frame.height:
            parts.append(f"<p class='muted'>{html.escape(model)}: quarantined rows (row of the file, 0-based)</p>"
                         + table(frame, max_rows))
    return parts[0] + table(pl.DataFrame(counts)) + "".join(parts[1:])

"""The analysis sections of the report page: model table, projections, findings, fairness, mitigation,
ground-truth recall and training logs. Each section takes lists of files (possibly empty) and returns an HTML
fragment; an empty list gives a short "not run" note, so a cohort without ground truth or mitigation still
gets a complete page.

Model, region and method are read from the file paths of the run's layout:
`results/projections/{model}/{region}/{method}.parquet`, `results/plots/{model}/{region}/{method}/`,
`results/probes/{model}/metrics.parquet`, `results/fairness/{model}/summary.parquet`,
`results/findings/{model}.parquet`, `results/findings/{model}-tests.parquet`, `results/findings/{model}/`,
`results/mitigation/{model}/reprobe.parquet`, `results/models/{model}/train_log.csv`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import polars as pl

from cohortlens.io.tables import read_parquet_metadata

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
ALL_REGIONS = "all"

# config `report:` keys beyond title / max_quarantine_rows, with their defaults (docs/report.md)
DEFAULTS = {
    "max_points": 5000,  # interactive projection: a seeded random subset beyond this many points
    "interactive_methods": ["tsne"],  # maps drawn with Plotly on the page; the others as their PNGs
    "interactive_regions": None,  # None = "all" plus every region; or a list such as ["all"]
    "static_map_width": 480,  # static map PNGs are shrunk to this width (pixels) on the page
    "max_findings_images": 60,  # explanation PNGs inlined (largest effects first)
    "max_table_rows": 200,  # rows of the long tables (fairness groups, tests); the Parquet has all
    "alpha": 0.05,  # mitigation: an attacker beats chance below this permutation p-value
}


def settings(cfg: Mapping | None) -> dict:
    out = dict(DEFAULTS)
    out.update({k: v for k, v in (cfg or {}).items() if k in DEFAULTS})
    return out


# ------------------------------------------------------------------------------------------------ helpers

def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4g}" if abs(v) < 10 else f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def table(df: pl.DataFrame, max_rows: int = 50, row_class=None, cls: str = "") -> str:
    """An HTML table of a frame; `row_class(row_dict) -> str | None` marks rows (e.g. flagged gaps)."""
    if df.height == 0:
        return "<p class='muted'>none</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    rows = []
    for row in df.head(max_rows).iter_rows(named=True):
        rc = row_class(row) if row_class else None
        attr = f" class='{rc}'" if rc else ""
        rows.append(f"<tr{attr}>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row.values()) + "</tr>")
    more = (f"<p class='muted'>{df.height - max_rows} more rows in the Parquet file</p>"
            if df.height > max_rows else "")
    c = f" class='{cls}'" if cls else ""
    return f"<div class='scroll'><table{c}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>{more}"


def png(path: PathLike, alt: str | None = None, cls: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    c = f" class='{cls}'" if cls else ""
    return f"<img{c} alt='{html.escape(alt or Path(path).name)}' src='data:image/png;base64,{data}'>"


def png_scaled(path: PathLike, width: int, alt: str | None = None, cls: str = "") -> str:
    """A PNG shrunk to `width` pixels (if wider) and re-encoded, for thumbnails such as the static maps."""
    from PIL import Image

    with Image.open(path) as im:
        if im.width <= width:
            return png(path, alt, cls)
        im = im.convert("RGB")
        im.thumbnail((width, round(im.height * width / im.width)), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    c = f" class='{cls}'" if cls else ""
    return f"<img{c} alt='{html.escape(alt or Path(path).name)}' src='data:image/png;base64,{data}'>"


def not_run(what: str) -> str:
    return f"<p class='muted'>{html.escape(what)}: not in this run (no inputs).</p>"


def model_of(path: PathLike, level: int = 1) -> str:
    """The {model} path component: the parent folder's name (level 1), or its parent's (level 2...)."""
    p = Path(path)
    for _ in range(level):
        p = p.parent
    return p.name


def _findings_model(path: PathLike) -> str:
    """results/findings/{model}.parquet or {model}-tests.parquet."""
    stem = Path(path).stem
    return stem[: -len("-tests")] if stem.endswith("-tests") else stem


def _by_model(paths: Iterable[PathLike], key=model_of) -> dict[str, Path]:
    return {key(p): Path(p) for p in sorted(paths, key=str)}


def _read(paths: Iterable[PathLike]) -> pl.DataFrame:
    frames = [pl.read_parquet(p) for p in paths]
    frames = [f for f in frames if f.height]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


# --------------------------------------------------------------------------------------- model table

def model_table_section(metrics: Sequence[PathLike]) -> str:
    if not metrics:
        return not_run("probes")
    from cohortlens.analysis.model_table import BACKEND_NAMES, model_table_html

    frame = _read(metrics)
    if frame.height == 0:
        return "<p class='muted'>the probes produced no metrics</p>"
    # the probes are not all SVMs: each row names the estimator that produced it
    parts = [f"<p>RBF-kernel probes on each model's embedding (test split, 95% bootstrap CI): balanced "
             f"accuracy ↑ for categorical attributes, MAE ↓ for continuous ones; best model per region in bold "
             f"(layout of Table 1, paper 003). The probe column names the estimator that ran (backend auto): "
             f"{html.escape(BACKEND_NAMES['exact'])} up to the probe's <code>exact_max_train</code> training "
             f"rows, {html.escape(BACKEND_NAMES['approx'])} (kernel approximation, a least-squares kernel "
             f"machine rather than an SVM) above it, {html.escape(BACKEND_NAMES['cuml'])} on a GPU.</p>",
             model_table_html(frame)]
    extra = frame.filter(pl.col("metric") == "roc_auc")
    if extra.height:
        parts.append("<details><summary>ROC AUC (one-vs-rest macro) and chance levels</summary>")
        cols = ["model", "region", "attribute", "value", "ci_low", "ci_high", "chance", "n_test", "backend"]
        parts.append(table(extra.select([c for c in cols if c in extra.columns]).sort("attribute", "region", "model"),
                           500))
        parts.append("</details>")
    return "".join(parts)


# --------------------------------------------------------------------------------------- projections

def _interactive(projection: Path, subjects: PathLike, images: PathLike | None, div_id: str, cfg: dict) -> str:
    """One Plotly figure of a projection with a dropdown choosing the colouring attribute. The first
    attribute's figure is drawn by figure_div; the others travel as JSON and are swapped in with Plotly.react."""
    from cohortlens.analysis._data import REGION_SPEC
    from cohortlens.analysis.project import figure_div, projection_figure, projection_with_attributes

    meta = read_parquet_metadata(projection)
    frame, specs = projection_with_attributes(projection, subjects, images)
    plotted = dict(specs)
    if frame["region"].n_unique() > 1:
        plotted = {"region": REGION_SPEC, **plotted}
    if not plotted:
        return ""
    title = f"{meta.get('model', model_of(projection, 2))} · {meta.get('region', projection.parent.name)} · " \
            f"{meta.get('method', projection.stem)}"
    figs = {a: projection_figure(frame, a, s, hover_attributes=list(specs), title=f"{title} — {a}",
                                 max_points=cfg["max_points"])
            for a, s in plotted.items()}
    if meta.get("region", projection.parent.name) != ALL_REGIONS:  # per-region maps sit two to a row
        for f in figs.values():
            f.update_layout(width=540, height=480)
    first = next(iter(figs))
    options = "".join(f"<option value='{html.escape(a)}'>{html.escape(a)}</option>" for a in figs)
    others = {a: json.loads(f.to_json()) for a, f in figs.items() if a != first}
    first_json = json.loads(figs[first].to_json())
    others[first] = first_json
    payload = json.dumps(others, separators=(",", ":")).replace("</", "<\\/")
    return (f"<div class='plot'><label>colour by <select class='attr-select' data-plot='{div_id}'>{options}"
            f"</select></label>{figure_div(figs[first], div_id)}"
            f"<script type='application/json' id='{div_id}-figs'>{payload}</script></div>")


_SELECT_JS = """<script>
document.querySelectorAll('select.attr-select').forEach(function (sel) {
  var figs = null;
  sel.addEventListener('change', function () {
    var id = sel.dataset.plot;
    if (figs === null) { figs = JSON.parse(document.getElementById(id + '-figs').textContent); }
    var f = figs[sel.value];
    Plotly.react(id, f.data, f.layout, {displaylogo: false});
  });
});
</script>"""


def projections_section(projections: Sequence[PathLike], plots: Sequence[PathLike], subjects: PathLike,
                        images: PathLike | None, cfg: dict) -> tuple[str, int]:
    """Interactive maps for cfg['interactive_methods'] (region 'all' first, then each region), the other maps
    as their static PNGs from the plot folders. Returns (html, number of interactive figures)."""
    if not projections and not plots:
        return not_run("projections"), 0
    methods = list(cfg["interactive_methods"] or [])
    regions_wanted = cfg["interactive_regions"]

    def order(p: Path) -> tuple:
        region = p.parent.name
        return (model_of(p, 2), region != ALL_REGIONS, region, p.stem)

    interactive, shown = [], set()
    for p in sorted((Path(p) for p in projections), key=order):
        model, region, method = model_of(p, 2), p.parent.name, p.stem
        if method not in methods or (regions_wanted is not None and region not in regions_wanted):
            continue
        div_id = f"proj-{model}-{region}-{method}".replace(" ", "_")
        try:
            fragment = _interactive(p, subjects, images, div_id, cfg)
        except Exception as exc:  # one broken projection must not cost the whole page
            log.warning("projection %s not drawn: %s", p, exc)
            fragment = f"<p class='bad'>{html.escape(str(p))}: not drawn ({html.escape(type(exc).__name__)})</p>"
        interactive.append((model, fragment))
        shown.add((model, region, method))
    parts = []
    if interactive:
        parts.append("<p>Interactive maps (hover: subject id, region and attributes; choose the colouring "
                     "attribute above each map).</p>")
        current = None
        for model, fragment in interactive:
            if model != current:
                parts.append(("</div>" if current is not None else "") + f"<h3>{html.escape(model)}</h3><div class='grid'>")
                current = model
            parts.append(fragment)
        parts.append("</div>")
    static = []
    for d in sorted((Path(d) for d in plots), key=lambda d: (model_of(d, 2), d.parent.name != ALL_REGIONS,
                                                             d.parent.name, d.name)):
        model, region, method = model_of(d, 2), d.parent.name, d.name
        if (model, region, method) in shown or not d.is_dir():
            continue
        pngs = sorted(d.glob(f"{method}-*.png"))
        if not pngs:
            continue
        imgs = "".join(f"<figure>{png_scaled(f, cfg['static_map_width'], cls='map')}<figcaption>{html.escape(f.stem)}</figcaption></figure>"
                       for f in pngs)
        static.append(f"<details><summary>{html.escape(model)} · {html.escape(region)} · {html.escape(method)} "
                      f"({len(pngs)} maps)</summary><div class='grid'>{imgs}</div></details>")
    if static:
        parts.append("<h3>Other maps (static)</h3>" + "".join(static))
    if interactive:
        parts.append(_SELECT_JS)
    return "".join(parts) or "<p class='muted'>no maps</p>", len(interactive)


# ------------------------------------------------------------------------------------------ findings

_FINDING_COLS = ["finding_id", "kind", "region", "attribute", "value", "effect_size", "effect_measure",
                 "p_adjusted", "n", "description"]


def _evidence_path(entry: str, dirs: Sequence[Path]) -> Path | None:
    p = Path(entry)
    if p.is_file():
        return p
    for d in dirs:
        q = d / p.name
        if q.is_file():
            return q
    return None


def label_issue_note(frame: pl.DataFrame) -> str:
    """One line on what the label-issue search covers: cleanlab's label issues are looked for in target
    attributes only (discover_quality.LABEL_ISSUE_ROLES); for protected attributes, images that look like
    another category are discordant subgroups, whose labels were not shown to be wrong."""
    disc = frame.filter(pl.col("kind") == "discordant_subgroup") if "kind" in frame.columns else frame.clear()
    by_attr: dict[str, list[str]] = {}
    for row in disc.iter_rows(named=True):
        by_attr.setdefault(row["attribute"], []).append(row["finding_id"])
    pointer = ("; ".join(f"{html.escape(a)}: {html.escape(', '.join(ids))}" for a, ids in by_attr.items())
               if by_attr else "none significant in this run")
    return ("<p class='muted'>Label issues (cleanlab) are searched in target attributes only. In protected attributes "
            "(e.g. sex) the labels were not shown to be wrong: images whose embedding looks like another category "
            f"are reported as discordant subgroups instead ({pointer}).</p>")


def split_echoes(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(root findings, echoes): an echo has `explained_by` set (discover_causes); files written before the
    column existed have no echoes."""
    if "explained_by" not in frame.columns:
        return frame.with_columns(pl.lit(None, dtype=pl.Utf8).alias("explained_by")), frame.clear()
    is_echo = pl.col("explained_by").is_not_null() & (pl.col("explained_by") != "")
    return frame.filter(~is_echo), frame.filter(is_echo)


def _cause_names(row: Mapping) -> list[str]:
    """The `explained_by` strings that name this finding's attribute (and value) as the cause."""
    attribute = str(row["attribute"]).split("×")[0]
    value = None if row.get("value") is None else str(row["value"]).split(",")[0]
    return [attribute] + ([f"{attribute}={value}"] if value is not None else [])


def findings_section(findings: Sequence[PathLike], tests: Sequence[PathLike], finding_dirs: Sequence[PathLike],
                     cfg: dict) -> str:
    if not findings:
        return not_run("discovery")
    tests_by = _by_model(tests, _findings_model)
    dirs_by: dict[str, list[Path]] = {}
    for d in finding_dirs:
        dirs_by.setdefault(Path(d).name, []).append(Path(d))
    parts = ["<p>Significant findings (FDR-adjusted p below α, or cleanlab flags), largest effect first. Effect "
             "sizes are in the unit named beside them (balanced accuracy above chance, R², enrichment ratio, "
             "discordant fraction, …).</p>"]
    n_images = 0
    for model, path in _by_model(findings, _findings_model).items():
        frame = pl.read_parquet(path)
        alpha = read_parquet_metadata(path).get("alpha", 0.05)
        parts.append(f"<h3>{html.escape(model)}: {frame.height} findings</h3>")
        if model in tests_by:
            t = pl.read_parquet(tests_by[model])
            if t.height:
                sig = pl.col("p_adjusted").is_null() | (pl.col("p_adjusted") < alpha)
                summary = t.group_by("kind").agg(pl.len().alias("tests"), sig.sum().alias("significant")).sort("kind")
                parts.append(f"<p class='muted'>tests run (α = {alpha}):</p>" + table(summary, 50))
        if frame.height == 0:
            parts.append("<p class='muted'>no significant findings</p>" + label_issue_note(frame))
            continue
        frame = frame.sort(pl.col("effect_size").abs(), descending=True, nulls_last=True)
        roots, echoes = split_echoes(frame)
        roots = roots.with_columns(pl.Series("echoes", [
            echoes.filter((pl.col("region") == r["region"]) & pl.col("explained_by").is_in(_cause_names(r))).height
            for r in roots.iter_rows(named=True)], dtype=pl.Int64))
        parts.append(f"<p>{roots.height} root findings; {echoes.height} echoes folded under the attribute that "
                     "explains them (each finding was re-tested conditional on every other attribute; see "
                     "docs/findings.md).</p>")
        parts.append(table(roots.select([c for c in [*_FINDING_COLS, "echoes"] if c in roots.columns]), 500,
                           cls="findings"))
        if echoes.height:
            parts.append(f"<details><summary>{echoes.height} echoes, folded under their root causes</summary>"
                         + table(echoes.sort("explained_by", "region").select(
                             [c for c in ["explained_by", *_FINDING_COLS] if c in echoes.columns]), 500,
                             cls="findings") + "</details>")
        parts.append(label_issue_note(frame))
        frame = roots
        cards = []
        for row in frame.iter_rows(named=True):
            for entry in row.get("evidence") or []:
                p = _evidence_path(entry, dirs_by.get(model, []))
                if p is None or n_images >= cfg["max_findings_images"]:
                    continue
                n_images += 1
                cards.append(f"<figure class='evidence'><figcaption><b>{html.escape(row['finding_id'])}</b> "
                             f"{html.escape(row.get('description') or '')}</figcaption>{png(p)}</figure>")
        if cards:
            parts.append("<details open><summary>explanations: mean image and mean edge profile of the set (red) "
                         f"vs the rest (blue), {len(cards)} images</summary>{''.join(cards)}</details>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------ fairness

_SUMMARY_COLS = ["model", "region", "target", "positive", "protected", "measure", "value", "ci_low", "ci_high",
                 "flagged", "group_high", "group_low", "n"]


def fairness_section(summaries: Sequence[PathLike], groups: Sequence[PathLike], cfg: dict) -> str:
    if not summaries:
        return not_run("fairness")
    summary = _read(summaries)
    if summary.height == 0:
        return "<p class='muted'>no fairness results (no target attributes?)</p>"
    n_flag = int(summary["flagged"].sum())
    parts = [f"<p>Gaps between protected groups of each target's probe predictions (fairlearn MetricFrame; "
             f"bootstrap CIs over subjects). <span class='{'bad' if n_flag else 'ok'}'>{n_flag} of "
             f"{summary.height} gaps flagged</span> (CI excludes zero; highlighted).</p>"]
    summary = summary.sort("flagged", "model", "region", "target", "protected", "measure",
                           descending=[True, False, False, False, False, False])
    parts.append(table(summary.select([c for c in _SUMMARY_COLS if c in summary.columns]), cfg["max_table_rows"],
                       row_class=lambda r: "flag" if r.get("flagged") else None))
    g = _read(groups)
    if g.height:
        parts.append("<details><summary>per-group metrics</summary>")
        parts.append(table(g, cfg["max_table_rows"]))
        parts.append("</details>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------- mitigation

_REPROBE_COLS = ["model", "region", "method", "erased", "attribute", "role", "probe", "metric", "value_before",
                 "value", "ci_low", "ci_high", "chance", "p_vs_chance", "drop", "drop_ci_low", "drop_ci_high", "check"]
_ATTACKERS = ("rbf_svm", "mlp")


def reprobe_check(frame: pl.DataFrame, alpha: float = 0.05) -> pl.DataFrame:
    """A `check` column. Protected attributes are judged by the tuned attackers (RBF SVM, MLP): 'at chance'
    when the attacker's test predictions do not beat chance (permutation p > alpha), else 'readable'. The
    linear probe is what LEACE and INLP defeat by construction, so it is shown but never judged. Targets:
    'kept' when the drop's interval includes 0 or lies below it, else 'lost'."""
    if "p_vs_chance" not in frame.columns:  # a table from before the attackers: report, do not judge
        return frame.with_columns(pl.lit("not judged").alias("check"))
    protected, attacker = pl.col("role") == "protected", pl.col("probe").is_in(list(_ATTACKERS))
    return frame.with_columns(
        pl.when(protected & attacker & (pl.col("p_vs_chance") > alpha)).then(pl.lit("at chance"))
        .when(protected & attacker).then(pl.lit("readable"))
        .when(protected).then(pl.lit("linear: not a verdict"))
        .when(pl.col("drop_ci_low") <= 0).then(pl.lit("kept"))
        .when(pl.col("drop_ci_low").is_not_null()).then(pl.lit("lost"))
        .otherwise(pl.lit("not judged")).alias("check")
    )


def mitigation_section(reprobes: Sequence[PathLike], cfg: dict) -> str:
    if not reprobes:
        return not_run("mitigation")
    frame = _read(reprobes)
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
    parts.append(table(frame.select([c for c in _REPROBE_COLS if c in frame.columns]), 1000,
                       row_class=lambda r: {"at chance": "good", "kept": "good", "readable": "flag",
                                            "lost": "flag"}.get(r["check"])))
    return "".join(parts)


# -------------------------------------------------------------------------------------- ground truth

def ground_truth_section(findings: Sequence[PathLike], ground_truth: Sequence[PathLike]) -> tuple[str, dict]:
    """Recall of every model's findings against the planted effects, with false findings and unexplained echoes;
    returns (html, {model: (found, expected, false findings + unexplained echoes)})."""
    if not ground_truth:
        return not_run("ground truth (demo cohorts only)"), {}
    if not findings:
        return "<p class='muted'>ground truth present, but no findings to match</p>", {}
    from cohortlens.analysis.discover_truth import ground_truth_recall, ground_truth_summary

    truth = ground_truth[0]
    parts, summary = [], {}
    for model, path in _by_model(findings, _findings_model).items():
        alpha = read_parquet_metadata(path).get("alpha", 0.05)
        recall = ground_truth_recall(path, truth, alpha=alpha)
        recall = recall.with_columns((pl.col("found") == pl.col("expected")).alias("as expected"))
        score = ground_truth_summary(path, truth, alpha=alpha)
        wrong = score["false_findings"] + score["unexplained_echoes"]
        summary[model] = (score["found"], score["expected"], wrong)
        good = score["found"] == score["expected"] and wrong == 0
        controls = recall.filter(pl.col("row_type") == "negative_control")["attribute"].to_list()
        parts.append(f"<h3>{html.escape(model)}</h3><p class='{'ok' if good else 'bad'}'>{score['found']} of "
                     f"{score['expected']} planted effects found; {score['false_findings']} false findings "
                     f"(negative controls: {html.escape(', '.join(controls) or 'none')}); "
                     f"{score['unexplained_echoes']} unexplained echoes; {score['folded']} echoes folded under "
                     f"their root cause.</p>")
        if score["false_finding_ids"] or score["unexplained_echo_ids"]:
            parts.append("<p class='bad'>" + html.escape(", ".join(score["false_finding_ids"]
                                                                   + score["unexplained_echo_ids"])) + "</p>")
        parts.append(table(recall.select("row_type", "effect", "attribute", "regions", "expected", "found",
                                         "as expected", "finding_ids", "explained_ids", "precision", "recall",
                                         "detail"), 100,
                           row_class=lambda r: "good" if r["as expected"] else "flag"))
    return "".join(parts), summary


# -------------------------------------------------------------------------------------- training logs

_INDEX_COLS = {"step", "of", "n_seen", "epoch", "lr", "img_per_s", "elapsed_s", "time", "wall_s"}


def _curve_columns(log_frame: pl.DataFrame) -> list[str]:
    numeric = [c for c, t in log_frame.schema.items() if t.is_numeric() and c not in _INDEX_COLS]
    losses = [c for c in numeric if "loss" in c.lower()]
    return (losses or numeric)[:6]


def training_section(train_logs: Sequence[PathLike], reconstructions: Mapping[str, PathLike]) -> tuple[str, int]:
    """A small loss curve per model (Plotly) and its reconstruction / QA grid. Returns (html, figures)."""
    if not train_logs and not reconstructions:
        return not_run("training"), 0
    import plotly.graph_objects as go

    from cohortlens.analysis.project import figure_div

    logs = _by_model(train_logs)
    parts, n_figs = [], 0
    for model in sorted(set(logs) | set(reconstructions)):
        parts.append(f"<h3>{html.escape(model)}</h3>")
        if model in logs:
            try:
                frame = pl.read_csv(logs[model], infer_schema_length=10_000)
            except Exception as exc:  # noqa: BLE001 - an unreadable log is reported, not fatal
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
                         f"{png(reconstructions[model], f'{model} reconstructions')}")
    return "".join(parts), n_figs

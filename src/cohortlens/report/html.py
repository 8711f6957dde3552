"""The report page: one self-contained HTML file (inline CSS, images as data URIs) that opens offline."""

from __future__ import annotations

import contextlib
import html
import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import polars as pl

from cohortlens.io.tables import atomic_path, read_parquet_metadata
from cohortlens.report import sections
from cohortlens.report.findings import findings_section, ground_truth_section, summary_section
from cohortlens.report.fragments import not_run, table
from cohortlens.report.model_table import model_table_section
from cohortlens.report.plotlyjs import plotlyjs_script
from cohortlens.report.projections import projections_section, publication_maps_section
from cohortlens.report.publication import cell_text, participant_ids, quarantine_reasons, show_suppressed
from cohortlens.report.publish import cohort_counts
from cohortlens.report.units import attribute_units

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;color:#1d2733;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}td,th{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:left}
th{background:#f3f5f7}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.muted{color:#57606a;font-size:.85rem}img{max-width:100%;image-rendering:pixelated;border:1px solid #d0d7de}
h3{font-size:1.05rem;margin-top:1.4rem}nav{font-size:.9rem;margin-bottom:1rem}nav a{margin-right:.8rem}
tr.flag td{background:#ffebe9}tr.good td{background:#e6f4ea}.scroll{overflow-x:auto}
details{margin:.6rem 0}summary{cursor:pointer;color:#0b5cad}.grid{display:flex;flex-wrap:wrap;gap:.5rem}
figure{margin:.3rem 0}figure.evidence img{max-width:48rem}img.map{max-width:23rem;image-rendering:auto}
figcaption{font-size:.8rem;color:#57606a}.plot{margin:.8rem 0}select{margin-left:.4rem}
table.findings{font-size:.8rem}table.findings td:last-child{min-width:32rem}
h4{font-size:.95rem;margin:1.2rem 0 .4rem}.finding{border-left:3px solid #d0d7de;padding:.1rem .8rem;margin:.7rem 0}
.finding p{margin:.25rem 0}ul.summary li{margin:.15rem 0}p.headline{font-weight:600}
.finding code{font-size:.75rem;color:#57606a}
"""

SECTIONS = [("summary", "Summary"), ("cohort", "Cohort"), ("quarantine", "Quarantine"),
            ("slices", "Preprocessed slices"), ("embeddings", "Embeddings"), ("models", "Model comparison"),
            ("projections", "Projections"), ("findings", "Findings"), ("fairness", "Fairness"),
            ("mitigation", "Mitigation"), ("ground-truth", "Ground-truth recall"), ("training", "Training")]


NO_IMAGES = ("No images in this cohort (embeddings only: every model is imported), so preprocessing, training, "
             "reconstructions and the findings' explanation images are skipped.")


def reconcile(n_manifest: int, cohort_q: pl.DataFrame, images: pl.DataFrame, pre_q: pl.DataFrame,
              index: pl.DataFrame | None) -> dict:
    """The manifest's rows accounted for; `index` None: an embeddings-only cohort (nothing is preprocessed)."""
    if index is None:
        return {"manifest_rows": n_manifest, "quarantined_cohort": cohort_q.height, "images": images.height,
                "balanced": n_manifest == images.height + cohort_q.height}
    with_slices = index["image_uid"].n_unique() if index.height else 0
    return {
        "manifest_rows": n_manifest,
        "quarantined_cohort": cohort_q.height,
        "images": images.height,
        "quarantined_preprocess": pre_q.height,
        "images_with_slices": with_slices,
        "balanced": n_manifest == with_slices + cohort_q.height + pre_q.height,
    }


def _h2(key: str) -> str:
    return f"<h2 id='{key}'>{html.escape(dict(SECTIONS)[key])}</h2>"


def build_report(*, title: str, cohort_dir: str, preprocessed_dir: str | None, embeddings: dict[str, dict],
                 out_path: str, max_quarantine_rows: int = 50, train_logs: Sequence[str] = (),
                 projections: Sequence[str] = (), plots: Sequence[str] = (), metrics: Sequence[str] = (),
                 baseline_metrics: Sequence[str] = (),
                 fairness_groups: Sequence[str] = (), fairness_summary: Sequence[str] = (),
                 findings: Sequence[str] = (), finding_tests: Sequence[str] = (), finding_dirs: Sequence[str] = (),
                 finding_curves: Sequence[str] = (), saliency: Sequence[str] = (),
                 reprobe: Sequence[str] = (), ground_truth: Sequence[str] = (), predictions: Sequence[str] = (),
                 counterfactuals: Sequence[str] = (), embedding_quarantine: Sequence[str] = (),
                 options: Mapping | None = None, publication: bool = False, maps_dir: str | None = None,
                 attributes: Mapping | None = None) -> dict:
    """The report page. embeddings: model -> {"slices": path, "volumes": path, "reconstructions": png path or
    None}; `counterfactuals`: results/counterfactuals/{model}.parquet (strips beside them); the other inputs are
    lists of the run's files (any may be empty: the section says it was not run);
    `options` the config `report:` keys of `sections.DEFAULTS`. Returns the cohort counts plus a summary of what
    the page shows (figures, findings recall). `preprocessed_dir` None: an embeddings-only cohort (no slice
    sections); `embedding_quarantine`: the imported models' quarantine tables (their counts are reconciled).

    `publication`: the page that may leave the institution (docs/report.md): counts below `min_cell` suppressed,
    quarantine reasons counted by kind (no list), maps as static images with coarsened attributes (written to
    `maps_dir`, a temporary folder if None), findings without sample ids and with explanation images only for
    sets of at least `min_cell` images, no reconstruction grids and no counterfactual strips.

    `attributes`: the config `attributes:` (default: the declarations in subjects.parquet's metadata), for the
    units of the tables, headlines and maps (`units.attribute_units`)."""
    cohort_dir = Path(cohort_dir)
    subjects = pl.read_parquet(cohort_dir / "subjects.parquet")
    images = pl.read_parquet(cohort_dir / "images.parquet")
    splits = pl.read_parquet(cohort_dir / "splits.parquet")
    cohort_q = pl.read_parquet(cohort_dir / "quarantine.parquet")
    meta = read_parquet_metadata(cohort_dir / "images.parquet")
    if preprocessed_dir is None:
        index, pre_q = None, cohort_q.clear()
    else:
        index = pl.read_parquet(Path(preprocessed_dir) / "index.parquet")
        pre_q = pl.read_parquet(Path(preprocessed_dir) / "quarantine.parquet")
    counts = reconcile(int(meta.get("manifest_rows", images.height + cohort_q.height)), cohort_q, images, pre_q, index)
    quarantine = pl.concat([cohort_q, pre_q]).sort("manifest_line")

    cfg = sections.settings(options)
    k = cfg["min_cell"]
    units = attribute_units(attributes if attributes is not None else read_parquet_metadata(
        cohort_dir / "subjects.parquet").get("attributes"))
    ids = participant_ids(subjects, images, cohort_q, pre_q) if publication else set()
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if publication:
        parts.append(f"<p class='muted'>Publication version: aggregates only. No participant ids, no per-image "
                     f"rows, no exact dates; counts and group statistics of fewer than {k} participants are "
                     f"suppressed (&lt; {k}).</p>")
    parts.append("<nav>" + "".join(f"<a href='#{k}'>{html.escape(v)}</a>" for k, v in SECTIONS) + "</nav>")
    parts.append(_h2("summary") + summary_section(findings, cfg, publication, ids, units))
    if index is None:
        parts.append(f"<p class='muted'>{NO_IMAGES}</p>")
    parts.append(_h2("cohort"))
    shown = {q: (cell_text(v, k) if publication and not isinstance(v, bool) else str(v)) for q, v in counts.items()}
    parts.append(table(pl.DataFrame({"quantity": list(shown), "value": list(shown.values())})))
    status = "ok" if counts["balanced"] else "bad"
    n_q = counts["quarantined_cohort"] + counts.get("quarantined_preprocess", 0)
    # an embeddings-only cohort: manifest rows (no images) kept by the cohort stage
    what, kept = ("images", "images with slices") if index is not None else ("manifest rows", "rows kept")
    parts.append(
        f"<p class='{status}'>{what} in = {kept} + quarantined: {shown['manifest_rows']} = "
        f"{shown['images_with_slices' if index is not None else 'images']} + "
        f"{cell_text(n_q, k) if publication else n_q}</p>"
    )
    if publication:
        parts.append(table(show_suppressed(cohort_counts(images, splits, k), k).drop("suppressed")))
    else:
        parts.append(table(images.group_by("region").agg(pl.len().alias("images")).sort("region")))
        parts.append(table(splits.group_by("split").agg(pl.len().alias("subjects")).sort("split")))
    parts.append(f"<p>{subjects.height} subjects in {images['shard'].n_unique() if images.height else 0} shards.</p>")
    parts.append(_h2("quarantine"))
    if publication:
        parts.append(f"<p class='muted'>Quarantined images per kind of reason; kinds with fewer than {k} images are "
                     "merged.</p>" + table(show_suppressed(quarantine_reasons(quarantine, k), k)))
    else:
        parts.append(table(quarantine.group_by("stage", "reason").agg(pl.len().alias("images")).sort("images", descending=True)))
        parts.append(table(quarantine.select("manifest_line", "stage", "subject_id", "region", "image", "reason"), max_quarantine_rows))
    parts.append(_h2("slices"))
    if index is None:
        parts.append(not_run("preprocessing"))
    else:
        parts.append(table(index.group_by("region").agg(pl.len().alias("slices"), pl.col("is_center").sum().alias("center slices")).sort("region")))
    parts.append(_h2("embeddings"))
    rows = []
    for model, files in embeddings.items():
        for level in ("slices", "volumes"):
            if not files.get(level):
                continue
            m = read_parquet_metadata(files[level])
            n = pl.scan_parquet(files[level]).select(pl.len()).collect().item()
            rows.append({"model": model, "level": level, "rows": n, "dim": m.get("dim"), "config hash": m.get("config_hash")})
    parts.append(table(pl.DataFrame(rows)))
    parts.append(sections.imported_section(embedding_quarantine, cfg, publication, max_quarantine_rows))

    subjects_path, images_path = cohort_dir / "subjects.parquet", cohort_dir / "images.parquet"
    parts.append(_h2("models") + model_table_section(metrics, baseline_metrics, predictions, units))
    if publication:
        with contextlib.ExitStack() as stack:
            folder = maps_dir or stack.enter_context(tempfile.TemporaryDirectory())
            proj_html = publication_maps_section(projections, subjects_path, images_path, cfg, folder, units)
            n_proj = 0
    else:
        proj_html, n_proj = projections_section(projections, plots, subjects_path, images_path, cfg, units)
    parts.append(_h2("projections") + proj_html)
    parts.append(_h2("findings") + findings_section(findings, finding_tests, finding_dirs, cfg, publication, ids,
                                                      units, counterfactuals,
                                                      curves=finding_curves, saliency=saliency))
    parts.append(_h2("fairness") + sections.fairness_section(fairness_summary, fairness_groups, cfg, publication,
                                                             units))
    parts.append(_h2("mitigation") + sections.mitigation_section(reprobe, cfg, units))
    truth_html, recall = ground_truth_section(findings, ground_truth, publication, ids)
    parts.append(_h2("ground-truth") + truth_html)
    recon = {m: f["reconstructions"] for m, f in embeddings.items() if f.get("reconstructions")}
    train_html, n_train = sections.training_section(train_logs, recon, publication)
    parts.append(_h2("training") + train_html)
    # plotly.js once, before the first figure's script, and only when the page has a figure
    head_js = plotlyjs_script() if n_proj + n_train else ""
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style>{head_js}</head><body>{''.join(parts)}</body></html>")
    with atomic_path(out_path, ".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return {**counts, "interactive_figures": n_proj + n_train, "recall": recall}


LIST_INPUTS = ("embeddings", "reconstructions", "train_logs", "projections", "plots", "metrics", "baseline_metrics",
               "predictions", "fairness_groups", "fairness_summary", "findings", "finding_tests", "finding_dirs",
               "reprobe", "ground_truth",
               "counterfactuals", "embedding_quarantine", "finding_curves", "saliency")


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(v) for v in value]


def build_report_from_inputs(inputs, options: Mapping | None, out_path: str, publication: bool = False,
                             maps_dir: str | None = None, attributes: Mapping | None = None) -> dict:
    """The report rule's job: `inputs` is snakemake.input (or any object/mapping) with the single paths
    subjects and index (cohort and preprocessed folders are theirs; no index, or an empty one: an embeddings-only
    cohort) and the lists of LIST_INPUTS (missing = empty); `options` is config `report:`, `attributes` config
    `attributes:` (units; default: subjects.parquet's metadata). Model / region / method are read from the paths.
    `publication` and `maps_dir`: the publication page (build_report)."""
    if isinstance(inputs, Mapping):
        get = inputs.get
    else:  # snakemake.input: only its named inputs (`index` would otherwise be the list method)
        names = set(inputs.keys()) if hasattr(inputs, "keys") else None

        def get(k, d=None):
            return getattr(inputs, k, d) if names is None or k in names else d
    lists = {k: _as_list(get(k, None)) for k in LIST_INPUTS}
    embeddings: dict[str, dict] = {}
    for path in lists["embeddings"]:
        model, level = Path(path).parent.name, Path(path).stem
        embeddings.setdefault(model, {})[level] = path
    for png in lists["reconstructions"]:
        embeddings.setdefault(Path(png).parent.name, {})["reconstructions"] = png
    options = dict(options or {})
    index = get("index")
    return build_report(
        title=options.get("title", "cohortlens report"),
        cohort_dir=str(Path(str(get("subjects"))).parent),
        preprocessed_dir=str(Path(str(index)).parent) if index else None,
        embeddings=embeddings,
        out_path=out_path,
        max_quarantine_rows=options.get("max_quarantine_rows", 50),
        train_logs=lists["train_logs"],
        projections=lists["projections"],
        plots=lists["plots"],
        metrics=lists["metrics"],
        baseline_metrics=lists["baseline_metrics"],
        fairness_groups=lists["fairness_groups"],
        fairness_summary=lists["fairness_summary"],
        findings=lists["findings"],
        finding_tests=lists["finding_tests"],
        finding_dirs=lists["finding_dirs"],
        finding_curves=lists["finding_curves"],
        saliency=lists["saliency"],
        reprobe=lists["reprobe"],
        ground_truth=lists["ground_truth"],
        counterfactuals=lists["counterfactuals"],
        predictions=lists["predictions"],
        embedding_quarantine=lists["embedding_quarantine"],
        options=options,
        publication=publication,
        maps_dir=maps_dir,
        attributes=attributes,
    )

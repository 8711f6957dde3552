"""The findings section (significant findings per model, echoes folded under their root causes, explanation
images) and the ground-truth section (recall of the planted effects of a demo cohort, false findings,
unexplained echoes)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Collection, Mapping, Sequence

import polars as pl

from cohortlens.demo.truth import ground_truth_recall, ground_truth_summary
from cohortlens.io.tables import read_parquet_metadata
from cohortlens.report.fragments import by_model, fmt, not_run, png, table
from cohortlens.report.publication import (
    findings_public,
    pictured,
    public_text,
    public_text_columns,
    show_suppressed,
)
from cohortlens.types import PathLike


def _findings_model(path: PathLike) -> str:
    """results/findings/{model}.parquet or {model}-tests.parquet."""
    stem = Path(path).stem
    return stem[: -len("-tests")] if stem.endswith("-tests") else stem



_FINDING_COLS = ["finding_id", "kind", "region", "attribute", "value", "effect_size", "effect_measure",
                 "p_adjusted", "n", "n_set", "description"]


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


def counterfactual_strips(indexes: Sequence[PathLike]) -> dict[str, dict[str, tuple[Path, dict]]]:
    """{model: {finding_id: (strip PNG, index row)}} from results/counterfactuals/{model}.parquet (the strips are
    in the folder of the same name beside it); missing PNGs are left out."""
    out: dict[str, dict[str, tuple[Path, dict]]] = {}
    for path in indexes:
        path = Path(path)
        for row in pl.read_parquet(path).iter_rows(named=True):
            png_path = path.parent / path.stem / row["png"]
            if png_path.is_file():
                out.setdefault(path.stem, {})[row["finding_id"]] = (png_path, row)
    return out


def _strip_card(finding_id: str, png_path: Path, row: Mapping) -> str:
    caption = (f"<b>{html.escape(finding_id)}</b> counterfactual: {html.escape(row['set'])} vs "
               f"{html.escape(row['rest'])}; z_sem moved from {fmt(row['sigmas'][0])} to {fmt(row['sigmas'][-1])} sd "
               f"along the difference of their means (class means {fmt(row['gap_sigma'])} sd apart); last column: "
               f"the change between the ends (red: brighter). What the model decodes, not a measured effect "
               f"(docs/findings.md).")
    return f"<figure class='evidence'><figcaption>{caption}</figcaption>{png(png_path)}</figure>"


def findings_section(findings: Sequence[PathLike], tests: Sequence[PathLike], finding_dirs: Sequence[PathLike],
                     cfg: dict, publication: bool = False, ids: Collection[str] = (),
                     counterfactuals: Sequence[PathLike] = ()) -> str:
    """Findings per model, echoes folded, explanation images (and the DAE's counterfactual strips, from the index
    files in `counterfactuals`, beside them). `publication`: the public columns only (no sample ids; `ids`
    withheld from the text, dates coarsened; publication.findings_public), an explanation image only for a set of
    at least cfg['min_cell'] images (a smaller finding is described, not pictured) and no counterfactual strips
    (they show individual images)."""
    if not findings:
        return not_run("discovery")
    strips = {} if publication else counterfactual_strips(counterfactuals)
    tests_by = by_model(tests, _findings_model)
    dirs_by: dict[str, list[Path]] = {}
    for d in finding_dirs:
        dirs_by.setdefault(Path(d).name, []).append(Path(d))
    parts = ["<p>Significant findings (FDR-adjusted p below α, or cleanlab flags), largest effect first. Effect "
             "sizes are in the unit named beside them (balanced accuracy above chance, R², enrichment ratio, "
             "discordant fraction, …).</p>"]
    n_images, k = 0, cfg.get("min_cell", 10)
    for model, path in by_model(findings, _findings_model).items():
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
        original_roots, _ = split_echoes(frame)
        if publication:
            frame = show_suppressed(findings_public(frame, k, ids), k)
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
        cards, not_pictured = [], []
        for row, shown in zip(original_roots.iter_rows(named=True), roots.iter_rows(named=True)):
            if publication and row.get("evidence") and not pictured(row, k):
                not_pictured.append(shown["finding_id"])
                continue
            for entry in row.get("evidence") or []:
                p = _evidence_path(entry, dirs_by.get(model, []))
                if p is None or n_images >= cfg["max_findings_images"]:
                    continue
                n_images += 1
                cards.append(f"<figure class='evidence'><figcaption><b>{html.escape(shown['finding_id'])}</b> "
                             f"{html.escape(shown.get('description') or '')}</figcaption>{png(p)}</figure>")
            strip = strips.get(model, {}).get(row["finding_id"])
            if strip is not None and n_images < cfg["max_findings_images"]:
                n_images += 1
                cards.append(_strip_card(row["finding_id"], *strip))
        if not_pictured:
            parts.append(f"<p class='muted'>Described, not pictured (the mean image of fewer than {k} images would "
                         f"show participants): {html.escape(', '.join(not_pictured))}</p>")
        if cards:
            cf = (", each DAE counterfactual strip after its finding's mean images" if strips.get(model) else "")
            parts.append("<details open><summary>explanations: mean image and mean edge profile of the set (red) "
                         f"vs the rest (blue){cf}, {len(cards)} images</summary>{''.join(cards)}</details>")
    return "".join(parts)


def ground_truth_section(findings: Sequence[PathLike], ground_truth: Sequence[PathLike],
                         publication: bool = False, ids: Collection[str] = ()) -> tuple[str, dict]:
    """Recall of every model's findings against the planted effects, with false findings and unexplained echoes;
    returns (html, {model: (found, expected, false findings + unexplained echoes)}). `publication`: ids
    withheld and dates coarsened in the finding ids and details."""
    if not ground_truth:
        return not_run("ground truth (demo cohorts only)"), {}
    if not findings:
        return "<p class='muted'>ground truth present, but no findings to match</p>", {}
    truth = ground_truth[0]
    parts, summary = [], {}
    for model, path in by_model(findings, _findings_model).items():
        alpha = read_parquet_metadata(path).get("alpha", 0.05)
        recall = ground_truth_recall(path, truth, alpha=alpha)
        recall = recall.with_columns((pl.col("found") == pl.col("expected")).alias("as expected"))
        if publication:
            recall = public_text_columns(recall, ids)
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
            wrong_ids = ", ".join(score["false_finding_ids"] + score["unexplained_echo_ids"])
            if publication:
                wrong_ids = public_text(wrong_ids, ids)
            parts.append("<p class='bad'>" + html.escape(wrong_ids) + "</p>")
        parts.append(table(recall.select("row_type", "effect", "attribute", "regions", "expected", "found",
                                         "as expected", "finding_ids", "explained_ids", "precision", "recall",
                                         "detail"), 100,
                           row_class=lambda r: "good" if r["as expected"] else "flag"))
    return "".join(parts), summary

"""The summary (every model's findings as one-line statements), the findings section (per model each
significant finding as a statement with its evidence, explanation image and the echoes it explains, grouped
for the reader; then the tables) and the ground-truth section (recall of the planted effects of a demo
cohort, false findings, unexplained echoes)."""

from __future__ import annotations

import html
import re
import statistics
from pathlib import Path
from typing import Collection, Mapping, Sequence

import polars as pl

from cohortlens.analysis.discover.core import HOLM_FAMILIES
from cohortlens.demo.truth import ground_truth_recall, ground_truth_summary
from cohortlens.io.tables import read_parquet_metadata
from cohortlens.report import finding_networks
from cohortlens.report.fragments import by_model, fmt, not_run, png, table
from cohortlens.report.headlines import SEP as INTERACTION
from cohortlens.report.headlines import conditioning, details_of, evidence, headline
from cohortlens.report.publication import (
    findings_public,
    pictured,
    public_text,
    public_text_columns,
    show_suppressed,
    suppress_small_counts,
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


def chance_note(frame: pl.DataFrame, alpha: float) -> str:
    """How many of a model's findings may be chance, from the corrections themselves: per family,
    Benjamini–Hochberg keeps the expected share of false findings at or below α and Holm the chance of any, so
    about α × the tested findings (echoes included) or fewer. Flags without a test (cleanlab) are not counted."""
    tested = [r for r in frame.iter_rows(named=True) if r.get("p_adjusted") is not None]
    if not tested:
        return ""
    holm = sum(details_of(r).get("family") in HOLM_FAMILIES for r in tested)
    flags = frame.height - len(tested)
    rest = ("" if not flags else "; the data-quality flag is not a test" if flags == 1 else
            f"; the {flags} data-quality flags are not tests")
    return (f"<p class='muted'>How many may be chance: each family of tests is corrected on its own (docs/findings.md"
            f", the tests); Benjamini–Hochberg keeps the expected share of false findings in a family at or below α, "
            f"Holm ({holm} of these findings) the chance of any. At α = {alpha}, up to about {alpha * len(tested):.1f} of the "
            f"{len(tested)} tested findings may be chance{rest}.</p>")


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


# Display bands of the strip judge's verdict (docs/findings.md, counterfactual strips): below JUDGE_MIN_ACCURACY the
# judge cannot tell the groups apart and gives none; a median shift under JUDGE_FAINT of the set-vs-rest gap is
# "barely moves"; otherwise the direction of three quarters of the images decides, and only where every cross-
# validation fold's judge (4/5 of the images) puts the median shift on the same side: a judge just above chance has a
# small gap, and dividing by it can turn noise into a large shift.
JUDGE_MIN_ACCURACY, JUDGE_FAINT = 0.6, 0.1


def judge_statement(row: Mapping) -> str:
    """One sentence (HTML) on the strip's independent check (`analysis.strip_judge`); empty for an index without
    one."""
    accuracy, shifts = row.get("judge_balanced_accuracy"), list(row.get("judge_shift") or [])
    if accuracy is None or not shifts:
        return ""
    the_set = html.escape(row["set"])
    where = ("outside the test split" if row.get("fitted_outside_test") is not False
             else "from every split, the test split included (too few outside it)")
    judge = (f"A pixel classifier of {the_set} vs {html.escape(row['rest'])}, fitted on {row['judge_n_set']} + "
             f"{row['judge_n_rest']} images {where} (balanced accuracy {accuracy:.2f} out of fold)")
    if accuracy < JUDGE_MIN_ACCURACY:
        return f"{judge}, cannot tell the groups apart in this slice: no independent check."
    n, up = len(shifts), sum(v > 0 for v in shifts)
    median = statistics.median(shifts)
    moved = f"median shift {median:+.2f} of the gap between the groups' mean images"
    if abs(median) < JUDGE_FAINT:
        return f"{judge}, sees the decodes barely move ({moved}): the strip shows little of what separates them."
    folds = list(row.get("judge_fold_median") or [])
    if (4 * up >= 3 * n or 4 * (n - up) >= 3 * n) and any((v > 0) != (median > 0) for v in folds):
        return (f"{judge}, sees the decodes move {'towards' if median > 0 else 'away from'} {the_set} ({moved}), but "
                f"its cross-validation folds' judges disagree on the direction (fold medians "
                f"{', '.join(f'{v:+.2f}' for v in folds)}): no verdict.")
    if 4 * up >= 3 * n:
        return f"{judge}, sees the decodes move towards {the_set} in {up} of {n} images ({moved})."
    if 4 * (n - up) >= 3 * n:
        return (f"{judge}, sees the decodes move <b>away from</b> {the_set} in {n - up} of {n} images ({moved}): "
                f"the strip does not show what separates the groups.")
    return f"{judge}, sees the decodes move towards {the_set} in {up} of {n} images only ({moved}): no consistent change."


def _strip_card(finding_id: str, png_path: Path, row: Mapping) -> str:
    caption = (f"<b>{html.escape(finding_id)}</b> counterfactual: {html.escape(row['set'])} vs "
               f"{html.escape(row['rest'])}; z_sem moved from {fmt(row['sigmas'][0])} to {fmt(row['sigmas'][-1])} sd "
               f"along the difference of their means (class means {fmt(row['gap_sigma'])} sd apart); last column: "
               f"the change between the ends (red: brighter). What the model decodes, not a measured effect "
               f"(docs/findings.md). {judge_statement(row)}")
    return f"<figure class='evidence'><figcaption>{caption}</figcaption>{png(png_path)}</figure>"
# the reader's order: what the images reveal, where they cluster, changes over time, subgroups, data quality
GROUPS = [("leak", "What the images reveal"), ("cluster", "Where images cluster by an attribute"),
          ("time", "Changes over time within a site or scanner"),
          ("subgroup", "Subjects who look like another category"), ("quality", "Data quality")]


def finding_group(row: Mapping) -> str:
    """The GROUPS key of a finding: a date effect within a stratum (an `a×date` attribute) is a change over
    time whatever test found it."""
    kind = row.get("kind")
    if INTERACTION in str(row.get("attribute")) and kind in ("attribute_leak", "cluster", "non_iid"):
        return "time"
    return {"attribute_leak": "leak", "cluster": "cluster", "discordant_subgroup": "subgroup"}.get(kind, "quality")


def _echoes_of(root: Mapping, echoes: pl.DataFrame) -> list[int]:
    """Row numbers of the echoes explained by this root finding (same region, `explained_by` names it)."""
    if echoes.height == 0:
        return []
    names = set(_cause_names(root))
    return [i for i, r in enumerate(echoes.iter_rows(named=True))
            if r["region"] == root["region"] and r["explained_by"] in names]


def strength(row: Mapping) -> float:
    """How strong a finding is, for the order of its group: |effect|, a balanced accuracy above chance as the
    share of the way from chance to perfect (comparable with an R²)."""
    effect = abs(row.get("effect_size") or 0.0)
    if row.get("effect_measure") == "balanced_accuracy_minus_chance":
        chance = details_of(row).get("chance")
        return effect / (1.0 - chance) if chance is not None and chance < 1 else effect
    return effect


def _statement(row: Mapping, shown: Mapping, units: Mapping, public) -> tuple[str, str]:
    """(headline, evidence) as the page shows them; a finding whose statistics a publication suppresses (fewer
    than k images) is named, not stated."""
    if shown.get("p_value") is None and row.get("p_value") is not None:
        return (f"{row['kind'].replace('_', ' ')} in the {row['region']} images ({row['attribute']}): statistics "
                "suppressed"), ""
    return public(headline(row, units)), public(evidence(row))


_FLAGS = ("outlier", "near_duplicate", "label_issue")  # cleanlab's flags: the internal page names the images


def _anchor(model: str, finding_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"f-{model}-{finding_id}")


def _echo_item(row: Mapping, shown: Mapping, units: Mapping, public) -> str:
    """An echo as a list item: its statement and what explains it."""
    return (f"<li>{html.escape(_statement(row, shown, units, public)[0])} — {html.escape(public(conditioning(row)))} "
            f"<code>{html.escape(shown['finding_id'])}</code></li>")


def _card(model: str, row: Mapping, shown: Mapping, echo_rows: list[tuple[Mapping, Mapping]], image: str,
          units: Mapping, public) -> str:
    """One finding: its headline, evidence and conditioning, its explanation image, the echoes it explains."""
    head, proof = _statement(row, shown, units, public)
    cond = public(conditioning(row))
    flagged = row.get("sample_ids") if row.get("kind") in _FLAGS and "sample_ids" in shown else None
    named = (f"<p class='muted'>Images: {html.escape(', '.join(flagged[:10]))}"
             f"{f' and {len(flagged) - 10} more' if len(flagged) > 10 else ''}</p>" if flagged else "")
    out = [f"<div class='finding' id='{_anchor(model, shown['finding_id'])}'><p class='headline'>"
           f"{html.escape(head)}.</p><p class='muted'>"
           f"{html.escape(proof)}{'. ' if proof else ''}{html.escape(cond)}{'. ' if cond else ''}"
           f"<code>{html.escape(shown['finding_id'])}</code></p>", named, image]
    if echo_rows:
        items = "".join(_echo_item(e, s, units, public) for e, s in echo_rows)
        out.append(f"<details><summary>explains {len(echo_rows)} echo{'es' if len(echo_rows) > 1 else ''}: "
                   f"findings that vanish given this one</summary><ul>{items}</ul></details>")
    return "".join(out) + "</div>"


def _image(row: Mapping, shown: Mapping, dirs: Sequence[Path], publication: bool, k: int) -> tuple[str, bool]:
    """(the explanation figure of a finding or '', whether one exists but may not be shown: a set under k)."""
    if publication and row.get("evidence") and not pictured(row, k):
        return "", True
    for entry in row.get("evidence") or []:
        p = _evidence_path(entry, dirs)
        if p is not None:
            return f"<figure class='evidence'>{png(p, shown['finding_id'], webp=not publication)}</figure>", False
    return "", False


def _public(publication: bool, ids: Collection[str], k: int):
    """The text filter of a page: a publication's (ids withheld, dates to the month, counts under k as
    "< k"), or none."""
    def public(text: str) -> str:
        return suppress_small_counts(public_text(text, ids), k) if publication else text

    return public


def _model_frames(path: PathLike, k: int, publication: bool, ids: Collection[str]):
    """(all findings, original roots, original echoes, shown roots, shown echoes) of a model, strongest first;
    the shown ones are a publication's public rows when `publication`."""
    frame = pl.read_parquet(path).sort(pl.col("effect_size").abs(), descending=True, nulls_last=True)
    original_roots, original_echoes = split_echoes(frame)
    shown = show_suppressed(findings_public(frame, k, ids), k) if publication else frame
    return (frame, original_roots, original_echoes, *split_echoes(shown))


def summary_section(findings: Sequence[PathLike], cfg: dict, publication: bool = False, ids: Collection[str] = (),
                    units: Mapping | None = None) -> str:
    """The page's opening: every model's root findings as one-line statements (`headlines`), in the findings
    section's order, each linking to its card there."""
    if not findings:
        return "<p class='muted'>No findings: the discover stage has no results in this run.</p>"
    k, units = cfg.get("min_cell", 10), dict(units or {})
    public = _public(publication, ids, k)
    parts = ["<p>What the analysis found, per model (details, images and tables under "
             "<a href='#findings'>Findings</a>; echoes, which another finding explains, are folded there).</p>"]
    for i, (model, path) in enumerate(by_model(findings, _findings_model).items()):
        _, roots, echoes, shown_roots, _ = _model_frames(path, k, publication, ids)
        ordered = sorted(zip(roots.iter_rows(named=True), shown_roots.iter_rows(named=True)),
                         key=lambda pair: ([g for g, _ in GROUPS].index(finding_group(pair[0])), -strength(pair[0])))
        items = "".join(f"<li><a href='#{_anchor(model, s['finding_id'])}'>"
                        f"{html.escape(_statement(r, s, units, public)[0])}</a></li>" for r, s in ordered)
        parts.append(f"<details{' open' if i == 0 else ''}><summary><b>{html.escape(model)}</b>: {roots.height} "
                     f"findings, {echoes.height} echoes</summary><ul class='summary'>{items or '<li>none</li>'}</ul>"
                     "</details>")
    return "".join(parts)


def _finding_dir_model(folder: PathLike) -> str:
    """results/findings/{model}/explain (or, written before it had a folder of its own, results/findings/{model})."""
    folder = Path(folder)
    return folder.parent.name if folder.name == "explain" else folder.name


def findings_section(findings: Sequence[PathLike], tests: Sequence[PathLike], finding_dirs: Sequence[PathLike],
                     cfg: dict, publication: bool = False, ids: Collection[str] = (),
                     units: Mapping | None = None, counterfactuals: Sequence[PathLike] = (),
                     curves: Sequence[PathLike] = (), saliency: Sequence[PathLike] = ()) -> str:
    """Findings per model as statements (headline, evidence, image, the echoes each explains; `headlines`),
    grouped for the reader (GROUPS), then the tables: root findings, echoes, tests run. `publication`: the
    public columns only (no sample ids; `ids` withheld from the text, dates coarsened, counts under
    cfg['min_cell'] as "< k"; publication.findings_public) and an explanation image only for a set of at least
    cfg['min_cell'] images; a smaller finding is described, not pictured. The DAE's counterfactual strips (index
    files in `counterfactuals`) follow their finding's image on the internal page only: they show individual
    images. Beside each image the GradCAM of its set-vs-rest classifier (`saliency`:
    results/findings/{model}/saliency.parquet); after the cards the discordant subgroup's training curves
    (`curves`: results/findings/{model}/discordant-training-curves.csv)."""
    if not findings:
        return not_run("discovery")
    strips = {} if publication else counterfactual_strips(counterfactuals)
    tests_by = by_model(tests, _findings_model)
    dirs_by: dict[str, list[Path]] = {}
    for d in finding_dirs:
        dirs_by.setdefault(_finding_dir_model(d), []).append(Path(d))
    curves_by, saliency_by = by_model(curves), by_model(saliency)
    k, units = cfg.get("min_cell", 10), dict(units or {})
    public = _public(publication, ids, k)
    parts = ["<p>Each finding as a statement, with its evidence (test, p-value raw and FDR-adjusted, n), its "
             "image (explanations: mean image and mean edge profile of the set (red) vs the rest (blue)) and the "
             "findings it explains (echoes: significant on their own, not given this one; docs/findings.md). The "
             "tables below each model's statements hold the numbers.</p>"]
    n_images = 0
    for model, path in by_model(findings, _findings_model).items():
        frame, original_roots, original_echoes, roots, echoes = _model_frames(path, k, publication, ids)
        meta = read_parquet_metadata(path)
        alpha = meta.get("alpha", 0.05)
        parts.append(f"<h3>{html.escape(model)}: {frame.height} findings</h3>")
        if meta.get("explanations"):  # e.g. skipped in an embeddings-only cohort (no images to average)
            parts.append(f"<p class='muted'>{html.escape(str(meta['explanations']))}</p>")
        summary = None
        if model in tests_by:
            t = pl.read_parquet(tests_by[model])
            if t.height:
                sig = pl.col("p_adjusted").is_null() | (pl.col("p_adjusted") < alpha)
                summary = t.group_by("kind").agg(pl.len().alias("tests"), sig.sum().alias("significant")).sort("kind")
        if frame.height == 0:
            parts.append("<p class='muted'>no significant findings</p>" + label_issue_note(frame)
                         + finding_networks.curves_block(curves_by.get(model), k, publication))
            if summary is not None:
                parts.append(f"<p class='muted'>tests run (α = {alpha}):</p>" + table(summary, 50))
            continue
        cards: dict[str, list[tuple[float, str]]] = {g: [] for g, _ in GROUPS}
        scores = finding_networks.saliency_rows(saliency_by.get(model))
        saliency_dir = saliency_by[model].parent / "saliency" if model in saliency_by else Path()
        not_pictured, folded = [], set()
        echo_pairs = list(zip(original_echoes.iter_rows(named=True), echoes.iter_rows(named=True)))
        for row, shown in zip(original_roots.iter_rows(named=True), roots.iter_rows(named=True)):
            mine = _echoes_of(row, original_echoes)
            folded.update(mine)
            image, hidden = "", False
            if n_images < cfg["max_findings_images"]:
                image, hidden = _image(row, shown, dirs_by.get(model, []), publication, k)
                n_images += bool(image)
                if image:  # the GradCAM of the set-vs-rest classifier beside the mean image
                    image += finding_networks.saliency_figure(scores.get(row["finding_id"]), saliency_dir, k,
                                                              publication)
            if hidden:
                not_pictured.append(shown["finding_id"])
            strip = strips.get(model, {}).get(row["finding_id"])
            if strip is not None and n_images < cfg["max_findings_images"]:
                n_images += 1
                image += _strip_card(row["finding_id"], *strip)
            cards[finding_group(row)].append((strength(row), _card(model, row, shown, [echo_pairs[i] for i in mine],
                                                                   image, units, public)))
        echo_note = (f"{echoes.height} echoes, each folded under the finding that explains it" if echoes.height
                     else "no echoes")
        parts.append(f"<p>{roots.height} findings; {echo_note} (every finding was re-tested given every other "
                     "attribute).</p>")
        parts.append(chance_note(frame, alpha))
        for key, title in GROUPS:
            if cards[key]:
                ordered = sorted(cards[key], key=lambda c: -c[0])
                parts.append(f"<h4>{html.escape(title)}</h4>" + "".join(c for _, c in ordered))
        loose = [echo_pairs[i] for i in range(len(echo_pairs)) if i not in folded]
        if loose:
            parts.append("<h4>Echoes whose cause has no finding of its own here</h4><ul>"
                         + "".join(_echo_item(e, s, units, public) for e, s in loose) + "</ul>")
        if not_pictured:
            parts.append(f"<p class='muted'>Described, not pictured (the mean image of fewer than {k} images would "
                         f"show participants): {html.escape(', '.join(not_pictured))}</p>")
        parts.append(finding_networks.curves_block(curves_by.get(model), k, publication))
        parts.append(label_issue_note(frame))
        roots = roots.with_columns(pl.Series("echoes", [len(_echoes_of(r, original_echoes))
                                                        for r in original_roots.iter_rows(named=True)], dtype=pl.Int64))
        tables = table(roots.select([c for c in [*_FINDING_COLS, "echoes"] if c in roots.columns]), 500,
                       cls="findings")
        if echoes.height:
            tables += (f"<p>{echoes.height} echoes, by their root causes:</p>" + table(
                echoes.sort("explained_by", "region").select(
                    [c for c in ["explained_by", *_FINDING_COLS] if c in echoes.columns]), 500, cls="findings"))
        if summary is not None:
            tables += f"<p class='muted'>tests run (α = {alpha}):</p>" + table(summary, 50)
        parts.append(f"<details><summary>{html.escape(model)}: tables of the findings, echoes and tests</summary>"
                     f"{tables}</details>")
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

"""What a publication may show: aggregates with small cells suppressed, no participant ids, no exact dates.

The publication report (`results/report/publication.html`) and the publication archive are built from the
run's tables through these functions (library functions on frames; the report and archive modules do the I/O):

* `suppress_small_cells`: a row whose participant count is below k loses its count and its statistics (null,
  `suppressed` = true), as statistical offices suppress small cells;
* `fairness_groups_public` / `fairness_summary_public`: per-group metrics of groups under k suppressed, and a gap
  whose two groups include one under k suppressed with it;
* `quarantine_reasons`: quarantined images counted per kind of reason (values, ids and file names stripped),
  kinds under k merged into one row, that row suppressed if it is still under k;
* `findings_public`: the findings without sample-id lists, per-sample details or evidence paths; ids in the
  descriptions withheld, dates coarsened to the month, counts below k in the text written "< k", the size of the
  finding's set (`n_set`) suppressed below k;
* `coarsen_attributes`: the attributes of a map's points coarsened (continuous values in quantile bins, dates
  by year, categories under k merged into "other").
"""

from __future__ import annotations

import re
from typing import Collection, Iterable, Sequence

import polars as pl

OTHER = "other (each < k)"
# finding columns a publication keeps: statistics and counts (sample ids, per-sample details, evidence paths go)
FINDING_PUBLIC_COLS = ("finding_id", "kind", "region", "attribute", "value", "effect_size", "effect_measure",
                       "p_value", "p_adjusted", "n", "n_set", "description", "explained_by")
# a date written as 2015-05-27, 2015_05_27, 2015/05/27, 2015.05.27 or 20150527 (not inside a longer number)
DATE_PATTERN = re.compile(r"(?<![\d.])(\d{4})([-_/.]?)(\d{2})\2(\d{2})(?![\d])")
# a count of participants or images written in text: "3 of 300", "3 images", "1 subject", "4 participants"
_TEXT_COUNT = re.compile(r"(?<![\w.,])(\d+)(?=( of \d| (?:images?|subjects?|participants?|people|scans?)\b))")
_ID_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(?:/[A-Za-z0-9_.\-]+)?")


def small(value, k: int) -> bool:
    """A count from fewer than k participants (zero is no one: not a small cell)."""
    return value is not None and 0 < value < k


def cell_text(value, k: int) -> str:
    """A count as the page shows it: '< k' when suppressed."""
    return f"< {k}" if value is None or small(value, k) else str(value)


def suppress_small_cells(frame: pl.DataFrame, k: int, count: str = "n",
                         stats: Sequence[str] | None = None) -> pl.DataFrame:
    """Rows whose `count` is below k (and above 0) get a null count and null `stats` (default: every float
    column); a boolean `suppressed` column says which. A frame without the count column is returned as is."""
    if count not in frame.columns:
        return frame
    stats = [c for c, t in frame.schema.items() if t.is_float()] if stats is None else [c for c in stats
                                                                                        if c in frame.columns]
    low = pl.col(count).is_not_null() & (pl.col(count) > 0) & (pl.col(count) < k)
    prior = pl.col("suppressed") if "suppressed" in frame.columns else pl.lit(False)
    return frame.with_columns(
        *[pl.when(low).then(None).otherwise(pl.col(c)).alias(c) for c in [count, *stats]],
        (prior | low).alias("suppressed"),
    )


_GROUP_KEYS = ("model", "region", "target", "positive", "protected")


def fairness_groups_public(groups: pl.DataFrame, k: int) -> pl.DataFrame:
    """Per-group metrics: a group of fewer than k participants keeps its name, loses its n, value and CI."""
    return suppress_small_cells(groups, k, "n", ["value", "ci_low", "ci_high"])


def fairness_summary_public(summary: pl.DataFrame, groups: pl.DataFrame, k: int) -> pl.DataFrame:
    """Gaps between groups: a gap whose high or low group has fewer than k participants (its smallest n in
    `groups`) is suppressed (value, CI, the two group names and `flagged`)."""
    if summary.height == 0 or groups.height == 0 or "n" not in groups.columns:
        return suppress_small_cells(summary.with_columns(pl.lit(False).alias("suppressed")), k, "n",
                                    [c for c in ("value", "ci_low", "ci_high") if c in summary.columns])
    keys = [c for c in _GROUP_KEYS if c in summary.columns and c in groups.columns]
    sizes = groups.group_by(*keys, "group").agg(pl.col("n").min().alias("_n"))
    out = summary.with_row_index("_row")
    for side in ("group_high", "group_low"):
        out = out.join(sizes.rename({"group": side, "_n": f"_n_{side}"}), on=[*keys, side], how="left")
    low = pl.any_horizontal([pl.col(f"_n_{s}").is_not_null() & (pl.col(f"_n_{s}") < k)
                             for s in ("group_high", "group_low")])
    stats = [c for c in ("value", "ci_low", "ci_high", "group_high", "group_low", "flagged") if c in out.columns]
    out = (out.with_columns(*[pl.when(low).then(None).otherwise(pl.col(c)).alias(c) for c in stats],
                            low.alias("suppressed"))
           .sort("_row").drop("_row", "_n_group_high", "_n_group_low"))
    return suppress_small_cells(out, k, "n", [c for c in ("value", "ci_low", "ci_high") if c in out.columns])


def reason_kind(reason: str | None) -> str:
    """The kind of a quarantine reason without its particulars: the words before the first colon, without
    parentheses, numbers, or quoted names that hold a digit or a slash (ids, file names): "attribute 'age':
    140.0 is outside [18, 100]" -> "attribute 'age'", "duplicate image key 'Q0007/neck' (manifest lines 908,
    909)" -> "duplicate image key"."""
    if not reason:
        return "(no reason)"
    text = re.sub(r"'[^']*[\d/\\][^']*'|\"[^\"]*[\d/\\][^\"]*\"", "", reason)
    text = re.sub(r"\([^)]*\)|\[[^\]]*\]", "", text).split(":")[0]
    text = re.sub(r"[\w./\\-]*\d[\w./\\-]*", "", text)  # numbers and anything with a digit (ids, file names)
    return re.sub(r"\s+", " ", text).strip(" ,;") or "(other)"


def quarantine_reasons(quarantine: pl.DataFrame, k: int) -> pl.DataFrame:
    """stage, reason (kind), images: the kinds of reasons with at least k images; the others merged into one
    row, whose count is null (suppressed) when it is still under k."""
    if quarantine.height == 0:
        return pl.DataFrame(schema={"stage": pl.Utf8, "reason": pl.Utf8, "images": pl.Int64, "suppressed": pl.Boolean})
    kinds = (quarantine.with_columns(pl.col("reason").map_elements(reason_kind, return_dtype=pl.Utf8))
             .group_by("stage", "reason").agg(pl.len().cast(pl.Int64).alias("images")))
    big = kinds.filter(pl.col("images") >= k).sort("images", "stage", "reason", descending=[True, False, False])
    rest = int(kinds.filter(pl.col("images") < k)["images"].sum())
    rows = big.with_columns(pl.lit(False).alias("suppressed"))
    if rest:
        rows = pl.concat([rows, pl.DataFrame({"stage": ["all"], "reason": [f"other kinds (each < {k} images)"],
                                              "images": [rest],
                                              "suppressed": [False]})])
    return suppress_small_cells(rows, k, "images", [])


def coarsen_dates(text: str | None, dates: Collection[str] | None = None) -> str | None:
    """Dates in `text` to their month (2015-05-27 -> 2015-05, 2015_05_27 -> 2015_05, 20150527 -> 201505); only
    those in `dates` (ISO strings) when given."""
    if text is None:
        return None

    def month(m: re.Match) -> str:
        y, sep, mo, d = m.group(1), m.group(2), m.group(3), m.group(4)
        if not (1 <= int(mo) <= 12 and 1 <= int(d) <= 31):
            return m.group(0)
        if dates is not None and f"{y}-{mo}-{d}" not in dates:
            return m.group(0)
        return f"{y}{sep}{mo}"

    return DATE_PATTERN.sub(month, text)


def withhold_ids(text: str | None, ids: Collection[str]) -> str | None:
    """Participant ids (subject ids, or image uids `subject/region`) in `text` replaced, a run of them
    (separated by commas or spaces) by one "(ids withheld)"."""
    if not text or not ids:
        return text
    spans = []
    for m in _ID_TOKEN.finditer(text):
        token = m.group(0).rstrip(".")
        if token in ids or token.split("/")[0] in ids:
            spans.append([m.start(), m.start() + len(token)])
    if not spans:
        return text
    merged = [spans[0]]
    for start, end in spans[1:]:
        if re.fullmatch(r"[\s,;]*", text[merged[-1][1]:start]):
            merged[-1][1] = end
        else:
            merged.append([start, end])
    out, pos = [], 0
    for start, end in merged:
        out += [text[pos:start], "(ids withheld)"]
        pos = end
    return "".join(out + [text[pos:]])


def public_text(text: str | None, ids: Collection[str]) -> str | None:
    """Text a publication may show: participant ids withheld, exact dates coarsened to the month."""
    return coarsen_dates(withhold_ids(text, ids))


def suppress_small_counts(text: str | None, k: int) -> str | None:
    """Counts of fewer than k participants or images written in text ("1 of 300 images", "3 subjects") as
    "< k": the table cells' small-cell rule applied to descriptions."""
    if text is None:
        return None
    return _TEXT_COUNT.sub(lambda m: f"< {k}" if 0 < int(m.group(1)) < k else m.group(1), text)


def findings_public(frame: pl.DataFrame, k: int, ids: Collection[str] = ()) -> pl.DataFrame:
    """The findings as a publication shows them: FINDING_PUBLIC_COLS only (no sample_ids, details, evidence),
    `n_set` = the size of the finding's set of images (suppressed below k, with the effect statistics of a
    row whose `n` is below k), ids in the text withheld and dates coarsened to the month."""
    if "sample_ids" in frame.columns:
        frame = frame.with_columns(pl.col("sample_ids").list.len().cast(pl.Int64).alias("n_set"))
    keep = [c for c in FINDING_PUBLIC_COLS if c in frame.columns]
    out = frame.select(keep)
    text_cols = [c for c in ("finding_id", "value", "description", "explained_by") if c in out.columns]

    def public(text):  # a finding's text also counts images and subjects: small ones go, as in its cells
        return suppress_small_counts(public_text(text, ids), k)

    out = out.with_columns(*[pl.col(c).map_elements(public, return_dtype=pl.Utf8) for c in text_cols])
    out = suppress_small_cells(out, k, "n", [c for c in ("effect_size", "p_value", "p_adjusted") if c in out.columns])
    if "n_set" in out.columns:
        low = (pl.col("n_set") > 0) & (pl.col("n_set") < k)
        out = out.with_columns(pl.when(low).then(None).otherwise(pl.col("n_set")).alias("n_set"))
    return out


def show_suppressed(frame: pl.DataFrame, k: int, columns: Sequence[str] = ("n", "n_set", "images")) -> pl.DataFrame:
    """For the page: suppressed (null) counts as the text '< k'."""
    cols = [c for c in columns if c in frame.columns]
    return frame.with_columns(*[pl.col(c).cast(pl.Utf8).fill_null(f"< {k}").alias(c) for c in cols])


def public_text_columns(frame: pl.DataFrame, ids: Collection[str]) -> pl.DataFrame:
    """Every text column (and list of texts) with participant ids withheld and dates coarsened to the month."""
    def clean(s):
        return public_text(s, ids)

    exprs = []
    for c, t in frame.schema.items():
        if t == pl.Utf8:
            exprs.append(pl.col(c).map_elements(clean, return_dtype=pl.Utf8))
        elif isinstance(t, pl.List) and t.inner == pl.Utf8:
            exprs.append(pl.col(c).map_elements(lambda v: [clean(x) for x in v], return_dtype=pl.List(pl.Utf8)))
    return frame.with_columns(exprs) if exprs else frame


def pictured(row: dict, k: int) -> bool:
    """An explanation image (a mean over the finding's set) may be shown: the set has at least k images."""
    return len(row.get("sample_ids") or []) >= k


def participant_ids(*frames: pl.DataFrame) -> set[str]:
    """Every subject id and image uid of the given cohort tables (columns subject_id, image_uid)."""
    out: set[str] = set()
    for f in frames:
        for c in ("subject_id", "image_uid"):
            if c in f.columns:
                out.update(str(v) for v in f[c].drop_nulls().unique().to_list())
    return out


def _bins(values: pl.Series, n_bins: int, k: int) -> list[float]:
    """Quantile edges (rounded to 2 significant digits) so that each bin holds about n/n_bins >= k values."""
    v = values.drop_nulls()
    n_bins = max(1, min(n_bins, v.len() // max(k, 1)))
    qs = [v.quantile(i / n_bins) for i in range(1, n_bins)]
    edges = sorted({float(f"{q:.2g}") for q in qs if q is not None})
    return edges


def coarsen_attributes(frame: pl.DataFrame, specs: dict, k: int, n_bins: int = 4) -> tuple[pl.DataFrame, dict]:
    """A map frame with every attribute coarsened into categories (continuous: quantile bins with rounded
    edges, dates: the year, categories and bins under k merged into OTHER) and categorical specs for them.
    `specs` maps attribute -> AttributeSpec; returns (frame, specs)."""
    from dataclasses import replace

    out, new_specs = frame, {}
    for name, spec in specs.items():
        col = frame[name]
        if spec.type == "date":
            days = col.str.to_date(strict=False) if col.dtype == pl.Utf8 else col.cast(pl.Date, strict=False)
            labels = days.dt.year().cast(pl.Utf8)
        elif spec.is_categorical:
            labels = col.cast(pl.Utf8)
        else:
            num = col.cast(pl.Float64, strict=False)
            edges = _bins(num, n_bins, k)
            names = ([f"< {edges[0]:g}"] + [f"{a:g}–{b:g}" for a, b in zip(edges, edges[1:])]
                     + [f"≥ {edges[-1]:g}"]) if edges else ["all"]
            idx = [None if x is None else sum(x >= e for e in edges) for x in num.to_list()]
            labels = pl.Series(name, [None if i is None else names[i] for i in idx], dtype=pl.Utf8)
        counts = labels.drop_nulls().value_counts()
        rare = set(counts.filter(pl.col("count") < k)[labels.name].to_list()) if counts.height else set()
        labels = pl.Series(name, [OTHER if v in rare else v for v in labels.to_list()], dtype=pl.Utf8)
        out = out.with_columns(labels.alias(name))
        order = _label_order(labels.drop_nulls().unique().to_list(), spec)
        new_specs[name] = replace(spec, type="categorical", categories=order)
    return out, new_specs


def _label_order(labels: Iterable[str], spec) -> list[str]:
    labels = [v for v in labels if v != OTHER]
    if spec.is_categorical and spec.type != "date":
        known = [c for c in (spec.categories or ()) if c in labels]
        labels = known + sorted(set(labels) - set(known))
    else:
        def key(s: str):
            m = re.search(r"-?\d+(\.\d+)?", s)
            return (not s.startswith("<"), float(m.group(0)) if m else 0.0)
        labels = sorted(labels, key=key)
    return labels + [OTHER]

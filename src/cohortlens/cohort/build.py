"""The cohort stage: manifest + attribute config -> subjects, images, splits and quarantine tables.

Manifest-wide problems (unreadable file, missing columns, a row that breaks the manifest schema) stop the
run with a ManifestError naming the file, line and field. Problems of single rows (unknown region, an
attribute value outside its declared domain, duplicates, a missing image file, conflicting subject
attributes) become quarantine rows with a reason, so one bad row never stops a 300k-image cohort.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from cohortlens.io.tables import ManifestError, read_manifest

KEY_COLUMNS = ("subject_id", "image", "region")
SPLITS = ("train", "val", "test")
QUARANTINE_SCHEMA = {
    "stage": pl.Utf8,
    "manifest_line": pl.Int64,
    "image_uid": pl.Utf8,
    "subject_id": pl.Utf8,
    "region": pl.Utf8,
    "image": pl.Utf8,
    "reason": pl.Utf8,
}


@dataclass
class CohortTables:
    subjects: pl.DataFrame
    images: pl.DataFrame
    splits: pl.DataFrame
    quarantine: pl.DataFrame
    n_manifest_rows: int


def stable_unit_hash(values: list[str], seed: int | str = "") -> np.ndarray:
    """A hash in [0, 1) per value that never changes across runs, machines or library versions."""
    out = np.empty(len(values), dtype=np.float64)
    salt = str(seed).encode()
    for i, v in enumerate(values):
        digest = hashlib.blake2b(v.encode(), digest_size=8, key=salt[:64]).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def shard_count(n_subjects: int, subjects_per_shard: int) -> int:
    """Power-of-two shard count: it only changes when the cohort doubles, so adding subjects
    keeps every other subject in its shard (and keeps those shards' outputs cached)."""
    needed = max(1, math.ceil(n_subjects / max(1, subjects_per_shard)))
    return 1 << (needed - 1).bit_length()


def assign_shards(subject_ids: list[str], n_shards: int) -> np.ndarray:
    return np.floor(stable_unit_hash(subject_ids, "shard") * n_shards).astype(np.int64)


def _validate_rows(df: pl.DataFrame, schema_path: str | None, manifest_path: Path) -> None:
    """Per-row structural check against the manifest JSON schema, through snakemake.utils.validate."""
    if schema_path is None:
        return
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    # an embeddings-only cohort has no image column (build_cohort checks when one is needed): its rows' other
    # keys are checked, with a placeholder for the image the schema requires
    image = [] if "image" in df.columns else [pl.lit("-").alias("image")]
    keys = df.with_columns(image).select(KEY_COLUMNS).to_pandas()
    try:
        validate(keys, schema_path, set_default=False)
    except WorkflowError as exc:
        # WorkflowError flattens the jsonschema error into text: pick out its message and field again
        msg = re.search(r"ValidationError: (.*)", str(exc))
        field = re.search(r"On instance\['([^']+)'\]", str(exc))
        detail = msg.group(1) if msg else str(exc).splitlines()[-1]
        field = field.group(1) if field else "?"
        row = re.search(r"row (\d+)", str(exc))
        where = f"line {int(row.group(1)) + 2} (data row {int(row.group(1)) + 1})" if row else "a row"
        raise ManifestError(
            f"manifest {manifest_path}: {where} breaks the manifest schema: field '{field}': {detail}"
        ) from None


def _domain_problems(df: pl.DataFrame, attributes: dict) -> pl.Series:
    """One reason string (or null) per row for attribute values outside their declared domain."""
    reasons = []
    for name, spec in attributes.items():
        col = pl.col(name)
        kind = spec["type"]
        if kind == "categorical":
            cats = [str(c) for c in spec.get("categories") or []]
            if not cats:
                continue
            bad = col.is_not_null() & ~col.is_in(cats)
            msg = pl.format(f"attribute '{name}': '{{}}' is not one of {cats}", col)
        elif kind == "continuous":
            num = col.cast(pl.Float64, strict=False)
            lo, hi = spec.get("min", -math.inf), spec.get("max", math.inf)
            not_num = col.is_not_null() & (num.is_null() | num.is_nan())
            out = num.is_not_null() & ((num < lo) | (num > hi))
            bad = not_num | out
            msg = pl.when(not_num).then(pl.format(f"attribute '{name}': '{{}}' is not a number", col)).otherwise(
                pl.format(f"attribute '{name}': {{}} is outside [{lo}, {hi}]", col)
            )
        elif kind == "date":
            d = col.str.to_date(strict=False)
            bad_parse = col.is_not_null() & d.is_null()
            bad = bad_parse
            lo, hi = spec.get("min"), spec.get("max")
            if lo is not None:
                bad = bad | (d < pl.lit(str(lo)).str.to_date())
            if hi is not None:
                bad = bad | (d > pl.lit(str(hi)).str.to_date())
            msg = pl.when(bad_parse).then(pl.format(f"attribute '{name}': '{{}}' is not a date (YYYY-MM-DD)", col)).otherwise(
                pl.format(f"attribute '{name}': {{}} is outside [{lo}, {hi}]", col)
            )
        else:
            raise ManifestError(f"attribute '{name}': unknown type '{kind}'")
        reasons.append(pl.when(bad).then(msg).otherwise(None))
    if not reasons:
        return pl.Series("reason", [None] * df.height, dtype=pl.Utf8)
    return df.select(pl.concat_str(reasons, separator="; ", ignore_nulls=True).alias("reason")).to_series().replace("", None)


def _typed(df: pl.DataFrame, attributes: dict) -> pl.DataFrame:
    exprs = []
    for name, spec in attributes.items():
        if spec["type"] == "continuous":
            exprs.append(pl.col(name).cast(pl.Float64, strict=False))
        elif spec["type"] == "date":
            exprs.append(pl.col(name).str.to_date(strict=False))
    return df.with_columns(exprs) if exprs else df


def assign_splits(subjects: pl.DataFrame, stratify: list[str], attributes: dict, fractions: dict, seed: int) -> pl.DataFrame:
    """Subject-level train/val/test split, stratified and seeded.

    Within each stratum subjects are ranked by a seeded stable hash and cut at the cumulative fractions,
    so every stratum gets the 80/5/15 proportions and adding one subject moves at most one or two
    neighbours in its own stratum instead of reshuffling the cohort.
    """
    ids = subjects["subject_id"].to_list()
    key_parts = []
    for name in stratify:
        spec = attributes[name]
        col = subjects[name]
        if spec["type"] == "categorical":
            key_parts.append(col.cast(pl.Utf8).fill_null("NA"))
        else:
            values = col.cast(pl.Float64) if spec["type"] == "continuous" else col.cast(pl.Int64)
            n_bins = int(spec.get("strata_bins", 4))
            arr = values.to_numpy().astype(float)
            ok = ~np.isnan(arr)
            edges = np.unique(np.quantile(arr[ok], np.linspace(0, 1, n_bins + 1)[1:-1])) if ok.any() else []
            bins = np.where(ok, np.searchsorted(edges, arr, side="right"), -1)
            key_parts.append(pl.Series(bins.astype(str)))
    frame = pl.DataFrame({"subject_id": ids, "u": stable_unit_hash(ids, seed)})
    frame = frame.with_columns(
        (pl.concat_str(key_parts, separator="|") if key_parts else pl.lit("all")).alias("stratum")
    )
    cuts = np.cumsum([fractions[s] for s in SPLITS])
    cuts = cuts / cuts[-1]
    frame = frame.with_columns(
        ((pl.col("u").rank("ordinal").over("stratum") - 0.5) / pl.len().over("stratum")).alias("pos")
    )
    split = pl.when(pl.col("pos") < cuts[0]).then(pl.lit("train"))
    split = split.when(pl.col("pos") < cuts[1]).then(pl.lit("val")).otherwise(pl.lit("test"))
    return frame.with_columns(split.alias("split")).select("subject_id", "split", "stratum").sort("subject_id")


def build_cohort(
    manifest_path: str | os.PathLike,
    *,
    attributes: dict,
    regions: dict,
    split: dict,
    subjects_per_shard: int,
    image_root: str | None = None,
    manifest_schema: str | None = None,
    image_models: list[str] | None = None,
) -> CohortTables:
    """A manifest without an image column is an embeddings-only cohort (every model imported, `embed.imported`):
    `image` and `path` are null and no file is checked. `image_models`, the configured models that read images,
    turns a missing image column into an error naming them (the workflow checks that before any job instead:
    `cohortlens.config.image_problems`)."""
    manifest_path = Path(manifest_path)
    df = read_manifest(manifest_path)
    reads_images = "image" in df.columns or bool(image_models)
    required = KEY_COLUMNS if reads_images else tuple(c for c in KEY_COLUMNS if c != "image")
    missing = [c for c in (*required, *attributes) if c not in df.columns]
    if missing:
        why = f" (models {', '.join(image_models)} read images)" if image_models and "image" in missing else ""
        raise ManifestError(
            f"manifest {manifest_path}: missing column(s) {missing}; it has {df.columns}{why}. "
            "Every attribute declared in config 'attributes' needs a column."
        )
    _validate_rows(df, manifest_schema, manifest_path)
    if "image" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.Utf8).alias("image"))
    n_rows = df.height
    df = df.with_row_index("manifest_line", offset=2).with_columns(pl.col("manifest_line").cast(pl.Int64))
    uid = pl.col("image_id") if "image_id" in df.columns else pl.concat_str(["subject_id", "region"], separator="/")
    root = Path(image_root) if image_root else manifest_path.parent
    df = df.with_columns(
        uid.alias("image_uid"),
        pl.col("image").map_elements(lambda p: os.path.normpath(os.path.join(root, p)), return_dtype=pl.Utf8,
                                     skip_nulls=True).alias("path"),
    )

    reasons = [
        pl.when(~pl.col("region").is_in(list(regions))).then(
            pl.format(f"region '{{}}' is not declared in config regions {list(regions)}", "region")
        ),
    ]
    dup_lines = pl.col("manifest_line").cast(pl.Utf8).str.join(", ").over("image_uid")
    reasons.append(
        pl.when(pl.len().over("image_uid") > 1).then(
            pl.format("duplicate image key '{}' (manifest lines {})", "image_uid", dup_lines)
        )
    )
    df = df.with_columns(_domain_problems(df, attributes).alias("_domain"))
    df = df.with_columns(pl.concat_str([*reasons, pl.col("_domain")], separator="; ", ignore_nulls=True).alias("reason"))
    df = df.with_columns(pl.col("reason").replace("", None))

    # Subject-level attributes must agree across a subject's rows; otherwise which one is true is unknown.
    subject_attrs = [a for a, s in attributes.items() if s.get("level", "subject") == "subject"]
    conflict_exprs = [
        pl.when(pl.col(a).drop_nulls().n_unique().over("subject_id") > 1).then(
            pl.lit(f"conflicting values of subject attribute '{a}' across the subject's rows")
        )
        for a in subject_attrs
    ]
    if conflict_exprs:
        df = df.with_columns(
            pl.concat_str([pl.col("reason"), *conflict_exprs], separator="; ", ignore_nulls=True).replace("", None).alias("reason")
        )
    # File existence last: it is the only check that touches the file system (and only of images a model reads).
    exists = [not reads_images or os.path.exists(p) for p in df["path"].to_list()]
    df = df.with_columns(
        pl.when(pl.Series(exists)).then(pl.col("reason")).otherwise(
            pl.concat_str([pl.col("reason"), pl.lit("missing file")], separator="; ", ignore_nulls=True)
        ).alias("reason")
    )

    bad = df.filter(pl.col("reason").is_not_null())
    quarantine = bad.select(
        pl.lit("cohort").alias("stage"), "manifest_line", "image_uid", "subject_id", "region", "image", "reason"
    ).cast(QUARANTINE_SCHEMA)
    good = _typed(df.filter(pl.col("reason").is_null()), attributes)

    subjects = good.group_by("subject_id").agg(
        *[pl.col(a).drop_nulls().first() for a in subject_attrs],
        pl.len().alias("n_images"),
    ).sort("subject_id")
    n_shards = shard_count(subjects.height, subjects_per_shard)
    subjects = subjects.with_columns(pl.Series("shard", assign_shards(subjects["subject_id"].to_list(), n_shards)))
    stratify = list(split.get("stratify", []))
    unknown = [a for a in stratify if a not in attributes]
    if unknown:
        raise ManifestError(f"config cohort.split.stratify names undeclared attribute(s) {unknown}")
    strata = subjects
    per_image = [a for a in stratify if a not in subject_attrs]
    if per_image:
        # an image-level attribute (e.g. CheXpert age per study) stratifies by its per-subject summary
        summary = good.group_by("subject_id").agg(
            pl.col(a).mean() if attributes[a]["type"] == "continuous" else pl.col(a).drop_nulls().min()
            for a in per_image
        )
        strata = subjects.join(summary, on="subject_id", how="left")
    splits = assign_splits(
        strata, stratify, attributes, split.get("fractions", {"train": 0.8, "val": 0.05, "test": 0.15}), int(split.get("seed", 0))
    )
    image_attrs = [a for a in attributes if a not in subject_attrs]
    images = good.join(subjects.select("subject_id", "shard"), on="subject_id").select(
        "image_uid", "subject_id", "region", "image", "path", "manifest_line", "shard", *image_attrs
    ).sort("shard", "subject_id", "region", "image_uid")
    return CohortTables(subjects=subjects, images=images, splits=splits, quarantine=quarantine, n_manifest_rows=n_rows)

"""The analysis table: one model's embeddings with the declared attributes and the split joined (`AnalysisTable`,
`load_analysis_table`), and what it is built from: attribute declarations (`AttributeSpec`), embeddings as
(key frame, float32 matrix), attribute and split joins.

The embedding parquet carries keys and vectors only; attributes live in the cohort tables and are joined here,
so every analysis stage sees the same typed attribute columns and the same subject-level split.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cohortlens.io.tables import read_parquet_metadata
from cohortlens.types import PathLike

# Dates are regressed and coloured as days since this day, so an MAE reads in days.
DATE_EPOCH = _dt.date(1970, 1, 1)


@dataclass(frozen=True)
class AttributeSpec:
    """One declared attribute (config `attributes:`), as every analysis stage needs it."""

    name: str
    type: str  # categorical | continuous | date
    role: str  # protected | acquisition | target
    level: str = "subject"  # subject | image
    categories: tuple[str, ...] | None = None

    @property
    def is_categorical(self) -> bool:
        return self.type == "categorical"

    @property
    def kind(self) -> str:
        """The probe task this attribute asks for."""
        return "classification" if self.is_categorical else "regression"

    @classmethod
    def from_config(cls, name: str, spec: Mapping) -> "AttributeSpec":
        cats = spec.get("categories")
        return cls(
            name=name,
            type=str(spec.get("type", "categorical")),
            role=str(spec.get("role", "protected")),
            level=str(spec.get("level", "subject")),
            categories=tuple(str(c) for c in cats) if cats else None,
        )


# The region a volume belongs to is itself probed across regions (does the embedding know the body part?).
REGION_SPEC = AttributeSpec(name="region", type="categorical", role="acquisition", level="image")


def attribute_specs(source: PathLike | Mapping) -> dict[str, AttributeSpec]:
    """Attribute declarations from a config `attributes:` mapping or from subjects.parquet's metadata."""
    if isinstance(source, Mapping):
        raw = source
    else:
        raw = read_parquet_metadata(source).get("attributes")
        if raw is None:
            raise ValueError(f"{source}: no 'attributes' in the Parquet metadata (is it a cohort subjects.parquet?)")
    return {name: AttributeSpec.from_config(name, spec or {}) for name, spec in raw.items()}


def _embedding_to_numpy(column: pa.ChunkedArray | pa.Array, out: np.ndarray, start: int) -> int:
    """Copy fixed_size_list<float32> chunks into `out` from row `start`; returns the next free row."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        n = len(chunk)
        if n == 0:
            continue
        if chunk.null_count:
            raise ValueError("embedding column has null vectors")
        values = chunk.values.slice(chunk.offset * chunk.type.list_size, n * chunk.type.list_size)
        out[start : start + n] = values.to_numpy(zero_copy_only=False).reshape(n, chunk.type.list_size)
        start += n
    return start


def load_embeddings(
    path: PathLike,
    region: str | Iterable[str] | None = None,
    *,
    center_only: bool = False,
    batch_rows: int = 16_384,
) -> tuple[pl.DataFrame, np.ndarray]:
    """Read a volumes/slices parquet into (key frame, float32 matrix), optionally one region (or several).

    Streams record batches into one preallocated matrix: peak memory is the matrix plus one batch, not the
    Arrow table and a copy of it (300k × 512 vectors are 600 MB already).
    """
    pfile = pq.ParquetFile(path)
    schema = pfile.schema_arrow
    emb_type = schema.field("embedding").type
    dim = emb_type.list_size
    keys = [c for c in schema.names if c != "embedding"]

    regions = [region] if isinstance(region, str) else (list(region) if region is not None else None)
    # Select rows with the cheap key columns first, so the matrix can be allocated at its final size.
    key_table = pfile.read(columns=keys)
    mask = None
    if regions is not None:
        mask = pc.is_in(key_table["region"], value_set=pa.array(regions, pa.string()))
    if center_only and "is_center" in keys:
        centre = key_table["is_center"]
        mask = centre if mask is None else pc.and_(mask, centre)
    if mask is not None:
        mask = mask.combine_chunks() if isinstance(mask, pa.ChunkedArray) else mask
        mask = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
        key_table = key_table.filter(pa.array(mask))
    n = key_table.num_rows

    X = np.empty((n, dim), dtype=np.float32)
    row = 0
    offset = 0
    for batch in pfile.iter_batches(batch_size=batch_rows, columns=["embedding"]):
        column = batch.column(0)
        if mask is not None:
            keep = mask[offset : offset + batch.num_rows]
            offset += batch.num_rows
            if not keep.any():
                continue
            column = column.filter(pa.array(keep))
        row = _embedding_to_numpy(column, X, row)
    assert row == n, (row, n)
    return pl.from_arrow(key_table), X


def embedding_metadata(path: PathLike) -> dict:
    """The embedding file's key-value metadata (model, dim, level, config_hash, …)."""
    return read_parquet_metadata(path)


def join_attributes(
    frame: pl.DataFrame,
    subjects: PathLike | pl.DataFrame,
    images: PathLike | pl.DataFrame | None = None,
    specs: Mapping[str, AttributeSpec] | None = None,
) -> pl.DataFrame:
    """Add every declared attribute column to a key frame (row order kept): subject-level ones from
    subjects.parquet on subject_id, image-level ones from images.parquet on image_uid."""
    if specs is None:
        if not isinstance(subjects, pl.DataFrame):
            specs = attribute_specs(subjects)
        else:
            raise ValueError("specs are needed when subjects is a DataFrame")
    subj = subjects if isinstance(subjects, pl.DataFrame) else pl.read_parquet(subjects)
    subject_cols = [a for a, s in specs.items() if s.level == "subject" and a in subj.columns and a not in frame.columns]
    out = frame.with_row_index("_row")
    if subject_cols:
        out = out.join(subj.select("subject_id", *subject_cols), on="subject_id", how="left")
    image_cols = [a for a, s in specs.items() if s.level == "image" and a not in out.columns]
    if image_cols:
        if images is None:
            raise ValueError(f"image-level attributes {image_cols} need images.parquet")
        imgs = images if isinstance(images, pl.DataFrame) else pl.read_parquet(images)
        present = [a for a in image_cols if a in imgs.columns]
        if present:
            out = out.join(imgs.select("image_uid", *present), on="image_uid", how="left")
    return out.sort("_row").drop("_row")


def join_splits(frame: pl.DataFrame, splits: PathLike | pl.DataFrame) -> pl.DataFrame:
    """Add the subject-level `split` column (train/val/test; null for subjects without one)."""
    sp = splits if isinstance(splits, pl.DataFrame) else pl.read_parquet(splits, columns=["subject_id", "split"])
    out = frame.with_row_index("_row").join(sp.select("subject_id", "split"), on="subject_id", how="left")
    return out.sort("_row").drop("_row")


def attribute_values(frame: pl.DataFrame, spec: AttributeSpec) -> np.ndarray:
    """An attribute as the analysis needs it: object array of strings (None where missing) for categorical,
    float64 (NaN where missing) for continuous, days since 1970-01-01 for dates."""
    col = frame[spec.name]
    if spec.is_categorical:
        return np.asarray(col.cast(pl.Utf8).to_list(), dtype=object)
    if spec.type == "date" or col.dtype in (pl.Date, pl.Datetime):
        days = col.cast(pl.Date).cast(pl.Int32) if col.dtype != pl.Utf8 else col.str.to_date().cast(pl.Int32)
        return days.cast(pl.Float64).fill_null(np.nan).to_numpy()
    return col.cast(pl.Float64).fill_null(np.nan).to_numpy()


def present(values: np.ndarray) -> np.ndarray:
    """Mask of rows where an attribute value is recorded."""
    if values.dtype == object:
        return np.array([v is not None for v in values], dtype=bool)
    return np.isfinite(values)


@dataclass
class AnalysisTable:
    """Embeddings of one model (one region or all) with attributes and split joined, row-aligned with X."""

    frame: pl.DataFrame
    X: np.ndarray
    specs: dict[str, AttributeSpec]
    model: str | None = None

    def values(self, attribute: str) -> np.ndarray:
        spec = REGION_SPEC if attribute == "region" else self.specs[attribute]
        return attribute_values(self.frame, spec)

    def spec(self, attribute: str) -> AttributeSpec:
        return REGION_SPEC if attribute == "region" else self.specs[attribute]

    def split_mask(self, split: str) -> np.ndarray:
        return (self.frame["split"] == split).fill_null(False).to_numpy()


def load_analysis_table(
    embeddings: PathLike,
    subjects: PathLike,
    splits: PathLike | None = None,
    images: PathLike | None = None,
    region: str | Iterable[str] | None = None,
    *,
    attributes: Mapping | None = None,
    center_only: bool = False,
) -> AnalysisTable:
    """The one call a stage script needs: embeddings + attributes (+ split), model name from the metadata.

    `attributes` (a config `attributes:` mapping) overrides the declarations stored in subjects.parquet.
    """
    specs = attribute_specs(attributes if attributes is not None else subjects)
    frame, X = load_embeddings(embeddings, region, center_only=center_only)
    needs_images = images is not None and any(s.level == "image" for s in specs.values())
    frame = join_attributes(frame, subjects, images if needs_images else None,
                            {a: s for a, s in specs.items() if s.level == "subject" or needs_images})
    if splits is not None:
        frame = join_splits(frame, splits)
    model = embedding_metadata(embeddings).get("model")
    if model is None:
        model = Path(embeddings).parent.name
    return AnalysisTable(frame=frame, X=X, specs=specs, model=model)


def regions_of(path: PathLike) -> list[str]:
    """The regions present in an embedding parquet, sorted."""
    return sorted(pl.read_parquet(path, columns=["region"])["region"].unique().to_list())

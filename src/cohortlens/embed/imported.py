"""Embeddings computed elsewhere as a model of the workflow (paper 002: 1408-d CT foundation vectors).

A model `models: {<name>: {embeddings: <file>, format?, ids?}}` has no training and no embed job: its file is read,
every row is checked against the cohort, and the rows that pass are written as
`results/embeddings/{name}/volumes.parquet` in the embedding contract (`embed.parquet`: image_uid, subject_id,
region, embedding fixed_size_list<float32>[d]; image_uid is the cohort's for the row's subject and region), so
project, probe, fairness, discover and mitigate read it like any other model's. No slices.parquet: an imported
vector is one per (subject, region) and no stage reads slice vectors.

Files (`format` defaults to the extension, `EXTENSIONS`):
- parquet: `subject_id`, `region`, `embedding` (a list or fixed-size list of numbers, any length);
- csv: `subject_id`, `region` and either an `embedding` column of numbers (separated by commas, semicolons or
  spaces; brackets allowed) or one column per dimension (every other column, in file order);
- npy: a 2-D array (n, d); row i belongs to row i of `ids` (CSV, TSV or Parquet with `subject_id`, `region`).

Bad rows are quarantined, never fatal, into `quarantine.parquet` (`row`: the 0-based row of the file or array,
subject_id, region, reason; several reasons of one row joined by "; "; no reason names an id): a missing key, a
subject the cohort does not have (not in the manifest, or quarantined by the cohort stage), no cohort image of that
subject in that region or several (an image_id manifest), a missing or empty embedding, a wrong dimension, NaN /
inf / empty values, a duplicate (subject_id, region) (all of its rows: which one is right is unknown). The dimension is the most common vector length among
the rows with a vector (ties: the length met first); a row of another length has the wrong dimension. Counts
reconcile: rows in = rows written + rows quarantined (the volumes' metadata `rows_in`, `rows_out`, `quarantined`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cohortlens.embed.parquet import VOLUME_KEYS, EmbeddingWriter, config_hash
from cohortlens.io.tables import read_manifest, write_parquet

FORMATS = ("parquet", "csv", "npy")
EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".npy": "npy"}
QUARANTINE_SCHEMA = {"row": pl.Int64, "subject_id": pl.Utf8, "region": pl.Utf8, "reason": pl.Utf8}
DIMENSION_RULE = "the most common vector length; ties: the length met first"
KEYS = ("subject_id", "region")
BATCH_ROWS = 4096


@dataclass
class RawEmbeddings:
    """A file's rows: keys (row, subject_id, region) and ragged vectors as flat float32 values + offsets."""

    keys: pl.DataFrame
    values: np.ndarray  # float32, every row's values one after the other
    offsets: np.ndarray  # int64, n + 1: row i is values[offsets[i]:offsets[i + 1]]
    missing: np.ndarray  # bool, n: no vector at all (null)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def non_finite(self) -> np.ndarray:
        """NaN / inf (and null elements, read as NaN) per row, counted on the float32 values."""
        bad = np.concatenate([[0], np.cumsum(~np.isfinite(self.values), dtype=np.int64)])
        return bad[self.offsets[1:]] - bad[self.offsets[:-1]]

    def matrix(self, rows: np.ndarray, dim: int) -> np.ndarray:
        """(len(rows), dim) float32 of rows that all have `dim` values."""
        idx = self.offsets[rows][:, None] + np.arange(dim)[None, :]
        return self.values[idx]


def embedding_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"embeddings format {fmt!r} is not one of {FORMATS}")
        return fmt
    ext = Path(path).suffix.lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"embeddings {path}: cannot tell the format from '{ext}'; set format ({', '.join(FORMATS)})")
    return EXTENSIONS[ext]


def _float32(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # a value beyond float32's range becomes inf: quarantined
        return np.ascontiguousarray(values, dtype=np.float32)


def _keys(frame: pl.DataFrame, source) -> pl.DataFrame:
    missing = [k for k in KEYS if k not in frame.columns]
    if missing:
        raise ValueError(f"embeddings {source}: missing column(s) {missing}; it has {frame.columns}")
    return frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("row"),
                        *[pl.col(k).cast(pl.Utf8).str.strip_chars().replace("", None) for k in KEYS])


def _from_list_array(column: pa.ChunkedArray | pa.Array, source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)):
        raise ValueError(f"embeddings {source}: column 'embedding' is {arr.type}, not a list of numbers")
    try:
        arr = arr.cast(pa.large_list(pa.float64()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"embeddings {source}: column 'embedding' is {arr.type}, not a list of numbers ({exc})") from None
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    missing = arr.is_null().to_numpy(zero_copy_only=False).astype(bool)
    values = arr.flatten().to_numpy(zero_copy_only=False)  # null elements come back as NaN
    return _float32(values), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), missing


def read_parquet_embeddings(path) -> RawEmbeddings:
    table = pq.read_table(path)
    if "embedding" not in table.column_names:
        raise ValueError(f"embeddings {path}: no 'embedding' column; it has {table.column_names}")
    keys = _keys(pl.from_arrow(table.select([c for c in KEYS if c in table.column_names])), path)
    return RawEmbeddings(keys, *_from_list_array(table["embedding"], path))


def read_csv_embeddings(path) -> RawEmbeddings:
    frame = pl.read_csv(path, infer_schema=False)
    keys = _keys(frame, path)
    if "embedding" in frame.columns:
        text = frame["embedding"].str.replace_all(r"[\[\]()]", " ").str.replace_all(r"[,;\s]+", " ").str.strip_chars()
        lists = text.replace("", None).str.split(" ").cast(pl.List(pl.Float64), strict=False)
        return RawEmbeddings(keys, *_from_list_array(lists.to_arrow(), path))
    dims = [c for c in frame.columns if c not in KEYS]
    if not dims:
        raise ValueError(f"embeddings {path}: neither an 'embedding' column nor dimension columns")
    wide = frame.select(pl.col(dims).str.strip_chars().cast(pl.Float64, strict=False))
    matrix = wide.to_numpy().astype(np.float64)
    missing = np.isnan(matrix).all(axis=1)  # every cell empty: no vector
    lengths = np.where(missing, 0, len(dims))
    return RawEmbeddings(keys, _float32(matrix[~missing].reshape(-1)),
                         np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), missing)


def read_npy_embeddings(path, ids) -> RawEmbeddings:
    if ids is None:
        raise ValueError(f"embeddings {path}: a .npy array has no subject ids; set ids (a CSV or Parquet file)")
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"embeddings {path}: a 2-D numeric array is needed, not {array.dtype} {array.shape}")
    keys = _keys(read_manifest(ids), ids)
    if keys.height != array.shape[0]:
        raise ValueError(f"embeddings {path}: {array.shape[0]} rows but {keys.height} ids in {ids}")
    n, dim = array.shape
    return RawEmbeddings(keys, _float32(array).reshape(-1), np.arange(n + 1, dtype=np.int64) * dim,
                         np.zeros(n, dtype=bool))


def read_embeddings(path, fmt: str | None = None, ids=None) -> RawEmbeddings:
    fmt = embedding_format(path, fmt)
    if not Path(path).is_file():
        raise ValueError(f"embeddings {path}: file not found")
    if fmt == "npy":
        return read_npy_embeddings(path, ids)
    return read_parquet_embeddings(path) if fmt == "parquet" else read_csv_embeddings(path)


def common_dimension(lengths: np.ndarray) -> int | None:
    """The most common positive length; ties go to the length met first. None: no row has a vector."""
    present = lengths[lengths > 0]
    if present.size == 0:
        return None
    values, first, counts = np.unique(present, return_index=True, return_counts=True)
    best = counts == counts.max()
    return int(values[best][np.argmin(first[best])])


def check_rows(raw: RawEmbeddings, images: pl.DataFrame) -> tuple[pl.DataFrame, int | None]:
    """(raw.keys + image_uid + reason (null: the row is good), dimension) against the cohort's images table
    (image_uid, subject_id, region)."""
    dim = common_dimension(np.where(raw.missing, 0, raw.lengths))
    per_key = images.group_by(KEYS).agg(pl.col("image_uid").first(), pl.len().alias("_n_images"))
    subjects = images["subject_id"].unique()
    frame = raw.keys.with_columns(
        pl.Series("_length", raw.lengths), pl.Series("_missing", raw.missing), pl.Series("_bad", raw.non_finite())
    ).join(per_key, on=list(KEYS), how="left")
    sid = pl.col("subject_id")
    no_key = sid.is_null() | pl.col("region").is_null()
    lines = pl.col("row").cast(pl.Utf8).str.join(", ").over(KEYS)
    reasons = [
        pl.when(no_key).then(pl.lit("missing subject_id or region")),
        # the reasons name no id (the row's subject_id column does): the publication report shows their kinds
        pl.when(~no_key & ~sid.is_in(subjects.implode())).then(
            pl.lit("unknown subject (not in the cohort: absent from the manifest or quarantined)")),
        pl.when(~no_key & sid.is_in(subjects.implode()) & pl.col("_n_images").is_null()).then(
            pl.lit("no cohort image of the subject in the region")),
        pl.when(pl.col("_n_images") > 1).then(pl.format(
            "the subject has {} images in the region (manifest image_id): the vector matches none",
            pl.col("_n_images"))),
        pl.when(pl.col("_missing") | (pl.col("_length") == 0)).then(pl.lit("missing embedding")),
        pl.when(~pl.col("_missing") & (pl.col("_length") > 0) & (pl.col("_length") != (dim or 0))).then(
            pl.format(f"wrong dimension: {{}} values, the file's dimension is {dim} ({DIMENSION_RULE})",
                      pl.col("_length"))),
        pl.when(pl.col("_bad") > 0).then(pl.format("NaN/inf/empty values: {} of {}", pl.col("_bad"), pl.col("_length"))),
        pl.when(~no_key & (pl.len().over(KEYS) > 1)).then(
            pl.format("duplicate (subject_id, region): rows {}", lines)),
    ]
    frame = frame.with_columns(pl.concat_str(reasons, separator="; ", ignore_nulls=True).replace("", None).alias("reason"))
    return frame.select("row", *KEYS, "image_uid", "reason").sort("row"), dim


def import_embeddings(source, images: pl.DataFrame | str | os.PathLike, *, model: str, volumes_path,
                      quarantine_path, fmt: str | None = None, ids=None, cfg: dict | None = None) -> dict:
    """Check an external embedding file against the cohort's images table and write the model's volumes.parquet
    (the good rows, in image_uid order) and quarantine.parquet. Returns the counts (rows_in = rows_out +
    quarantined) and the dimension; a file without a single good row is an error (nothing downstream could run)."""
    if not isinstance(images, pl.DataFrame):
        images = pl.read_parquet(images, columns=["image_uid", *KEYS])
    raw = read_embeddings(source, fmt, ids)
    checked, dim = check_rows(raw, images)
    good = checked.filter(pl.col("reason").is_null()).sort("image_uid")
    quarantine = checked.filter(pl.col("reason").is_not_null()).select(list(QUARANTINE_SCHEMA)).cast(QUARANTINE_SCHEMA)
    counts = {"rows_in": raw.keys.height, "rows_out": good.height, "quarantined": quarantine.height}
    assert counts["rows_in"] == counts["rows_out"] + counts["quarantined"], counts
    if good.height == 0:
        top = quarantine.group_by("reason").len().sort("len", descending=True).head(5)
        raise ValueError(f"embeddings {source}: none of its {raw.keys.height} rows can be used; most common "
                         f"reasons: {dict(zip(top['reason'].to_list(), top['len'].to_list()))}")
    meta = {"model": model, "dim": dim, "level": "volume", "config_hash": config_hash(cfg or {}),
            "normalisation": None, "source": str(source), "format": embedding_format(source, fmt),
            "dimension_rule": DIMENSION_RULE, **counts}
    rows = good["row"].to_numpy()
    with EmbeddingWriter(volumes_path, VOLUME_KEYS, dim, meta) as writer:
        for start in range(0, good.height, BATCH_ROWS):
            writer.write(good.slice(start, BATCH_ROWS), raw.matrix(rows[start:start + BATCH_ROWS], dim))
    write_parquet(quarantine, quarantine_path, {"model": model, "source": str(source), **counts})
    return {**counts, "dim": dim}

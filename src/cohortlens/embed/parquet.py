"""The embedding contract: slices.parquet and volumes.parquet with a fixed_size_list<float32>[d] column.

Written in batches through one ParquetWriter per file (peak memory independent of cohort size) into a
temporary file that replaces the target only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from cohortlens.io.tables import atomic_path

SLICE_KEYS = {"slice_uid": pa.string(), "image_uid": pa.string(), "subject_id": pa.string(), "region": pa.string(),
              "slice_position": pa.int64(), "is_center": pa.bool_()}
VOLUME_KEYS = {"image_uid": pa.string(), "subject_id": pa.string(), "region": pa.string()}


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def embedding_schema(keys: dict, dim: int, metadata: dict) -> pa.Schema:
    fields = [pa.field(k, t) for k, t in keys.items()]
    fields.append(pa.field("embedding", pa.list_(pa.float32(), dim)))
    return pa.schema(fields, metadata={k: json.dumps(v) for k, v in metadata.items()})


def _table(keys: dict, frame: pl.DataFrame, vectors: np.ndarray, schema: pa.Schema) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    emb = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    cols = [pa.array(frame[k].to_list(), type=t) for k, t in keys.items()]
    return pa.Table.from_arrays([*cols, emb], schema=schema)


class EmbeddingWriter:
    def __init__(self, path: str | os.PathLike, keys: dict, dim: int, metadata: dict):
        self.keys = keys
        self.schema = embedding_schema(keys, dim, metadata)
        self._ctx = atomic_path(path, ".parquet")
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, self.schema)
        self.n = 0

    def write(self, frame: pl.DataFrame, vectors: np.ndarray) -> None:
        if frame.height:
            self._writer.write_table(_table(self.keys, frame, vectors, self.schema))
            self.n += frame.height

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._writer.close()
        self._ctx.__exit__(exc_type, exc, tb)
        return False


def write_embeddings(
    index: pl.DataFrame,
    read_batch: Callable[[pl.DataFrame], np.ndarray],
    encode: Callable[[np.ndarray], np.ndarray],
    dim: int,
    slices_path: str | os.PathLike,
    volumes_path: str | os.PathLike,
    metadata: dict,
    batch_images: int = 64,
    observe: Callable[[pl.DataFrame, np.ndarray], None] | None = None,
) -> dict:
    """Embed every slice and build one vector per image from its center slices in slice order.

    Batches are whole images so each volume vector is assembled from slices already in memory. One thread reads
    the next batch while this one is encoded and written (two batches in memory at most). `observe(rows, vectors)`
    sees every encoded batch (the train z-score's statistics).
    """
    index = index.sort("image_uid", "slice_position")
    # index is sorted by image: each image is a contiguous run of rows, so batches are plain slices
    run_ends = index.group_by("image_uid", maintain_order=True).len()["len"].cum_sum().to_list()
    run_starts = [0, *run_ends[:-1]]
    n_center = index.filter(pl.col("is_center")).group_by("image_uid").len()["len"].unique().to_list()
    if len(n_center) > 1:
        # regions with different center_slices settings give volume vectors of different lengths
        raise ValueError(f"center slice counts differ between images: {sorted(n_center)}")
    n_center = n_center[0] if n_center else 0
    meta_s = {**metadata, "dim": dim, "level": "slice"}
    meta_v = {**metadata, "dim": dim * n_center, "level": "volume", "center_slices": n_center}
    with EmbeddingWriter(slices_path, SLICE_KEYS, dim, meta_s) as ws, EmbeddingWriter(
        volumes_path, VOLUME_KEYS, dim * n_center, meta_v
    ) as wv:
        parts = [index.slice(run_starts[s], run_ends[min(s + batch_images, len(run_ends)) - 1] - run_starts[s])
                 for s in range(0, len(run_ends), batch_images)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as reader:
            ahead = reader.submit(read_batch, parts[0]) if parts else None
            for k, part in enumerate(parts):
                slices = ahead.result()
                ahead = reader.submit(read_batch, parts[k + 1]) if k + 1 < len(parts) else None
                vectors = encode(slices)
                del slices
                _write_batch(ws, wv, part, vectors, dim, n_center)
                if observe is not None:
                    observe(part, vectors)
    return {"n_slices": ws.n, "n_volumes": wv.n, "dim": dim, "volume_dim": dim * n_center}


def _write_batch(ws: EmbeddingWriter, wv: EmbeddingWriter, part: pl.DataFrame, vectors: np.ndarray, dim: int,
                 n_center: int) -> None:
    """The batch's slice vectors, and one volume vector per image: its center slices' vectors in slice order."""
    ws.write(part, vectors)
    centre = part.with_row_index("_i").filter(pl.col("is_center"))
    vols = centre.group_by("image_uid", maintain_order=True).agg(
        pl.col("subject_id").first(), pl.col("region").first(), pl.col("_i")
    )
    stacked = (np.stack([vectors[np.asarray(ix)].reshape(-1) for ix in vols["_i"].to_list()]) if vols.height
               else np.empty((0, dim * n_center), np.float32))
    wv.write(vols, stacked)

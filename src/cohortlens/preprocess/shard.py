"""The preprocess stage for one shard: images -> float16 slice shard + index + quarantine rows."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl

from cohortlens.cohort.build import QUARANTINE_SCHEMA
from cohortlens.io.image import ImageReadError
from cohortlens.io.npyshard import NpyShardWriter
from cohortlens.io.readers import read_image
from cohortlens.io.tables import write_parquet
from cohortlens.preprocess.slices import SliceError, center_indices, intensity_max, normalise_, slice_stack, to_canvas

INDEX_SCHEMA = {
    "slice_uid": pl.Utf8,
    "image_uid": pl.Utf8,
    "subject_id": pl.Utf8,
    "region": pl.Utf8,
    "shard": pl.Int64,
    "row": pl.Int64,
    "slice_position": pl.Int64,
    "is_center": pl.Boolean,
}


@dataclass
class ShardResult:
    n_images: int
    n_slices: int
    n_quarantined: int


def prepare_image(path: str, region_cfg: dict, preprocess_cfg: dict) -> np.ndarray:
    """Read one image and return its normalised slices on the canvas (float16, [-1, 1])."""
    loaded = read_image(path, spacing_tolerance=float(preprocess_cfg.get("spacing_tolerance", 0.05)))
    stack = slice_stack(loaded.array, loaded.affine, region_cfg.get("slice_axis", "auto"))
    n_center = int(region_cfg.get("center_slices", 12))
    if stack.shape[0] < n_center:
        raise SliceError(f"too few slices: {stack.shape[0]} < center_slices {n_center}")
    # the reader's array is ours: normalise it in place, then the view shares the new values
    array = loaded.array if loaded.array.dtype == np.float32 else loaded.array.astype(np.float32)
    normalise_(array, *intensity_max(array, preprocess_cfg.get("intensity_max", "max")))
    if array is not loaded.array:
        stack = slice_stack(array, loaded.affine, region_cfg.get("slice_axis", "auto"))
    return to_canvas(stack, tuple(preprocess_cfg["canvas"]))


def _safe_prepare(args):
    path, region_cfg, preprocess_cfg = args
    try:
        return prepare_image(path, region_cfg, preprocess_cfg), None
    except (ImageReadError, SliceError) as exc:
        return None, str(exc)
    except MemoryError:
        raise
    except Exception as exc:  # a reader bug on one odd file must not lose the other images of the shard
        return None, f"unexpected error reading image: {type(exc).__name__}: {exc}"


def _prepared(jobs: list, threads: int):
    """Results in job order. With threads > 1 a bounded look-ahead of reads runs in a pool (gzip and
    numpy release the GIL); with one thread it runs inline, without a pool's hand-off per image."""
    if threads <= 1:
        yield from map(_safe_prepare, jobs)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending = []
        for job in jobs:
            pending.append(pool.submit(_safe_prepare, job))
            if len(pending) > 2 * threads:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def preprocess_shard(
    images: pl.DataFrame,
    shard: int,
    *,
    regions: dict,
    preprocess: dict,
    out_slices: str | os.PathLike,
    out_index: str | os.PathLike,
    out_quarantine: str | os.PathLike,
    threads: int = 1,
) -> ShardResult:
    """Preprocess every image of one shard. Counts reconcile: images = images with slices + quarantined.

    Row numbers are deterministic whatever the thread count, and only a few decoded volumes are held
    in memory at once.
    """
    rows = images.filter(pl.col("shard") == shard).sort("subject_id", "region", "image_uid")
    canvas = tuple(int(c) for c in preprocess["canvas"])
    kept: list[tuple[dict, int, int]] = []  # (row, first shard row, n slices)
    quarantine: list[dict] = []
    jobs = [(p, regions[r], preprocess) for p, r in zip(rows["path"], rows["region"])]
    with NpyShardWriter(out_slices, canvas) as writer:
        for rec, (stack, reason) in zip(rows.iter_rows(named=True), _prepared(jobs, max(1, threads))):
            if stack is None:
                quarantine.append({"stage": "preprocess", **{k: rec[k] for k in QUARANTINE_SCHEMA if k in rec}, "reason": reason})
            else:
                kept.append((rec, writer.append(stack), stack.shape[0]))
    index = _index_frame(kept, shard, regions)
    write_parquet(index, out_index)
    write_parquet(pl.DataFrame(quarantine, schema=QUARANTINE_SCHEMA), out_quarantine)
    return ShardResult(n_images=rows.height, n_slices=index.height, n_quarantined=len(quarantine))


def _index_frame(kept: list[tuple[dict, int, int]], shard: int, regions: dict) -> pl.DataFrame:
    if not kept:
        return pl.DataFrame(schema=INDEX_SCHEMA)
    counts = [n for _, _, n in kept]
    positions = np.concatenate([np.arange(n) for n in counts])
    starts = [center_indices(n, int(regions[rec["region"]].get("center_slices", 12))).start for rec, _, n in kept]
    n_center = [int(regions[rec["region"]].get("center_slices", 12)) for rec, _, _ in kept]
    start_rep = np.repeat(starts, counts)
    frame = pl.DataFrame(
        {
            "image_uid": np.repeat([r["image_uid"] for r, _, _ in kept], counts),
            "subject_id": np.repeat([r["subject_id"] for r, _, _ in kept], counts),
            "region": np.repeat([r["region"] for r, _, _ in kept], counts),
            "shard": np.full(positions.size, shard, dtype=np.int64),
            "row": np.concatenate([np.arange(first, first + n) for _, first, n in kept]),
            "slice_position": positions,
            "is_center": (positions >= start_rep) & (positions < start_rep + np.repeat(n_center, counts)),
        }
    )
    frame = frame.with_columns(pl.format("{}/{}", "image_uid", "slice_position").alias("slice_uid"))
    return frame.select(list(INDEX_SCHEMA)).cast(INDEX_SCHEMA)


def merge_shard_tables(paths: list[str], schema: dict) -> pl.DataFrame:
    frames = [pl.read_parquet(p) for p in paths]
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)

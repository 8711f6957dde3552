"""The preprocess stage for one shard: images -> float16 slice shard + index + quarantine rows."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl

from cohortlens.cohort.build import QUARANTINE_SCHEMA
from cohortlens.io.npyshard import NpyShardWriter
from cohortlens.io.readers import ImageReadError, read_image
from cohortlens.io.tables import write_parquet
from cohortlens.preprocess.slices import SliceError, center_indices, intensity_max, slice_stack, to_canvas

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
    vmax = intensity_max(loaded.array, preprocess_cfg.get("intensity_max", "max"))
    return to_canvas(stack, vmax, tuple(preprocess_cfg["canvas"]))


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


def _ordered(pool, jobs, lookahead):
    pending = []
    for job in jobs:
        pending.append(pool.submit(_safe_prepare, job))
        if len(pending) > lookahead:
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
    """Preprocess every image of one shard. Counts reconcile: images = images with slices + quarantined."""
    rows = images.filter(pl.col("shard") == shard).sort("subject_id", "region", "image_uid")
    canvas = tuple(int(c) for c in preprocess["canvas"])
    index_parts: list[dict] = []
    quarantine: list[dict] = []
    jobs = [(p, regions[r], preprocess) for p, r in zip(rows["path"], rows["region"])]
    with NpyShardWriter(out_slices, canvas) as writer, ThreadPoolExecutor(max(1, threads)) as pool:
        # Ordered, bounded look-ahead: row numbers are deterministic whatever the thread count and at most
        # a few decoded volumes are held in memory at once.
        for rec, (stack, reason) in zip(rows.iter_rows(named=True), _ordered(pool, jobs, 2 * max(1, threads))):
            if stack is None:
                quarantine.append(
                    {
                        "stage": "preprocess",
                        "manifest_line": rec["manifest_line"],
                        "image_uid": rec["image_uid"],
                        "subject_id": rec["subject_id"],
                        "region": rec["region"],
                        "image": rec["image"],
                        "reason": reason,
                    }
                )
                continue
            first = writer.append(stack)
            n = stack.shape[0]
            centre = center_indices(n, int(regions[rec["region"]].get("center_slices", 12)))
            positions = np.arange(n)
            index_parts.append(
                {
                    "slice_uid": [f"{rec['image_uid']}/{p}" for p in positions],
                    "image_uid": [rec["image_uid"]] * n,
                    "subject_id": [rec["subject_id"]] * n,
                    "region": [rec["region"]] * n,
                    "shard": [shard] * n,
                    "row": list(range(first, first + n)),
                    "slice_position": positions.tolist(),
                    "is_center": [centre.start <= p < centre.stop for p in positions],
                }
            )
    index = (
        pl.concat([pl.DataFrame(p, schema=INDEX_SCHEMA) for p in index_parts])
        if index_parts
        else pl.DataFrame(schema=INDEX_SCHEMA)
    )
    write_parquet(index, out_index)
    write_parquet(pl.DataFrame(quarantine, schema=QUARANTINE_SCHEMA), out_quarantine)
    return ShardResult(n_images=rows.height, n_slices=index.height, n_quarantined=len(quarantine))


def merge_shard_tables(paths: list[str], schema: dict) -> pl.DataFrame:
    frames = [pl.read_parquet(p) for p in paths]
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)

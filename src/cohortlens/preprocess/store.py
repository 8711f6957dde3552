"""Read access to the preprocessed shards: memory-mapped slices selected through index.parquet."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl


class SliceStore:
    """Slices of the whole cohort, addressed by rows of index.parquet, read lazily from the shards."""

    def __init__(self, index: str | os.PathLike | pl.DataFrame, shard_dir: str | os.PathLike | None = None):
        if isinstance(index, pl.DataFrame):
            if shard_dir is None:
                raise ValueError("shard_dir is required when the index is given as a frame")
            self.index = index
        else:
            self.index = pl.read_parquet(index)
            shard_dir = shard_dir or Path(index).parent
        self.shard_dir = Path(shard_dir)
        self._maps: dict[int, np.ndarray] = {}

    def shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.load(self.shard_dir / f"shard-{k}.npy", mmap_mode="r")
        return self._maps[k]

    @property
    def canvas(self) -> tuple[int, int]:
        k = int(self.index["shard"][0])
        return tuple(self.shard(k).shape[1:])

    def read(self, rows: pl.DataFrame) -> np.ndarray:
        """float32 slices for the given index rows, in the order given."""
        out = np.empty((rows.height, *self.canvas), dtype=np.float32)
        shards = rows["shard"].to_numpy()
        offsets = rows["row"].to_numpy()
        for k in np.unique(shards):
            sel = np.flatnonzero(shards == k)
            rows_k = offsets[sel]
            shard = self.shard(int(k))
            target = slice(int(sel[0]), int(sel[-1]) + 1) if sel[-1] - sel[0] + 1 == len(sel) else sel
            if np.all(np.diff(rows_k) == 1):
                # consecutive shard rows (whole images, as the embed stage reads them): one sequential copy
                out[target] = shard[int(rows_k[0]) : int(rows_k[-1]) + 1]
            else:
                # fancy indexing on a memmap reads only the selected slices, in file order
                order = np.argsort(rows_k, kind="stable")
                out[sel[order]] = shard[rows_k[order]]
        return out

    def batches(self, rows: pl.DataFrame, batch_size: int) -> Iterator[tuple[pl.DataFrame, np.ndarray]]:
        for start in range(0, rows.height, batch_size):
            part = rows.slice(start, batch_size)
            yield part, self.read(part)


def center_crop(batch: np.ndarray, crop: int | tuple[int, int]) -> np.ndarray:
    """Fixed center crop: embeddings must all see the same field of view (no random crops)."""
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    h, w = batch.shape[-2:]
    if ch > h or cw > w:
        raise ValueError(f"crop {ch}x{cw} is larger than the canvas {h}x{w}")
    y, x = (h - ch) // 2, (w - cw) // 2
    return batch[..., y : y + ch, x : x + cw]

"""The training data: which slices train, and the batch stream read from the memory-mapped shards.

Batch `s` is a pure function of (seed, s): a seeded permutation per epoch and seeded random crops. Data order
therefore survives a restart, does not depend on the DataLoader worker count, and needs no state.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import torch
from torch import Tensor

from cohortlens.preprocess.store import SliceStore, center_crop
from cohortlens.types import PathLike


def training_rows(index: pl.DataFrame, splits: pl.DataFrame, slices: str = "all", split: str = "train") -> pl.DataFrame:
    """Index rows of one split's subjects (all slices or the center slices), in shard order."""
    subjects = splits.filter(pl.col("split") == split).select("subject_id")
    rows = index.join(subjects, on="subject_id")
    if slices == "center":
        rows = rows.filter(pl.col("is_center"))
    return rows.sort("shard", "row")


def qa_rows(index: pl.DataFrame, splits: pl.DataFrame, n: int) -> pl.DataFrame:
    """n fixed slices for the QA picture: the middle center slice of n images, regions interleaved, from the
    val split first (then test, then train when val has fewer images)."""
    parts = []
    for split in ("val", "test", "train"):
        rows = training_rows(index, splits, "center", split)
        if rows.height:
            middle = rows.sort("image_uid", "slice_position").group_by("image_uid", maintain_order=True).agg(
                pl.all().get(pl.len() // 2))
            k = pl.int_range(pl.len()).over("region").alias("_k")
            parts.append(middle.with_columns(k).sort("_k", "region", "image_uid").drop("_k"))
    return pl.concat(parts).head(n) if parts else index.head(0)


class ShardReader:
    """Lazily memory-mapped shards; picklable, so each DataLoader worker maps the files itself."""

    def __init__(self, shard_dir: PathLike):
        self.shard_dir = Path(shard_dir)
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {"shard_dir": self.shard_dir, "_maps": {}}

    def shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.load(self.shard_dir / f"shard-{k}.npy", mmap_mode="r")
        return self._maps[k]

    def crops(self, shards: np.ndarray, rows: np.ndarray, ys: np.ndarray, xs: np.ndarray, crop: int) -> np.ndarray:
        """float32 (n, crop, crop): slice i cropped at (ys[i], xs[i]); each shard read in row order."""
        out = np.empty((len(rows), crop, crop), np.float32)
        for k in np.unique(shards):
            sel = np.flatnonzero(shards == k)
            sel = sel[np.argsort(rows[sel], kind="stable")]
            block = self.shard(int(k))[rows[sel]]
            for j, i in enumerate(sel):
                out[i] = block[j, ys[i] : ys[i] + crop, xs[i] : xs[i] + crop]
        return out


class SliceBatches(torch.utils.data.Dataset):
    """Item `step` is training batch number `step`: (B, 1, crop, crop) float32 random crops.

    Slices come from a seeded permutation per epoch of the training rows (position p of the endless stream is
    row perm_{p // n}[p % n]); crop offsets from a seeded generator per step. Nothing depends on the worker
    that computes a batch or on what was computed before, which makes resuming and multi-worker loading exact.
    """

    def __init__(self, shard_dir, shards: np.ndarray, rows: np.ndarray, canvas: tuple[int, int], *, batch_size: int,
                 crop: int, seed: int):
        if len(rows) == 0:
            raise ValueError("no training slices: the train split is empty for the configured train_slices")
        h, w = canvas
        if crop > h or crop > w:
            raise ValueError(f"crop {crop} is larger than the canvas {h}x{w}")
        self.reader = ShardReader(shard_dir)
        self.shards = np.asarray(shards, np.int64)
        self.rows = np.asarray(rows, np.int64)
        self.canvas = (int(h), int(w))
        self.batch_size, self.crop, self.seed = int(batch_size), int(crop), int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {**self.__dict__, "_perms": {}}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(0, epoch)))
            self._perms[epoch] = rng.permutation(len(self.rows))
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        n = len(self.rows)
        pos = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, within = pos // n, pos % n
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self.permutation(int(e))[within[m]]
        return out

    def __getitem__(self, step: int) -> Tensor:
        idx = self.indices(int(step))
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, int(step))))
        h, w = self.canvas
        ys = rng.integers(0, h - self.crop + 1, self.batch_size)
        xs = rng.integers(0, w - self.crop + 1, self.batch_size)
        batch = self.reader.crops(self.shards[idx], self.rows[idx], ys, xs, self.crop)
        return torch.from_numpy(batch).unsqueeze(1)


def center_crop_batch(store: SliceStore, rows: pl.DataFrame, crop: int) -> Tensor:
    """(n, 1, crop, crop) float32 fixed center crops (the field of view embeddings see)."""
    return torch.from_numpy(np.ascontiguousarray(center_crop(store.read(rows), crop))).unsqueeze(1)


def _quiet_worker(_: int) -> None:
    # SLURM signals the whole job step; the main process checkpoints and then shuts the workers down, so a
    # worker must not die first (the main process would see "worker exited unexpectedly" instead)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def batch_loader(data: SliceBatches, start: int, stop: int, num_workers: int, device: torch.device) -> Iterator[Tensor]:
    loader = torch.utils.data.DataLoader(
        data,
        sampler=range(start, stop),
        batch_size=None,  # the dataset yields whole batches
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_quiet_worker if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        # a private generator: creating the iterator must not consume the global torch RNG, which is part of
        # the checkpointed state (a resumed run would otherwise draw different noise than an unbroken one)
        generator=torch.Generator().manual_seed(data.seed),
    )
    return iter(loader)

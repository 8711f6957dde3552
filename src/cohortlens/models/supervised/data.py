"""The supervised engine's data: labelled slices as a seeded batch stream (training) and fixed crops in order
(prediction), both read from the memory-mapped shards.

Training batches reuse the autoencoders' stream (`training.data.SliceBatches`): batch `s` is a pure function of
(seed, s), so the data order survives a restart and does not depend on the worker count. The crop is the fixed
center crop every prediction sees (paper 003: the same field of view for all predictions), in training shifted
by up to `jitter` px per slice when asked for.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from cohortlens.models.training.data import ShardReader, SliceBatches
from cohortlens.types import PathLike


def center_offset(canvas: tuple[int, int], crop: int) -> tuple[int, int]:
    h, w = canvas
    if crop > h or crop > w:
        raise ValueError(f"crop {crop} is larger than the canvas {h}x{w}")
    return (h - crop) // 2, (w - crop) // 2


class LabelledBatches(SliceBatches):
    """Item `step` is training batch number `step`: (x (B, 1, crop, crop), targets (B, heads), weights (B, heads)).

    `targets` and `weights` are row-aligned with `shards` / `rows` (one row per slice); see `heads`."""

    def __init__(self, shard_dir: PathLike, shards: np.ndarray, rows: np.ndarray, targets: np.ndarray,
                 weights: np.ndarray, canvas: tuple[int, int], *, batch_size: int, crop: int, seed: int,
                 jitter: int = 0):
        super().__init__(shard_dir, shards, rows, canvas, batch_size=batch_size, crop=crop, seed=seed)
        n = len(self.rows)
        self.targets = np.asarray(targets, np.float32).reshape(n, -1)
        self.weights = np.asarray(weights, np.float32).reshape(n, -1)
        if self.targets.shape != self.weights.shape:
            raise ValueError(f"targets {self.targets.shape} and weights {self.weights.shape} differ in shape")
        y0, x0 = center_offset(self.canvas, crop)
        # the shift cannot leave the canvas
        self.origin, self.jitter = (y0, x0), (min(int(jitter), y0, self.canvas[0] - crop - y0),
                                              min(int(jitter), x0, self.canvas[1] - crop - x0))

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        idx = self.indices(int(step))
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, int(step))))
        (y0, x0), (jy, jx) = self.origin, self.jitter
        ys = y0 + rng.integers(-jy, jy + 1, self.batch_size)
        xs = x0 + rng.integers(-jx, jx + 1, self.batch_size)
        batch = self.reader.crops(self.shards[idx], self.rows[idx], ys, xs, self.crop)
        return (torch.from_numpy(batch).unsqueeze(1), torch.from_numpy(self.targets[idx]),
                torch.from_numpy(self.weights[idx]))


class CenterCrops(torch.utils.data.Dataset):
    """Item `i` is (B, 1, crop, crop) fixed center crops of the rows i·B … (i+1)·B - 1, in the order given."""

    def __init__(self, shard_dir: PathLike, shards: np.ndarray, rows: np.ndarray, canvas: tuple[int, int], *,
                 batch_size: int, crop: int):
        self.reader = ShardReader(shard_dir)
        self.shards, self.rows = np.asarray(shards, np.int64), np.asarray(rows, np.int64)
        self.batch_size, self.crop, self.seed = int(batch_size), int(crop), 0
        self.origin = center_offset(tuple(canvas), crop)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, i: int) -> Tensor:
        sel = slice(i * self.batch_size, (i + 1) * self.batch_size)
        shards, rows = self.shards[sel], self.rows[sel]
        ys, xs = np.full(len(rows), self.origin[0]), np.full(len(rows), self.origin[1])
        return torch.from_numpy(self.reader.crops(shards, rows, ys, xs, self.crop)).unsqueeze(1)

"""One image classifier on a cohort's volumes, the piece the finding networks share (`subgroup_curves`,
`saliency`): a class code and a loss weight per volume (table row of `baselines.Volumes`), the volume's center
slices as the training rows at the fixed center crop, one classification head; and the volumes' mean logits.

The engine (`cohortlens.models.supervised`) does the rest: seeded batches, checkpoints and resume (a finished
network on disk is loaded, not trained again), the callback after every epoch. The fingerprint covers the
settings, the training slices and their targets and weights, plus whatever `extra` the caller adds (what its
callback scores), so a changed finding never resumes an old network.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from cohortlens.analysis.baselines import Volumes
from cohortlens.models.supervised.data import CenterCrops, LabelledBatches
from cohortlens.models.supervised.heads import Head
from cohortlens.models.supervised.loop import EpochCallback, SupervisedRun, predict, train_supervised, volume_means
from cohortlens.models.supervised.networks import build_network
from cohortlens.models.supervised.settings import SupervisedSettings
from cohortlens.models.training.settings import fingerprint
from cohortlens.runtime import seed_everything


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def train_classifier(arch: str, vols: Volumes, codes: np.ndarray, weights: np.ndarray, n_classes: int,
                     settings: SupervisedSettings, out_dir: Path, *, name: str, on_epoch: EpochCallback | None = None,
                     extra: Mapping[str, Any] | None = None, threads: int = 1) -> SupervisedRun:
    """Train a classifier of `codes` (per table row) on the center slices of the rows with weight > 0."""
    codes = np.asarray(codes, np.int64)
    weights = np.asarray(weights, np.float32)
    train_slices = np.flatnonzero(weights[vols.volume] > 0)
    if len(train_slices) == 0:
        raise ValueError(f"{name}: no training volumes")
    targets = codes[vols.volume[train_slices]].astype(np.float32)[:, None]
    slice_weights = weights[vols.volume[train_slices]][:, None]
    shards, rows = vols.slices["shard"].to_numpy(), vols.slices["row"].to_numpy()
    data = LabelledBatches(vols.shard_dir, shards[train_slices], rows[train_slices], targets, slice_weights,
                           vols.canvas, batch_size=settings.batch_size, crop=settings.crop, seed=settings.seed,
                           jitter=settings.jitter)
    head = Head(name, "classification", n_classes)
    cfg = {**settings.result_keys(), "arch": arch, "classes": n_classes, "data": digest(targets, slice_weights),
           **dict(extra or {})}
    fp = fingerprint(name, cfg, vols.slices["slice_uid"].gather(train_slices).to_list())
    seed_everything(settings.seed)
    network = build_network(arch, n_classes, width=settings.width, stem_stride=settings.stem_stride)
    return train_supervised(network, [head], data, settings, out_dir, name=name, fingerprint_=fp,
                            on_epoch=on_epoch, threads=threads)


def center_crops(vols: Volumes, slices: np.ndarray, settings: SupervisedSettings) -> CenterCrops:
    """The fixed center crops of these slices (indices into `vols.slices`), in order."""
    shards, rows = vols.slices["shard"].to_numpy(), vols.slices["row"].to_numpy()
    return CenterCrops(vols.shard_dir, shards[slices], rows[slices], vols.canvas,
                       batch_size=settings.predict_batch_size, crop=settings.crop)


class VolumeScorer:
    """The mean logits over each volume's center slices for a fixed set of table rows, for any network (the
    crops are set up once: a callback scores the same rows after every epoch)."""

    def __init__(self, vols: Volumes, rows: np.ndarray, settings: SupervisedSettings):
        self.rows = np.asarray(rows, np.int64)
        self.slices = vols.slices_of(self.rows)
        self.groups = vols.volume[self.slices]
        self.n_volumes = vols.table.frame.height
        self.crops = center_crops(vols, self.slices, settings)
        self.settings = settings

    def __call__(self, network: torch.nn.Module, device: torch.device) -> np.ndarray:
        """(len(rows), classes) mean logits, in the order of `rows`."""
        s = self.settings
        out = predict(network, self.crops, device=device, amp=s.amp, channels_last=s.channels_last)
        if not len(out):
            return np.zeros((len(self.rows), 0))
        return volume_means(out, self.groups, self.n_volumes)[self.rows]

"""One image classifier on a cohort's volumes, the piece the finding networks share (`subgroup_curves`,
`saliency`): a class code and a loss weight per volume (table row of `baselines.Volumes`), the volume's center
slices as the training rows at the fixed center crop, one classification head; and the volumes' mean logits.

The engine (`cohortlens.models.supervised`) does the rest: seeded batches, checkpoints and resume (a finished
network on disk is loaded, not trained again), the callback after every epoch. The fingerprint covers the
settings, the training slices and their targets and weights, plus whatever `extra` the caller adds (what its
callback scores), so a changed finding never resumes an old network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from cohortlens.analysis.baselines import Volumes, center_crops, train_on_volumes
from cohortlens.models.supervised.heads import Head
from cohortlens.models.supervised.loop import EpochCallback, SupervisedRun, predict, volume_means
from cohortlens.models.supervised.settings import SupervisedSettings


def train_classifier(arch: str, vols: Volumes, codes: np.ndarray, weights: np.ndarray, n_classes: int,
                     settings: SupervisedSettings, out_dir: Path, *, name: str, on_epoch: EpochCallback | None = None,
                     extra: Mapping[str, Any] | None = None, threads: int = 1) -> SupervisedRun:
    """Train a classifier of `codes` (per table row) on the center slices of the rows with weight > 0."""
    targets = np.asarray(codes, np.int64).astype(np.float32)[:, None]
    return train_on_volumes(arch, [Head(name, "classification", n_classes)], vols, targets,
                            np.asarray(weights, np.float32)[:, None], settings, out_dir, name=name,
                            fingerprint_name=name, describe={"classes": n_classes, **dict(extra or {})},
                            on_epoch=on_epoch, threads=threads)


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

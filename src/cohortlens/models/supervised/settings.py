"""The supervised engine's settings (config `baselines.<arch>`, with the baselines stage's own keys beside them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class SupervisedSettings:
    """How one network is trained and applied; every field has the default used when the key is absent."""

    epochs: int = 10
    steps_per_epoch: int | None = None  # None: one pass over the training slices
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4  # AdamW's decoupled weight decay (the baselines stage tunes it from a grid)
    lr_schedule: str = "cosine"  # constant | cosine (to 0 at the last step)
    warmup_steps: int = 0
    crop: int = 256  # fixed center crop of the canvas, px (the field of view of training and prediction)
    jitter: int = 0  # training only: the crop shifted by up to ± jitter px (0: the fixed crop)
    width: float = 1.0  # channel widths × this (1: the published architecture; the depth never changes)
    stem_stride: int = 2  # ResNet: stride of the 7x7 stem convolution (2 as in torchvision; MONAI's default is 1)
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    progress_seconds: float = 15.0
    num_workers: int | None = None  # DataLoader processes; None = threads - 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True
    deterministic: bool = False  # CUDA: deterministic kernels, two seeded runs identical (runtime.configure_cuda)
    predict_batch_size: int = 256

    # keys that change how a run goes but not where it ends up: a checkpoint stays resumable when they change
    OPERATIONAL = ("checkpoint_every", "keep_checkpoints", "log_every", "progress_seconds", "num_workers", "device",
                   "amp", "channels_last", "deterministic", "predict_batch_size")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | "SupervisedSettings" | None) -> "SupervisedSettings":
        """The settings from a flat config dict; keys that are not the engine's are ignored (the stage's own)."""
        if isinstance(cfg, SupervisedSettings):
            return cfg
        names = {f.name for f in dataclasses.fields(cls)}
        s = cls(**{k: v for k, v in dict(cfg or {}).items() if k in names})
        if s.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {s.lr_schedule!r}")
        if min(s.epochs, s.batch_size, s.checkpoint_every, s.log_every, s.predict_batch_size, s.crop) < 1:
            raise ValueError("epochs, batch_size, crop, checkpoint_every, log_every and predict_batch_size must be >= 1")
        if s.steps_per_epoch is not None and s.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1 (or null: one pass over the training slices)")
        if s.jitter < 0 or s.width <= 0:
            raise ValueError("jitter must be >= 0 and width > 0")
        return s

    def result_keys(self) -> dict[str, Any]:
        """The settings a trained network depends on (the resume fingerprint's part of them)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.OPERATIONAL}

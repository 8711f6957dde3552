"""The trainer's settings: the trainer keys of a models.<name> config entry, and the fingerprint a checkpoint must
match to be resumed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

# torch.compile's modes; "reduce-overhead" replays CUDA graphs, the remedy for a step bound by kernel launches (the
# NAKO DAE at batch 5: docs/benchmarks.md)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Trainer keys of a models.<name> config entry (the other keys belong to the model)."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (to 0 at `steps`)
    grad_clip: float | None = None  # max global gradient norm
    crop: int = 64  # random crop (training) and center crop (embedding), px
    train_slices: str = "all"  # all | center
    ema_decay: float | None = None  # e.g. 0.9999; None = no EMA
    # decay_t = min(ema_decay, (1 + t) / (10 + t)): early updates average over few steps, so a short run's EMA
    # is not mostly its random initialisation (0.999 over 250 steps keeps 0.999^250 = 78 % of the initial weights)
    ema_warmup: bool = True
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    progress_seconds: float = 15.0  # at most one progress line per this many seconds
    num_workers: int | None = None  # DataLoader processes; None = threads - 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # NHWC tensors (faster on CUDA and on the CPU)
    compile: bool = False  # torch.compile the training step on CUDA
    compile_mode: str = "default"  # one of COMPILE_MODES, used when compile is true
    deterministic: bool = False  # CUDA: deterministic kernels, two seeded runs identical (runtime.configure_cuda)
    tensorboard: bool = False
    qa_images: int = 8

    # keys that change how a run goes but not where it ends up: a checkpoint stays resumable when they change
    OPERATIONAL = ("checkpoint_every", "keep_checkpoints", "log_every", "progress_seconds", "num_workers", "device",
                   "amp", "channels_last", "compile", "compile_mode", "deterministic", "tensorboard", "qa_images", "embed_batch_size", "normalise")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "TrainSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(float(b) for b in kw["betas"])
        s = cls(**kw)
        if s.train_slices not in ("all", "center"):
            raise ValueError(f"train_slices must be 'all' or 'center', got {s.train_slices!r}")
        if s.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {s.compile_mode!r}")
        if s.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {s.lr_schedule!r}")
        if s.steps < 1 or s.batch_size < 1 or s.checkpoint_every < 1 or s.log_every < 1:
            raise ValueError("steps, batch_size, checkpoint_every and log_every must be >= 1")
        return s


def fingerprint(name: str, cfg: Mapping[str, Any], train_uids: list[str] | None = None) -> str:
    """What a checkpoint must match to be resumed: model, result-relevant config and the training slices."""
    keep = {k: v for k, v in cfg.items() if k not in TrainSettings.OPERATIONAL}
    if keep.get("lr_schedule", "constant") == "constant":
        keep.pop("steps", None)  # a constant schedule continues unchanged when a run is extended
    h = hashlib.sha256(json.dumps([name, keep], sort_keys=True, default=str).encode())
    for uid in train_uids or ():
        h.update(uid.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]

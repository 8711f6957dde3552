"""Shared training infrastructure for the autoencoders (β-VAE, diffusion autoencoder).

The model protocol
------------------
A trainable model is a `torch.nn.Module` with

    name: str                   # registry key: "vae" | "dae"
    embedding_dim: int          # length of the per-slice embedding (VAE 128, DAE 512)
    def training_loss(self, x) -> tuple[Tensor, dict[str, Tensor | float]]
        # x: (B, 1, H, W) float in [-1, 1]; returns the scalar loss to minimise and named parts for the log.
        # Parts may be floats or 0-dim tensors; detached tensors are better on a GPU (no sync per step).
        # Randomness comes from torch's global RNG (seeded and checkpointed by the trainer).
    @torch.no_grad()
    def embed(self, x) -> Tensor          # (B, embedding_dim), deterministic (VAE: encoder mean μ)
    def qa_images(self, x) -> dict[str, Tensor]   # optional: name -> (B, 1, H, W) in [-1, 1], one row each
                                                  # of reconstructions.png (e.g. "input", "reconstruction")
    @classmethod
    def from_config(cls, cfg: dict) -> Module     # builds from a resolved models.<name> config (the registry
                                                  # calls it; `crop` is the input size)

Normalisation layers must not depend on the batch (GroupNorm / InstanceNorm), because embedding runs in
eval mode on arbitrary batches and the VAE's Hessian penalty evaluates the decoder on stacked batches.

What the trainer does
---------------------
- Data: the train split's slices (all, or the center slices) read from the memory-mapped shards by DataLoader
  worker processes. Batch `s` is a pure function of (seed, s): a seeded permutation per epoch and seeded random
  crops. Data order therefore survives a restart, does not depend on the worker count, and needs no state.
- Device: CUDA when present (bf16 autocast, channels_last, optional torch.compile), otherwise the CPU.
- Checkpoints every `checkpoint_every` steps and when SIGTERM / SIGUSR1 arrives (SLURM preemption: the
  checkpoint is written, then `TrainingPreempted` is raised; the CLI and the workflow script exit with
  128 + signal so SLURM / Snakemake retries). A new start resumes from the newest checkpoint of the same
  fingerprint (model config + training rows): weights, optimizer, LR schedule, EMA, step, RNG states and the
  log so far. All files are written atomically.
- Log: `train_log.csv` (step, loss and its parts, lr, img_per_s, elapsed_s), progress lines (step, loss,
  img/s, ETA) in the job log (tqdm when attached to a terminal), TensorBoard when asked for and installed.
- EMA of all weights (torch.optim.swa_utils.AveragedModel) when `ema_decay` is set.
- Outputs: `model.pt` (weights, EMA weights, resolved config), `train_log.csv`, `reconstructions.png`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from cohortlens.io.tables import atomic_path
from cohortlens.preprocess.store import SliceStore

LOG = logging.getLogger("cohortlens.models.training")
CHECKPOINT_FORMAT = 1


@runtime_checkable
class AutoencoderModel(Protocol):
    """See the module docstring: the contract between the trainer / embedder and a model."""

    name: str
    embedding_dim: int

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]: ...

    def embed(self, x: Tensor) -> Tensor: ...


# ----------------------------------------------------------------------------------------------- settings


def ema_decay_at(decay: float, updates: int, warmup: bool = True) -> float:
    """The EMA decay of the update after `updates` earlier ones: `decay`, or with warm-up the smaller of `decay` and
    (1 + t) / (10 + t), the schedule of TensorFlow's ExponentialMovingAverage with num_updates."""
    return min(decay, (1.0 + updates) / (10.0 + updates)) if warmup else decay


def ema_update(decay: float, warmup: bool = True):
    """`multi_avg_fn` for torch's AveragedModel: in-place lerp of every averaged tensor towards the model's with
    weight 1 - decay_t. AveragedModel copies the weights on its first update and counts updates itself, so the
    count (and with it the warm-up) is part of its state dict and survives a checkpoint resume."""

    def update(averaged: list[Tensor], current: list[Tensor], num_averaged) -> None:
        d = ema_decay_at(decay, int(num_averaged), warmup)  # one host sync per step: negligible beside the step
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (counters): lerp is float-only
            for a, c in zip(averaged, current, strict=True):
                a.copy_((a * d + c * (1.0 - d)).to(a.dtype))

    return update


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
    tensorboard: bool = False
    qa_images: int = 8

    # keys that change how a run goes but not where it ends up: a checkpoint stays resumable when they change
    OPERATIONAL = ("checkpoint_every", "keep_checkpoints", "log_every", "progress_seconds", "num_workers", "device",
                   "amp", "channels_last", "compile", "tensorboard", "qa_images", "embed_batch_size", "normalise")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "TrainSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(float(b) for b in kw["betas"])
        s = cls(**kw)
        if s.train_slices not in ("all", "center"):
            raise ValueError(f"train_slices must be 'all' or 'center', got {s.train_slices!r}")
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


# ----------------------------------------------------------------------------------------------- device


def select_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(device: torch.device, enabled: bool):
    # bf16 needs no loss scaling; CPU autocast is left off (slower on most CPUs, and CPU runs are the
    # reference for determinism)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# ----------------------------------------------------------------------------------------------- data


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

    def __init__(self, shard_dir: str | os.PathLike):
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
    from cohortlens.preprocess.store import center_crop

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


# ----------------------------------------------------------------------------------------------- checkpoints


class TrainingPreempted(Exception):
    """SIGTERM / SIGUSR1 arrived: a checkpoint was written and the run should end with `exit_code`."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        self.exit_code = 128 + self.signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint {checkpoint}, exit {self.exit_code}")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out_dir: str | os.PathLike, fp: str) -> Path:
    return Path(out_dir) / "checkpoints" / fp


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}.pt"


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoints of one fingerprint, oldest first."""
    return sorted(folder.glob("step-*.pt")) if folder.is_dir() else []


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    path = checkpoint_path(folder, step)
    buf = io.BytesIO()  # serialise first, so a signal during the write loses at most this checkpoint
    torch.save(state, buf)
    with atomic_path(path, ".pt") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
    for old in checkpoints(folder)[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(folder: Path, map_location) -> dict | None:
    for path in reversed(checkpoints(folder)):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # a truncated file from a crashed non-atomic copy: try the previous one
            LOG.warning("checkpoint %s unreadable (%s); trying an older one", path, exc)
            continue
        if state.get("format") == CHECKPOINT_FORMAT:
            state["path"] = str(path)
            return state
    return None


class _StopSignals:
    """Turn SIGTERM / SIGUSR1 into a flag the loop checks after each step (handlers only in the main thread)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self._saved: dict = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            LOG.warning("received %s: checkpointing after the current step", signal.Signals(signum).name)
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        return False


# ----------------------------------------------------------------------------------------------- logging


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress lines in the job log (tqdm bar on a terminal): step, loss, img/s, ETA."""

    def __init__(self, name: str, start: int, total: int, every_s: float):
        self.name, self.total, self.every_s = name, total, every_s
        self.last = -math.inf
        self.last_step = -1
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True)

    def update(self, row: dict, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.n = row["step"]
            self.bar.set_postfix(loss=f"{row['loss']:.4g}", img_s=f"{row['img_per_s']:.0f}", refresh=True)
            return
        now = time.monotonic()
        if row["step"] == self.last_step or (not force and now - self.last < self.every_s):
            return
        self.last, self.last_step = now, row["step"]
        rate = row["img_per_s"]
        remaining = (self.total - row["step"]) * row.get("batch", 1) / rate if rate > 0 else float("nan")
        parts = " ".join(f"{k} {row[k]:.4g}" for k in row if k not in ("step", "loss", "lr", "img_per_s", "elapsed_s", "batch"))
        LOG.info("%s step %d/%d (%.0f%%) loss %.5g %s | lr %.3g | %.1f img/s | elapsed %s | ETA %s", self.name,
                 row["step"], self.total, 100 * row["step"] / self.total, row["loss"], parts, row["lr"], rate,
                 _fmt_time(row["elapsed_s"]), _fmt_time(remaining) if math.isfinite(remaining) else "?")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_log_csv(rows: list[dict], path: str | os.PathLike) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields and k != "batch"]
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields or ["step"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _tensorboard(out_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        LOG.warning("tensorboard: true but the tensorboard package is not installed; logging to train_log.csv only")
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def save_qa_grid(images: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """reconstructions.png: the named QA images stacked top to bottom, 8-bit gray ([-1, 1] -> [0, 255]).

    A (B, 1, H, W) batch becomes one row of B images (the VAE: input row above reconstruction row); a (1, H, W)
    or (H, W) tensor is a grid the model laid out itself (the DAE) and is placed as it is.
    """
    from PIL import Image

    blocks = []
    for name, t in images.items():
        arr = t.detach().float().cpu().numpy()
        if arr.ndim == 4:
            arr = np.concatenate(list(arr[:, 0]), axis=1)
        elif arr.ndim == 3:
            arr = arr[0]
        if arr.ndim != 2:
            raise ValueError(f"qa image {name!r}: expected (B, 1, H, W), (1, H, W) or (H, W), got {tuple(t.shape)}")
        blocks.append(arr)
    width = max(b.shape[1] for b in blocks)
    blocks = [np.pad(b, ((0, 0), (0, width - b.shape[1])), constant_values=-1) for b in blocks]
    grid = ((np.clip(np.concatenate(blocks, axis=0), -1, 1) + 1) * 127.5).round().astype(np.uint8)
    with atomic_path(path, ".png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class TrainResult:
    steps: int
    resumed_from: int | None
    log: list[dict]
    model_path: Path
    elapsed_s: float


def _lr_lambda(settings: TrainSettings) -> Callable[[int], float]:
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
        if settings.lr_schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, settings.steps) / settings.steps))
        return warm

    return factor


def _scalar(v) -> Tensor | float:
    return v.detach().float() if isinstance(v, Tensor) else float(v)


def _compiled(fn: Callable, enabled: bool) -> Callable:
    """torch.compile when asked for (CUDA only); a failing compile falls back to eager with a warning."""
    if not enabled:
        return fn
    compiled = torch.compile(fn)
    state = {"fn": compiled}

    def call(x):
        try:
            return state["fn"](x)
        except Exception as exc:
            if state["fn"] is fn:
                raise
            LOG.warning("torch.compile failed (%s: %s); continuing in eager mode", type(exc).__name__, exc)
            state["fn"] = fn
            return fn(x)

    return call


def train(
    model: nn.Module,
    data: SliceBatches,
    settings: TrainSettings,
    out_dir: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    fingerprint_: str,
    qa_batch: Tensor | None = None,
    model_path: str | os.PathLike | None = None,
    log_csv: str | os.PathLike | None = None,
    reconstructions: str | os.PathLike | None = None,
    threads: int = 1,
) -> TrainResult:
    """Train `model` (built after `seed_everything(settings.seed)`) to `settings.steps`, resuming if possible."""
    out_dir = Path(out_dir)
    model_path = Path(model_path or out_dir / "model.pt")
    log_csv = Path(log_csv or out_dir / "train_log.csv")
    reconstructions = Path(reconstructions or out_dir / "reconstructions.png")
    device = select_device(settings.device)
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(threads)))
    else:
        torch.backends.cudnn.benchmark = True
    try:
        return _train(model, data, settings, out_dir, device, config=config, fingerprint_=fingerprint_,
                      qa_batch=qa_batch, model_path=model_path, log_csv=log_csv, reconstructions=reconstructions,
                      threads=threads)
    finally:
        torch.set_num_threads(threads_before)


def _train(model, data, settings, out_dir, device, *, config, fingerprint_, qa_batch, model_path, log_csv,
           reconstructions, threads) -> TrainResult:
    name = getattr(model, "name", type(model).__name__)
    # channels_last also on the CPU: oneDNN's convolutions run ~30% faster on it for these small channel counts
    channels_last = settings.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings))
    ema = None
    if settings.ema_decay:
        from torch.optim.swa_utils import AveragedModel

        ema = AveragedModel(model, multi_avg_fn=ema_update(settings.ema_decay, settings.ema_warmup), use_buffers=True)

    folder = checkpoint_dir(out_dir, fingerprint_)
    state = load_latest_checkpoint(folder, device)
    step, log_rows, elapsed_before, resumed_from = 0, [], 0.0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step, log_rows, elapsed_before = int(state["step"]), list(state["log"]), float(state["elapsed_s"])
        resumed_from = step
        LOG.info("%s: resuming from %s (step %d)", name, state["path"], step)
    else:
        LOG.info("%s: starting at step 0 (checkpoints in %s)", name, folder)
    LOG.info("%s: device %s, %d parameters, %d training slices, batch %d, crop %d, %d steps, EMA %s", name, device,
             sum(p.numel() for p in params), len(data.rows), settings.batch_size, settings.crop, settings.steps,
             settings.ema_decay or "off")

    num_workers = settings.num_workers if settings.num_workers is not None else max(0, int(threads) - 1)
    batches = batch_loader(data, step, settings.steps, num_workers, device)
    if state is not None:
        set_rng_state(state["rng"])  # after the loader: its workers' seeds never touch this stream
    loss_fn = _compiled(model.training_loss, settings.compile and device.type == "cuda")
    board = _tensorboard(out_dir, settings.tensorboard)
    progress = Progress(name, step, settings.steps, settings.progress_seconds)

    def snapshot(at: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model_name": name, "fingerprint": fingerprint_, "step": at,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "rng": rng_state(), "log": log_rows,
                "elapsed_s": elapsed_before + (time.perf_counter() - t_start), "config": dict(config)}

    sums: dict[str, Tensor | float] = {}
    n_acc, images_acc = 0, 0
    t_start = t_window = time.perf_counter()
    model.train()
    with _StopSignals() as stop:
        try:
            while step < settings.steps:
                x = to_device(next(batches), device, channels_last)
                with _autocast(device, settings.amp):
                    loss, parts = loss_fn(x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums.get(k, 0.0) + _scalar(v)
                n_acc += 1
                images_acc += x.shape[0]

                if step % settings.log_every == 0 or step == settings.steps:
                    now = time.perf_counter()
                    row = {"step": step, **{k: float(v) / n_acc for k, v in sums.items()},
                           "lr": scheduler.get_last_lr()[0], "img_per_s": images_acc / max(now - t_window, 1e-9),
                           "elapsed_s": elapsed_before + now - t_start}
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(
                            f"{name}: non-finite loss around step {step} ({row}); lower lr or set grad_clip. "
                            f"Last good checkpoint: {checkpoints(folder)[-1] if checkpoints(folder) else 'none'}")
                    log_rows.append(row)
                    progress.update({**row, "batch": settings.batch_size}, force=len(log_rows) == 1)
                    if board is not None:
                        for k, v in row.items():
                            if k != "step":
                                board.add_scalar(f"{name}/{k}", v, step)
                    sums, n_acc, images_acc, t_window = {}, 0, 0, now

                if step % settings.checkpoint_every == 0 or step == settings.steps or stop.signum is not None:
                    if not bool(torch.isfinite(loss.detach())):  # never replace a good checkpoint by a diverged one
                        raise FloatingPointError(f"{name}: non-finite loss at step {step}; checkpoints left as they were")
                    path = save_checkpoint(folder, step, snapshot(step), settings.keep_checkpoints)
                    if stop.signum is not None:
                        raise TrainingPreempted(stop.signum, step, path)
        finally:
            del batches  # shuts the DataLoader workers down before the process exits
            progress.close()
            if board is not None:
                board.close()

    elapsed = elapsed_before + time.perf_counter() - t_start
    if log_rows:
        progress.update({**log_rows[-1], "batch": settings.batch_size}, force=True)
    final = ema.module if ema is not None else model
    final.eval()
    if qa_batch is not None and hasattr(final, "qa_images"):
        with torch.no_grad(), _autocast(device, settings.amp):
            images = final.qa_images(to_device(qa_batch, device, channels_last))
        save_qa_grid(images, reconstructions)
    write_log_csv(log_rows, log_csv)
    save_model(model_path, name, model, ema.module if ema is not None else None, config, fingerprint_, step,
               log_rows[-1] if log_rows else None)
    LOG.info("%s: done, %d steps in %s; wrote %s", name, step, _fmt_time(elapsed), model_path)
    return TrainResult(steps=step, resumed_from=resumed_from, log=log_rows, model_path=model_path, elapsed_s=elapsed)


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_model(path, name: str, model: nn.Module, ema_module: nn.Module | None, config: Mapping, fp: str, steps: int,
               final: dict | None) -> None:
    """model.pt: loadable with torch.load(weights_only=True); `registry.load_model` rebuilds the model."""
    state = {"model": name, "embedding_dim": int(model.embedding_dim), "config": dict(config), "fingerprint": fp,
             "steps": int(steps), "final": final or {}, "state_dict": _cpu_state(model)}
    if ema_module is not None:
        state["ema_state_dict"] = _cpu_state(ema_module)
    with atomic_path(path, ".pt") as tmp:
        torch.save(state, tmp)


# ----------------------------------------------------------------------------------------------- from files


def train_from_files(
    name: str,
    cfg: Mapping[str, Any],
    index_path: str | os.PathLike,
    splits_path: str | os.PathLike,
    *,
    model_path: str | os.PathLike,
    log_csv: str | os.PathLike | None = None,
    reconstructions: str | os.PathLike | None = None,
    threads: int = 1,
) -> TrainResult:
    """The train stage of one model: config (preset + overrides) → seeded model → train → outputs.

    Checkpoints go to `<folder of model_path>/checkpoints/<fingerprint>/`.
    """
    from cohortlens.models.registry import build_model, resolve_config

    cfg = resolve_config(name, cfg)
    settings = TrainSettings.from_config(cfg)
    store = SliceStore(index_path)
    splits = pl.read_parquet(splits_path)
    rows = training_rows(store.index, splits, settings.train_slices)
    data = SliceBatches(store.shard_dir, rows["shard"].to_numpy(), rows["row"].to_numpy(), store.canvas,
                        batch_size=settings.batch_size, crop=settings.crop, seed=settings.seed)
    fp = fingerprint(name, cfg, sorted(rows["slice_uid"].to_list()))
    qa = center_crop_batch(store, qa_rows(store.index, splits, settings.qa_images), settings.crop)
    seed_everything(settings.seed)
    model = build_model(name, cfg)
    out_dir = Path(model_path).parent
    return train(model, data, settings, out_dir, config=cfg, fingerprint_=fp, qa_batch=qa, model_path=model_path,
                 log_csv=log_csv, reconstructions=reconstructions, threads=threads)


def main(argv: list[str] | None = None) -> int:
    """python -m cohortlens.models.training vae --config cfg.yaml --index … --splits … --out results/models/vae"""
    import argparse

    import yaml

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model")
    ap.add_argument("--config", help="YAML/JSON file with the models.<name> entry (default: the preset 'demo')")
    ap.add_argument("--index", required=True)
    ap.add_argument("--splits", required=True)
    ap.add_argument("--out", required=True, help="output folder (model.pt, train_log.csv, reconstructions.png)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = yaml.safe_load(Path(args.config).read_text()) if args.config else {"preset": "demo"}
    out = Path(args.out)
    try:
        train_from_files(args.model, cfg, args.index, args.splits, model_path=out / "model.pt", threads=args.threads)
    except TrainingPreempted as stop:
        LOG.warning("%s", stop)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

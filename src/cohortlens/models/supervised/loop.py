"""Training and applying a supervised network: the step loop with checkpoints, resume and a callback after every
epoch (`train_supervised`), outputs per slice (`predict`) and per volume (`volume_means`)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from cohortlens.models.supervised.data import CenterCrops, LabelledBatches
from cohortlens.models.supervised.heads import Head, heads_loss
from cohortlens.models.supervised.settings import SupervisedSettings
from cohortlens.models.training.checkpoint import (
    CHECKPOINT_FORMAT,
    StopSignals,
    TrainingPreempted,
    checkpoint_dir,
    resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cohortlens.models.training.data import batch_loader
from cohortlens.models.training.loop import lr_lambda, to_device
from cohortlens.models.training.progress import Progress, fmt_time
from cohortlens.runtime import bf16_autocast, configure_cuda, limit_threads, select_device
from cohortlens.types import PathLike

LOG = logging.getLogger("cohortlens.models.supervised")


@dataclass
class EpochEnd:
    """What a callback after an epoch gets: the epoch just finished (1-based), the step, the network (in eval
    mode during the call) and its device. What the callback returns (name -> number) joins that step's log row."""

    epoch: int
    step: int
    network: nn.Module
    device: torch.device


EpochCallback = Callable[[EpochEnd], "Mapping[str, float] | None"]


@dataclass
class SupervisedRun:
    network: nn.Module  # trained, in eval mode, on `device`
    heads: tuple[Head, ...]
    steps: int
    steps_per_epoch: int
    resumed_from: int | None
    device: torch.device
    elapsed_s: float
    log: list[dict] = field(default_factory=list)


def epoch_steps(settings: SupervisedSettings, n_rows: int) -> int:
    """Steps per epoch: `steps_per_epoch`, or one pass over the training rows."""
    return settings.steps_per_epoch or max(1, math.ceil(n_rows / settings.batch_size))


def train_supervised(network: nn.Module, heads: Sequence[Head], data: LabelledBatches, settings: SupervisedSettings,
                     out_dir: PathLike, *, name: str, fingerprint_: str, on_epoch: EpochCallback | None = None,
                     threads: int = 1) -> SupervisedRun:
    """Train `network` (built after `seed_everything(settings.seed)`, with `heads.n_outputs(heads)` outputs) for
    `settings.epochs` epochs, resuming from the newest checkpoint in `out_dir/checkpoints/<fingerprint_>/`.

    Checkpoints every `checkpoint_every` steps, at every epoch end, at the last step and on SIGTERM / SIGUSR1
    (then `TrainingPreempted` is raised). A finished run found on disk is loaded, not trained again."""
    heads = tuple(heads)
    device = select_device(settings.device)
    configure_cuda(device, settings.deterministic)
    with limit_threads(threads, device=device):
        return _train(network, heads, data, settings, Path(out_dir), device, name, fingerprint_, on_epoch, threads)


def _train(network, heads, data, settings, out_dir, device, name, fingerprint_, on_epoch, threads) -> SupervisedRun:
    if data.targets.shape[1] != len(heads):
        raise ValueError(f"{name}: {data.targets.shape[1]} target columns for {len(heads)} heads")
    per_epoch = epoch_steps(settings, len(data.rows))
    total = settings.epochs * per_epoch
    network.to(device)
    if settings.channels_last:
        network.to(memory_format=torch.channels_last)
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings.lr_schedule, settings.warmup_steps, total))
    folder = checkpoint_dir(out_dir, fingerprint_)
    start = resume(folder, device, model=network, optimizer=optimizer, scheduler=scheduler)
    state, step, log_rows, elapsed_before, resumed_from = (start.state, start.step, start.log_rows, start.elapsed_s,
                                                            start.resumed_from)
    if state is not None:
        LOG.info("%s: resuming from %s (step %d of %d)", name, state["path"], step, total)
    else:
        LOG.info("%s: %d parameters, %d training slices, batch %d, %d epochs x %d steps, weight decay %g", name,
                 sum(p.numel() for p in params), len(data.rows), settings.batch_size, settings.epochs, per_epoch,
                 settings.weight_decay)

    def snapshot(at: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model_name": name, "fingerprint": fingerprint_, "step": at,
                "model": network.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "log": log_rows,
                "elapsed_s": elapsed_before + (time.perf_counter() - t_start),
                "heads": [h.name for h in heads]}

    t_start = t_window = time.perf_counter()
    if step < total:
        num_workers = settings.num_workers if settings.num_workers is not None else max(0, int(threads) - 1)
        batches = batch_loader(data, step, total, num_workers, device)
        if state is not None:
            set_rng_state(state["rng"])  # after the loader: its workers' seeds never touch this stream
        progress = Progress(name, step, total, settings.progress_seconds)
        sums: dict[str, float] = {}
        n_acc = images_acc = 0
        network.train()
        with StopSignals() as stop:
            try:
                while step < total:
                    x, y, w = next(batches)
                    x = to_device(x, device, settings.channels_last)
                    y, w = y.to(device, non_blocking=True), w.to(device, non_blocking=True)
                    with bf16_autocast(device, settings.amp):
                        out = network(x)
                    loss, parts = heads_loss(out, y, w, heads)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    for k, v in {"loss": loss.detach(), **parts}.items():
                        sums[k] = sums.get(k, 0.0) + v.float()
                    n_acc += 1
                    images_acc += x.shape[0]
                    epoch_end = step % per_epoch == 0
                    if step % settings.log_every == 0 or epoch_end or step == total:
                        now = time.perf_counter()
                        row = {"step": step, "epoch": round(step / per_epoch, 4),
                               **{k: float(v) / n_acc for k, v in sums.items()}, "lr": scheduler.get_last_lr()[0],
                               "img_per_s": images_acc / max(now - t_window, 1e-9),
                               "elapsed_s": elapsed_before + now - t_start}
                        if not math.isfinite(row["loss"]):
                            raise FloatingPointError(f"{name}: non-finite loss around step {step}; lower lr")
                        if epoch_end and on_epoch is not None:
                            network.eval()
                            with torch.no_grad():
                                row.update(on_epoch(EpochEnd(step // per_epoch, step, network, device)) or {})
                            network.train()
                        log_rows.append(row)
                        progress.update({**row, "batch": settings.batch_size}, force=len(log_rows) == 1)
                        sums, n_acc, images_acc, t_window = {}, 0, 0, time.perf_counter()
                    if (step % settings.checkpoint_every == 0 or epoch_end or step == total
                            or stop.signum is not None):
                        path = save_checkpoint(folder, step, snapshot(step), settings.keep_checkpoints)
                        if stop.signum is not None:
                            raise TrainingPreempted(stop.signum, step, path)
            finally:
                del batches  # shuts the DataLoader workers down
                progress.close()
    elapsed = elapsed_before + time.perf_counter() - t_start
    network.eval()
    LOG.info("%s: %d steps in %s (resumed from %s)", name, step, fmt_time(elapsed), resumed_from)
    return SupervisedRun(network=network, heads=heads, steps=step, steps_per_epoch=per_epoch,
                         resumed_from=resumed_from, device=device, elapsed_s=elapsed, log=log_rows)


def predict(network: nn.Module, data: CenterCrops, *, device: torch.device | None = None, amp: bool = True,
            channels_last: bool = True, num_workers: int = 0) -> np.ndarray:
    """float32 (n, outputs): the network's outputs for every row of `data`, in order (eval mode, no gradients)."""
    device = device or next(network.parameters()).device
    network.eval()
    outs = []
    if len(data):
        loader = batch_loader(data, 0, len(data), num_workers, device)
        with torch.no_grad():
            for x in loader:
                with bf16_autocast(device, amp):
                    outs.append(network(to_device(x, device, channels_last)).float().cpu().numpy())
    width = outs[0].shape[1] if outs else 0
    return np.concatenate(outs) if outs else np.zeros((0, width), np.float32)


def volume_means(outputs: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups, outputs): the mean of the rows of each group (a volume's slices: logits or predictions); NaN
    for a group without rows."""
    outputs = np.asarray(outputs, np.float64)
    sums = np.zeros((n_groups, outputs.shape[1]))
    np.add.at(sums, np.asarray(groups, np.int64), outputs)
    counts = np.bincount(groups, minlength=n_groups).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


"""The training loop: optimizer, LR schedule, EMA, autocast, logging, checkpoints and the final model file."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from cohortlens.models.modelfile import save_model
from cohortlens.models.training.checkpoint import (
    CHECKPOINT_FORMAT,
    StopSignals,
    TrainingPreempted,
    checkpoint_dir,
    checkpoints,
    resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cohortlens.models.training.data import SliceBatches, batch_loader
from cohortlens.models.training.ema import ema_update
from cohortlens.models.training.progress import Progress, fmt_time, open_tensorboard, save_qa_grid, write_log_csv
from cohortlens.models.training.settings import TrainSettings
from cohortlens.runtime import bf16_autocast, configure_cuda, limit_threads, select_device
from cohortlens.types import PathLike

LOG = logging.getLogger("cohortlens.models.training")


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@dataclasses.dataclass
class TrainResult:
    steps: int
    resumed_from: int | None
    log: list[dict]
    model_path: Path
    elapsed_s: float


def lr_lambda(schedule: str, warmup_steps: int, steps: int) -> Callable[[int], float]:
    """The LR factor at a step: linear warm-up over `warmup_steps`, then constant or cosine to 0 at `steps`."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        return warm

    return factor


def _scalar(v) -> Tensor | float:
    return v.detach().float() if isinstance(v, Tensor) else float(v)


def train_step(loss_fn: Callable, x: Tensor, optimizer: torch.optim.Optimizer, device: torch.device, amp: bool,
               grad_clip: float | None = None) -> tuple[Tensor, dict]:
    """One optimisation step, the one the trainer runs and gpu_check times: the loss under bf16 autocast (CUDA),
    gradients, clipping to `grad_clip` over every parameter the optimizer holds (a model with parameter groups
    hands it dicts, not tensors), the optimizer's step. Returns the loss and its parts."""
    with bf16_autocast(device, amp):
        loss, parts = loss_fn(x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    return loss, parts


def _compiled(fn: Callable, enabled: bool, mode: str = "default") -> Callable:
    """torch.compile when asked for (CUDA only); a failing compile falls back to eager with a warning."""
    if not enabled:
        return fn
    compiled = torch.compile(fn, mode=None if mode == "default" else mode)
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
    out_dir: PathLike,
    *,
    config: Mapping[str, Any],
    fingerprint_: str,
    qa_batch: Tensor | None = None,
    model_path: PathLike | None = None,
    log_csv: PathLike | None = None,
    reconstructions: PathLike | None = None,
    threads: int = 1,
) -> TrainResult:
    """Train `model` (built after `seed_everything(settings.seed)`) to `settings.steps`, resuming if possible."""
    out_dir = Path(out_dir)
    model_path = Path(model_path or out_dir / "model.pt")
    log_csv = Path(log_csv or out_dir / "train_log.csv")
    reconstructions = Path(reconstructions or out_dir / "reconstructions.png")
    device = select_device(settings.device)
    configure_cuda(device, settings.deterministic)
    with limit_threads(threads, device=device):  # caps torch and BLAS threads on the CPU only
        return _train(model, data, settings, out_dir, device, config=config, fingerprint_=fingerprint_,
                      qa_batch=qa_batch, model_path=model_path, log_csv=log_csv, reconstructions=reconstructions,
                      threads=threads)


def _train(model, data, settings, out_dir, device, *, config, fingerprint_, qa_batch, model_path, log_csv,
           reconstructions, threads) -> TrainResult:
    name = getattr(model, "name", type(model).__name__)
    # channels_last also on the CPU: oneDNN's convolutions run ~30% faster on it for these small channel counts
    channels_last = settings.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    # a model may give parts of itself their own learning rate (the DAE's semantic encoder: `encoder_lr_mult`)
    groups = getattr(model, "parameter_groups", None)
    params = groups(settings.lr) if groups else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(settings.lr_schedule, settings.warmup_steps, settings.steps))
    ema = None
    if settings.ema_decay:
        ema = AveragedModel(model, multi_avg_fn=ema_update(settings.ema_decay, settings.ema_warmup), use_buffers=True)

    folder = checkpoint_dir(out_dir, fingerprint_)
    start = resume(folder, device, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema)
    state, step, log_rows, elapsed_before, resumed_from = (start.state, start.step, start.log_rows, start.elapsed_s,
                                                            start.resumed_from)
    if state is not None:
        LOG.info("%s: resuming from %s (step %d)", name, state["path"], step)
    else:
        LOG.info("%s: starting at step 0 (checkpoints in %s)", name, folder)
    LOG.info("%s: device %s, %d parameters, %d training slices, batch %d, crop %d, %d steps, EMA %s", name, device,
             sum(p.numel() for g in optimizer.param_groups for p in g["params"]), len(data.rows), settings.batch_size, settings.crop, settings.steps,
             settings.ema_decay or "off")

    num_workers = settings.num_workers if settings.num_workers is not None else max(0, int(threads) - 1)
    batches = batch_loader(data, step, settings.steps, num_workers, device)
    if state is not None:
        set_rng_state(state["rng"])  # after the loader: its workers' seeds never touch this stream
    loss_fn = _compiled(model.training_loss, settings.compile and device.type == "cuda", settings.compile_mode)
    board = open_tensorboard(out_dir, settings.tensorboard)
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
    with StopSignals() as stop:
        try:
            while step < settings.steps:
                x = to_device(next(batches), device, channels_last)
                loss, parts = train_step(loss_fn, x, optimizer, device, settings.amp, settings.grad_clip)
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
        with torch.no_grad(), bf16_autocast(device, settings.amp):
            images = final.qa_images(to_device(qa_batch, device, channels_last))
        save_qa_grid(images, reconstructions)
    write_log_csv(log_rows, log_csv)
    save_model(model_path, name, model, ema.module if ema is not None else None, config, fingerprint_, step,
               log_rows[-1] if log_rows else None)
    LOG.info("%s: done, %d steps in %s; wrote %s", name, step, fmt_time(elapsed), model_path)
    return TrainResult(steps=step, resumed_from=resumed_from, log=log_rows, model_path=model_path, elapsed_s=elapsed)

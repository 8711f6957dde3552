"""What a training run reports: progress lines in the job log (tqdm on a terminal), `train_log.csv`,
TensorBoard scalars (when asked for and installed) and the QA picture `reconstructions.png`."""

from __future__ import annotations

import csv
import logging
import math
import sys
import time
from pathlib import Path
from typing import Mapping

import numpy as np
from torch import Tensor

from cohortlens.io.tables import atomic_path
from cohortlens.types import PathLike

LOG = logging.getLogger("cohortlens.models.training")


def fmt_time(seconds: float) -> str:
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
                 fmt_time(row["elapsed_s"]), fmt_time(remaining) if math.isfinite(remaining) else "?")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_log_csv(rows: list[dict], path: PathLike) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields and k != "batch"]
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields or ["step"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def open_tensorboard(out_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        LOG.warning("tensorboard: true but the tensorboard package is not installed; logging to train_log.csv only")
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def save_qa_grid(images: Mapping[str, Tensor], path: PathLike) -> None:
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

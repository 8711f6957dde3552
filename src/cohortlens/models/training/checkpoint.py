"""Checkpoints of a training run and the preemption signals that trigger one.

A checkpoint holds everything a resumed run needs to continue as if unbroken: weights, optimizer, LR schedule,
EMA, step, the RNG states and the log so far. Checkpoints of one run live in `checkpoints/<fingerprint>/`,
are written atomically, and the newest readable one of the same format is resumed from. SIGTERM / SIGUSR1
(SLURM preemption) become a flag the loop checks after each step: it writes a checkpoint, then raises
`TrainingPreempted`, whose `exit_code` (128 + signal) the callers exit with so SLURM / Snakemake retries.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from cohortlens.io.tables import atomic_path
from cohortlens.types import PathLike

LOG = logging.getLogger("cohortlens.models.training")
CHECKPOINT_FORMAT = 1


class TrainingPreempted(Exception):
    """SIGTERM / SIGUSR1 arrived: a checkpoint was written and the run should end with `exit_code`."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        self.exit_code = 128 + self.signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint {checkpoint}, exit {self.exit_code}")


@contextlib.contextmanager
def exit_on_preemption(log: logging.Logger):
    """A stage entry's body under it: on `TrainingPreempted` (SLURM preemption or time limit) the checkpoint is
    on disk, so the process logs it and exits with 128 + signal; SLURM requeues or Snakemake retries the job,
    which resumes from the checkpoint."""
    try:
        yield
    except TrainingPreempted as stop:
        log.warning("%s", stop)
        sys.exit(stop.exit_code)


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


def checkpoint_dir(out_dir: PathLike, fp: str) -> Path:
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


class StopSignals:
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



@dataclass
class Resumed:
    """Where a training loop starts: the latest checkpoint's state (None: from scratch), its step, log rows and
    the seconds already spent."""

    state: dict | None = None
    step: int = 0
    log_rows: list = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def resumed_from(self) -> int | None:
        return self.step if self.state is not None else None


def resume(folder: Path, map_location, **modules) -> Resumed:
    """Load the latest checkpoint of `folder` into every given module / optimizer / scheduler (by its key in the
    checkpoint; a None module or a key the checkpoint lacks is skipped)."""
    state = load_latest_checkpoint(folder, map_location)
    if state is None:
        return Resumed()
    for key, module in modules.items():
        if module is not None and state.get(key) is not None:
            module.load_state_dict(state[key])
    return Resumed(state, int(state["step"]), list(state["log"]), float(state["elapsed_s"]))
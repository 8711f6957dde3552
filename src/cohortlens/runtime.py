"""Where a computation runs: the device, the thread caps, the seed, and whether cuML can be used.

One home for these so that training, embedding and analysis choose the same way. It sits below every layer
(numpy and threadpoolctl; torch only inside the calls that need it, so that analysis and report modules that cap
threads do not pay torch's import)."""

from __future__ import annotations

import contextlib
import functools
import random
import sys
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

if TYPE_CHECKING:
    import torch


def select_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA when a device is visible, else the CPU; an explicit `cuda` without CUDA is an error."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
    return dev


def configure_cuda(device: torch.device, deterministic: bool = False) -> None:
    """cuDNN autotuning, or deterministic kernels. Default CUDA settings let two seeded runs drift apart: the
    GPU check measured the demo VAE's embeddings of two such runs 1.79 apart (max abs), since cudnn.benchmark picks
    algorithms per run and some backward kernels accumulate with atomics. `deterministic` makes them identical
    (1.2-1.4x the demo models' training time there: docs/benchmarks.md). A no-op on the CPU, which is deterministic."""
    import os

    import torch

    if device.type != "cuda":
        return
    if deterministic:
        # cuBLAS reads this when its first handle is made: a job process sets it before its first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op without a deterministic kernel warns (named in the job's log) instead of stopping the run
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def bf16_autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (no loss scaling needed); a no-op elsewhere: CPU autocast is slower on most CPUs, and
    CPU runs are the reference for determinism. Every trainer (autoencoders, supervised networks) uses this one."""
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@functools.cache
def cuml_available() -> bool:
    """cuML importable and a CUDA device visible: only then do t-SNE/UMAP/SVM run on the GPU. A GPU machine
    without cuML falls back to the CPU libraries."""
    try:
        import cuml  # noqa: F401
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or a CUDA runtime error on a machine without a driver
        return False


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def limit_threads(threads: int | None, *, device: torch.device | None = None):
    """Cap BLAS/OpenMP pools (threadpoolctl) and torch's intra-op threads to a rule's `threads` for the
    duration. On a shared 2-core machine an uncapped BLAS pool made each probe fit 30-60x slower
    (oversubscription). No cap when `threads` is falsy or the work runs on a GPU. torch is capped only when the
    caller has imported it: the analysis stages that never use torch do not pay its import for a cap."""
    if not threads or (device is not None and device.type != "cpu"):
        yield
        return
    threads = max(1, int(threads))
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)


def threaded(fn):
    """Adds a keyword `threads` (the rule's thread count) that caps BLAS and torch threads during the call."""

    @functools.wraps(fn)
    def wrapper(*args, threads: int | None = None, **kwargs):
        with limit_threads(threads):
            return fn(*args, **kwargs)

    return wrapper

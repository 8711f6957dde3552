"""One way to cap a stage's threads: BLAS/OpenMP pools (threadpoolctl) and torch together, for the duration of
a call. On a shared 2-core machine an uncapped BLAS pool made each probe fit 30-60x slower (oversubscription)."""

from __future__ import annotations

import contextlib
import functools

import torch
from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def limit_threads(threads: int | None):
    """Cap BLAS/OpenMP (threadpoolctl) and torch threads to the rule's `threads` for the duration. On a
    shared 2-core machine an uncapped BLAS pool made each probe fit 30-60x slower (oversubscription)."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        with threadpool_limits(limits=int(threads)):
            yield
    finally:
        torch.set_num_threads(before)


def threaded(fn):
    """Adds a keyword `threads` (the rule's thread count) that caps BLAS and torch threads during the call."""

    @functools.wraps(fn)
    def wrapper(*args, threads: int | None = None, **kwargs):
        with limit_threads(threads):
            return fn(*args, **kwargs)

    return wrapper

"""Streaming writer of a memory-mappable .npy shard whose first dimension is only known at the end.

A shard of a large cohort holds hundreds of MB of slices; collecting them in RAM first would make peak
memory scale with the shard. The header is written last into space reserved up front; the .npy format
allows a space-padded header, so `np.load(..., mmap_mode="r")` reads the result like any other file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from cohortlens.io.tables import atomic_path

_HEADER_BYTES = 256  # a multiple of 64 so the data block stays aligned for memory mapping


class NpyShardWriter:
    def __init__(self, path: str | os.PathLike, frame_shape: tuple[int, ...], dtype=np.float16):
        self.path = Path(path)
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.dtype = np.dtype(dtype)
        self.n = 0
        self._ctx = atomic_path(self.path, ".npy")
        self._tmp = self._ctx.__enter__()
        self._fh = open(self._tmp, "wb")
        self._fh.write(b"\0" * _HEADER_BYTES)

    def append(self, frames: np.ndarray) -> int:
        """Append frames of shape (k, *frame_shape); returns the row index of the first one."""
        frames = np.ascontiguousarray(frames, dtype=self.dtype)
        if frames.shape[1:] != self.frame_shape:
            raise ValueError(f"frame shape {frames.shape[1:]} != shard canvas {self.frame_shape}")
        first = self.n
        self._fh.write(memoryview(frames).cast("B"))  # no intermediate bytes copy
        self.n += frames.shape[0]
        return first

    def _header(self) -> bytes:
        shape = (self.n, *self.frame_shape)
        text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (self.dtype.str, shape)
        room = _HEADER_BYTES - 10
        if len(text) + 1 > room:
            raise ValueError("shard header does not fit the reserved space")
        text = text.ljust(room - 1) + "\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", room) + text.encode("latin1")

    def close(self) -> None:
        self._fh.seek(0)
        self._fh.write(self._header())
        self._fh.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._fh.close()
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

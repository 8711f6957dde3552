"""From a loaded image to normalised 2-D slices on the cohort's canvas."""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation


class SliceError(ValueError):
    """A per-image problem found while slicing; str() is the quarantine reason."""


def canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip voxel axes to the closest RAS+ orientation; returns (array view, voxel spacing in mm)."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    rot = affine[:3, :3]
    if np.count_nonzero(rot) == 3 and (np.count_nonzero(rot, axis=0) == 1).all():
        # axis-aligned affine (nearly every scanner export): the orientation is read off the signs,
        # without io_orientation's SVD
        ornt = np.column_stack([np.argmax(np.abs(rot), axis=0), np.sign(rot.sum(axis=0))]).astype(float)
    else:
        ornt = io_orientation(affine)
    data = apply_orientation(array, ornt)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = zooms
    return data, spacing


def choose_slice_axis(spacing: np.ndarray, configured: str | int = "auto") -> int:
    """The acquisition's slice axis: the largest voxel spacing unless the region config names one.

    Sagittal spine MRI has thick sagittal slices, so 'auto' gives sagittal slices there and axial
    slices for an axially acquired cohort.
    """
    named = {"sagittal": 0, "coronal": 1, "axial": 2}
    if configured == "auto" or configured is None:
        return int(np.argmax(spacing))  # ties resolve to the lowest axis (sagittal first)
    if isinstance(configured, str):
        if configured not in named:
            raise ValueError(f"slice_axis must be auto, sagittal, coronal, axial or 0-2, not {configured!r}")
        return named[configured]
    return int(configured)


def slice_stack(array: np.ndarray, affine: np.ndarray | None, slice_axis: str | int = "auto") -> np.ndarray:
    """(n_slices, rows, cols) in radiological display orientation.

    For any RAS+ axis the in-plane 2-D array (a, b) is shown transposed and flipped: superior (or anterior
    for axial) at the top, anterior (or patient right) on the left, the convention of sagittal spine MRI
    where the back of the neck is the right edge.
    """
    if affine is None:  # projection image: already in display orientation
        if array.ndim != 2:
            raise SliceError(f"wrong dimensionality: {array.ndim}-D projection image of shape {array.shape}")
        return array[None]
    if array.ndim != 3:
        raise SliceError(f"wrong dimensionality: {array.ndim}-D image of shape {array.shape}, expected a 3-D volume")
    data, spacing = canonical(array, affine)
    axis = choose_slice_axis(spacing, slice_axis)
    return np.moveaxis(data, axis, 0).transpose(0, 2, 1)[:, ::-1, ::-1]


def intensity_max(array: np.ndarray, how: str | float = "max") -> tuple[float, bool]:
    """The value mapped to +1 (volume maximum or a percentile) and whether values fall outside [0, it].

    Rejects NaN/Inf and empty volumes. Computed on the array as read (contiguous), before any view.
    """
    lo, hi = float(array.min()), float(array.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise SliceError(f"NaN/Inf voxels: {n_bad} of {array.size}")
    vmax = hi if how == "max" else float(np.percentile(array, float(how)))
    if vmax <= 0:
        raise SliceError(f"empty image: intensity maximum is {vmax:g} (all-zero or non-positive volume)")
    return vmax, (lo < 0 or hi > vmax)


def normalise_(array: np.ndarray, vmax: float, clip: bool = True) -> np.ndarray:
    """In place: linear [0, vmax] -> [-1, 1] (the papers' normalisation), values outside clipped.

    Runs on the array as read (contiguous), before any reorientation view, so every pass is sequential.
    MR volumes with vmax = max need no clipping (`clip=False` from intensity_max) and skip that pass.
    """
    np.multiply(array, np.float32(2.0 / vmax), out=array)
    array -= np.float32(1.0)
    if clip:
        np.clip(array, -1.0, 1.0, out=array)
    return array


def to_canvas(stack: np.ndarray, canvas: tuple[int, int], dtype=np.float16) -> np.ndarray:
    """Center pad (background -1) or center crop every slice to the cohort canvas, casting on the way:
    the one strided pass over a reoriented view is also the float16 conversion."""
    n, h, w = stack.shape
    H, W = canvas
    sy, sx = max(0, (h - H) // 2), max(0, (w - W) // 2)
    dy, dx = max(0, (H - h) // 2), max(0, (W - w) // 2)
    ch, cw = min(h, H), min(w, W)
    out = np.full((n, H, W), -1.0, dtype=dtype)
    out[:, dy : dy + ch, dx : dx + cw] = stack[:, sy : sy + ch, sx : sx + cw]
    return out


def rescale(stack: np.ndarray, how: str | float = "max") -> np.ndarray:
    """[0, max] -> [-1, 1] of a whole stack into a new float32 array (values below 0 clip to -1)."""
    return normalise_(np.array(stack, dtype=np.float32, copy=True), *intensity_max(stack, how))


def center_indices(n_slices: int, n_center: int) -> range:
    start = (n_slices - n_center) // 2
    return range(start, start + n_center)

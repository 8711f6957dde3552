"""From a loaded image to normalised 2-D slices on the cohort's canvas."""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation


class SliceError(ValueError):
    """A per-image problem found while slicing; str() is the quarantine reason."""


def canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip voxel axes to the closest RAS+ orientation; returns (array, voxel spacing in mm)."""
    ornt = io_orientation(affine)
    data = apply_orientation(array, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
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


def rescale(stack: np.ndarray, intensity_max: str | float = "max") -> np.ndarray:
    """Linear [0, max] -> [-1, 1] as in the papers; max is the volume maximum or a configured percentile."""
    finite = np.isfinite(stack)
    if not finite.all():
        n_bad = int(stack.size - np.count_nonzero(finite))
        raise SliceError(f"{n_bad} NaN/Inf voxels")
    vmax = float(stack.max()) if intensity_max == "max" else float(np.percentile(stack, float(intensity_max)))
    if vmax <= 0:
        raise SliceError(f"empty image: intensity maximum is {vmax:g} (all-zero or non-positive volume)")
    out = np.clip(stack, 0.0, vmax, dtype=np.float32)
    out *= 2.0 / vmax
    out -= 1.0
    return out


def fit_canvas(stack: np.ndarray, canvas: tuple[int, int], fill: float = -1.0) -> np.ndarray:
    """Center pad (with background -1) or center crop every slice to the cohort's canvas."""
    n, h, w = stack.shape
    H, W = canvas
    out = np.full((n, H, W), fill, dtype=np.float32)
    sy, sx = max(0, (h - H) // 2), max(0, (w - W) // 2)
    dy, dx = max(0, (H - h) // 2), max(0, (W - w) // 2)
    ch, cw = min(h, H), min(w, W)
    out[:, dy : dy + ch, dx : dx + cw] = stack[:, sy : sy + ch, sx : sx + cw]
    return out


def center_indices(n_slices: int, n_center: int) -> range:
    start = (n_slices - n_center) // 2
    return range(start, start + n_center)

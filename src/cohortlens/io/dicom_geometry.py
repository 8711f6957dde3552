"""DICOM slice geometry: the plane of each slice or frame (from the classic attributes or the enhanced
functional groups) and the voxel -> RAS affine of a stack of them, rejecting stacks that a regular affine would
misplace (mixed orientations, duplicate positions, gaps, uneven spacing, a bent line of positions).

Error messages carry geometry figures only, never header values (see `cohortlens.io.image`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cohortlens.io.image import ImageReadError

__all__ = ["Plane", "classic_plane", "fg_item", "frame_planes", "stack_geometry"]

# Direction cosines are stored as decimal strings with ~6 digits; anything
# beyond this is a genuinely different orientation (localiser, radial stack).
_ORIENTATION_ATOL = 1e-3


@dataclass
class Plane:
    row: np.ndarray  # unit direction of increasing column index (LPS)
    col: np.ndarray  # unit direction of increasing row index (LPS)
    position: np.ndarray  # centre of the first transmitted pixel (LPS mm)
    spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float | None  # slice step hint for one-slice volumes


def _has_fg(ds) -> bool:
    return "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds


def fg_item(ds, frame: int, sequence: str):
    """First item of a functional-group macro, per-frame before shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        seq = per_frame[frame].get(sequence)
        if seq:
            return seq[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(sequence)
        if seq:
            return seq[0]
    return None


def _get(item, keyword):
    return None if item is None else item.get(keyword)


def _thickness(*sources) -> float | None:
    for src in sources:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = _get(src, keyword)
            try:
                if value not in (None, "") and abs(float(value)) > 0:
                    return abs(float(value))
            except (TypeError, ValueError):
                continue
    return None


def classic_plane(ds, where: str) -> Plane | None:
    iop, ipp, ps = (ds.get(k) for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"))
    if not iop or not ipp or not ps:
        return None
    return _parse_plane(iop, ipp, ps, _thickness(ds), where)


def frame_planes(ds, n: int, where: str) -> list[Plane] | None:
    if not _has_fg(ds):
        # A classic single-frame image; classic multi-frame objects have only
        # one position for all frames, which is no geometry for a stack.
        plane = classic_plane(ds, where) if n == 1 else None
        return None if plane is None else [plane]
    planes = []
    for i in range(n):
        orientation = fg_item(ds, i, "PlaneOrientationSequence")
        position = fg_item(ds, i, "PlanePositionSequence")
        measures = fg_item(ds, i, "PixelMeasuresSequence")
        iop = _get(orientation, "ImageOrientationPatient") or ds.get("ImageOrientationPatient")
        ipp = _get(position, "ImagePositionPatient") or (ds.get("ImagePositionPatient") if n == 1 else None)
        ps = _get(measures, "PixelSpacing") or ds.get("PixelSpacing")
        if not iop or not ipp or not ps:
            return None
        planes.append(_parse_plane(iop, ipp, ps, _thickness(measures, ds), where))
    return planes


def _parse_plane(iop, ipp, ps, thickness, where: str) -> Plane:
    try:
        iop_v = np.array([float(v) for v in iop], dtype=np.float64)
        ipp_v = np.array([float(v) for v in ipp], dtype=np.float64)
        ps_v = np.array([float(v) for v in ps], dtype=np.float64)
    except (TypeError, ValueError):
        raise ImageReadError(f"unreadable DICOM: {where}non-numeric slice geometry") from None
    if iop_v.shape != (6,) or ipp_v.shape != (3,) or ps_v.shape != (2,):
        raise ImageReadError(f"unreadable DICOM: {where}malformed slice geometry")
    if not (np.all(np.isfinite(iop_v)) and np.all(np.isfinite(ipp_v)) and np.all(ps_v > 0)):
        raise ImageReadError(f"unreadable DICOM: {where}invalid slice geometry")
    row, col = iop_v[:3], iop_v[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if abs(nr - 1) > 1e-2 or abs(nc - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise ImageReadError(
            f"unreadable DICOM: {where}ImageOrientationPatient is not two orthogonal unit vectors"
        )
    return Plane(row / nr, col / nc, ipp_v, (float(ps_v[0]), float(ps_v[1])), thickness)


def _fmt(mm: float) -> str:
    return repr(round(float(mm), 3))


def stack_geometry(planes: list[Plane], tol: float, what: str, unit: str):
    """Order of the planes along the normal, and the voxel -> RAS affine.

    Raises ImageReadError for mixed orientations, duplicates, gaps and uneven
    spacing, because a regular affine would misplace such slices.
    """
    n = len(planes)
    rows = np.array([p.row for p in planes])
    cols = np.array([p.col for p in planes])
    if np.abs(rows - rows[0]).max() > _ORIENTATION_ATOL or np.abs(cols - cols[0]).max() > _ORIENTATION_ATOL:
        distinct = len({tuple(np.round(np.r_[r, c], 3)) for r, c in zip(rows, cols)})
        raise ImageReadError(f"{what} mixes orientations: {distinct} distinct orientations among {n} {unit}")
    spacings = np.array([p.spacing for p in planes])
    if np.abs(spacings / spacings[0] - 1).max() > 1e-3:
        raise ImageReadError(f"{what} {unit} differ in pixel spacing")

    first = planes[0]
    normal = np.cross(first.row, first.col)
    positions = np.array([p.position for p in planes])
    order = _check_spacing(positions @ normal, tol, what, unit)
    positions = positions[order]

    if n > 1:
        # The mean step vector rather than normal * spacing: with gantry tilt
        # the slices shift in-plane too, and the affine must follow them.
        step = (positions[-1] - positions[0]) / (n - 1)
        predicted = positions[0] + np.arange(n)[:, None] * step
        drift = np.linalg.norm(positions - predicted, axis=1).max()
        if drift > max(tol * np.linalg.norm(step), 0.01):
            raise ImageReadError(
                f"{what} positions do not lie on a straight line ({_fmt(drift)} mm off for {_fmt(np.linalg.norm(step))} mm steps)"
            )
    else:
        step = normal * (first.thickness or 1.0)

    affine = np.eye(4)
    affine[:3, 0] = first.row * first.spacing[1]
    affine[:3, 1] = first.col * first.spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    affine[:2, :] *= -1  # DICOM patient space is LPS; nibabel's world is RAS
    return order, affine


def _check_spacing(dist: np.ndarray, tol: float, what: str, unit: str) -> np.ndarray:
    order = np.argsort(dist, kind="stable")
    if len(order) < 2:
        return order
    gaps = np.diff(dist[order])

    real = gaps[gaps > 1e-4]
    dup_limit = max(1e-4, 0.02 * float(np.median(real))) if real.size else 1e-4
    if np.any(gaps < dup_limit):
        distinct = int(np.sum(gaps >= dup_limit)) + 1
        raise ImageReadError(
            f"{what} has duplicate {unit[:-1]} positions: {len(order)} {unit} at {distinct} distinct positions"
        )

    # Expected spacing = the value most gaps agree with (ties -> the smallest):
    # a missing slice only ever makes one gap larger, so the median of a short
    # series could be pulled towards it.
    s = np.sort(gaps)
    lo = np.searchsorted(s, s * (1 - tol), side="left")
    hi = np.searchsorted(s, s * (1 + tol), side="right")
    best = int(np.argmax(hi - lo))
    expected = float(s[lo[best] : hi[best]].mean())

    for k, gap in enumerate(gaps):
        ratio = gap / expected
        if ratio > 1 + tol or ratio < 1 - tol:
            kind = "has a gap" if ratio >= 1.5 else "has uneven spacing"
            raise ImageReadError(
                f"{what} {kind}: spacing {_fmt(expected)} mm expected, "
                f"{_fmt(gap)} mm between {unit} {k} and {k + 1}"
            )
    return order

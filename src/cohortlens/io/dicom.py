"""DICOM reading: single files, enhanced multi-frame objects and series folders.

Privacy rule for this module: only pixel data and geometry leave it. Error
messages are built from our own wording plus geometry figures and file names;
pydicom's own parse errors are not quoted (they can echo element values) and
exceptions are raised ``from None`` so no chained exception carries them either.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut

from cohortlens.io.readers import ImageReadError, LoadedImage, _short, rgb_to_gray

__all__ = ["read_file", "read_series"]

# Suffixes under which a non-DICOM file is reported as a broken DICOM rather
# than as an unsupported format (archives often use bare or UID-like names).
_DICOM_SUFFIXES = {"", ".dcm", ".dicom", ".dic", ".ima"}

# Projection / photographic modalities: even when such a file carries plane
# geometry, it is a picture, not a slice of a volume.
_PROJECTION_MODALITIES = frozenset(
    {"CR", "DX", "MG", "RF", "XA", "IO", "PX", "DF", "RG", "US", "ES", "XC", "GM", "OP", "SM"}
)

# Direction cosines are stored as decimal strings with ~6 digits; anything
# beyond this is a genuinely different orientation (localiser, radial stack).
_ORIENTATION_ATOL = 1e-3
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class _Plane:
    row: np.ndarray  # unit direction of increasing column index (LPS)
    col: np.ndarray  # unit direction of increasing row index (LPS)
    position: np.ndarray  # centre of the first transmitted pixel (LPS mm)
    spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float | None  # slice step hint for one-slice volumes


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep pydicom from quoting element values in warnings and log records.

    pydicom validates values lazily and reports invalid ones (names, dates,
    UIDs) verbatim via warnings *and* the 'pydicom' logger; either would leak
    header values into pipeline logs.
    """
    settings = pydicom_config.settings
    # Restore the raw attribute where it exists: its default None means "follow
    # config.enforce_valid_values", which writing back a concrete value would freeze.
    attr = (
        "_reading_validation_mode"
        if hasattr(settings, "_reading_validation_mode")
        else "reading_validation_mode"
    )
    previous = getattr(settings, attr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settings.reading_validation_mode = pydicom_config.IGNORE
        try:
            yield
        finally:
            setattr(settings, attr, previous)


class _NotDicom(Exception):
    pass


def _dcmread(path: Path, where: str, *, headers_only: bool = False):
    try:
        return pydicom.dcmread(path, stop_before_pixels=headers_only)
    except InvalidDicomError:
        raise _NotDicom() from None
    except Exception as exc:
        # Deliberately not quoting str(exc): parse errors may contain raw values.
        raise ImageReadError(
            f"unreadable DICOM: {where}header could not be parsed ({type(exc).__name__})"
        ) from None


def read_file(path: Path, *, spacing_tolerance: float = 0.05) -> LoadedImage:
    """One DICOM file: 2-D picture, one-slice volume, or multi-frame volume."""
    with _quiet():
        try:
            ds = _dcmread(path, "")
        except _NotDicom:
            suffix = path.suffix.lower()
            if suffix in _DICOM_SUFFIXES or suffix[1:].isdigit():
                raise ImageReadError("unreadable DICOM: not a DICOM file") from None
            raise ImageReadError(f"unsupported image format: {suffix}") from None
        return _from_dataset(ds, spacing_tolerance, where="")


def read_series(folder: Path, *, spacing_tolerance: float = 0.05) -> LoadedImage:
    """All DICOM images below ``folder`` (recursively) as one volume.

    Slices are ordered by their position along the slice normal, never by
    InstanceNumber or file name, both of which are unreliable across vendors.
    A folder holding a single image file is read like that file on its own
    (so its kind is that of the file, e.g. 'dicom-single').
    """
    with _quiet():
        headers = []
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            where = f"{f.relative_to(folder)}: "
            try:
                ds = _dcmread(f, where, headers_only=True)
            except _NotDicom:
                continue  # README, thumbnails, .DS_Store ...
            # DICOMDIR, SR, RT structure sets and the like carry no image.
            if "Rows" not in ds or "Columns" not in ds:
                continue
            headers.append((f, where, ds))
        if not headers:
            raise ImageReadError("no DICOM images in folder")

        series = {ds.get("SeriesInstanceUID") for _, _, ds in headers}
        if len(series) > 1:
            raise ImageReadError(f"DICOM folder holds {len(series)} series; expected one")

        if len(headers) == 1:
            f, where, _ = headers[0]
            return _from_dataset(_read_full(f, where), spacing_tolerance, where=where)
        return _assemble_series(headers, spacing_tolerance)


def _read_full(path: Path, where: str):
    try:
        return _dcmread(path, where)
    except _NotDicom:  # it parsed a moment ago; treat a change as corruption
        raise ImageReadError(f"unreadable DICOM: {where}not a DICOM file") from None


def _assemble_series(headers, tol: float) -> LoadedImage:
    n = len(headers)
    multi = sum(_n_frames(ds) > 1 for _, _, ds in headers)
    if multi:
        raise ImageReadError(f"DICOM series contains multi-frame files ({multi} of {n} files)")
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, _, ds in headers}
    if len(sizes) > 1:
        raise ImageReadError(f"DICOM series slices differ in size ({len(sizes)} sizes among {n} slices)")
    rows, cols = sizes.pop()

    planes = []
    for _, where, ds in headers:
        plane = _classic_plane(ds, where)
        if plane is None:
            raise ImageReadError(
                f"DICOM series lacks slice geometry: {where}no ImagePositionPatient/"
                "ImageOrientationPatient/PixelSpacing"
            )
        planes.append(plane)
    order, affine = _stack_geometry(planes, tol, "DICOM series", "slices")

    # (k, rows, cols) in C order is (cols, rows, k) in Fortran order, so the
    # final transpose is a free view, like the arrays nibabel hands out.
    vol = np.empty((n, rows, cols), dtype=np.float32)
    for slot, idx in enumerate(order):
        f, where, _ = headers[idx]
        ds = _read_full(f, where)
        frames = _gray_frames(ds, where)
        if frames.shape != (1, rows, cols):
            raise ImageReadError(f"unreadable DICOM: {where}pixel data does not match Rows/Columns")
        vol[slot] = frames[0]
    return LoadedImage(array=vol.transpose(2, 1, 0), affine=affine, kind="dicom-series")


def _from_dataset(ds, tol: float, where: str) -> LoadedImage:
    n = _n_frames(ds)
    if n > 1:
        planes = _frame_planes(ds, n, where)
        if planes is None:
            raise ImageReadError(
                f"unsupported DICOM: {where}multi-frame image without plane geometry ({n} frames)"
            )
        order, affine = _stack_geometry(planes, tol, "DICOM multi-frame", "frames")
        frames = _gray_frames(ds, where)
        vol = np.ascontiguousarray(frames[order])
        return LoadedImage(array=vol.transpose(2, 1, 0), affine=affine, kind="dicom-multiframe")

    projection = str(ds.get("Modality", "")).strip().upper() in _PROJECTION_MODALITIES
    planes = None if projection else _frame_planes(ds, 1, where)
    frames = _gray_frames(ds, where)
    if planes is None:
        return LoadedImage(array=frames[0], affine=None, kind="dicom-single")
    _, affine = _stack_geometry(planes, tol, "DICOM image", "slices")
    return LoadedImage(array=frames.transpose(2, 1, 0), affine=affine, kind="dicom-single")


# --------------------------------------------------------------------------- pixels


def _n_frames(ds) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def _gray_frames(ds, where: str) -> np.ndarray:
    """Decoded pixels as float32 (frames, rows, cols), modality values, high = bright."""
    if not any(k in ds for k in _PIXEL_DATA_KEYWORDS):
        raise ImageReadError(f"unreadable DICOM: {where}no pixel data")
    try:
        pix = ds.pixel_array
    except Exception as exc:
        # Decoder messages describe lengths and codecs, not header values.
        raise ImageReadError(
            f"unreadable DICOM: {where}pixel data could not be decoded ({_short(exc)})"
        ) from None

    n = _n_frames(ds)
    spp = int(ds.get("SamplesPerPixel") or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if n == 1:
        pix = pix[np.newaxis]
    expected_ndim = 4 if spp == 3 else 3
    if pix.ndim != expected_ndim or pix.shape[0] != n:
        raise ImageReadError(f"unreadable DICOM: {where}unexpected pixel array shape {pix.shape}")

    if photometric == "PALETTE COLOR":
        try:
            return rgb_to_gray(apply_color_lut(pix, ds))
        except Exception as exc:
            raise ImageReadError(f"unreadable DICOM: {where}bad palette ({type(exc).__name__})") from None
    if spp == 3:
        # pydicom already converts YBR_* to RGB when decoding (as_rgb default),
        # and colour images have no modality LUT.
        return rgb_to_gray(pix)

    out, lo, hi = _apply_modality(ds, pix, n)
    if photometric == "MONOCHROME1":
        # Reflect within the modality-mapped range of stored values, so that
        # the result keeps the same value range and the same meaning across
        # images of one device, independent of each image's content.
        out = np.subtract((lo + hi)[:, None, None], out, out=out)
    return out


def _stored_range(ds) -> np.ndarray:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    return np.array([0, 2**bits - 1])


def _apply_modality(ds, pix: np.ndarray, n: int):
    """Return (float32 values, per-frame low bound, per-frame high bound)."""
    stored = _stored_range(ds)
    if ds.get("ModalityLUTSequence") and pix.dtype.kind in "iu":
        out = apply_modality_lut(pix, ds).astype(np.float32)
        mapped = apply_modality_lut(stored, ds).astype(np.float32)
        lo = np.full(n, mapped.min(), np.float32)
        hi = np.full(n, mapped.max(), np.float32)
        return out, lo, hi

    slopes = np.ones(n, np.float32)
    intercepts = np.zeros(n, np.float32)
    for i in range(n):
        item = _fg_item(ds, i, "PixelValueTransformationSequence")
        src = item if item is not None else ds
        slope, intercept = src.get("RescaleSlope"), src.get("RescaleIntercept")
        if slope not in (None, ""):
            slopes[i] = float(slope)
        if intercept not in (None, ""):
            intercepts[i] = float(intercept)

    out = pix.astype(np.float32)
    if np.any(slopes != 1):
        out *= slopes[:, None, None]
    if np.any(intercepts != 0):
        out += intercepts[:, None, None]
    lo = stored[0] * slopes + intercepts
    hi = stored[1] * slopes + intercepts
    return out, np.minimum(lo, hi), np.maximum(lo, hi)


# ------------------------------------------------------------------------- geometry


def _has_fg(ds) -> bool:
    return "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds


def _fg_item(ds, frame: int, sequence: str):
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


def _classic_plane(ds, where: str) -> _Plane | None:
    iop, ipp, ps = (ds.get(k) for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"))
    if not iop or not ipp or not ps:
        return None
    return _parse_plane(iop, ipp, ps, _thickness(ds), where)


def _frame_planes(ds, n: int, where: str) -> list[_Plane] | None:
    if not _has_fg(ds):
        # A classic single-frame image; classic multi-frame objects have only
        # one position for all frames, which is no geometry for a stack.
        plane = _classic_plane(ds, where) if n == 1 else None
        return None if plane is None else [plane]
    planes = []
    for i in range(n):
        orientation = _fg_item(ds, i, "PlaneOrientationSequence")
        position = _fg_item(ds, i, "PlanePositionSequence")
        measures = _fg_item(ds, i, "PixelMeasuresSequence")
        iop = _get(orientation, "ImageOrientationPatient") or ds.get("ImageOrientationPatient")
        ipp = _get(position, "ImagePositionPatient") or (ds.get("ImagePositionPatient") if n == 1 else None)
        ps = _get(measures, "PixelSpacing") or ds.get("PixelSpacing")
        if not iop or not ipp or not ps:
            return None
        planes.append(_parse_plane(iop, ipp, ps, _thickness(measures, ds), where))
    return planes


def _parse_plane(iop, ipp, ps, thickness, where: str) -> _Plane:
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
    return _Plane(row / nr, col / nc, ipp_v, (float(ps_v[0]), float(ps_v[1])), thickness)


def _fmt(mm: float) -> str:
    return repr(round(float(mm), 3))


def _stack_geometry(planes: list[_Plane], tol: float, what: str, unit: str):
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

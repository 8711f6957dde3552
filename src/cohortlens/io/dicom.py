"""DICOM reading: single files, enhanced multi-frame objects and series folders.

Privacy rule for this module: only pixel data and geometry leave it. Error
messages are built from our own wording plus geometry figures and file names;
pydicom's own parse errors are not quoted (they can echo element values) and
exceptions are raised ``from None`` so no chained exception carries them either.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut

from cohortlens.io.dicom_geometry import classic_plane, fg_item, frame_planes, stack_geometry
from cohortlens.io.image import ImageReadError, LoadedImage, rgb_to_gray, short_reason

__all__ = ["read_file", "read_series"]

# Suffixes under which a non-DICOM file is reported as a broken DICOM rather
# than as an unsupported format (archives often use bare or UID-like names).
_DICOM_SUFFIXES = {"", ".dcm", ".dicom", ".dic", ".ima"}

# Projection / photographic modalities: even when such a file carries plane
# geometry, it is a picture, not a slice of a volume.
_PROJECTION_MODALITIES = frozenset(
    {"CR", "DX", "MG", "RF", "XA", "IO", "PX", "DF", "RG", "US", "ES", "XC", "GM", "OP", "SM"}
)

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


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
        plane = classic_plane(ds, where)
        if plane is None:
            raise ImageReadError(
                f"DICOM series lacks slice geometry: {where}no ImagePositionPatient/"
                "ImageOrientationPatient/PixelSpacing"
            )
        planes.append(plane)
    order, affine = stack_geometry(planes, tol, "DICOM series", "slices")

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
        planes = frame_planes(ds, n, where)
        if planes is None:
            raise ImageReadError(
                f"unsupported DICOM: {where}multi-frame image without plane geometry ({n} frames)"
            )
        order, affine = stack_geometry(planes, tol, "DICOM multi-frame", "frames")
        frames = _gray_frames(ds, where)
        vol = np.ascontiguousarray(frames[order])
        return LoadedImage(array=vol.transpose(2, 1, 0), affine=affine, kind="dicom-multiframe")

    projection = str(ds.get("Modality", "")).strip().upper() in _PROJECTION_MODALITIES
    planes = None if projection else frame_planes(ds, 1, where)
    frames = _gray_frames(ds, where)
    if planes is None:
        return LoadedImage(array=frames[0], affine=None, kind="dicom-single")
    _, affine = stack_geometry(planes, tol, "DICOM image", "slices")
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
            f"unreadable DICOM: {where}pixel data could not be decoded ({short_reason(exc)})"
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
        item = fg_item(ds, i, "PixelValueTransformationSequence")
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

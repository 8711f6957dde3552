"""Image readers: NIfTI, DICOM (single file, multi-frame, series folder) and PNG/JPEG.

The dispatcher: `read_image` picks the reader by path. The returned `LoadedImage` and the
`ImageReadError` it raises live in `cohortlens.io.image` (with the privacy rule: only pixel
data and geometry leave the readers).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from cohortlens.io import dicom
from cohortlens.io.image import ImageReadError, LoadedImage, rgb_to_gray, short_reason

__all__ = ["read_image"]

_RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}


def read_image(path: str | os.PathLike, *, spacing_tolerance: float = 0.05) -> LoadedImage:
    """Read one image (file or DICOM series folder) into a :class:`LoadedImage`.

    Dispatch: a directory -> DICOM series; ``.nii``/``.nii.gz`` -> nibabel
    (the affine is kept whatever the dimensionality); ``.png``/``.jpg``/``.jpeg``
    -> Pillow, grayscale; anything else -> DICOM if it parses as DICOM.

    ``spacing_tolerance`` is the relative deviation from the regular slice
    spacing that a DICOM series / multi-frame stack may show before it is
    rejected as having a gap or uneven spacing.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError("missing file")
    if p.is_dir():
        return dicom.read_series(p, spacing_tolerance=spacing_tolerance)

    name = p.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return _read_nifti(p)
    if p.suffix.lower() in _RASTER_SUFFIXES:
        return _read_raster(p)

    return dicom.read_file(p, spacing_tolerance=spacing_tolerance)


def _squeeze_trailing(arr: np.ndarray) -> np.ndarray:
    """Drop singleton axes after the third, e.g. (x, y, z, 1) -> (x, y, z).

    NIfTI writers often pad 3-D data with a unit time axis; indexing (rather
    than np.squeeze) keeps genuine singleton spatial axes and is always a view.
    """
    n = arr.ndim
    while n > 3 and arr.shape[n - 1] == 1:
        n -= 1
    if n == arr.ndim:
        return arr
    return arr[(slice(None),) * n + (0,) * (arr.ndim - n)]


try:  # Intel ISA-L inflates gzip ~2x faster than zlib; decompression dominates reading .nii.gz
    from isal.igzip import decompress as _gunzip
except ImportError:  # pragma: no cover - optional accelerator
    from gzip import decompress as _gunzip


def _read_nifti(p: Path) -> LoadedImage:
    import nibabel as nib

    try:
        if p.name.lower().endswith(".gz"):
            # One-shot inflate of the whole file instead of nibabel's streamed gzip reads.
            raw = _gunzip(p.read_bytes())
            kind = nib.Nifti2Image if _is_nifti2(raw) else nib.Nifti1Image
            img = kind.from_bytes(raw)
        else:
            img = nib.load(p)
        # get_fdata(dtype=float32) scales straight into float32 in one pass;
        # asarray only unwraps a possible memmap, it does not copy.
        arr = np.asarray(img.get_fdata(dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
    except FileNotFoundError:
        raise ImageReadError("missing file") from None
    except Exception as exc:  # nibabel, zlib and isal raise a zoo of types for bad files
        gz_problem = _gzip_problem(p) if p.name.lower().endswith(".gz") else None
        raise ImageReadError(gz_problem or f"unreadable NIfTI: {short_reason(exc)}") from exc
    return LoadedImage(array=_squeeze_trailing(arr), affine=affine, kind="nifti")


def _is_nifti2(raw: bytes) -> bool:
    return raw[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")  # sizeof_hdr 540, either byte order


def _gzip_problem(p: Path) -> str | None:
    """Name what is wrong with a .gz file's compression layer, if anything.

    nibabel reports a gzip stream cut inside the header as "Cannot work out
    file type", so after a failure the stream is checked on its own (only on
    the error path, which keeps good files at bare-nibabel speed).
    """
    try:
        with open(p, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                return "unreadable NIfTI: not gzip-compressed despite the .gz name"
        with gzip.open(p, "rb") as gz:
            while gz.read(1 << 22):
                pass
    except EOFError as exc:
        return f"truncated gzip: {short_reason(exc)}"
    except (zlib.error, gzip.BadGzipFile) as exc:
        return f"corrupt gzip: {short_reason(exc)}"
    except OSError:
        return None
    return None


def _read_raster(p: Path) -> LoadedImage:
    from PIL import Image, ImageOps

    try:
        with Image.open(p) as im:
            # Phones and some scanners store rotated pixels plus an EXIF flag;
            # the contract is display orientation.
            im = ImageOps.exif_transpose(im)
            arr = _pil_to_gray(im)
    except Exception as exc:  # truncated files, decompression bombs, unknown formats
        raise ImageReadError(f"unreadable image: {short_reason(exc)}") from exc
    return LoadedImage(array=arr, affine=None, kind="raster")


def _pil_to_gray(im) -> np.ndarray:
    mode = im.mode
    if mode in ("L", "I", "F") or mode.startswith("I;16"):
        # 16-bit and float modes would be clipped to 8 bits by convert("L").
        return np.asarray(im).astype(np.float32)
    if mode in ("1", "LA", "La"):
        return np.asarray(im.convert("L")).astype(np.float32)
    rgb = np.asarray(im.convert("RGB"))
    return rgb_to_gray(rgb)

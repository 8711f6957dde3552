"""The image types every reader shares: what a read returns (`LoadedImage`), what a bad file raises
(`ImageReadError`), and the small helpers both the dispatcher (`readers`) and the DICOM reader (`dicom`) use.

Only pixel data and geometry leave the readers. DICOM header values (names, IDs, dates, UIDs, institutions ...)
are never copied into a returned object or into an error message, because error messages end up in a
quarantine table that is shared more widely than the images themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ImageReadError", "LoadedImage", "LUMA_WEIGHTS", "rgb_to_gray", "short_reason"]

# ITU-R BT.601 luma weights: the same ones Pillow uses for mode "L", so a colour
# DICOM and the same picture saved as PNG come out (nearly) identical.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class ImageReadError(Exception):
    """A per-image problem; ``str(exc)`` is a short human reason for a quarantine table.

    Reasons start with a stable category ('missing file', 'truncated gzip',
    'unreadable NIfTI', 'unreadable DICOM', 'DICOM series has a gap', ...) so
    they can be grouped, followed by details that never contain header values.
    """


@dataclass
class LoadedImage:
    """Pixels and geometry of one image.

    array:  float32. Volumes are (i, j, k) voxel arrays as stored (nibabel
            convention, not reoriented); projection images are 2-D (rows, cols)
            in display orientation; other dimensionalities are returned as-is.
    affine: 4x4 float64 voxel -> RAS+ mm for volumes, None for 2-D images.
    kind:   'nifti' | 'dicom-series' | 'dicom-multiframe' | 'dicom-single' | 'raster'
    """

    array: np.ndarray
    affine: np.ndarray | None
    kind: str


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """One line for a table cell; decoder errors put the useful part on later lines."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """Luminance of an (..., 3) RGB array as float32, without 8-bit rounding."""
    r, g, b = LUMA_WEIGHTS
    out = rgb[..., 0].astype(np.float32) * np.float32(r)
    out += rgb[..., 1].astype(np.float32) * np.float32(g)
    out += rgb[..., 2].astype(np.float32) * np.float32(b)
    return out

"""Pillow panels shared by the findings' pictures (`discover.explain`'s mean images, `counterfactuals`' strips):
grey images, a diverging difference map, the built-in font and the text it can draw. No plotting library: plotly's
static export would start a browser, and these are plain pixel grids."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFont

SET_COLOUR = (220, 50, 32)
REST_COLOUR = (30, 110, 220)

# Pillow's built-in font has no glyphs for these
_PLAIN = str.maketrans({"×": "x", "−": "-", "—": "-", "²": "^2", "≥": ">=", "≤": "<=", "σ": "sd", "≠": "!="})


def plain_text(text: str) -> str:
    """`text` with the characters the built-in font cannot draw spelt in ASCII."""
    return text.translate(_PLAIN)


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def grey_panel(image: np.ndarray, size: int) -> Image.Image:
    """A [-1, 1] image as an RGB panel `size` pixels high (nearest-neighbour: every pixel stays visible)."""
    g = np.clip((image + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return Image.fromarray(g).convert("RGB").resize((round(size * image.shape[1] / image.shape[0]), size),
                                                    Image.Resampling.NEAREST)


def diverging_panel(diff: np.ndarray, size: int, scale: float | None = None) -> Image.Image:
    """Blue (negative: set darker) - white - red (positive: set brighter), symmetric around zero; `scale` is the
    value drawn at full colour (default: the panel's largest |diff|, so panels sharing a scale are comparable)."""
    scale = max(float(np.nanmax(np.abs(diff))) if scale is None else float(scale), 1e-6)
    t = np.clip(diff / scale, -1, 1)
    rgb = np.ones((*diff.shape, 3))
    pos, neg = np.clip(t, 0, 1)[..., None], np.clip(-t, 0, 1)[..., None]
    rgb = rgb * (1 - pos) + pos * np.array(SET_COLOUR) / 255.0
    rgb = rgb * (1 - neg) + neg * np.array(REST_COLOUR) / 255.0
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    return img.resize((round(size * diff.shape[1] / diff.shape[0]), size), Image.Resampling.NEAREST)

"""The building blocks of the report's sections: HTML tables and inlined PNGs, cell formatting, the "not in
this run" note, and reading model names and tables from the run's file layout."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Iterable

import polars as pl

from cohortlens.types import PathLike


def fmt(v) -> str:
    """A cell value as text: floats to 4 significant digits, NaN as a dash, booleans as yes/no."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4g}" if abs(v) < 10 else f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def table(df: pl.DataFrame, max_rows: int = 50, row_class=None, cls: str = "") -> str:
    """An HTML table of a frame; `row_class(row_dict) -> str | None` marks rows (e.g. flagged gaps)."""
    if df.height == 0:
        return "<p class='muted'>none</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    rows = []
    for row in df.head(max_rows).iter_rows(named=True):
        rc = row_class(row) if row_class else None
        attr = f" class='{rc}'" if rc else ""
        rows.append(f"<tr{attr}>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row.values()) + "</tr>")
    more = (f"<p class='muted'>{df.height - max_rows} more rows in the Parquet file</p>"
            if df.height > max_rows else "")
    c = f" class='{cls}'" if cls else ""
    return f"<div class='scroll'><table{c}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>{more}"


def _flat(data: bytes, width: int | None):
    """(the image of PNG bytes flattened onto white (RGB or L) and shrunk to `width` pixels if wider, whether
    it was shrunk)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            out = Image.new("RGB", rgba.size, "white")
            out.paste(rgba, mask=rgba.getchannel("A"))
        else:
            out = im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy()
    shrunk = width is not None and out.width > width
    if shrunk:
        out.thumbnail((width, max(1, round(out.height * width / out.width))), Image.LANCZOS)
    if out.mode == "RGB":
        r, g, b = out.split()
        if r.tobytes() == g.tobytes() == b.tobytes():
            out = r  # grey
    return out, shrunk


def _exact_palette(im):
    """An RGB image of at most 256 colours as a palette image with exactly those colours."""
    import numpy as np
    from PIL import Image

    palette = np.array([c for _, c in im.getcolors(256)], dtype=np.uint32)
    rgb = np.asarray(im, dtype=np.uint32)
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    pal_keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    order = np.argsort(pal_keys)
    index = order[np.searchsorted(pal_keys[order], keys)].astype(np.uint8)
    out = Image.fromarray(index, "P")
    out.putpalette(palette.astype(np.uint8).ravel().tolist())
    return out


def compact_image(data: bytes, width: int | None = None, webp: bool = False) -> tuple[bytes, str]:
    """(bytes, MIME type) of a PNG made small for the page without changing a pixel (beyond the shrinking to
    `width`, if wider, and flattening onto white): greyscale when every pixel is grey, an exact palette when it
    has at most 256 colours, else RGB; `webp`: lossless WebP instead of PNG (about 40 % smaller for the
    explanation images; every current browser shows it, the publication page keeps PNG for the release check)
    when it is the smaller. The original bytes when nothing would shrink them."""
    from PIL import features

    im, shrunk = _flat(data, width)
    buf = io.BytesIO()
    (_exact_palette(im) if im.mode == "RGB" and im.getcolors(256) is not None else im).save(buf, "PNG", optimize=True)
    best, mime = (data if len(buf.getvalue()) >= len(data) and not shrunk else buf.getvalue()), "image/png"
    if webp and features.check("webp"):
        buf = io.BytesIO()
        im.save(buf, "WEBP", lossless=True, method=2, quality=50)
        if len(buf.getvalue()) < len(best):
            best, mime = buf.getvalue(), "image/webp"
    return best, mime


def png(path: PathLike, alt: str | None = None, cls: str = "", width: int | None = None, webp: bool = False) -> str:
    """A PNG file inlined as a data-URI `<img>`, made small by `compact_image` (lossless; shrunk to `width`
    and, with `webp`, as lossless WebP)."""
    data, mime = compact_image(Path(path).read_bytes(), width, webp)
    c = f" class='{cls}'" if cls else ""
    return (f"<img{c} alt='{html.escape(alt or Path(path).name)}' "
            f"src='data:{mime};base64,{base64.b64encode(data).decode()}'>")


def png_scaled(path: PathLike, width: int, alt: str | None = None, cls: str = "", webp: bool = False) -> str:
    """A PNG shrunk to `width` pixels (if wider) and re-encoded, for thumbnails such as the static maps."""
    return png(path, alt, cls, width, webp)


def not_run(what: str) -> str:
    """The note a section shows when its stage has no inputs in this run."""
    return f"<p class='muted'>{html.escape(what)}: not in this run (no inputs).</p>"


def model_of(path: PathLike, level: int = 1) -> str:
    """The {model} path component: the parent folder's name (level 1), or its parent's (level 2...)."""
    p = Path(path)
    for _ in range(level):
        p = p.parent
    return p.name


def by_model(paths: Iterable[PathLike], key=model_of) -> dict[str, Path]:
    """{model: path}, the model read from each path by `key` (sorted by path; a later path wins)."""
    return {key(p): Path(p) for p in sorted(paths, key=str)}


def read_frames(paths: Iterable[PathLike]) -> pl.DataFrame:
    """The non-empty Parquet files concatenated (diagonal: columns may differ); an empty frame if none."""
    frames = [pl.read_parquet(p) for p in paths]
    frames = [f for f in frames if f.height]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()

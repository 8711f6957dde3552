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


def png(path: PathLike, alt: str | None = None, cls: str = "") -> str:
    """A PNG file inlined as a data URI `<img>`."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    c = f" class='{cls}'" if cls else ""
    return f"<img{c} alt='{html.escape(alt or Path(path).name)}' src='data:image/png;base64,{data}'>"


def png_scaled(path: PathLike, width: int, alt: str | None = None, cls: str = "") -> str:
    """A PNG shrunk to `width` pixels (if wider) and re-encoded, for thumbnails such as the static maps."""
    from PIL import Image

    with Image.open(path) as im:
        if im.width <= width:
            return png(path, alt, cls)
        im = im.convert("RGB")
        im.thumbnail((width, round(im.height * width / im.width)), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    c = f" class='{cls}'" if cls else ""
    return f"<img{c} alt='{html.escape(alt or Path(path).name)}' src='data:image/png;base64,{data}'>"


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

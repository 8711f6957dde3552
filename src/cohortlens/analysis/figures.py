"""Static figures with matplotlib: one style for every map the pipeline writes as PNG (for the report) and
PDF/SVG (for publication and the archive).

matplotlib renders in-process with its Agg/PDF/SVG backends: no browser, no subprocess, nothing that can fail
under load the way kaleido's headless Chromium did. Figures are built on `matplotlib.figure.Figure` directly,
never through pyplot, so no global backend or figure registry is touched and nothing leaks between figures.
Plotly stays for the interactive maps (`analysis.project`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import polars as pl

from cohortlens.analysis.table import AttributeSpec, attribute_values
from cohortlens.io.tables import atomic_path
from cohortlens.types import PathLike

MISSING = "(missing)"
MISSING_COLOUR = "#b0b0b0"
# Okabe–Ito: distinguishable with the common colour-vision deficiencies and in greyscale print; tab20 beyond 8.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
CONTINUOUS_CMAP = "viridis"
FORMATS = ("png", "pdf", "svg")
# Sized for a single journal column at 100 %: 9 pt text stays readable when the figure is printed 8–9 cm wide.
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "legend.title_fontsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,  # TrueType in PDFs: text stays editable in a journal's layout tools
    "svg.fonttype": "none",
}
SIZE_INCHES = (5.0, 4.4)
PNG_DPI = 150


def categorical_colours(n: int) -> list[str]:
    """`n` distinct colours, the same order in every figure (category i always gets colour i)."""
    if n <= len(OKABE_ITO):
        return list(OKABE_ITO[:n])
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def subsample_points(frame: pl.DataFrame, title: str, max_points: int | None, seed: int = 0):
    """A seeded random subset of at most `max_points` rows (in their order) and the title saying so; the
    interactive and the static map of one attribute draw the same points."""
    n_all = frame.height
    if max_points and n_all > max_points:
        frame = frame[np.sort(np.random.default_rng(seed).choice(n_all, max_points, replace=False))]
        title += f" ({frame.height:,} of {n_all:,} points)"
    return frame, title


def _marker_size(n: int) -> float:
    return 9.0 if n < 2_000 else (3.0 if n < 50_000 else 1.0)


def static_map(
    frame: pl.DataFrame,
    attribute: str,
    spec: AttributeSpec,
    *,
    title: str | None = None,
    max_points: int | None = None,
    seed: int = 0,
):
    """A matplotlib Figure of a projection frame (x, y, attribute columns) coloured by `attribute`: a legend of
    categorical colours (missing in grey, last), or a viridis colour bar for continuous attributes and dates
    (dates labelled as ISO dates). `max_points` draws a seeded random subset, said in the title."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    frame, title = subsample_points(frame, title or attribute, max_points, seed)
    x, y = frame["x"].to_numpy(), frame["y"].to_numpy()
    values = attribute_values(frame, spec)
    size = _marker_size(frame.height)
    with rc_context(STYLE):
        fig = Figure(figsize=SIZE_INCHES, layout="constrained")
        ax = fig.add_subplot()
        if spec.is_categorical:
            labels = np.array([MISSING if v is None else v for v in values], dtype=object)
            present = set(labels.tolist())
            order = [c for c in (spec.categories or ()) if c in present]
            order += sorted(present - set(order) - {MISSING})
            colours = categorical_colours(len(order))
            if MISSING in present:
                order, colours = order + [MISSING], colours + [MISSING_COLOUR]
            for cat, colour in zip(order, colours):
                m = labels == cat
                ax.scatter(x[m], y[m], s=size, c=[colour], alpha=0.8, linewidths=0, label=str(cat), rasterized=True)
            ax.legend(title=attribute, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                      markerscale=max(1.0, 12.0 / size), ncols=1 if len(order) <= 16 else 2)
        else:
            m = np.isfinite(values)
            if (~m).any():
                ax.scatter(x[~m], y[~m], s=size, c=MISSING_COLOUR, linewidths=0, label=MISSING, rasterized=True)
                ax.legend(loc="lower left", frameon=False)
            points = ax.scatter(x[m], y[m], s=size, c=values[m], cmap=CONTINUOUS_CMAP, alpha=0.85, linewidths=0,
                                rasterized=True)
            bar = fig.colorbar(points, ax=ax, shrink=0.85, label=attribute)
            if spec.type == "date":  # the values are days since 1970-01-01, matplotlib's own date epoch
                from matplotlib.dates import AutoDateLocator, DateFormatter

                bar.ax.yaxis.set_major_locator(AutoDateLocator(maxticks=7))
                bar.ax.yaxis.set_major_formatter(DateFormatter("%Y-%m-%d"))
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)  # map coordinates have no units: no axes to read
        ax.set_aspect("equal", adjustable="datalim")
    return fig


def save_figure(fig, paths: Iterable[PathLike]) -> list[Path]:
    """Write `fig` to each path (format from its suffix: png, pdf or svg), each atomically. A file that is
    missing or empty after the backend returned raises naming it, so no stage succeeds without its figure."""
    written = []
    for path in map(Path, paths):
        fmt = path.suffix.lstrip(".").lower()
        if fmt not in FORMATS:
            raise ValueError(f"{path}: static figures are written as {', '.join(FORMATS)}, not {fmt!r}")
        with atomic_path(path, path.suffix) as tmp:
            with _style():
                fig.savefig(tmp, format=fmt, dpi=PNG_DPI if fmt == "png" else None)
            if not tmp.exists() or tmp.stat().st_size == 0:
                raise OSError(f"{path}: matplotlib returned without writing the {fmt} file")
        written.append(path)
    return written


def _style():
    from matplotlib import rc_context

    return rc_context(STYLE)

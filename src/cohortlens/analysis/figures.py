"""Static figures with matplotlib: one style for every map the pipeline writes as PNG (for the report) and
PDF/SVG (for publication and the archive).

matplotlib renders in-process with its Agg/PDF/SVG backends: no browser, no subprocess, nothing that can fail
under load the way kaleido's headless Chromium did. Figures are built on `matplotlib.figure.Figure` directly,
never through pyplot, so no global backend or figure registry is touched and nothing leaks between figures.
Plotly stays for the interactive maps (`analysis.project`).
"""

from __future__ import annotations

import textwrap
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


# ------------------------------------------------------------------------------------------ finding networks

GROUP_COLOURS = {"flagged": OKABE_ITO[5], "rest": OKABE_ITO[0]}
SPLIT_STYLES = {"train": "-", "val": "--"}
# paper 003, Fig. 3: accuracy after the first epoch, the rest vs the flagged group
PAPER_EPOCH1 = {"rest": (0.96, 0.98), "flagged": (0.40, 0.70)}


def message_figure(text: str):
    """A small figure that only says `text` (an output that exists when there is nothing to draw)."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context(STYLE):
        fig = Figure(figsize=(SIZE_INCHES[0], 1.2), layout="constrained")
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    return fig


def curves_figure(curves: pl.DataFrame, title: str = ""):
    """Accuracy per epoch (columns finding_id, attribute, epoch, split, group, accuracy, n), one panel per finding:
    colour = group (flagged vs rest), line = split (train solid, val dashed), n in the legend; paper 003's
    epoch-1 ranges as shaded bands for comparison."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    findings = list(dict.fromkeys(curves["finding_id"].to_list()))
    with rc_context(STYLE):
        fig = Figure(figsize=(SIZE_INCHES[0] * len(findings), SIZE_INCHES[1] * 0.8), layout="constrained")
        axes = fig.subplots(1, len(findings), squeeze=False)[0]
        for ax, fid in zip(axes, findings):
            one = curves.filter(pl.col("finding_id") == fid)
            for group, (lo, hi) in PAPER_EPOCH1.items():
                ax.axhspan(lo, hi, xmin=0, xmax=1, color=GROUP_COLOURS[group], alpha=0.08, linewidth=0)
            for (split, group), cell in one.sort("epoch").group_by(["split", "group"], maintain_order=True):
                ax.plot(cell["epoch"].to_numpy(), cell["accuracy"].cast(pl.Float64).to_numpy(), marker="o",
                        markersize=3, color=GROUP_COLOURS.get(group, "grey"), linestyle=SPLIT_STYLES.get(split, ":"),
                        label=f"{group}, {split} (n={cell['n'][0]})")
            ax.set_ylim(0, 1.02)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"accuracy per image on the recorded {one['attribute'][0]}")
            ax.set_title(fid, fontsize=8)
            ax.legend(loc="lower right", frameon=False)
        fig.suptitle(f"{title}\nshaded: paper 003 after epoch 1 (rest 96-98 %, flagged 40-70 %)", fontsize=9)
    return fig


def saliency_figure(panels: list[dict], title: str):
    """Per region of a finding's set: [mean of the set's test slices | mean GradCAM over it]. Each panel dict:
    region, image (H, W in [-1, 1]), cam (H, W, >= 0), n_images, n_slices."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context(STYLE):
        fig = Figure(figsize=(5.0, 2.6 * len(panels) + 0.5), layout="constrained")
        axes = fig.subplots(len(panels), 2, squeeze=False)
        for (ax_img, ax_cam), p in zip(axes, panels):
            ax_img.imshow(p["image"], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax_img.set_title(f"{p['region']}: mean of {p['n_images']} test images", fontsize=8)
            ax_cam.imshow(p["image"], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            peak = float(p["cam"].max())
            shown = ax_cam.imshow(p["cam"] / peak if peak > 0 else p["cam"], cmap="inferno", alpha=0.55, vmin=0,
                                  vmax=1, interpolation="bilinear")
            ax_cam.set_title(f"mean GradCAM ({p['n_slices']} slices)", fontsize=8)
            fig.colorbar(shown, ax=ax_cam, shrink=0.8, label="share of the peak")
            for ax in (ax_img, ax_cam):
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle(textwrap.fill(title, 90), fontsize=8)
    return fig

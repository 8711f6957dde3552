"""Explanations of findings as pictures (paper 003, Fig. 2): for a finding's image set vs the rest of its region,
the mean center slice, the difference of the means, and the mean posterior edge profile (for every image row
the column of the rightmost body edge — the back contour in the sagittal display orientation — mean ± sd
over the set and over the rest).

One PNG per finding with a sample set, drawn with Pillow (no plotting library is needed, and plotly's static
export would start a browser), into the findings folder; the finding's `evidence` lists it. A finding whose
set spans several regions (cross-region co-occurrence) gets one row of panels per region. At most
`explain_max_images` images per side are averaged (a seeded sample beyond that), like the paper's 1000.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import polars as pl
from PIL import Image, ImageDraw

from cohortlens.analysis.panels import REST_COLOUR, SET_COLOUR, diverging_panel, grey_panel, plain_text
from cohortlens.analysis.panels import font as load_font
from cohortlens.io.tables import atomic_path
from cohortlens.preprocess.store import SliceStore
from cohortlens.types import PathLike


@dataclass(frozen=True)
class ExplainSettings:
    """Settings of the explanation PNGs."""

    explain_max_images: int = 1000  # per side (set / rest) of a mean image, like paper 003's 1000 images
    edge_threshold: float = 0.15  # body = above this fraction of the [-1, 1] intensity range


PANEL = 256  # panel height in pixels
BATCH = 256


def center_slice_rows(index: pl.DataFrame) -> pl.DataFrame:
    """One index row per image: the middle one of its center slices (of all slices if none is marked)."""
    has_centre = index.group_by("image_uid").agg(pl.col("is_center").any().alias("_any"))
    rows = index.join(has_centre, on="image_uid").filter(pl.col("is_center") | ~pl.col("_any")).drop("_any")
    return (rows.sort("image_uid", "slice_position")
            .group_by("image_uid", maintain_order=True)
            .agg(pl.all().get(pl.len() // 2)))


def edge_profile(images: np.ndarray, threshold: float = 0.15) -> np.ndarray:
    """(n, rows) column of the rightmost body pixel in every row; NaN where a row has no body.

    Body is above `threshold` of the [-1, 1] range; a body pixel needs a body pixel to its left as well, so a
    single bright noise pixel in the background is not taken for the edge.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    above = images > (-1.0 + 2.0 * threshold)
    body = above[..., 1:] & above[..., :-1]  # body[..., j] is column j + 1
    width = body.shape[-1]
    last = width - np.argmax(body[..., ::-1], axis=-1)
    return np.where(body.any(-1), last, np.nan).astype(np.float64)


class CenterSlices:
    """Center slices of the cohort read from the preprocessed shards, addressed by image_uid."""

    def __init__(self, index_parquet: PathLike):
        self.store = SliceStore(index_parquet)
        self.rows = center_slice_rows(self.store.index)
        self.region_of = dict(zip(self.rows["image_uid"].to_list(), self.rows["region"].to_list()))

    def uids(self, region: str) -> list[str]:
        return self.rows.filter(pl.col("region") == region)["image_uid"].to_list()

    def mean_and_profiles(self, uids: Iterable[str], threshold: float) -> tuple[np.ndarray, np.ndarray]:
        wanted = pl.DataFrame({"image_uid": list(uids)}, schema={"image_uid": pl.Utf8})
        rows = wanted.join(self.rows, on="image_uid", how="inner")
        total, profiles = None, []
        for _, batch in self.store.batches(rows, BATCH):
            total = batch.sum(0) if total is None else total + batch.sum(0)
            profiles.append(edge_profile(batch, threshold))
        if total is None:
            raise ValueError("none of the images is in the preprocessed index")
        return total / rows.height, np.concatenate(profiles)


def _sample(items: list[str], cap: int, rng: np.random.Generator) -> list[str]:
    if len(items) <= cap:
        return items
    return [items[i] for i in np.sort(rng.choice(len(items), cap, replace=False))]


def _polyline(draw: ImageDraw.ImageDraw, cols: np.ndarray, scale: float, colour, width: int = 2) -> None:
    """A profile (column per row) as a line in a panel scaled by `scale`; gaps where the row has no body."""
    segment: list[tuple[float, float]] = []
    for row, col in enumerate(cols):
        if np.isfinite(col):
            segment.append(((col + 0.5) * scale, (row + 0.5) * scale))
        elif segment:
            if len(segment) > 1:
                draw.line(segment, fill=colour, width=width)
            segment = []
    if len(segment) > 1:
        draw.line(segment, fill=colour, width=width)


def _profile_panel(set_prof: np.ndarray, rest_prof: np.ndarray, width: int, size: int) -> Image.Image:
    """Mean ± sd of the edge column per row, set (red) vs rest (blue), on the image's own row/column axes."""
    panel = Image.new("RGB", (size, size), "white")
    scale = size / max(set_prof.shape[1], 1)
    cols_all = np.concatenate([set_prof.ravel(), rest_prof.ravel()])
    cols_all = cols_all[np.isfinite(cols_all)]
    if not len(cols_all):
        return panel
    # zoom the column axis onto the edges' range so shifts of a pixel or two are visible
    lo, hi = np.percentile(cols_all, 1) - 2, np.percentile(cols_all, 99) + 2
    xscale = size / max(hi - lo, 1e-6)
    overlay = Image.new("RGBA", panel.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for prof, colour in ((rest_prof, REST_COLOUR), (set_prof, SET_COLOUR)):
        with np.errstate(all="ignore"):
            mean, sd = np.nanmean(prof, 0), np.nanstd(prof, 0)
        ok = np.isfinite(mean)
        rows = np.flatnonzero(ok)
        if len(rows) < 2:
            continue
        left = [((mean[r] - sd[r] - lo) * xscale, (r + 0.5) * scale) for r in rows]
        right = [((mean[r] + sd[r] - lo) * xscale, (r + 0.5) * scale) for r in rows[::-1]]
        draw.polygon(left + right, fill=(*colour, 60))
        draw.line([((mean[r] - lo) * xscale, (r + 0.5) * scale) for r in rows], fill=(*colour, 255), width=2)
    panel = Image.alpha_composite(panel.convert("RGBA"), overlay).convert("RGB")
    d = ImageDraw.Draw(panel)
    d.rectangle([0, 0, size - 1, size - 1], outline=(180, 180, 180))
    font = load_font(11)
    d.text((4, size - 14), f"column {lo:.0f}", fill=(90, 90, 90), font=font)
    d.text((size - 70, size - 14), f"column {hi:.0f}", fill=(90, 90, 90), font=font)
    return panel


_TOKEN = re.compile(r"[A-Za-z0-9_.:-]+(?:/[A-Za-z0-9_.:-]+)*")


def without_ids(text: str, image_uids) -> str:
    """The text with every image uid and subject id of the cohort replaced by "[id]": the title is drawn into
    the PNG's pixels, where no text scan of a publication archive can find an identifier (a cleanlab finding's
    description lists its images)."""
    uids = set(map(str, image_uids))
    subjects = {u.split("/")[0] for u in uids}

    def one(m: re.Match) -> str:
        token = m.group(0)
        return "[id]" if token in uids or token in subjects or token.split("/")[0] in subjects else token

    return _TOKEN.sub(one, text)


def render(path: PathLike, title: str, rows: list[dict]) -> None:
    """One PNG: a title, then per region [mean set | mean rest | set - rest | edge profiles]."""
    font, small = load_font(13), load_font(11)
    header = textwrap.wrap(plain_text(title), 150)[:4]
    head_h, label_h, gap = 8 + 16 * len(header), 18, 8
    panels = []
    for r in rows:
        set_img = grey_panel(r["set_mean"], PANEL)
        rest_img = grey_panel(r["rest_mean"], PANEL)
        scale = PANEL / r["set_mean"].shape[0]
        for img in (set_img, rest_img):  # both profiles on both panels
            draw = ImageDraw.Draw(img)
            with np.errstate(all="ignore"):
                _polyline(draw, np.nanmean(r["rest_prof"], 0), scale, REST_COLOUR, 1)
                _polyline(draw, np.nanmean(r["set_prof"], 0), scale, SET_COLOUR, 1)
        diff = diverging_panel(r["set_mean"] - r["rest_mean"], PANEL)
        prof = _profile_panel(r["set_prof"], r["rest_prof"], r["set_mean"].shape[1], PANEL)
        labels = [f"{r['region']}: set, n={r['n_set']}", f"rest, n={r['n_rest']}", "set - rest (red: brighter)",
                  "back contour: rightmost body edge, mean ± sd"]
        panels.append((labels, [set_img, rest_img, diff, prof]))
    width = gap + sum(p.width + gap for p in panels[0][1])
    height = head_h + len(panels) * (label_h + PANEL + gap)
    canvas = Image.new("RGB", (max(width, 400), height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(header):
        draw.text((gap, 4 + 16 * i), line, fill=(0, 0, 0), font=font)
    y = head_h
    for labels, imgs in panels:
        x = gap
        for label, img in zip(labels, imgs):
            draw.text((x, y + 2), label, fill=(40, 40, 40), font=small)
            canvas.paste(img, (x, y + label_h))
            x += img.width + gap
        y += label_h + PANEL + gap
    with atomic_path(path, ".png") as tmp:
        canvas.save(tmp, format="PNG")


def explain_findings(findings: list, index_parquet: PathLike, out_dir: PathLike, cfg: Mapping) -> None:
    """Draw the PNG of every finding with a sample set and list it in the finding's `evidence`."""
    slices = CenterSlices(index_parquet)
    rng = np.random.default_rng(cfg.get("seed", 0))
    cap = int(cfg.get("explain_max_images", 1000))
    threshold = float(cfg.get("edge_threshold", 0.15))
    out_dir = Path(out_dir)
    for f in findings:
        ids = [u for u in f.sample_ids if u in slices.region_of]
        if not ids:
            continue
        rows = []
        for region in sorted({slices.region_of[u] for u in ids}):
            chosen = set(u for u in ids if slices.region_of[u] == region)
            rest = [u for u in slices.uids(region) if u not in chosen]
            if not rest:
                continue
            set_mean, set_prof = slices.mean_and_profiles(_sample(sorted(chosen), cap, rng), threshold)
            rest_mean, rest_prof = slices.mean_and_profiles(_sample(rest, cap, rng), threshold)
            rows.append({"region": region, "set_mean": set_mean, "rest_mean": rest_mean, "set_prof": set_prof,
                         "rest_prof": rest_prof, "n_set": len(chosen), "n_rest": len(rest)})
        if not rows:
            continue
        path = out_dir / f"{f.finding_id}.png"
        render(path, without_ids(f.description, slices.region_of), rows)
        f.evidence = [str(path)]

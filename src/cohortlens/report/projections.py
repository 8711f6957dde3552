"""The projections section: one interactive Plotly map per model and region for the methods in
`report.interactive_methods` (dropdowns choose the colouring attribute and the method; the payload of
`cohortlens.report.maps` carries the points once), the other methods' maps as their static PNGs from the plot
folders; and the publication report's maps (static, attributes coarsened)."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from cohortlens.analysis.figures import save_figure, static_map, subsample_points
from cohortlens.analysis.project import projection_figure, projection_with_attributes
from cohortlens.analysis.table import REGION_SPEC
from cohortlens.io.tables import read_parquet_metadata
from cohortlens.report.fragments import model_of, not_run, png_scaled
from cohortlens.report.maps import MAP_SCRIPT, METHOD_LABELS, map_controls, map_payload, payload_script, template_script
from cohortlens.report.publication import OTHER, coarsen_attributes
from cohortlens.types import ALL_REGIONS, PathLike

log = logging.getLogger(__name__)


def _coordinates(frame: pl.DataFrame, other: Path) -> np.ndarray | None:
    """Another method's coordinates of the frame's points, by image (NaN where it has none); None when the
    projections cannot be matched."""
    proj = pl.read_parquet(other)
    if "image_uid" in frame.columns and "image_uid" in proj.columns:
        joined = frame.select("image_uid").join(proj.select("image_uid", "x", "y"), on="image_uid", how="left",
                                                maintain_order="left")
        return joined.select(pl.col("x", "y").cast(pl.Float64)).to_numpy()
    return None


def _interactive(group: dict[str, Path], subjects: PathLike, images: PathLike | None, div_id: str, cfg: dict,
                 units: dict) -> tuple[str, dict]:
    """One Plotly map of a (model, region): `group` is method -> projection (the first is drawn first), with
    dropdowns choosing the colouring attribute and the method. Returns (html, the figures' Plotly template)."""
    methods = list(group)
    projection = group[methods[0]]
    meta = read_parquet_metadata(projection)
    frame, specs = projection_with_attributes(projection, subjects, images)
    plotted = dict(specs)
    if frame["region"].n_unique() > 1:
        plotted = {"region": REGION_SPEC, **plotted}
    if not plotted:
        return "", {}
    frame, note = subsample_points(frame, "", cfg["max_points"])
    coords = {methods[0]: frame.select(pl.col("x", "y").cast(pl.Float64)).to_numpy()}
    for method in methods[1:]:
        other = _coordinates(frame, group[method])
        if other is not None:
            coords[method] = other
    model, region = meta.get("model", model_of(projection, 2)), meta.get("region", projection.parent.name)
    figs = {a: projection_figure(frame, a, s, hover_attributes=list(specs), title=a) for a, s in plotted.items()}
    if region != ALL_REGIONS:  # per-region maps sit two to a row
        for f in figs.values():
            f.update_layout(width=540, height=480)
    continuous = {a: u for a, u in units.items() if a in specs and specs[a].type == "continuous"}
    titles = {m: f"{model} · {region} · {METHOD_LABELS.get(m, m)}{note}" for m in coords}
    payload, template = map_payload(figs, coords, titles, continuous)
    return (f"<div class='plot'>{map_controls(div_id, list(coords), list(figs))}<div id='{div_id}' "
            f"class='cl-map'></div>{payload_script(div_id, payload)}</div>"), template


def projections_section(projections: Sequence[PathLike], plots: Sequence[PathLike], subjects: PathLike,
                        images: PathLike | None, cfg: dict, units: dict | None = None) -> tuple[str, int]:
    """One interactive map per model and region (region 'all' first) for the methods in
    cfg['interactive_methods'] (a dropdown switches between them and between colouring attributes; the points
    travel once, `maps`), the other methods' maps as their static PNGs from the plot folders. Returns (html,
    number of interactive figures)."""
    if not projections and not plots:
        return not_run("projections"), 0
    methods = list(cfg["interactive_methods"] or [])
    regions_wanted = cfg["interactive_regions"]
    groups: dict[tuple[str, str], dict[str, Path]] = {}
    for p in (Path(p) for p in projections):
        model, region, method = model_of(p, 2), p.parent.name, p.stem
        if method in methods and (regions_wanted is None or region in regions_wanted):
            groups.setdefault((model, region), {})[method] = p
    interactive, shown, template = [], set(), {}
    for (model, region), found in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != ALL_REGIONS,
                                                                         kv[0][1])):
        group = {m: found[m] for m in methods if m in found}
        div_id = f"proj-{model}-{region}-{next(iter(group))}".replace(" ", "_")
        try:
            fragment, tpl = _interactive(group, subjects, images, div_id, cfg, units or {})
            template = template or tpl
        except Exception as exc:  # one broken projection must not cost the whole page
            log.warning("projection %s not drawn: %s", next(iter(group.values())), exc)
            fragment = (f"<p class='bad'>{html.escape(model)} · {html.escape(region)}: not drawn "
                        f"({html.escape(type(exc).__name__)})</p>")
        interactive.append((model, fragment))
        shown.update((model, region, m) for m in group)
    parts = []
    if interactive:
        parts.append("<p>Interactive maps (hover: subject id, region and attributes; choose the colouring "
                     "attribute and the map above each one).</p>")
        current = None
        for model, fragment in interactive:
            if model != current:
                parts.append(("</div>" if current is not None else "") + f"<h3>{html.escape(model)}</h3><div class='grid'>")
                current = model
            parts.append(fragment)
        parts.append("</div>")
    static = []
    for d in sorted((Path(d) for d in plots), key=lambda d: (model_of(d, 2), d.parent.name != ALL_REGIONS,
                                                             d.parent.name, d.name)):
        model, region, method = model_of(d, 2), d.parent.name, d.name
        if (model, region, method) in shown or not d.is_dir():
            continue
        pngs = sorted(d.glob(f"{method}-*.png"))
        if not pngs:
            continue
        imgs = "".join(_map_figure(f, cfg["static_map_width"], webp=True) for f in pngs)
        static.append(f"<details><summary>{html.escape(model)} · {html.escape(region)} · {html.escape(method)} "
                      f"({len(pngs)} maps)</summary><div class='grid'>{imgs}</div></details>")
    if static:
        parts.append("<h3>Other maps (static)</h3>" + "".join(static))
    if interactive:
        parts.append(template_script(template) + MAP_SCRIPT)
    n_figures = sum("class='cl-map'" in f for _, f in interactive)
    return "".join(parts) or "<p class='muted'>no maps</p>", n_figures


def _map_figure(path: Path, width: int, webp: bool = False) -> str:
    """A static map PNG as a thumbnail figure captioned with its file name (`webp`: lossless WebP)."""
    return (f"<figure>{png_scaled(path, width, cls='map', webp=webp)}<figcaption>{html.escape(path.stem)}"
            "</figcaption></figure>")


def publication_maps_section(projections: Sequence[PathLike], subjects: PathLike, images: PathLike | None,
                             cfg: dict, maps_dir: PathLike, units: dict | None = None) -> str:
    """The publication report's maps: for every projection, one static PNG per attribute with its values
    coarsened (continuous values in quantile bins, dates by year, categories and bins under cfg['min_cell']
    merged; publication.coarsen_attributes): points without ids and without hover data. The PNGs are written
    to `maps_dir` ({model}-{region}-{method}-{attribute}.png) and inlined."""
    if not projections:
        return not_run("projections")
    k = cfg["min_cell"]
    parts = [f"<p>Maps as images: one point per image, no ids, attributes coarsened (continuous values in "
             f"quantile bins, dates by year; categories and bins of fewer than {k} points merged into "
             f"“{html.escape(OTHER)}”).</p>"]
    first = True
    for p in sorted((Path(p) for p in projections), key=lambda p: (model_of(p, 2), p.parent.name != ALL_REGIONS,
                                                                   p.parent.name, p.stem)):
        model, region, method = model_of(p, 2), p.parent.name, p.stem
        try:
            frame, specs = projection_with_attributes(p, subjects, images)
            plotted = ({"region": REGION_SPEC} if frame["region"].n_unique() > 1 else {}) | dict(specs)
            coarse, coarse_specs = coarsen_attributes(frame, plotted, k)
        except Exception as exc:  # one broken projection must not cost the whole page
            log.warning("projection %s not drawn: %s", p, exc)
            parts.append(f"<p class='bad'>{html.escape(model)} · {html.escape(region)} · {html.escape(method)}: not "
                         f"drawn ({html.escape(type(exc).__name__)})</p>")
            continue
        figures = []
        for attribute, spec in coarse_specs.items():
            out = Path(maps_dir) / f"{model}-{region}-{method}-{attribute}.png"
            continuous = attribute in specs and specs[attribute].type == "continuous"
            unit = (units or {}).get(attribute) if continuous else None
            shown = f"{attribute} ({unit})" if unit else attribute
            fig = static_map(coarse, attribute, spec, title=f"{model} · {region} · {method} — {shown}",
                             max_points=cfg["max_points"])
            save_figure(fig, [out])
            figures.append(_map_figure(out, cfg["static_map_width"]))
        parts.append(f"<details{' open' if first else ''}><summary>{html.escape(model)} · {html.escape(region)} · "
                     f"{html.escape(method)} ({len(figures)} maps)</summary><div class='grid'>{''.join(figures)}"
                     f"</div></details>")
        first = False
    return "".join(parts)

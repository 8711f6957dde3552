"""The projections section: interactive Plotly maps (a dropdown chooses the colouring attribute) for the
methods in `report.interactive_methods`, the other maps as their static PNGs from the plot folders."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Sequence

from cohortlens.analysis.figures import save_figure, static_map
from cohortlens.analysis.project import figure_div, projection_figure, projection_with_attributes
from cohortlens.analysis.table import REGION_SPEC
from cohortlens.io.tables import read_parquet_metadata
from cohortlens.report.fragments import model_of, not_run, png_scaled
from cohortlens.report.publication import OTHER, coarsen_attributes
from cohortlens.types import ALL_REGIONS, PathLike

log = logging.getLogger(__name__)


def _interactive(projection: Path, subjects: PathLike, images: PathLike | None, div_id: str, cfg: dict) -> str:
    """One Plotly figure of a projection with a dropdown choosing the colouring attribute. The first
    attribute's figure is drawn by figure_div; the others travel as JSON and are swapped in with Plotly.react."""
    meta = read_parquet_metadata(projection)
    frame, specs = projection_with_attributes(projection, subjects, images)
    plotted = dict(specs)
    if frame["region"].n_unique() > 1:
        plotted = {"region": REGION_SPEC, **plotted}
    if not plotted:
        return ""
    title = f"{meta.get('model', model_of(projection, 2))} · {meta.get('region', projection.parent.name)} · " \
            f"{meta.get('method', projection.stem)}"
    figs = {a: projection_figure(frame, a, s, hover_attributes=list(specs), title=f"{title} — {a}",
                                 max_points=cfg["max_points"])
            for a, s in plotted.items()}
    if meta.get("region", projection.parent.name) != ALL_REGIONS:  # per-region maps sit two to a row
        for f in figs.values():
            f.update_layout(width=540, height=480)
    first = next(iter(figs))
    options = "".join(f"<option value='{html.escape(a)}'>{html.escape(a)}</option>" for a in figs)
    others = {a: json.loads(f.to_json()) for a, f in figs.items() if a != first}
    first_json = json.loads(figs[first].to_json())
    others[first] = first_json
    payload = json.dumps(others, separators=(",", ":")).replace("</", "<\\/")
    return (f"<div class='plot'><label>colour by <select class='attr-select' data-plot='{div_id}'>{options}"
            f"</select></label>{figure_div(figs[first], div_id)}"
            f"<script type='application/json' id='{div_id}-figs'>{payload}</script></div>")


_SELECT_JS = """<script>
document.querySelectorAll('select.attr-select').forEach(function (sel) {
  var figs = null;
  sel.addEventListener('change', function () {
    var id = sel.dataset.plot;
    if (figs === null) { figs = JSON.parse(document.getElementById(id + '-figs').textContent); }
    var f = figs[sel.value];
    Plotly.react(id, f.data, f.layout, {displaylogo: false});
  });
});
</script>"""


def projections_section(projections: Sequence[PathLike], plots: Sequence[PathLike], subjects: PathLike,
                        images: PathLike | None, cfg: dict) -> tuple[str, int]:
    """Interactive maps for cfg['interactive_methods'] (region 'all' first, then each region), the other maps
    as their static PNGs from the plot folders. Returns (html, number of interactive figures)."""
    if not projections and not plots:
        return not_run("projections"), 0
    methods = list(cfg["interactive_methods"] or [])
    regions_wanted = cfg["interactive_regions"]

    def order(p: Path) -> tuple:
        region = p.parent.name
        return (model_of(p, 2), region != ALL_REGIONS, region, p.stem)

    interactive, shown = [], set()
    for p in sorted((Path(p) for p in projections), key=order):
        model, region, method = model_of(p, 2), p.parent.name, p.stem
        if method not in methods or (regions_wanted is not None and region not in regions_wanted):
            continue
        div_id = f"proj-{model}-{region}-{method}".replace(" ", "_")
        try:
            fragment = _interactive(p, subjects, images, div_id, cfg)
        except Exception as exc:  # one broken projection must not cost the whole page
            log.warning("projection %s not drawn: %s", p, exc)
            fragment = f"<p class='bad'>{html.escape(str(p))}: not drawn ({html.escape(type(exc).__name__)})</p>"
        interactive.append((model, fragment))
        shown.add((model, region, method))
    parts = []
    if interactive:
        parts.append("<p>Interactive maps (hover: subject id, region and attributes; choose the colouring "
                     "attribute above each map).</p>")
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
        imgs = "".join(_map_figure(f, cfg["static_map_width"]) for f in pngs)
        static.append(f"<details><summary>{html.escape(model)} · {html.escape(region)} · {html.escape(method)} "
                      f"({len(pngs)} maps)</summary><div class='grid'>{imgs}</div></details>")
    if static:
        parts.append("<h3>Other maps (static)</h3>" + "".join(static))
    if interactive:
        parts.append(_SELECT_JS)
    return "".join(parts) or "<p class='muted'>no maps</p>", len(interactive)


def _map_figure(path: Path, width: int) -> str:
    """A static map PNG as a thumbnail figure captioned with its file name."""
    return f"<figure>{png_scaled(path, width, cls='map')}<figcaption>{html.escape(path.stem)}</figcaption></figure>"


def publication_maps_section(projections: Sequence[PathLike], subjects: PathLike, images: PathLike | None,
                             cfg: dict, maps_dir: PathLike) -> str:
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
            fig = static_map(coarse, attribute, spec, title=f"{model} · {region} · {method} — {attribute}",
                             max_points=cfg["max_points"])
            save_figure(fig, [out])
            figures.append(_map_figure(out, cfg["static_map_width"]))
        parts.append(f"<details{' open' if first else ''}><summary>{html.escape(model)} · {html.escape(region)} · "
                     f"{html.escape(method)} ({len(figures)} maps)</summary><div class='grid'>{''.join(figures)}"
                     f"</div></details>")
        first = False
    return "".join(parts)

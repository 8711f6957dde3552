"""The interactive maps of the report, small: the points of one (model, region) travel once, whatever the
colouring attribute and the projection method.

`projection_figure` (analysis.project) draws one Plotly figure per colouring attribute; each repeats every
point's coordinates and hover data. Here the figures are taken apart into one payload per map:

* the points once: their coordinates per method (t-SNE, UMAP: float32, base64) and their hover data
  (columns of text, repeated values as codes into a list of distinct values);
* per attribute the figure's traces without their points, each with the indices (base64 uint16/uint32) of
  the points it draws, and its layout without the Plotly template (one template for the whole page);
* a continuous colouring's values as float32.

A script on the page (`MAP_SCRIPT`) builds the figure a reader chooses (method × attribute) from the payload
and draws it with Plotly.newPlot / Plotly.react. Every point, colour, legend entry and hover line of the
figures is kept; only the repetition goes.
"""

from __future__ import annotations

import base64
import html
import json
import re
from typing import Mapping, Sequence

import numpy as np

_TYPED = {"f4": np.float32, "f8": np.float64, "i1": np.int8, "u1": np.uint8, "i2": np.int16, "u2": np.uint16,
          "i4": np.int32, "u4": np.uint32}
METHOD_LABELS = {"tsne": "t-SNE", "umap": "UMAP"}


def as_array(value) -> np.ndarray:
    """A Plotly JSON array: a typed-array spec {dtype, bdata} (plotly >= 6) or a list."""
    if isinstance(value, Mapping) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=_TYPED[value["dtype"]])
        shape = value.get("shape")
        return out.reshape(tuple(int(s) for s in str(shape).split(","))) if shape else out
    return np.asarray(value if value is not None else [])


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def _typed(array: np.ndarray) -> dict:
    """A float array as Plotly's typed-array spec in float32 (the page needs no more precision)."""
    return {"dtype": "f4", "bdata": b64(np.asarray(array, dtype=np.float32))}


def _columns(rows: list[list[str]]) -> list:
    """Hover rows as columns; a column with repeated values as {"v": distinct values, "c": codes}."""
    if not rows:
        return []
    out = []
    for col in zip(*rows):
        distinct = list(dict.fromkeys(col))
        if len(distinct) <= len(col) // 2:
            pos = {v: i for i, v in enumerate(distinct)}
            out.append({"v": distinct, "c": [pos[v] for v in col]})
        else:
            out.append(list(col))
    return out


def _points(fig: dict) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Every point of a figure (the union of its traces; each point is drawn by exactly one trace)."""
    xs, ys, rows = [], [], []
    for t in fig["data"]:
        x = as_array(t.get("x"))
        xs.append(x)
        ys.append(as_array(t.get("y")))
        custom = t.get("customdata")
        rows += [list(map(str, r)) for r in custom] if custom is not None else [[] for _ in range(len(x))]
    return np.concatenate(xs) if xs else np.zeros(0), np.concatenate(ys) if ys else np.zeros(0), rows


def _key(x, y, row) -> tuple:
    return (np.float32(x).item(), np.float32(y).item(), *row)


def _frame_rows(x: np.ndarray, y: np.ndarray, frame_xy: np.ndarray) -> np.ndarray:
    """Each point's row in the frame, found by its coordinates (-1 if absent); equal points in turn."""
    rows: dict[tuple, list[int]] = {}
    for j, (a, b) in enumerate(frame_xy.reshape(-1, 2)):
        rows.setdefault((np.float32(a).item(), np.float32(b).item()), []).append(j)
    out = np.full(len(x), -1, dtype=np.int64)
    for i, (a, b) in enumerate(zip(x, y)):
        found = rows.get((np.float32(a).item(), np.float32(b).item()))
        if found:
            out[i] = found.pop(0)
    return out


def with_units(template: str, units: Mapping[str, str]) -> str:
    """Hover lines 'age: %{customdata[3]}' -> 'age: %{customdata[3]} years' for the attributes in `units`."""
    def add(m: re.Match) -> str:
        unit = units.get(html.unescape(m.group(1)))
        return m.group(0) + (f" {html.escape(unit)}" if unit else "")

    return re.sub(r"([^<>:]+): %\{customdata\[\d+\]\}", add, template)


def map_payload(figures: Mapping[str, object], coords: Mapping[str, np.ndarray], titles: Mapping[str, str],
                units: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    """(payload, Plotly template) of one map. `figures`: attribute -> Plotly figure (or its JSON dict) drawn by
    `projection_figure` from a frame; `coords`: method -> (n, 2) coordinates of that frame's rows, the first
    method's being the frame's own x, y (a point is found in the other methods by its row); `titles`: method
    -> the title before ' — attribute'; `units`: continuous attribute -> unit (hover lines, colour bars)."""
    units = units or {}
    dicts = {a: f if isinstance(f, dict) else json.loads(f.to_json()) for a, f in figures.items()}
    first = next(iter(dicts.values()))
    x, y, rows = _points(first)
    hover = next((t.get("hovertemplate") for t in first["data"] if t.get("hovertemplate")), None)
    index: dict[tuple, list[int]] = {}
    for i, (xi, yi, r) in enumerate(zip(x, y, rows)):
        index.setdefault(_key(xi, yi, r), []).append(i)
    methods = list(coords)
    row_of = _frame_rows(x, y, np.asarray(coords[methods[0]]))
    xy = {}
    for m in methods:
        c = np.asarray(coords[m], dtype=np.float32).reshape(-1, 2)
        got = np.where((row_of >= 0)[:, None], c[np.clip(row_of, 0, None)], np.float32("nan"))
        xy[m] = [b64(got[:, 0]), b64(got[:, 1])]
    template, idx_type = None, np.uint16 if len(x) < 65536 else np.uint32
    figs = {}
    for attribute, fig in dicts.items():
        layout = dict(fig.get("layout", {}))
        template = template or layout.pop("template", None)
        layout.pop("template", None)
        layout.pop("title", None)
        traces, used = [], {}
        for t in fig["data"]:
            tx, ty = as_array(t.pop("x", None)), as_array(t.pop("y", None))
            custom = t.pop("customdata", None) or [[] for _ in range(len(tx))]
            t["h"] = t.pop("hovertemplate", None) is not None
            ids = []
            for xi, yi, r in zip(tx, ty, custom):
                key = _key(xi, yi, list(map(str, r)))
                k = used.get(key, 0)
                used[key] = k + 1
                ids.append(index[key][k])
            t["i"] = b64(np.asarray(ids, dtype=idx_type))
            marker = t.get("marker") or {}
            if isinstance(marker.get("color"), (Mapping, list)) and not isinstance(marker.get("color"), str):
                colours = as_array(marker["color"])
                if colours.dtype.kind == "f":
                    marker["color"] = _typed(colours)
            bar = marker.get("colorbar")
            if bar and isinstance(bar.get("title"), Mapping) and units.get(attribute):
                bar["title"]["text"] = f"{bar['title'].get('text', attribute)} ({units[attribute]})"
            traces.append(t)
        figs[attribute] = {"layout": layout, "traces": traces}
    payload = {"methods": methods, "titles": dict(titles), "xy": xy, "cols": _columns(rows),
               "hover": with_units(hover, units) if hover else None, "figs": figs}
    return payload, template or {}


def payload_script(div_id: str, payload: dict) -> str:
    """The payload as a JSON script element (`</` escaped)."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f"<script type='application/json' id='{div_id}-data'>{text}</script>"


def template_script(template: dict) -> str:
    text = json.dumps(template, separators=(",", ":")).replace("</", "<\\/")
    return f"<script type='application/json' id='cl-plotly-template'>{text}</script>"


def map_controls(div_id: str, methods: Sequence[str], attributes: Sequence[str]) -> str:
    """The dropdowns above a map: colouring attribute, and the projection method when there are several."""
    def options(values, labels=None):
        return "".join(f"<option value='{html.escape(v)}'>{html.escape((labels or {}).get(v, v))}</option>"
                       for v in values)

    out = (f"<label>colour by <select class='attr-select' data-plot='{div_id}' data-key='attr'>"
           f"{options(attributes)}</select></label>")
    if len(methods) > 1:
        out += (f" <label>map <select class='method-select' data-plot='{div_id}' data-key='method'>"
                f"{options(methods, METHOD_LABELS)}</select></label>")
    return out


# Builds a map's figure from its payload and draws it; the dropdowns redraw it with Plotly.react.
MAP_SCRIPT = """<script>
clPlotly.then(function (Plotly) {
  var tpl = JSON.parse(document.getElementById('cl-plotly-template').textContent);
  function dec(s, T) {
    var b = atob(s), u = new Uint8Array(b.length);
    for (var i = 0; i < b.length; i++) { u[i] = b.charCodeAt(i); }
    return new T(u.buffer);
  }
  function rows(cols, n) {
    var full = cols.map(function (c) { return Array.isArray(c) ? c : c.c.map(function (k) { return c.v[k]; }); });
    var out = new Array(n);
    for (var i = 0; i < n; i++) { out[i] = full.map(function (c) { return c[i]; }); }
    return out;
  }
  document.querySelectorAll('div.cl-map').forEach(function (div) {
    var p = JSON.parse(document.getElementById(div.id + '-data').textContent);
    var xy = {}, n = 0;
    p.methods.forEach(function (m) { xy[m] = [dec(p.xy[m][0], Float32Array), dec(p.xy[m][1], Float32Array)]; n = xy[m][0].length; });
    var hover = rows(p.cols, n), idx = {};
    Object.keys(p.figs).forEach(function (a) {
      idx[a] = p.figs[a].traces.map(function (t) { return dec(t.i, n < 65536 ? Uint16Array : Uint32Array); });
    });
    var state = {method: p.methods[0], attr: Object.keys(p.figs)[0]};
    function figure() {
      var f = p.figs[state.attr], X = xy[state.method][0], Y = xy[state.method][1];
      var data = f.traces.map(function (t, k) {
        var out = {}, ids = idx[state.attr][k];
        Object.keys(t).forEach(function (key) { if (key !== 'i' && key !== 'h') { out[key] = t[key]; } });
        out.x = Float32Array.from(ids, function (i) { return X[i]; });
        out.y = Float32Array.from(ids, function (i) { return Y[i]; });
        if (p.cols.length) { out.customdata = Array.from(ids, function (i) { return hover[i]; }); }
        if (t.h && p.hover) { out.hovertemplate = p.hover; }
        return out;
      });
      var layout = Object.assign({}, f.layout, {template: tpl, title: {text: p.titles[state.method] + ' \\u2014 ' + state.attr}});
      return [data, layout];
    }
    var f = figure();
    Plotly.newPlot(div.id, f[0], f[1], {displaylogo: false});
    document.querySelectorAll('select[data-plot="' + div.id + '"]').forEach(function (sel) {
      sel.addEventListener('change', function () {
        state[sel.dataset.key] = sel.value;
        var g = figure();
        Plotly.react(div.id, g[0], g[1], {displaylogo: false});
      });
    });
  });
});
</script>"""

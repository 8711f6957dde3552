"""The report page of the demo run: renders in headless Chromium (non-blank screenshot, no console errors,
every Plotly figure drawn, also after switching the colouring attribute), has every section, opens offline,
and degrades to "not in this run" notes when a stage's inputs are missing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cohortlens.report.html import SECTIONS, build_report_from_inputs

MAX_REPORT_MB = 8  # issue 11: the demo report under 8 MB

# Injected into a copy of the page: console.error / warn and uncaught errors become "CL-ERROR" console lines;
# after load every attribute dropdown is switched to its last option (Plotly.react) and the counts of Plotly
# figures and of drawn ones (.main-svg) are logged as "CL-RESULT {json}".
_PRELUDE = """<script>
(function () {
  function report(kind, args) { console.log('CL-ERROR ' + kind + ': ' + Array.prototype.join.call(args, ' ')); }
  var err = console.error, warn = console.warn;
  console.error = function () { report('console.error', arguments); err.apply(console, arguments); };
  console.warn = function () { report('console.warn', arguments); warn.apply(console, arguments); };
  window.addEventListener('error', function (e) {  // capture phase: failed <img>/<script> loads too
    var t = e.target;
    report('error', [e.message || ('failed to load ' + (t && (t.src || t.href))), e.filename || '', e.lineno || '']);
  }, true);
  window.addEventListener('unhandledrejection', function (e) { report('rejection', [String(e.reason)]); });
})();
</script>"""
_PROBE = """<script>
window.addEventListener('load', function () {
  // the figures draw once the page's packed plotly.js is unpacked (report/plotlyjs.py)
  (window.clPlotly || Promise.resolve()).then(function () { setTimeout(check, 0); });
});
function check() {
  function count() {
    var plots = document.querySelectorAll('.js-plotly-plot');
    var drawn = 0;
    plots.forEach(function (p) { if (p.querySelector('.main-svg')) drawn += 1; });
    return [plots.length, drawn];
  }
  var before = count();
  var switched = 0;
  document.querySelectorAll('select.attr-select').forEach(function (s) {
    if (s.options.length > 1) { s.selectedIndex = s.options.length - 1; s.dispatchEvent(new Event('change')); switched += 1; }
  });
  setTimeout(function () {
    var after = count();
    var ids = Array.prototype.map.call(document.querySelectorAll('h2[id]'), function (h) { return h.id; });
    console.log('CL-RESULT ' + JSON.stringify({plots: before[0], drawn: before[1], switched: switched,
                                              plots_after: after[0], drawn_after: after[1], sections: ids}));
  }, 500);
}
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no Chromium/Chrome on PATH (Debian: apt-get install chromium); kaleido needs it too")


def render(page: Path, tmp: Path, height: int = 4000) -> tuple[np.ndarray, list[str], dict]:
    """Open a copy of `page` with the probes injected in headless Chromium; returns the screenshot (H, W, 3),
    the CL-ERROR lines and the CL-RESULT record."""
    text = page.read_text(encoding="utf-8")
    text = text.replace("<head>", "<head>" + _PRELUDE, 1).replace("</body>", _PROBE + "</body>", 1)
    probe = tmp / "probe.html"
    probe.write_text(text, encoding="utf-8")
    shot = tmp / "shot.png"
    proc = subprocess.run(
        [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: any request to the network fails (and logs)
         f"--screenshot={shot}",
         f"--window-size=1280,{height}", "--virtual-time-budget=20000", probe.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    errors = [line for line in console if "CL-ERROR" in line or "Uncaught" in line]
    results = [line for line in console if "CL-RESULT" in line]
    assert shot.exists(), proc.stderr[-3000:]
    assert results, f"the page's probe script never reported: {console[-20:]}"
    record = json.loads(re.search(r"CL-RESULT (\{.*\})\"", results[-1]).group(1).replace('\\"', '"'))
    from PIL import Image

    return np.asarray(Image.open(shot).convert("RGB")), errors, record


@pytest.fixture(scope="module")
def report_page(demo_results) -> Path:
    page = demo_results / "results/report/index.html"
    assert page.exists()
    return page


@pytest.fixture(scope="module")
def publication_page(demo_results) -> Path:
    page = demo_results / "results/report/publication.html"
    assert page.exists()
    return page


@pytest.mark.parametrize("variant", ["index", "publication"])
def test_report_renders_in_headless_chromium(variant, demo_results, tmp_path):
    report_page = demo_results / f"results/report/{variant}.html"
    image, errors, record = render(report_page, tmp_path)
    assert not errors, errors
    assert image.shape[0] >= 4000 and image.std() > 20, f"blank screenshot (pixel std {image.std():.1f})"
    # not one colour: the page has text, tables and plots
    assert len(np.unique(image.reshape(-1, 3)[::97], axis=0)) > 50
    assert record["plots"] > 0 and record["drawn"] == record["plots"], record
    assert record["plots_after"] == record["plots"] and record["drawn_after"] == record["plots"], record
    assert record["sections"] == [key for key, _ in SECTIONS]
    if variant == "publication":
        assert record["switched"] == 0  # no interactive maps: the maps are images


def test_publication_report_content(publication_page, demo_results):
    """Aggregates only: no subject id or image path of the cohort, no per-participant hover data, no quarantine
    list, no count below k in the page's count columns, maps as images with coarsened attributes."""
    import polars as pl

    from cohortlens.report.release import html_small_cells

    text = publication_page.read_text(encoding="utf-8")
    visible = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    res = demo_results / "results"
    subjects = pl.read_parquet(res / "cohort/subjects.parquet")
    images = pl.read_parquet(res / "cohort/images.parquet")
    for sid in subjects["subject_id"]:
        assert not re.search(rf"(?<![A-Za-z0-9]){re.escape(sid)}(?![0-9])", visible), sid
    assert not [p for p in images["path"] if p in visible]
    page = re.sub(r"<script type='application/octet-stream' id='cl-plotlyjs'>.*?</script>", "", text, count=1,
                  flags=re.S)  # plotly.js
    assert "class='attr-select'" not in page and "hovertemplate" not in page and "customdata" not in page
    assert html_small_cells(text, 10) == []
    assert "Publication version" in text
    if (res / "projections").exists():
        maps = sorted((res / "report/publication-maps").glob("*.png"))
        assert maps and "Maps as images" in text
    if (res / "findings").exists():
        assert "class='findings'" in text
        uids = set(images["image_uid"])
        described = pl.read_parquet(res / "findings/pca.parquet")["description"].to_list()
        if any(uid in d for d in described for uid in uids):  # e.g. cleanlab's outliers, named in the full report
            assert "(ids withheld)" in text
    assert "reconstruction grids (participants' slices) are left out" in text


def test_report_content_and_size(report_page, demo_results):
    text = report_page.read_text(encoding="utf-8")
    size_mb = report_page.stat().st_size / 1e6
    assert size_mb < MAX_REPORT_MB, f"{size_mb:.1f} MB"
    # self-contained: nothing loaded from outside the file, plotly.js once
    markup = re.sub(r"<script.*?</script>", "", text, flags=re.S)  # plotly.js has URL strings it never loads
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", markup)
    assert text.count("id='cl-plotlyjs'") == 1
    res = demo_results / "results"
    for model in sorted(p.name for p in (res / "embeddings").iterdir()):
        assert f"<td>{model}</td>" in text, model
    if (res / "probes").exists():
        assert "class='model-table'" in text
    if (res / "projections").exists():
        assert "class='attr-select'" in text and "proj-pca-all-tsne" in text
    if (res / "findings").exists():
        assert "class='findings'" in text and "explanations: mean image" in text
    if (res / "fairness").exists():
        assert "gaps flagged" in text
    if (res / "mitigation").exists():
        assert "attacks at chance" in text
    if (demo_results / "data/demo/ground_truth.json").exists() and (res / "findings").exists():
        # every planted effect of the demo is found by the pca baseline, no false finding (date is the control)
        m = re.search(r"<h3>pca</h3><p class='(\w+)'>(\d+) of (\d+) planted effects found; 0 false findings "
                      r"\(negative controls: date\); 0 unexplained echoes", text)
        assert m and m.group(1) == "ok" and m.group(2) == m.group(3), "pca ground-truth recall"
    # subjects appear only by their pseudonymous id; no DICOM patient names of the demo
    assert "DEMO^PATIENT" not in text and "PATIENT" not in markup


def test_report_degrades_without_analysis_inputs(demo_results, tmp_path):
    """A cohort without projections, probes, findings, fairness, mitigation or ground truth still gets a page:
    every section is there and says what was not run."""
    res = demo_results / "results"
    inputs = {"subjects": res / "cohort/subjects.parquet", "index": res / "preprocessed/index.parquet",
              "embeddings": [str(p) for p in sorted(res.glob("embeddings/*/*.parquet"))]}
    out = tmp_path / "index.html"
    summary = build_report_from_inputs(inputs, {"title": "empty"}, out)
    text = out.read_text(encoding="utf-8")
    assert summary["balanced"] and summary["interactive_figures"] == 0 and summary["recall"] == {}
    for what in ("probes", "projections", "discovery", "fairness", "mitigation", "ground truth", "training"):
        assert f"{what}" in text and "not in this run" in text, what
    assert text.count("not in this run") == 7
    assert "plotly" not in text.lower()  # no figure, no plotly.js
    for key, _ in SECTIONS:
        assert f"<h2 id='{key}'>" in text


def test_packed_plotlyjs_unpacks_to_plotly_and_a_figure_waits_for_it():
    """The page's plotly.js is the package's own, gzip + base64 (a third of its size); a figure's script draws
    only inside clPlotly.then (the library is unpacked asynchronously)."""
    import base64
    import gzip

    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    from cohortlens.report.plotlyjs import PLOTLY_ID, figure_div, plotlyjs_script

    script = plotlyjs_script()
    packed = re.search(rf"<script type='application/octet-stream' id='{PLOTLY_ID}'>([A-Za-z0-9+/=]+)</script>",
                       script).group(1)
    assert gzip.decompress(base64.b64decode(packed)).decode("utf-8") == get_plotlyjs()
    assert len(script) < 0.5 * len(get_plotlyjs())
    assert "DecompressionStream" in script and "window.clPlotly" in script
    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4], name="</script><b>")).update_layout(width=300, height=200)
    div = figure_div(fig, "train-demo")
    assert div.startswith("<div id='train-demo' class='plotly-graph-div' style='width:300px;height:200px;'>")
    assert "clPlotly.then(" in div and "Plotly.newPlot('train-demo'" in div
    assert div.count("</script>") == 2  # a trace name cannot close the data script early
    spec = re.search(r"<script type='application/json' id='train-demo-spec'>(.*?)</script>", div).group(1)
    assert json.loads(spec)["data"][0]["name"] == "</script><b>"


@pytest.mark.parametrize("unpack", [True, False])
def test_packed_plotlyjs_draws_in_chromium_or_says_why_not(unpack, tmp_path):
    """A page with the packed library and one figure, opened in headless Chromium: drawn (an SVG plot) where the
    browser has DecompressionStream; where it has not (removed here), the figure's place says why."""
    import plotly.graph_objects as go

    from cohortlens.report.plotlyjs import figure_div, plotlyjs_script

    remove = "" if unpack else "<script>window.DecompressionStream = undefined;</script>"
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2])).update_layout(width=400, height=300)
    page = tmp_path / "page.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'>{remove}{plotlyjs_script()}</head><body>"
                    f"{figure_div(fig, 'fig-a')}</body></html>", encoding="utf-8")
    proc = subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    figure = re.search(r'<div id="fig-a"[^>]*>(.*?)</div>\s*<script type="application/json"', dom, re.S)
    assert figure, proc.stderr[-2000:]
    if unpack:
        assert "main-svg" in figure.group(1) and "Figure not drawn" not in figure.group(1)
    else:
        assert figure.group(1).startswith("Figure not drawn: this browser has no DecompressionStream")

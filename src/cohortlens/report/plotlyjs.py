"""plotly.js inside the report page, gzip-compressed, and the figures that wait for it.

plotly.min.js is ~4.7 MB, half of the demo report. The page carries it gzip-compressed and base64-encoded (~1.9 MB)
and unpacks it with the browser's own DecompressionStream (Chrome/Edge 80+, Firefox 113+, Safari 16.4+): the report
stays one offline file. Unpacking is asynchronous, so every figure on the page draws inside `clPlotly.then(...)`
(`window.clPlotly`: a promise of the Plotly object). A browser that cannot unpack it shows a note where the figures
would be instead of failing silently (tests/test_report.py opens such a page in Chromium both ways).
"""

from __future__ import annotations

import base64
import functools
import gzip
import json

PLOTLY_ID = "cl-plotlyjs"

# Unpacks plotly.js, runs it, resolves window.clPlotly; on failure every figure's place says why.
_LOADER = """<script>
window.clPlotly = (function () {
  var packed = document.getElementById('%(id)s');
  function unpack() {
    if (typeof DecompressionStream !== 'function') {
      return Promise.reject(new Error('this browser has no DecompressionStream to unpack the figures\\' library'));
    }
    var b = atob(packed.textContent.trim()), u = new Uint8Array(b.length);
    for (var i = 0; i < b.length; i++) { u[i] = b.charCodeAt(i); }
    var stream = new Blob([u]).stream().pipeThrough(new DecompressionStream('gzip'));
    return new Response(stream).text().then(function (code) {
      var s = document.createElement('script');
      s.textContent = code;
      document.head.appendChild(s);
      return window.Plotly;
    });
  }
  // never rejects: on failure the figures' places say why and their scripts wait forever (no unhandled errors)
  return unpack().catch(function (err) {
    function note() {
      document.querySelectorAll('.cl-map, .plotly-graph-div').forEach(function (div) {
        div.textContent = 'Figure not drawn: ' + err.message + '. Open this file in a current Chrome, Edge, ' +
          'Firefox or Safari.';
      });
    }
    if (document.readyState === 'loading') { document.addEventListener('DOMContentLoaded', note); } else { note(); }
    return new Promise(function () {});
  });
})();
</script>"""


@functools.cache
def _packed() -> str:
    from plotly.offline import get_plotlyjs

    return base64.b64encode(gzip.compress(get_plotlyjs().encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


def plotlyjs_script() -> str:
    """plotly.js for a self-contained page (once per page, in <head>): the compressed library and its loader."""
    return (f"<script type='application/octet-stream' id='{PLOTLY_ID}'>{_packed()}</script>"
            + _LOADER % {"id": PLOTLY_ID})


def figure_div(fig, div_id: str) -> str:
    """The figure as a `<div>` and its data, drawn once the page's plotly.js is unpacked (`plotlyjs_script`)."""
    spec = json.dumps(json.loads(fig.to_json()), separators=(",", ":")).replace("</", "<\\/")
    width, height = fig.layout.width, fig.layout.height
    style = "".join(f"{k}:{v}px;" for k, v in (("width", width), ("height", height)) if v)
    return (f"<div id='{div_id}' class='plotly-graph-div' style='{style}'></div>"
            f"<script type='application/json' id='{div_id}-spec'>{spec}</script>"
            f"<script>clPlotly.then(function (Plotly) {{ var f = JSON.parse(document.getElementById("
            f"'{div_id}-spec').textContent); Plotly.newPlot('{div_id}', f.data, f.layout, "
            f"{{displaylogo: false}}); }});</script>")

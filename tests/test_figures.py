"""Static figures: matplotlib maps in one style, written as PNG/PDF/SVG without a browser."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from matplotlib.colors import to_hex

from cohortlens.analysis.figures import MISSING_COLOUR, OKABE_ITO, categorical_colours, save_figure, static_map
from cohortlens.analysis.project import StaticExportError, write_plots
from cohortlens.analysis.table import AttributeSpec
from cohortlens.io.tables import write_parquet


def _frame(n=40):
    rng = np.random.default_rng(0)
    return pl.DataFrame({
        "subject_id": [f"S{i:03d}" for i in range(n)], "region": ["neck"] * n,
        "x": rng.normal(size=n).astype(np.float32), "y": rng.normal(size=n).astype(np.float32),
        "sex": ["F", "M", None, "M"] * (n // 4), "age": np.r_[rng.uniform(20, 70, n - 1), np.nan],
        "date": pl.date_range(pl.date(2015, 1, 1), pl.date(2015, 1, 1) + pl.duration(days=10 * (n - 1)), "10d",
                              eager=True),
    })


def test_categorical_map_declared_order_missing_grey_last():
    frame = _frame()
    fig = static_map(frame, "sex", AttributeSpec("sex", "categorical", "protected", categories=("M", "F")))
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["M", "F", "(missing)"]
    colours = [to_hex(c.get_facecolor()[0]) for c in ax.collections]
    assert colours == [OKABE_ITO[0].lower(), OKABE_ITO[1].lower(), MISSING_COLOUR]
    assert sum(len(c.get_offsets()) for c in ax.collections) == frame.height


def test_continuous_and_date_maps_have_colour_bars():
    frame = _frame()
    fig = static_map(frame, "age", AttributeSpec("age", "continuous", "protected"))
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "age"  # the map and its colour bar
    scaled = [c for c in fig.axes[0].collections if c.get_array() is not None]
    assert len(scaled) == 1 and len(scaled[0].get_offsets()) == frame.height - 1  # the NaN age apart, in grey

    fig = static_map(frame, "date", AttributeSpec("date", "date", "acquisition"))
    fig.canvas.draw()
    bar = fig.axes[1]
    lo, hi = bar.get_ylim()
    labels = [t.get_text() for t, v in zip(bar.get_yticklabels(), bar.get_yticks()) if lo <= v <= hi]
    # ISO dates inside the data's range (2015-01-01 … 2016-01-26), not day counts
    assert len(labels) >= 3 and all(t[:4] in ("2015", "2016") and t[4] == t[7] == "-" for t in labels), labels

    sub = static_map(frame, "sex", AttributeSpec("sex", "categorical", "protected"), max_points=10)
    assert "10 of 40 points" in sub.axes[0].get_title()


def test_many_categories_get_distinct_colours():
    assert len(set(categorical_colours(8))) == 8 and len(set(map(str, categorical_colours(20)))) == 20


def test_save_figure_writes_each_format_atomically(tmp_path):
    fig = static_map(_frame(), "sex", AttributeSpec("sex", "categorical", "protected"))
    paths = save_figure(fig, [tmp_path / "m.png", tmp_path / "m.pdf", tmp_path / "m.svg"])
    assert [p.name for p in paths] == ["m.png", "m.pdf", "m.svg"]
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "m.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in (tmp_path / "m.svg").read_bytes()[:2000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pdf", "m.png", "m.svg"]  # no temporaries left
    with pytest.raises(ValueError, match="m.jpg"):
        save_figure(fig, [tmp_path / "m.jpg"])


def _projection(tmp_path):
    frame = _frame()
    proj = tmp_path / "tsne.parquet"
    write_parquet(frame.select("subject_id", pl.col("subject_id").alias("image_uid"), "region", "x", "y"), proj,
                  metadata={"method": "tsne", "model": "pca", "region": "neck"})
    subjects = tmp_path / "subjects.parquet"
    write_parquet(frame.select("subject_id", "sex", "age", "date"), subjects)
    attributes = {"sex": {"type": "categorical", "role": "protected"}, "age": {"type": "continuous"},
                  "date": {"type": "date", "role": "acquisition"}}
    return proj, subjects, attributes


def test_plot_formats_and_engine_are_checked(tmp_path):
    proj, subjects, attributes = _projection(tmp_path)
    written = write_plots(proj, subjects, tmp_path / "out", attributes=attributes, formats=["svg"])
    assert sorted(p.name for p in written) == sorted(f"tsne-{a}.{e}" for a in attributes for e in ("html", "svg"))
    with pytest.raises(ValueError, match="project.plots.formats.*'eps'"):
        write_plots(proj, subjects, tmp_path / "out", attributes=attributes, formats=["eps"])
    with pytest.raises(ValueError, match="project.plots.engine"):
        write_plots(proj, subjects, tmp_path / "out", attributes=attributes, engine="bokeh")


def test_kaleido_without_a_browser_fails_naming_the_setting(tmp_path, monkeypatch):
    # the opt-in engine on a machine with no browser (or without kaleido): a clear error, not a silent skip
    monkeypatch.setenv("PATH", str(tmp_path / "no-browser"))
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser" / "chrome"))
    proj, subjects, attributes = _projection(tmp_path)
    with pytest.raises(StaticExportError, match="project.plots.engine"):
        write_plots(proj, subjects, tmp_path / "out", attributes=attributes, engine="kaleido")

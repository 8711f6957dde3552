"""The project stage: t-SNE/UMAP maps, projection files and plots, on synthetic clusters and the demo."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import polars as pl
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import cross_val_predict
from sklearn.neighbors import KNeighborsClassifier

from cohortlens.analysis.project import (
    perplexity_affinities,
    project,
    projection_figure,
    projection_with_attributes,
    tsne,
    umap,
    write_plots,
    write_projection,
)
from cohortlens.analysis.table import AttributeSpec, attribute_specs, load_embeddings
from cohortlens.io.tables import read_parquet_metadata


def clusters(n_per=60, dim=40, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, size=(k, dim))
    X = np.concatenate([c + rng.normal(0, 1, size=(n_per, dim)) for c in centres]).astype(np.float32)
    return X, np.repeat(np.arange(k), n_per)


def knn_agreement(xy, labels) -> float:
    """How well the 2-D map keeps labelled groups together: cross-validated 5-NN balanced accuracy."""
    pred = cross_val_predict(KNeighborsClassifier(5), xy, labels, cv=5)
    return balanced_accuracy_score(labels, pred)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_maps_keep_clusters_apart_and_are_seeded(method):
    X, labels = clusters()
    a = project(X, method, seed=1, backend="cpu")
    assert a.shape == (len(X), 2) and a.dtype == np.float32 and np.isfinite(a).all()
    assert knn_agreement(a, labels) > 0.95
    assert np.array_equal(a, project(X, method, seed=1, backend="cpu"))


@pytest.mark.slow
def test_lean_affinities_equal_opentsne_own_and_drop_the_knn_arrays():
    """The stage builds t-SNE's P with a lower memory peak than openTSNE's default path; it must be the
    same matrix: symmetric, summing to 1, equal to openTSNE's PerplexityBasedNN(symmetrize=True)."""
    from openTSNE.affinity import PerplexityBasedNN

    X, _ = clusters(n_per=400, k=3)  # 1200 points: openTSNE's approximate (annoy) neighbour search
    ours = perplexity_affinities(X, 30, seed=0)
    theirs = PerplexityBasedNN(X, perplexity=30, method="auto", random_state=0).P
    P = ours.P
    assert P.format == "csr" and P.shape == (1200, 1200)
    assert abs(P - P.T).max() == 0
    assert P.sum() == pytest.approx(1.0, rel=1e-12)
    assert P.nnz == theirs.nnz and abs(P - theirs).max() <= 1e-12 * abs(theirs).max()
    assert ours.knn_index is None
    assert not any(k.endswith(("__neighbors", "__distances")) for k in vars(ours))


@pytest.mark.slow
def test_large_perplexity_is_clipped_with_a_warning(caplog):
    X, _ = clusters(n_per=10)  # 30 points: perplexity at most 29/3
    with caplog.at_level(logging.WARNING, logger="cohortlens.analysis.project"):
        xy = tsne(X, perplexity=50, backend="cpu")
    assert np.isfinite(xy).all() and xy.shape == (30, 2)
    assert any("perplexity 50.0 is too large for 30 points" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="cohortlens.analysis.project"):
        umap(X, n_neighbors=40, backend="cpu")
    assert any("n_neighbors 40 is too large" in r.getMessage() for r in caplog.records)


def test_unknown_method_and_backend_fail_clearly():
    X, _ = clusters(n_per=10)
    with pytest.raises(ValueError, match="unknown projection method"):
        project(X, "pca")
    with pytest.raises(ValueError, match="backend"):
        tsne(X, backend="gpu")


def _figure_frame(n=40):
    rng = np.random.default_rng(0)
    return pl.DataFrame({
        "subject_id": [f"S{i:03d}" for i in range(n)], "image_uid": [f"S{i:03d}/neck" for i in range(n)],
        "region": ["neck"] * n, "x": rng.normal(size=n).astype(np.float32), "y": rng.normal(size=n).astype(np.float32),
        "sex": ["F", "M", None, "M"] * (n // 4), "age": np.r_[rng.uniform(20, 70, n - 1), np.nan],
        "date": pl.date_range(pl.date(2015, 1, 1), pl.date(2015, 1, 1) + pl.duration(days=10 * (n - 1)), "10d", eager=True),
    })


def test_figure_colours_categorical_and_continuous_attributes():
    frame = _figure_frame()
    sex = AttributeSpec("sex", "categorical", "protected", categories=("F", "M"))
    fig = projection_figure(frame, "sex", sex, hover_attributes=["sex", "age"])
    assert [t.name for t in fig.data] == ["F", "M", "(missing)"]  # declared order, missing last
    assert all(t.showlegend is not False for t in fig.data)
    assert sum(len(t.x) for t in fig.data) == frame.height
    first = fig.data[0]
    assert "region: %{customdata[1]}" in first.hovertemplate and "age: %{customdata[3]}" in first.hovertemplate
    assert first.customdata[0][0].startswith("S") and first.customdata[0][1] == "neck"

    age = projection_figure(frame, "age", AttributeSpec("age", "continuous", "protected"))
    scaled = [t for t in age.data if t.marker.showscale]
    assert len(scaled) == 1 and len(scaled[0].x) == frame.height - 1  # the NaN age is drawn grey apart
    assert scaled[0].marker.colorbar.title.text == "age"

    date = projection_figure(frame, "date", AttributeSpec("date", "date", "acquisition"))
    bar = [t for t in date.data if t.marker.showscale][0].marker.colorbar
    assert list(bar.ticktext) == ["2015-01-01", "2016-01-01"]  # year starts within the data range, as dates

    sub = projection_figure(frame, "sex", sex, max_points=10)
    assert sum(len(t.x) for t in sub.data) == 10 and "10 of 40 points" in sub.layout.title.text


def test_demo_projection_and_plots(demo_results, tmp_path, monkeypatch):
    res = demo_results / "results"
    volumes, subjects = res / "embeddings/pca/volumes.parquet", res / "cohort/subjects.parquet"
    out = tmp_path / "projections/pca/neck/tsne.parquet"
    frame = write_projection(volumes, out, region="neck", method="tsne", params={"perplexity": 50, "seed": 0})
    on_disk = pl.read_parquet(out)
    assert on_disk.columns == ["subject_id", "image_uid", "region", "x", "y"]
    assert on_disk.schema["x"] == pl.Float32 and on_disk.equals(frame)
    keys, _ = load_embeddings(volumes, "neck")
    assert on_disk["image_uid"].to_list() == keys["image_uid"].to_list()
    meta = read_parquet_metadata(out)
    assert meta["method"] == "tsne" and meta["params"]["perplexity"] == 50 and meta["model"] == "pca"

    # the planted Essen field-of-view shift (neck only) must show up as its own neighbourhood in the map
    joined, _ = projection_with_attributes(out, subjects)
    essen = (joined["site"] == "Essen").to_numpy()
    assert knn_agreement(joined.select("x", "y").to_numpy(), essen) > 0.9

    # what a fresh laptop has: no Chrome/Chromium anywhere on PATH; the static figures must not need one
    monkeypatch.setenv("PATH", str(tmp_path / "no-browser"))
    assert not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome"))
    written = write_plots(out, subjects, tmp_path / "plots/pca/neck")
    names = sorted(p.name for p in written)
    declared = list(attribute_specs(subjects))
    assert names == sorted(f"tsne-{a}.{ext}" for a in declared for ext in ("html", "png", "pdf"))
    for path in written:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
            pixels = np.asarray(Image.open(path).convert("RGB"))
            # a drawn map: many colours (points, legend or colour bar), not a blank canvas
            assert pixels.shape[1] >= 600 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, path.name
        elif path.suffix == ".pdf":
            assert data[:5] == b"%PDF-" and b"%%EOF" in data[-32:]
        else:
            text = data.decode()
            # plotly.js inline: the page opens offline
            # (the bundle itself mentions cdn.plot.ly in its sources; only a script tag would load it)
            assert 'src="https://cdn.plot.ly' not in text and len(text) > 1_000_000 and "S0" in text


def test_umap_across_regions_plots_region(demo_results, tmp_path):
    res = demo_results / "results"
    out = tmp_path / "umap.parquet"
    frame = write_projection(res / "embeddings/pca/volumes.parquet", out, region="all", method="umap")
    assert set(frame["region"].unique()) == {"neck", "chest", "lumbar"}
    assert knn_agreement(frame.select("x", "y").to_numpy(), frame["region"].to_numpy()) > 0.98
    written = write_plots(out, res / "cohort/subjects.parquet", tmp_path, formats=())
    assert (tmp_path / "umap-region.html").exists() and all(p.suffix == ".html" for p in written)

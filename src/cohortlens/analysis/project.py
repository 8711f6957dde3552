"""The project stage: 2-D t-SNE / UMAP maps of the embeddings and one interactive plot per attribute.

t-SNE and UMAP are separate functions writing separate files, so a changed perplexity reruns only the t-SNE
map and its plots. The GPU path (cuML) is chosen when cuML and a CUDA device are present; it is kept thin
because it cannot be exercised without a GPU. On the CPU t-SNE is openTSNE (FFT-accelerated gradients,
approximate neighbours), UMAP is umap-learn.
"""

from __future__ import annotations

import datetime as _dt
import html as _html
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import polars as pl

from cohortlens.analysis.figures import FORMATS, MISSING, MISSING_COLOUR, save_figure, static_map, subsample_points
from cohortlens.analysis.table import (
    DATE_EPOCH,
    REGION_SPEC,
    AttributeSpec,
    attribute_specs,
    attribute_values,
    embedding_metadata,
    join_attributes,
    load_embeddings,
)
from cohortlens.io.tables import atomic_path, read_parquet_metadata, write_parquet
from cohortlens.types import ALL_REGIONS, PathLike

log = logging.getLogger(__name__)

METHODS = ("tsne", "umap")
# Points beyond this are drawn with WebGL (scattergl): SVG scatter becomes unusable around 10^4-10^5 points.
WEBGL_POINTS = 5_000


def _backend(backend: str) -> str:
    if backend == "auto":
        from cohortlens.runtime import cuml_available  # imports torch: only when a backend is chosen

        return "cuml" if cuml_available() else "cpu"
    if backend not in ("cuml", "cpu"):
        raise ValueError(f"backend must be auto, cuml or cpu, not {backend!r}")
    return backend


# Below this many points openTSNE is faster single-threaded: its thread synchronisation per iteration costs more
# than the work it splits (and collapses when the cores are shared with other jobs).
PARALLEL_MIN_POINTS = 5_000


def _n_jobs(n_jobs: int | None, n: int) -> int:
    if n_jobs:
        return n_jobs
    return max(1, len(os.sched_getaffinity(0))) if n >= PARALLEL_MIN_POINTS else 1


def clip_perplexity(perplexity: float, n: int) -> float:
    """Perplexity must stay below (n-1)/3 (each point needs 3·perplexity neighbours); larger values are
    clipped with a warning rather than failing a small region or a test cohort."""
    limit = (n - 1) / 3
    if perplexity > limit:
        log.warning("t-SNE perplexity %.1f is too large for %d points; using %.1f ((n-1)/3)", perplexity, n, limit)
        return float(limit)
    return float(perplexity)


# dimensions kept by the PCA before the neighbour search of t-SNE and UMAP (config project.<method>.pca_dims)
PCA_DIMS = 50


def reduce_dims(X: np.ndarray, n_components: int | None, seed: int = 0) -> np.ndarray:
    """PCA to n_components before the neighbour search (the usual t-SNE/UMAP preprocessing): neighbours in
    the leading components are what matters, and the kNN search on 50 instead of 6144 dims is much faster."""
    if not n_components or X.shape[1] <= n_components or X.shape[0] <= n_components:
        return np.ascontiguousarray(X, dtype=np.float32)
    from sklearn.decomposition import PCA

    return PCA(n_components, svd_solver="randomized", random_state=seed).fit_transform(X).astype(np.float32)


def tsne(
    X: np.ndarray,
    *,
    perplexity: float = 50.0,
    seed: int = 0,
    pca_dims: int | None = PCA_DIMS,
    n_iter: int = 500,
    backend: str = "auto",
    n_jobs: int | None = None,
) -> np.ndarray:
    """t-SNE map (n, 2) float32: cuML on a GPU, openTSNE on the CPU."""
    n = X.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    perplexity = clip_perplexity(perplexity, n)
    Z = reduce_dims(X, pca_dims, seed)
    if _backend(backend) == "cuml":
        from cuml.manifold import TSNE as CuTSNE

        # cuML's FFT t-SNE mirrors openTSNE's; early exaggeration iterations are part of its n_iter
        out = CuTSNE(n_components=2, perplexity=perplexity, n_iter=n_iter + 250, method="fft",
                     random_state=seed).fit_transform(Z)
        return np.asarray(out.get() if hasattr(out, "get") else out, dtype=np.float32)
    from openTSNE import TSNE

    jobs = _n_jobs(n_jobs, n)
    affinities = perplexity_affinities(Z, perplexity, n_jobs=jobs, seed=seed)
    emb = TSNE(n_components=2, perplexity=perplexity, n_iter=n_iter, initialization="pca", metric="euclidean",
               n_jobs=jobs, random_state=seed, verbose=False).fit(Z, affinities=affinities)
    return np.asarray(emb, dtype=np.float32)


def perplexity_affinities(Z: np.ndarray, perplexity: float, *, n_jobs: int = 1, seed: int = 0):
    """openTSNE's kNN perplexity affinities (its annoy/exact neighbour search and its calibration), assembled
    with a lower memory peak than its default path: at 300k points × 150 neighbours that path holds the
    neighbour and distance arrays (0.7 GB, kept only for later perplexity changes and for placing new points)
    while it builds P + Pᵀ and then a divided copy of it (1.1 GB each). Here the conditional P is built
    unsymmetrised, the kNN arrays and index are dropped, and P is halved in place before the one sum that
    symmetrises it. Same P as openTSNE's own (pair-wise normalised, symmetric) up to rounding."""
    from openTSNE.affinity import PerplexityBasedNN

    aff = PerplexityBasedNN(Z, perplexity=perplexity, method="auto", metric="euclidean", symmetrize=False,
                            n_jobs=n_jobs, random_state=seed, verbose=False)
    for kept in ("_PerplexityBasedNN__neighbors", "_PerplexityBasedNN__distances"):
        vars(aff).pop(kept, None)
    aff.knn_index = None
    P, aff.P = aff.P, None  # rows sum to 1/n (pair-wise normalised, not yet symmetric)
    P.data *= 0.5
    aff.P = (P + P.T).tocsr()
    return aff


def umap(
    X: np.ndarray,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
    pca_dims: int | None = PCA_DIMS,
    backend: str = "auto",
) -> np.ndarray:
    """UMAP map (n, 2) float32: cuML on a GPU, umap-learn on the CPU (seeded, hence single-threaded)."""
    n = X.shape[0]
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 points, got {n}")
    if n_neighbors > n - 1:
        log.warning("UMAP n_neighbors %d is too large for %d points; using %d", n_neighbors, n, n - 1)
        n_neighbors = n - 1
    Z = reduce_dims(X, pca_dims, seed)
    if _backend(backend) == "cuml":
        from cuml.manifold import UMAP as CuUMAP

        out = CuUMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed).fit_transform(Z)
        return np.asarray(out.get() if hasattr(out, "get") else out, dtype=np.float32)
    import umap as umap_learn

    # small inputs make umap-learn's spectral init warn and fall back; random init is as good there
    init = "spectral" if n > n_neighbors + 2 else "random"
    out = umap_learn.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed,
                          init=init, n_jobs=1).fit_transform(Z)
    return np.asarray(out, dtype=np.float32)


def project(X: np.ndarray, method: str = "tsne", **params) -> np.ndarray:
    """One entry point for both maps: method 'tsne' (perplexity, n_iter) or 'umap' (n_neighbors, min_dist);
    both take seed, pca_dims, backend ('auto' | 'cuml' | 'cpu')."""
    if method == "tsne":
        return tsne(X, **params)
    if method == "umap":
        return umap(X, **params)
    raise ValueError(f"unknown projection method {method!r} (use one of {METHODS})")


def write_projection(
    embeddings: PathLike,
    out: PathLike,
    *,
    region: str = ALL_REGIONS,
    method: str = "tsne",
    params: Mapping | None = None,
) -> pl.DataFrame:
    """Map one region (or 'all' regions together, as in paper 003's Fig. 1) of a volumes/slices parquet and
    write `out`: subject_id, image_uid, region, x, y (float32), with the method, its parameters and the
    model in the file metadata. Returns the written frame."""
    params = dict(params or {})
    frame, X = load_embeddings(embeddings, None if region == ALL_REGIONS else region)
    if frame.height == 0:
        raise ValueError(f"{embeddings}: no embeddings for region {region!r}")
    # reduce here so the full matrix (600 MB at 300k × 512) is freed before the map's own memory peak
    X = reduce_dims(X, params.get("pca_dims", PCA_DIMS), params.get("seed", 0))
    xy = project(X, method, **{**params, "pca_dims": None})
    del X
    result = frame.select("subject_id", "image_uid", "region").with_columns(
        pl.Series("x", xy[:, 0], dtype=pl.Float32), pl.Series("y", xy[:, 1], dtype=pl.Float32)
    )
    meta = embedding_metadata(embeddings)
    used = dict(params)
    if method == "tsne":
        used["perplexity"] = min(float(params.get("perplexity", 50.0)), (frame.height - 1) / 3)
    write_parquet(result, out, metadata={"model": meta.get("model", Path(embeddings).parent.name), "region": region,
                                         "method": method, "params": used, "backend": _backend(params.get("backend", "auto")),
                                         "n": frame.height})
    return result


# ---------------------------------------------------------------------------------------------------- plots

def _hover(frame: pl.DataFrame, attributes: Iterable[str]) -> tuple[np.ndarray, str]:
    """customdata + hovertemplate naming the subject, region and every attribute."""
    cols = ["subject_id", "region", *[a for a in attributes if a not in ("subject_id", "region")]]
    data = np.column_stack([
        np.asarray([MISSING if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
                    for v in frame[c].to_list()], dtype=object)
        for c in cols
    ])
    lines = ["<b>%{customdata[0]}</b>", "region: %{customdata[1]}"]
    lines += [f"{_html.escape(c)}: %{{customdata[{i}]}}" for i, c in enumerate(cols) if i >= 2]
    return data, "<br>".join(lines) + "<extra></extra>"


def _date_ticks(days: np.ndarray) -> tuple[list[float], list[str]]:
    finite = days[np.isfinite(days)]
    if finite.size == 0:
        return [], []
    lo, hi = DATE_EPOCH + _dt.timedelta(days=int(finite.min())), DATE_EPOCH + _dt.timedelta(days=int(finite.max()))
    ticks = [_dt.date(y, 1, 1) for y in range(lo.year, hi.year + 2)]
    ticks = [t for t in ticks if lo <= t <= hi] or [lo, hi]
    return [(t - DATE_EPOCH).days for t in ticks], [t.isoformat() for t in ticks]


def projection_figure(
    frame: pl.DataFrame,
    attribute: str,
    spec: AttributeSpec,
    *,
    hover_attributes: Iterable[str] = (),
    title: str | None = None,
    max_points: int | None = None,
    seed: int = 0,
):
    """A plotly Figure of a projection frame (x, y, subject_id, region, attributes) coloured by `attribute`:
    a legend of discrete colours for categorical attributes, a colour scale with colourbar for continuous
    ones and dates. `max_points` draws a seeded random subset (said in the title)."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    frame, title = subsample_points(frame, title or attribute, max_points, seed)
    Scatter = go.Scattergl if frame.height > WEBGL_POINTS else go.Scatter
    size = 5 if frame.height < 2_000 else (3 if frame.height < 50_000 else 2)
    custom, template = _hover(frame, hover_attributes)
    x, y = frame["x"].to_numpy(), frame["y"].to_numpy()
    values = attribute_values(frame, spec)
    fig = go.Figure()
    if spec.is_categorical:
        labels = np.array([MISSING if v is None else v for v in values], dtype=object)
        order = [c for c in (spec.categories or ()) if c in set(labels)]
        order += sorted(set(labels) - set(order) - {MISSING}) + ([MISSING] if MISSING in set(labels) else [])
        palette = qualitative.Plotly if len(order) <= 10 else qualitative.Alphabet
        for i, cat in enumerate(order):
            m = labels == cat
            colour = MISSING_COLOUR if cat == MISSING else palette[i % len(palette)]
            fig.add_trace(Scatter(x=x[m], y=y[m], mode="markers", name=str(cat), customdata=custom[m],
                                  hovertemplate=template, marker=dict(size=size, color=colour, opacity=0.8)))
        fig.update_layout(legend=dict(title=attribute, itemsizing="constant"))
    else:
        colorbar = dict(title=attribute)
        if spec.type == "date":
            tickvals, ticktext = _date_ticks(values)
            colorbar.update(tickvals=tickvals, ticktext=ticktext)
        m = np.isfinite(values)
        if (~m).any():
            fig.add_trace(Scatter(x=x[~m], y=y[~m], mode="markers", name=MISSING, customdata=custom[~m],
                                  hovertemplate=template, marker=dict(size=size, color=MISSING_COLOUR)))
        fig.add_trace(Scatter(x=x[m], y=y[m], mode="markers", name=attribute, customdata=custom[m],
                              hovertemplate=template, showlegend=False,
                              marker=dict(size=size, color=values[m], colorscale="Viridis", showscale=True,
                                          colorbar=colorbar, opacity=0.8)))
    fig.update_layout(title=title, template="plotly_white", width=720, height=640,
                      xaxis=dict(showticklabels=False, title=None, zeroline=False),
                      yaxis=dict(showticklabels=False, title=None, zeroline=False, scaleanchor="x"),
                      margin=dict(l=20, r=20, t=50, b=20))
    return fig


class StaticExportError(RuntimeError):
    """kaleido could not write a static figure (no Chrome/Chromium it can start, or a file missing after export)."""


def write_with_kaleido(figs: list, paths: list[PathLike], scale: float = 1.0, retries: int = 1) -> None:
    """Static figures rendered by Plotly itself through kaleido (config `project.plots.engine: kaleido`), one
    browser for all of them. kaleido can return without error yet without writing a file when its browser is
    starved (seen under load), so every file is checked after the call and the missing ones are exported again,
    `retries` times; then this raises naming the file. Not the default: it needs a Chrome/Chromium."""
    try:
        import kaleido  # noqa: F401
        import plotly.io as pio
    except ImportError as exc:
        raise StaticExportError(
            "project.plots.engine is 'kaleido' but kaleido is not installed (pip install kaleido, and a "
            "Chrome/Chromium it can start); the default engine 'matplotlib' needs neither") from exc
    pending = list(zip(figs, map(Path, paths)))
    for attempt in range(retries + 1):
        # kaleido writes temporaries of its own naming here; only files it really wrote are renamed into place
        tmps = [p.with_name(f".{p.name}.{os.getpid()}-{attempt}{p.suffix}") for _, p in pending]
        for _, p in pending:
            p.parent.mkdir(parents=True, exist_ok=True)
        try:
            pio.write_images([f for f, _ in pending], [str(t) for t in tmps], scale=scale)
        except Exception as exc:  # kaleido/choreographer raise their own types for a missing or failing browser
            for t in tmps:
                t.unlink(missing_ok=True)
            raise StaticExportError(
                f"could not write {pending[0][1]} with kaleido ({type(exc).__name__}: {exc}). kaleido needs a "
                "Chrome or Chromium it can start; project.plots.engine: matplotlib needs none.") from exc
        missing = []
        for (fig, path), tmp in zip(pending, tmps):
            if tmp.exists() and tmp.stat().st_size > 0:
                os.replace(tmp, path)
            else:
                tmp.unlink(missing_ok=True)
                missing.append((fig, path))
        if not missing:
            return
        log.warning("kaleido returned without writing %d of %d files (attempt %d): %s", len(missing),
                    len(pending), attempt + 1, ", ".join(str(p) for _, p in missing))
        pending = missing
    raise StaticExportError(f"kaleido did not write {pending[0][1]} (nor {len(pending) - 1} other files) after "
                            f"{retries + 1} attempts; project.plots.engine: matplotlib avoids the browser")


def write_html(fig, path: PathLike) -> None:
    """A standalone HTML page with plotly.js inline, so it opens offline."""
    with atomic_path(path, ".html") as tmp:
        tmp.write_text(fig.to_html(full_html=True, include_plotlyjs=True, config={"displaylogo": False}),
                       encoding="utf-8")


def projection_with_attributes(
    projection: PathLike | pl.DataFrame,
    subjects: PathLike,
    images: PathLike | None = None,
    attributes: Mapping | None = None,
) -> tuple[pl.DataFrame, dict[str, AttributeSpec]]:
    """A projection joined with every declared attribute (from `attributes` config or subjects.parquet)."""
    proj = projection if isinstance(projection, pl.DataFrame) else pl.read_parquet(projection)
    specs = attribute_specs(attributes if attributes is not None else subjects)
    usable = {a: s for a, s in specs.items() if s.level == "subject" or images is not None}
    return join_attributes(proj, subjects, images, usable), usable


def write_plots(
    projection: PathLike,
    subjects: PathLike,
    out_dir: PathLike,
    *,
    images: PathLike | None = None,
    attributes: Mapping | None = None,
    formats: Iterable[str] = ("png", "pdf"),
    engine: str = "matplotlib",
    max_points: int | None = None,
) -> list[Path]:
    """`{out_dir}/{method}-{attribute}.html` (interactive, Plotly) plus one static figure per format in
    `formats` (png for the report, pdf/svg for publication) for every declared attribute, plus region when the
    projection holds several regions. Static figures come from matplotlib (`engine="matplotlib"`, no browser)
    or from Plotly through kaleido (`engine="kaleido"`, needs Chrome/Chromium). Returns the written paths."""
    formats = tuple(dict.fromkeys(f.lower() for f in formats))
    if bad := [f for f in formats if f not in FORMATS]:
        raise ValueError(f"project.plots.formats: {bad[0]!r} is not one of {', '.join(FORMATS)}")
    if engine not in ("matplotlib", "kaleido"):
        raise ValueError(f"project.plots.engine must be matplotlib or kaleido, not {engine!r}")
    meta = read_parquet_metadata(projection)
    method = meta.get("method", Path(projection).stem)
    frame, specs = projection_with_attributes(projection, subjects, images, attributes)
    plotted = dict(specs)
    if frame["region"].n_unique() > 1:
        plotted = {"region": REGION_SPEC, **plotted}
    title_base = f"{meta.get('model', '')} · {meta.get('region', '')} · {method}".strip(" ·")
    written, kaleido_figs, kaleido_paths = [], [], []
    for attribute, spec in plotted.items():
        title = f"{title_base} — {attribute}"
        fig = projection_figure(frame, attribute, spec, hover_attributes=list(specs), max_points=max_points,
                                title=title)
        stem = Path(out_dir) / f"{method}-{attribute}"
        write_html(fig, stem.with_suffix(".html"))
        written.append(stem.with_suffix(".html"))
        static = [stem.with_suffix(f".{f}") for f in formats]
        if engine == "kaleido":
            kaleido_figs += [fig] * len(static)
            kaleido_paths += static
        elif static:
            written += save_figure(static_map(frame, attribute, spec, title=title, max_points=max_points), static)
    if kaleido_paths:
        write_with_kaleido(kaleido_figs, kaleido_paths)
        written += kaleido_paths
    return written

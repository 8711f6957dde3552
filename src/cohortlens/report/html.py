"""The report page: one self-contained HTML file (inline CSS, images as data URIs) that opens offline."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

import polars as pl

from cohortlens.io.tables import atomic_path, read_parquet_metadata

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;color:#1d2733;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}td,th{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:left}
th{background:#f3f5f7}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.muted{color:#57606a;font-size:.85rem}img{max-width:100%;image-rendering:pixelated;border:1px solid #d0d7de}
"""


def _table(df: pl.DataFrame, max_rows: int = 50) -> str:
    if df.height == 0:
        return "<p class='muted'>none</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row) + "</tr>"
        for row in df.head(max_rows).iter_rows()
    )
    more = f"<p class='muted'>{df.height - max_rows} more rows in the Parquet file</p>" if df.height > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _png(path: str | os.PathLike) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img alt='{html.escape(Path(path).name)}' src='data:image/png;base64,{data}'>"


def reconcile(n_manifest: int, cohort_q: pl.DataFrame, images: pl.DataFrame, pre_q: pl.DataFrame, index: pl.DataFrame) -> dict:
    with_slices = index["image_uid"].n_unique() if index.height else 0
    return {
        "manifest_rows": n_manifest,
        "quarantined_cohort": cohort_q.height,
        "images": images.height,
        "quarantined_preprocess": pre_q.height,
        "images_with_slices": with_slices,
        "balanced": n_manifest == with_slices + cohort_q.height + pre_q.height,
    }


def build_report(*, title: str, cohort_dir: str, preprocessed_dir: str, embeddings: dict[str, dict],
                 out_path: str, max_quarantine_rows: int = 50) -> dict:
    """embeddings: model -> {"slices": path, "volumes": path, "reconstructions": png path or None}."""
    cohort_dir, pre_dir = Path(cohort_dir), Path(preprocessed_dir)
    subjects = pl.read_parquet(cohort_dir / "subjects.parquet")
    images = pl.read_parquet(cohort_dir / "images.parquet")
    splits = pl.read_parquet(cohort_dir / "splits.parquet")
    cohort_q = pl.read_parquet(cohort_dir / "quarantine.parquet")
    meta = read_parquet_metadata(cohort_dir / "images.parquet")
    index = pl.read_parquet(pre_dir / "index.parquet")
    pre_q = pl.read_parquet(pre_dir / "quarantine.parquet")
    counts = reconcile(int(meta.get("manifest_rows", images.height + cohort_q.height)), cohort_q, images, pre_q, index)
    quarantine = pl.concat([cohort_q, pre_q]).sort("manifest_line")

    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts.append("<h2>Cohort</h2>")
    parts.append(_table(pl.DataFrame({"quantity": list(counts), "value": [str(v) for v in counts.values()]})))
    status = "ok" if counts["balanced"] else "bad"
    parts.append(
        f"<p class='{status}'>images in = images with slices + quarantined: {counts['manifest_rows']} = "
        f"{counts['images_with_slices']} + {counts['quarantined_cohort'] + counts['quarantined_preprocess']}</p>"
    )
    parts.append(_table(images.group_by("region").agg(pl.len().alias("images")).sort("region")))
    parts.append(_table(splits.group_by("split").agg(pl.len().alias("subjects")).sort("split")))
    parts.append(f"<p>{subjects.height} subjects in {images['shard'].n_unique() if images.height else 0} shards.</p>")
    parts.append("<h2>Quarantine</h2>")
    parts.append(_table(quarantine.group_by("stage", "reason").agg(pl.len().alias("images")).sort("images", descending=True)))
    parts.append(_table(quarantine.select("manifest_line", "stage", "subject_id", "region", "image", "reason"), max_quarantine_rows))
    parts.append("<h2>Preprocessed slices</h2>")
    parts.append(_table(index.group_by("region").agg(pl.len().alias("slices"), pl.col("is_center").sum().alias("center slices")).sort("region")))
    parts.append("<h2>Embeddings</h2>")
    rows = []
    for model, files in embeddings.items():
        for level in ("slices", "volumes"):
            m = read_parquet_metadata(files[level])
            n = pl.scan_parquet(files[level]).select(pl.len()).collect().item()
            rows.append({"model": model, "level": level, "rows": n, "dim": m.get("dim"), "config hash": m.get("config_hash")})
    parts.append(_table(pl.DataFrame(rows)))
    for model, files in embeddings.items():
        if files.get("reconstructions"):
            parts.append(f"<p>{html.escape(model)}: slices (top) and reconstructions (bottom)</p>{_png(files['reconstructions'])}")
    page = f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"
    with atomic_path(out_path, ".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return counts

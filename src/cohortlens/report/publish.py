"""The members of the publication archive: aggregates only, built from the run's tables.

`publication_members` reads the run's results folder and returns {archive name: bytes}:

* `report/publication.html` (the publication report) and `report/maps/*.png` (its coarsened maps);
* `cohort/counts.parquet` (images per region, subjects per split, small cells suppressed) and
  `quarantine/reasons.parquet` (`publication.quarantine_reasons`);
* `probes/{model}/metrics.parquet` and `baselines/{arch}/metrics.parquet` (the model table's numbers),
  `fairness/{model}/{summary,groups}.parquet` (groups under k suppressed), `findings/{model}.parquet` and `{model}-tests.parquet` (`findings_public`),
  the explanation PNGs of findings whose set has at least k images (names with dates coarsened),
  `mitigation/{model}/reprobe.parquet`, `models/{model}/train_log.csv` (loss curves; not the reconstruction grids,
  which show participants' slices).

Left out on purpose: subjects/images/splits/quarantine tables, the slice index, embeddings and projections
(one row per participant or image), probe and baseline predictions (per image), the static maps of results/plots (exact
attribute colours per point), the reconstruction grids, the full report (per-participant hover data).
config.yaml, versions.json and SHA256SUMS are added by `archive.write_archive`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Collection, Mapping

import polars as pl
import pyarrow.parquet as pq

from cohortlens.report.archive import write_archive
from cohortlens.report.publication import (
    fairness_groups_public,
    fairness_summary_public,
    findings_public,
    participant_ids,
    pictured,
    public_text,
    quarantine_reasons,
    suppress_small_cells,
)
from cohortlens.report.release import check_release, cohort_needles, public_dates
from cohortlens.report.sections import settings
from cohortlens.types import PathLike


def parquet_bytes(frame: pl.DataFrame, metadata: dict | None = None) -> bytes:
    table = frame.to_arrow()
    if metadata:
        table = table.replace_schema_metadata(metadata)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _read(path: Path) -> tuple[pl.DataFrame, dict]:
    table = pq.read_table(path)
    return pl.from_arrow(table), dict(table.schema.metadata or {})


def cohort_counts(images: pl.DataFrame, splits: pl.DataFrame, k: int) -> pl.DataFrame:
    """what (region / split), value, unit (images / subjects), n: counts suppressed below k."""
    parts = []
    if images.height:
        parts.append(images.group_by("region").agg(pl.len().cast(pl.Int64).alias("n"))
                     .select(pl.lit("region").alias("what"), pl.col("region").alias("value"),
                             pl.lit("images").alias("unit"), "n"))
    if splits.height:
        parts.append(splits.group_by("split").agg(pl.len().cast(pl.Int64).alias("n"))
                     .select(pl.lit("split").alias("what"), pl.col("split").alias("value"),
                             pl.lit("subjects").alias("unit"), "n"))
    frame = pl.concat(parts) if parts else pl.DataFrame(schema={"what": pl.Utf8, "value": pl.Utf8, "unit": pl.Utf8,
                                                                 "n": pl.Int64})
    return suppress_small_cells(frame.sort("what", "value"), k, "n", [])


def quarantine_tables(results_dir: PathLike) -> list[pl.DataFrame]:
    """The cohort and preprocess quarantine tables of a run (those that exist), and the imported models'
    (`embeddings/{model}/quarantine.parquet`, stage `import {model}`)."""
    res = Path(results_dir)
    tables = [pl.read_parquet(p) for p in (res / "cohort/quarantine.parquet", res / "preprocessed/quarantine.parquet")
              if p.is_file()]
    return tables + [pl.read_parquet(p).with_columns(pl.lit(f"import {p.parent.name}").alias("stage"))
                     for p in sorted(res.glob("embeddings/*/quarantine.parquet"))]


def publication_members(results_dir: PathLike, *, report: PathLike, k: int, images: pl.DataFrame,
                        quarantines: Collection[pl.DataFrame] = (), maps_dir: PathLike | None = None,
                        ids: Collection[str] = ()) -> dict[str, bytes]:
    """{archive name: bytes} of the publication archive from a run's results folder (see the module
    docstring), given its images table and quarantine tables; `ids` are the cohort's subject ids / image uids
    (withheld from the findings' text)."""
    res = Path(results_dir)
    members: dict[str, bytes] = {"report/publication.html": Path(report).read_bytes()}
    if maps_dir is not None and Path(maps_dir).is_dir():
        for f in sorted(Path(maps_dir).glob("*.png")):
            members[f"report/maps/{f.name}"] = f.read_bytes()
    splits = pl.read_parquet(res / "cohort/splits.parquet")
    members["cohort/counts.parquet"] = parquet_bytes(cohort_counts(images, splits, k))
    quarantine = pl.concat(list(quarantines), how="diagonal_relaxed") if quarantines else pl.DataFrame()
    members["quarantine/reasons.parquet"] = parquet_bytes(quarantine_reasons(quarantine, k))

    for p in sorted([*res.glob("probes/*/metrics.parquet"), *res.glob("baselines/*/metrics.parquet")]):
        frame, meta = _read(p)
        members[p.relative_to(res).as_posix()] = parquet_bytes(frame, meta)
    for d in sorted(res.glob("fairness/*")):
        groups = pl.read_parquet(d / "groups.parquet") if (d / "groups.parquet").is_file() else pl.DataFrame()
        if (d / "summary.parquet").is_file():
            summary, meta = _read(d / "summary.parquet")
            members[f"fairness/{d.name}/summary.parquet"] = parquet_bytes(
                fairness_summary_public(summary, groups, k), meta)
        if groups.height:
            members[f"fairness/{d.name}/groups.parquet"] = parquet_bytes(fairness_groups_public(groups, k))
    for p in sorted(res.glob("findings/*.parquet")):
        frame, meta = _read(p)
        members[p.relative_to(res).as_posix()] = parquet_bytes(findings_public(frame, k, ids), meta)
        if p.stem.endswith("-tests") or "evidence" not in frame.columns:
            continue
        for row in frame.iter_rows(named=True):
            if not pictured(row, k):
                continue
            for entry in row.get("evidence") or []:
                # results/findings/{model}/explain/ (runs before the finding networks: results/findings/{model}/)
                folder = res / "findings" / p.stem
                png = next((f for f in (folder / "explain" / Path(entry).name, folder / Path(entry).name)
                            if f.is_file()), folder / Path(entry).name)
                if png.is_file():
                    name = public_text(png.name, ids)
                    members[f"findings/{p.stem}/{name}"] = png.read_bytes()
    for p in sorted(res.glob("mitigation/*/reprobe.parquet")):
        frame, meta = _read(p)
        members[p.relative_to(res).as_posix()] = parquet_bytes(frame, meta)
    for p in sorted(res.glob("models/*/train_log.csv")):
        members[p.relative_to(res).as_posix()] = p.read_bytes()
    return members


PUBLICATION_ROOT = "cohortlens-publication"


def write_publication_archive(out_path: PathLike, *, results_dir: PathLike, report: PathLike,
                              maps_dir: PathLike | None, config: Mapping, sums_path: PathLike | None = None) -> dict:
    """The archive rule's publication job: the members of `publication_members` (k = config report.min_cell)
    written by `archive.write_archive` under cohortlens-publication/, after the release check
    (`release.check_release`: subject ids, exact dates and file paths of the cohort, DICOM identifiers of its
    inputs, cells below k) found nothing; otherwise ReleaseCheckFailed names every member and reason and no
    archive is written."""
    res = Path(results_dir)
    k = int(settings(config.get("report")).get("min_cell", 10))
    subjects = pl.read_parquet(res / "cohort/subjects.parquet")
    images = pl.read_parquet(res / "cohort/images.parquet")
    quarantines = quarantine_tables(res)
    members = publication_members(res, report=report, k=k, images=images, quarantines=quarantines,
                                  maps_dir=maps_dir, ids=participant_ids(subjects, images, *quarantines))
    needles = cohort_needles(subjects, images, quarantines, min_cell=k, public_dates=public_dates(config))

    def check(out: Mapping[str, bytes], identifiers: Mapping[str, str]) -> None:
        needles.identifiers = dict(identifiers)
        check_release(out, needles)

    summary = write_archive(out_path, members=members, config=config, images_parquet=res / "cohort/images.parquet",
                            sums_path=sums_path, root=PUBLICATION_ROOT, check=check)
    return {**summary, "min_cell": k, "release_check": "clean", "subject_ids": len(needles.subject_ids),
            "dates": len(needles.dates), "paths": len(needles.paths)}

"""The discover stage: from embeddings and the cohort tables to a table of findings about bias and data quality.

`discover(...)` runs, per region of one model's volume embeddings,

* attribute_leak — ridge probe + permutation test per attribute, site×date within each site
  (`leaks`; ours, on sklearn's RidgeCV);
* cluster — HDBSCAN density clusters and kNN neighbourhood pockets, Fisher / permutation enrichment,
  site×date onset (`clusters`; ours, on sklearn's HDBSCAN and scipy.stats);
* discordant_subgroup — subjects whose images look like the other sex beyond what the recorded covariates
  and the per-region classifier's error explain: cross-fitted evidence per region, combined per subject, a
  null fitted per sex on the cohort, BH over subjects (`subgroups`, `subgroup_null`; ours,
  on sklearn's LDA); paper 003's independence comparison is kept in the text;
* label_issue — recorded label vs out-of-fold probe probabilities (cleanlab Datalab's confident learning);
* outlier, near_duplicate — kNN distances in the reduced embedding (cleanlab Datalab);
* non_iid — a drift along the acquisition date: cleanlab's kNN graph and non-IID statistic, p-value by
  permuting the dates within site and scanner (`drift`);

then corrects p-values by Benjamini-Hochberg over every test of a kind (`core.adjust`), re-tests every
significant leak, cluster and date interaction conditional on each other attribute and marks echoes with their
root cause (`causes`, the `explained_by` column), keeps the
significant ones (and every cleanlab flag) as findings, draws one explanation PNG per finding with a sample
set (`explain`) and writes `findings/{model}.parquet`. `cohortlens.demo.truth.ground_truth_recall` matches
the findings against a demo cohort's planted effects.

The negative-control rule for dates is the same in every detector: a finding named `date` is a date effect
that no single stratum carries; one that disappears when one site (or scanner, batch: any categorical
acquisition attribute) is left out, and shows within it alone, is named `site×date` (`vendor×date`, ...) with
that value (an interaction, such as the demo's Neubrandenburg flat neck from study year 2 on). Rationale in
`cohortlens.demo.truth` and `core.confine_to_stratum`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import polars as pl

from cohortlens.analysis.discover import clusters, drift, leaks, quality, subgroups
from cohortlens.analysis.discover.causes import explain_echoes
from cohortlens.analysis.discover.core import (
    FINDINGS_SCHEMA,
    KINDS,
    Finding,
    RegionData,
    adjust,
    assign_ids,
    findings_table,
    reduce_embedding,
)
from cohortlens.analysis.discover.explain import explain_findings
from cohortlens.analysis.discover.settings import settings
from cohortlens.analysis.discover.subgroup_epochs import with_epochs
from cohortlens.analysis.table import load_analysis_table
from cohortlens.io.tables import write_parquet
from cohortlens.runtime import limit_threads
from cohortlens.types import PathLike

log = logging.getLogger(__name__)

__all__ = ["discover", "load_regions", "run_tests", "FINDINGS_SCHEMA", "KINDS"]


def load_regions(volumes_parquet: PathLike, subjects_parquet: PathLike, images_parquet: PathLike | None = None,
                 splits_parquet: PathLike | None = None, attributes: Mapping | None = None,
                 cfg: Mapping | None = None) -> tuple[list[RegionData], str]:
    """One `RegionData` per region (sorted), each with its own standardised PCA space; and the model name."""
    cfg = settings(cfg)
    table = load_analysis_table(volumes_parquet, subjects_parquet, splits_parquet, images_parquet,
                                attributes=attributes)
    regions = []
    rng = np.random.default_rng(cfg["seed"])
    for region in sorted(table.frame["region"].unique().to_list()):
        mask = (table.frame["region"] == region).to_numpy()
        if mask.sum() > cfg["max_region_images"]:
            mask = _subject_sample(table.frame, mask, cfg["max_region_images"], rng)
            log.warning("discover %s: %d images, analysing a random sample of %d subjects' images",
                        region, int((table.frame["region"] == region).sum()), int(mask.sum()))
        frame = table.frame.filter(pl.Series(mask))
        Z = reduce_embedding(table.X[mask], cfg["probe_dims"], cfg["seed"])
        regions.append(RegionData(region, frame, Z, table.specs, min(cfg["cluster_dims"], Z.shape[1]),
                                  X=table.X[mask], model=table.model))
    return regions, table.model or Path(volumes_parquet).parent.name


def _subject_sample(frame: pl.DataFrame, mask: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Whole subjects, in random order, until `cap` images: keeps a subject's images together."""
    subjects = np.asarray(frame["subject_id"].to_list(), dtype=object)
    uniq, counts = np.unique(subjects[mask].astype(str), return_counts=True)
    order = rng.permutation(len(uniq))
    keep = uniq[order][np.cumsum(counts[order]) <= cap]
    return mask & np.isin(subjects.astype(str), keep)


def run_tests(regions: list[RegionData], cfg: Mapping | None = None) -> list[Finding]:
    """Every test of every detector, p-values corrected, ids assigned (significant or not)."""
    cfg = settings(cfg)
    with limit_threads(cfg["blas_threads"]):
        tests = _run_detectors(regions, cfg)
        adjust(tests)
        t0 = time.perf_counter()
        # a fresh stream: the detectors' p-values do not change when the conditional re-tests are added
        epochs = explain_echoes(regions, tests, cfg, np.random.default_rng([cfg["seed"], 1]))
        log.info("discover root causes: %.1fs", time.perf_counter() - t0)
        # the subgroup after the root causes: their dated protocol changes are its covariates (subgroup_epochs);
        # its tests are a family of their own, so correcting them apart changes no p-value
        t0 = time.perf_counter()
        subgroup_tests = subgroups.discordant_subgroups(with_epochs(regions, epochs), cfg,
                                                        _stream(cfg, len(regions), len(DETECTORS)))
        adjust(subgroup_tests)
        tests += subgroup_tests
        log.info("discover discordant subgroups (%d dated acquisition changes as covariates): %.1fs", len(epochs),
                 time.perf_counter() - t0)
    assign_ids(tests)
    return tests


DETECTORS = (("leaks", leaks.attribute_leaks), ("clusters", clusters.clusters), ("quality", quality.data_quality),
             ("drift", drift.date_drift))


def _stream(cfg: dict, *keys: int) -> np.random.Generator:
    """The random stream of one detector in one region: adding or changing a detector leaves the others' draws
    (and so their p-values and flags) as they were."""
    return np.random.default_rng([int(cfg["seed"]), *keys])


def _run_detectors(regions: list[RegionData], cfg: dict) -> list[Finding]:
    tests: list[Finding] = []
    for r, rd in enumerate(regions):
        for d, (name, detector) in enumerate(DETECTORS):
            t0 = time.perf_counter()
            tests += detector(rd, cfg, _stream(cfg, r, d))
            log.info("discover %s %s: %.1fs", rd.region, name, time.perf_counter() - t0)
    return tests


def discover(volumes_parquet: PathLike, subjects_parquet: PathLike, images_parquet: PathLike | None,
             splits_parquet: PathLike | None, attributes: Mapping | None, cfg: Mapping | None,
             out_findings: PathLike, out_dir_png: PathLike | None, index_parquet: PathLike | None = None,
             out_tests: PathLike | None = None) -> pl.DataFrame:
    """Run every detector on one model's volume embeddings and write the significant findings.

    `attributes` is the config `attributes:` mapping (None: the declarations stored in subjects.parquet);
    `cfg` the config `discover:` mapping (keys and defaults: `settings.DEFAULTS`). With `index_parquet`
    (results/preprocessed/index.parquet, shards beside it) and `out_dir_png`, each finding with a sample set
    gets an explanation PNG in `out_dir_png` listed in its `evidence`. `out_tests`, if given, receives every
    test (significant or not) in the same schema: the report shows from it what was checked and not found.
    Without `index_parquet` (an empty list too: the workflow's input in an embeddings-only cohort) no images are
    drawn and the metadata's `explanations` says why. The split is not used: every detector cross-fits over all
    subjects.
    """
    cfg = settings(cfg)
    regions, model = load_regions(volumes_parquet, subjects_parquet, images_parquet, splits_parquet,
                                  attributes, cfg)
    tests = run_tests(regions, cfg)
    findings = [f for f in tests if f.is_finding(cfg["alpha"])]
    if out_dir_png is not None:
        Path(out_dir_png).mkdir(parents=True, exist_ok=True)  # a Snakemake directory() output, even if empty
    note = None
    if index_parquet and out_dir_png is not None:
        explain_findings(findings, index_parquet, out_dir_png, cfg)
    elif out_dir_png is not None:
        note = "image explanations skipped: no preprocessed images (an embeddings-only cohort)"
        log.info(note)
    meta = {"model": model, "alpha": cfg["alpha"], "settings": cfg, "n_tests": len(tests),
            "regions": [r.region for r in regions], **({"explanations": note} if note else {})}
    table = findings_table(findings)
    write_parquet(table, out_findings, metadata=meta)
    if out_tests is not None:
        write_parquet(findings_table(tests, cfg["alpha"]), out_tests, metadata=meta)
    return pl.from_arrow(table)

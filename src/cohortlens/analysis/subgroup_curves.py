"""The discordant subgroup's training curves (paper 003, Fig. 3): a classifier of the recorded value (sex) trained
on the images, its accuracy after every epoch for the flagged subjects and for the rest, on train and on val.

Paper 003 saw the rest reach 96-98 % after one epoch while the flagged group stayed at 40-70 %: the group's images
carry the other sex's features, so a network fits their recorded label late (or by memorising them). This stage
repeats that check for every cross-region discordant-subgroup finding of a model (`discover.subgroups`: region
`all`, value `co-occurrence`; the flagged subjects in its details' `subjects`).

Protocol:
- Network: `finding_networks.curves.arch` (ResNet10, the paper's) on every volume's center slices at the fixed
  center crop, all regions in one network; the cohort's subject-level splits (train fits, val is scored).
- Target and balance: the recorded value with the probes' class weights (every class the same total weight),
  the flagged subjects included with their recorded value, as in the paper.
- Accuracy: per image (the argmax of the mean logits over its center slices) against the recorded value, after
  every epoch, for each (split, group) cell: group `flagged` (the finding's subjects' images) and `rest`; at most
  `max_eval_images` images per cell (a seeded sample; `n` says how many were scored). The engine's epoch callback
  scores them; its values are kept in the network's checkpoint log, so a rerun that loads the finished network
  writes the same curves.

Output: `discordant-training-curves.csv` (finding_id, attribute, epoch, split, group, accuracy, n; one row per
finding, epoch, split and group; only the header when the model has no subgroup finding) and a PNG of the curves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import polars as pl

from cohortlens.analysis.baselines import Volumes, attribute_task, digest, load_volumes
from cohortlens.analysis.figures import curves_figure, message_figure, save_figure
from cohortlens.analysis.finding_network_settings import CurveSettings, curve_settings
from cohortlens.analysis.image_classifier import VolumeScorer, train_classifier
from cohortlens.analysis.probe_fit import prepare_attribute
from cohortlens.analysis.probe_settings import ProbeSettings
from cohortlens.io.tables import atomic_path
from cohortlens.models.supervised.settings import SupervisedSettings
from cohortlens.runtime import limit_threads, select_device
from cohortlens.types import ALL_REGIONS, PathLike

log = logging.getLogger(__name__)

CURVE_SCHEMA = {"finding_id": pl.Utf8, "attribute": pl.Utf8, "epoch": pl.Int64, "split": pl.Utf8, "group": pl.Utf8,
                "accuracy": pl.Float64, "n": pl.Int64}
SPLITS = ("train", "val")
GROUPS = ("flagged", "rest")


def subgroup_findings(findings: pl.DataFrame) -> list[dict]:
    """The cross-region discordant-subgroup findings with flagged subjects: {finding_id, attribute, subjects}."""
    if findings.height == 0:
        return []
    rows = findings.filter((pl.col("kind") == "discordant_subgroup") & (pl.col("region") == ALL_REGIONS)
                           & (pl.col("value") == "co-occurrence"))
    out = []
    for r in rows.iter_rows(named=True):
        subjects = sorted({str(s) for s in json.loads(r["details"] or "{}").get("subjects") or []})
        if subjects:
            out.append({"finding_id": r["finding_id"], "attribute": r["attribute"], "subjects": subjects})
    return out


def _cells(vols: Volumes, rows: dict[str, np.ndarray], flagged: np.ndarray, cap: int | None,
           rng: np.random.Generator) -> dict[tuple[str, str], np.ndarray]:
    """(split, group) -> the table rows scored (sorted; a seeded sample beyond `cap`)."""
    out = {}
    for split in SPLITS:
        for group in GROUPS:
            r = rows[split][flagged[rows[split]] == (group == "flagged")]
            if cap is not None and len(r) > cap:
                r = np.sort(rng.choice(r, cap, replace=False))
            out[split, group] = r
    return out


def finding_curves(finding: Mapping, vols: Volumes, sup: SupervisedSettings, cs: CurveSettings, out_dir: Path,
                   threads: int = 1) -> pl.DataFrame:
    """One finding's curves: train the classifier of its attribute and score every cell after every epoch."""
    attribute, fid = finding["attribute"], finding["finding_id"]
    table = vols.table
    prep = prepare_attribute(table, attribute) if attribute in table.specs else None
    if prep is None or prep.kind != "classification":
        log.warning("training curves %s: %s cannot be classified here; skipped", fid, attribute)
        return pl.DataFrame(schema=CURVE_SCHEMA)
    task = attribute_task(prep, table.frame.height, ProbeSettings())
    flagged = table.frame["subject_id"].is_in(list(finding["subjects"])).to_numpy()
    cells = _cells(vols, prep.rows, flagged, cs.max_eval_images, np.random.default_rng(sup.seed))
    scored = np.unique(np.concatenate(list(cells.values())))
    position = {int(r): i for i, r in enumerate(scored)}
    scorer = VolumeScorer(vols, scored, sup)

    def on_epoch(end) -> dict[str, float]:
        pred = scorer(end.network, end.device).argmax(1)
        out = {}
        for (split, group), r in cells.items():
            hit = pred[[position[int(i)] for i in r]] == prep.codes[r]
            out[f"accuracy_{split}_{group}"] = float(hit.mean()) if len(r) else float("nan")
        return out

    extra = {"scored": digest(scored, flagged[scored]), "cells": {f"{s}/{g}": len(r) for (s, g), r in cells.items()}}
    run = train_classifier(cs.arch, vols, task.target.astype(np.int64), task.weight, len(prep.classes), sup,
                           out_dir, name=f"curves[{fid}]", on_epoch=on_epoch, extra=extra, threads=threads)
    rows = []
    for entry in run.log:
        if "accuracy_train_rest" not in entry:
            continue
        epoch = int(round(entry["step"] / run.steps_per_epoch))
        for (split, group), r in cells.items():
            acc = entry[f"accuracy_{split}_{group}"]
            rows.append({"finding_id": fid, "attribute": attribute, "epoch": epoch, "split": split, "group": group,
                         "accuracy": None if not np.isfinite(acc) else float(acc), "n": len(r)})
    log.info("training curves %s: %d flagged subjects, %d epochs", fid, len(finding["subjects"]), sup.epochs)
    return pl.DataFrame(rows, schema=CURVE_SCHEMA)


def subgroup_curves(findings_parquet: PathLike, index: PathLike, subjects: PathLike, splits: PathLike, *,
                    images: PathLike | None = None, attributes: Mapping | None = None, cfg: Mapping | None = None,
                    out_dir: PathLike, threads: int = 1) -> pl.DataFrame:
    """The curves of every cross-region discordant-subgroup finding of one model (an empty frame without one);
    checkpoints in `out_dir`/checkpoints/."""
    sup, cs = curve_settings(cfg)
    found = subgroup_findings(pl.read_parquet(findings_parquet))
    if not found:
        return pl.DataFrame(schema=CURVE_SCHEMA)
    vols = load_volumes(index, subjects, splits, images, attributes=attributes)
    with limit_threads(threads, device=select_device(sup.device)):
        frames = [finding_curves(f, vols, sup, cs, Path(out_dir), threads) for f in found]
    return pl.concat(frames)


def write_subgroup_curves(findings_parquet: PathLike, index: PathLike, subjects: PathLike, splits: PathLike, *,
                          csv_out: PathLike, png_out: PathLike, out_dir: PathLike, model: str = "",
                          **kwargs) -> pl.DataFrame:
    """The training_curves stage of one model: the CSV (a header only without a subgroup) and its figure; the
    network's checkpoints in `out_dir`/checkpoints/<fingerprint>/."""
    curves = subgroup_curves(findings_parquet, index, subjects, splits, out_dir=out_dir, **kwargs)
    with atomic_path(csv_out, ".csv") as tmp:
        curves.write_csv(tmp)
    if curves.height:
        fig = curves_figure(curves, title=f"{model}: classifier of the recorded value, per epoch".strip(": "))
    else:
        fig = message_figure(f"{model}: no discordant subgroup among the findings,\nso no training curves".strip(": "))
    save_figure(fig, [png_out])
    return curves

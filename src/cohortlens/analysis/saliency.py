"""Classifier saliency per finding (paper 003, 3.1): can an image classifier tell a finding's set from the rest,
and where does it look?

For every cluster / pocket / discordant-subgroup finding with a sample set (at most `max_findings` per model, in
the report's order: root findings before echoes, larger |effect| first):
- Task: the set's images (the finding's `sample_ids`) against the rest of the same region(s), each volume's center
  slices at the fixed center crop; the cohort's subject-level splits (train fits, test scores; val is not used:
  nothing is tuned); class weights give set and rest the same total weight; the rest is a seeded sample of at most
  `max_rest_images` images per split.
- Network: `finding_networks.saliency.arch` (ResNet10) from the supervised engine.
- Held-out score: balanced accuracy of the volume decision (mean logits over the center slices, set when the set's
  logit is larger) on the test split, with a subject-bootstrap 95 % CI, and the ROC AUC. **Weak** when the
  accuracy is below `weak_below` or its CI reaches 0.5 (with `n_bootstrap: 0`: the threshold only), or when the
  set has no test image: an image classifier cannot (here: could not be shown to) separate the set.
- Saliency: MONAI GradCAM of the set's class on the layer `GRADCAM_LAYERS` names, one unit-mass map per center
  slice of the set's test images, averaged per region (`models.supervised.gradcam`); drawn over the mean of the
  same crops.

Outputs: `saliency/{finding_id}.png` and `saliency.parquet` (`INDEX_SCHEMA`, one row per finding considered, with
a `note` when it could not be trained or scored).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import polars as pl

from cohortlens.analysis.balance import class_weights
from cohortlens.analysis.baselines import Volumes, digest, load_volumes
from cohortlens.analysis.figures import saliency_figure, save_figure
from cohortlens.analysis.finding_network_settings import SaliencySettings, saliency_settings
from cohortlens.analysis.image_classifier import VolumeScorer, center_crops, train_classifier
from cohortlens.analysis.stats import balanced_accuracy_w, weighted_auc, with_ci
from cohortlens.io.tables import write_parquet
from cohortlens.models.supervised.gradcam import gradcam_maps
from cohortlens.models.supervised.networks import GRADCAM_LAYERS
from cohortlens.models.supervised.settings import SupervisedSettings
from cohortlens.runtime import limit_threads, select_device
from cohortlens.types import PathLike

log = logging.getLogger(__name__)

INDEX_SCHEMA = {"finding_id": pl.Utf8, "kind": pl.Utf8, "region": pl.Utf8, "attribute": pl.Utf8, "n_set": pl.Int64,
                "n_rest": pl.Int64, "n_train_set": pl.Int64, "n_test_set": pl.Int64, "n_test": pl.Int64,
                "balanced_accuracy": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
                "roc_auc": pl.Float64, "weak": pl.Boolean, "png": pl.Utf8, "note": pl.Utf8}


def saliency_findings(findings: pl.DataFrame, kinds, max_findings: int) -> pl.DataFrame:
    """The findings that get a classifier: of these kinds, with a sample set; roots first, then by |effect|."""
    if findings.height == 0:
        return findings
    echo = (pl.col("explained_by").is_not_null() & (pl.col("explained_by") != "")
            if "explained_by" in findings.columns else pl.lit(False))
    chosen = findings.filter(pl.col("kind").is_in(list(kinds)) & (pl.col("sample_ids").list.len() > 0))
    return (chosen.with_columns(echo.alias("_echo"), pl.col("effect_size").abs().alias("_abs"))
            .sort(["_echo", "_abs"], descending=[False, True], nulls_last=True).drop("_echo", "_abs")
            .head(max_findings))


def _rows(mask: np.ndarray, split: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    r = np.flatnonzero(mask & split)
    if cap is not None and len(r) > cap:
        r = np.sort(rng.choice(r, cap, replace=False))
    return r


def finding_saliency(finding: Mapping, vols: Volumes, sup: SupervisedSettings, ss: SaliencySettings,
                     out_dir: Path, threads: int = 1) -> tuple[dict, list[dict]]:
    """(index row without `png`, GradCAM panels per region) of one finding."""
    fid = finding["finding_id"]
    frame, table = vols.table.frame, vols.table
    in_set = frame["image_uid"].is_in([str(u) for u in finding["sample_ids"]]).to_numpy()
    region = frame["region"].to_numpy()
    rest = np.isin(region, np.unique(region[in_set])) & ~in_set
    rng = np.random.default_rng([sup.seed, *fid.encode()])
    split = {s: table.split_mask(s) for s in ("train", "test")}
    set_rows = {s: np.flatnonzero(in_set & m) for s, m in split.items()}
    rest_rows = {s: _rows(rest, m, ss.max_rest_images, rng) for s, m in split.items()}
    row = {"finding_id": fid, "kind": finding["kind"], "region": finding["region"], "attribute": finding["attribute"],
           "n_set": int(in_set.sum()), "n_rest": int(rest.sum()), "n_train_set": len(set_rows["train"]),
           "n_test_set": len(set_rows["test"]), "n_test": len(set_rows["test"]) + len(rest_rows["test"]),
           "balanced_accuracy": None, "ci_low": None, "ci_high": None, "roc_auc": None, "weak": True, "note": None}
    if not len(set_rows["train"]) or not len(rest_rows["train"]):
        row["note"] = "not trained: no set or no rest image in the train split"
        return row, []
    if not len(set_rows["test"]) or not len(rest_rows["test"]):
        row["note"] = "not scored: no set or no rest image in the test split"
        return row, []
    codes = in_set.astype(np.int64)
    train = np.concatenate([set_rows["train"], rest_rows["train"]])
    weights = np.zeros(frame.height, np.float32)
    weights[train] = class_weights(codes[train], 2)
    run = train_classifier(ss.arch, vols, codes, weights, 2, sup, out_dir, name=f"saliency[{fid}]",
                           extra={"rows": digest(np.sort(train))}, threads=threads)
    test = np.sort(np.concatenate([set_rows["test"], rest_rows["test"]]))
    logits = VolumeScorer(vols, test, sup)(run.network, run.device)
    decision, y = logits[:, 1] - logits[:, 0], codes[test]
    pred = (decision > 0).astype(np.int64)
    _, subject = np.unique(frame["subject_id"].to_numpy()[test].astype(str), return_inverse=True)
    ba, lo, hi = with_ci(lambda W: balanced_accuracy_w(y, pred, W, 2), len(test), subject, ss.n_bootstrap, rng)
    auc = float(weighted_auc(decision, y == 1, np.ones((1, len(test))))[0])
    weak = not ba >= ss.weak_below or (np.isfinite(lo) and lo <= 0.5)
    row.update(balanced_accuracy=ba, ci_low=_num(lo), ci_high=_num(hi), roc_auc=_num(auc), weak=bool(weak))
    panels = []
    for r in sorted(set(region[set_rows["test"]])):
        rows = set_rows["test"][region[set_rows["test"]] == r]
        slices = vols.slices_of(rows)
        crops = center_crops(vols, slices, sup)
        image = sum(crops[i][:, 0].sum(0).numpy() for i in range(len(crops))) / max(len(slices), 1)
        cams = gradcam_maps(run.network, crops, 1, layer=GRADCAM_LAYERS[ss.arch], device=run.device)
        cam = cams.maps.sum(0) / max(len(cams.maps) - cams.n_empty, 1)
        panels.append({"region": r, "image": image, "cam": cam, "n_images": len(rows), "n_slices": len(cams.maps),
                       "n_empty": cams.n_empty})
    log.info("saliency %s: balanced accuracy %.3f [%.3f, %.3f] on %d test images (%d of the set)%s", fid, ba, lo, hi,
             len(test), len(set_rows["test"]), ", weak" if weak else "")
    return row, panels


def _num(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def write_saliency(findings_parquet: PathLike, index: PathLike, subjects: PathLike, splits: PathLike, *,
                   images: PathLike | None = None, attributes: Mapping | None = None, cfg: Mapping | None = None,
                   png_dir: PathLike, index_out: PathLike, out_dir: PathLike,
                   threads: int = 1) -> tuple[pl.DataFrame, dict[str, list[dict]]]:
    """The saliency stage of one model: one PNG per scored finding in `png_dir`, the index parquet, the networks'
    checkpoints in `out_dir`/checkpoints/<fingerprint>/; returns the index and the panels (mean image and mean
    GradCAM per region) by finding id."""
    sup, ss = saliency_settings(cfg)
    png_dir = Path(png_dir)
    png_dir.mkdir(parents=True, exist_ok=True)  # a Snakemake directory() output, even if empty
    chosen = saliency_findings(pl.read_parquet(findings_parquet), ss.kinds, ss.max_findings)
    rows, maps = [], {}
    if chosen.height:
        vols = load_volumes(index, subjects, splits, images, attributes=attributes)
        with limit_threads(threads, device=select_device(sup.device)):
            for finding in chosen.iter_rows(named=True):
                row, panels = finding_saliency(finding, vols, sup, ss, Path(out_dir), threads)
                row["png"] = None
                if panels:
                    path = png_dir / f"{row['finding_id']}.png"
                    ci = (f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]" if row["ci_low"] is not None else "")
                    title = (f"{row['finding_id']}: set vs rest, held-out balanced accuracy "
                             f"{row['balanced_accuracy']:.2f}{ci} on {row['n_test']} test images "
                             f"({row['n_test_set']} of the set){' - weak' if row['weak'] else ''}")
                    save_figure(saliency_figure(panels, title), [path])
                    row["png"] = str(path)
                    maps[row["finding_id"]] = panels
                rows.append(row)
    frame = pl.DataFrame(rows, schema=INDEX_SCHEMA)
    meta = {"settings": {"engine": sup.result_keys(), "protocol": dataclasses.asdict(ss)}}
    write_parquet(frame, index_out, metadata=meta)
    return frame, maps

"""The supervised baselines of paper 003's Table 1: ResNet10, ResNet34 and DenseNet121 trained on the images
themselves, per attribute, scored like the probes.

Protocol (one job per architecture, `write_baselines`):
- Data: every volume's center slices (the regions' `center_slices`, 12 for spine MRI: the paper's fixed field of
  view) at the fixed center crop, all regions in one network; the probes' subject-level splits (results/cohort/
  splits.parquet): train to fit, val to choose the weight decay, test to score.
- Targets and balance: the probes' own training task (`probe_fit.prepare_attribute` / `make_task`, settings from
  config `probe:`): classes in declared order with class weights (every class the same total weight), continuous
  targets and dates standardised under capped inverse-density weights over the target range (without them age
  collapses to the mean, paper 003). A volume's weight is given to each of its slices.
- Networks: `heads: separate` trains one network per attribute (the paper), `shared` one network with a head per
  attribute; either way one network per weight decay of the grid, the best on val chosen per attribute
  (`probe_fit.tuning_score`: balanced accuracy, or MAE).
- Volume prediction: the mean over a volume's center slices of the logits (classification) or of the prediction
  (regression). Decisions as the probes give them: the logit difference (two classes) or the softmax (more).
- Scores: `probe.score_decisions` on the test split per region, and the region classified across regions in the
  `all` row (the probes' metrics schema, `backend` = "network", plus `supervision` = fully and `type` = image);
  val and test predictions in the probes' predictions schema.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import polars as pl

from cohortlens.analysis.baseline_settings import baseline_settings
from cohortlens.analysis.probe import METRICS_SCHEMA, PREDICTIONS_SCHEMA, prediction_frame, score_decisions
from cohortlens.analysis.probe_fit import PreparedAttribute, make_task, prepare_attribute, tuning_score
from cohortlens.analysis.probe_settings import ProbeSettings
from cohortlens.analysis.table import AnalysisTable, attribute_specs, join_attributes, join_splits
from cohortlens.io.tables import write_parquet
from cohortlens.models.supervised.data import CenterCrops, LabelledBatches
from cohortlens.models.supervised.heads import Head, n_outputs, output_slices
from cohortlens.models.supervised.loop import SupervisedRun, predict, train_supervised, volume_means
from cohortlens.models.supervised.networks import build_network
from cohortlens.models.supervised.settings import SupervisedSettings
from cohortlens.models.training.progress import write_log_csv
from cohortlens.models.training.settings import fingerprint
from cohortlens.preprocess.store import SliceStore
from cohortlens.runtime import limit_threads, seed_everything, select_device
from cohortlens.types import ALL_REGIONS, PathLike

log = logging.getLogger(__name__)

BACKEND = "network"  # metrics' `backend`: a network trained on the images, not a probe of an embedding
SUPERVISION, TYPE = "fully", "image"  # Table 1's columns (the probes of embeddings: semi, embedding)
BASELINE_METRICS_SCHEMA = {**METRICS_SCHEMA, "supervision": pl.Utf8, "type": pl.Utf8}


@dataclass
class Volumes:
    """The cohort's volumes (one row of `table` per image, attributes and split joined) and their center slices
    (`slices`: index rows in image then slice order; `volume[i]` is the table row of slice i)."""

    table: AnalysisTable
    slices: pl.DataFrame
    volume: np.ndarray
    shard_dir: Path
    canvas: tuple[int, int]

    def slices_of(self, rows: np.ndarray) -> np.ndarray:
        """Slice indices of the given table rows (in slice order)."""
        return np.flatnonzero(np.isin(self.volume, rows))


def load_volumes(index: PathLike, subjects: PathLike, splits: PathLike, images: PathLike | None = None, *,
                 attributes: Mapping | None = None, model: str = "") -> Volumes:
    """The volumes of the preprocessed cohort with their center slices, attributes and split."""
    store = SliceStore(index)
    specs = attribute_specs(attributes if attributes is not None else subjects)
    slices = store.index.filter(pl.col("is_center")).sort("image_uid", "slice_position")
    frame = slices.select("image_uid", "subject_id", "region").unique("image_uid", keep="first", maintain_order=True)
    needs_images = images is not None and any(s.level == "image" for s in specs.values())
    frame = join_attributes(frame, subjects, images if needs_images else None,
                            {a: s for a, s in specs.items() if s.level == "subject" or needs_images})
    frame = join_splits(frame, splits)
    row_of = dict(zip(frame["image_uid"].to_list(), range(frame.height)))
    volume = np.array([row_of[u] for u in slices["image_uid"].to_list()], dtype=np.int64)
    table = AnalysisTable(frame=frame, X=np.zeros((frame.height, 0), np.float32), specs=specs, model=model)
    return Volumes(table, slices, volume, store.shard_dir, store.canvas)


@dataclass
class AttributeTask:
    """One attribute as a network head: its target and balancing weight per volume (weight 0 outside the train
    split or where the value is missing), and the standardisation of a regression target."""

    prep: PreparedAttribute
    head: Head
    target: np.ndarray
    weight: np.ndarray
    mu: float = 0.0
    sd: float = 1.0


def attribute_task(prep: PreparedAttribute, n_volumes: int, settings: ProbeSettings) -> AttributeTask:
    """The probes' balanced training task on the train split (`probe_fit.make_task`, every row once), per volume."""
    task, mu, sd = make_task(prep, prep.rows["train"], settings, np.random.default_rng(settings.seed), None)
    target, weight = np.zeros(n_volumes, np.float32), np.zeros(n_volumes, np.float32)
    target[task.fit_rows], weight[task.fit_rows] = task.target, task.weights
    head = Head(prep.spec.name, prep.kind, len(prep.classes) if prep.kind == "classification" else 0)
    return AttributeTask(prep, head, target, weight, mu, sd)


def decisions(logits: np.ndarray, head: Head) -> np.ndarray:
    """A head's volume outputs as the probes' decisions: the logit difference of two classes, the softmax of
    more, the standardised value of a regression."""
    if head.kind == "regression":
        return logits[:, :1]
    if head.n_classes == 2:
        return logits[:, 1:2] - logits[:, 0:1]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _val_targets(task: AttributeTask, rows: np.ndarray) -> np.ndarray:
    if task.head.kind == "classification":
        return task.prep.codes[rows]
    return (task.prep.values[rows] - task.mu) / task.sd


def digest(*arrays: np.ndarray) -> str:
    """A short content hash of arrays (their bytes), for training fingerprints."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def center_crops(vols: Volumes, slices: np.ndarray, settings: SupervisedSettings) -> CenterCrops:
    """The fixed center crops of these slices (indices into `vols.slices`), in order."""
    shards, rows = vols.slices["shard"].to_numpy(), vols.slices["row"].to_numpy()
    return CenterCrops(vols.shard_dir, shards[slices], rows[slices], vols.canvas,
                       batch_size=settings.predict_batch_size, crop=settings.crop)


def train_on_volumes(arch: str, heads: list[Head], vols: Volumes, targets: np.ndarray, weights: np.ndarray,
                     settings: SupervisedSettings, out_dir: Path, *, name: str, fingerprint_name: str,
                     describe: Mapping, on_epoch=None, threads: int = 1) -> SupervisedRun:
    """Train one network on the center slices of the table rows with a positive weight: `targets` and `weights`
    are per table row and head (rows x heads); the fingerprint covers the settings, `describe`, the training
    slices and their targets and weights, so a changed task never resumes an old network. Shared by the
    baselines (`train_group`) and the finding networks (`image_classifier.train_classifier`)."""
    train_slices = np.flatnonzero(weights[vols.volume].sum(1) > 0)
    if len(train_slices) == 0:
        raise ValueError(f"{name}: no training volumes")
    slice_targets = targets[vols.volume[train_slices]]
    slice_weights = weights[vols.volume[train_slices]]
    shards, rows = vols.slices["shard"].to_numpy(), vols.slices["row"].to_numpy()
    data = LabelledBatches(vols.shard_dir, shards[train_slices], rows[train_slices], slice_targets, slice_weights,
                           vols.canvas, batch_size=settings.batch_size, crop=settings.crop, seed=settings.seed,
                           jitter=settings.jitter)
    cfg = {**settings.result_keys(), "arch": arch, **describe, "data": digest(slice_targets, slice_weights)}
    fp = fingerprint(fingerprint_name, cfg, vols.slices["slice_uid"].gather(train_slices).to_list())
    seed_everything(settings.seed)
    network = build_network(arch, n_outputs(heads), width=settings.width, stem_stride=settings.stem_stride)
    return train_supervised(network, heads, data, settings, out_dir, name=name, fingerprint_=fp, on_epoch=on_epoch,
                            threads=threads)


def train_group(arch: str, tasks: list[AttributeTask], vols: Volumes, sup: SupervisedSettings, weight_decay: float,
                eval_slices: np.ndarray, out_dir: Path, threads: int) -> tuple[np.ndarray, list[dict]]:
    """One network for these attributes at one weight decay: its volume-mean outputs per table row (NaN outside
    the evaluated volumes) and its log rows."""
    heads = [t.head for t in tasks]
    settings = dataclasses.replace(sup, weight_decay=float(weight_decay))
    label = f"{arch}[{','.join(h.name for h in heads)}] wd={weight_decay:g}"
    run = train_on_volumes(arch, heads, vols, np.stack([t.target for t in tasks], 1),
                           np.stack([t.weight for t in tasks], 1), settings, out_dir, name=label,
                           fingerprint_name=arch, describe={"heads": [dataclasses.asdict(h) for h in heads]},
                           threads=threads)
    crops = center_crops(vols, eval_slices, settings)
    num_workers = settings.num_workers if settings.num_workers is not None else max(0, int(threads) - 1)
    out = predict(run.network, crops, device=run.device, amp=settings.amp, channels_last=settings.channels_last,
                  num_workers=num_workers)
    means = volume_means(out, vols.volume[eval_slices], vols.table.frame.height)
    runs = [{"run": label, "weight_decay": weight_decay, **row} for row in run.log]
    return means, runs


def choose_weight_decay(scores: Mapping[float, float]) -> tuple[float, str]:
    """The weight decay with the best val score (the first of the grid on a tie), and where it was chosen; the
    middle of the grid when no val score exists (no val rows with a value)."""
    finite = {wd: s for wd, s in scores.items() if np.isfinite(s)}
    if not finite:
        grid = list(scores)
        return grid[len(grid) // 2], "none (no val rows)"
    best = max(finite.values())
    return next(wd for wd, s in finite.items() if s >= best - 1e-12), "val"


def run_baselines(arch: str, cfg: Mapping | None, index: PathLike, subjects: PathLike, splits: PathLike, *,
                  images: PathLike | None = None, attributes: Mapping | None = None,
                  probe: ProbeSettings | Mapping | None = None, out_dir: PathLike,
                  threads: int = 1) -> tuple[pl.DataFrame, pl.DataFrame, dict, list[dict]]:
    """Train and score one architecture on every attribute: (metrics, predictions, params, log rows)."""
    sup, base = baseline_settings(arch, cfg)
    probe = ProbeSettings.from_config(probe)
    out_dir = Path(out_dir)
    vols = load_volumes(index, subjects, splits, images, attributes=attributes, model=arch)
    table = vols.table
    names = [a for a in (base.attributes if base.attributes is not None else table.specs) if a in table.frame.columns]
    if base.region and table.frame["region"].n_unique() > 1:
        names.append("region")
    tasks = [attribute_task(p, table.frame.height, probe) for a in names if (p := prepare_attribute(table, a))]
    if not tasks:
        raise ValueError(f"baselines {arch}: no attribute can be trained (none has two classes / a spread in train)")
    groups = [tasks] if base.heads == "shared" else [[t] for t in tasks]
    eval_rows = np.flatnonzero(table.split_mask("val") | table.split_mask("test"))
    eval_slices = vols.slices_of(eval_rows)
    best: dict[str, tuple] = {}
    scores: dict[str, dict[float, float]] = {t.head.name: {} for t in tasks}
    log_rows: list[dict] = []
    with limit_threads(threads, device=select_device(sup.device)):
        for group in groups:
            for wd in base.weight_decays:
                means, runs = train_group(arch, group, vols, sup, wd, eval_slices, out_dir, threads)
                log_rows += runs
                for task, cols in zip(group, output_slices([t.head for t in group]).values()):
                    D = decisions(means[:, cols], task.head)
                    val = task.prep.rows["val"]
                    score = tuning_score(task.head.kind, task.head.n_classes, D[val], _val_targets(task, val)) \
                        if len(val) else np.nan
                    scores[task.head.name][wd] = score
                    chosen, _ = choose_weight_decay(scores[task.head.name])
                    if chosen == wd:  # keep only the best network's decisions
                        best[task.head.name] = (task, D)
    metrics, predictions, params = [], [], {}
    regions = list(dict.fromkeys(table.frame["region"].to_list()))
    for name, (task, D) in best.items():
        wd, where = choose_weight_decay(scores[name])
        params[name] = {"weight_decay": wd, "tuned_on": where,
                        "val_scores": {str(k): v for k, v in scores[name].items()}}
        log.info("baselines %s/%s: weight decay %g (%s; val scores %s)", arch, name, wd, where, scores[name])
        m, p = _score(table, task, D, regions, probe, arch)
        metrics += m
        predictions += p
    extra = [pl.lit(SUPERVISION).alias("supervision"), pl.lit(TYPE).alias("type")]
    metrics = (pl.concat(metrics) if metrics else pl.DataFrame(schema=METRICS_SCHEMA)).with_columns(extra)
    predictions = pl.concat(predictions) if predictions else pl.DataFrame(schema=PREDICTIONS_SCHEMA)
    return metrics.select(list(BASELINE_METRICS_SCHEMA)), predictions, params, log_rows


def _score(table: AnalysisTable, task: AttributeTask, D: np.ndarray, regions: list[str], probe: ProbeSettings,
           arch: str) -> tuple[list[pl.DataFrame], list[pl.DataFrame]]:
    """Metrics and val/test predictions of one attribute: per region, or across regions for the region itself."""
    prep, region_of = task.prep, table.frame["region"].to_numpy()
    n_train = len(prep.rows["train"])
    metrics, predictions = [], []
    for region in ([ALL_REGIONS] if prep.spec.name == "region" else regions):
        test, val = (rows if region == ALL_REGIONS else rows[region_of[rows] == region]
                     for rows in (prep.rows["test"], prep.rows["val"]))
        if len(test) == 0:
            log.warning("baselines %s/%s: no test images with a value in region %s; not scored", arch,
                        prep.spec.name, region)
            continue
        metrics.append(score_decisions(table, prep, test, D[test], task.mu, task.sd, probe, model=arch,
                                       region=region, n_train=n_train, backend=BACKEND))
        predictions += [prediction_frame(table, prep, rows, D[rows], split, arch, region, task.mu, task.sd)
                        for rows, split in ((val, "val"), (test, "test")) if len(rows)]
    return metrics, predictions


def write_baselines(arch: str, cfg: Mapping | None, index: PathLike, subjects: PathLike, splits: PathLike, *,
                    metrics_out: PathLike, predictions_out: PathLike, log_csv: PathLike, **kwargs) -> pl.DataFrame:
    """The train_baseline stage of one architecture: metrics.parquet, predictions.parquet (chosen weight decays and
    val scores in their metadata), train_log.csv; checkpoints in `<metrics folder>/checkpoints/`."""
    metrics, predictions, params, log_rows = run_baselines(arch, cfg, index, subjects, splits,
                                                           out_dir=Path(metrics_out).parent, **kwargs)
    sup, base = baseline_settings(arch, cfg)
    meta = {"model": arch, "settings": {**dataclasses.asdict(sup), **dataclasses.asdict(base)}, "params": params}
    write_parquet(metrics, metrics_out, metadata=meta)
    write_parquet(predictions, predictions_out, metadata=meta)
    write_log_csv(log_rows, log_csv)
    return metrics

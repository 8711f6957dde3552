"""The train stage of one autoencoder: config (preset + overrides) → seeded model → train → model.pt,
train_log.csv, reconstructions.png. The workflow script and `cohortlens train` call `train_from_files`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import polars as pl

from cohortlens.models.registry import build_model, resolve_config
from cohortlens.models.training.data import SliceBatches, center_crop_batch, qa_rows, training_rows
from cohortlens.models.training.loop import TrainResult, train
from cohortlens.models.training.settings import TrainSettings, fingerprint
from cohortlens.preprocess.store import SliceStore
from cohortlens.runtime import seed_everything
from cohortlens.types import PathLike


def train_from_files(
    name: str,
    cfg: Mapping[str, Any],
    index_path: PathLike,
    splits_path: PathLike,
    *,
    model_path: PathLike,
    log_csv: PathLike | None = None,
    reconstructions: PathLike | None = None,
    threads: int = 1,
) -> TrainResult:
    """The train stage of one model: config (preset + overrides) → seeded model → train → outputs.

    Checkpoints go to `<folder of model_path>/checkpoints/<fingerprint>/`.
    """
    cfg = resolve_config(name, cfg)
    settings = TrainSettings.from_config(cfg)
    store = SliceStore(index_path)
    splits = pl.read_parquet(splits_path)
    rows = training_rows(store.index, splits, settings.train_slices)
    data = SliceBatches(store.shard_dir, rows["shard"].to_numpy(), rows["row"].to_numpy(), store.canvas,
                        batch_size=settings.batch_size, crop=settings.crop, seed=settings.seed)
    fp = fingerprint(name, cfg, sorted(rows["slice_uid"].to_list()))
    qa = center_crop_batch(store, qa_rows(store.index, splits, settings.qa_images), settings.crop)
    seed_everything(settings.seed)
    model = build_model(name, cfg)
    out_dir = Path(model_path).parent
    return train(model, data, settings, out_dir, config=cfg, fingerprint_=fp, qa_batch=qa, model_path=model_path,
                 log_csv=log_csv, reconstructions=reconstructions, threads=threads)

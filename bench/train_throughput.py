"""Training throughput (images/s) of each registered autoencoder at its poster preset (256 px crops, the
preset's batch size) through the real trainer: memory-mapped float16 shards, DataLoader workers, autocast /
channels_last on CUDA, optimizer step, EMA. Prints the device.

    python bench/train_throughput.py [--preset nako] [--steps 4] [--batch N] [--threads 2] [--models vae dae]

Per model, in the same run:
- training img/s (median over the timed steps after --warmup steps), and for the VAE also without the Hessian
  penalty (hessian_weight 0): the ratio is what the penalty's 2k+1 extra decoder passes cost;
- the data stream alone (SliceBatches: read + random crop) in img/s, single process: how far data loading is
  from being the bottleneck.
A model whose module cannot be imported (e.g. MONAI missing) is reported and skipped.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from cohortlens.io.tables import write_parquet
from cohortlens.models.registry import available_models, build_model, resolve_config
from cohortlens.models.training.data import SliceBatches, training_rows
from cohortlens.models.training.loop import train
from cohortlens.models.training.settings import TrainSettings, fingerprint
from cohortlens.preprocess.store import SliceStore
from cohortlens.runtime import seed_everything, select_device


def synthetic_cohort(root: Path, *, n_images: int, slices: int = 16, canvas: int = 256, center: int = 12,
                     images_per_shard: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Smooth random slices in [-1, 1] (float16, the real shard format); returns (index, splits) paths."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    lo = (slices - center) // 2
    for k, start in enumerate(range(0, n_images, images_per_shard)):
        ids = range(start, min(n_images, start + images_per_shard))
        shard = np.lib.format.open_memmap(root / f"shard-{k}.npy", mode="w+", dtype=np.float16,
                                          shape=(len(ids) * slices, canvas, canvas))
        base = np.linspace(-1, 1, canvas, dtype=np.float32)
        for j, i in enumerate(ids):
            noise = rng.standard_normal((slices, canvas, canvas), dtype=np.float32) * 0.1
            shard[j * slices : (j + 1) * slices] = np.clip(base[None, :, None] * base[None, None, :] + noise, -1, 1)
            for p in range(slices):
                rows.append({"slice_uid": f"S{i:05d}/neck/{p}", "image_uid": f"S{i:05d}/neck", "subject_id": f"S{i:05d}",
                             "region": "neck", "shard": k, "row": j * slices + p, "slice_position": p,
                             "is_center": lo <= p < lo + center})
        shard.flush()
        del shard
    index = pl.DataFrame(rows)
    write_parquet(index, root / "index.parquet")
    subjects = index["subject_id"].unique().sort()
    splits = pl.DataFrame({"subject_id": subjects, "split": ["train"] * len(subjects), "stratum": [""] * len(subjects)})
    write_parquet(splits, root / "splits.parquet")
    return root / "index.parquet", root / "splits.parquet"


def train_rate(name: str, cfg: dict, index: Path, splits: Path, out: Path, threads: int, warmup: int) -> float:
    settings = TrainSettings.from_config(cfg)
    store = SliceStore(index)
    rows = training_rows(store.index, pl.read_parquet(splits), settings.train_slices)
    data = SliceBatches(store.shard_dir, rows["shard"].to_numpy(), rows["row"].to_numpy(), store.canvas,
                        batch_size=settings.batch_size, crop=settings.crop, seed=0)
    seed_everything(0)
    model = build_model(name, cfg)
    result = train(model, data, settings, out, config=cfg, fingerprint_=fingerprint(name, cfg), threads=threads)
    rates = [r["img_per_s"] for r in result.log[warmup:]]
    return statistics.median(rates)


def data_rate(index: Path, splits: Path, batch: int, crop: int, n: int = 20) -> float:
    store = SliceStore(index)
    rows = training_rows(store.index, pl.read_parquet(splits), "all")
    data = SliceBatches(store.shard_dir, rows["shard"].to_numpy(), rows["row"].to_numpy(), store.canvas,
                        batch_size=batch, crop=crop, seed=0)
    data[0]
    t0 = time.perf_counter()
    for s in range(1, n + 1):
        data[s]
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="nako")
    ap.add_argument("--models", nargs="*", default=["vae", "dae"])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None, help="override the preset batch (small CPUs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    device = select_device("auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {args.threads}")
    avail = available_models()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index, splits = synthetic_cohort(tmp / "cohort", n_images=16, canvas=288)
        for model in args.models:
            if avail.get(model):
                print(f"{model}: not available ({avail[model]}); skipped")
                continue
            cfg = resolve_config(model, {"preset": args.preset})
            if args.batch:
                cfg["batch_size"] = args.batch
            cfg.update(steps=args.warmup + args.steps, log_every=1, checkpoint_every=10**9, compile=args.compile,
                       warmup_steps=0, progress_seconds=1e9, qa_images=2)
            rate = train_rate(model, cfg, index, splits, tmp / model, args.threads, args.warmup)
            line = f"{model} [{args.preset}] {cfg['crop']}px batch {cfg['batch_size']}: {rate:.3g} img/s training"
            if model == "vae" and cfg.get("hessian_weight", 0) > 0:
                plain = train_rate(model, {**cfg, "hessian_weight": 0.0}, index, splits, tmp / "vae-plain",
                                   args.threads, args.warmup)
                line += f"; {plain:.3g} img/s without the Hessian penalty (penalty costs {plain / rate:.2f}x)"
            loader = data_rate(index, splits, cfg["batch_size"], cfg["crop"])
            line += f"; data stream alone {loader:.3g} img/s ({loader / rate:.3g}x the training rate, 1 process)"
            print(line, flush=True)


if __name__ == "__main__":
    main()

"""One prepared GPU check of every CUDA path of the pipeline, with figures: `$OUT/gpu_check.md` + `.json`.

    bash bench/gpu_wheels.sh                           # here, beforehand: the wheels the GPU image lacks
    bash bench/gpu_check.sh                            # on the GPU machine (writes under $OUT), < 6 min
    python bench/gpu_check.py --cpu --tiny --out DIR   # the whole check on the CPU, tiny sizes (a test runs it)

What it does, in order (each section is recorded even when another one fails; the JSON and Markdown are
rewritten after every section, so a run stopped at its time limit still leaves what it measured):
1. setup: the modules the machine lacks (polars, monai, nibabel, pydicom, isal) are installed from the
   wheels in `.gpu-wheels/` with `pip install --no-index --no-deps --target` (no registry); the project
   itself is imported from src/ (PYTHONPATH), not installed;
2. cohort: the demo generator writes a cohort at 256 px on the machine, then the cohort and preprocess
   stages run through the library (`build_cohort`, `preprocess_shard`) into float16 shards + index;
3. training throughput of vae (Hessian penalty on, as in the preset, and off) and dae at 256 px with the
   NAKO presets through the real trainer (`training.loop.train`: bf16 autocast + channels_last on CUDA,
   DataLoader workers, EMA) for a fixed number of steps; target DAE >= 150 img/s;
4. embedding throughput of each trained encoder: the embed stage (`embed_autoencoder`) and the bare encoder
   on slices already in memory; target >= 3000 slices/s per encoder;
5. the tiny demo's train and embed jobs (demo preset, `train_from_files` + `embed_autoencoder`) on the
   device: embeddings of the right shape, no NaN, and a second seeded run compared bit for bit; then the
   same pair in a subprocess with `torch.use_deterministic_algorithms(True, warn_only=True)` and
   CUBLAS_WORKSPACE_CONFIG, listing the ops CUDA has no deterministic kernel for;
6. torch.compile (`compile: true`) of each model in a subprocess bounded by the time left: compile time
   (first steps against eager), img/s, graph breaks, and whether the trainer fell back to eager.

The library's own entry points run everything; nothing of training or embedding is re-implemented here.
Only the standard library is imported at the top: the setup must run before polars or the project is imported.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import logging
import lzma
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
WHEELS = REPO / ".gpu-wheels"
LOG = logging.getLogger("gpu_check")

# import name -> distributions to install when it is missing (the GPU image has torch, numpy, scipy, scikit-learn,
# pandas, pyarrow, matplotlib, tqdm, pyyaml, pillow, threadpoolctl); isal is optional (faster .nii.gz reads)
NEEDED = {"polars": ["polars", "polars-runtime-32"], "monai": ["monai"], "nibabel": ["nibabel"],
          "pydicom": ["pydicom"], "isal": ["isal"]}
OPTIONAL = {"isal"}
# a wheel above this is stored as `<wheel>.xz`: its contents re-zipped uncompressed, then xz-compressed
# (polars' runtime: 54 MB as a wheel, 31 MB so), since at most 64 MiB of working tree travels to the GPU machine
PACK_ABOVE = 16 * 2**20

TARGETS = {"dae_train_img_per_s": 150.0, "embed_slices_per_s": 3000.0}


# ------------------------------------------------------------------------------------------- wheels


def pack_wheel(path: Path) -> Path:
    """`X.whl` -> `X.whl.xz` (stored zip, xz -9e) and removes `X.whl`."""
    path = Path(path)
    stored = path.with_name(path.name + ".stored")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
    out = path.with_name(path.name + ".xz")
    with open(stored, "rb") as f, lzma.open(out, "wb", preset=9 | lzma.PRESET_EXTREME) as g:
        shutil.copyfileobj(f, g, 2**22)
    stored.unlink()
    path.unlink()
    return out


def unpack_wheel(path: Path, dest: Path) -> Path:
    """`X.whl.xz` -> `dest/X.whl`."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(path).name[: -len(".xz")]
    with lzma.open(path, "rb") as f, open(out, "wb") as g:
        shutil.copyfileobj(f, g, 2**22)
    return out


def _wheel_for(dist: str, folder: Path) -> Path | None:
    prefix = dist.replace("-", "_").lower() + "-"
    hits = sorted(p for p in folder.glob("*") if p.name.lower().startswith(prefix)
                  and (p.name.endswith(".whl") or p.name.endswith(".whl.xz")))
    return hits[-1] if hits else None


def setup(wheels: Path, site: Path) -> dict:
    """Installs the wheels of the modules this Python lacks into `site` (prepended to sys.path)."""
    t0 = time.perf_counter()
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    out = {"missing_before": missing, "installed": [], "wheels_dir": str(wheels), "site": None}
    if not missing:
        out["setup_s"] = round(time.perf_counter() - t0, 2)
        return out
    files, absent = [], []
    unpacked = site.parent / "unpacked-wheels"
    for module in missing:
        for dist in NEEDED[module]:
            wheel = _wheel_for(dist, wheels) if wheels.is_dir() else None
            if wheel is None:
                if module not in OPTIONAL:
                    absent.append(dist)
                continue
            files.append(unpack_wheel(wheel, unpacked) if wheel.name.endswith(".xz") else wheel)
    if absent:
        raise RuntimeError(f"modules {missing} are missing and {wheels} has no wheel for {absent}: "
                           "run `bash bench/gpu_wheels.sh` where PyPI is reachable, and carry .gpu-wheels")
    if files:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--find-links", str(wheels), "--target", str(site),
               *map(str, files)]
        subprocess.run(cmd, check=True)
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
        out["site"] = str(site)
    out["installed"] = [p.name for p in files]
    out["setup_s"] = round(time.perf_counter() - t0, 2)
    return out


# ------------------------------------------------------------------------------------------- sizes


def sizes(tiny: bool, args) -> dict:
    """Everything that differs between the GPU run and `--tiny`."""
    if tiny:
        return {
            "canvas": 32, "subjects": 5, "slices": 16, "demo_size": 32, "demo_subjects": 6,
            # the NAKO presets at 32 px and a fraction of the width
            "overrides": {"vae": {"crop": 32, "channels": [8, 16], "latent_dim": 8, "batch_size": 4,
                                  "hessian_batch": 2},
                          "dae": {"crop": 32, "base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [16],
                                  "attention_head_channels": 8, "norm_groups": 4, "latent_dim": 16, "batch_size": 4}},
            "warmup": {"vae": 1, "dae": 1}, "timed": {"vae": 2, "dae": 2},
            "demo_overrides": {"crop": 32, "steps": args.demo_steps or 4, "log_every": 2, "checkpoint_every": 2,
                               "qa_images": 2, "ddim_steps": 4},
            "embed_batch": 64, "embed_repeats": 1, "threads": 1, "cohort_threads": 1,
            "supervised_overrides": {"crop": 32, "width": 0.125, "batch_size": 4}, "supervised_warmup": 1,
            "supervised_timed": 2, "profile_batches": [8], "profile_steps": 3,
        }
    return {
        "canvas": 256, "subjects": args.subjects, "slices": 16, "demo_size": 64, "demo_subjects": 100,
        "overrides": {"vae": {}, "dae": {}},
        # warm-up steps cover cuDNN autotuning (and compilation); timed = a multiple of warm-up (the log windows)
        "warmup": {"vae": 4, "dae": 5}, "timed": {"vae": 4 * args.train_windows, "dae": 10 * args.train_windows},
        "demo_overrides": {"steps": args.demo_steps} if args.demo_steps else {},
        "embed_batch": args.embed_batch, "embed_repeats": 2, "threads": max(1, min(8, os.cpu_count() or 1)),
        "cohort_threads": max(1, min(16, os.cpu_count() or 1)),
        "supervised_overrides": {}, "supervised_warmup": 5, "supervised_timed": 10 * args.train_windows,
        "profile_batches": [16, 32, 64], "profile_steps": 10,
    }


VARIANTS = {"vae": ("vae", {}), "vae_no_hessian": ("vae", {"hessian_weight": 0.0}), "dae": ("dae", {})}
SUPERVISED = ("resnet10", "resnet34", "densenet121")  # the baselines' architectures (paper 003, Table 1)


# ------------------------------------------------------------------------------------------- stages


def make_cohort(root: Path, *, size: int, subjects: int, slices: int, threads: int) -> dict:
    """The demo generator, then the cohort and preprocess stages as the workflow calls them."""
    import yaml

    from cohortlens.cohort.build import build_cohort
    from cohortlens.demo.generate import generate_demo_cohort
    from cohortlens.io.tables import write_parquet
    from cohortlens.preprocess.shard import INDEX_SCHEMA, merge_shard_tables, preprocess_shard

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    t0 = time.perf_counter()
    gen = generate_demo_cohort(root / "demo", n_subjects=subjects, size=size, n_slices=slices, dicom_fraction=0.1,
                               seed=0, workers=threads)
    t1 = time.perf_counter()
    # manifest_schema=None: the row check goes through snakemake.utils.validate, which the GPU image lacks
    tables = build_cohort(root / "demo" / "manifest.csv", attributes=cfg["attributes"], regions=cfg["regions"],
                          split=cfg["cohort"]["split"], subjects_per_shard=cfg["preprocess"]["subjects_per_shard"])
    write_parquet(tables.splits, root / "splits.parquet")
    t2 = time.perf_counter()
    pre = dict(cfg["preprocess"], canvas=[size, size])
    pre_dir = root / "pre"
    indexes, quarantined = [], 0
    for k in sorted(tables.images["shard"].unique()):
        r = preprocess_shard(tables.images, k, regions=cfg["regions"], preprocess=pre,
                             out_slices=pre_dir / f"shard-{k}.npy", out_index=pre_dir / f"index-{k}.parquet",
                             out_quarantine=pre_dir / f"quarantine-{k}.parquet", threads=threads)
        indexes.append(str(pre_dir / f"index-{k}.parquet"))
        quarantined += r.n_quarantined
    index = merge_shard_tables(indexes, INDEX_SCHEMA)
    write_parquet(index, pre_dir / "index.parquet")
    t3 = time.perf_counter()
    return {"size": size, "subjects": subjects, "volumes": int(gen["n_images"]), "dicom_series": int(gen["n_dicom_series"]),
            "slices": index.height, "train_subjects": int((tables.splits["split"] == "train").sum()),
            "quarantined": quarantined, "generate_s": round(t1 - t0, 2), "cohort_s": round(t2 - t1, 2),
            "preprocess_s": round(t3 - t2, 2), "index": str(pre_dir / "index.parquet"),
            "splits": str(root / "splits.parquet")}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _slice_batches(cohort: dict, train_slices: str, batch_size: int, crop: int):
    """The trainer's data stream over the check's cohort (seeded random crops of the training slices)."""
    import polars as pl

    from cohortlens.models.training.data import SliceBatches, training_rows
    from cohortlens.preprocess.store import SliceStore

    store = SliceStore(cohort["index"])
    rows = training_rows(store.index, pl.read_parquet(cohort["splits"]), train_slices)
    return SliceBatches(store.shard_dir, rows["shard"].to_numpy(), rows["row"].to_numpy(), store.canvas,
                        batch_size=batch_size, crop=crop, seed=0)


def train_variant(variant: str, cohort: dict, out: Path, sz: dict, device_name: str, *, compile_: bool = False,
                  deterministic: bool = False, compile_mode: str = "default") -> dict:
    """One fixed-length run of the real trainer at the NAKO preset; img/s over the steps after the warm-up."""
    import torch

    from cohortlens.models.registry import build_model, resolve_config
    from cohortlens.models.training.loop import train
    from cohortlens.models.training.settings import TrainSettings, fingerprint
    from cohortlens.runtime import seed_everything, select_device

    model_name, extra = VARIANTS[variant]
    warmup, timed = sz["warmup"][model_name], sz["timed"][model_name]
    cfg = resolve_config(model_name, {"preset": "nako", **sz["overrides"][model_name], **extra})
    # log windows of `warmup` steps: the first row closes the warm-up, each row syncs the device once
    cfg.update(steps=warmup + timed, log_every=warmup, checkpoint_every=10**9, compile=compile_,
               compile_mode=compile_mode, deterministic=deterministic, progress_seconds=1e9, qa_images=2, device=device_name)
    settings = TrainSettings.from_config(cfg)
    device = select_device(device_name)
    data = _slice_batches(cohort, settings.train_slices, settings.batch_size, settings.crop)
    seed_everything(0)
    model = build_model(model_name, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train(model, data, settings, out, config=cfg, fingerprint_=fingerprint(model_name, cfg), threads=sz["threads"])
    _sync(device)
    log = result.log
    first, last = log[0], log[-1]
    images = timed * settings.batch_size
    rate = images / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)
    row = {"model": model_name, "preset": "nako", "device": str(device), "crop": settings.crop, "batch": settings.batch_size,
           "hessian_weight": cfg.get("hessian_weight"), "params": sum(p.numel() for p in model.parameters()),
           "amp_bf16": settings.amp and device.type == "cuda", "channels_last": settings.channels_last,
           "compile": compile_, "compile_applied": compile_ and device.type == "cuda", "compile_mode": compile_mode,
           "deterministic": deterministic,
           "warmup_steps": warmup, "timed_steps": timed, "img_per_s": round(rate, 2),
           "median_window_img_per_s": round(statistics.median(r["img_per_s"] for r in log[1:]), 2),
           "first_steps_s": round(first["elapsed_s"], 3), "final_loss": last["loss"],
           "model_path": str(result.model_path)}
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if not compile_ and not deterministic:
        # bench/train_throughput.py's measure: the data stream alone (read + random crop, one process)
        sys.path.insert(0, str(BENCH))
        from train_throughput import data_rate

        row["data_stream_img_per_s"] = round(data_rate(Path(cohort["index"]), Path(cohort["splits"]),
                                                       settings.batch_size, settings.crop), 1)
    return row


# profile variants: name -> (model, overrides of the NAKO preset)
PROFILES = {"dae": ("dae", {}), "dae_nchw": ("dae", {"channels_last": False}), "vae": ("vae", {}),
            "vae_nchw": ("vae", {"channels_last": False})}


def profile_step(variant: str, cohort: dict, sz: dict, device_name: str) -> dict:
    """Where a training step's time goes, at the NAKO preset: the trainer's step (bf16 autocast, channels_last,
    fused AdamW; no EMA, no logging) timed at the preset's batch and at larger ones (is the rate bound by the batch
    size, i.e. by kernel launches?), then torch.profiler over a few steps at the preset's batch: host time per step
    against device kernel time per step, and the ops with the most device time."""
    import torch

    from cohortlens.models.registry import build_model, resolve_config
    from cohortlens.models.training.loop import to_device, train_step
    from cohortlens.models.training.settings import TrainSettings
    from cohortlens.runtime import configure_cuda, seed_everything, select_device

    model_name, extra = PROFILES[variant]
    device = select_device(device_name)
    configure_cuda(device, False)
    base = resolve_config(model_name, {"preset": "nako", **sz["overrides"][model_name], **extra})
    seed_everything(0)
    model = build_model(model_name, base).to(device)
    settings = TrainSettings.from_config({**base, "device": device_name})
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    model.train()

    def stream(batch: int):
        return iter(_slice_batches(cohort, settings.train_slices, batch, settings.crop))

    def step(x) -> None:
        train_step(model.training_loss, x, optimizer, device, settings.amp, settings.grad_clip)

    res: dict = {"model": model_name, "channels_last": settings.channels_last, "preset_batch": settings.batch_size,
                 "by_batch": {}}
    for batch in sorted({settings.batch_size, *sz["profile_batches"]}):
        it = stream(batch)
        xs = [to_device(next(it), device, settings.channels_last) for _ in range(sz["profile_steps"])]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)  # per batch: the peak of this batch's steps only
        try:
            for x in xs[:2]:
                step(x)
            _sync(device)
            t0 = time.perf_counter()
            for x in xs:
                step(x)
            _sync(device)
            dt = (time.perf_counter() - t0) / len(xs)
            res["by_batch"][batch] = {"ms_per_step": round(1e3 * dt, 2), "img_per_s": round(batch / dt, 1)}
            if device.type == "cuda":
                res["by_batch"][batch]["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        except torch.OutOfMemoryError as exc:
            res["by_batch"][batch] = {"error": f"out of memory: {exc}"[:200]}
        del xs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from torch.profiler import ProfilerActivity, profile

    it = stream(settings.batch_size)
    xs = [to_device(next(it), device, settings.channels_last) for _ in range(5)]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for x in xs:
            step(x)
        _sync(device)
    wall = (time.perf_counter() - t0) / len(xs)
    events = prof.key_averages()

    def dev_self(e) -> float:  # microseconds; the attribute was renamed from cuda to device in torch 2.4+
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    from torch.autograd import DeviceType

    # kernel events carry the device time once; an op's own row repeats its kernels' time
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    ops = [e for e in events if e.device_type != DeviceType.CUDA]
    kernel_us = sum(dev_self(e) for e in kernels)
    res["profiled"] = {"steps": len(xs), "wall_ms_per_step": round(1e3 * wall, 2),
                       "device_ms_per_step": round(kernel_us / 1e3 / len(xs), 2),
                       "device_busy_share": round(kernel_us / 1e6 / (wall * len(xs)), 3),
                       "cuda_launches_per_step": int(sum(e.count for e in events if e.key in (
                           "cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")) / len(xs))}
    top = sorted(ops, key=dev_self if device.type == "cuda" else (lambda e: e.self_cpu_time_total), reverse=True)[:20]
    res["top_ops"] = [{"op": e.key[:90], "calls_per_step": round(e.count / len(xs), 1),
                       "device_ms_per_step": round(dev_self(e) / 1e3 / len(xs), 3),
                       "host_self_ms_per_step": round(e.self_cpu_time_total / 1e3 / len(xs), 3)} for e in top]
    return res


def train_supervised_check(arch: str, cohort: dict, out: Path, sz: dict, device_name: str) -> dict:
    """The supervised engine (baselines, finding networks) at the NAKO baseline preset: one network with a sex head
    and an age head (labels drawn at random: only the speed is measured) for warm-up + timed steps through
    `train_supervised`, bf16 autocast and channels_last as the stage runs them; img/s over the timed steps."""
    import numpy as np
    import polars as pl
    import torch

    from cohortlens.analysis.baseline_settings import PRESETS
    from cohortlens.models.supervised.data import LabelledBatches
    from cohortlens.models.supervised.heads import Head, n_outputs
    from cohortlens.models.supervised.loop import train_supervised
    from cohortlens.models.supervised.networks import build_network
    from cohortlens.models.supervised.settings import SupervisedSettings
    from cohortlens.models.training.data import training_rows
    from cohortlens.preprocess.store import SliceStore
    from cohortlens.runtime import seed_everything, select_device

    warmup, timed = sz["supervised_warmup"], sz["supervised_timed"]
    cfg = {**PRESETS[arch]["nako"], **sz["supervised_overrides"], "epochs": 1, "steps_per_epoch": warmup + timed,
           "log_every": warmup, "checkpoint_every": 10**9, "progress_seconds": 1e9, "device": device_name,
           "num_workers": 0 if sz["threads"] == 1 else None}
    settings = SupervisedSettings.from_config(cfg)
    device = select_device(device_name)
    store = SliceStore(cohort["index"])
    rows = training_rows(store.index, pl.read_parquet(cohort["splits"]), "all")
    rng = np.random.default_rng(0)
    n = rows.height
    targets = np.stack([rng.integers(0, 2, n), rng.normal(size=n)], axis=1).astype(np.float32)
    heads = (Head("sex", "classification", 2), Head("age", "regression"))
    data = LabelledBatches(store.shard_dir, rows["shard"].to_numpy(), rows["row"].to_numpy(), targets,
                           np.ones_like(targets), store.canvas, batch_size=settings.batch_size, crop=settings.crop,
                           seed=0, jitter=settings.jitter)
    seed_everything(0)
    network = build_network(arch, n_outputs(heads), width=settings.width, stem_stride=settings.stem_stride)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = train_supervised(network, heads, data, settings, out, name=f"gpu_check-{arch}", fingerprint_=arch,
                           threads=sz["threads"])
    _sync(device)
    first, last = run.log[0], run.log[-1]
    rate = timed * settings.batch_size / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)
    row = {"arch": arch, "preset": "nako", "device": str(run.device), "crop": settings.crop,
           "batch": settings.batch_size, "width": settings.width, "params": sum(p.numel() for p in network.parameters()),
           "amp_bf16": settings.amp and run.device.type == "cuda", "channels_last": settings.channels_last,
           "warmup_steps": warmup, "timed_steps": timed, "img_per_s": round(rate, 2),
           "first_steps_s": round(first["elapsed_s"], 3), "final_loss": last["loss"],
           "finite": all(np.isfinite(r["loss"]) for r in run.log)}
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def embed_throughput(model_path: str, cohort: dict, out: Path, sz: dict, device_name: str) -> dict:
    """Slices/s of the embed stage (best of 2 on the GPU: the first pays cuDNN autotuning) and of the bare
    encoder on the same slices already in memory."""
    from cohortlens.embed.autoencoder import embed_autoencoder, make_encoder
    from cohortlens.models.modelfile import load_model
    from cohortlens.preprocess.store import SliceStore
    from cohortlens.runtime import limit_threads, select_device

    device = select_device(device_name)
    batch = sz["embed_batch"]
    model, info = load_model(model_path, device)
    cfg = info["config"]
    store = SliceStore(cohort["index"])
    n = store.index.height
    with limit_threads(sz["threads"], device=device):
        encode = make_encoder(model, int(cfg["crop"]), device, batch)
        slices = store.read(store.index)
        encode(slices[:batch])  # warm-up (cuDNN autotuning, allocator)
        _sync(device)
        t0 = time.perf_counter()
        vectors = encode(slices)
        _sync(device)
        bare = n / (time.perf_counter() - t0)
    del slices
    stage_times, parts = [], []
    for k in range(sz["embed_repeats"]):
        t0 = time.perf_counter()
        summary = embed_autoencoder(model_path, cohort["index"], slices_path=out / f"run{k}" / "slices.parquet",
                                    volumes_path=out / f"run{k}" / "volumes.parquet", splits_path=cohort["splits"],
                                    normalise=cfg.get("normalise"), batch_size=batch, device=device_name,
                                    threads=sz["threads"])
        stage_times.append(time.perf_counter() - t0)
        parts.append(summary.get("seconds"))
    import numpy as np
    import polars as pl

    from cohortlens.io.tables import read_parquet_metadata

    # the stage's vectors against the bare encoder's, row by row (a staging-buffer race would show here); bf16 and
    # per-run cuDNN algorithm choices allow small differences, in units of each dimension's spread
    best = out / f"run{int(np.argmin(stage_times))}" / "slices.parquet"
    staged = pl.read_parquet(best)
    order = {uid: i for i, uid in enumerate(store.index["slice_uid"].to_list())}
    rows = np.array([order[u] for u in staged["slice_uid"].to_list()])
    stage_vectors = np.stack(staged["embedding"].to_numpy())
    bare_vectors = vectors[rows].astype(np.float64)
    norm = read_parquet_metadata(best).get("normalisation")
    if norm:
        bare_vectors = (bare_vectors - np.asarray(norm["mean"])) / np.asarray(norm["std"])
    spread = bare_vectors.std(0) + 1e-12
    diff = float(np.max(np.abs(stage_vectors - bare_vectors) / spread))

    return {"model": info["model"], "crop": int(cfg["crop"]), "dim": int(model.embedding_dim), "slices": n,
            "stage_vs_bare_max_diff_sd": round(diff, 4),
            "batch": batch, "stage_slices_per_s": round(n / min(stage_times), 1), "bare_slices_per_s": round(bare, 1),
            "stage_s": [round(t, 3) for t in stage_times], "stage_parts_s": parts[int(np.argmin(stage_times))],
            "normalise": cfg.get("normalise"),
            "finite": bool(np.isfinite(vectors).all()), "n_volumes": summary["n_volumes"]}


def _embeddings(folder: Path):
    import numpy as np
    import polars as pl

    s = pl.read_parquet(folder / "slices.parquet")
    v = pl.read_parquet(folder / "volumes.parquet")
    es = np.stack(s["embedding"].to_numpy()) if s.height else np.empty((0, 0), np.float32)
    ev = np.stack(v["embedding"].to_numpy()) if v.height else np.empty((0, 0), np.float32)
    return s, v, es, ev


def demo_job(model_name: str, cohort: dict, out: Path, sz: dict, device_name: str, deterministic: bool = False) -> dict:
    """The workflow's train and embed jobs of one model at the demo preset (config/config.yaml's models entry)."""
    from cohortlens.embed.autoencoder import embed_autoencoder
    from cohortlens.io.tables import read_parquet_metadata
    from cohortlens.models.registry import resolve_config
    from cohortlens.models.training.stage import train_from_files

    cfg = {"preset": "demo", "seed": 0, "device": device_name, "deterministic": deterministic, **sz["demo_overrides"]}
    t0 = time.perf_counter()
    result = train_from_files(model_name, cfg, cohort["index"], cohort["splits"], model_path=out / "model.pt",
                              threads=sz["threads"])
    t1 = time.perf_counter()
    resolved = resolve_config(model_name, cfg)
    embed_autoencoder(out / "model.pt", cohort["index"], slices_path=out / "emb" / "slices.parquet",
                      volumes_path=out / "emb" / "volumes.parquet", splits_path=cohort["splits"],
                      normalise=resolved.get("normalise"), batch_size=int(resolved.get("embed_batch_size", 256)),
                      device=device_name, threads=sz["threads"])
    t2 = time.perf_counter()
    return {"steps": result.steps, "train_s": round(t1 - t0, 2), "embed_s": round(t2 - t1, 2),
            "meta": read_parquet_metadata(out / "emb" / "slices.parquet")}


def check_demo_pair(model_name: str, cohort: dict, out: Path, sz: dict, device_name: str,
                    deterministic: bool = False) -> dict:
    """Two seeded runs of the demo train + embed jobs: shapes, NaN, and whether they agree bit for bit."""
    import numpy as np
    import polars as pl

    runs = [demo_job(model_name, cohort, out / tag, sz, device_name, deterministic) for tag in ("a", "b")]
    index = pl.read_parquet(cohort["index"])
    s, v, es, ev = _embeddings(out / "a" / "emb")
    _, _, es2, ev2 = _embeddings(out / "b" / "emb")
    dim = int(runs[0]["meta"]["dim"])
    center = int(v.height and ev.shape[1] // max(dim, 1))
    shape_ok = (s.height == index.height and es.shape == (index.height, dim) and v.height == index["image_uid"].n_unique()
                and ev.shape == (v.height, dim * center) and center > 0)
    same_shape = es.shape == es2.shape and ev.shape == ev2.shape
    diff = float(np.max(np.abs(es - es2))) if same_shape and es.size else math.nan
    return {"model": model_name, "steps": runs[0]["steps"], "train_s": [r["train_s"] for r in runs],
            "embed_s": [r["embed_s"] for r in runs], "slices": int(s.height), "dim": dim, "volumes": int(v.height),
            "volume_dim": int(ev.shape[1]) if ev.ndim == 2 else 0, "index_slices": index.height, "shape_ok": bool(shape_ok),
            "nan_free": bool(np.isfinite(es).all() and np.isfinite(ev).all()),
            "identical": bool(same_shape and np.array_equal(es, es2) and np.array_equal(ev, ev2)),
            "max_abs_diff": diff, "weights": runs[0]["meta"].get("weights"),
            "normalisation": (runs[0]["meta"].get("normalisation") or {}).get("method")}


# ------------------------------------------------------------------------------------------- parts (subprocesses)


def part_determinism(args, work: Path, out_json: Path) -> None:
    """The demo pair again with deterministic algorithms (warn_only: the ops without one are listed)."""
    import warnings

    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    sz = sizes(args.tiny, args)
    cohort = json.loads((work / "demo_cohort.json").read_text())
    res: dict = {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"), "models": {}}
    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for model_name in ("vae", "dae"):
            try:
                # the trainer's own `deterministic: true` (its configure_cuda would otherwise undo the global switch)
                res["models"][model_name] = check_demo_pair(model_name, cohort, work / "strict" / model_name, sz,
                                                            args.device, deterministic=True)
            except Exception as exc:
                res["models"][model_name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            out_json.write_text(json.dumps(res, indent=1, default=str))
    for w in caught:
        msg = str(w.message).splitlines()[0]
        if "deterministic" in msg and msg not in seen:
            seen.append(msg)
    res["nondeterministic_ops"] = seen
    out_json.write_text(json.dumps(res, indent=1, default=str))


def part_compile(args, work: Path, out_json: Path) -> None:
    """Each model with `compile: true` in each of `--compile-modes` (the DAE first: its step is host-bound at the
    preset's batch, what CUDA graphs remove); compile cost = its first steps against eager's. Row names: the
    variant, with `@mode` for a mode other than default."""
    import torch

    sz = sizes(args.tiny, args)
    cohort = json.loads((work / "cohort.json").read_text())
    res: dict = {}
    fallbacks: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                fallbacks.append(record.getMessage())

    logging.getLogger("cohortlens.models.training").addHandler(Catch())
    cuda = args.device != "cpu" and torch.cuda.is_available()  # the trainer compiles on CUDA only
    runs = [(v, m) for v in ("dae", "vae", "vae_no_hessian") for m in args.compile_modes.split(",")]
    for variant, mode in runs:
        key = variant if mode == "default" else f"{variant}@{mode}"
        fallbacks.clear()
        if cuda:
            import torch._dynamo

            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
        try:
            row = train_variant(variant, cohort, work / "compiled" / key, sz, args.device, compile_=True,
                                compile_mode=mode)
            if cuda:
                from torch._dynamo.utils import counters

                row["graph_breaks"] = dict(counters["graph_break"].most_common(10))
                row["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
            row["fallback_to_eager"] = [m for m in fallbacks if "torch.compile failed" in m]
            res[key] = row
        except Exception as exc:
            res[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        out_json.write_text(json.dumps(res, indent=1, default=str))


def part_deterministic_train(args, work: Path, out_json: Path) -> None:
    """The vae and dae NAKO presets with `deterministic: true` (a fresh process, as a job: CUBLAS_WORKSPACE_CONFIG
    is read when cuBLAS starts): what identical reruns cost at full size."""
    sz = sizes(args.tiny, args)
    cohort = json.loads((work / "cohort.json").read_text())
    res: dict = {}
    for variant in ("vae", "dae"):
        try:
            res[variant] = train_variant(variant, cohort, work / "deterministic" / variant, sz, args.device,
                                         deterministic=True)
        except Exception as exc:
            res[variant] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        out_json.write_text(json.dumps(res, indent=1, default=str))


PARTS = {"determinism": part_determinism, "compile": part_compile, "deterministic_train": part_deterministic_train}
SECTIONS = ("train", "supervised", "embed", "profile", "demo", "deterministic_train", "compile")


def run_part(name: str, args, work: Path, timeout: float, env: dict | None = None) -> dict:
    """`--part NAME` of this script in a fresh process (its own CUDA context / cuBLAS settings), bounded."""
    out_json = work / f"part-{name}.json"
    log_path = work / f"part-{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--work", str(work), "--part-json",
           str(out_json), "--device", args.device, "--subjects", str(args.subjects), "--train-windows",
           str(args.train_windows), "--embed-batch", str(args.embed_batch), "--compile-modes", args.compile_modes]
    if args.tiny:
        cmd.append("--tiny")
    if args.demo_steps:
        cmd += ["--demo-steps", str(args.demo_steps)]
    full_env = dict(os.environ)
    paths = [p for p in (args.site_used, str(REPO / "src")) if p]
    full_env["PYTHONPATH"] = os.pathsep.join(paths + [full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full_env.update(env or {})
    t0 = time.perf_counter()
    status = "ok"
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            if rc:
                status = f"exit {rc}"
        except subprocess.TimeoutExpired:
            status = f"stopped after {timeout:.0f} s (time budget)"
    res = json.loads(out_json.read_text()) if out_json.exists() else {}
    res["_process"] = {"status": status, "wall_s": round(time.perf_counter() - t0, 1)}
    if status != "ok":
        res["_process"]["log_tail"] = log_path.read_text()[-3000:]
    return res


# ------------------------------------------------------------------------------------------- report


def _fmt(v, nd=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.{nd}g}"
    return str(v)


def _results_table(title: str, columns: tuple[str, ...], results: dict, cells) -> list[str]:
    """A markdown section: one row per named result (`cells(result)` gives the columns after the name), or the
    result's error across the row."""
    lines = [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:200]} |" + " |" * (len(columns) - 2))
        else:
            lines.append("| " + " | ".join((name, *cells(r))) + " |")
    return lines + [""]


def markdown(rep: dict) -> str:
    env = rep.get("env", {})
    lines = [f"# GPU check — {env.get('device_name', '?')} ({rep['mode']}{', tiny' if rep['tiny'] else ''})", "",
             f"{rep['started']}; torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
             f"Python {env.get('python')}; automatic device choice: `{env.get('auto_device')}`; "
             f"cuML available: {env.get('cuml_available')}; wall time {_fmt(rep.get('wall_s'))} s "
             f"(budget {rep['budget_s']} s).", ""]
    if rep.get("targets"):
        lines += ["## Targets", "", "| figure | value | target | met |", "|---|---|---|---|"]
        for k, t in rep["targets"].items():
            met = ("yes" if t.get("met") else "NO") if t.get("applies", True) else "n/a (CPU or tiny sizes)"
            lines.append(f"| {k} | {_fmt(t.get('value'), 4)} | ≥ {_fmt(t['target'], 4)} | {met} |")
        lines.append("")
    if rep.get("cohort"):
        c = rep["cohort"]
        lines += ["## Cohort", "", f"Demo generator at {c['size']} px: {c['subjects']} subjects, {c['volumes']} volumes "
                  f"({c['dicom_series']} DICOM series), {c['slices']} slices after preprocessing "
                  f"({c['quarantined']} quarantined); generate {c['generate_s']} s, cohort {c['cohort_s']} s, "
                  f"preprocess {c['preprocess_s']} s.", ""]
    lines += ["## Training (NAKO presets)", "",
              "| run | crop, batch | bf16, channels_last | compile | img/s | median window img/s | first steps s | "
              "peak GiB | data stream alone img/s |", "|---|---|---|---|---|---|---|---|---|"]
    for table in ("train", "deterministic_train", "compile"):
        for k, r in (rep.get(table) or {}).items():
            if k.startswith("_"):
                continue
            label = {"train": k, "compile": f"{k} (compile)", "deterministic_train": f"{k} (deterministic)"}[table]
            if "error" in r:
                lines.append(f"| {label} | error: {r['error'][:200]} | | | | | | | |")
                continue
            lines.append(f"| {label} | {r['crop']}, {r['batch']} | {r['amp_bf16']}, {r['channels_last']} | "
                         f"{'applied' if r['compile_applied'] else ('asked, CPU: not applied' if r['compile'] else 'no')}"
                         f" | {_fmt(r['img_per_s'], 4)} | {_fmt(r['median_window_img_per_s'], 4)} | "
                         f"{_fmt(r['first_steps_s'])} | {_fmt(r.get('peak_mem_gib'))} | "
                         f"{_fmt(r.get('data_stream_img_per_s'), 4)} |")
    lines.append("")
    det = rep.get("deterministic_train") or {}
    if det:
        lines += [f"Deterministic runs (`deterministic: true`, subprocess): {det.get('_process', {}).get('status')}; "
                  + "; ".join(f"{k}: {_fmt(r.get('slowdown'))}× the eager default's time per image"
                              for k, r in det.items() if not k.startswith("_") and "error" not in r), ""]
    comp = rep.get("compile") or {}
    if comp:
        lines += [f"torch.compile runs: {comp.get('_process', {}).get('status')}; "
                  + "; ".join(f"{k}: speed-up {_fmt(r.get('speedup'))}×, compile cost ≈ {_fmt(r.get('compile_cost_s'))} s, "
                              f"graph breaks {sum(r['graph_breaks'].values()) if 'graph_breaks' in r else '—'}, "
                              f"fell back to eager: {bool(r.get('fallback_to_eager'))}, helps: {r.get('helps')}"
                              for k, r in comp.items() if not k.startswith("_") and "error" not in r), ""]
    if rep.get("supervised"):
        lines += _results_table(
            "Supervised baselines (NAKO preset; random labels, speed only)",
            ("network", "crop, batch, width", "bf16, channels_last", "img/s", "first steps s", "peak GiB", "loss finite"),
            rep["supervised"],
            lambda r: (f"{r['crop']}, {r['batch']}, {r['width']}", f"{r['amp_bf16']}, {r['channels_last']}",
                       _fmt(r["img_per_s"], 4), _fmt(r["first_steps_s"]), _fmt(r.get("peak_mem_gib")),
                       str(r["finite"])))
    if rep.get("embed"):
        lines += _results_table(
            "Embedding", ("encoder", "crop, dim", "slices, batch", "stage slices/s", "bare encoder slices/s",
                          "stage seconds by part", "stage vs bare, max diff (sd)"),
            rep["embed"],
            lambda r: (f"{r['crop']}, {r['dim']}", f"{r['slices']}, {r['batch']}", _fmt(r["stage_slices_per_s"], 4),
                       _fmt(r["bare_slices_per_s"], 4), str(r.get("stage_parts_s")),
                       _fmt(r.get("stage_vs_bare_max_diff_sd"))))
    for k, r in (rep.get("profile") or {}).items():
        if "error" in r:
            lines += [f"## Step profile: {k}", "", f"error: {r['error'][:300]}", ""]
            continue
        pr = r["profiled"]
        lines += [f"## Step profile: {k} (NAKO preset, batch {r['preset_batch']}, channels_last "
                  f"{r['channels_last']}; no EMA, no logging)", "",
                  "| batch | ms per step | img/s | peak GiB |", "|---|---|---|---|"]
        lines += [f"| {b} | {_fmt(v.get('ms_per_step'))} | {_fmt(v.get('img_per_s'), 4)} | {_fmt(v.get('peak_mem_gib'))} |"
                  if "error" not in v else f"| {b} | {v['error'][:120]} | | |" for b, v in r["by_batch"].items()]
        lines += ["", f"Profiled {pr['steps']} steps at batch {r['preset_batch']}: wall {_fmt(pr['wall_ms_per_step'])} ms"
                  f" per step, device kernels {_fmt(pr['device_ms_per_step'])} ms (busy {_fmt(pr['device_busy_share'])}),"
                  f" {pr['cuda_launches_per_step']} kernel launches per step.", "",
                  "| op | calls per step | device ms per step | host self ms per step |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['calls_per_step']} | {o['device_ms_per_step']} | {o['host_self_ms_per_step']} |"
                  for o in r["top_ops"]]
        lines.append("")
    for key, title in (("demo", "Tiny demo train + embed on the device (default settings)"),
                       ("determinism_strict", "The same with deterministic algorithms (subprocess)")):
        d = rep.get(key) or {}
        models = d.get("models", d) if key == "determinism_strict" else d
        if not models:
            continue
        lines += [f"## {title}", "", "| model | steps | slices × dim | volumes × dim | shape ok | no NaN | 2nd run identical |"
                  " max abs diff |", "|---|---|---|---|---|---|---|---|"]
        for k, r in models.items():
            if k.startswith("_") or not isinstance(r, dict):
                continue
            if "error" in r:
                lines.append(f"| {k} | error: {r['error'][:200]} | | | | | | |")
                continue
            lines.append(f"| {k} | {r['steps']} | {r['slices']} × {r['dim']} | {r['volumes']} × {r['volume_dim']} | "
                         f"{r['shape_ok']} | {r['nan_free']} | {r['identical']} | {_fmt(r['max_abs_diff'])} |")
        if key == "determinism_strict":
            ops = d.get("nondeterministic_ops") or []
            lines += ["", f"Subprocess: {d.get('_process', {}).get('status')}; ops without a deterministic CUDA kernel "
                      f"(warn_only): {'; '.join(ops) if ops else 'none reported'}."]
        if key == "demo" and rep.get("determinism_note"):
            lines += ["", rep["determinism_note"]]
        lines.append("")
    s = rep.get("setup") or {}
    lines += ["## Setup", "", f"Missing before setup: {s.get('missing_before')}; installed from {s.get('wheels_dir')}: "
              f"{s.get('installed')} in {s.get('setup_s')} s.", ""]
    if rep.get("errors"):
        lines += ["## Errors", ""] + [f"- {e['section']}: {e['error']}" for e in rep["errors"]] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for gpu_check.md/.json")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: the test suite's run)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and few steps")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 330; tiny 120)")
    ap.add_argument("--wheels", default=str(WHEELS), help="folder of the wheels (bench/gpu_wheels.sh)")
    ap.add_argument("--subjects", type=int, default=96, help="subjects of the 256 px cohort (x 3 regions x 16 slices)")
    ap.add_argument("--train-windows", type=int, default=10, help="timed log windows per training run")
    ap.add_argument("--embed-batch", type=int, default=256, help="encoder minibatch (slices)")
    ap.add_argument("--demo-steps", type=int, default=None, help="override the demo presets' steps")
    ap.add_argument("--profile", default="dae,vae", help=f"profile section's variants: {', '.join(PROFILES)}")
    ap.add_argument("--compile-modes", default="reduce-overhead,default",
                    help="torch.compile modes the compile section tries, in order (training.settings.COMPILE_MODES)")
    ap.add_argument("--profile-batches", default=None, help="batches timed beside the preset's (default 16,32,64)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--pack-wheel", nargs="*", default=None, help="(bench/gpu_wheels.sh) store these wheels as .whl.xz")
    ap.add_argument("--only", default=None, help=f"comma-separated sections to run after setup and the cohort "
                    f"(default: all but deterministic_train): {', '.join(SECTIONS)}")
    ap.add_argument("--part", choices=sorted(PARTS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pack_wheel is not None:
        for w in args.pack_wheel:
            print(f"{w} -> {pack_wheel(Path(w))}")
        return 0
    sys.path.insert(0, str(REPO / "src"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.part:
        PARTS[args.part](args, Path(args.work), Path(args.part_json))
        return 0

    t_start = time.perf_counter()
    budget = args.budget or (120.0 if args.tiny else 330.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep: dict = {"schema": 1, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "mode": "cpu" if args.cpu else "gpu", "tiny": args.tiny, "budget_s": budget, "errors": []}

    def left() -> float:
        return budget - (time.perf_counter() - t_start)

    def write() -> None:
        rep["wall_s"] = round(time.perf_counter() - t_start, 1)
        (out / "gpu_check.json").write_text(json.dumps(rep, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(rep))

    def section(name: str, fn, *a, **kw):
        LOG.info("--- %s (%.0f s left)", name, left())
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        except Exception as exc:
            rep["errors"].append({"section": name, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()})
            LOG.error("%s failed:\n%s", name, traceback.format_exc())
            return None
        finally:
            rep.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 2)
            write()

    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gpu_check-")
        work = Path(tmp.name)
    args.site_used = None
    try:
        s = section("setup", setup, Path(args.wheels), work / "site")
        rep["setup"] = s or {}
        if s is None:
            return 1
        args.site_used = s.get("site")
        import torch

        from cohortlens.runtime import cuml_available, select_device

        cuda = torch.cuda.is_available()
        rep["env"] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                      "cudnn": torch.backends.cudnn.version() if cuda else None, "cuda_available": cuda,
                      "auto_device": str(select_device("auto")), "cuml_available": cuml_available(),
                      "cpus": os.cpu_count(), "machine": platform.machine()}
        if cuda:
            p = torch.cuda.get_device_properties(0)
            rep["env"].update(device_name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                              gpu_mem_gib=round(p.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
        else:
            rep["env"]["device_name"] = f"CPU {platform.processor() or platform.machine()}"
        if not args.cpu and not cuda:
            rep["errors"].append({"section": "env", "error": "no CUDA device visible: run with --cpu (--tiny)"})
            write()
            return 2
        args.device = "cpu" if args.cpu else "auto"  # auto: the pipeline's own device choice (must pick CUDA here)
        sz = sizes(args.tiny, args)
        wanted = set(args.only.split(",")) if args.only else set(SECTIONS)
        if wanted - set(SECTIONS):
            raise SystemExit(f"--only: unknown sections {sorted(wanted - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
        from cohortlens.models.training.settings import COMPILE_MODES

        if set(args.compile_modes.split(",")) - set(COMPILE_MODES):
            raise SystemExit(f"--compile-modes: unknown {sorted(set(args.compile_modes.split(',')) - set(COMPILE_MODES))}; "
                             f"known: {', '.join(COMPILE_MODES)}")
        unknown = set(args.profile.split(",")) - set(PROFILES)
        if unknown:
            raise SystemExit(f"--profile: unknown variants {sorted(unknown)}; known: {', '.join(PROFILES)}")
        if args.profile_batches:
            sz["profile_batches"] = [int(b) for b in args.profile_batches.split(",")]
        rep["sections"] = sorted(wanted)
        rep["sizes"] = {k: v for k, v in sz.items() if k != "overrides"}

        cohort = section("cohort", make_cohort, work / "cohort", size=sz["canvas"], subjects=sz["subjects"],
                         slices=sz["slices"], threads=sz["cohort_threads"])
        if cohort:
            rep["cohort"] = {k: v for k, v in cohort.items() if not k.startswith("_")}
            (work / "cohort.json").write_text(json.dumps(rep["cohort"]))
            rep["train"], rep["embed"] = {}, {}
            for variant in VARIANTS if wanted & {"train", "embed", "compile", "deterministic_train"} else ():
                row = section(f"train {variant}", train_variant, variant, cohort, work / "train" / variant, sz, args.device)
                rep["train"][variant] = row or {"error": rep["errors"][-1]["error"]}
                write()
            rep["supervised"] = {}
            for arch in SUPERVISED if "supervised" in wanted else ():
                row = section(f"train {arch}", train_supervised_check, arch, cohort, work / "supervised" / arch, sz,
                              args.device)
                rep["supervised"][arch] = row or {"error": rep["errors"][-1]["error"]}
                write()
            for model_name in ("vae", "dae") if "embed" in wanted else ():
                trained = rep["train"].get(model_name, {})
                if "model_path" not in trained:
                    continue
                row = section(f"embed {model_name}", embed_throughput, trained["model_path"], cohort,
                              work / "embed" / model_name, sz, args.device)
                rep["embed"][model_name] = row or {"error": rep["errors"][-1]["error"]}
                write()

        rep["profile"] = {}
        for variant in args.profile.split(",") if cohort and "profile" in wanted else ():
            row = section(f"profile {variant}", profile_step, variant, cohort, sz, args.device)
            rep["profile"][variant] = row or {"error": rep["errors"][-1]["error"]}
            write()

        demo = "demo" in wanted and section("demo cohort", make_cohort, work / "demo", size=sz["demo_size"], subjects=sz["demo_subjects"],
                       slices=16, threads=sz["cohort_threads"])
        if demo:
            (work / "demo_cohort.json").write_text(json.dumps({k: v for k, v in demo.items() if not k.startswith("_")}))
            rep["demo_cohort"] = {k: v for k, v in demo.items() if not k.startswith("_")}
            rep["demo"] = {}
            for model_name in ("vae", "dae"):
                row = section(f"demo {model_name}", check_demo_pair, model_name, demo, work / "demo_runs" / model_name,
                              sz, args.device)
                rep["demo"][model_name] = row or {"error": rep["errors"][-1]["error"]}
                write()
            if not args.cpu:
                rep["determinism_note"] = (
                    "Default settings on CUDA: cudnn.benchmark picks convolution algorithms per run, and some CUDA "
                    "backward kernels accumulate with atomics, so two seeded runs can differ, and training "
                    "amplifies the difference; the run below with the trainer's `deterministic: true` shows what "
                    "CUDA can make identical.")
            if left() > 30:
                rep["determinism_strict"] = section("determinism (strict)", run_part, "determinism", args, work,
                                                    max(10.0, left() - 15), {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
            else:
                rep["determinism_strict"] = {"_process": {"status": "skipped: time budget spent"}}
            write()

        if cohort and "deterministic_train" in wanted and not args.cpu and left() > 60:
            det = section("deterministic train", run_part, "deterministic_train", args, work, max(10.0, left() - 30),
                          {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}) or {}
            for k, r in det.items():
                eager = rep["train"].get(k, {})
                if not k.startswith("_") and "img_per_s" in r and eager.get("img_per_s"):
                    r["slowdown"] = round(eager["img_per_s"] / r["img_per_s"], 3)
            rep["deterministic_train"] = det
            write()
        elif cohort and "deterministic_train" in wanted and args.cpu:
            section("deterministic train", part_deterministic_train, args, work, work / "part-deterministic_train.json")
            p = work / "part-deterministic_train.json"
            rep["deterministic_train"] = {**(json.loads(p.read_text()) if p.exists() else {}),
                                          "_process": {"status": "in-process on the CPU: a no-op there"}}
            write()
        if "compile" not in wanted:
            comp = None
        elif cohort and args.cpu:
            # the trainer compiles on CUDA only: on the CPU the part runs in this process, compile asked, not applied
            section("compile", part_compile, args, work, work / "part-compile.json")
            comp = json.loads((work / "part-compile.json").read_text()) if (work / "part-compile.json").exists() else {}
            comp["_process"] = {"status": "in-process on the CPU: torch.compile is applied on CUDA only"}
        elif cohort and left() > 30:
            # a subprocess bounded by the time left: a long compile cannot overrun the run
            comp = section("compile", run_part, "compile", args, work, max(10.0, left() - 10)) or {}
        else:
            comp = None
        if comp is not None:
            for k, r in comp.items():
                eager = rep["train"].get(k.split("@")[0], {})
                if k.startswith("_") or "error" in r or "img_per_s" not in eager:
                    continue
                r["speedup"] = round(r["img_per_s"] / eager["img_per_s"], 3)
                r["compile_cost_s"] = round(r["first_steps_s"] - eager["first_steps_s"], 2)
                r["helps"] = bool(r["compile_applied"] and r["speedup"] > 1.05 and not r.get("fallback_to_eager"))
            rep["compile"] = comp
            write()
        elif cohort and "compile" in wanted:
            rep["compile"] = {"_process": {"status": "skipped: time budget spent"}}

        targets = {}
        dae = (rep.get("train") or {}).get("dae", {})
        targets["dae_train_img_per_s"] = {"target": TARGETS["dae_train_img_per_s"], "value": dae.get("img_per_s")}
        compiled_dae = [r for k, r in (rep.get("compile") or {}).items() if k.split("@")[0] == "dae" and r.get("helps")]
        best = max(compiled_dae, key=lambda r: r["img_per_s"], default={})
        if best.get("helps"):
            targets["dae_train_img_per_s_compiled"] = {"target": TARGETS["dae_train_img_per_s"], "value": best["img_per_s"]}
        for k, r in (rep.get("embed") or {}).items():
            targets[f"embed_{k}_slices_per_s"] = {"target": TARGETS["embed_slices_per_s"],
                                                  "value": r.get("stage_slices_per_s")}
        for t in targets.values():
            t["met"] = t["value"] is not None and t["value"] >= t["target"]
            t["applies"] = not args.tiny and not args.cpu  # the targets are for the GPU at full size
        rep["targets"] = targets
        rep["done"] = True
        write()
        LOG.info("wrote %s and %s in %.0f s", out / "gpu_check.md", out / "gpu_check.json", time.perf_counter() - t_start)
        return 1 if rep["errors"] else 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())

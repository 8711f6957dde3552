"""Preprocess throughput vs a bare nibabel load of the same files, measured in the same run.

    python bench/preprocess.py [--subjects 100 --size 128 --slices 16]

Target: the stage's per-shard work (read, reorient, slice, rescale, canvas, float16 shard + index) takes
at most 1.3x the time of `nibabel.load(path).get_fdata(dtype=float32)` on the same NIfTI files.
Both run single-threaded in this process, alternating, best of --repeat.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import yaml

from cohortlens.cohort.build import build_cohort
from cohortlens.demo.generate import generate_demo_cohort
from cohortlens.preprocess.shard import preprocess_shard

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=100)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        generate_demo_cohort(tmp / "demo", n_subjects=args.subjects, size=args.size, n_slices=args.slices,
                             dicom_fraction=0.0, seed=0, workers=2)
        t_gen = time.perf_counter() - t0
        tables = build_cohort(tmp / "demo" / "manifest.csv", attributes=cfg["attributes"], regions=list(cfg["regions"]),
                              split=cfg["cohort"]["split"], subjects_per_shard=32)
        images = tables.images
        paths = images["path"].to_list()
        pre_cfg = dict(cfg["preprocess"], canvas=[args.size, args.size])
        n_bytes = sum(Path(p).stat().st_size for p in paths)

        def bare():
            for p in paths:
                nib.load(p).get_fdata(dtype=np.float32)

        def stage():
            for k in sorted(images["shard"].unique()):
                preprocess_shard(images, k, regions=cfg["regions"], preprocess=pre_cfg, out_slices=tmp / "out" / f"shard-{k}.npy",
                                 out_index=tmp / "out" / f"index-{k}.parquet", out_quarantine=tmp / "out" / f"q-{k}.parquet", threads=1)

        best = {"bare": float("inf"), "stage": float("inf")}
        for _ in range(args.repeat):
            for name, fn in (("bare", bare), ("stage", stage)):
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        n_slices = pl.concat([pl.read_parquet(p) for p in (tmp / "out").glob("index-*.parquet")]).height
    ratio = best["stage"] / best["bare"]
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    print(f"cohort: {args.subjects} subjects x 3 regions = {len(paths)} NIfTI volumes of {args.slices}x{args.size}x{args.size}"
          f" ({n_bytes / 1e6:.1f} MB gzipped), generated in {t_gen:.1f} s")
    print(f"bare nibabel load : {best['bare']:.2f} s  ({len(paths) / best['bare']:.0f} volumes/s)")
    print(f"preprocess stage  : {best['stage']:.2f} s  ({len(paths) / best['stage']:.0f} volumes/s, {n_slices / best['stage']:.0f} slices/s)")
    print(f"ratio stage / bare: {ratio:.2f}x  (target <= 1.3x) -> {'PASS' if ratio <= 1.3 else 'FAIL'}")


if __name__ == "__main__":
    main()

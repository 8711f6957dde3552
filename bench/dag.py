"""DAG size and `snakemake -n` time on a complete large demo cohort.

    python bench/dag.py [--subjects 10000 2500 --size 32 --slices 12]

For each cohort size: generate the demo cohort (small in-plane size), run the whole workflow once, then
time `snakemake -n` (nothing to do) and count the jobs a fresh run plans. Targets: the dry run of the
complete 10,000-subject cohort <= 10 s, and a job count that follows the shard count, not the image count.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def sm(workdir: Path, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
                        "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args],
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stdout[-3000:] + p.stderr[-3000:])
    return time.perf_counter() - t0, p.stdout + p.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, nargs="+", default=[10000, 2500])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--subjects-per-shard", type=int, default=64)
    args = ap.parse_args()
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for n in args.subjects:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            cfg = dict(base)
            cfg["demo"] = dict(base["demo"], out_dir=str(tmp / "demo"), n_subjects=n, size=args.size,
                               n_slices=args.slices, dicom_fraction=0.02)
            cfg["cohort"] = dict(base["cohort"], manifest=str(tmp / "demo" / "manifest.csv"))
            cfg["preprocess"] = dict(base["preprocess"], canvas=[args.size, args.size], subjects_per_shard=args.subjects_per_shard)
            cfg["models"] = {"pca": dict(base["models"]["pca"], crop=args.size, n_components=16)}
            (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
            t_run, _ = sm(tmp)
            t_dry, out = sm(tmp, "-n")
            assert "Nothing to be done" in out, out[-2000:]
            # a forced full dry run: how many jobs the DAG of this cohort has
            _, out = sm(tmp, "-n", "--forcerun", "preprocess_shard")  # every job after the cohort checkpoint
            jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", out.split("Job stats:")[1].split("total")[0], re.M)}
            import polars as pl

            images = pl.read_parquet(tmp / "results" / "cohort" / "images.parquet")
            shards = images["shard"].n_unique()
            total = sum(jobs.values())
            print(f"{n} subjects, {images.height} images, {shards} shards: full run {t_run:.0f} s; "
                  f"`snakemake -n` on the complete run {t_dry:.2f} s (target <= 10 s: {'PASS' if t_dry <= 10 else 'FAIL'}); "
                  f"jobs {total} = {jobs.get('preprocess_shard', 0)} preprocess_shard + {total - jobs.get('preprocess_shard', 0)} others")


if __name__ == "__main__":
    main()

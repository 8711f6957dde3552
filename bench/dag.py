"""DAG size and `snakemake -n` time at scale.

    python bench/dag.py                                     # demo cohorts [--subjects 10000 2500 --size 32 --slices 12]
    python bench/dag.py --chexpert [--baseline DIR] [--repeat 3] [--profile FILE.prof]

Demo mode: generate the demo cohort (small in-plane size), run the whole workflow once, then time
`snakemake -n` (nothing to do) and count the jobs a fresh run plans. Target: the dry run of the complete
10,000-subject cohort <= 10 s, and a job count that follows the shard count, not the image count.

CheXpert mode (issue 11.7): a CheXpert-format train.csv of the real release's size (223,414 images of 64,540
patients), converted by `chexpert_to_manifest`, with one EMPTY file per image at the path the CSV names: the
cohort stage only checks that each file exists and a dry run only stats them, so no image content is needed
(about 0.3 M inodes and ~1 GB of directory blocks, a minute to lay out). The cohort checkpoint runs once
(config/chexpert.yaml, manifest and image_root overridden), then `snakemake -n` of the whole DAG (every
job after the cohort stage, with --cores 2) is timed --repeat times. Target: <= 15 s. With --baseline DIR
(another checkout of the project, e.g. `git archive HEAD | tar -x -C DIR` before a change) the same cohort is
also planned by that checkout's Snakefile and library in its own work directory, the two dry runs
alternating, so both see the same load; the ratio is printed. --profile writes a cProfile of one dry run
of this checkout.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def sm(workdir: Path, *args: str, repo: Path = REPO, config: Path | None = None,
       prefix: tuple[str, ...] = ()) -> tuple[float, str]:
    # targets and flags before --configfile: after it, snakemake reads a target as one more config file
    cmd = [*prefix, SNAKEMAKE, "--snakefile", str(repo / "Snakefile"), "--directory", str(workdir), "--cores", "2",
           *args, "--configfile", str(config or workdir / "config.yaml")]
    env = dict(os.environ, PYTHONPATH=str(repo / "src"))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(p.stdout[-3000:] + p.stderr[-3000:])
    return time.perf_counter() - t0, p.stdout + p.stderr


def job_stats(out: str) -> dict[str, int]:
    block = out.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", block, re.M)}


# ------------------------------------------------------------------------------------------------ demo


def demo(args) -> None:
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
            jobs = job_stats(out)
            images = pl.read_parquet(tmp / "results" / "cohort" / "images.parquet")
            shards = images["shard"].n_unique()
            total = sum(jobs.values())
            print(f"{n} subjects, {images.height} images, {shards} shards: full run {t_run:.0f} s; "
                  f"`snakemake -n` on the complete run {t_dry:.2f} s (target <= 10 s: {'PASS' if t_dry <= 10 else 'FAIL'}); "
                  f"jobs {total} = {jobs.get('preprocess_shard', 0)} preprocess_shard + {total - jobs.get('preprocess_shard', 0)} others")


# ------------------------------------------------------------------------------------------------ CheXpert

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,"
    "Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,"
    "Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices"
)


def chexpert_release(root: Path, n_images: int, n_patients: int, seed: int = 0) -> Path:
    """CheXpert-v1.0-small/train.csv with n_images rows of n_patients patients (every patient at least one image,
    studies of one frontal view and, 15 % of them, a lateral one) and an empty file at each row's path."""
    rng = np.random.default_rng(seed)
    per_patient = 1 + np.bincount(rng.integers(0, n_patients, n_images - n_patients), minlength=n_patients)
    paths, views = [], []
    for p, n in enumerate(per_patient, start=1):
        study, left = 0, int(n)
        while left:
            study += 1
            two = left >= 2 and rng.random() < 0.15
            stem = f"CheXpert-v1.0-small/train/patient{p:05d}/study{study}"
            os.makedirs(root / stem, exist_ok=True)
            paths.append(f"{stem}/view1_frontal.jpg")
            views.append("Frontal")
            if two:
                paths.append(f"{stem}/view2_lateral.jpg")
                views.append("Lateral")
            left -= 2 if two else 1
    for rel in paths:
        os.close(os.open(root / rel, os.O_CREAT | os.O_WRONLY, 0o644))
    n = len(paths)
    patient = np.array([int(s.split("/")[2][7:]) for s in paths]) - 1
    sex = rng.choice(["Female", "Male", "Unknown"], n_patients, p=[0.405, 0.594, 0.001])[patient]
    frontal = np.array(views) == "Frontal"
    cols = {
        "Path": paths,
        "Sex": sex,
        "Age": rng.integers(18, 91, n).astype(str),
        "Frontal/Lateral": views,
        "AP/PA": np.where(frontal, np.where(rng.random(n) < 0.8, "AP", "PA"), ""),
    }
    for finding in CHEXPERT_HEADER.split(",")[5:]:
        cols[finding] = np.array(["", "1.0", "0.0", "-1.0"])[rng.choice(4, n, p=[0.6, 0.2, 0.12, 0.08])]
    csv = root / "CheXpert-v1.0-small" / "train.csv"
    pl.DataFrame({k: list(v) for k, v in cols.items()}).write_csv(csv)
    assert csv.open().readline().strip() == CHEXPERT_HEADER
    return csv


def planned_workdir(tmp: Path, name: str, cfg: dict, repo: Path) -> tuple[Path, float]:
    """A work directory whose cohort checkpoint has run (repo's Snakefile and library): seconds of that run."""
    work = tmp / name
    if (work / "results" / "cohort" / "images.parquet").exists():  # kept from an earlier run (--keep)
        return work, 0.0
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    t, _ = sm(work, "--until", "cohort", repo=repo)
    return work, t


def chexpert(args) -> None:
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        chexpert_bench(Path(args.keep), args)
    else:
        with tempfile.TemporaryDirectory(prefix="dagbench-") as tmp:
            chexpert_bench(Path(tmp), args)


def chexpert_bench(tmp: Path, args) -> None:
    from cohortlens.io.chexpert import chexpert_to_manifest

    t0 = time.perf_counter()
    csv = tmp / "CheXpert" / "CheXpert-v1.0-small" / "train.csv"
    if not (tmp / "manifest.parquet").exists():
        csv = chexpert_release(tmp / "CheXpert", args.images, args.patients)
        chexpert_to_manifest(csv, tmp / "manifest.parquet")
    t_setup = time.perf_counter() - t0
    rows_in = sum(1 for _ in csv.open()) - 1
    cfg = yaml.safe_load((REPO / "config" / "chexpert.yaml").read_text())
    cfg["cohort"].update(manifest=str(tmp / "manifest.parquet"), image_root=str(tmp / "CheXpert"))
    sides = {"this checkout": REPO}
    if args.baseline:
        sides = {"baseline": Path(args.baseline).resolve(), **sides}
    works = {}
    for name, repo in sides.items():
        works[name], t_cohort = planned_workdir(tmp, name.replace(" ", "-"), cfg, repo)
        print(f"{name}: cohort checkpoint {t_cohort:.1f} s", flush=True)
    images = pl.read_parquet(works["this checkout"] / "results" / "cohort" / "images.parquet")
    print(f"{rows_in} rows in train.csv, {images.height} images of "
          f"{images['subject_id'].n_unique()} patients, {images['shard'].n_unique()} shards; "
          f"release + manifest laid out in {t_setup:.0f} s", flush=True)
    best = {name: float("inf") for name in sides}
    jobs = {}
    for rep in range(args.repeat):
        for name, repo in sides.items():
            t, out = sm(works[name], "-n", repo=repo)
            jobs[name] = job_stats(out)
            assert "cohort" not in jobs[name] and jobs[name].get("preprocess_shard"), (name, jobs[name])
            best[name] = min(best[name], t)
            print(f"  rep {rep + 1} {name}: `snakemake -n` {t:.2f} s, {sum(jobs[name].values())} jobs", flush=True)
    for name in sides:
        total, shards = sum(jobs[name].values()), jobs[name].get("preprocess_shard", 0)
        print(f"{name}: `snakemake -n` best of {args.repeat} {best[name]:.2f} s "
              f"(target <= 15 s: {'PASS' if best[name] <= 15 else 'FAIL'}); jobs {total} = {shards} preprocess_shard + "
              f"{total - shards} others")
    if args.baseline:
        assert jobs["baseline"] == jobs["this checkout"], jobs
        print(f"baseline / this checkout: {best['baseline'] / best['this checkout']:.2f}x (same jobs planned)")
    if args.profile:
        sm(works["this checkout"], "-n", prefix=(sys.executable, "-m", "cProfile", "-o", args.profile))
        print(f"profile of one dry run: {args.profile}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chexpert", action="store_true", help="CheXpert-sized cohort (issue 11.7) instead of the demo")
    ap.add_argument("--subjects", type=int, nargs="+", default=[10000, 2500])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--subjects-per-shard", type=int, default=64)
    ap.add_argument("--images", type=int, default=223414)
    ap.add_argument("--patients", type=int, default=64540)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", help="another checkout of the project, planned alongside (--chexpert)")
    ap.add_argument("--profile", help="write a cProfile of one dry run of this checkout here (--chexpert)")
    ap.add_argument("--keep", help="lay the CheXpert cohort out in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    chexpert(args) if args.chexpert else demo(args)


if __name__ == "__main__":
    main()

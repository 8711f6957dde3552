"""Peak memory of the project and probe stages on a large cohort (target ≤ 4 GiB at 300k × 512).

Writes a synthetic cohort in the pipeline's own file contracts (volumes.parquet with a fixed_size_list
embedding column, subjects.parquet with the attribute declarations in its metadata, splits.parquet), then
runs each stage function the way the Snakemake scripts do — write_projection (t-SNE, UMAP) and write_probes
(5 attributes) — each in a fresh subprocess, and reports the child's peak RSS from the kernel's rusage
(os.wait4 → ru_maxrss), together with the size of the embedding matrix itself for reference.

t-SNE and UMAP of 300k points take a long time on 2 cores; scale down with --n (memory grows about
linearly in n, so the printed GiB per 100k rows extrapolates) or pick stages with --stages.

    .venv/bin/python bench/analysis_memory.py [--n 300000] [--dim 512] [--stages tsne,umap,probe] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cohortlens.embed.parquet import VOLUME_KEYS, EmbeddingWriter
from cohortlens.io.tables import write_parquet

ATTRIBUTES = {
    "sex": {"type": "categorical", "role": "protected", "categories": ["F", "M"], "level": "subject"},
    "site": {"type": "categorical", "role": "acquisition", "categories": ["A", "B", "C", "D"], "level": "subject"},
    "age": {"type": "continuous", "role": "protected", "min": 18, "max": 100, "level": "subject"},
    "weight": {"type": "continuous", "role": "protected", "min": 30, "max": 250, "level": "subject"},
    "height": {"type": "continuous", "role": "protected", "min": 1.2, "max": 2.2, "level": "subject"},
}


def write_cohort(root: Path, n: int, dim: int, seed: int = 0, chunk: int = 25_000) -> None:
    """One region ('neck') of n subjects; latent factors drive both embedding and attributes."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((24, dim)).astype(np.float32) / np.sqrt(24)
    subjects = []
    meta = {"model": "synthetic", "dim": dim, "level": "volume"}
    with EmbeddingWriter(root / "volumes.parquet", VOLUME_KEYS, dim, meta) as writer:
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            u = rng.standard_normal((m, 8))
            X = np.hstack([u, np.sin(2 * u), u**2 - 1]).astype(np.float32) @ W
            X += rng.standard_normal((m, dim), dtype=np.float32)
            ids = [f"S{i:07d}" for i in range(lo, lo + m)]
            writer.write(pl.DataFrame({"image_uid": [f"{s}/neck" for s in ids], "subject_id": ids, "region": ["neck"] * m}), X)
            subjects.append(pl.DataFrame({
                "subject_id": ids,
                "sex": np.where(u[:, 0] + 0.6 * np.sin(2 * u[:, 1]) + 0.3 * rng.standard_normal(m) > 0, "M", "F"),
                "site": np.array(list("ABCD"))[np.argmax(u[:, 2:6] + 0.5 * rng.standard_normal((m, 4)), axis=1)],
                "age": 45 + 12 * np.tanh(u[:, 6]) + 3 * rng.standard_normal(m),
                "weight": 78 + 9 * u[:, 0] + 5 * rng.standard_normal(m),
                "height": 1.72 + 0.06 * u[:, 0] + 0.03 * rng.standard_normal(m),
            }))
    subjects = pl.concat(subjects)
    write_parquet(subjects, root / "subjects.parquet", metadata={"attributes": ATTRIBUTES})
    split = rng.choice(["train", "val", "test"], n, p=[0.80, 0.05, 0.15])
    write_parquet(subjects.select("subject_id").with_columns(pl.Series("split", split)), root / "splits.parquet")


def child(stage: str, root: Path) -> None:
    from cohortlens.analysis.probe import write_probes
    from cohortlens.analysis.project import write_projection

    t = time.perf_counter()
    if stage == "baseline":  # interpreter + the libraries the stages import, no data
        import openTSNE  # noqa: F401
    elif stage in ("tsne", "umap"):
        write_projection(root / "volumes.parquet", root / f"{stage}.parquet", region="neck", method=stage)
    elif stage == "probe":
        write_probes(root / "volumes.parquet", root / "subjects.parquet", root / "splits.parquet",
                     root / "metrics.parquet", root / "predictions.parquet", regions=["neck"])
    else:
        raise SystemExit(f"unknown stage {stage}")
    print(f"{time.perf_counter() - t:.1f}")


def run_stage(stage: str, root: Path) -> tuple[float, float]:
    """(peak RSS GiB, seconds) of one stage in a fresh interpreter."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", stage, "--workdir", str(root)],
                            stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read().strip().splitlines()
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stage {stage} failed (exit {os.waitstatus_to_exitcode(status)})")
    return usage.ru_maxrss / 2**20, float(out[-1])  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--stages", default="tsne,umap,probe")
    ap.add_argument("--keep", type=Path, help="write the cohort here and keep it (default: a temp dir)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.workdir)

    root = args.keep or Path(tempfile.mkdtemp(prefix="cohortlens-mem-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not (root / "volumes.parquet").exists():
            t = time.perf_counter()
            write_cohort(root, args.n, args.dim)
            print(f"synthetic cohort {args.n} × {args.dim} written in {time.perf_counter() - t:.0f} s ({root})")
        matrix_gib = args.n * args.dim * 4 / 2**30
        print(f"embedding matrix alone: {matrix_gib:.2f} GiB (float32)\n")
        base, _ = run_stage("baseline", root)
        print(f"baseline (interpreter + libraries, no data): {base:.2f} GiB\n")
        print(f"{'stage':<8} {'peak RSS GiB':>12} {'data GiB/100k':>14} {'seconds':>9}  target ≤ 4 GiB at 300k")
        for stage in args.stages.split(","):
            gib, sec = run_stage(stage, root)
            # what grows with n is the peak above the fixed baseline
            at_300k = base + (gib - base) * 300_000 / args.n
            print(f"{stage:<8} {gib:>12.2f} {(gib - base) * 100_000 / args.n:>14.2f} {sec:>9.1f}  "
                  f"{'measured' if args.n >= 300_000 else f'~{at_300k:.1f} GiB extrapolated linearly'}: "
                  f"{'met' if at_300k <= 4 else 'NOT met'}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Probe stage at cohort scale: 5 attributes on 20k × 6144 synthetic embeddings, on the CPU.

The embeddings carry planted signal, linear and nonlinear, for two categorical attributes (binary "sex",
4-class "site") and three continuous ones ("age", "weight", "height"). Prints
  1. the wall time of the stage's probe (backend auto → approx above exact_max_train rows), target ≤ 60 s;
  2. the approx backend against exact scikit-learn SVC/SVR trained on the same subsample of the train
     split (default 4000 rows) and scored on the same test rows: target within 1 point of balanced accuracy.
Timings on a shared machine are noisy; compare the numbers of one run.

    .venv/bin/python bench/probe.py [--n 20000] [--dim 6144] [--subsample 4000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cohortlens.analysis.probe import probe_table
from cohortlens.analysis.table import AnalysisTable, AttributeSpec

SPECS = {
    "sex": AttributeSpec("sex", "categorical", "protected", categories=("F", "M")),
    "site": AttributeSpec("site", "categorical", "acquisition", categories=("A", "B", "C", "D")),
    "age": AttributeSpec("age", "continuous", "protected"),
    "weight": AttributeSpec("weight", "continuous", "protected"),
    "height": AttributeSpec("height", "continuous", "protected"),
}


def synthetic_table(n: int, dim: int, seed: int = 0) -> AnalysisTable:
    """Latent factors u → embedding [u, sin(2u), u²] @ W + noise; attributes are (non)linear functions of u."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, 8))
    basis = np.hstack([u, np.sin(2 * u), u**2 - 1]).astype(np.float32)
    W = rng.standard_normal((basis.shape[1], dim)).astype(np.float32) / np.sqrt(basis.shape[1])
    X = basis @ W
    X += 1.0 * rng.standard_normal((n, dim), dtype=np.float32)
    sex = np.where(u[:, 0] + 0.6 * np.sin(2 * u[:, 1]) + 0.3 * rng.standard_normal(n) > 0, "M", "F")
    site = np.array(list("ABCD"))[np.argmax(u[:, 2:6] + 0.4 * u[:, 2:6] ** 2 + 0.5 * rng.standard_normal((n, 4)), axis=1)]
    age = 45 + 12 * np.tanh(u[:, 6]) + 4 * u[:, 7] ** 2 + 3 * rng.standard_normal(n)
    weight = 78 + 9 * u[:, 0] + 6 * np.sin(2 * u[:, 7]) + 5 * rng.standard_normal(n)
    height = 1.72 + 0.06 * u[:, 0] + 0.04 * np.abs(u[:, 1]) + 0.03 * rng.standard_normal(n)
    split = rng.choice(["train", "val", "test"], n, p=[0.80, 0.05, 0.15])
    frame = pl.DataFrame({
        "image_uid": [f"S{i:06d}/neck" for i in range(n)], "subject_id": [f"S{i:06d}" for i in range(n)],
        "region": ["neck"] * n, "sex": sex, "site": site, "age": age, "weight": weight, "height": height,
        "split": split,
    })
    return AnalysisTable(frame=frame, X=X, specs=SPECS, model="synthetic")


def subsample(table: AnalysisTable, n_train: int, seed: int = 1) -> AnalysisTable:
    """The same val/test rows with n_train of the train rows."""
    rng = np.random.default_rng(seed)
    split = table.frame["split"].to_numpy()
    train = np.flatnonzero(split == "train")
    keep = np.sort(np.concatenate([rng.choice(train, min(n_train, len(train)), replace=False),
                                   np.flatnonzero(split != "train")]))
    return AnalysisTable(frame=table.frame[keep], X=table.X[keep], specs=table.specs, model=table.model)


def headline(metrics: pl.DataFrame) -> dict[str, float]:
    pick = metrics.filter(pl.col("metric").is_in(["balanced_accuracy", "mae"]))
    return dict(zip(pick["attribute"], pick["value"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=6144)
    ap.add_argument("--subsample", type=int, default=4000, help="train rows for the exact-vs-approx comparison")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    print(f"cores available: {len(os.sched_getaffinity(0))}; n={args.n} dim={args.dim}")

    t = time.perf_counter()
    table = synthetic_table(args.n, args.dim)
    print(f"synthetic embeddings: {time.perf_counter() - t:.1f} s")
    attributes = list(SPECS)

    t = time.perf_counter()
    full, _, params = probe_table(table, attributes, {"n_bootstrap": args.bootstrap})
    stage_s = time.perf_counter() - t
    backend = next(iter(params.values()))["backend"]
    print(f"\nstage probe, {len(attributes)} attributes, {args.n} × {args.dim}, backend={backend}: "
          f"{stage_s:.1f} s (target ≤ 60 s: {'met' if stage_s <= 60 else 'NOT met'})")

    small = subsample(table, args.subsample)
    del table
    t = time.perf_counter()
    exact, _, _ = probe_table(small, attributes, {"backend": "exact", "n_bootstrap": 0})
    exact_s = time.perf_counter() - t
    t = time.perf_counter()
    approx, _, _ = probe_table(small, attributes, {"backend": "approx", "n_bootstrap": 0})
    approx_s = time.perf_counter() - t
    print(f"\non a {args.subsample}-row train subsample (same val/test rows): exact SVC/SVR {exact_s:.1f} s, "
          f"approx {approx_s:.1f} s (ratio exact/approx {exact_s / approx_s:.1f}×)")
    e, a, f = headline(exact), headline(approx), headline(full)
    print(f"{'attribute':<8} {'metric':<18} {'exact(sub)':>10} {'approx(sub)':>11} {'diff':>8} {'approx(full)':>12}")
    worst = 0.0
    for attr in attributes:
        kind = "balanced_accuracy" if SPECS[attr].is_categorical else "mae"
        diff = a[attr] - e[attr]
        if SPECS[attr].is_categorical:
            worst = max(worst, -diff)
            print(f"{attr:<8} {kind:<18} {e[attr]:>10.4f} {a[attr]:>11.4f} {100 * diff:>+7.2f}p {f[attr]:>12.4f}")
        else:
            print(f"{attr:<8} {kind:<18} {e[attr]:>10.4f} {a[attr]:>11.4f} {100 * diff / e[attr]:>+7.1f}% {f[attr]:>12.4f}")
    print(f"\nlargest balanced-accuracy shortfall of approx vs exact: {100 * worst:.2f} points "
          f"(target ≤ 1: {'met' if worst <= 0.01 else 'NOT met'})")


if __name__ == "__main__":
    main()

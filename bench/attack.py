"""The MLP attacker on an embedding wider than its training rows: fitted on the rows' span vs on the raw features.

A VAE's demo embedding is 12 × 128 = 1536 features on ~240 training subjects per region; the attacker's L-BFGS then
carries a 1536 × 64 first layer, although the rows span at most 240 directions. `attack._estimator` projects such
inputs onto the training rows' span (PCA keeping 99.999 % of their variance) before the MLP. This script fits the
same CV-tuned MLP attacker both ways on a synthetic cohort (sex and age among 16 latent factors spread over a wide,
noisy embedding), in one run, and prints the time ratio and both test scores (they should agree within noise: the
same attacker, fewer weights).

    .venv/bin/python bench/attack.py [--n 300] [--dim 1536] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cohortlens.analysis import attack
from cohortlens.runtime import limit_threads


def cohort(n: int, dim: int, seed: int = 0):
    """Embeddings as autoencoders make them: a few latent factors (sex, age, nuisance) spread over many correlated
    features, plus noise."""
    rng = np.random.default_rng(seed)
    sex = rng.integers(0, 2, n)
    age = rng.uniform(20, 80, n)
    factors = rng.normal(size=(n, 16))
    factors[:, 0] += np.where(sex == 1, 1.0, -1.0)
    factors[:, 1] += (age - 50) / 15
    X = factors @ rng.normal(size=(16, dim)) + 0.5 * rng.normal(size=(n, dim))
    return X, sex, age


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    X, sex, age = cohort(args.n, args.dim)
    train = np.zeros(args.n, bool)
    train[: int(args.n * 0.8)] = True
    test = ~train
    rows = int(train.sum())
    for name, y, kind, metric in (("sex", sex, "classification", "balanced_accuracy"), ("age", age, "regression", "mae")):
        # the stage's estimator for these rows (span projection) and the same estimator told it has as many rows
        # as features (no projection: the raw features, as before the projection existed)
        def fit(n_train_told: int, kind=kind, y=y):
            est = attack._estimator(kind, "mlp", X.shape[1], n_train_told, seed=0)
            with limit_threads(1), warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                return est.fit(X[train], y[train]).predict(X[test])

        t_span, p_span = timed(lambda: fit(rows), args.repeats)
        t_raw, p_raw = timed(lambda: fit(X.shape[1]), args.repeats)
        s_span = attack.metric_values(kind, y[test], p_span)[metric]
        s_raw = attack.metric_values(kind, y[test], p_raw)[metric]
        print(f"{name}: raw features {t_raw:.2f} s, span {t_span:.2f} s, speed-up {t_raw / t_span:.1f}x; "
              f"test {metric}: raw {s_raw:.3f}, span {s_span:.3f}  (n={args.n}, dim={args.dim}, best of "
              f"{args.repeats})")

if __name__ == "__main__":
    main()

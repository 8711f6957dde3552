"""t-SNE on the CPU: scikit-learn TSNE, bare openTSNE and the project stage's `tsne()` in one run.

Synthetic 512-dim embeddings (a Gaussian mixture of 30 clusters of unequal size and spread), perplexity 50,
the same number of gradient iterations for everyone (250 early exaggeration + 500). Prints wall times, the
ratios (targets: stage ≥ 3× faster than scikit-learn, ≤ 1.1× bare openTSNE) and, so that speed is not
bought with a worse map, the cross-validated 5-NN accuracy of the cluster labels in each 2-D map.

The default is the brief's size, 50k × 512: about 15 minutes on 2 cores, ten of them scikit-learn's
Barnes-Hut t-SNE. At 10k the comparison says little: scikit-learn's O(n log n) cost has not yet pulled away from
openTSNE's FFT gradient (10k, 2 cores: scikit-learn only 1.6× bare openTSNE). --skip-sklearn times only the
openTSNE paths.

    .venv/bin/python bench/tsne.py [--n 50000] [--dim 512] [--perplexity 50] [--skip-sklearn] [--also-raw]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cohortlens.analysis.project import tsne


def mixture(n: int, dim: int, k: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(k, 2.0))
    labels = rng.choice(k, n, p=sizes)
    # clusters differ along a low-dimensional subspace, as autoencoder embeddings do; they overlap enough
    # that the 5-NN accuracy of a map tells a good embedding from a poor one
    centres = rng.normal(0, 1, (k, 16)) @ rng.normal(0, 1, (16, dim)) / 6
    spread = rng.uniform(0.5, 1.5, k)
    X = centres[labels] + rng.standard_normal((n, dim)) * spread[labels, None]
    return X.astype(np.float32), labels


def knn_accuracy(xy: np.ndarray, labels: np.ndarray, n_max: int = 10_000) -> float:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    idx = np.random.default_rng(0).choice(len(xy), min(n_max, len(xy)), replace=False)
    return float(cross_val_score(KNeighborsClassifier(5), xy[idx], labels[idx], cv=5).mean())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--perplexity", type=float, default=50.0)
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--also-raw", action="store_true", help="also time the stage without its PCA-50 step")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    X, labels = mixture(args.n, args.dim)
    print(f"n={args.n} dim={args.dim} perplexity={args.perplexity} cores={cores}")

    from openTSNE import TSNE as OpenTSNE

    results = {}
    results["stage tsne()"] = timed(lambda: tsne(X, perplexity=args.perplexity, seed=0, backend="cpu"))
    results["bare openTSNE"] = timed(lambda: OpenTSNE(perplexity=args.perplexity, n_jobs=cores, random_state=0).fit(X))
    if args.also_raw:
        results["stage tsne(pca_dims=None)"] = timed(
            lambda: tsne(X, perplexity=args.perplexity, seed=0, backend="cpu", pca_dims=None))
    if not args.skip_sklearn:
        from sklearn.manifold import TSNE as SkTSNE

        results["scikit-learn TSNE"] = timed(lambda: SkTSNE(perplexity=args.perplexity, max_iter=750, init="pca",
                                                            random_state=0, n_jobs=cores).fit_transform(X))

    print(f"\n{'method':<28} {'seconds':>9} {'5-NN acc':>9}")
    for name, (sec, xy) in results.items():
        print(f"{name:<28} {sec:>9.1f} {knn_accuracy(xy, labels):>9.3f}")
    stage = results["stage tsne()"][0]
    bare = results["bare openTSNE"][0]
    print(f"\nstage / bare openTSNE: {stage / bare:.2f}× (target ≤ 1.1: {'met' if stage <= 1.1 * bare else 'NOT met'})")
    if "scikit-learn TSNE" in results:
        sk = results["scikit-learn TSNE"][0]
        print(f"scikit-learn / stage: {sk / stage:.1f}× faster (target ≥ 3: {'met' if sk >= 3 * stage else 'NOT met'})")


if __name__ == "__main__":
    main()

"""The kernel machines behind the probe (paper 003's RBF-kernel probes) and how one is chosen.

A `FeatureSpace` holds one region's standardised features, shared by all of its attributes; a `Task` is one
attribute's balanced training problem on it; `grid_decisions` fits the task at every (C, γ) of a grid and
returns decision values. Three backends, chosen by `resolve_backend` (`backend="auto"`):
- `cuml`: cuML SVC/SVR when cuML and a CUDA device are present (thin, untested without a GPU);
- `exact`: scikit-learn SVC/SVR on a precomputed RBF kernel, up to `exact_max_train` training rows (kernel SVMs
  are O(n²) and worse);
- `approx`: above that, PCA (fitted on ≤ `pca_fit_rows` train rows) → Nyström RBF features → a weighted
  ridge (least-squares SVM) whose solution for every C comes from one Cholesky factorisation per C of a single
  Gram matrix per γ, so the whole C×γ grid costs about as much as a single fit. `bench/probe.py` compares it
  with exact SVC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import scipy.linalg

from cohortlens.analysis.probe_settings import ProbeSettings
from cohortlens.analysis.table import AnalysisTable


def resolve_backend(backend: str, n_train: int, settings: ProbeSettings) -> str:
    """`auto`: cuML on a GPU, else exact up to `exact_max_train` training rows, else approx."""
    if backend == "auto":
        from cohortlens.runtime import cuml_available  # imports torch: only when a backend is chosen

        if cuml_available():
            return "cuml"
        return "exact" if n_train <= settings.exact_max_train else "approx"
    if backend not in ("cuml", "exact", "approx"):
        raise ValueError(f"probe backend must be auto, cuml, exact or approx, not {backend!r}")
    return backend


# The exact backend caches squared distances among all split rows up to this many rows (20k² float32 = 1.6 GB).
SQDIST_MAX_ROWS = 20_000


class FeatureSpace:
    """Standardised features of one region's embeddings (train statistics), shared by all its attributes.

    exact/cuml: the standardised embedding; approx: its leading principal components, and Nyström RBF
    features per γ (cached within a memory budget: at 300k rows one feature matrix is already ~1 GB).
    """

    def __init__(self, X: np.ndarray, train_rows: np.ndarray, backend: str, settings: ProbeSettings,
                 in_split: np.ndarray | None = None):
        self.backend = backend
        self._sqdist: np.ndarray | None = None
        # rows that can be fitted or scored (train/val/test): the exact backend's distance matrix covers these
        self._in_split = np.ones(X.shape[0], dtype=bool) if in_split is None else in_split
        self.settings = settings
        rng = np.random.default_rng(settings.seed)
        fit_rows = train_rows
        if len(fit_rows) > settings.pca_fit_rows and backend == "approx":
            fit_rows = np.sort(rng.choice(train_rows, settings.pca_fit_rows, replace=False))
        mean = X[fit_rows].mean(0, dtype=np.float64)
        std = X[fit_rows].std(0, dtype=np.float64)
        std[std < 1e-12] = 1.0
        self.mean, self.scale = mean.astype(np.float32), (1.0 / std).astype(np.float32)
        if backend == "approx" and X.shape[1] > settings.pca_dims:
            from sklearn.decomposition import PCA

            # iterated_power=3: the leading subspace is what the kernel sees; more power iterations cost time
            pca = PCA(min(settings.pca_dims, len(fit_rows)), svd_solver="randomized", iterated_power=3,
                      random_state=settings.seed).fit(self._standardise(X[fit_rows]))
            self.F = np.empty((X.shape[0], pca.n_components_), dtype=np.float32)
            for lo in range(0, X.shape[0], 16_384):  # chunks: never a full standardised copy of X
                self.F[lo : lo + 16_384] = pca.transform(self._standardise(X[lo : lo + 16_384]))
        else:
            self.F = self._standardise(X)
        self.gamma_scale = 1.0 / (self.F.shape[1] * float(self.F[fit_rows].var()) or 1.0)
        self._cache: dict[float, np.ndarray] = {}
        self._train_rows = train_rows

    def rbf_kernel(self, rows_a: np.ndarray, rows_b: np.ndarray, gamma: float) -> np.ndarray:
        """exp(-γ·‖a-b‖²) between table rows (exact backend). Squared distances among all split rows are
        computed once (one GEMM) and shared by every γ, C and attribute; a kernel is then a gather and an exp."""
        if self._sqdist is None and self._in_split.sum() > SQDIST_MAX_ROWS:
            # exact SVMs forced onto a large table: no n² cache, kernels computed per call
            from sklearn.metrics.pairwise import rbf_kernel

            return rbf_kernel(self.F[rows_a], self.F[rows_b], gamma=gamma).astype(np.float64, copy=False)
        if self._sqdist is None:
            keep = np.flatnonzero(self._in_split)
            G = self.F[keep] @ self.F[keep].T
            norms = np.einsum("ij,ij->i", self.F[keep], self.F[keep], dtype=np.float64).astype(np.float32)
            G *= -2
            G += norms[:, None]
            G += norms[None, :]
            np.maximum(G, 0, out=G)
            self._sqdist = G
            self._pos = np.full(self.F.shape[0], -1, dtype=np.int64)
            self._pos[keep] = np.arange(len(keep))
        a, b = self._pos[rows_a], self._pos[rows_b]
        if (a < 0).any() or (b < 0).any():
            raise ValueError("rbf_kernel rows must belong to a split")
        K = self._sqdist[np.ix_(a, b)].astype(np.float64)
        K *= -gamma
        return np.exp(K, out=K)

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        # one float32 temporary scaled in place: (X - mean) * scale made a second one and ran ~9× slower
        out = np.subtract(X, self.mean, dtype=np.float32)
        out *= self.scale
        return out

    def kernel_features(self, gamma: float) -> np.ndarray:
        """Nyström RBF features of every row for this γ. Kept for reuse by the next attribute while the
        cache stays under `feature_cache_mb` (one matrix of a 300k cohort exceeds it: only the last is kept)."""
        if gamma in self._cache:
            return self._cache[gamma]
        from sklearn.kernel_approximation import Nystroem

        m = min(self.settings.nystroem_components, len(self._train_rows))
        # Nyström keeps m random landmark rows of what it is fitted on: hand it just those, not all of train
        landmarks = np.random.default_rng(self.settings.seed).choice(self._train_rows, m, replace=False)
        ny = Nystroem(gamma=gamma, n_components=m, random_state=self.settings.seed).fit(self.F[np.sort(landmarks)])
        budget = self.settings.feature_cache_mb * 2**20
        if sum(a.nbytes for a in self._cache.values()) + self.F.shape[0] * m * 4 > budget:
            self._cache.clear()
        Phi = np.empty((self.F.shape[0], m), dtype=np.float32)
        for lo in range(0, self.F.shape[0], 8192):
            Phi[lo : lo + 8192] = ny.transform(self.F[lo : lo + 8192])
        self._cache[gamma] = Phi
        return Phi


def feature_space(table: AnalysisTable, settings: ProbeSettings | Mapping | None = None) -> FeatureSpace:
    """The FeatureSpace of a table, with the backend resolved for its train split size."""
    settings = ProbeSettings.from_config(settings)
    train = np.flatnonzero(table.split_mask("train"))
    in_split = table.split_mask("train") | table.split_mask("val") | table.split_mask("test")
    return FeatureSpace(table.X, train, resolve_backend(settings.backend, len(train), settings), settings, in_split)


@dataclass
class Task:
    """One attribute's training problem on a FeatureSpace."""

    kind: str  # classification | regression
    fit_rows: np.ndarray  # distinct rows of the feature matrix (balance is in the weights, nothing is copied)
    target: np.ndarray  # classification: class codes; regression: standardised target; aligned with fit_rows
    weights: np.ndarray  # aligned with fit_rows
    n_classes: int = 0


def _targets(task: Task) -> np.ndarray:
    if task.kind == "regression":
        return task.target[:, None]
    if task.n_classes == 2:
        return np.where(task.target == 1, 1.0, -1.0)[:, None]
    Y = -np.ones((len(task.target), task.n_classes))
    Y[np.arange(len(task.target)), task.target] = 1.0
    return Y


def _ridge_path(Phi: np.ndarray, task: Task, C_grid: Sequence[float], chunk: int = 8192) -> list[tuple[np.ndarray, np.ndarray]]:
    """Weighted ridge solutions (W, b) for every C from one Gram matrix (a Cholesky solve per C).
    The penalty is trace(G)/(m·C): scale-free, and larger C means less regularisation as for an SVM.
    The Gram matrix is accumulated over row chunks (float32 products summed in float64), so memory stays
    at m² plus one chunk even for 240k training rows."""
    # rows sorted (sequential reads of Phi); a row given twice would have its weights summed
    rows, first, inv = np.unique(task.fit_rows, return_index=True, return_inverse=True)
    w = np.bincount(inv, weights=task.weights)
    w = (w / w.mean()).astype(np.float32)
    Y = _targets(task)[first].astype(np.float32)
    wsum = float(w.sum(dtype=np.float64))
    m = Phi.shape[1]
    mu = np.zeros(m)
    for lo in range(0, len(rows), chunk):
        mu += w[lo : lo + chunk] @ Phi[rows[lo : lo + chunk]]
    mu /= wsum
    ymu = (w @ Y) / wsum
    # centring each chunk before the product keeps float32 accurate (no large mean outer product to cancel)
    mu32, ymu32 = mu.astype(np.float32), ymu.astype(np.float32)
    G = np.zeros((m, m))
    B = np.zeros((m, Y.shape[1]))
    for lo in range(0, len(rows), chunk):
        Fc = Phi[rows[lo : lo + chunk]] - mu32
        Fw = Fc * w[lo : lo + chunk, None]
        G += Fw.T @ Fc
        B += Fw.T @ (Y[lo : lo + chunk] - ymu32)
    base = np.trace(G) / m
    out = []
    for C in C_grid:
        A = G.copy()
        A[np.diag_indices(m)] += base / C
        Wt = scipy.linalg.cho_solve(scipy.linalg.cho_factor(A, overwrite_a=True, check_finite=False), B,
                                    check_finite=False)
        out.append((Wt, ymu - mu @ Wt))
    return out


def _linear_decisions(Phi: np.ndarray, rows: np.ndarray, Wt: np.ndarray, b: np.ndarray, chunk: int = 16_384) -> np.ndarray:
    out = np.empty((len(rows), Wt.shape[1]))
    W32 = Wt.astype(np.float32)
    for lo in range(0, len(rows), chunk):
        out[lo : lo + chunk] = Phi[rows[lo : lo + chunk]] @ W32
    return out + b


def _svm(backend: str, kind: str, C: float, gamma: float, epsilon: float):
    if backend == "cuml":
        from cuml.svm import SVC, SVR

        kernel = dict(kernel="rbf", gamma=gamma)
    else:
        from sklearn.svm import SVC, SVR

        kernel = dict(kernel="precomputed")
    if kind == "classification":
        return SVC(C=C, decision_function_shape="ovr", **kernel)
    return SVR(C=C, epsilon=epsilon, **kernel)


def _to_numpy(a) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a)


def _svm_decisions(space: FeatureSpace, task: Task, gamma: float, Cs: Sequence[float], eval_rows: Sequence[np.ndarray]):
    """Decision values of exact SVMs for each C. On the CPU the RBF kernel of the training rows is computed
    once per γ and passed precomputed: libsvm then looks kernel values up instead of recomputing
    6144-dim distances in every SMO step, and every C reuses it."""
    # sorted distinct rows; a row given twice would have its weights summed (the same SVM objective)
    uniq, first, inv = np.unique(task.fit_rows, return_index=True, return_inverse=True)
    w = np.bincount(inv, weights=task.weights)
    y = task.target[first]
    if space.backend == "cuml":
        fit_in, eval_in = space.F[uniq], [space.F[r] for r in eval_rows]
    else:
        fit_in = space.rbf_kernel(uniq, uniq, gamma)
        eval_in = [space.rbf_kernel(r, uniq, gamma) for r in eval_rows]
    for C in Cs:
        model = _svm(space.backend, task.kind, C, gamma, space.settings.epsilon)
        model.fit(fit_in, y, sample_weight=w)
        out = []
        for r, E in zip(eval_rows, eval_in):
            # scikit-learn refuses 0 rows (an empty val split of a tiny cohort): score one training row, keep none
            if len(r) == 0:
                E = fit_in[:1]
            d = _to_numpy(model.decision_function(E) if task.kind == "classification" else model.predict(E))
            out.append(d.reshape(E.shape[0], -1)[: len(r)].astype(np.float64))
        yield C, out


def grid_decisions(space: FeatureSpace, task: Task, grid: Sequence[tuple[float, float]],
                   eval_rows: Sequence[np.ndarray]) -> Iterator[tuple[float, float, list[np.ndarray]]]:
    """(C, γ multiple, decision values on each eval row set) for every grid point, γ outermost so each
    kernel (exact) or Nyström feature matrix (approx) is built once per γ."""
    gammas = sorted({g for _, g in grid})
    for g in gammas:
        gamma = g * space.gamma_scale
        Cs = [C for C, gg in grid if gg == g]
        if space.backend == "approx":
            Phi = space.kernel_features(gamma)
            for C, (Wt, b) in zip(Cs, _ridge_path(Phi, task, Cs)):
                yield C, g, [_linear_decisions(Phi, r, Wt, b) for r in eval_rows]
            del Phi  # before the next γ's features exist: two of them at once is the stage's memory peak
        else:
            for C, decs in _svm_decisions(space, task, gamma, Cs, eval_rows):
                yield C, g, decs


def predict_codes(D: np.ndarray, n_classes: int) -> np.ndarray:
    """Class codes from decision values: the sign of a binary decision, the largest one-vs-rest decision."""
    if n_classes == 2:
        return (D[:, 0] > 0).astype(np.int64)
    return D.argmax(1)


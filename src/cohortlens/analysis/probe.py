"""The probe stage: how much of each attribute an embedding holds, measured with RBF-kernel probes (paper 003).

Per model × region × attribute: categorical attributes are classified (RBF SVC → balanced accuracy, ROC AUC
one-vs-rest macro), continuous ones and dates regressed (RBF SVR → MAE). Features are standardised on the
train split, C and γ are tuned on the val split, scores are taken on the test split with 95% bootstrap CIs
that resample test *subjects* (a subject's images are not independent). Training is balanced by weights on
every training row (`balance`): class weights for classification, capped inverse-density weights of the target
for regression (without them the regressor learns to predict the mean age). No row is copied.

Three backends, chosen by `backend="auto"`:
- `cuml`: cuML SVC/SVR when cuML and a CUDA device are present (thin, untested without a GPU);
- `exact`: scikit-learn SVC/SVR up to `exact_max_train` training rows (kernel SVMs are O(n²) and worse);
- `approx`: above that, PCA (fitted on ≤ `pca_fit_rows` train rows) → Nyström RBF features → a weighted
  ridge (least-squares SVM) whose solution for every C comes from one eigendecomposition per γ, so the whole
  C×γ grid costs about as much as a single fit. `bench/probe.py` compares it with exact SVC.
The backend that ran is recorded per metric (`backend` column) and named in the model table (`BACKEND_NAMES`):
an approx result is a kernel ridge, not an SVM.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import polars as pl
import scipy.linalg
import scipy.sparse

from cohortlens.analysis._data import AnalysisTable, AttributeSpec, load_analysis_table, present, regions_of
from cohortlens.analysis.balance import (
    DEFAULT_WEIGHT_CAP,
    balanced_sample,
    class_weights,
    density_weights,
    range_bins,
    stratified_subsample,
    weighted_mean_sd,
)
from cohortlens.analysis.model_table import (  # noqa: F401  (Table 1, importable from here as before)
    BACKEND_NAMES,
    TABLE_METRICS,
    model_table,
    model_table_html,
    probe_names,
)
from cohortlens.io.tables import read_parquet_metadata, write_parquet

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
ALL_REGIONS = "all"

METRICS_SCHEMA = {
    "model": pl.Utf8, "region": pl.Utf8, "attribute": pl.Utf8, "kind": pl.Utf8, "metric": pl.Utf8,
    "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "n_train": pl.Int64, "n_test": pl.Int64,
    "chance": pl.Float64, "backend": pl.Utf8,
}
PREDICTIONS_SCHEMA = {
    "model": pl.Utf8, "region": pl.Utf8, "attribute": pl.Utf8, "subject_id": pl.Utf8, "image_uid": pl.Utf8,
    "split": pl.Utf8, "y_true": pl.Utf8, "y_pred": pl.Utf8, "score": pl.Float64,
    "y_true_value": pl.Float64, "y_pred_value": pl.Float64, "class_scores": pl.List(pl.Float64),
}
OOF_SCHEMA = {
    "model": pl.Utf8, "region": pl.Utf8, "attribute": pl.Utf8, "image_uid": pl.Utf8, "subject_id": pl.Utf8,
    "split": pl.Utf8, "fold": pl.Int64, "label": pl.Utf8, "class": pl.Utf8, "proba": pl.Float64,
}


@dataclass(frozen=True)
class ProbeSettings:
    """Probe hyperparameters (config `probe:`); every field has the default used when the key is absent."""

    seed: int = 0
    backend: str = "auto"  # auto | cuml | exact | approx
    n_bootstrap: int = 1000
    n_bins: int = 10  # regression: equal-width bins over the target range, the density of the balancing weights
    weight_cap: float = DEFAULT_WEIGHT_CAP  # regression: largest / smallest balancing weight
    balance_regression: bool = True  # False: every training row weight 1 (the probe drifts to the mean)
    C_grid: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)
    gamma_grid: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)  # multiples of 1/(n_features · var), sklearn's 'scale'
    epsilon: float = 0.1  # SVR tube in standard deviations of the target
    min_val: int = 50  # fewer val rows than this: tune on a held-out fifth of the train subjects instead
    exact_max_train: int = 5000
    pca_dims: int = 256
    pca_fit_rows: int = 4000
    nystroem_components: int = 1024
    feature_cache_mb: int = 512  # Nyström feature matrices kept across attributes (approx backend)

    @classmethod
    def from_config(cls, cfg: Mapping | "ProbeSettings" | None) -> "ProbeSettings":
        if isinstance(cfg, ProbeSettings):
            return cfg
        cfg = dict(cfg or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - names
        if unknown:
            raise ValueError(f"unknown probe setting(s) {sorted(unknown)}; known: {sorted(names)}")
        for key in ("C_grid", "gamma_grid"):
            if key in cfg:
                cfg[key] = tuple(float(v) for v in cfg[key])
        return cls(**cfg)


# ------------------------------------------------------------------------------------------- metrics

def _group_matrix(codes: np.ndarray, n_groups: int) -> scipy.sparse.csr_matrix:
    n = len(codes)
    return scipy.sparse.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, n_groups))


def weighted_auc(scores: np.ndarray, positive: np.ndarray, W: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of weights W (B, n) at once (Mann-Whitney with ties counted half).

    Bootstrap replicates are weight vectors over the same rows, so one sort serves all of them.
    """
    uniq, inv = np.unique(scores, return_inverse=True)
    G = _group_matrix(inv, len(uniq))
    pos_w = (G.T @ (W * positive).T).T  # (B, groups)
    neg_w = (G.T @ (W * ~positive).T).T
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    P, N = pos_w.sum(1), neg_w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos_w * (neg_below + 0.5 * neg_w)).sum(1) / (P * N)


def balanced_accuracy_w(y: np.ndarray, pred: np.ndarray, W: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced accuracy (mean per-class recall over classes present) for each row of weights W."""
    Y = _group_matrix(y, n_classes)
    total = (Y.T @ W.T).T
    hit = (Y.T @ (W * (pred == y)).T).T
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(total > 0, hit / total, np.nan)
    return np.nanmean(recall, axis=1)


def macro_auc_w(y: np.ndarray, scores: np.ndarray, W: np.ndarray, n_classes: int) -> np.ndarray:
    """Binary: AUC of the positive-class score; multi-class: one-vs-rest macro average over classes present."""
    if n_classes == 2:
        return weighted_auc(scores[:, 0] if scores.ndim == 2 else scores, y == 1, W)
    per_class = [weighted_auc(scores[:, k], y == k, W) for k in range(n_classes) if 0 < (y == k).sum() < len(y)]
    return np.nanmean(np.stack(per_class), axis=0) if per_class else np.full(W.shape[0], np.nan)


def bootstrap_weights(subject_codes: np.ndarray, n_boot: int, rng: np.random.Generator, block: int | None = None) -> Iterator[np.ndarray]:
    """Row weights of bootstrap replicates that resample subjects (all of a subject's rows together), in
    blocks of replicates so memory stays at block × n_test (default: ~4M weights, ≤ 200 replicates)."""
    n_subjects = int(subject_codes.max()) + 1 if len(subject_codes) else 0
    if block is None:
        block = int(np.clip(4_000_000 // max(len(subject_codes), 1), 10, 200))
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        counts = rng.multinomial(n_subjects, np.full(n_subjects, 1.0 / n_subjects), size=b).astype(np.float64)
        yield counts[:, subject_codes]


def _with_ci(stat, n_rows: int, subject_codes: np.ndarray, n_boot: int, rng) -> tuple[float, float, float]:
    value = float(stat(np.ones((1, n_rows)))[0])
    if n_boot <= 0 or n_rows == 0:
        return value, np.nan, np.nan
    reps = np.concatenate([stat(W) for W in bootstrap_weights(subject_codes, n_boot, rng)])
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return value, np.nan, np.nan
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return value, float(lo), float(hi)


# ------------------------------------------------------------------------------------------- backends

def resolve_backend(backend: str, n_train: int, settings: ProbeSettings) -> str:
    if backend == "auto":
        from cohortlens.analysis.project import gpu_available

        if gpu_available():
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
class _Task:
    """One attribute's training problem on a FeatureSpace."""

    kind: str  # classification | regression
    fit_rows: np.ndarray  # distinct rows of the feature matrix (balance is in the weights, nothing is copied)
    target: np.ndarray  # classification: class codes; regression: standardised target; aligned with fit_rows
    weights: np.ndarray  # aligned with fit_rows
    n_classes: int = 0


def _targets(task: _Task) -> np.ndarray:
    if task.kind == "regression":
        return task.target[:, None]
    if task.n_classes == 2:
        return np.where(task.target == 1, 1.0, -1.0)[:, None]
    Y = -np.ones((len(task.target), task.n_classes))
    Y[np.arange(len(task.target)), task.target] = 1.0
    return Y


def _ridge_path(Phi: np.ndarray, task: _Task, C_grid: Sequence[float], chunk: int = 8192) -> list[tuple[np.ndarray, np.ndarray]]:
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


def _svm_decisions(space: FeatureSpace, task: _Task, gamma: float, Cs: Sequence[float], eval_rows: Sequence[np.ndarray]):
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


def grid_decisions(space: FeatureSpace, task: _Task, grid: Sequence[tuple[float, float]],
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


def _predict_codes(D: np.ndarray, n_classes: int) -> np.ndarray:
    if n_classes == 2:
        return (D[:, 0] > 0).astype(np.int64)
    return D.argmax(1)


def _tune_score(task: _Task, D: np.ndarray, y: np.ndarray) -> float:
    """Higher is better: balanced accuracy (AUC breaks ties) or negative MAE."""
    one = np.ones((1, len(y)))
    if task.kind == "classification":
        ba = balanced_accuracy_w(y, _predict_codes(D, task.n_classes), one, task.n_classes)[0]
        auc = macro_auc_w(y, D, one, task.n_classes)[0]
        return float(ba + 1e-3 * np.nan_to_num(auc))
    return -float(np.mean(np.abs(D[:, 0] - y)))


# ------------------------------------------------------------------------------------------- one attribute

@dataclass
class ProbeResult:
    metrics: pl.DataFrame
    predictions: pl.DataFrame
    backend: str
    params: dict = field(default_factory=dict)


@dataclass
class _Prepared:
    spec: AttributeSpec
    kind: str
    rows: dict[str, np.ndarray]  # split -> rows with the attribute recorded
    codes: np.ndarray | None  # classification: class code per table row (-1 missing)
    classes: list[str]
    values: np.ndarray  # regression: float target per row (NaN missing)


def _prepare(table: AnalysisTable, attribute: str) -> _Prepared | None:
    spec = table.spec(attribute)
    raw = table.values(attribute)
    ok = present(raw)
    rows = {s: np.flatnonzero(ok & table.split_mask(s)) for s in ("train", "val", "test")}
    if spec.is_categorical:
        train_classes = set(raw[rows["train"]])
        classes = [c for c in (spec.categories or ()) if c in train_classes]
        classes += sorted(train_classes - set(classes))
        if len(classes) < 2:
            log.warning("probe %s: fewer than two classes in the train split; skipped", attribute)
            return None
        lookup = {c: i for i, c in enumerate(classes)}
        codes = np.array([lookup.get(v, -1) if v is not None else -1 for v in raw], dtype=np.int64)
        # a class unseen in training cannot be predicted; its rows are left out of val/test scoring
        rows = {s: r[codes[r] >= 0] for s, r in rows.items()}
        return _Prepared(spec, "classification", rows, codes, classes, np.full(len(raw), np.nan))
    if len(rows["train"]) < 2 or np.ptp(raw[rows["train"]]) == 0:
        log.warning("probe %s: no spread in the train split; skipped", attribute)
        return None
    return _Prepared(spec, "regression", rows, None, [], raw.astype(np.float64))


def _make_task(prep: _Prepared, fit_rows: np.ndarray, settings: ProbeSettings, rng, cap: int | None) -> tuple[_Task, float, float]:
    """Balanced training problem on fit_rows; returns the task and the regression target's (mean, sd)."""
    if prep.kind == "classification":
        codes = prep.codes[fit_rows]
        k = len(prep.classes)
        if cap and len(fit_rows) > cap:
            keep = balanced_sample(codes, max(1, cap // k), rng)
            keep = np.unique(keep)  # undersample the large classes; weights balance what remains
            fit_rows, codes = fit_rows[keep], codes[keep]
        return _Task("classification", fit_rows, codes, class_weights(codes, k), k), 0.0, 1.0
    y = prep.values[fit_rows]
    if cap and len(fit_rows) > cap:
        # exact SVR cannot take every row: a subsample favouring the sparse parts of the range, no row twice
        keep = stratified_subsample(range_bins(y, settings.n_bins), cap, rng)
        fit_rows, y = fit_rows[keep], y[keep]
    w = density_weights(y, settings.n_bins, settings.weight_cap) if settings.balance_regression else np.ones(len(y))
    # standardised under the weights: the SVR tube (epsilon, in sd) refers to the distribution it is fitted to
    mu, sd = weighted_mean_sd(y, w)
    return _Task("regression", fit_rows, (y - mu) / sd, w), mu, sd


def _tuning_split(table: AnalysisTable, prep: _Prepared, settings: ProbeSettings) -> tuple[np.ndarray, np.ndarray, str]:
    """(fit rows, tuning rows, where): the val split, or a held-out fifth of train subjects when val is small."""
    if len(prep.rows["val"]) >= settings.min_val:
        return prep.rows["train"], prep.rows["val"], "val"
    train = prep.rows["train"]
    subjects = table.frame["subject_id"].to_numpy()[train]
    uniq = np.unique(subjects)
    held = np.random.default_rng(settings.seed + 1).choice(uniq, max(1, len(uniq) // 5), replace=False)
    mask = np.isin(subjects, held)
    return train[~mask], train[mask], "train-holdout"


def fit_tuned(table: AnalysisTable, space: FeatureSpace, prep: _Prepared, settings: ProbeSettings,
              eval_rows: Sequence[np.ndarray], fit_rows: np.ndarray | None = None):
    """Tune (C, γ) and return (C, γ multiple, tuned_on, decisions on each eval row set, target mean, sd) of
    the model trained on `fit_rows` (default: the train split)."""
    rng = np.random.default_rng(settings.seed)
    cap = settings.exact_max_train if space.backend == "exact" else None
    grid = [(C, g) for g in settings.gamma_grid for C in settings.C_grid]
    tune_fit, tune_rows, where = _tuning_split(table, prep, settings)
    full_fit = prep.rows["train"] if fit_rows is None else fit_rows
    reuse = where == "val" and fit_rows is None  # the tuning fits already are the final fits
    task, mu, sd = _make_task(prep, tune_fit, settings, rng, cap)
    y_tune = prep.codes[tune_rows] if prep.kind == "classification" else (prep.values[tune_rows] - mu) / sd
    best = None
    for C, g, decs in grid_decisions(space, task, grid, [tune_rows, *(eval_rows if reuse else [])]):
        score = _tune_score(task, decs[0], y_tune)
        if best is None or score > best[0] + 1e-12:
            best = (score, C, g, decs[1:])
    _, C, g, decs = best
    if not reuse:
        task, mu, sd = _make_task(prep, full_fit, settings, np.random.default_rng(settings.seed), cap)
        decs = next(grid_decisions(space, task, [(C, g)], list(eval_rows)))[2]
    return C, g, where, decs, mu, sd


def probe_attribute(
    table: AnalysisTable,
    attribute: str,
    settings: ProbeSettings | Mapping | None = None,
    *,
    space: FeatureSpace | None = None,
    region: str | None = None,
) -> ProbeResult | None:
    """Probe one attribute of an AnalysisTable: metrics with CIs and val/test predictions (None if the
    attribute cannot be probed, e.g. a single class in train)."""
    settings = ProbeSettings.from_config(settings)
    prep = _prepare(table, attribute)
    if prep is None:
        return None
    if space is None:
        space = feature_space(table, settings)
    region = region or _region_label(table)
    test, val = prep.rows["test"], prep.rows["val"]
    if len(test) == 0:
        log.warning("probe %s/%s: no test images with a value in region %s; not scored", table.model, attribute,
                    region or _region_label(table))
        return None
    C, g, where, (D_test, D_val), mu, sd = fit_tuned(table, space, prep, settings, [test, val])
    model = table.model or ""
    n_train = len(prep.rows["train"])
    subj_codes = np.unique(table.frame["subject_id"].to_numpy()[test], return_inverse=True)[1]
    rng = np.random.default_rng(settings.seed)
    rows = []
    if prep.kind == "classification":
        k = len(prep.classes)
        y = prep.codes[test]
        pred = _predict_codes(D_test, k)
        for metric, stat, chance in (
            ("balanced_accuracy", lambda W: balanced_accuracy_w(y, pred, W, k), 1.0 / k),
            ("roc_auc", lambda W: macro_auc_w(y, D_test, W, k), 0.5),
        ):
            v, lo, hi = _with_ci(stat, len(test), subj_codes, settings.n_bootstrap, rng)
            rows.append((metric, v, lo, hi, chance))
    else:
        y = prep.values[test]
        pred = D_test[:, 0] * sd + mu
        err = np.abs(pred - y)
        v, lo, hi = _with_ci(lambda W: (W @ err) / W.sum(1), len(test), subj_codes, settings.n_bootstrap, rng)
        # chance: predicting the train mean for everyone
        baseline = float(np.mean(np.abs(y - np.nanmean(prep.values[prep.rows["train"]])))) if len(y) else np.nan
        rows.append(("mae", v, lo, hi, baseline))
    metrics = pl.DataFrame(
        [{"model": model, "region": region, "attribute": attribute, "kind": prep.kind, "metric": m, "value": v,
          "ci_low": lo, "ci_high": hi, "n_train": n_train, "n_test": len(test), "chance": ch,
          "backend": space.backend}
         for m, v, lo, hi, ch in rows],
        schema=METRICS_SCHEMA,
    )
    predictions = pl.concat([
        _prediction_frame(table, prep, r, D, split, model, region, mu, sd)
        for r, D, split in ((val, D_val, "val"), (test, D_test, "test"))
    ])
    params = {"C": C, "gamma": g * space.gamma_scale, "gamma_multiple": g, "tuned_on": where, "backend": space.backend}
    log.info("probe %s/%s/%s: %s", model, region, attribute,
             ", ".join(f"{m}={v:.3f} [{lo:.3f}, {hi:.3f}]" for m, v, lo, hi, _ in rows) + f" ({params})")
    return ProbeResult(metrics=metrics, predictions=predictions, backend=space.backend, params=params)


def _region_label(table: AnalysisTable) -> str:
    regions = table.frame["region"].unique().to_list()
    return regions[0] if len(regions) == 1 else ALL_REGIONS


def _prediction_frame(table, prep: _Prepared, rows, D, split, model, region, mu, sd) -> pl.DataFrame:
    keys = table.frame[rows].select("subject_id", "image_uid")
    n = len(rows)
    if prep.kind == "classification":
        k = len(prep.classes)
        pred = _predict_codes(D, k)
        classes = np.asarray(prep.classes, dtype=object)
        # binary: the decision value for the second class; multi-class: the predicted class's own score
        score = D[:, 0] if k == 2 else D[np.arange(n), pred]
        class_scores = np.column_stack([-D[:, 0], D[:, 0]]) if k == 2 else D
        cols = dict(y_true=classes[prep.codes[rows]].tolist(), y_pred=classes[pred].tolist(), score=score,
                    y_true_value=[None] * n, y_pred_value=[None] * n, class_scores=class_scores.tolist())
    else:
        y = prep.values[rows]
        p = D[:, 0] * sd + mu
        cols = dict(y_true=[f"{v:.6g}" for v in y], y_pred=[f"{v:.6g}" for v in p], score=p,
                    y_true_value=y, y_pred_value=p, class_scores=[None] * n)
    return pl.DataFrame({"model": [model] * n, "region": [region] * n, "attribute": [prep.spec.name] * n,
                         "subject_id": keys["subject_id"], "image_uid": keys["image_uid"], "split": [split] * n,
                         **cols}, schema=PREDICTIONS_SCHEMA)


# ------------------------------------------------------------------------------------------- stage

def probe_table(table: AnalysisTable, attributes: Iterable[str], settings: ProbeSettings | Mapping | None = None,
                region: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Probe several attributes on one table sharing one FeatureSpace; returns (metrics, predictions, params)."""
    settings = ProbeSettings.from_config(settings)
    space = feature_space(table, settings)
    metrics, predictions, params = [], [], {}
    for attribute in attributes:
        res = probe_attribute(table, attribute, settings, space=space, region=region)
        if res is not None:
            metrics.append(res.metrics)
            predictions.append(res.predictions)
            params[attribute] = res.params
    empty_m, empty_p = pl.DataFrame(schema=METRICS_SCHEMA), pl.DataFrame(schema=PREDICTIONS_SCHEMA)
    return (pl.concat(metrics) if metrics else empty_m, pl.concat(predictions) if predictions else empty_p, params)


def _default_attributes(table: AnalysisTable, roles: Iterable[str] | None) -> list[str]:
    return [a for a, s in table.specs.items() if (roles is None or s.role in roles) and a in table.frame.columns]


def run_probes(
    embeddings: PathLike,
    subjects: PathLike,
    splits: PathLike,
    *,
    images: PathLike | None = None,
    attributes: Mapping | None = None,
    regions: Sequence[str] | None = None,
    probe_attributes: Sequence[str] | None = None,
    across_regions: bool = True,
    settings: ProbeSettings | Mapping | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Every attribute in every region (default: each region in the file) and, across regions, the region
    itself. `attributes` is the config `attributes:` mapping (default: subjects.parquet's metadata);
    `probe_attributes` restricts which ones are probed."""
    settings = ProbeSettings.from_config(settings)
    regions = list(regions) if regions is not None else regions_of(embeddings)
    metrics, predictions, params = [], [], {}
    for region in regions:
        table = load_analysis_table(embeddings, subjects, splits, images, region, attributes=attributes)
        names = list(probe_attributes) if probe_attributes is not None else _default_attributes(table, None)
        m, p, prm = probe_table(table, names, settings, region=region)
        metrics.append(m), predictions.append(p)
        params[region] = prm
        del table
    if across_regions and len(regions) > 1:
        table = load_analysis_table(embeddings, subjects, splits, images, regions, attributes=attributes)
        m, p, prm = probe_table(table, ["region"], settings, region=ALL_REGIONS)
        metrics.append(m), predictions.append(p)
        params[ALL_REGIONS] = prm
    return pl.concat(metrics), pl.concat(predictions), params


def write_probes(
    embeddings: PathLike,
    subjects: PathLike,
    splits: PathLike,
    metrics_out: PathLike,
    predictions_out: PathLike,
    **kwargs,
) -> pl.DataFrame:
    """The probe stage for one model: run_probes(...) and write metrics.parquet and predictions.parquet
    (tuned hyperparameters and settings in their metadata). Returns the metrics."""
    settings = ProbeSettings.from_config(kwargs.pop("settings", None))
    metrics, predictions, params = run_probes(embeddings, subjects, splits, settings=settings, **kwargs)
    meta = {"settings": dataclasses.asdict(settings), "params": params,
            "model": read_parquet_metadata(embeddings).get("model", Path(embeddings).parent.name)}
    write_parquet(metrics, metrics_out, metadata=meta)
    write_parquet(predictions, predictions_out, metadata=meta)
    return metrics


# ------------------------------------------------------------------------------------------- out-of-fold

def out_of_fold_proba(
    table: AnalysisTable,
    attribute: str,
    settings: ProbeSettings | Mapping | None = None,
    *,
    n_folds: int = 5,
    space: FeatureSpace | None = None,
) -> pl.DataFrame:
    """Predicted class probabilities of a categorical attribute for every row with a recorded value:
    out-of-fold (subject-grouped, stratified k-fold) on the train split, from the model fitted on all of
    train elsewhere. Decision values are turned into probabilities by a multinomial logistic calibration
    fitted on the out-of-fold train decisions (as CalibratedClassifierCV does). What cleanlab's label-issue
    search and the discordant-subgroup analysis need.

    Returns a wide frame: image_uid, subject_id, region, attribute, split, fold (-1 outside train), label,
    then one Float64 probability column per class (in the attribute's category order).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold

    settings = ProbeSettings.from_config(settings)
    prep = _prepare(table, attribute)
    if prep is None or prep.kind != "classification":
        raise ValueError(f"out_of_fold_proba needs a categorical attribute with ≥ 2 classes in train: {attribute!r}")
    if space is None:
        space = feature_space(table, settings)
    train = prep.rows["train"]
    others = np.flatnonzero((prep.codes >= 0) & ~np.isin(np.arange(table.frame.height), train))
    subjects = table.frame["subject_id"].to_numpy()
    n_folds = max(2, min(n_folds, int(np.bincount(prep.codes[train]).min())))
    folds = np.full(table.frame.height, -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=settings.seed)
    k = len(prep.classes)
    width = 1 if k == 2 else k
    D = np.zeros((table.frame.height, width))
    # hyperparameters tuned once (as for the probe), then reused for every fold
    C, g, _, (D_others,), _, _ = fit_tuned(table, space, prep, settings, [others])
    D[others] = D_others
    for f, (fit_idx, held_idx) in enumerate(splitter.split(train, prep.codes[train], subjects[train])):
        task, _, _ = _make_task(prep, train[fit_idx], settings, np.random.default_rng(settings.seed + f),
                                settings.exact_max_train if space.backend == "exact" else None)
        D[train[held_idx]] = next(grid_decisions(space, task, [(C, g)], [train[held_idx]]))[2][0]
        folds[train[held_idx]] = f
    calibrator = LogisticRegression(C=100.0, max_iter=1000).fit(D[train], prep.codes[train])
    rows = np.sort(np.concatenate([train, others]))
    P = np.zeros((len(rows), k))
    P[:, calibrator.classes_] = calibrator.predict_proba(D[rows])
    keys = table.frame[rows].select("image_uid", "subject_id", "region")
    split = table.frame["split"].to_numpy()[rows] if "split" in table.frame.columns else np.full(len(rows), None)
    labels = np.asarray(prep.classes, dtype=object)[prep.codes[rows]]
    out = keys.with_columns(
        pl.lit(attribute).alias("attribute"), pl.Series("split", split, dtype=pl.Utf8),
        pl.Series("fold", folds[rows]), pl.Series("label", labels.tolist(), dtype=pl.Utf8),
        *[pl.Series(c, P[:, i]) for i, c in enumerate(prep.classes)],
    )
    return out


def oof_matrix(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(integer labels, probability matrix, class names) from an out_of_fold_proba frame, as cleanlab wants."""
    classes = frame.columns[frame.columns.index("label") + 1 :]
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.array([lookup[v] for v in frame["label"].to_list()], dtype=np.int64)
    return labels, frame.select(classes).to_numpy(), list(classes)


def write_out_of_fold(
    embeddings: PathLike,
    subjects: PathLike,
    splits: PathLike,
    out: PathLike,
    *,
    images: PathLike | None = None,
    attributes: Mapping | None = None,
    regions: Sequence[str] | None = None,
    roles: Sequence[str] = ("protected",),
    settings: ProbeSettings | Mapping | None = None,
    n_folds: int = 5,
) -> pl.DataFrame:
    """Out-of-fold probabilities of every categorical attribute with one of `roles`, per region, in long
    form (OOF_SCHEMA: one row per image × class) in one Parquet file; pivot back with `oof_wide`."""
    settings = ProbeSettings.from_config(settings)
    model = read_parquet_metadata(embeddings).get("model", Path(embeddings).parent.name)
    parts = []
    for region in (list(regions) if regions is not None else regions_of(embeddings)):
        table = load_analysis_table(embeddings, subjects, splits, images, region, attributes=attributes)
        space = feature_space(table, settings)
        for attribute, spec in table.specs.items():
            if spec.is_categorical and spec.role in roles and attribute in table.frame.columns:
                wide = out_of_fold_proba(table, attribute, settings, n_folds=n_folds, space=space)
                classes = wide.columns[wide.columns.index("label") + 1 :]
                parts.append(wide.unpivot(index=["image_uid", "subject_id", "split", "fold", "label"], on=classes,
                                          variable_name="class", value_name="proba")
                             .with_columns(pl.lit(model).alias("model"), pl.lit(region).alias("region"),
                                           pl.lit(attribute).alias("attribute")))
    long = pl.concat(parts).select(list(OOF_SCHEMA)).cast(OOF_SCHEMA) if parts else pl.DataFrame(schema=OOF_SCHEMA)
    write_parquet(long, out, metadata={"model": model, "settings": dataclasses.asdict(settings), "n_folds": n_folds})
    return long


def oof_wide(long: pl.DataFrame, region: str, attribute: str) -> pl.DataFrame:
    """One (region, attribute) of a write_out_of_fold file back in out_of_fold_proba's wide layout."""
    part = long.filter((pl.col("region") == region) & (pl.col("attribute") == attribute))
    classes = list(dict.fromkeys(part["class"].to_list()))
    wide = part.pivot(on="class", index=["image_uid", "subject_id", "region", "attribute", "split", "fold", "label"],
                      values="proba")
    return wide.select("image_uid", "subject_id", "region", "attribute", "split", "fold", "label", *classes)

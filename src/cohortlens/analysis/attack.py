"""Attack probes: how much of an attribute is still readable from an embedding after it was "removed".

LEACE makes every *linear* classifier fitted on the erased data no better than a constant, and INLP removes the
directions a linear classifier used: a linear probe cannot see what is left by construction, so judging erasure
with it says nothing. The attackers here are tuned nonlinear models, fitted on the train split with their
hyper-parameters chosen by cross-validation inside it, and scored on the test split:

* `rbf_svm`: scikit-learn SVC / SVR with an RBF kernel, C and γ chosen by 3-fold CV (balanced accuracy / MAE);
* `mlp`: scikit-learn MLPClassifier / MLPRegressor (one hidden layer of 64; L-BFGS below 2000 training rows,
  Adam with early stopping above), its L2 penalty chosen by 3-fold CV;
* `linear` stays in the table (logistic regression / ridge) as the number LEACE guarantees, not as a verdict.

They are deliberately not the model table's probe (`probe`, an RBF SVM tuned once on the val split): an attacker
must adapt to whatever the erasure left, so it is re-tuned by CV on each erased embedding and a second model
family (the MLP) gets a chance too.

Every score comes with a 95 % percentile bootstrap interval over the test subjects (one row per subject and
region) and a **permutation test against chance**: the fitted attacker's test predictions are kept and the test
labels permuted (999 times). Its null is "the predictions carry no information about the attribute"; p > alpha
means the attribute is not detectably readable by that attacker (erased as far as it can tell). A drop before →
after gets a paired bootstrap interval (the same resampled subjects scored before and after).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.compose import TransformedTargetRegressor
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, r2_score
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR

from cohortlens.runtime import limit_threads

PROBES = ("linear", "rbf_svm", "mlp")
ATTACKERS = ("rbf_svm", "mlp")  # the probes erasure is judged by
HIGHER_IS_BETTER = {"balanced_accuracy": True, "r2": True, "mae": False}
C_GRID = (0.1, 1.0, 10.0, 100.0)
GAMMA_FACTORS = (0.1, 1.0, 10.0)  # × 1 / n_features (sklearn's "scale" on standardised inputs)
MLP_ALPHAS = (1e-2, 1.0)
SPAN_VARIANCE = 0.99999  # PCA's kept fraction: the training rows' span up to float noise
MAX_TRAIN = 5000  # attacker training rows (seeded subsample beyond): an RBF SVM's cost grows with n²


def _estimator(kind: str, probe: str, n_features: int, n_train: int, seed: int):
    """The probe, wrapped in its CV search where it has hyper-parameters."""
    folds = (StratifiedKFold if kind == "classification" else KFold)(3, shuffle=True, random_state=seed)
    scoring = "balanced_accuracy" if kind == "classification" else "neg_mean_absolute_error"
    gammas = [g / max(n_features, 1) for g in GAMMA_FACTORS]
    if probe == "linear":
        if kind == "classification":
            return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, class_weight="balanced",
                                                                      random_state=seed))
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    if probe == "rbf_svm":
        model = SVC(kernel="rbf", class_weight="balanced", random_state=seed) if kind == "classification" \
            else SVR(kernel="rbf", epsilon=0.1)
        grid = {"model__C": list(C_GRID), "model__gamma": gammas}
    elif probe == "mlp":
        # L-BFGS converges well on small training sets (sklearn's advice); Adam with early stopping on large ones
        small = n_train < 2000
        common = dict(hidden_layer_sizes=(64,), solver="lbfgs" if small else "adam", early_stopping=not small,
                      max_iter=200, random_state=seed)
        model = MLPClassifier(**common) if kind == "classification" else MLPRegressor(**common)
        grid = {"model__alpha": list(MLP_ALPHAS)}
    else:
        raise ValueError(f"unknown probe {probe!r}; known: {PROBES}")
    steps = [("scale", StandardScaler())]
    if probe == "mlp" and n_features > n_train:
        # wider than it has rows (a VAE's 12 x 128 latents on a few hundred subjects): the training rows span at
        # most n_train directions, and the L2 penalty keeps the first layer's weights out of the rest, so the MLP
        # is fitted on the rows' coordinates in their own span (all of its variance) -- the same attacker with
        # 1/6 of the first layer's weights for L-BFGS to carry
        steps.append(("span", PCA(n_components=SPAN_VARIANCE, svd_solver="full", random_state=seed)))
    search = GridSearchCV(Pipeline([*steps, ("model", model)]), grid, cv=folds, scoring=scoring, n_jobs=1)
    if kind == "classification":
        return search
    # standardised target: one grid suits ages in years and weights in kg alike
    return TransformedTargetRegressor(search, transformer=StandardScaler())


def fit_predict(X: np.ndarray, y: np.ndarray, kind: str, probe: str, train: np.ndarray, test: np.ndarray,
                seed: int = 0) -> np.ndarray | None:
    """Test-row predictions of `probe` fitted on the train rows (subsampled to MAX_TRAIN, seeded); None when a
    class has too few training rows for the 3-fold search (no row is better than a row naming a probe that
    did not run)."""
    rows = np.flatnonzero(train)
    if len(rows) > MAX_TRAIN:
        rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_TRAIN, replace=False))
    y_train = y[rows]
    if kind == "classification" and probe != "linear" and np.min(np.unique(y_train, return_counts=True)[1]) < 3:
        return None
    if kind == "regression" and probe != "linear" and len(rows) < 9:
        return None
    est = _estimator(kind, probe, X.shape[1], len(rows), seed)
    # small matrices: one BLAS thread each (a shared pool made single MLP fits 30x slower under load); an
    # L-BFGS fit that stops at max_iter is still a valid (if less tuned) attacker, so its warning is silenced
    with limit_threads(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X[rows], y_train).predict(X[test])


def metric_values(kind: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    if kind == "classification":
        return {"balanced_accuracy": float(balanced_accuracy_score(y, pred))}
    return {"mae": float(mean_absolute_error(y, pred)), "r2": float(r2_score(y, pred))}


def _metric_rows(metric: str, Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """The metric of every row of (resamples, n) label and prediction arrays at once (numpy; thousands of
    resamples per re-probe row made sklearn's per-call overhead the mitigate stage's main cost)."""
    if metric == "balanced_accuracy":
        classes = np.unique(Y)
        recalls, present = [], []
        for c in classes:
            is_c = Y == c
            n_c = is_c.sum(1)
            recalls.append(np.where(n_c > 0, (is_c & (P == c)).sum(1) / np.maximum(n_c, 1), 0.0))
            present.append(n_c > 0)
        present = np.array(present)
        return np.array(recalls).sum(0) / np.maximum(present.sum(0), 1)
    Y, P = Y.astype(float), P.astype(float)
    if metric == "mae":
        return np.abs(Y - P).mean(1)
    sst = ((Y - Y.mean(1, keepdims=True)) ** 2).sum(1)
    return np.where(sst > 0, 1.0 - ((Y - P) ** 2).sum(1) / np.maximum(sst, 1e-300), 0.0)


def _metric(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
    return float(_metric_rows(metric, y[None, :], pred[None, :])[0])


def _codes(metric: str, y, *preds):
    """Labels and predictions as integer codes for balanced accuracy (object comparisons are slow)."""
    if metric != "balanced_accuracy":
        return (np.asarray(y), *(None if p is None else np.asarray(p) for p in preds))
    classes = np.unique(np.concatenate([np.asarray(y, dtype=object).astype(str),
                                        *(np.asarray(p, dtype=object).astype(str) for p in preds if p is not None)]))
    code = {c: i for i, c in enumerate(classes)}

    def enc(a):
        return None if a is None else np.array([code[str(v)] for v in a], dtype=np.int64)

    return (enc(y), *(enc(p) for p in preds))


def bootstrap_ci(metric: str, y: np.ndarray, pred: np.ndarray, pred_before: np.ndarray | None = None,
                 n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """95 % percentile intervals of the metric (and of the drop before → after, paired) over test rows.
    Resamples in which a class is missing are dropped for balanced accuracy (it is undefined there)."""
    rng = np.random.default_rng(seed)
    y, pred, pred_before = _codes(metric, y, pred, pred_before)
    idx = rng.integers(0, len(y), (n_boot, len(y)))
    if metric == "balanced_accuracy":
        n_classes = len(np.unique(y))
        seen = np.zeros((n_boot, int(y.max()) + 1), dtype=bool)
        seen[np.arange(n_boot)[:, None], y[idx]] = True
        idx = idx[seen.sum(1) == n_classes]
    out = {"ci_low": np.nan, "ci_high": np.nan, "drop_ci_low": np.nan, "drop_ci_high": np.nan}
    if not len(idx):
        return out
    vals = _metric_rows(metric, y[idx], pred[idx])
    out["ci_low"], out["ci_high"] = (float(q) for q in np.quantile(vals, [0.025, 0.975]))
    if pred_before is not None:
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        drops = sign * (_metric_rows(metric, y[idx], pred_before[idx]) - vals)
        out["drop_ci_low"], out["drop_ci_high"] = (float(q) for q in np.quantile(drops, [0.025, 0.975]))
    return out


def p_vs_chance(metric: str, y: np.ndarray, pred: np.ndarray, n_perm: int = 999, seed: int = 0) -> float:
    """Permutation p-value that the predictions beat chance: test labels permuted, predictions fixed."""
    rng = np.random.default_rng(seed)
    y, pred = _codes(metric, y, pred)
    observed = _metric(metric, y, pred)
    perms = np.stack([rng.permutation(len(y)) for _ in range(n_perm)])
    null = _metric_rows(metric, y[perms], np.broadcast_to(pred, perms.shape))
    better = null >= observed - 1e-12 if HIGHER_IS_BETTER[metric] else null <= observed + 1e-12
    return float((1 + better.sum()) / (1 + n_perm))

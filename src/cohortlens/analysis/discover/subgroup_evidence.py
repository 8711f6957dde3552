"""The discordant subgroup's evidence per region (step 1 of `subgroup_null`'s procedure).

Cross-fitted (subject-grouped, value-stratified folds shared by all regions) shrinkage LDA of the recorded value on the region's standardised reduced embedding `rd.Z` *plus the
recorded covariates* (the continuous protected attributes and the categorical acquisition attributes: age,
height, weight, site), and a second LDA on the covariates alone. The evidence of an image towards value b is
the difference of their log-odds of b against the recorded value a:

    e_b = [log P(b | Z, cov) - log P(a | Z, cov)] - [log P(b | cov) - log P(a | cov)]

= log p(Z | b, cov) / p(Z | a, cov) under the LDA model: how much more the image looks like the other sex
than its own *given* the subject's height, weight, age and site. A tall woman whose chest looks tall is not
evidence; a chest that looks male beyond her height is.

An atypical image (far from its class off the class-mean axis: an artefact, an unusual scan) has its evidence
pulled towards its class's typical evidence by how atypical it is (`shrink_atypical`): a linear classifier's
log-odds grow without bound with such an image's distance, and a few atypical scans were flagged as a subgroup.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy.stats import norm, rankdata
from sklearn.covariance import ledoit_wolf_shrinkage
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from cohortlens.analysis.discover.core import RegionData, value_counts
from cohortlens.analysis.discover.subgroup_null import MIN_NULL_SUBJECTS, radial_t
from cohortlens.analysis.table import attribute_values, present

EVIDENCE_CLIP = 30.0  # |log-likelihood ratio| cap: a fold's LDA can be overconfident on outlying images


def covariate_names(rd: RegionData, attribute: str) -> list[str]:
    """Subject-level recorded covariates of `attribute`'s evidence: the continuous protected attributes (age,
    height, weight) and the categorical acquisition attributes (site).

    Not the other categorical protected attributes: they are tested for discordance themselves, and a subject
    whose images look like the other sex is, jointly with a recorded-sex covariate, an outlier whose log-odds any
    other attribute's classifier extrapolates. Not dates: a date carries no anatomy, and a scanner change over
    time is a site x date effect for the cluster detector."""
    out = []
    for name, spec in rd.specs.items():
        if name == attribute or name not in rd.frame.columns or spec.level != "subject":
            continue
        if (spec.role == "protected" and spec.type == "continuous") or (
                spec.role == "acquisition" and spec.is_categorical):
            out.append(name)
    return out


def covariate_matrix(frame: pl.DataFrame, specs: dict, names: list[str],
                     min_count: int = 10) -> tuple[np.ndarray, list[str]]:
    """Standardised design columns: a continuous covariate as the normal scores of its ranks (a height typo or a
    long weight tail cannot lever a fold's classifier), missing values at the middle with an indicator;
    categories one-hot (values rarer than `min_count` and the most common one as baseline). Nonlinear effects
    are left to the null's local location (`local_location`)."""
    cols, labels = [], []
    for name in names:
        spec = specs[name]
        v = attribute_values(frame, spec)
        if spec.is_categorical:
            counts = value_counts(v)
            common = sorted((c for c, k in counts.items() if k >= min_count), key=lambda c: -counts[c])
            for c in common[1:]:
                cols.append(np.array([x is not None and str(x) == c for x in v], float))
                labels.append(f"{name}={c}")
            continue
        ok = np.isfinite(v)
        if ok.sum() < min_count or np.nanstd(v) == 0:
            continue
        x = np.zeros(len(v))
        x[ok] = norm.ppf((rankdata(v[ok]) - 0.5) / ok.sum())
        cols.append(x)
        labels.append(name)
        if not ok.all():
            cols.append((~ok).astype(float))
            labels.append(f"{name} missing")
    if not cols:
        return np.zeros((frame.height, 0)), []
    C = np.column_stack(cols)
    sd = C.std(0)
    return (C - C.mean(0)) / np.where(sd > 0, sd, 1.0), labels


def subject_folds(subjects: np.ndarray, labels: np.ndarray, k: int, seed: int) -> dict[str, int]:
    """Subject-grouped, label-stratified folds shared by every region: each value's subjects in a random order,
    dealt round-robin (a subject's images of every region are predicted by models that never saw the subject)."""
    first: dict[str, str] = {}
    for s, y in zip(subjects, labels):
        first.setdefault(str(s), str(y))
    rng = np.random.default_rng(seed)
    out: dict[str, int] = {}
    offset = 0
    for value in sorted(set(first.values())):
        members = sorted(s for s, y in first.items() if y == value)
        for i, s in enumerate(np.array(members, dtype=object)[rng.permutation(len(members))]):
            out[str(s)] = (offset + i) % k
        offset += len(members)  # the next value continues the deal, so fold sizes stay even
    return out


def _shrinkage(X: np.ndarray, own: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage of the standardised within-class scatter, once per region and feature set (the
    intensity sklearn's shrinkage='auto' estimates, without re-estimating it in every fold)."""
    values = np.unique(own)
    W = X - np.stack([X[own == c].mean(0) for c in values])[np.searchsorted(values, own)]
    sd = W.std(0)
    return float(ledoit_wolf_shrinkage(W / np.where(sd > 0, sd, 1.0)))


def _lda(shrinkage: float) -> LinearDiscriminantAnalysis:
    return LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage)


def off_axis_distance(lda: LinearDiscriminantAnalysis, X: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance (the LDA's shared covariance) of each image from its recorded value's mean,
    with the part along the class-mean differences removed: how atypical the image is *apart from* looking like
    another value. A discordant image is ordinary in those other directions; an atypical scan is not."""
    w, V = np.linalg.eigh(lda.covariance_)
    whiten = V / np.sqrt(np.clip(w, 1e-12 * w.max(), None))  # x -> x @ whiten: identity covariance
    means = lda.means_ @ whiten
    out = np.zeros(len(X))
    for a in np.unique(own):
        rows = own == a
        y = X[rows] @ whiten - means[a]
        between = np.delete(means - means[a], a, axis=0)
        q, _ = np.linalg.qr(between.T)  # orthonormal basis of the class-mean differences
        out[rows] = (y**2).sum(1) - ((y @ q) ** 2).sum(1)
    return out


def shrink_atypical(evidence: np.ndarray, own: np.ndarray, d2: np.ndarray, dims: int) -> np.ndarray:
    """Evidence (images x values) of atypical images pulled towards their recorded value's typical evidence.

    An image far from its class in directions other than the class-mean differences (`off_axis_distance`, d2) is
    an atypical scan, and a linear classifier extrapolates its log-odds in proportion: on the demo, 10 of the 20
    subjects the unshrunk procedure flagged were not planted, and each had one region whose image was among the 6
    most atypical of 300. Images are read as a scale mixture (multivariate t, its df and scale fitted to all
    images' cross-fitted d2 by `radial_t`): given its off-axis distance, an image's noise scale is estimated by
    (df + dims) / (df + d2 / scale), the t's expected precision, and its evidence's deviation from the median
    evidence of its recorded value is multiplied by the square root of that, at most 1 (a typical image keeps its
    evidence). A discordant image is ordinary off the axis and keeps its evidence; the median is the neutral point
    because an unreadable image should count like an ordinary member of its own value, not like a coin toss
    (log-ratio 0, which lies far on the other value's side of an ordinary subject)."""
    df, scale = radial_t(d2, dims)
    if not np.isfinite(df):
        return evidence
    factor = np.sqrt(np.minimum(1.0, (df + dims) / (df + d2 / scale)))
    out = evidence.copy()
    for a in np.unique(own):
        rows = own == a
        typical = np.median(evidence[rows], axis=0)
        out[rows] = typical + factor[rows, None] * (evidence[rows] - typical)
    return out


def _log_ratios(log_proba: np.ndarray, own: np.ndarray) -> np.ndarray:
    """log P(c) - log P(own) for every value c (0 in the own column)."""
    return log_proba - log_proba[np.arange(len(own)), own][:, None]


def region_evidence(rd: RegionData, attribute: str, covariates: list[str], folds_of: dict[str, int],
                    cfg: dict) -> dict | None:
    """Cross-fitted evidence per image with a recorded value (module docstring, step 1): images x values
    log-likelihood ratios of each value against the recorded one given the covariates (0 in the recorded
    value's column); and the paper's flag: the embedding-only classifier predicts another value."""
    y = rd.values(attribute)
    ok = present(y)
    counts = value_counts(y[ok])
    # a value needs enough images for every fold and for its own null (fit_null)
    kept = {c for c, k in counts.items() if k >= max(2 * cfg["discordant_folds"], MIN_NULL_SUBJECTS)}
    if len(kept) < 2:
        return None
    ok &= np.array([v is not None and str(v) in kept for v in y])
    labels = y[ok].astype(str)
    classes = np.unique(labels)
    own = np.searchsorted(classes, labels)
    C, cov_labels = covariate_matrix(rd.frame, rd.specs, covariates, cfg["min_value_count"])
    C = C[ok]
    # Standardised columns: a fixed shrinkage intensity pulls towards the identity *of the standardised
    # features* (as sklearn's shrinkage='auto' does); on raw PCA scores it would equalise their variances.
    Z = rd.Z[ok]
    sd = Z.std(0)
    Z = (Z - Z.mean(0)) / np.where(sd > 0, sd, 1.0)
    ZC = np.hstack([Z, C])
    shrink = {"full": _shrinkage(ZC, own), "embedding": _shrinkage(Z, own)}
    if C.shape[1]:
        shrink["covariates"] = _shrinkage(C, own)
    evidence = np.zeros((len(labels), len(classes)))
    atypical = np.zeros(len(labels))
    paper_flags = np.zeros(len(labels), bool)
    fold = np.array([folds_of[str(s)] for s in rd.subjects[ok]])
    for k in np.unique(fold):
        test, train = fold == k, fold != k
        if len(np.unique(labels[train])) < len(classes):
            return None
        full = _lda(shrink["full"]).fit(ZC[train], labels[train])
        evidence[test] = _log_ratios(full.predict_log_proba(ZC[test]), own[test])
        atypical[test] = off_axis_distance(full, ZC[test], own[test])
        if C.shape[1]:
            base = _lda(shrink["covariates"]).fit(C[train], labels[train]).predict_log_proba(C[test])
        else:  # no covariates: the prior of the training fold
            base = np.tile(np.log(np.bincount(own[train], minlength=len(classes)) / train.sum()), (test.sum(), 1))
        evidence[test] -= _log_ratios(base, own[test])
        embedding_only = _lda(shrink["embedding"]).fit(Z[train], labels[train])
        paper_flags[test] = embedding_only.predict(Z[test]) != labels[test]
    evidence = shrink_atypical(evidence, own, atypical, ZC.shape[1] - (len(classes) - 1))
    return {"mask": ok, "labels": labels, "classes": classes, "folds": int(len(np.unique(fold))),
            "evidence": np.clip(evidence, -EVIDENCE_CLIP, EVIDENCE_CLIP), "flags": paper_flags,
            "covariates": cov_labels}

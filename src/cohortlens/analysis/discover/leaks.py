"""Attribute leaks: which protected and acquisition attributes a linear probe reads from the embedding.

Per region and attribute, out-of-fold predictions of a ridge probe (one-hot ridge = a linear classifier
for categories, ridge regression for numbers and dates) on the reduced embedding, scored by balanced
accuracy (categories, effect = balanced accuracy - chance) or R² (numbers and dates), and a permutation test
of that score: the same cross-validation refitted to permuted labels, as sklearn's
`permutation_test_score` does. All permuted label vectors are fitted at once as one multi-output
`RidgeCV` problem (regularisation chosen per target by efficient leave-one-out), which makes 199
permutations cost about as much as one fit of a kernel probe.

Dates are tested *conditional on the acquisition strata* (site, scanner, ...): labels are permuted only within
a stratum, so a date that is predictable merely because sites recruited in different years is not a date
effect. A significant date leak is then checked for confinement to one value of one stratum attribute
(`confine_to_any_stratum`); a date leak that one site (or scanner) carries alone is reported as a date effect
within that stratum, named after it (`site×date` = Neubrandenburg, `vendor×date` = B), not as a date effect.
The interaction is also tested directly: per stratum value, can the date be predicted from its images alone?
Its onset is estimated as a change point on the date score (`onset`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold

from cohortlens.analysis.discover.core import (
    WITHIN_FAMILY,
    Finding,
    RegionData,
    confine_to_any_stratum,
    interaction_name,
    stratum_attributes,
    value_counts,
)
from cohortlens.analysis.discover.onset import change_point, describe
from cohortlens.analysis.table import present


@dataclass(frozen=True)
class LeakSettings:
    """Settings of the leak detector (besides `core.CoreSettings`' folds and permutations)."""

    interaction_min_site: int = 30  # images of one site for the within-site date leak
    # Permutations of a within-site date leak. These tests are their own BH family (`WITHIN_FAMILY`), tens of
    # them per model, so their smallest p must lie well below alpha / tests: 1 / 1000, not 199's 1 / 200.
    interaction_permutations: int = 999
    # Relevance floors: a significant leak is a finding only when the embedding explains at least this much.
    # At NAKO's 30k subjects an R² of 0.002 is significant; a report listing it buries the leaks that matter.
    min_r2: float = 0.05  # numbers and dates (out-of-fold R²)
    min_accuracy_gain: float = 0.05  # categories: balanced accuracy minus chance
    onset_bootstraps: int = 200  # subject bootstrap resamples for the 95 % interval of a date effect's onset


# Ridge penalties tried per target by leave-one-out; the PCA scores' variances span about 1e-1 .. 1e2.
ALPHAS = np.logspace(-1, 4, 8)


def cv_folds(n: int, groups: np.ndarray, n_splits: int, seed: int, repeats: int = 1):
    """Subject-grouped, shuffled folds: a subject's images never straddle train and test. With `repeats` > 1 the
    fold sets of that many shuffles, one after the other: every image is then predicted once per repeat.

    Not stratified on purpose: folds stratified on the observed labels are balanced for them and not for the
    permuted ones, which makes the observed score look better than its permutations (a biased test).
    """
    _, g = np.unique(groups.astype(str), return_inverse=True)
    n_splits = int(max(2, min(n_splits, len(np.unique(g)))))
    return [fold for r in range(max(1, int(repeats)))
            for fold in GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + r).split(np.zeros(n),
                                                                                                   groups=g)]


def permutation_index(n: int, n_perm: int, rng: np.random.Generator, strata: np.ndarray | None = None,
                      units: np.ndarray | None = None) -> np.ndarray:
    """(n_perm, n) indices; y[idx[j]] is the j-th permuted label vector.

    Permutes within `strata`, and moves whole `units` (subjects) when a subject has several images, so a
    subject-level attribute stays constant within a subject under the null too.
    """
    strata = np.zeros(n, dtype=object) if strata is None else np.asarray(strata, dtype=object)
    units = np.arange(n).astype(str) if units is None else np.asarray(units).astype(str)
    uniq, first, unit_of = np.unique(units, return_index=True, return_inverse=True)
    unit_stratum = np.array([str(strata[i]) for i in first], dtype=object)
    out = np.empty((n_perm, n), dtype=np.int64)
    groups = [np.flatnonzero(unit_stratum == s) for s in np.unique(unit_stratum)]
    for j in range(n_perm):
        target = np.arange(len(uniq))
        for members in groups:
            target[members] = members[rng.permutation(len(members))]
        out[j] = first[target][unit_of]
    return out


def oof_ridge(Z: np.ndarray, Y: np.ndarray, folds, train_means: bool = False):
    """Out-of-fold predictions for every column of Y (one RidgeCV fit per fold for all columns); optionally
    also the training folds' column means seen by each row (the class priors of a one-hot target). A row that
    is in the test part of several folds (repeated fold sets) gets the mean of its predictions."""
    out = np.zeros(Y.shape, dtype=np.float64)
    means = np.zeros(Y.shape, dtype=np.float64)
    times = np.zeros(len(Y), dtype=np.float64)
    for train, test in folds:
        model = RidgeCV(alphas=ALPHAS, alpha_per_target=True).fit(Z[train], Y[train])
        out[test] += model.predict(Z[test]).reshape(len(test), -1)
        means[test] += Y[train].mean(0)
        times[test] += 1
    times = np.maximum(times, 1)[:, None]
    out, means = out / times, means / times
    return (out, means) if train_means else out


def classification_leak(Z, y, folds, perm_idx) -> dict:
    """Balanced accuracy of a one-hot ridge probe for the observed and every permuted label vector."""
    classes, yc = np.unique(y.astype(str), return_inverse=True)
    C, n = len(classes), len(y)
    labels = np.column_stack([yc, *(yc[idx] for idx in perm_idx)])  # (n, P+1)
    Y = np.zeros((n, labels.shape[1], C))
    Y[np.arange(n)[:, None], np.arange(labels.shape[1])[None, :], labels] = 1.0
    S, prior = oof_ridge(Z, Y.reshape(n, -1), folds, train_means=True)
    S, prior = S.reshape(Y.shape), np.maximum(prior.reshape(Y.shape), 1e-6)
    # Ridge scores approximate P(c | x); dividing by the training prior is the balanced-accuracy decision rule.
    pred = np.argmax(np.clip(S, 1e-6, None) / prior, axis=2)
    recall = np.stack([((pred == c) & (labels == c)).sum(0) / np.maximum((labels == c).sum(0), 1)
                       for c in range(C)])
    ba = recall.mean(0)
    aucs = {}
    for c, name in enumerate(classes):
        if 0 < (yc == c).sum() < n:
            aucs[str(name)] = float(roc_auc_score(yc == c, S[:, 0, c]))
    return {"stat": float(ba[0]), "null": ba[1:], "pred": classes[pred[:, 0]], "classes": classes,
            "auc": aucs, "recall": {str(c): float(recall[i, 0]) for i, c in enumerate(classes)}}


def regression_leak(Z, y, folds, perm_idx, fitted: np.ndarray | None = None) -> dict:
    """R² of out-of-fold ridge predictions for the observed and every permuted target. With `fitted` (the
    target's fit on a covariate) the null targets are fitted + permuted residuals (Freedman–Lane): the
    covariate's part of the target is kept, only what it leaves is permuted."""
    y = np.asarray(y, float)
    if fitted is None:
        Y = np.column_stack([y, *(y[idx] for idx in perm_idx)])
    else:
        resid = y - fitted
        Y = np.column_stack([y, *(fitted + resid[idx] for idx in perm_idx)])
    P = oof_ridge(Z, Y, folds)
    sst = ((Y - Y.mean(0)) ** 2).sum(0)
    r2 = 1.0 - ((Y - P) ** 2).sum(0) / np.maximum(sst, 1e-12)
    r = float(np.corrcoef(y, P[:, 0])[0, 1]) if np.std(P[:, 0]) > 0 else 0.0
    return {"stat": float(r2[0]), "null": r2[1:], "pred": P[:, 0], "r": r}


def p_from_null(stat: float, null: np.ndarray) -> float:
    return float((1 + np.sum(null >= stat - 1e-12)) / (1 + len(null)))


def _run(rd: RegionData, attribute: str, cfg: dict, rng, keep: np.ndarray | None = None,
         conditional: bool = True, strata: np.ndarray | None = None,
         covariate: np.ndarray | None = None) -> dict | None:
    """One leak test. Labels are permuted within `strata` when given (a conditional test: what the embedding
    knows of the attribute beyond those strata), else dates within the acquisition strata, others freely. A
    numeric attribute with `covariate` (a column or a design matrix) is tested beyond it by Freedman–Lane: the
    least-squares fit on the covariates is kept, its residuals permuted (within `strata` when given too); rows
    with a missing covariate are left out."""
    spec = rd.specs[attribute]
    y = rd.values(attribute)
    mask = present(y) if keep is None else (present(y) & keep)
    if spec.is_categorical:
        counts = value_counts(y[mask])
        kept = {c for c, k in counts.items() if k >= max(cfg["folds"], 2)}
        mask &= np.array([str(v) in kept for v in y])
        if len(kept) < 2:
            return None
    if mask.sum() < 3 * cfg["folds"]:
        return None
    if covariate is not None:
        covariate = np.asarray(covariate, float).reshape(len(y), -1)
        mask &= np.isfinite(covariate).all(axis=1)
        if mask.sum() < 3 * cfg["folds"]:
            return None
    Z, yy, units = rd.Z[mask], y[mask], rd.subjects[mask]
    if strata is not None:
        strata = np.asarray(strata, dtype=object)[mask]
    else:
        strata = rd.strata()
        strata = strata[mask] if (conditional and spec.type == "date" and strata is not None) else None
    seed = int(rng.integers(2**31))
    folds = cv_folds(len(yy), units, cfg["folds"], seed, cfg["fold_repeats"])
    perm = permutation_index(len(yy), cfg["permutations"], np.random.default_rng(seed), strata,
                             units if spec.level == "subject" else None)
    if spec.is_categorical:
        res = classification_leak(Z, yy, folds, perm)
    else:
        fitted = None
        if covariate is not None:
            X = np.column_stack([np.ones(int(mask.sum())), covariate[mask]])
            fitted = X @ np.linalg.lstsq(X, yy.astype(float), rcond=None)[0] if np.ptp(X[:, 1:], axis=0).any() else None
        res = regression_leak(Z, yy, folds, perm, fitted)
    res["p"] = p_from_null(res["stat"], res["null"])
    res["mask"], res["y"], res["n_folds"] = mask, yy, len(folds) // cfg["fold_repeats"]
    return res


def attribute_leaks(rd: RegionData, cfg: dict, rng: np.random.Generator) -> list[Finding]:
    findings = []
    for attribute in rd.attributes():
        res = _run(rd, attribute, cfg, rng)
        if res is None:
            continue
        findings.append(_leak_finding(rd, attribute, res, cfg, rng))
    findings += site_date_leaks(rd, cfg, rng)
    return findings


def _leak_finding(rd: RegionData, attribute: str, res: dict, cfg: dict, rng) -> Finding:
    spec = rd.specs[attribute]
    n = int(res["mask"].sum())
    details = {"probe": "ridge (one-hot) on standardised PCA scores", "folds": res["n_folds"],
               "permutations": cfg["permutations"], "dims": int(rd.Z.shape[1]), "scope": "region"}
    risk = ("the acquisition " + attribute + " can be re-identified from the images (re-identification risk)"
            if spec.role == "acquisition" else f"the protected attribute {attribute} is encoded in the embedding")
    if spec.is_categorical:
        chance = 1.0 / len(res["classes"])
        best = max(res["auc"], key=res["auc"].get) if res["auc"] else None
        ids = rd.image_uids[res["mask"]]
        hit = (res["pred"] == res["y"].astype(str)) & (res["y"].astype(str) == best)
        details.update(balanced_accuracy=res["stat"], chance=chance, auc=res["auc"], recall=res["recall"])
        summary = (f"{attribute} is predictable from {rd.region} embeddings: balanced accuracy {res['stat']:.2f} "
                   f"vs chance {chance:.2f}; best recognised {attribute} {best} (AUC {res['auc'].get(best, 0):.2f})"
                   f" — {risk}")
        return _floored(Finding("attribute_leak", rd.region, attribute, best, res["stat"] - chance,
                                "balanced_accuracy_minus_chance", res["p"], n, ids[hit].tolist(), summary, details),
                        cfg)

    details.update(r2=res["stat"], pearson_r=res["r"])
    what = "R² {:.2f} (r = {:.2f}) of out-of-fold ridge predictions".format(res["stat"], res["r"])
    if spec.type != "date":
        summary = f"{attribute} is predictable from {rd.region} embeddings: {what} — {risk}"
        return _floored(Finding("attribute_leak", rd.region, attribute, None, res["stat"], "r2", res["p"], n, [],
                                summary, details), cfg)

    stratum_attrs = stratum_attributes(rd)
    attr_name, value = attribute, None
    beyond = " and ".join(stratum_attrs) or "nothing"
    summary = (f"{attribute} is predictable from {rd.region} embeddings beyond the {beyond}: {what}, dates "
               f"permuted within {beyond}")
    if stratum_attrs and res["p"] <= cfg["alpha"]:
        stratum, site, p_without = confine_to_any_stratum(
            rd, lambda keep: (_run(rd, attribute, cfg, rng, keep=keep) or {"p": 1.0})["p"], cfg["alpha"],
            test_within=lambda keep: (_run(rd, attribute, cfg, rng, keep=keep, conditional=False)
                                      or {"p": 1.0})["p"])
        details["p_without_stratum"] = p_without
        if site is not None:
            attr_name, value = interaction_name(stratum, attribute), site
            details["stratum"] = stratum
            summary = (f"{attribute} is predictable from {rd.region} embeddings only through {stratum} {site}: "
                       f"{what}; without {site} p = {p_without[stratum][site]:.2g} — a {attribute} effect within "
                       f"{stratum} {site}, not a {attribute} effect of its own")
    return _floored(Finding("attribute_leak", rd.region, attr_name, value, res["stat"], "r2", res["p"], n, [],
                            summary, details), cfg)


def _floored(f: Finding, cfg: dict) -> Finding:
    """Below the detector's relevance floor a leak stays in the tests table, significant or not, but is no
    finding (`Finding.reportable`); the floor is written into its details."""
    floor = cfg["min_r2"] if f.effect_measure == "r2" else cfg["min_accuracy_gain"]
    f.details["relevance_floor"] = floor
    f.reportable = bool(np.isfinite(f.effect_size) and f.effect_size >= floor)
    return f


def site_date_leaks(rd: RegionData, cfg: dict, rng) -> list[Finding]:
    """Within one value of a stratum attribute (a site, a scanner), is the acquisition date predictable from the
    images? A date effect within that stratum, with its onset (`onset`)."""
    out = []
    dates = rd.attributes(types=("date",))
    for stratum in stratum_attributes(rd):
        stratum_vals = rd.values(stratum)
        for date_attr in dates:
            for value, count in value_counts(stratum_vals).items():
                if count < cfg["interaction_min_site"]:
                    continue
                keep = np.array([str(v) == value for v in stratum_vals])
                res = _run(rd, date_attr, {**cfg, "permutations": cfg["interaction_permutations"]}, rng, keep=keep,
                           conditional=False)
                if res is None:
                    continue
                days = rd.values(date_attr)[res["mask"]]
                ids = rd.image_uids[res["mask"]]
                cp = change_point(days, res["pred"], rd.subjects[res["mask"]], permutations=cfg["permutations"],
                                  bootstraps=cfg["onset_bootstraps"],
                                  rng=np.random.default_rng(int(rng.integers(2**31))))
                if cp["onset"] is not None and cp["shape"] == "step":
                    after = days >= np.datetime64(cp["onset"], "D").astype(int)
                else:  # a drift has no onset: the later-looking half stands for "what changed"
                    after = res["pred"] > np.median(res["pred"])
                summary = (f"within {stratum} {value}, the {date_attr} is predictable from {rd.region} embeddings: "
                           f"R² {res['stat']:.2f} (r = {res['r']:.2f}, n = {int(res['mask'].sum())}); "
                           f"{describe(cp)}")
                details = {"r2": res["stat"], "pearson_r": res["r"], "folds": res["n_folds"],
                           "permutations": cfg["interaction_permutations"], "stratum": stratum, "site": value,
                           "scope": f"within {stratum}", **{k: v for k, v in cp.items() if k != "n"}}
                if cp["shape"] == "step":
                    details["direction"] = "from"
                out.append(_floored(Finding("attribute_leak", rd.region, interaction_name(stratum, date_attr),
                                            value, res["stat"], "r2", res["p"], int(res["mask"].sum()),
                                            ids[after].tolist(), summary, details, tag="within",
                                            family=WITHIN_FAMILY), cfg))
    return out

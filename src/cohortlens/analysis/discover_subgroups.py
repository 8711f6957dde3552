"""Discordant subgroups: images whose embedding neighbourhood carries the other value of a protected attribute
(paper 003, section 3.1: "411 thoracic (3.7%), 347 lumbar (3.1%) and 211 cervical (1.9%) images were
classified towards the opposite sex"), counted per region, and their co-occurrence within subjects against
the count expected if regions were independent (paper 003: 141 subjects with two discordant regions vs 26.6
expected, 34 with three vs 0.24).

Neighbourhood: the k nearest neighbours of an image among the *other folds'* images (cross-fitted,
subject-grouped), in the attribute's linear-discriminant subspace of the standardised embedding (LDA fitted
on those other folds, so the image's own label never shapes its neighbourhood). An image is discordant
when its neighbours' majority has another value than its recorded one. Why the discriminant subspace and not
the raw standardised embedding: there the neighbours are chosen by whatever varies most (in the demo: age,
weight, body size), and the sex majority of a raw 15-NN neighbourhood disagrees with the recorded sex for
10-40% of the images with 3-30% precision against the planted subgroup; in the discriminant subspace the
neighbourhood is what the paper's t-SNE showed: the sex cluster an image falls into.

Tests: per region, does discordance in this region go with discordance in another region of the same subject
(one-sided Fisher exact test)? Across regions: subjects with >= 2 discordant regions, observed vs expected
under independence (Poisson-binomial with the per-region rates), p-value from permuting each region's flags
across subjects (exact for independence given the per-region counts).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom, fisher_exact
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline

from cohortlens.analysis._data import present
from cohortlens.analysis.discover_core import ALL_REGIONS, Finding, RegionData, pct, value_counts


def discordant_votes(rd: RegionData, attribute: str, cfg: dict, seed: int) -> dict | None:
    """Cross-fitted kNN vote of every image with a recorded value: (mask, labels, own-label share, flags)."""
    y = rd.values(attribute)
    ok = present(y)
    counts = value_counts(y[ok])
    kept = {c for c, k in counts.items() if k >= 2 * cfg["discordant_folds"]}
    ok &= np.array([str(v) in kept for v in y])
    if len(kept) < 2:
        return None
    labels = y[ok].astype(str)
    k = int(min(cfg["discordant_k"], ok.sum() // 4))
    model = make_pipeline(LinearDiscriminantAnalysis(), KNeighborsClassifier(n_neighbors=k))
    folds = int(min(cfg["discordant_folds"], min(counts[c] for c in kept)))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, rd.Z[ok], labels, cv=cv, groups=rd.subjects[ok], method="predict_proba")
    classes = np.unique(labels)
    own = proba[np.arange(len(labels)), np.searchsorted(classes, labels)]
    majority = classes[np.argmax(proba, axis=1)]
    return {"mask": ok, "labels": labels, "own_share": own, "flags": majority != labels, "k": k, "folds": folds,
            "classes": classes}


def discordant_subgroups(regions: list[RegionData], cfg: dict, rng: np.random.Generator) -> list[Finding]:
    out: list[Finding] = []
    if not regions:
        return out
    specs = regions[0].specs
    attributes = [a for a, s in specs.items() if s.role == "protected" and s.is_categorical
                  and all(a in rd.frame.columns for rd in regions)]
    for attribute in attributes:
        votes = {}
        for rd in regions:
            v = discordant_votes(rd, attribute, cfg, int(rng.integers(2**31)))
            if v is not None:
                votes[rd.region] = (rd, v)
        if not votes:
            continue
        flags_by_subject = _subject_flags(votes)
        for region, (rd, v) in votes.items():
            out.append(_region_finding(rd, attribute, v, flags_by_subject, cfg))
        if len(votes) >= 2:
            f = co_occurrence(votes, flags_by_subject, attribute, cfg, rng)
            if f is not None:
                out.append(f)
    return out


def _subject_flags(votes: dict) -> dict[str, dict[str, bool]]:
    """subject -> region -> discordant (any of the subject's images of that region)."""
    table: dict[str, dict[str, bool]] = {}
    for region, (rd, v) in votes.items():
        for subject, flag in zip(rd.subjects[v["mask"]], v["flags"]):
            row = table.setdefault(str(subject), {})
            row[region] = bool(row.get(region, False) or flag)
    return table


def _region_finding(rd: RegionData, attribute: str, v: dict, by_subject: dict, cfg: dict) -> Finding:
    flags, labels = v["flags"], v["labels"]
    n, n_disc = len(flags), int(flags.sum())
    by_class = {str(c): int((flags & (labels == c)).sum()) for c in v["classes"]}
    rate_by_class = {str(c): float((flags & (labels == c)).sum() / max((labels == c).sum(), 1)) for c in v["classes"]}
    subjects = rd.subjects[v["mask"]]
    # Does a discordant image here go with a discordant image of the same subject elsewhere?
    here, elsewhere = [], []
    for s, flag in zip(subjects, flags):
        others = [f for r, f in by_subject[str(s)].items() if r != rd.region]
        if others:
            here.append(bool(flag))
            elsewhere.append(any(others))
    here, elsewhere = np.array(here, bool), np.array(elsewhere, bool)
    details = {"k": v["k"], "folds": v["folds"], "space": "LDA of the standardised PCA scores",
               "count": n_disc, "by_class": by_class, "rate_by_class": rate_by_class}
    ids = rd.image_uids[v["mask"]][flags].tolist()
    classes_txt = ", ".join(f"{c}: {k}" for c, k in by_class.items())
    summary = (f"{n_disc} of {n} {rd.region} images ({100 * n_disc / max(n, 1):.1f}%) sit among the other {attribute}: "
               f"the majority of their {v['k']} nearest neighbours in the {attribute}-discriminant subspace has "
               f"another {attribute} than recorded ({classes_txt})")
    p = None
    if len(here) and here.any():
        a, b = int((here & elsewhere).sum()), int((here & ~elsewhere).sum())
        c, d = int((~here & elsewhere).sum()), int((~here & ~elsewhere).sum())
        res = fisher_exact([[a, b], [c, d]], alternative="greater")
        p = float(res.pvalue)
        details.update(co_discordant=a, odds_ratio=float(res.statistic))
        summary += (f"; {a} of them are discordant in another region of the same subject too, vs "
                    f"{pct(c / max(c + d, 1))} of the concordant ones (one-sided Fisher exact test)")
    f = Finding("discordant_subgroup", rd.region, attribute, None, n_disc / max(n, 1), "discordant_fraction", p,
                n, ids, summary, details)
    if p is None:
        f.flagged = n_disc > 0
    return f


def poisson_binomial(rates: np.ndarray) -> np.ndarray:
    """P(exactly j of the independent events happen), j = 0..len(rates)."""
    pmf = np.array([1.0])
    for p in rates:
        pmf = np.convolve(pmf, [1.0 - p, p])
    return pmf


def co_occurrence(votes: dict, by_subject: dict, attribute: str, cfg: dict, rng: np.random.Generator,
                  n_perm: int = 9999) -> Finding | None:
    regions = sorted(votes)
    complete = [s for s, row in by_subject.items() if all(r in row for r in regions)]
    if len(complete) < 10:
        return None
    F = np.array([[by_subject[s][r] for r in regions] for s in complete], dtype=bool)
    n, R = F.shape
    rates = F.mean(0)
    pmf = poisson_binomial(rates)
    per_subject = F.sum(1)
    observed = np.bincount(per_subject, minlength=R + 1)
    expected = n * pmf
    obs_multi, exp_multi = int((per_subject >= 2).sum()), float(n * pmf[2:].sum())
    # Permuting each region's flags across subjects keeps every region's rate and breaks any link.
    null = np.zeros(n_perm, dtype=np.int64)
    for start in range(0, n_perm, 1000):
        m = min(1000, n_perm - start)
        keys = rng.random((m, n, R))
        shuffled = np.take_along_axis(np.broadcast_to(F, (m, n, R)), np.argsort(keys, axis=1), axis=1)
        null[start : start + m] = (shuffled.sum(2) >= 2).sum(1)
    p_perm = float((1 + np.sum(null >= obs_multi)) / (1 + n_perm))
    p_binom = float(binom.sf(obs_multi - 1, n, pmf[2:].sum())) if obs_multi > 0 else 1.0
    any_disc = int((per_subject >= 1).sum())
    parts = [f"{observed[j]} subjects are discordant in {j if j < R else 'all ' + str(R)} regions (expected "
             f"{expected[j]:.2g} if regions were independent)" for j in range(2, R + 1)]
    summary = (f"{attribute}-discordant images co-occur within subjects ({', '.join(regions)}; {n} subjects with all "
               f"of them): {'; '.join(parts)}; of the {any_disc} subjects with any discordant region "
               f"{pct(observed[1] / max(any_disc, 1))} have only one (permutation test of the regions' flags)")
    ids = []
    multi = set(np.array(complete, dtype=object)[per_subject >= 2].tolist())
    for region in regions:
        rd, v = votes[region]
        subj = rd.subjects[v["mask"]]
        ids += [u for u, s, f in zip(rd.image_uids[v["mask"]], subj, v["flags"]) if f and s in multi]
    details = {"regions": regions, "rates": dict(zip(regions, rates.tolist())), "observed": observed.tolist(),
               "expected": expected.tolist(), "p_binomial": p_binom, "permutations": n_perm,
               "subjects": sorted(multi)}
    ratio = obs_multi / exp_multi if exp_multi > 0 else float("inf")
    return Finding("discordant_subgroup", ALL_REGIONS, attribute, "co-occurrence", ratio, "observed_over_expected",
                   p_perm, n, ids, summary, details)

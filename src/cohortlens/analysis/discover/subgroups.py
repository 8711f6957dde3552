"""Discordant subgroups: subjects whose images look like the other value of a protected attribute (paper 003,
Graf et al. 2024: a subgroup of German National Cohort subjects whose spine MRIs are embedded with the opposite
sex, co-occurring across neck, chest and lumbar), beyond what the per-region classifier's error and the subjects'
recorded covariates explain.

The flagged subgroup (`subgroup_evidence`, `subgroup_null`): cross-fitted per-region log-likelihood ratios of "another value
than recorded" given the recorded covariates (age, height, weight, site), combined per subject as a region-wise
mixture likelihood ratio, tested against a null fitted robustly to the cohort's bulk per recorded value (covariate
location + between-region covariance), Benjamini-Hochberg over subjects.

What paper 003 did is kept beside it: per region, the images an embedding-only classifier puts on the other side
(paper 003, 3.1: "411 thoracic (3.7%), 347 lumbar (3.1%) and 211 cervical (1.9%) images were classified towards
the opposite sex"), and subjects with such images in >= 2 regions vs the count expected if regions were
independent (Poisson-binomial with the per-region rates; paper 003: 141 subjects with two vs 26.6 expected, 34
with three vs 0.24). That comparison is not a test of a subgroup: any recorded trait that moves all regions the
same way (men are taller; a tall woman's neck, chest and lumbar all look taller, i.e. more male) makes regions
dependent without a subgroup. It is reported in the details and text ("what the paper did"); the flagged set,
the sample ids and the p-values come from the calibrated procedure.

Findings per protected categorical attribute: one `discordant_subgroup` per region (sample ids: the flagged
subjects' images of that region that lean to the other value; effect: their share of the region's images; p: the
region's own count of subjects beyond its null's upper 2.5% point, a binomial test, and the summed normal scores
of the region given the other regions among the subjects that the other regions flag, Stouffer's z; the two
Bonferroni-combined) and one across regions (region `all`, value
`co-occurrence`; sample ids: the flagged subjects' leaning images of every region; p: Simes' test over the
subjects' p-values, i.e. the smallest BH-adjusted p, below alpha exactly when somebody is flagged; effect size:
the paper's observed / expected-if-independent ratio, which `cohortlens.demo.truth` prints as such; details: the flagged
subjects, who they are by recorded attributes, the fitted nulls and the paper's counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy.stats import binom

from cohortlens.analysis.discover.core import Finding, RegionData, fmt_p, pct
from cohortlens.analysis.discover.subgroup_evidence import (
    covariate_matrix,
    covariate_names,
    region_evidence,
    subject_folds,
)
from cohortlens.analysis.discover.subgroup_null import MIXTURE_Q, calibrated_subgroup, simes
from cohortlens.types import ALL_REGIONS


@dataclass(frozen=True)
class SubgroupSettings:
    """Settings of the discordant-subgroup detector."""

    discordant_k: int = 15  # read by no detector any more; kept so that configs which set it stay valid
    discordant_folds: int = 10
    # cross-fits of the evidence with fresh folds, averaged: one fold assignment moved a planted subject's
    # p-value 10-fold (LDA refitted on 90 % of a few hundred subjects), and the flagged set with it
    discordant_repeats: int = 5


PAPER_PERMUTATIONS = 999


def discordant_subgroups(regions: list[RegionData], cfg: dict, rng: np.random.Generator) -> list[Finding]:
    out: list[Finding] = []
    if not regions:
        return out
    specs = regions[0].specs
    attributes = [a for a, s in specs.items() if s.role == "protected" and s.is_categorical
                  and all(a in rd.frame.columns for rd in regions)]
    for attribute in attributes:
        covariates = covariate_names(regions[0], attribute)
        subjects = np.concatenate([rd.subjects for rd in regions])
        values = np.concatenate([rd.values(attribute) for rd in regions]).astype(str)
        folds = [subject_folds(subjects, values, cfg["discordant_folds"], int(rng.integers(2**31)))
                 for _ in range(max(1, int(cfg["discordant_repeats"])))]
        votes = {}
        for rd in regions:
            v = repeated_evidence(rd, attribute, covariates, folds, cfg)
            if v is not None:
                votes[rd.region] = (rd, v)
        if not votes:
            continue
        table = subject_table(votes, covariates, cfg)
        cal = calibrated_subgroup(table["E"], table["C"], table["labels"], table["classes"], cfg["alpha"], rng)
        profile = describe_flagged(table, cal, attribute)
        for j, region in enumerate(table["regions"]):
            out.append(_region_finding(*votes[region], j, attribute, table, cal))
        if len(votes) >= 2:
            f = _cross_region_finding(votes, table, cal, profile, attribute, cfg, rng)
            if f is not None:
                out.append(f)
    return out


def repeated_evidence(rd: RegionData, attribute: str, covariates: list[str], folds: list[dict], cfg: dict) -> dict | None:
    """`region_evidence` cross-fitted once per fold assignment; the evidence averaged over them, the paper's
    flag by majority."""
    runs = [region_evidence(rd, attribute, covariates, f, cfg) for f in folds]
    if any(v is None for v in runs):
        return None
    out = dict(runs[0])
    out["evidence"] = np.mean([v["evidence"] for v in runs], axis=0)
    out["flags"] = np.mean([v["flags"] for v in runs], axis=0) > 0.5
    out["repeats"] = len(runs)
    return out


# ----------------------------------------------------------------------------------------------------------
# subjects x regions


def subject_table(votes: dict, covariates: list[str], cfg: dict) -> dict:
    """Subject-level evidence, subjects x regions x values (mean over a subject's images of a region; NaN where
    the region is missing), the recorded value, and the subject-level covariate design."""
    regions = sorted(votes)
    classes = np.array(sorted({str(c) for r in regions for c in votes[r][1]["classes"]}), dtype=object)
    frames, rows = [], {}
    for region in regions:
        rd, v = votes[region]
        frames.append(rd.frame.filter(pl.Series(v["mask"])).select("subject_id", *covariates))
        for s, label in zip(rd.subjects[v["mask"]], v["labels"]):
            rows.setdefault(str(s), label)
    subjects = sorted(rows)
    index = {s: i for i, s in enumerate(subjects)}
    E = np.full((len(subjects), len(regions), len(classes)), np.nan)
    for j, region in enumerate(regions):
        rd, v = votes[region]
        idx = np.array([index[str(s)] for s in rd.subjects[v["mask"]]], dtype=np.int64)
        count = np.bincount(idx, minlength=len(subjects))
        seen = count > 0
        for k, c in enumerate(v["classes"]):
            total = np.bincount(idx, weights=v["evidence"][:, k], minlength=len(subjects))
            E[seen, j, int(np.searchsorted(classes, str(c)))] = total[seen] / count[seen]
    first = pl.concat(frames, how="vertical_relaxed").unique("subject_id", keep="first", maintain_order=True)
    first = pl.DataFrame({"subject_id": subjects}).join(first, on="subject_id", how="left")
    specs = votes[regions[0]][0].specs
    C, labels = covariate_matrix(first, specs, covariates, cfg["min_value_count"])
    return {"regions": regions, "subjects": subjects, "index": index, "E": E, "C": C, "covariate_columns": labels,
            "labels": np.array([rows[s] for s in subjects], dtype=object), "classes": classes, "frame": first,
            "specs": specs, "covariates": covariates}


def leaning_images(rd: RegionData, v: dict, j: int, table: dict, cal: dict) -> list[str]:
    """Images of flagged subjects whose (covariate-adjusted) evidence in this region favours another value: under
    the mixture alternative with q = 1/2, the posterior that this region is one of the flipped ones exceeds 1/2."""
    out = []
    threshold = np.log((1 - MIXTURE_Q) / MIXTURE_Q)
    for uid, s in zip(rd.image_uids[v["mask"]], rd.subjects[v["mask"]]):
        i = table["index"][str(s)]
        if cal["flagged"][i] and cal["adjusted"][i, j] > threshold:
            out.append(str(uid))
    return out


def describe_flagged(table: dict, cal: dict, attribute: str) -> dict:
    """Who is flagged by recorded attributes: value split, medians of continuous covariates (flagged vs the other
    tested subjects), categorical covariates' counts among the flagged and shares among the rest."""
    flagged, rest = cal["flagged"], cal["tested"] & ~cal["flagged"]
    labels = table["labels"]
    out: dict = {"flagged": int(flagged.sum()), "tested": int(cal["tested"].sum()),
                 "by_value": {str(c): int((flagged & (labels == c)).sum()) for c in np.unique(labels)},
                 "tested_by_value": {str(c): int((cal["tested"] & (labels == c)).sum()) for c in np.unique(labels)},
                 "toward": {str(c): int((flagged & (cal["toward"] == c)).sum()) for c in table["classes"]},
                 "median": {}, "categories": {}}
    frame, specs = table["frame"], table["specs"]
    for name in table["covariates"]:
        spec = specs[name]
        col = frame[name]
        if spec.is_categorical:
            vals = np.array([None if x is None else str(x) for x in col.to_list()], dtype=object)
            cats = sorted({x for x in vals[flagged | rest] if x is not None})
            out["categories"][name] = {c: {"flagged": int((flagged & (vals == c)).sum()),
                                           "rest_share": float((rest & (vals == c)).sum() / max(rest.sum(), 1))}
                                       for c in cats}
        else:
            x = col.cast(pl.Float64).fill_null(np.nan).to_numpy()
            med = [float(np.nanmedian(x[m])) if np.isfinite(x[m]).any() else None for m in (flagged, rest)]
            out["median"][name] = {"flagged": med[0], "rest": med[1]}
    parts = [", ".join(f"{k} {c}" for c, k in out["by_value"].items())]
    parts += [f"median {name} {_num(m['flagged'])} vs {_num(m['rest'])}" for name, m in out["median"].items()]
    for name, cats in out["categories"].items():
        top = sorted(cats.items(), key=lambda kv: -kv[1]["flagged"])[:3]
        parts.append(f"{name}: " + ", ".join(f"{c} {d['flagged']} (rest {pct(d['rest_share'])})" for c, d in top))
    out["text"] = "; ".join(parts)
    return out


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


# ----------------------------------------------------------------------------------------------------------
# findings


def _region_finding(rd: RegionData, v: dict, j: int, attribute: str, table: dict, cal: dict) -> Finding:
    labels = v["labels"]
    n = len(labels)
    ids = leaning_images(rd, v, j, table, cal)
    chosen = set(ids)
    is_flagged = np.array([str(u) in chosen for u in rd.image_uids[v["mask"]]])
    by_class = {str(c): int((is_flagged & (labels == c)).sum()) for c in v["classes"]}
    rate_by_class = {str(c): float((is_flagged & (labels == c)).sum() / max((labels == c).sum(), 1))
                     for c in v["classes"]}
    paper = {"count": int(v["flags"].sum()), "rate": float(v["flags"].mean()),
             "by_class": {str(c): int((v["flags"] & (labels == c)).sum()) for c in v["classes"]}}
    test = cal["region_tests"][j]
    p = test["p"]
    details = {"folds": v["folds"], "count": len(ids), "by_class": by_class, "rate_by_class": rate_by_class,
               "space": "LDA log-likelihood ratio of another value given the covariates (PCA scores + covariates)",
               "covariates": v["covariates"], "flagged_subjects": int(cal["flagged"].sum()),
               **{f"test_{key}": value for key, value in test.items()},
               "paper_classified_as_other": paper}
    covs = ", ".join(table["covariates"]) or "no covariates"
    mean = test.get("mean_score_given_other_regions")
    lean = ("" if mean is None else
            f"{test.get('beyond_given_other_regions', 0)} beyond it given those regions, their mean lean here "
            f"{mean:+.2f} null sd, ")
    summary = (f"{len(ids)} of {n} {rd.region} images ({100 * len(ids) / max(n, 1):.1f}%) belong to the calibrated "
               f"{attribute}-discordant subgroup and lean to another {attribute} here given {covs} "
               f"({', '.join(f'{c}: {k}' for c, k in by_class.items())}); beyond the upper 2.5% of the region's "
               f"null (its classifier's error given the covariates): {test['beyond_null_upper_2.5%']} subjects vs "
               f"{test['expected_beyond']:.1f} expected, p={fmt_p(test['p_alone'])} (binomial); of the "
               f"{test['flagged_by_other_regions']} subjects the other regions flag, {lean}"
               f"p={fmt_p(test['p_with_other_regions'])} (Stouffer; the two Bonferroni-combined). What paper 003 "
               f"counted: {paper['count']} images ({pct(paper['rate'])}) classified towards another {attribute} by a "
               f"classifier on the embedding alone")
    return Finding("discordant_subgroup", rd.region, attribute, None, len(ids) / max(n, 1), "discordant_fraction", p,
                   n, ids, summary, details)


def _cross_region_finding(votes: dict, table: dict, cal: dict, profile: dict, attribute: str, cfg: dict,
                          rng: np.random.Generator) -> Finding | None:
    paper = co_occurrence(votes, _subject_flags(votes), attribute, cfg, rng, n_perm=PAPER_PERMUTATIONS)
    p = simes(cal["p"])
    if paper is None or p is None:
        return None
    regions, flagged = table["regions"], cal["flagged"]
    lean = cal["adjusted"] > np.log((1 - MIXTURE_Q) / MIXTURE_Q)
    multi = int((flagged & (lean.sum(1) >= 2)).sum())
    ids = [u for j, region in enumerate(regions) for u in leaning_images(*votes[region], j, table, cal)]
    k, n = int(flagged.sum()), int(cal["tested"].sum())
    covs = ", ".join(table["covariates"]) or "nothing recorded"
    pd = paper.details
    obs_multi, exp_multi = int(sum(pd["observed"][2:])), float(sum(pd["expected"][2:]))
    head = (f"{k} of {n} subjects ({pct(k / max(n, 1))}) look like another {attribute} across "
            f"{', '.join(regions)} beyond the per-region classifiers' error and their recorded {covs} "
            f"(mixture likelihood ratio of the regions against a null fitted to the cohort's bulk per recorded "
            f"{attribute}, BH q < {cfg['alpha']})")
    if k:
        head += f": {profile['text']}; {multi} of them lean to another {attribute} in >= 2 regions"
    else:
        head += f"; smallest BH-adjusted p {fmt_p(p)}"
    summary = (f"{head}. What paper 003 did: {obs_multi} subjects classified towards another {attribute} in >= 2 "
               f"regions by an embedding-only classifier vs {exp_multi:.2g} expected if regions were independent "
               f"({paper.effect_size:.1f}×, permutation p={fmt_p(paper.p_value)}), a comparison that also counts "
               f"traits shared by a subject's regions (height, body size) as a subgroup")
    details = dict(pd)
    details.update(p_independence=paper.p_value, paper_subjects=pd["subjects"],
                   subjects=[table["subjects"][i] for i in np.flatnonzero(flagged)], flagged=k, tested=n,
                   multi_region_flagged=multi, profile=profile, nulls=cal["nulls"],
                   covariates=table["covariates"], covariate_columns=table["covariate_columns"],
                   statistic=f"sum over regions of log({MIXTURE_Q} exp(e_r) + {1 - MIXTURE_Q})",
                   alpha=cfg["alpha"], q_min=p)
    return Finding("discordant_subgroup", ALL_REGIONS, attribute, "co-occurrence", paper.effect_size,
                   "observed_over_expected", p, n, ids, summary, details)


# ----------------------------------------------------------------------------------------------------------
# what paper 003 did: co-occurrence of per-region flags vs independent regions


def _subject_flags(votes: dict) -> dict[str, dict[str, bool]]:
    """subject -> region -> discordant (any of the subject's images of that region)."""
    table: dict[str, dict[str, bool]] = {}
    for region, (rd, v) in votes.items():
        for subject, flag in zip(rd.subjects[v["mask"]], v["flags"]):
            row = table.setdefault(str(subject), {})
            row[region] = bool(row.get(region, False) or flag)
    return table


def poisson_binomial(rates: np.ndarray) -> np.ndarray:
    """P(exactly j of the independent events happen), j = 0..len(rates)."""
    pmf = np.array([1.0])
    for p in rates:
        pmf = np.convolve(pmf, [1.0 - p, p])
    return pmf


def co_occurrence(votes: dict, by_subject: dict, attribute: str, cfg: dict, rng: np.random.Generator,
                  n_perm: int = 9999) -> Finding | None:
    """Paper 003's comparison: subjects with >= 2 flagged regions, observed vs expected under independence
    (Poisson-binomial), p from permuting each region's flags across subjects (exact for independence given the
    per-region counts). Valid for independence, not for "no subgroup": see the module docstring."""
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

"""The calibrated discordant subgroup: per-subject evidence of looking like another value of a protected attribute
(paper 003: sex) across body regions, tested against a null fitted to the cohort itself, given recorded covariates.

1. Evidence per region (`subgroup_evidence.region_evidence`): cross-fitted LDA log-likelihood ratios of the
   other value against the recorded one, given the recorded covariates.

2. Combination per subject (`mixture_statistic`): T = sum_r log(q e^{e_r} + 1 - q), q = 1/2, the likelihood
   ratio of "each region carries the other value's features with probability q" against "none does" (paper
   003's and the demo's subgroup: most, not all, regions flipped). Unlike the plain sum of e_r, one region that
   looks strongly like its own sex does not cancel two that look like the other (each term is >= log(1 - q)).

3. The null (`fit_null`), per recorded value a and other value b (sex: one per recorded sex): the vector of a
   subject's region evidence is location(cov) + eps, eps elliptical with covariance Sigma. The location is a
   linear regression on the covariates plus the median residual of the subject's nearest neighbours in covariate
   space (what the classifiers' covariate terms left over: shrinkage under-adjusts, the embedding may follow
   body size nonlinearly); Sigma holds the classifiers' error per region (diagonal) and the correlation between
   regions of ordinary subjects (off-diagonal: traits nobody recorded that move all regions alike). Fitted
   robustly so that the subgroup does not widen its own null: minimum covariance determinant (MCD) of the
   residuals, subjects outside its 97.5% ellipsoid dropped, location and covariance refitted on the rest
   (reweighted MCD, consistency- and degrees-of-freedom-corrected). The radial law (Gaussian or a multivariate
   t by maximum likelihood; t tails of at most n - p - R degrees of freedom for the estimated parameters) is
   fitted on the subjects on the side *opposite* to any subgroup (evidence below the null's centre): a centrally
   symmetric null has half of itself there, a subgroup almost nothing. This
   is Efron's empirical null (JASA 2004) for a vector of correlated scores: the null is measured on the cohort's
   bulk, not assumed from the independence of regions.

4. Per-subject p-value: the subject's evidence moved to the reference covariates (mu_bar + residual) gives T;
   p = (1 + #{T_null >= T}) / (B + 1) over B Monte-Carlo draws of mu_bar + eps (the regions the subject has),
   the smallest over the other values b, Bonferroni-corrected for K - 1 of them (sex: none). Benjamini-Hochberg
   over all tested subjects at `alpha` gives the flagged subjects.

What paper 003 did is kept beside it (`subgroups.co_occurrence`): per-region flags of a classifier on the
embedding alone, multi-region co-occurrence vs the Poisson-binomial expectation of independent regions. That
comparison counts any shared trait (height) as a subgroup; the flagged set comes from the procedure above.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import binomtest, chi2, norm
from scipy.stats import f as f_dist
from scipy.stats import t as t_dist
from sklearn.covariance import MinCovDet
from sklearn.neighbors import NearestNeighbors

from cohortlens.analysis.stats import bh_adjust

MIXTURE_Q = 0.5  # prior share of a subgroup member's regions that carry the other value's features
MIN_NULL_SUBJECTS = 30  # subjects of one recorded value needed to fit its null (per region, and complete ones)
EXCEEDANCE = 0.025  # the per-region count test: subjects beyond their null's upper 2.5% point
T_DF_GRID = (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0, 300.0)


# ----------------------------------------------------------------------------------------------------------
# 2. combination, 3. null


def mixture_statistic(x: np.ndarray, q: float = MIXTURE_Q) -> np.ndarray:
    """sum_r log(q e^{x_r} + 1 - q) over the last axis, NaN (a missing region) counting 0."""
    missing = np.isnan(x)
    terms = np.logaddexp(np.log(q) + np.where(missing, 0.0, x), np.log1p(-q))
    return np.where(missing, 0.0, terms).sum(axis=-1)


def _ols(D: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    A = D[rows]
    ridge = 1e-6 * len(A) * np.eye(D.shape[1])
    ridge[0, 0] = 0.0  # never shrink the intercept
    return np.linalg.solve(A.T @ A + ridge, A.T @ y[rows])


def local_location(resid: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Per subject, the median residual of its nearest neighbours in covariate space (itself left out): what a
    linear location leaves at the covariates' extremes (body size rendered nonlinearly, BMI = weight / height^2
    against linear height and weight terms) is shared by all regions of an extreme subject and by its
    neighbours alike, not by the subject alone."""
    n = len(resid)
    k = int(np.clip(n // 8, 15, 50))
    idx = NearestNeighbors(n_neighbors=min(k + 1, n)).fit(C).kneighbors(C, return_distance=False)[:, 1:]
    return np.nanmedian(resid[idx], axis=1)


def squared_distance(x: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis length of each row of x (already centred) under a precision (inverse covariance)."""
    return np.einsum("ij,jk,ik->i", x, precision, x)


def _mcd_inliers(resid: np.ndarray, present_r: np.ndarray, seed: int) -> np.ndarray:
    """Subjects inside the 97.5% ellipsoid of the MCD of the complete rows (sub-blocks for missing regions)."""
    mcd = MinCovDet(random_state=seed).fit(resid[present_r.all(1)])
    inlier = np.ones(len(resid), bool)
    for pattern in {tuple(p) for p in present_r}:
        rows = (present_r == pattern).all(1)
        idx = np.flatnonzero(pattern)
        c = resid[np.ix_(rows, idx)] - mcd.location_[idx]
        d2 = squared_distance(c, np.linalg.pinv(mcd.covariance_[np.ix_(idx, idx)]))
        inlier[rows] = d2 <= chi2.ppf(0.975, len(idx))
    return inlier


def fit_null(E: np.ndarray, C: np.ndarray, seed: int) -> dict | None:
    """Robust null of one recorded value's subjects (module docstring, step 3): E (subjects x regions, NaN =
    missing region) = linear + local location in the covariates C + elliptical noise. None when too few."""
    n, R = E.shape
    present_r = ~np.isnan(E)
    complete = present_r.all(1)
    if complete.sum() < max(MIN_NULL_SUBJECTS, 5 * R) or (present_r.sum(0) < MIN_NULL_SUBJECTS).any():
        return None
    # the location model may use only as many covariate columns as the subjects carry comfortably
    D = np.hstack([np.ones((n, 1)), C[:, : max(0, min(C.shape[1], n // 10))]])
    continuous = np.array([len(np.unique(c)) > 2 for c in C.T], bool)  # not the one-hot sites
    inlier = np.ones(n, bool)
    for _ in range(2):
        beta = np.column_stack([_ols(D, np.nan_to_num(E[:, r]), inlier & present_r[:, r]) for r in range(R)])
        resid = E - D @ beta
        inlier = _mcd_inliers(resid, present_r, seed)
    if continuous.any():
        local = local_location(np.where(inlier[:, None], resid, np.nan), C[:, continuous])
        resid = resid - np.nan_to_num(local)
        inlier = _mcd_inliers(resid, present_r, seed)
    keep = inlier & complete
    # reweighting step of the MCD: the inliers' covariance, corrected for the 97.5% truncation of a Gaussian
    # and for the location model's degrees of freedom
    n_fit, p_fit = int(keep.sum()), D.shape[1]
    sigma = np.cov(resid[keep], rowvar=False).reshape(R, R)
    sigma *= 0.975 / chi2.cdf(chi2.ppf(0.975, R), R + 2) * n_fit / max(n_fit - p_fit, 1)
    shift = resid[keep].mean(0)
    resid = resid - shift
    mu_bar = (E - resid)[keep].mean(0)  # the inliers' mean location: the reference covariates
    # The radial law (how heavy the tails are) from the subjects on the side opposite to any subgroup.
    rc = resid[complete]
    d2 = squared_distance(rc, np.linalg.pinv(sigma))
    df, scale = radial_t(d2[(rc / np.sqrt(np.diag(sigma))).sum(1) <= 0], R)
    # A null estimated from n_fit subjects predicts a new one with Student-t tails of n_fit - p - R degrees of
    # freedom (parameter uncertainty; matters for classes of a hundred, not of thousands).
    df = float(min(df, max(n_fit - p_fit - R, 3)))
    return {"beta": beta, "sigma": sigma, "mu_bar": mu_bar, "inlier": inlier, "resid": resid, "n": n, "df": df,
            "scale": scale}


def radial_t(d2: np.ndarray, R: int) -> tuple[float, float]:
    """Maximum-likelihood radial law of squared Mahalanobis distances: Gaussian (d2 ~ s chi2_R, df = inf) or a
    multivariate t (d2 ~ s R F(R, df)), over a grid of df, the scale s by a bounded 1-d search. No preference
    for the Gaussian: with a few hundred distances a heavier tail is the cautious reading."""
    d2 = d2[np.isfinite(d2) & (d2 > 0)]
    if len(d2) < MIN_NULL_SUBJECTS // 2:
        return float("inf"), 1.0

    def fit(logpdf) -> tuple[float, float]:
        res = minimize_scalar(lambda log_s: -(logpdf(d2 / np.exp(log_s)) - log_s).sum(), bounds=(-3.0, 3.0),
                              method="bounded")
        return -float(res.fun), float(np.exp(res.x))

    ll, scale = fit(chi2(R).logpdf)
    best = (ll, float("inf"), scale)
    for df in T_DF_GRID:
        ll, scale = fit(lambda x, df=df: f_dist(R, df).logpdf(x / R) - np.log(R))
        if ll > best[0]:
            best = (ll, df, scale)
    return best[1], best[2]


# ----------------------------------------------------------------------------------------------------------
# 4. p-values, the flagged subjects, the per-region tests


def null_pvalues(null: dict, rng: np.random.Generator, draws: int, drop: int | None = None) -> np.ndarray:
    """Monte-Carlo p-value of the mixture statistic per subject over its regions (without region `drop`): the
    subject's evidence at the reference covariates (mu_bar + residual) against mu_bar + draws of the null."""
    resid = null["resid"].copy()
    if drop is not None:
        resid[:, drop] = np.nan
    T = mixture_statistic(null["mu_bar"] + resid)
    R = resid.shape[1]
    w, V = np.linalg.eigh(null["sigma"])
    eps = (rng.standard_normal((draws, R)) * np.sqrt(np.clip(w, 0, None))) @ V.T * np.sqrt(null["scale"])
    if np.isfinite(null["df"]):  # multivariate t: a Gaussian over a chi2_df / df radius
        eps *= np.sqrt(null["df"] / rng.chisquare(null["df"], size=(draws, 1)))
    sim = null["mu_bar"] + eps
    p = np.full(len(resid), np.nan)
    present_r = ~np.isnan(resid)
    for pattern in {tuple(x) for x in present_r}:
        if not any(pattern):
            continue
        rows = (present_r == pattern).all(1)
        t_null = np.sort(mixture_statistic(np.where(np.array(pattern), sim, np.nan)))
        exceed = draws - np.searchsorted(t_null, T[rows], side="left")
        p[rows] = (1.0 + exceed) / (draws + 1.0)
    return p


def marginal_z(null: dict) -> np.ndarray:
    """Each region's residual in units of its null scale, subjects x regions (NaN where missing)."""
    sd = np.sqrt(np.clip(np.diag(null["sigma"]) * null["scale"], 1e-12, None))
    return null["resid"] / sd


def _given_other_regions(null: dict, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Region j's residual beyond what the other regions predict, in units of its conditional scale, and the
    other regions' squared Mahalanobis distance (both NaN where a region is missing)."""
    others = [k for k in range(null["sigma"].shape[0]) if k != j]
    S = null["sigma"] * null["scale"]
    S_oo_inv = np.linalg.inv(S[np.ix_(others, others)])
    b = S_oo_inv @ S[others, j]
    var = S[j, j] - S[j, others] @ b
    r = null["resid"][:, others]
    z = (null["resid"][:, j] - r @ b) / np.sqrt(max(var, 1e-12))
    return z, squared_distance(r, S_oo_inv)


def conditional_z(null: dict, j: int) -> np.ndarray:
    """Region j's residual beyond what the subject's other regions predict under the null (the between-region
    correlation of ordinary subjects), in units of its conditional scale; NaN where a region is missing."""
    return _given_other_regions(null, j)[0]


def conditional_score(null: dict, j: int) -> np.ndarray:
    """`conditional_z` as a standard normal score under the null, given the other regions. Under a multivariate
    t null (scale matrix S, df) region j given the other R - 1 is t with df + R - 1 degrees of freedom and its
    scale widened by sqrt((df + d2) / (df + R - 1)), d2 the other regions' squared Mahalanobis distance: a
    subject whom the other regions place far out is less predictable here too, and exactly those are the ones
    the other regions flag. Gaussian null (df = inf): the conditional z itself."""
    z, d2 = _given_other_regions(null, j)
    df, R = null["df"], null["sigma"].shape[0]
    if not np.isfinite(df):
        return z
    u = z * np.sqrt((df + R - 1) / (df + d2))
    return norm.isf(t_dist.sf(u, df + R - 1))


def _bh(p: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    q = bh_adjust(p)
    return q, np.nan_to_num(q, nan=1.0) < alpha


def _smallest(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over the last axis: the smallest finite p (inf where none) and its index."""
    finite = np.where(np.isfinite(p), p, np.inf)
    best = np.argmin(finite, axis=-1)
    return np.take_along_axis(finite, best[..., None], axis=-1)[..., 0], best


def calibrated_subgroup(E: np.ndarray, C: np.ndarray, labels: np.ndarray, classes: np.ndarray, alpha: float,
                        rng: np.random.Generator) -> dict:
    """Per recorded value a and other value b: robust null of a's subjects' evidence towards b, Monte-Carlo
    p-values; a subject's p is the smallest over b, Bonferroni-corrected for the K - 1 other values (sex: one
    null per recorded sex, no correction); then BH over every tested subject.

    Per region j, two tests of "this region's images lean to another value beyond its classifier's error":
    alone (more subjects beyond their null's upper 2.5% point in this region than the 2.5% expected: a one-sided
    binomial test, a count at a moderate quantile rather than the single most extreme p-value, which would trust
    the fitted null's far tail) and with the subject's other regions (of the subjects that the *other* regions
    flag, leave-region-out BH, region j's evidence *given* their other regions, i.e. beyond what the
    between-region correlation predicts, as a normal score under the null (`conditional_score`), summed over
    them: Stouffer's z. A set chosen without region j leaves each score standard normal under the null, and
    the sum uses every chosen subject's lean where a count at the 2.5% point used only the few past it (a
    subgroup region read at d' 1-2 puts most of its subjects below that point)); the region's p is the
    Bonferroni combination of the two.

    E: subjects x regions x values. Returns per subject: p (NaN = untested), q (BH), flagged, tested, `toward`
    (the value it looks like), the adjusted evidence towards it (subjects x regions); per region its tests; per
    (a, b) the fitted null's summary."""
    n, R, K = E.shape
    p_ab = np.full((n, K), np.nan)
    p_alone, p_without, score_cond, adjusted = (np.full((n, R, K), np.nan) for _ in range(4))
    nulls = {}
    # resolution well below the BH threshold of the first rejection (alpha / n)
    draws = int(np.clip(20 * n / alpha, 100_000, 2_000_000))
    for ia, a in enumerate(classes):
        rows = np.flatnonzero(labels == a)
        for ib, b in enumerate(classes):
            if ia == ib or not len(rows):
                continue
            null = fit_null(E[rows, :, ib], C[rows], int(rng.integers(2**31)))
            if null is None:
                continue
            p_ab[rows, ib] = null_pvalues(null, rng, draws)
            adjusted[rows, :, ib] = null["mu_bar"] + null["resid"]
            p_alone[rows, :, ib] = t_dist.sf(marginal_z(null), null["df"])  # df = inf: the Gaussian
            for j in range(R if R >= 2 else 0):
                p_without[rows, j, ib] = null_pvalues(null, rng, draws // 4, drop=j)
                score_cond[rows, j, ib] = conditional_score(null, j)
            sd = np.sqrt(np.diag(null["sigma"]))
            corr = null["sigma"] / np.outer(sd, sd)
            nulls[str(a) if K == 2 else f"{a}→{b}"] = {
                "subjects": len(rows), "inliers": int(null["inlier"].sum()), "mean_evidence": null["mu_bar"].tolist(),
                "sd_evidence": sd.tolist(), "between_region_correlation": corr[np.triu_indices(R, 1)].tolist(),
                "draws": draws, "tail_df": null["df"], "radial_scale": null["scale"]}
    bonferroni = K - 1
    rows = np.arange(n)
    smallest, best = _smallest(p_ab)
    tested = np.isfinite(smallest)
    p = np.where(tested, np.minimum(1.0, bonferroni * smallest), np.nan)
    q, flagged = _bh(p, alpha)
    region_tests = []
    for j in range(R):
        alone = bonferroni * _smallest(p_alone[:, j])[0]
        seen = np.isfinite(alone)
        beyond = int((alone[seen] <= EXCEEDANCE).sum())
        test = {"p_alone": float(binomtest(beyond, int(seen.sum()), EXCEEDANCE, alternative="greater").pvalue)
                if seen.any() else None, "beyond_null_upper_2.5%": beyond,
                "expected_beyond": float(EXCEEDANCE * seen.sum()), "p_with_other_regions": None,
                "flagged_by_other_regions": 0}
        if R >= 2:
            without, b_j = _smallest(p_without[:, j])  # the other value chosen without region j
            _, by_others = _bh(np.where(np.isfinite(without), np.minimum(1.0, bonferroni * without), np.nan), alpha)
            # the other value b_j was chosen without region j: its score needs no correction for the choice
            score = score_cond[rows, j, b_j]
            chosen = by_others & np.isfinite(score)
            test["flagged_by_other_regions"] = int(chosen.sum())
            if chosen.any():
                test["beyond_given_other_regions"] = int((score[chosen] >= norm.isf(EXCEEDANCE)).sum())
                test["mean_score_given_other_regions"] = float(score[chosen].mean())
                test["p_with_other_regions"] = float(norm.sf(score[chosen].sum() / np.sqrt(chosen.sum())))
        ps = [x for x in (test["p_alone"], test["p_with_other_regions"]) if x is not None]
        test["p"] = min(1.0, len(ps) * min(ps)) if ps else None
        region_tests.append(test)
    return {"p": p, "q": q, "flagged": flagged, "tested": tested, "adjusted": adjusted[rows, :, best],
            "toward": np.array([str(classes[i]) for i in best], dtype=object), "region_tests": region_tests,
            "nulls": nulls}


def simes(p: np.ndarray) -> float | None:
    """Global p-value of 'some of these null hypotheses are false' (= the smallest BH-adjusted p)."""
    p = np.sort(p[np.isfinite(p)])
    if not len(p):
        return None
    return float(min(1.0, np.min(len(p) * p / np.arange(1, len(p) + 1))))

"""When did a protocol change start? A change point on the embedding's date score within one stratum.

A date effect within a stratum (site, scanner) is first found as a leak: out-of-fold ridge predictions of the
date from that stratum's images (the *date score*) correlate with the recorded date. That says images that look
later are dated later, not when the change began, nor whether it was a step (a new protocol from a day on)
or a gradual drift (ageing coil, slowly changed software). Here the date score is modelled against the date
two ways:

* **step**: two means, before and after an onset t (t searched over the dates between the 5th and 95th
  percentile, so each side keeps at least 5 % of the images);
* **drift**: a straight line in the date.

The onset is the t of the least-squares step. The **shape** is the model with the lower BIC (step: two means
and t, 3 parameters; drift: intercept and slope, 2), so a step is called only when its extra parameter pays for
itself. The **p-value** `p_step` tests "step beyond drift" and is reported beside it: the null is a linear drift
with exchangeable residuals, so the residuals of the drift fit are permuted (Freedman–Lane) and the best step is
searched again on them; p = share of permutations whose step explains at least as much of the drift's residual
variance. This null is not the one that selected the stratum (that was "no date effect at all"), so selection
does not make it small by construction; in a small stratum (tens of images) it has little power, which is why
the shape is chosen by BIC rather than by this test. The **interval** is the 2.5–97.5 % range of the onset over
subject bootstrap resamples.
"""

from __future__ import annotations

import numpy as np

from cohortlens.analysis.discover.core import date_str

MIN_SIDE = 0.05  # share of the images each side of an onset must keep


def _candidates(days_sorted: np.ndarray) -> np.ndarray:
    """Positions k (split between sorted rows k-1 and k) where the date changes, both sides ≥ MIN_SIDE."""
    n = len(days_sorted)
    lo, hi = max(1, int(np.ceil(MIN_SIDE * n))), min(n - 1, int(np.floor((1 - MIN_SIDE) * n)))
    k = np.arange(lo, hi + 1)
    return k[days_sorted[k] > days_sorted[k - 1]] if len(k) else k


def best_step(days: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """(onset day, explained sum of squares) of the least-squares two-mean step of `score` over `days`; the
    onset is the first date of the later segment. (nan, 0) when no split keeps both sides."""
    order = np.argsort(days, kind="stable")
    d, s = days[order], score[order]
    ks = _candidates(d)
    if len(ks) == 0:
        return float("nan"), 0.0
    n, csum, total = len(s), np.cumsum(s), s.sum()
    left_mean = csum[ks - 1] / ks
    right_mean = (total - csum[ks - 1]) / (n - ks)
    mean = total / n
    between = ks * (left_mean - mean) ** 2 + (n - ks) * (right_mean - mean) ** 2
    j = int(np.argmax(between))
    return float(d[ks[j]]), float(between[j])


def _step_gains(days: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Best step's explained sum of squares for every column of residuals R (n, m), vectorised."""
    order = np.argsort(days, kind="stable")
    d, R = days[order], R[order]
    ks = _candidates(d)
    if len(ks) == 0:
        return np.zeros(R.shape[1])
    n = len(d)
    csum, total = np.cumsum(R, axis=0), R.sum(0)
    mean = total / n
    left = csum[ks - 1] / ks[:, None]
    right = (total[None, :] - csum[ks - 1]) / (n - ks)[:, None]
    between = ks[:, None] * (left - mean) ** 2 + (n - ks)[:, None] * (right - mean) ** 2
    return between.max(0)


def change_point(days: np.ndarray, score: np.ndarray, units: np.ndarray | None = None, *,
                 permutations: int = 199, bootstraps: int = 200,
                 rng: np.random.Generator | None = None) -> dict:
    """Onset of a date effect from (date, date score) pairs of one stratum.

    Returns onset (ISO date), interval (ISO dates, 95 %), p_step (step beyond linear drift, permutation),
    shape ('step' or 'drift'), r2_step and r2_drift (shares of the score's variance), n."""
    rng = rng or np.random.default_rng(0)
    days, score = np.asarray(days, float), np.asarray(score, float)
    ok = np.isfinite(days) & np.isfinite(score)
    days, score = days[ok], score[ok]
    units = np.arange(len(days)).astype(str) if units is None else np.asarray(units)[ok].astype(str)
    n = len(days)
    sst = float(((score - score.mean()) ** 2).sum())
    if n < 10 or sst <= 0 or len(np.unique(days)) < 3:
        return {"onset": None, "interval": None, "p_step": None, "shape": "undetermined", "n": int(n)}
    onset, _ = best_step(days, score)
    # drift: least-squares line; the step is tested on what the line leaves
    X = np.column_stack([np.ones(n), days - days.mean()])
    coef, *_ = np.linalg.lstsq(X, score, rcond=None)
    fitted = X @ coef
    resid = score - fitted
    observed = float(_step_gains(days, resid[:, None])[0])
    perm = np.stack([resid[rng.permutation(n)] for _ in range(permutations)], axis=1)
    null = _step_gains(days, perm)
    p_step = float((1 + np.sum(null >= observed - 1e-12)) / (1 + permutations))
    # onset interval: resample whole subjects
    uniq, inverse = np.unique(units, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == u) for u in range(len(uniq))]
    boot = []
    for _ in range(bootstraps):
        pick = np.concatenate([rows_of[u] for u in rng.integers(0, len(uniq), len(uniq))])
        t, _ = best_step(days[pick], score[pick])
        if np.isfinite(t):
            boot.append(t)
    lo, hi = (np.quantile(boot, [0.025, 0.975]) if boot else (np.nan, np.nan))
    _, gain_raw = best_step(days, score)
    sse_step, sse_drift = max(sst - gain_raw, 1e-12), max(float((resid ** 2).sum()), 1e-12)
    bic_step = n * np.log(sse_step / n) + 3 * np.log(n)
    bic_drift = n * np.log(sse_drift / n) + 2 * np.log(n)
    return {
        "onset": date_str(onset), "interval": [date_str(lo), date_str(hi)] if boot else None,
        "p_step": p_step, "shape": "step" if bic_step < bic_drift else "drift",
        "bic_step": float(bic_step), "bic_drift": float(bic_drift),
        "r2_step": gain_raw / sst, "r2_drift": float(((fitted - score.mean()) ** 2).sum() / sst),
        "permutations": int(permutations), "bootstraps": len(boot), "n": int(n),
    }


def describe(cp: dict) -> str:
    """'a step from 2015-06-01 (95 % interval 2015-05-02 … 2015-07-11; step beyond drift p = 0.005)' or
    'a gradual drift (no step beyond a linear trend, p = 0.41)'."""
    if cp.get("onset") is None:
        return "onset undetermined (too few dated images)"
    if cp["shape"] == "step":
        iv = cp.get("interval") or ["?", "?"]
        return (f"a step from {cp['onset']} (95 % interval {iv[0]} … {iv[1]}; step beyond drift "
                f"p = {cp['p_step']:.2g})")
    return f"a gradual drift (a line fits as well as a step; step beyond drift p = {cp['p_step']:.2g})"

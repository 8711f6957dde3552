"""The drift along the date (non_iid kind): cleanlab's kNN graph and statistic with a p-value from dates permuted
within the strata. Checked: the statistic is cleanlab's; random date orders give uniform p-values (cleanlab's own
p-value does not); a site that recruited in one period is no drift; a drift within one site is one, named after
that site."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cohortlens.analysis.discover.core import RegionData
from cohortlens.analysis.discover.drift import date_drift, drift_test, knn_neighbours, order_statistic
from cohortlens.analysis.discover.settings import settings
from cohortlens.analysis.table import AttributeSpec

SPECS = {
    "site": AttributeSpec("site", "categorical", "acquisition", categories=tuple("ABCD")),
    "vendor": AttributeSpec("vendor", "categorical", "acquisition", categories=("X", "Y")),
    "date": AttributeSpec("date", "date", "acquisition"),
}
START = 16222  # 2014-06-01


def _recruited_in_periods(n=400, seed=0, drift_in_a=False) -> RegionData:
    """Site B looks different and recruited only in the first year, sites A, C, D over three years: ordered by
    date, the kNN graph follows site B. `drift_in_a` adds a real drift within site A."""
    rng = np.random.default_rng(seed)
    site = np.array(list("ABCD"))[rng.integers(0, 4, n)]
    days = np.where(site == "B", rng.integers(START, START + 365, n), rng.integers(START, START + 3 * 365, n))
    Z = rng.normal(size=(n, 12))
    Z[site == "B", :3] += 2.0
    if drift_in_a:
        Z[site == "A", 3] += 4.0 * (days[site == "A"] - START) / (3 * 365)
    frame = pl.DataFrame({
        "image_uid": [f"S{i:04d}/neck" for i in range(n)], "subject_id": [f"S{i:04d}" for i in range(n)],
        "region": ["neck"] * n, "site": site.tolist(), "vendor": np.where(rng.random(n) < 0.5, "X", "Y").tolist(),
        "date": pl.Series(days.astype("datetime64[D]")),
    })
    return RegionData("neck", frame, Z, SPECS, 12)


def test_the_statistic_is_cleanlabs():
    from cleanlab.datalab.internal.issue_manager.noniid import NonIIDIssueManager

    X = np.random.default_rng(0).normal(size=(150, 6))
    X[:, 0] += np.linspace(0, 3, 150)  # rows in order drift
    neighbours = knn_neighbours(X)
    assert neighbours.shape == (150, 10)
    manager = NonIIDIssueManager.__new__(NonIIDIssueManager)
    manager.N, manager.background_distribution = 150, None
    distances = np.abs(np.arange(150)[:, None] - neighbours)
    expected = manager._get_statistics(distances)["ks"]
    assert order_statistic(np.arange(150), neighbours) == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
def test_random_date_orders_give_uniform_p_values():
    """The null: an embedding with structure (clusters, a gradient) and dates that are unrelated to it. The
    permutation p-values of 40 random date orders are uniform (few below 0.05, none below 0.005)."""
    rng = np.random.default_rng(1)
    n = 200
    X = rng.normal(size=(n, 8))
    X[: n // 3, :2] += 3.0
    X[:, 2] += np.linspace(-2, 2, n)
    ps = np.array([drift_test(X, rng.permutation(n).astype(float), None, 199, rng)[1] for _ in range(40)])
    assert (ps <= 0.05).sum() <= 5, np.sort(ps)[:8]
    assert ps.min() > 0.005 and np.median(ps) > 0.3, np.sort(ps)


def test_a_site_that_recruited_in_one_period_is_no_drift():
    cfg = settings({"drift_permutations": 199})
    rng = np.random.default_rng(0)
    rd = _recruited_in_periods()
    days = rd.values("date")
    # without the strata, the date order follows site B (what cleanlab's marginal test reported)
    assert drift_test(rd.Zc, days, None, 199, rng)[1] <= 0.005
    drift, = date_drift(rd, cfg, rng)
    assert drift.details["given"] == ["site", "vendor"]
    assert drift.p_value > 0.05, drift.summary


def test_a_drift_within_one_site_is_found_and_named_after_it():
    """Found in every cohort; named after site A unless the other sites' test without A is significant by
    chance (its null holds there, so that happens at the rate alpha): at least 4 of 5 cohorts."""
    cfg = settings({"drift_permutations": 199})
    found = [date_drift(_recruited_in_periods(seed=seed, drift_in_a=True), cfg, np.random.default_rng(0))[0]
             for seed in range(5)]
    assert all(f.p_value <= 0.01 for f in found), [f.p_value for f in found]
    named = [(f.attribute, f.value) for f in found]
    assert named.count(("site×date", "A")) >= 4 and set(named) <= {("site×date", "A"), ("date", None)}, named


def test_images_without_a_date_are_left_out():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5))
    days = np.where(np.arange(60) < 45, rng.permutation(60).astype(float), np.nan)
    X[45:] += 5.0  # undated images that look alike would be a "late" cluster if they were ordered last
    assert drift_test(X, days, None, 99, rng)[1] > 0.05

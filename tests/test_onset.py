"""Onsets of date effects within a stratum: a step is dated, a drift is called a drift, a null is no step."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from test_discover import synthetic_region

from cohortlens.analysis.discover import leaks as discover_leaks
from cohortlens.analysis.discover.onset import change_point, describe
from cohortlens.analysis.discover.settings import settings

START = 16222  # 2014-06-01
STEP = START + 365  # 2015-06-01


def _days(n, rng):
    return rng.integers(START, START + 3 * 365, n).astype(float)


def test_a_step_is_dated_within_days_with_an_interval_that_covers_it():
    rng = np.random.default_rng(0)
    days = _days(400, rng)
    score = (days >= STEP) * 1.0 + rng.normal(0, 0.5, len(days))
    cp = change_point(days, score, rng=np.random.default_rng(1))
    onset = dt.date.fromisoformat(cp["onset"])
    assert abs((onset - dt.date(2015, 6, 1)).days) <= 30, cp
    lo, hi = (dt.date.fromisoformat(d) for d in cp["interval"])
    assert lo <= dt.date(2015, 6, 1) <= hi and (hi - lo).days < 200, cp
    assert cp["shape"] == "step" and cp["p_step"] <= 0.01
    assert describe(cp).startswith(f"a step from {cp['onset']}")


def test_a_linear_drift_is_not_called_a_step():
    rng = np.random.default_rng(2)
    days = _days(400, rng)
    score = (days - days.mean()) / 365 + rng.normal(0, 0.5, len(days))
    cp = change_point(days, score, rng=np.random.default_rng(3))
    assert cp["shape"] == "drift" and cp["p_step"] > 0.05 and cp["r2_drift"] > 0.3, cp
    assert describe(cp).startswith("a gradual drift")


def test_step_test_is_calibrated_under_pure_noise():
    ps = []
    for rep in range(20):
        rng = np.random.default_rng(100 + rep)
        days = _days(200, rng)
        ps.append(change_point(days, rng.normal(size=len(days)), permutations=99, bootstraps=10,
                               rng=np.random.default_rng(rep))["p_step"])
    assert sum(p <= 0.05 for p in ps) <= 3 and np.mean(ps) > 0.3, ps


def test_too_few_dates_give_no_onset():
    cp = change_point(np.array([1.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0]))
    assert cp["onset"] is None and describe(cp).startswith("onset undetermined")


def test_within_site_leak_reports_the_protocol_change_onset():
    rd = synthetic_region(n=400, date_effect="site", seed=3)
    cfg = settings({"permutations": 99, "onset_bootstraps": 100})
    found = discover_leaks.site_date_leaks(rd, cfg, np.random.default_rng(0))
    b = next(f for f in found if f.value == "B")
    assert b.attribute == "site×date" and b.p_value <= 0.02
    assert b.details["shape"] == "step", b.summary
    gap = abs((dt.date.fromisoformat(b.details["onset"]) - dt.date(2015, 6, 1)).days)
    assert gap <= 90, b.summary
    assert "within site B" in b.summary and "a step from" in b.summary
    # the flagged images are those from the onset on
    assert len(b.sample_ids) > 0 and len(b.sample_ids) < b.n


@pytest.mark.parametrize("attribute", ["vendor"])
def test_interactions_are_named_after_their_own_stratum(attribute):
    """A date step within scanner X (not within a site) is named vendor×date = X, said 'within vendor X'."""
    import polars as pl

    from cohortlens.analysis.discover.core import RegionData
    from cohortlens.analysis.table import AttributeSpec

    rd = synthetic_region(n=400, seed=4)
    rng = np.random.default_rng(4)
    vendor = np.array(["X", "Y"])[rng.integers(0, 2, rd.n)]
    days = rd.values("date")
    Z = rd.Z.copy()
    Z[(vendor == "X") & (days >= STEP), 1] += 4.0
    specs = {**rd.specs, attribute: AttributeSpec(attribute, "categorical", "acquisition", categories=("X", "Y"))}
    rd = RegionData(rd.region, rd.frame.with_columns(pl.Series(attribute, vendor.tolist())), Z, specs, Z.shape[1])
    cfg = settings({"permutations": 99, "onset_bootstraps": 50})
    found = discover_leaks.site_date_leaks(rd, cfg, np.random.default_rng(0))
    x = next(f for f in found if f.attribute == f"{attribute}×date" and f.value == "X")
    assert x.p_value <= 0.02 and f"within {attribute} X" in x.summary
    assert not any("within site" in f.summary for f in found if f.attribute == f"{attribute}×date")

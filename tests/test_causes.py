"""Root causes: echoes of a correlated attribute's effect are folded under it; real effects survive; a null
cohort gives nothing to fold. Synthetic per-region embeddings with correlated acquisition attributes."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cohortlens.analysis.discover import clusters as discover_clusters
from cohortlens.analysis.discover import leaks as discover_leaks
from cohortlens.analysis.discover.causes import ROOT_DOUBT, explain_by_roots, explain_echoes
from cohortlens.analysis.discover.conditional import cmh_greater, stratum_labels
from cohortlens.analysis.discover.core import (
    MOSTLY_INSIDE,
    RegionData,
    adjust,
    assign_ids,
    confine_to_any_stratum,
)
from cohortlens.analysis.discover.dated_causes import MIN_EXPLAINED_SHARE, explained_share
from cohortlens.analysis.discover.settings import settings
from cohortlens.analysis.table import AttributeSpec

SPECS = {
    "site": AttributeSpec("site", "categorical", "acquisition", categories=tuple("ABCD")),
    "vendor": AttributeSpec("vendor", "categorical", "acquisition", categories=("X", "Y")),
    "date": AttributeSpec("date", "date", "acquisition"),
    "sex": AttributeSpec("sex", "categorical", "protected", categories=("F", "M")),
    "weight": AttributeSpec("weight", "continuous", "protected"),
}
START = 16222  # 2014-06-01
STEP = START + 365


def neck_region(Z: np.ndarray, specs: dict, **columns) -> RegionData:
    """A synthetic neck region: one image per subject, the given attribute columns and embedding."""
    n = len(Z)
    frame = pl.DataFrame({"image_uid": [f"S{i:04d}/neck" for i in range(n)],
                          "subject_id": [f"S{i:04d}" for i in range(n)], "region": ["neck"] * n, **columns})
    return RegionData("neck", frame, Z, specs, 12)


def confounded_region(n=500, seed=0, vendor_effect=False, protocol_change=False, permute=False,
                      early_site: str | None = None) -> RegionData:
    """Site B's images are shifted (a real site effect). Vendor X is bought mostly by site B (85 % of B,
    25 % elsewhere) and site B's subjects are heavier: vendor and weight leak marginally only through site B.
    `vendor_effect` adds a real effect of vendor X; `protocol_change` a step in site B from 2015-06-01;
    `early_site` (C, say) a site with a look of its own that recruited in the first year only and bought vendor X
    as often as site B; `permute` permutes every acquisition label across subjects (a null cohort)."""
    rng = np.random.default_rng(seed)
    site = np.array(list("ABCD"))[rng.integers(0, 4, n)]
    vendor = np.where(rng.random(n) < np.where(np.isin(site, ["B", early_site]), 0.85, 0.25), "X", "Y")
    weight = rng.normal(75, 10, n) + np.where(site == "B", 12.0, 0.0)
    days = rng.integers(START, START + 3 * 365, n)
    Z = rng.normal(size=(n, 12))
    Z[site == "B", 0] += 2.5
    if early_site is not None:
        days = np.where(site == early_site, rng.integers(START, START + 365, n), days)
        Z[site == early_site, 3] += 2.5
    if vendor_effect:
        Z[vendor == "X", 1] += 1.5
    if protocol_change:
        Z[(site == "B") & (days >= STEP), 2] += 3.0
    if permute:
        site, vendor, days = site[rng.permutation(n)], vendor[rng.permutation(n)], days[rng.permutation(n)]
    return neck_region(Z, SPECS, site=site.tolist(), vendor=vendor.tolist(),
                       sex=np.where(rng.random(n) < 0.5, "F", "M").tolist(), weight=weight,
                       date=pl.Series(days.astype("datetime64[D]")))


def findings_of(rd: RegionData, seed=0):
    cfg = settings({"permutations": 99, "pocket_permutations": 199, "onset_bootstraps": 50})
    rng = np.random.default_rng(seed)
    tests = discover_leaks.attribute_leaks(rd, cfg, rng) + discover_clusters.clusters(rd, cfg, rng)
    adjust(tests)
    explain_echoes([rd], tests, cfg, np.random.default_rng(1))
    assign_ids(tests)
    return [f for f in tests if f.is_finding(cfg["alpha"])]


def _leak(found, attribute):
    return next(f for f in found if f.kind == "attribute_leak" and f.attribute == attribute)


def test_vendor_and_weight_leaks_are_echoes_of_the_site():
    found = findings_of(confounded_region())
    site = _leak(found, "site")
    assert site.explained_by is None and "survives_conditioning" in site.details
    for echo in ("vendor", "weight"):
        f = _leak(found, echo)  # marginally significant ...
        assert f.explained_by == "site=B", (echo, f.summary, f.details.get("p_given"))  # ... but only through B
        assert f.details["explained_by"]["p_conditional"] > 0.05 >= f.details["explained_by"]["p_reverse"]
        assert "explained by site B" in f.summary
    # the clusters and pockets of vendor X are folded under site B as well; site B's own are not
    vendor_clusters = [f for f in found if f.kind == "cluster" and f.attribute == "vendor"]
    assert all(f.explained_by is not None for f in vendor_clusters), [f.summary for f in vendor_clusters]
    assert any(f.kind == "cluster" and f.attribute == "site" and f.value == "B" and f.explained_by is None
               for f in found)


def test_a_vendor_with_its_own_effect_survives_conditioning_on_the_site():
    found = findings_of(confounded_region(vendor_effect=True, seed=1))
    assert _leak(found, "vendor").explained_by is None
    assert _leak(found, "site").explained_by is None
    assert _leak(found, "weight").explained_by == "site=B"


def test_a_date_step_at_one_site_is_not_a_date_effect_within_the_vendor():
    found = findings_of(confounded_region(protocol_change=True, seed=2))
    within = [f for f in found if f.attribute in ("site×date", "vendor×date")]
    roots = [f for f in within if f.explained_by is None]
    assert roots and all(f.attribute == "site×date" and str(f.value).startswith("B") for f in roots), \
        [(f.attribute, f.value, f.explained_by) for f in within]
    echoes = [f for f in within if f.attribute == "vendor×date"]
    assert all(f.explained_by == "site=B" for f in echoes), [(f.value, f.details.get("p_without_rival"))
                                                             for f in echoes]
    assert not any(f.attribute == "date" for f in found)  # no date effect of its own


def test_a_date_effect_that_a_site_and_its_scanner_both_carry_is_named_after_the_site():
    """Site B and scanner X (85 % of B's images, a quarter of the rest) both carry a date effect alone: without
    either the test fails, within either it holds. The site, mostly inside the scanner, is where the effect is,
    even when the p without the scanner is the larger one (0.412 against 0.411: a trained dae's neck drift of
    site Hamburg's protocol change was named after scanner Y on that margin, confounded world 2). A carrying
    stratum that is not nested (a batch across all sites) does not take the name by being smaller."""
    rd = confounded_region(seed=3)
    site, vendor = rd.values("site").astype(str), rd.values("vendor").astype(str)
    b = site == "B"
    assert (vendor[b] == "X").mean() >= MOSTLY_INSIDE and (vendor == "X").sum() > b.sum()

    def without(keep):  # the effect lives in site B's images of either scanner
        return 0.411 if not (keep & (site == "B")).any() else (0.412 if not (keep & (vendor == "X")).any() else 0.001)

    def within(keep):
        return 0.001 if (site[keep] == "B").all() or (vendor[keep] == "X").all() else 0.5

    attribute, value, p_without = confine_to_any_stratum(rd, without, 0.05, test_within=within)
    assert (attribute, value) == ("site", "B"), p_without
    assert p_without["vendor"]["X"] > p_without["site"]["B"]  # by the larger p it would have been scanner X

    # a smaller stratum that is not inside the site (a tenth of every site's images) carries it too, with the
    # smaller p without it: the site keeps the name
    batch = np.where(np.arange(rd.n) % 10 == 0, "B1", "B2")
    rd = RegionData("neck", rd.frame.with_columns(pl.Series("batch", batch.tolist())), rd.Z,
                    {**SPECS, "batch": AttributeSpec("batch", "categorical", "acquisition", categories=("B1", "B2"))},
                    12)
    assert (batch == "B1").sum() < b.sum() and (b & (batch == "B1")).sum() < MOSTLY_INSIDE * (batch == "B1").sum()

    def without_batch(keep):
        return 0.3 if not (keep & (batch == "B1")).any() else without(keep)

    def within_batch(keep):
        return 0.001 if (batch[keep] == "B1").all() else within(keep)

    attribute, value, p_without = confine_to_any_stratum(rd, without_batch, 0.05, test_within=within_batch)
    assert (attribute, value) == ("site", "B") and p_without["batch"]["B1"] == 0.3, p_without


def test_a_date_effect_that_two_causes_make_together_is_folded_under_the_step():
    """Inside vendor X the date is predictable through site B's protocol change *and* through site C's own look
    with its first-year-only recruitment. Without B's images, C's part is left; with dates permuted within the
    sites, B's step is left: each conditioning alone leaves the effect standing (the 1000-subject confounded
    scenario, session 15). Without B's images and with dates permuted within the sites nothing is left."""
    found = findings_of(confounded_region(n=1000, protocol_change=True, early_site="C", seed=9))
    within = [f for f in found if f.attribute in ("site×date", "vendor×date")]
    described = [(f.attribute, f.value, f.explained_by, f.details.get("p_without_rival"), f.details.get("p_given"))
                 for f in within]
    echoes = [f for f in within if f.attribute == "vendor×date"]
    assert {str(f.value)[0] for f in echoes} == {"X", "Y"}, described
    for f in echoes:
        assert f.explained_by == "site=B", described
        assert f.details["p_without_rival"]["site=B"] <= 0.05  # without B's images alone it is still significant
        # ... and then gone with dates permuted within the sites, or too small to be a finding (R² below the floor)
        assert f.details.get("jointly_with") == "site" or f.details["explained_by"]["effect_left"] < 0.05, described
    assert any(f.details.get("jointly_with") == "site" for f in echoes), described
    roots = [f for f in within if f.explained_by is None]
    assert roots and all(f.attribute == "site×date" and str(f.value).startswith("B") for f in roots), described


def test_a_finding_is_not_conditioned_on_a_dated_change_of_its_own_attribute():
    """The last pass tries a standing finding given the region's roots and root dated changes together. A dated
    change of vendor X ("vendor X from <onset>": before / after inside X, missing elsewhere) encodes vendor X
    itself, so given it vendor X's own leak vanishes by construction: a trained vae (confounded world 2, session
    19) had its vendor X leak folded under sex that way (p 1.0). Other attributes' dated changes still count."""
    rng = np.random.default_rng(0)
    n = 800
    vendor = np.where(rng.random(n) < 0.5, "X", "Y")
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    weight = rng.normal(75, 10, n)
    days = rng.integers(START, START + 3 * 365, n)
    Z = rng.normal(size=(n, 12))
    Z[vendor == "X", 0] += 1.0
    Z[sex == "F", 1] += 2.0
    Z[:, 2] += (weight - 75) / 10
    Z[(vendor == "X") & (days >= STEP), 3] += 2.0  # vendor X's protocol change
    rd = neck_region(Z, SPECS, site=np.array(list("ABCD"))[rng.integers(0, 4, n)].tolist(), vendor=vendor.tolist(),
                     sex=sex.tolist(), weight=weight, date=pl.Series(days.astype("datetime64[D]")))
    cfg = settings({"permutations": 99, "onset_bootstraps": 50})
    tests = discover_leaks.attribute_leaks(rd, cfg, np.random.default_rng(0))
    adjust(tests)
    leak = _leak([f for f in tests if f.is_finding(0.05)], "vendor")
    leak.details["p_given"] = {"sex": 0.01, "weight": 0.01}  # survived each alone, as the passes before leave it
    epochs = explain_by_roots([rd], tests, cfg, np.random.default_rng(1))
    assert [(e["attribute"], e["value"]) for e in epochs] == [("vendor", "X")]
    assert leak.explained_by is None, leak.details.get("p_given_roots")
    assert not any(g.startswith("vendor ") for g in (leak.details.get("p_given_roots") or {}).get("given", []))


@pytest.mark.parametrize("seed", [3, 4])
def test_null_cohort_has_no_acquisition_finding(seed):
    found = findings_of(confounded_region(permute=True, seed=seed))
    acquisition = [f for f in found if f.attribute.split("×")[0] in ("site", "vendor", "date")]
    assert not acquisition, [f.summary for f in acquisition]


def test_cmh_sees_through_stratification():
    rng = np.random.default_rng(0)
    n = 2000
    stratum = rng.integers(0, 4, n).astype(str)
    is_v = rng.random(n) < np.where(stratum == "0", 0.8, 0.2)
    members = rng.random(n) < np.where(stratum == "0", 0.6, 0.1)  # membership follows the stratum only
    ok = np.ones(n, bool)
    assert cmh_greater(members, is_v, ok, np.zeros(n).astype(str)) < 1e-10  # marginal: strongly associated
    assert cmh_greater(members, is_v, ok, stratum) > 0.05  # within strata: nothing
    members2 = members | (is_v & (rng.random(n) < 0.3))  # a real association within strata
    assert cmh_greater(members2, is_v, ok, stratum) < 1e-6


def test_continuous_strata_are_quintiles_with_missing_apart():
    rd = confounded_region(n=100)
    labels = stratum_labels(rd, "weight")
    assert sorted(set(labels)) == ["0", "1", "2", "3", "4"]
    assert all(15 <= (labels == b).sum() <= 25 for b in "01234")



def test_only_an_attribute_that_goes_with_the_date_can_explain_a_date_effect():
    """Inside site B (a step at a date): a vendor drawn independently of the date leaves the permutation null where
    it was (conditioning on it can only cost power); a vendor that B replaced at the step's date lifts the null to
    the observed statistic."""
    rd = confounded_region(n=600, seed=5, protocol_change=True)
    inside = rd.values("site") == "B"

    def share(region):
        free, given = (discover_leaks._run(region, "date", settings({"permutations": 99}), np.random.default_rng(0),
                                           keep=inside,
                                           conditional=False, strata=strata)
                       for strata in (None, stratum_labels(region, "vendor")))
        assert free["p"] <= 0.01  # B's step
        return explained_share(free, given)

    assert abs(share(rd)) < 0.2
    switched = np.where(rd.values("date") >= STEP, "X", "Y")
    rd2 = RegionData("neck", rd.frame.with_columns(pl.Series("vendor", switched.tolist())), rd.Z, SPECS, 12)
    assert share(rd2) > max(0.8, MIN_EXPLAINED_SHARE)


@pytest.mark.parametrize("seed", [0, 7])
def test_a_date_effect_within_a_batch_is_folded_under_the_site_that_carries_it(seed):
    """The batches hold site C's early images (C looks different and recruited in year 1 only): the date is
    predictable inside a batch through C's look. Every batch's date effect that is gone given the site is folded
    under C. At seed 0 the dates inside batch B1 differ by site too weakly for a Kruskal–Wallis test (p 0.22;
    that former guard kept "date within B1" standing), yet given the site the effect is gone (p 0.64) and the
    conditional null rises to the observed R²."""
    from scipy.stats import kruskal

    rd = early_site_with_batches(seed=seed)
    found = findings_of(rd, seed=seed)
    gone = [f for f in found if f.attribute == "batch×date" and f.details.get("p_given", {}).get("site", 0) > 0.05]
    assert gone
    assert all(f.explained_by == "site=C" and f.details["explained_share"]["site"] >= MIN_EXPLAINED_SHARE
               for f in gone), [(f.value, f.explained_by, f.details.get("explained_share")) for f in gone]
    days, site, batch = rd.values("date").astype(float), stratum_labels(rd, "site"), stratum_labels(rd, "batch")
    weak = [f.value for f in gone
            if kruskal(*[days[(batch == f.value) & (site == v)] for v in "ABCD"]).pvalue > 0.05]
    assert weak or seed != 0  # seed 0: the case the Kruskal–Wallis guard missed


def test_a_pocket_found_after_another_site_was_set_aside_is_an_echo_of_the_scanner():
    """Site B has a look of its own and its pocket is found first; site A's pocket is then searched among the
    other sites' images. A mostly has scanner X, and scanner Y has a look of its own: A's pocket is the echo of
    the scanner. Two things had kept it a finding of its own: B's images (also mostly X) counted as "X images
    outside A's pocket" (CMH p ≈ 0; the confounded scenario's Berlin pocket, dae seed 2 at 1000 subjects), and,
    among the same images, a CMH test of the labels that selected the pocket (p 0.006). The pocket search re-run
    with site labels permuted within scanners repeats the selection (docs/findings.md, root causes)."""
    rng = np.random.default_rng(1)
    n = 800
    site = np.array(list("ABCD"))[rng.integers(0, 4, n)]
    vendor = np.where(rng.random(n) < np.select([site == "B", site == "A"], [0.9, 0.8], 0.2), "X", "Y")
    Z = rng.normal(size=(n, 12))
    Z[site == "B", 0] += 4.0
    Z[vendor == "Y", 1] += 2.0
    found = findings_of(neck_region(Z, SPECS, site=site.tolist(), vendor=vendor.tolist(),
                                    sex=np.where(rng.random(n) < 0.5, "F", "M").tolist(), weight=rng.normal(75, 10, n),
                                    date=pl.Series(rng.integers(START, START + 3 * 365, n).astype("datetime64[D]"))))
    pocket = next(f for f in found if f.kind == "cluster" and f.attribute == "site" and f.value == "A")
    assert pocket.details["set_aside"] == ["B"]
    print("A's pocket given the scanner:", pocket.details["p_given"], pocket.explained_by)
    assert pocket.details["p_given"]["vendor"] > 0.05  # 0.0057 by CMH among the same images
    assert pocket.explained_by is not None and pocket.explained_by.startswith("vendor=")
    assert pocket.details["explained_by"]["test"] == "pocket search permuted within strata"
    # B's own pocket is no echo: B's look is its own, whatever its scanners
    own = [f for f in found if f.kind == "cluster" and f.attribute == "site" and f.value == "B"]
    assert own and all(f.explained_by is None for f in own)


def test_a_pocket_that_two_causes_make_together_is_folded_under_them_jointly():
    """Site M has no look of its own, but its subjects are older and mostly on scanner Y, and both the age and
    scanner Y have a look. Given the scanner alone M's pocket stands (within Y, M is older), given age alone too
    (within an age band, M is mostly Y); given both it is gone (the confounded scenario's Mannheim lumbar pocket,
    dae seed 2 at 1000 subjects). A site with a look of its own (B) survives the same pair."""
    rng = np.random.default_rng(3)
    n = 1000
    site = np.array(list("ABCM"))[rng.integers(0, 4, n)]
    vendor = np.where(rng.random(n) < np.where(site == "M", 0.9, 0.2), "Y", "X")
    age = rng.normal(50, 8, n) + np.where(site == "M", 14.0, 0.0)
    Z = rng.normal(size=(n, 12))
    Z[:, 0] += 2.0 * (vendor == "Y")
    Z[:, 1] += (age - 50) / 6
    Z[site == "B", 2] += 3.5
    specs = {**SPECS, "site": AttributeSpec("site", "categorical", "acquisition", categories=tuple("ABCM")),
             "age": AttributeSpec("age", "continuous", "protected")}
    specs["vendor"] = AttributeSpec("vendor", "categorical", "acquisition", categories=("X", "Y"))
    found = findings_of(neck_region(Z, specs, site=site.tolist(), vendor=vendor.tolist(), age=age,
                                    sex=np.where(rng.random(n) < 0.5, "F", "M").tolist(), weight=rng.normal(75, 10, n),
                                    date=pl.Series(rng.integers(START, START + 3 * 365, n).astype("datetime64[D]"))))
    pockets = [f for f in found if f.kind == "cluster" and f.attribute == "site" and f.value == "M"
               and f.details.get("method") == "knn_pocket"]
    assert pockets, [f.summary for f in found if f.attribute == "site"]
    for f in pockets:
        print("M's pocket:", f.details["p_given"], f.details.get("p_given_jointly"), f.explained_by)
        assert f.explained_by is not None, f.details
        if f.details.get("jointly_with"):  # alone neither explains it; together they do
            assert {f.details["explained_by"]["attribute"], f.details["jointly_with"]} == {"vendor", "age"}
            assert f.details["p_given"]["vendor"] <= 0.05 and f.details["p_given"]["age"] <= 0.05
    assert any(f.details.get("jointly_with") for f in pockets), "no pocket needed the pair: the test lost its point"
    own = [f for f in found if f.kind == "cluster" and f.attribute == "site" and f.value == "B"]
    assert own and all(f.explained_by is None for f in own)


@pytest.mark.slow
def test_a_pocket_that_three_causes_make_together_is_folded_under_the_roots_jointly():
    """Site M has no look of its own, but its subjects are older, mostly women and mostly on scanner Y, and age,
    sex and scanner Y each have a look. Given any one or two of them M's pocket stands (the third still sets M
    apart); given the region's root causes together it is gone (the confounded scenario's Berlin neck pocket,
    dae seed 2 at 1000 subjects: scanner X, age and Hamburg's dated change). Each cause left out in turn brings
    the pocket back, so the named cause is one M needs. A site with a look of its own (B) survives the same."""
    rng = np.random.default_rng(7)
    n = 1500
    site = np.array(list("ABCM"))[rng.integers(0, 4, n)]
    vendor = np.where(rng.random(n) < np.where(site == "M", 0.9, 0.25), "Y", "X")
    sex = np.where(rng.random(n) < np.where(site == "M", 0.9, 0.4), "F", "M")
    age = rng.normal(50, 8, n) + np.where(site == "M", 12.0, 0.0)
    Z = rng.normal(size=(n, 12))
    Z[:, 0] += 3.0 * (vendor == "Y")
    Z[:, 1] += 3.0 * (age - 50) / 8
    Z[:, 3] += 3.0 * (sex == "F")
    Z[site == "B", 2] += 3.5
    specs = {**SPECS, "site": AttributeSpec("site", "categorical", "acquisition", categories=tuple("ABCM")),
             "age": AttributeSpec("age", "continuous", "protected")}
    found = findings_of(neck_region(Z, specs, site=site.tolist(), vendor=vendor.tolist(), age=age, sex=sex.tolist(),
                                    weight=rng.normal(75, 10, n),
                                    date=pl.Series(rng.integers(START, START + 3 * 365, n).astype("datetime64[D]"))))
    pockets = [f for f in found if f.kind == "cluster" and f.attribute == "site" and f.value == "M"]
    assert pockets, [f.summary for f in found if f.attribute == "site"]
    for f in pockets:
        print("M's pocket:", f.details.get("p_given"), f.details.get("p_given_jointly"), f.details.get("p_given_roots"),
              f.explained_by)
        assert f.explained_by is not None, f.details
    roots = [f for f in pockets if f.details["explained_by"]["test"] == "the region's root causes jointly"]
    assert roots, "no pocket needed all three causes: the test lost its point"
    for f in roots:
        assert all(p <= 0.05 for p in f.details["p_given_jointly"].values())  # no pair explained it
        given = f.details["p_given_roots"]
        assert set(given["given"]) == {"vendor", "age", "sex"} and given["p"] > 0.05
        named = f.details["explained_by"]["attribute"]
        assert given["left_out"][named] <= 0.05  # without the named cause the pocket stands again
    own = [f for f in found if f.kind == "cluster" and f.attribute == "site" and f.value == "B"]
    assert own and all(f.explained_by is None for f in own)


def weight_echo_region(n=600, seed=0) -> RegionData:
    """The confounded scenario's weight in small: the embedding carries height (strongly), age, sex and site B's
    look; recorded weight = BMI x height², BMI higher at site B and drawn apart from anything the image shows.
    Weight's leak is height's echo together with site B; given either alone it stands."""
    rng = np.random.default_rng(seed)
    site = np.array(list("ABCD"))[rng.integers(0, 4, n)]
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    height = rng.normal(np.where(sex == "M", 1.79, 1.655), 0.07)
    age = rng.uniform(20, 72, n)
    bmi = np.exp(rng.normal(np.log(np.where(site == "B", 31.0, 25.0)), 0.1))
    Z = rng.normal(size=(n, 12))
    Z[:, 0] += 12 * (height - 1.72) / 0.1
    Z[:, 1] += (age - 46) / 10
    Z[:, 2] += np.where(sex == "M", 1.0, 0.0)
    Z[site == "B", 3] += 2.5
    specs = {"site": SPECS["site"], "sex": SPECS["sex"], "weight": SPECS["weight"],
             "age": AttributeSpec("age", "continuous", "protected"),
             "height": AttributeSpec("height", "continuous", "protected")}
    return neck_region(Z, specs, site=site.tolist(), sex=sex.tolist(), age=age, height=height,
                       weight=bmi * height ** 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_is_folded_under_height_together_with_the_heavier_site(seed):
    """Every p-value alone sits at the permutation floor except height's, so ranked by p the pairs tried were
    height with age and with sex (the alphabet): the site never came beside height and weight stood as a finding
    of its own (4 of 6 confounded worlds at 600 subjects, pca). Ranked by what is left given each, the site is
    tried, and weight is gone given height and the site together."""
    found = findings_of(weight_echo_region(seed=seed), seed=seed)
    weight = _leak(found, "weight")
    assert weight.explained_by is not None, (weight.details.get("p_given"), weight.details.get("p_given_jointly"))
    assert {weight.details["explained_by"]["attribute"], weight.details.get("jointly_with")} == {"height", "site"}
    assert _leak(found, "height").explained_by is None and _leak(found, "site").explained_by is None


def early_site_with_batches(n=600, seed=0) -> RegionData:
    """Site C looks different and recruited in the first year only; the processing batch is the half-year of the
    date for 70 % of the images (the others re-processed into any batch). C's clusters are enriched for 2014 and
    for the first batches: echoes of C, the batches through C's dates."""
    rng = np.random.default_rng(seed)
    site = np.array(list("ABCD"))[rng.integers(0, 4, n)]
    days = np.where(site == "C", rng.integers(START, START + 365, n), rng.integers(START, START + 3 * 365, n))
    batch = np.where(rng.random(n) < 0.7, (days - START) // 182, rng.integers(0, 6, n))
    Z = rng.normal(size=(n, 12))
    Z[site == "C", 3:5] += 6.0
    specs = {"site": SPECS["site"], "date": SPECS["date"],
             "batch": AttributeSpec("batch", "categorical", "acquisition",
                                    categories=tuple(f"B{k}" for k in range(1, 7)))}
    return neck_region(Z, specs, site=site.tolist(), batch=[f"B{b + 1}" for b in batch],
                       date=pl.Series(days.astype("datetime64[D]")))


@pytest.mark.parametrize("seed", [0, 2])
def test_an_echo_of_an_echo_is_named_after_the_root(seed):
    """A batch cluster of C's images is explained best by its dates (2014), and 2014 is itself C's echo: it is
    named after site C, with the date kept as `via` (confounded worlds 3-6: batch B1-B3 clusters folded under
    "date 2014/2015", an echo)."""
    found = findings_of(early_site_with_batches(seed=seed), seed=seed)
    echoes = [f for f in found if f.explained_by is not None]
    assert not [f.finding_id for f in echoes if f.explained_by.startswith("date=")]
    through = [f for f in echoes if (f.details["explained_by"].get("via") or "").startswith("date=")]
    assert through and all(f.explained_by == "site=C" and f.attribute == "batch" for f in through), \
        [(f.finding_id, f.explained_by) for f in through]
    # named after C unless clearly significant given C; C's own findings survive the finding's attribute
    assert all(f.details["explained_by"]["p_conditional"] > ROOT_DOUBT and f.details["explained_by"]["p_reverse"]
               <= 0.05 for f in through), [f.details["explained_by"] for f in through]

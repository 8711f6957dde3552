"""The calibrated discordant subgroup (discover_subgroups + discover_subgroup_null) on synthetic per-region
embeddings: who is flagged against who was planted, nobody flagged when recorded traits (height) move all regions
alike or the labels carry nothing, the paper-003 independence comparison kept beside it, determinism."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cohortlens.analysis.discover import subgroups as discover_subgroups
from cohortlens.analysis.discover.core import RegionData, adjust, assign_ids, findings_frame
from cohortlens.analysis.discover.settings import settings
from cohortlens.analysis.discover.subgroup_epochs import acquisition_epochs, epoch_name, with_epochs
from cohortlens.analysis.table import AttributeSpec
from cohortlens.demo.truth import ground_truth_recall
from cohortlens.types import ALL_REGIONS

ALPHA = 0.05
REGIONS = ("chest", "lumbar", "neck")
SPECS = {
    "sex": AttributeSpec("sex", "categorical", "protected", categories=("F", "M")),
    "age": AttributeSpec("age", "continuous", "protected"),
    "height": AttributeSpec("height", "continuous", "protected"),
    "weight": AttributeSpec("weight", "continuous", "protected"),
    "site": AttributeSpec("site", "categorical", "acquisition", categories=("A", "B", "C", "D")),
    "group": AttributeSpec("group", "categorical", "protected", categories=("x", "y", "z")),  # with_group only
    "date": AttributeSpec("date", "date", "acquisition"),  # protocol_change only
}
ONSET_DAY = 16222 + 365  # 2015-06-01


def cohort(n=1000, dims=30, seed=0, subgroup=0.04, flip_p=0.75, sex_feature=5.0, body_on_sex_axis=4.5,
           height_on_sex_axis=0.8, unrecorded_on_sex_axis=0.0, missing_region=0.05, permute_sex=False,
           with_group=False, atypical=0.0, atypical_scale=4.0, flip_regions=REGIONS, protocol_change=0.0):
    """Three regions of `dims`-d embedding scores per subject (unit Gaussian noise) and their recorded attributes.

    * sex_feature: separation of the sexes' own anatomy along the region's sex direction (5 sd: a region read
      with its subject's recorded covariates is ~0.95 balanced-accurate, like paper 003's 2-4% of images
      classified towards the opposite sex);
    * body build: log BMI (recorded through weight and height) moves every region along the sex direction
      (body_on_sex_axis sd per sd), so a classifier on the embedding alone is only moderately accurate (~0.8);
    * height: men are taller (1.78 vs 1.65 m); height moves every region along its own direction and partly
      along the sex one, so a tall woman looks male in all her regions: regions are dependent without any
      subgroup;
    * the subgroup: `subgroup` of the subjects, each region of theirs carrying the opposite sex's anatomy with
      probability `flip_p` (the demo's 4% and 0.75), only in `flip_regions`; nothing else about them changes;
    * unrecorded_on_sex_axis: a trait of the subject that nobody recorded (body fat distribution, say) moving
      all regions along the sex direction;
    * missing_region: share of subjects without one of their regions (the null's sub-blocks);
    * with_group: a recorded three-valued protected attribute that the images know nothing about;
    * atypical: share of images that are atypical scans (motion, an artefact, an unusual body): their noise is
      `atypical_scale` times larger in every direction, the sex direction included;
    * protocol_change: site B's images from ONSET_DAY on are shifted by this many sd, along the sex direction
      and a direction of their own alike (a new sequence that brightens muscle, which one sex has more of), with
      a recorded `date` column (three study years).
    Returns the regions, the planted subjects (subgroup members with at least one flipped region) and, per
    region, the subjects whose region was flipped (the demo ground truth's format).
    """
    rng = np.random.default_rng(seed)
    male = rng.random(n) < 0.5
    age = rng.uniform(20, 75, n)
    height = np.where(male, rng.normal(1.78, 0.07, n), rng.normal(1.65, 0.065, n))
    log_bmi = rng.normal(np.log(26), 0.15, n)
    weight = np.exp(log_bmi) * height**2
    site = np.array(list("ABCD"))[rng.integers(0, 4, n)]
    member = rng.random(n) < subgroup
    flips = (rng.random((n, len(REGIONS))) < flip_p) & member[:, None] & np.isin(REGIONS, flip_regions)[None, :]
    height_z, body_z, age_z = (height - 1.715) / 0.09, (log_bmi - np.log(26)) / 0.15, (age - 47.5) / 16
    unrecorded = rng.normal(size=n)
    group = np.array(list("xyz"))[rng.integers(0, 3, n)]
    days = np.random.default_rng([seed, 7]).integers(16222, 16222 + 3 * 365, n)  # own stream: other draws unchanged
    site_shift = {s: rng.normal(size=dims) * 0.5 for s in "ABCD"}
    recorded_sex = np.where(male, "M", "F")
    if permute_sex:  # the labels carry nothing about the images any more
        recorded_sex = rng.permutation(recorded_sex)
    lacks = np.where(rng.random(n) < missing_region, rng.integers(0, len(REGIONS), n), -1)
    ids = np.array([f"S{i:04d}" for i in range(n)])
    regions = []
    for j, region in enumerate(REGIONS):
        sex_dir, height_dir, body_dir, age_dir = np.linalg.qr(rng.normal(size=(dims, dims)))[0][:, :4].T
        anatomy = np.where(male ^ flips[:, j], 0.5, -0.5)  # the sex whose features the region carries
        Z = rng.normal(size=(n, dims))
        if atypical:
            Z *= np.where(rng.random(n) < atypical, atypical_scale, 1.0)[:, None]
        Z += np.outer(sex_feature * anatomy + body_on_sex_axis * body_z + height_on_sex_axis * height_z
                      + unrecorded_on_sex_axis * unrecorded, sex_dir)
        Z += np.outer(height_z, height_dir) + np.outer(0.8 * body_z, body_dir) + np.outer(0.7 * age_z, age_dir)
        Z += np.stack([site_shift[s] for s in site])
        if protocol_change:
            changed = (site == "B") & (days >= ONSET_DAY)
            Z += np.outer(changed * protocol_change, (sex_dir + np.linalg.qr(rng.normal(size=(dims, 5)))[0][:, 4]))
        keep = lacks != j
        frame = pl.DataFrame({"image_uid": [f"{s}/{region}" for s in ids[keep]], "subject_id": ids[keep].tolist(),
                              "region": [region] * int(keep.sum()), "sex": recorded_sex[keep].tolist(),
                              "age": age[keep], "height": height[keep], "weight": weight[keep],
                              "site": site[keep].tolist()})
        if with_group:
            frame = frame.with_columns(pl.Series("group", group[keep].tolist()))
        if protocol_change:
            frame = frame.with_columns(pl.Series("date", days[keep].astype("datetime64[D]")))
        regions.append(RegionData(region, frame, Z[keep], SPECS, 10))
    planted = {r: sorted(ids[flips[:, j] & (lacks != j)].tolist()) for j, r in enumerate(REGIONS)}
    return regions, set(ids[member & flips.any(1)].tolist()), planted


def run(regions, seed=0, epochs=()):
    found = discover_subgroups.discordant_subgroups(with_epochs(regions, list(epochs)), settings({}),
                                                    np.random.default_rng(seed))
    adjust(found)
    assign_ids(found)
    co = next(f for f in found if f.region == ALL_REGIONS)
    return found, co, set(co.details["subjects"])


def region_accuracy(rd: RegionData, with_covariates: bool = False) -> float:
    """Balanced accuracy of a cross-fitted LDA of sex per region: on the embedding alone (the paper's per-region
    classifier) or with the recorded age, height and weight beside it."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import cross_val_predict

    X = rd.Z
    if with_covariates:
        X = np.hstack([X, np.log(rd.frame.select("age", "height", "weight").to_numpy())])
    y = rd.values("sex").astype(str)
    return float(balanced_accuracy_score(y, cross_val_predict(LinearDiscriminantAnalysis(), X, y, cv=5)))


@pytest.mark.slow
def test_calibrated_subgroup_recovers_the_planted_subjects():
    regions, planted, per_region = cohort(seed=0)
    accuracy = [region_accuracy(rd) for rd in regions]
    given = [region_accuracy(rd, with_covariates=True) for rd in regions]
    found, co, flagged = run(regions)
    hit = len(flagged & planted)
    precision, recall = hit / max(len(flagged), 1), hit / len(planted)
    print(f"balanced accuracy per region, embedding alone {np.round(accuracy, 2).tolist()}, with covariates "
          f"{np.round(given, 2).tolist()}; flagged {len(flagged)}, planted {len(planted)}, precision "
          f"{precision:.2f}, recall {recall:.2f}\n{co.summary}")
    assert all(0.75 <= a <= 0.87 for a in accuracy), accuracy  # a moderately accurate classifier per region
    assert precision >= 0.9 and recall >= 0.9
    assert co.p_adjusted < 1e-3 and co.details["flagged"] == len(flagged)
    # who is flagged, by recorded attributes: both sexes, medians and sites beside the rest
    profile = co.details["profile"]
    assert set(profile["by_value"]) == {"F", "M"} and sum(profile["by_value"].values()) == len(flagged)
    assert {"age", "height", "weight"} <= set(profile["median"]) and "site" in profile["categories"]
    assert "What paper 003 did" in co.summary and co.details["expected"] and co.effect_size > 1
    # one finding per region, its images of that region and of flagged subjects only; and the demo's matching
    for f in found:
        if f.region != ALL_REGIONS:
            assert f.p_adjusted < ALPHA and f.sample_ids
            assert {u.split("/")[1] for u in f.sample_ids} == {f.region}
            assert {u.split("/")[0] for u in f.sample_ids} <= flagged
    truth = {"effects": [{"name": "discordant_sex", "attribute": "sex", "regions": list(REGIONS),
                          "subjects": per_region}]}
    row = ground_truth_recall(findings_frame(found), truth).row(0, named=True)
    print(row["detail"])
    assert row["found"] and row["precision"] >= 0.85 and row["recall"] >= 0.85  # (subject, region) pairs


@pytest.mark.slow
def test_a_dated_protocol_change_is_a_covariate_of_the_subgroup():
    """Site B's later images are shifted along the sex direction (and one of their own). Given the site alone,
    the site's term takes the average shift: B's earlier and later images are both off by half of it, which the
    null then has to absorb. With the dated change as a covariate, the planted subjects stand out again, with no
    more false flags (on the confounded scenario at 1000 subjects, docs/findings.md: precision 0.73 -> 0.83,
    recall 0.64 -> 0.69 for pca)."""
    regions, planted, _ = cohort(seed=2, protocol_change=5.0)
    epoch = {"attribute": "site", "value": "B", "date_attribute": "date", "onset": "2015-06-01"}
    outcomes = {}
    for name, epochs in (("site only", ()), ("with the change", (epoch,))):
        found, co, flagged = run(regions, epochs=epochs)
        outcomes[name] = (len(flagged & planted), len(flagged - planted))
        if epochs:
            assert epoch_name(epoch) in co.details["covariates"]
    print("planted and false flags of", len(planted), "planted:", outcomes)
    assert outcomes["with the change"][0] >= outcomes["site only"][0] + 4  # 39 against 32 when measured
    assert outcomes["with the change"][0] >= 0.9 * len(planted)
    assert outcomes["with the change"][1] <= max(outcomes["site only"][1], 2)


def test_acquisition_epochs_take_root_date_effects_with_an_onset():
    from cohortlens.analysis.discover.core import Finding

    def leak(value, onset, explained_by=None, p=0.001, region="neck"):
        f = Finding("attribute_leak", region, "site×date", value, 0.3, "r", p, 100, [], "x")
        f.family, f.p_adjusted, f.explained_by = "date_within_stratum", p, explained_by
        f.details.update({"stratum": "site", "site": value, "onset": onset})
        return f

    tests = [leak("B", "2015-06-03"), leak("B", "2015-05-20", region="chest"), leak("B", "2015-07-01", region="x"),
             leak("C", "2016-01-01", explained_by="site=B"), leak("D", None), leak("E", "2016-02-02", p=0.2)]
    assert acquisition_epochs(tests, 0.05) == [
        {"attribute": "site", "value": "B", "date_attribute": "date", "onset": "2015-06-03"}]
    regions, _, _ = cohort(n=200, seed=3, protocol_change=1.0)
    epoch = acquisition_epochs(tests, 0.05)[0]
    rd = with_epochs(regions, [epoch])[0]
    column = rd.frame[epoch_name(epoch)].to_list()
    site, days = rd.values("site"), rd.values("date")
    for label, s, d in zip(column, site, days):
        assert label == (None if s != "B" else "after" if d >= ONSET_DAY + 2 else "before")
    assert rd.specs[epoch_name(epoch)].role == "acquisition" and regions[0].frame.width < rd.frame.width


@pytest.mark.slow
@pytest.mark.parametrize("unrecorded", [0.0, 1.5])
def test_traits_moving_all_regions_are_not_a_subgroup(unrecorded):
    """No subgroup; men taller, height and build moving every region (and, second case, a trait nobody recorded
    moving every region along the sex direction): the paper's comparison counts it as co-occurrence, the
    calibrated null does not (recorded traits: in the classifier and the null's location; unrecorded ones: in the
    null's between-region covariance)."""
    # Under a null, BH flags anybody at all with probability about alpha; one seed shows the typical case. Over 8
    # seeds of this world (body build moving the sex axis 4.5 sd per sd of BMI, a nonlinear function of two
    # recorded covariates) 2 flag a single extreme-BMI subject: the measured rate is in docs/findings.md.
    regions, planted, _ = cohort(seed=21, subgroup=0.0, unrecorded_on_sex_axis=unrecorded)
    found, co, flagged = run(regions)
    n = co.n
    print(f"null, unrecorded trait {unrecorded}: {len(flagged)} of {n} flagged, smallest BH q {co.p_value:.2g}; "
          f"paper: {co.effect_size:.2f}× the independence expectation, p={co.details['p_independence']:.2g}; "
          f"between-region correlation {[v['between_region_correlation'] for v in co.details['nulls'].values()]}")
    assert not planted
    assert co.p_adjusted > ALPHA and len(flagged) <= 0.01 * n
    # what the paper did would have reported a subgroup here
    assert co.details["p_independence"] < 0.01 and co.effect_size > 1.3


@pytest.mark.slow
def test_atypical_scans_are_not_a_subgroup():
    """No subgroup, 3% of the images atypical (4x the noise in every direction): a linear classifier extrapolates
    their log-odds in proportion, so one atypical region made a subject 'look like the other sex' at a tiny p (the
    demo: 10 of 20 flagged were such subjects). Their evidence is shrunk by how atypical they are off the sex axis;
    nobody is flagged. With a subgroup beside them the planted subjects are still found."""
    regions, planted, _ = cohort(seed=5, subgroup=0.0, atypical=0.03)
    _, co, flagged = run(regions)
    print(f"atypical scans, no subgroup: {len(flagged)} flagged, q {co.p_adjusted:.2g}")
    assert not planted and len(flagged) <= 1
    regions, planted, _ = cohort(seed=6, atypical=0.03)
    _, co, flagged = run(regions)
    hit = len(flagged & planted)
    print(f"atypical scans and a subgroup: {len(flagged)} flagged, {hit} of {len(planted)} planted")
    # without the shrinkage: 30 flagged, 27 planted (recall 0.64); seed 8: 36 and 24 (precision 0.67, recall 0.69)
    assert hit >= 0.9 * len(planted) and hit >= 0.8 * len(flagged)


@pytest.mark.slow
def test_a_region_the_subgroup_does_not_reach_gets_no_finding():
    """The per-region test's null: the subgroup carries the other sex in chest and lumbar, never in the neck. The
    neck's subjects that chest and lumbar flag are ordinary there: over 8 worlds its test rejects at most at its
    level (40 worlds: 0 with p < 0.05; 20 of 1577 chosen subjects past the conditional 2.5 % point), chest and
    lumbar always."""
    neck_rejections, beyond, chosen = 0, 0, 0
    for seed in range(101, 109):
        regions, planted, _ = cohort(seed=seed, flip_p=1.0, flip_regions=("chest", "lumbar"))
        found, co, flagged = run(regions, seed=seed)
        by_region = {f.region: f for f in found if f.region != ALL_REGIONS}
        assert by_region["chest"].p_adjusted < ALPHA and by_region["lumbar"].p_adjusted < ALPHA
        assert len(flagged & planted) >= 0.8 * len(flagged)
        neck = by_region["neck"]
        neck_rejections += neck.p_value < ALPHA
        beyond += neck.details["test_beyond_given_other_regions"]
        chosen += neck.details["test_flagged_by_other_regions"]
    print(f"neck: p < {ALPHA} in {neck_rejections} of 8 worlds; {beyond} of {chosen} chosen subjects beyond the "
          "upper 2.5 % point given chest and lumbar")
    assert neck_rejections <= 2  # P(>= 3 of 8) = 0.006 for a test at its level
    assert beyond <= 0.05 * chosen


@pytest.mark.slow
def test_permuted_sex_labels_find_nothing():
    regions, _, _ = cohort(seed=2, permute_sex=True)
    found, co, flagged = run(regions)
    print(f"permuted labels: {len(flagged)} flagged, q {co.p_adjusted:.2g}")
    assert not flagged and co.p_adjusted > ALPHA
    assert all(not f.sample_ids for f in found)


@pytest.mark.slow
def test_an_irreducibly_weak_region_classifier_stays_calibrated():
    """Sex features alone at balanced accuracy 0.8 per region, nothing recorded to sharpen them: no method can
    find most of a 4% subgroup (the Neyman-Pearson oracle reaches recall 0.27 at precision 0.9, see
    docs/findings.md); the calibrated subgroup flags few, and those few are planted."""
    regions, planted, _ = cohort(seed=3, sex_feature=1.68, body_on_sex_axis=0.0, height_on_sex_axis=0.0)
    _, co, flagged = run(regions)
    hit = len(flagged & planted)
    print(f"weak classifier: flagged {len(flagged)}, of them planted {hit}, recall {hit / len(planted):.2f}")
    assert len(flagged - planted) <= 1


@pytest.mark.slow
def test_deterministic_for_a_seed():
    regions, planted, _ = cohort(n=300, seed=4, subgroup=0.06)
    first, second = run(regions, seed=7)[0], run(regions, seed=7)[0]
    assert [f.row() for f in first] == [f.row() for f in second]
    co = next(f for f in first if f.region == ALL_REGIONS)
    assert co.details["subjects"] and len(set(co.details["subjects"]) - planted) <= 1


@pytest.mark.slow
def test_the_flagged_set_barely_depends_on_the_seed():
    """The seed draws the cross-fitting folds. With one fold assignment the flagged sets of four seeds overlapped
    by Jaccard 0.70 in this world (sex read at ~0.9 per region, 400 subjects); the evidence averaged over
    `discordant_repeats` (5) fold assignments gives 0.90."""
    import itertools

    regions, planted, _ = cohort(n=400, seed=6, sex_feature=3.5)
    sets = [run(regions, seed=s)[2] for s in range(4)]
    overlap = min(len(a & b) / max(len(a | b), 1) for a, b in itertools.combinations(sets, 2))
    print(f"flagged {[len(x) for x in sets]}, planted among them {[len(x & planted) for x in sets]}, "
          f"smallest Jaccard {overlap:.2f}")
    assert overlap >= 0.8 and all(x for x in sets)


@pytest.mark.slow
def test_a_three_valued_attribute_the_images_do_not_know():
    """"Another value" is either of the other two: one null per (recorded, other) pair, the smallest p
    Bonferroni-corrected; a random attribute flags at most a handful."""
    regions, _, _ = cohort(n=400, seed=5, subgroup=0.06, with_group=True)
    found = run(regions, seed=7)[0]
    group = [f for f in found if f.attribute == "group"]
    co = next(f for f in group if f.region == ALL_REGIONS)
    print(f"random three-valued attribute: {co.details['flagged']} flagged, q {co.p_adjusted:.2g}, "
          f"nulls {sorted(co.details['nulls'])}")
    assert len(group) == len(REGIONS) + 1 and len(co.details["nulls"]) == 6
    assert co.details["flagged"] <= 0.01 * co.n
    # the sex subgroup is found beside it, and the random attribute did not take the sex covariate's outliers
    sex = next(f for f in found if f.attribute == "sex" and f.region == ALL_REGIONS)
    assert sex.p_adjusted < ALPHA


def test_mixture_statistic_counts_missing_regions_as_nothing():
    from cohortlens.analysis.discover.subgroup_null import mixture_statistic

    x = np.array([[2.0, -30.0, np.nan]])
    expected = np.log(0.5 * np.exp(2.0) + 0.5) + np.log(0.5 * np.exp(-30.0) + 0.5)
    assert mixture_statistic(x)[0] == pytest.approx(expected)


def test_conditional_score_is_standard_normal_where_the_other_regions_are_far_out():
    """Under a multivariate t null, region j given the other regions is wider for subjects far out in those
    regions: exactly the subjects the other regions flag. The score must be N(0, 1) there too, or the per-region
    Stouffer test would reject for a region the subgroup does not reach."""
    from scipy.stats import norm

    from cohortlens.analysis.discover.subgroup_null import conditional_score, conditional_z

    rng = np.random.default_rng(0)
    n, df = 200_000, 5.0
    S = np.array([[1.0, 0.5, 0.3], [0.5, 1.0, 0.4], [0.3, 0.4, 1.0]])
    X = rng.multivariate_normal(np.zeros(3), S, size=n) * np.sqrt(df / rng.chisquare(df, size=(n, 1)))
    null = {"sigma": S, "scale": 1.0, "df": df, "resid": X}
    others = X[:, 1:]
    d2 = np.einsum("ij,jk,ik->i", others, np.linalg.inv(S[1:, 1:]), others)
    far = d2 > np.quantile(d2, 0.95)
    score, naive = conditional_score(null, 0), conditional_z(null, 0)
    assert abs(score[far].std() - 1) < 0.05 and abs(score[far].mean()) < 0.05
    assert abs(score.std() - 1) < 0.02
    assert (score[far] > norm.isf(0.025)).mean() == pytest.approx(0.025, abs=0.006)
    assert naive[far].std() > 1.5  # without the widening: over-dispersed exactly where it matters
    # a Gaussian null: the conditional z itself
    gauss = {**null, "df": float("inf")}
    np.testing.assert_allclose(conditional_score(gauss, 0), conditional_z(gauss, 0))

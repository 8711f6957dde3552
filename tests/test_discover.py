"""The discover stage: findings on the real demo pipeline's pca embeddings against the planted ground truth, the
findings file contract, the explanation pictures, and the statistics of each detector on synthetic data."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.stats import false_discovery_control

from cohortlens.analysis.discover import clusters as discover_clusters
from cohortlens.analysis.discover import leaks as discover_leaks
from cohortlens.analysis.discover import subgroups as discover_subgroups
from cohortlens.analysis.discover.core import (
    FINDINGS_SCHEMA,
    KINDS,
    Finding,
    RegionData,
    confine_to_stratum,
    findings_frame,
)
from cohortlens.analysis.discover.explain import CenterSlices, edge_profile
from cohortlens.analysis.discover.settings import settings
from cohortlens.analysis.stats import holm_adjust
from cohortlens.analysis.table import AttributeSpec
from cohortlens.demo.truth import ground_truth_recall
from cohortlens.io.tables import read_parquet_metadata

ALPHA = 0.05


@pytest.fixture(scope="module")
def demo_findings(demo_results):
    """The discover stage's outputs for pca in the session's demo run, scored against the demo's ground truth."""
    res = demo_results / "results"
    out = res / "findings"
    truth = demo_results / "data/demo/ground_truth.json"
    return {"frame": pl.read_parquet(out / "pca.parquet"), "out": out, "tests": pl.read_parquet(out / "pca-tests.parquet"),
            "recall": ground_truth_recall(out / "pca.parquet", truth), "truth": json.loads(truth.read_text()),
            "res": res, "root": demo_results}


# ---------------------------------------------------------------------------------------------- the demo


def test_every_planted_effect_is_found_and_date_is_not(demo_findings):
    recall = demo_findings["recall"]
    print(recall.select("effect", "found", "precision", "recall", "detail").to_dicts())
    planted = {e["name"] for e in demo_findings["truth"]["effects"]}
    assert planted <= set(recall["effect"].to_list())
    missed = recall.filter(pl.col("expected") & ~pl.col("found"))
    assert missed.height == 0, missed.select("effect", "detail").to_dicts()
    control = recall.filter(pl.col("effect") == "negative control: date")
    assert control.height == 1 and not control["found"][0], control["detail"][0]
    # the site effects are neck-only: no cluster of Essen or Neubrandenburg in chest or lumbar
    sites = recall.filter(pl.col("effect").str.starts_with("site_"))
    assert all(len(u) == 0 for u in sites["unexpected_ids"].to_list()), sites["unexpected_ids"].to_list()


def test_discordant_subgroup_against_the_planted_subjects(demo_findings):
    row = demo_findings["recall"].filter(pl.col("effect") == "discordant_sex").row(0, named=True)
    # (subject, region) pairs: recall 1.0, precision 0.74 on the default demo since height acts on body size
    assert row["recall"] >= 0.9 and row["precision"] >= 0.7, row["detail"]
    frame = demo_findings["frame"]
    co = frame.filter((pl.col("kind") == "discordant_subgroup") & (pl.col("region") == "all")).row(0, named=True)
    details = json.loads(co["details"])
    # subjects: every planted one is flagged, but so are 8 others (18 for 10; tall women and short men: the
    # covariate adjustment does not yet absorb the demo's strong height/body-size effect). Issue 10's target
    # (precision >= 0.9) is open; this bound only stops it from getting worse.
    planted = set(next(e for e in demo_findings["truth"]["effects"] if e["name"] == "discordant_sex")["subgroup"])
    flagged = set(details["subjects"])
    assert planted <= flagged and len(flagged & planted) / len(flagged) >= 0.5, (sorted(flagged), sorted(planted))
    observed, expected = details["observed"], details["expected"]
    # far more subjects with two or three discordant regions than independence predicts (paper 003: 141 vs 26.6)
    assert observed[2] + observed[3] >= 5 and sum(expected[2:]) < 2.0
    assert co["effect_size"] > 5 and co["p_adjusted"] < 0.01


def test_site_cluster_and_the_neubrandenburg_onset(demo_findings):
    frame = demo_findings["frame"]
    essen = frame.filter((pl.col("kind") == "cluster") & (pl.col("value") == "Essen")
                         & pl.col("finding_id").str.contains("cluster\\d"))
    assert essen.height == 1 and essen["region"][0] == "neck"
    assert json.loads(essen["details"][0])["share"] > 0.9  # a pure HDBSCAN cluster of shifted necks
    onset = frame.filter(pl.col("attribute") == "site×date").filter(pl.col("value").str.starts_with("Neubrandenburg"))
    dates = [json.loads(d).get("onset") for d in onset["details"].to_list()]
    planted = next(e for e in demo_findings["truth"]["effects"] if e["name"] == "site_flat_neck")["from_date"]
    gaps = [abs((np.datetime64(d) - np.datetime64(planted)).astype(int)) for d in dates if d]
    assert gaps and min(gaps) <= 120, (dates, planted)


def test_leaks_name_reidentification_and_skip_the_chest_site(demo_findings):
    frame = demo_findings["frame"]
    site = frame.filter((pl.col("kind") == "attribute_leak") & (pl.col("attribute") == "site"))
    assert site["region"].to_list() == ["neck"]
    assert "re-identification" in site["description"][0]
    tests = demo_findings["tests"]
    chest = tests.filter((pl.col("kind") == "attribute_leak") & (pl.col("attribute") == "site")
                         & (pl.col("region") == "chest"))
    assert chest["p_adjusted"][0] > ALPHA


def test_planted_sex_discordance_is_no_label_issue(demo_findings):
    """The demo's discordant subjects have their recorded sex right (features of the other sex are rendered),
    like paper 003's subgroup: sex is protected, so cleanlab must not call them label errors. They are the
    discordant-subgroup finding (test_discordant_subgroup_against_the_planted_subjects)."""
    for frame in (demo_findings["frame"], demo_findings["tests"]):
        assert frame.filter((pl.col("kind") == "label_issue") & (pl.col("attribute") == "sex")).height == 0
    assert demo_findings["frame"].filter((pl.col("kind") == "discordant_subgroup")
                                         & (pl.col("attribute") == "sex")).height >= 1


def test_findings_file_contract(demo_findings):
    out, tests, res = demo_findings["out"], demo_findings["tests"], demo_findings["res"]
    schema = pq.read_schema(out / "pca.parquet")
    assert [(f.name, f.type) for f in schema] == [(f.name, f.type) for f in FINDINGS_SCHEMA]
    meta = read_parquet_metadata(out / "pca.parquet")
    assert meta["model"] == "pca" and meta["n_tests"] == tests.height
    frame = pl.read_parquet(out / "pca.parquet")
    assert set(frame["kind"].to_list()) <= set(KINDS)
    assert frame["finding_id"].n_unique() == frame.height
    # BH within each family (the kind, or a family of its own) over every test of it, significant or not; the
    # pocket searches: Holm
    tests = tests.with_columns(family=pl.col("details").str.json_path_match("$.family").fill_null(pl.col("kind")))
    assert set(tests["family"].unique()) >= {"pocket", "date_within_stratum", "attribute_leak"}
    for family in tests["family"].unique().to_list():
        t = tests.filter((pl.col("family") == family) & pl.col("p_value").is_not_null())
        if t.height and family != "pocket":
            bh = false_discovery_control(t["p_value"].to_numpy(), method="bh")
            # a cluster's date comparison within a stratum is gated by that stratum's date leak (core.adjust)
            gate = t["details"].str.json_path_match("$.gate.within_stratum_leak_p_adjusted").cast(pl.Float64)
            gate = gate.fill_null(0.0).to_numpy()
            np.testing.assert_allclose(t["p_adjusted"].to_numpy(), np.maximum(bh, gate))
    pockets = tests.filter(pl.col("family") == "pocket")
    assert pockets.height and (pockets["finding_id"].str.contains("pocket")).all()
    np.testing.assert_allclose(pockets["p_adjusted"].to_numpy(), holm_adjust(pockets["p_value"].to_numpy()))
    tested = frame.filter(pl.col("p_value").is_not_null())
    assert (tested["p_adjusted"] < ALPHA).all() and (tested["p_adjusted"] >= tested["p_value"] - 1e-12).all()
    volumes = pl.read_parquet(res / "embeddings/pca/volumes.parquet", columns=["image_uid", "region"])
    region_of = dict(zip(volumes["image_uid"].to_list(), volumes["region"].to_list()))
    for row in frame.iter_rows(named=True):
        assert row["description"] and row["effect_measure"]
        assert all(u in region_of for u in row["sample_ids"])
        if row["region"] != "all":
            assert {region_of[u] for u in row["sample_ids"]} <= {row["region"]}
        assert bool(row["evidence"]) == bool(row["sample_ids"]), row["finding_id"]
        for png in row["evidence"]:  # written relative to the run's directory
            with Image.open(demo_findings["root"] / png) as img:
                assert img.format == "PNG" and img.width >= 4 * 64 and img.height >= 256


def test_explanation_profiles_show_the_planted_geometry(demo_findings):
    """The Essen cluster's back contour is the rest's moved up by the planted shift; the flat Neubrandenburg
    necks' back contour lies posterior (to the right) of the rest."""
    frame, res = demo_findings["frame"], demo_findings["res"]
    slices = CenterSlices(res / "preprocessed/index.parquet")

    def profiles(row):
        chosen = set(row["sample_ids"])
        rest = [u for u in slices.uids(row["region"]) if u not in chosen]
        return (np.nanmean(slices.mean_and_profiles(sorted(chosen), 0.15)[1], 0),
                np.nanmean(slices.mean_and_profiles(rest, 0.15)[1], 0))

    essen = frame.filter((pl.col("value") == "Essen") & pl.col("finding_id").str.contains("cluster\\d"))
    essen = essen.row(0, named=True)
    a, b = profiles(essen)
    h = len(a)
    err = {lag: np.nanmean((a[max(0, -lag): h - max(0, lag)] - b[max(0, lag): h - max(0, -lag)]) ** 2)
           for lag in range(-12, 13)}
    shift = next(e for e in demo_findings["truth"]["effects"] if e["name"] == "site_fov_shift")["shift_voxels"]
    assert abs(min(err, key=err.get) - shift) <= 1, err  # content seen `shift` rows higher (superior)

    flat = frame.filter((pl.col("attribute") == "site×date") & (pl.col("kind") == "cluster")).row(0, named=True)
    a, b = profiles(flat)
    assert np.nanmean(a[h // 4: 3 * h // 4] - b[h // 4: 3 * h // 4]) > 1.0


# ---------------------------------------------------------------------------------------- synthetic data

SPECS = {
    "site": AttributeSpec("site", "categorical", "acquisition", categories=tuple("ABCDE")),
    "date": AttributeSpec("date", "date", "acquisition"),
    "sex": AttributeSpec("sex", "categorical", "protected", categories=("F", "M")),
}


def synthetic_region(n=300, dims=10, seed=0, date_effect=None, region="neck") -> RegionData:
    """Gaussian embedding scores with sites A-E, dates over three years and sex; `date_effect` is None,
    'site' (a step at year 2 in site B only) or 'global' (the same step in every site)."""
    rng = np.random.default_rng(seed)
    site = np.array(list("ABCDE"))[rng.integers(0, 5, n)]
    days = rng.integers(16222, 16222 + 3 * 365, n)  # 2014-06-01 + 3 years
    Z = rng.normal(size=(n, dims))
    later = days >= 16222 + 365
    if date_effect == "site":
        Z[(site == "B") & later, 0] += 4.0
    elif date_effect == "global":
        Z[later, 0] += 1.5
    frame = pl.DataFrame({
        "image_uid": [f"S{i:04d}/{region}" for i in range(n)], "subject_id": [f"S{i:04d}" for i in range(n)],
        "region": [region] * n, "site": site.tolist(), "sex": np.where(rng.random(n) < 0.5, "F", "M").tolist(),
        "date": pl.Series(days.astype("datetime64[D]")),
    })
    return RegionData(region, frame, Z, SPECS, dims)


def _cfg(**kw):
    return settings({"permutations": 99, "pocket_permutations": 199, **kw})


def test_date_confined_to_one_site_is_an_interaction_not_a_date_effect():
    rd = synthetic_region(date_effect="site")
    found = discover_leaks.attribute_leaks(rd, _cfg(), np.random.default_rng(0))
    date = next(f for f in found if f.attribute in ("date", "site×date") and f.details["scope"] == "region")
    assert date.attribute == "site×date" and date.value == "B", date.summary
    within = {f.value: f.p_value for f in found if f.details["scope"] == "within site"}
    assert within["B"] <= 0.02 and min(p for s, p in within.items() if s != "B") > 0.02


def test_a_date_effect_in_every_site_keeps_its_name():
    rd = synthetic_region(date_effect="global")
    found = discover_leaks.attribute_leaks(rd, _cfg(), np.random.default_rng(0))
    date = [f for f in found if f.attribute == "date"]
    assert len(date) == 1 and date[0].p_value <= 0.02, [f.summary for f in found]


def test_a_significant_leak_below_the_relevance_floor_is_no_finding():
    """The same global date effect is significant either way; with the R² floor above its R² it stays in the
    tests table (described as below the floor) and is not a finding."""
    rd = synthetic_region(date_effect="global")
    low = discover_leaks.attribute_leaks(rd, _cfg(), np.random.default_rng(0))
    date = next(f for f in low if f.attribute == "date")
    date.p_adjusted = date.p_value
    assert date.reportable and date.is_finding(0.05) and date.details["relevance_floor"] == 0.05
    high = discover_leaks.attribute_leaks(rd, _cfg(min_r2=date.effect_size + 0.01), np.random.default_rng(0))
    date = next(f for f in high if f.attribute == "date")
    date.p_adjusted = date.p_value
    assert date.p_value <= 0.02 and not date.is_finding(0.05)
    assert date.row(0.05)["description"].startswith("not a finding (significant, below the relevance floor)")
    # categories use their own floor, on balanced accuracy minus chance
    site = next(f for f in discover_leaks.attribute_leaks(rd, _cfg(min_accuracy_gain=1.0), np.random.default_rng(0))
                if f.attribute == "site")
    assert not site.reportable and site.effect_measure == "balanced_accuracy_minus_chance"


@pytest.mark.slow
def test_leak_permutation_tests_are_calibrated_under_the_null():
    """No attribute in the embedding: p-values of the site, sex and (within-site permuted) date tests must not
    fall below 0.05 much more often than 5% (folds stratified on the observed labels once made it 30%)."""
    cfg = _cfg()
    small = {a: [] for a in ("site", "sex", "date")}
    for rep in range(12):
        rd = synthetic_region(n=150, seed=100 + rep)
        for attribute, ps in small.items():
            ps.append(discover_leaks._run(rd, attribute, cfg, np.random.default_rng(rep))["p"])
    for attribute, ps in small.items():
        assert sum(p <= 0.05 for p in ps) <= 3 and np.mean(ps) > 0.3, (attribute, ps)


def test_repeated_folds_predict_every_image_once_per_repeat_and_keep_subjects_together():
    subjects = np.repeat(np.arange(40), 3).astype(str)  # three images per subject
    folds = discover_leaks.cv_folds(len(subjects), subjects, 5, seed=7, repeats=3)
    assert len(folds) == 15
    tested = np.zeros(len(subjects), int)
    for train, test in folds:
        tested[test] += 1
        assert not set(subjects[train]) & set(subjects[test])
    assert (tested == 3).all()
    first, second = ({frozenset(subjects[test]) for _, test in folds[r * 5:(r + 1) * 5]} for r in (0, 1))
    assert first != second  # each repeat is its own shuffle


def test_repeated_folds_steady_a_weak_leak_statistic():
    """The leak's out-of-fold R² moves with the fold shuffle; averaging the predictions of three shuffles must
    shrink that spread (the same data and permutations, only the fold seed varies)."""
    rd = synthetic_region(n=200, seed=3)
    later = rd.values("date").astype(float) >= 16222 + 365
    rd.Z[:, 0] += 0.5 * later
    spread = {}
    for repeats in (1, 3):
        stats = [discover_leaks._run(rd, "date", _cfg(permutations=9, fold_repeats=repeats),
                                     np.random.default_rng(seed))["stat"] for seed in range(16)]
        spread[repeats] = float(np.std(stats))
    # independent fold noise would shrink by 1 / sqrt(3) = 0.58; measured 0.53 here, 0.39-0.70 at other data seeds
    assert spread[3] < 0.75 * spread[1], spread


def test_confine_to_stratum_requires_the_site_itself_to_show_the_effect():
    strata = np.array(list("AABBCC") * 10, dtype=object)
    carried_by_b = confine_to_stratum(lambda keep: 0.5 if not (keep & (strata == "B")).any() else 0.001, strata,
                                      ALPHA, test_within=lambda keep: 0.001 if (strata[keep] == "B").all() else 0.6)
    assert carried_by_b[0] == "B"
    fragile = confine_to_stratum(lambda keep: 0.2, strata, ALPHA, test_within=lambda keep: 0.6)
    assert fragile[0] is None


def test_neighbourhood_pocket_finds_an_overlapping_subgroup_and_nothing_in_noise():
    rd = synthetic_region(date_effect="site", seed=1)
    found = discover_clusters.clusters(rd, _cfg(), np.random.default_rng(0))
    pockets = [f for f in found if f.details.get("method") == "knn_pocket" and f.attribute == "site"]
    best = min(pockets, key=lambda f: f.p_value)
    assert best.value == "B" and best.p_value <= 0.01 and best.effect_size > 1.5
    onsets = [f.details["onset"] for f in found
              if f.attribute == "site×date" and f.details.get("method") == "knn_pocket"]
    assert onsets and abs((np.datetime64(onsets[0]) - np.datetime64("2015-06-01")).astype(int)) <= 90

    quiet = discover_clusters.clusters(synthetic_region(seed=2), _cfg(), np.random.default_rng(0))
    assert all(f.p_value > ALPHA for f in quiet if f.details.get("method") == "knn_pocket")


def test_density_clusters_are_tested_only_when_stable():
    rng = np.random.default_rng(0)
    rd = synthetic_region(seed=4)
    Z = rd.Z.copy()
    Z[:40, :] += 8.0  # a separate blob of 40 images...
    frame = rd.frame.with_columns(pl.Series("site", ["A"] * 40 + rd.frame["site"].to_list()[40:]))
    blob = RegionData("neck", frame, Z, SPECS, 10)
    found = discover_clusters.clusters(blob, _cfg(), rng)
    site_a = [f for f in found if f.details.get("method") == "hdbscan" and f.value == "A" and f.attribute == "site"]
    assert site_a and min(f.p_value for f in site_a) < 1e-10  # ...that is all site A
    noise = discover_clusters.clusters(synthetic_region(seed=5), _cfg(), rng)
    assert not [f for f in noise if f.details.get("method") == "hdbscan"]


def test_poisson_binomial_and_co_occurrence():
    pmf = discover_subgroups.poisson_binomial(np.array([0.1, 0.2, 0.3]))
    assert pmf[3] == pytest.approx(0.1 * 0.2 * 0.3)
    assert pmf[0] == pytest.approx(0.9 * 0.8 * 0.7)
    assert pmf.sum() == pytest.approx(1.0)

    rng = np.random.default_rng(0)
    n, regions = 400, ["chest", "lumbar", "neck"]

    def votes(flags):
        out = {}
        for j, r in enumerate(regions):
            rd = synthetic_region(n=n, region=r)
            out[r] = (rd, {"mask": np.ones(n, bool), "flags": flags[:, j]})
        return out

    independent = rng.random((n, 3)) < 0.05
    linked = np.zeros((n, 3), bool)
    linked[:12] = True  # 12 subjects discordant everywhere
    linked[12:20, 0] = True
    for flags, significant in ((independent, False), (linked, True)):
        v = votes(flags)
        f = discover_subgroups.co_occurrence(v, discover_subgroups._subject_flags(v), "sex", _cfg(), rng, n_perm=999)
        assert (f.p_value < 0.01) == significant, f.summary
    assert f.details["observed"][3] == 12 and f.effect_size > 5  # 12 observed vs 1.5 expected


def test_edge_profile_is_the_rightmost_body_column():
    img = -np.ones((64, 64), np.float32)
    img[8:56, 10:41] = 0.5  # body up to column 40
    img[20, 60] = 0.9  # one noisy background pixel is not body
    prof = edge_profile(img)[0]
    assert np.isnan(prof[:8]).all() and np.isnan(prof[56:]).all()
    assert (prof[8:56] == 40).all()


def test_ground_truth_recall_rules():
    truth = {"effects": [
        {"name": "sex_leak", "attribute": "sex", "regions": ["neck", "chest"]},
        {"name": "flat", "attribute": "site", "value": "N", "regions": ["neck"], "interaction": "date",
         "from_date": "2015-06-01"},
    ], "negative_controls": [{"attribute": "date"}]}

    def f(kind, region, attribute, value, q, details=None, effect=3.0):
        x = Finding(kind, region, attribute, value, effect, "m", q, 10, ["S1/neck"], "s", details or {})
        x.p_adjusted, x.finding_id = q, f"{kind}-{region}-{attribute}-{value}"
        return x

    base = [f("attribute_leak", "neck", "sex", None, 0.01), f("cluster", "neck", "site", "N", 0.01),
            f("cluster", "neck", "site×date", "N, from 2015-06-20", 0.01, {"onset": "2015-06-20", "direction": "from"})]
    rec = ground_truth_recall(findings_frame(base), truth)
    found = dict(zip(rec["effect"].to_list(), rec["found"].to_list()))
    assert found == {"sex_leak": False, "flat": True, "negative control: date": False}  # chest leak missing
    more = base + [f("attribute_leak", "chest", "sex", None, 0.01), f("attribute_leak", "neck", "date", None, 0.02)]
    rec = ground_truth_recall(findings_frame(more), truth)
    assert rec["found"].to_list() == [True, True, True]  # the date finding flags the negative control
    late = [base[0], base[1], f("cluster", "neck", "site×date", "N, from 2016-03-01", 0.01,
                                {"onset": "2016-03-01", "direction": "from"})]
    assert not ground_truth_recall(findings_frame(late), truth).filter(pl.col("effect") == "flat")["found"][0]


def test_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="unknown discover setting"):
        settings({"min_cluster_sise": 3})


def test_tiny_strata_are_not_tested_alone_and_tiny_sets_are_not_non_iid_tested():
    """A site with 4 images in a region (tiny cohorts) must neither reach the drift test (cleanlab's kNN graph
    needs more rows and it then has no result) nor be named as the one site carrying an effect."""
    import numpy as np

    from cohortlens.analysis.discover.core import confine_to_stratum
    from cohortlens.analysis.discover.drift import drift_test

    rng = np.random.default_rng(0)
    assert np.isnan(drift_test(rng.normal(size=(4, 5)), np.arange(4.0), None, 9, rng)[1])
    strata = np.array(["A"] * 30 + ["B"] * 4, dtype=object)

    def within(keep):
        assert keep.sum() >= 10, "a 4-image stratum was tested on its own"
        return 0.01

    site, p_without = confine_to_stratum(lambda keep: 0.5, strata, 0.05, test_within=within)
    assert site is None and p_without == {"B": 0.5}


def labelled_region(n=300, dims=16, seed=0, flipped=0.05) -> RegionData:
    """A region whose embedding carries a target (diagnosis) and a protected attribute (sex) equally well, each
    with the same share of recorded values flipped: only the attribute's role differs."""
    from cohortlens.analysis.discover.core import reduce_embedding

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dims)).astype(np.float32)
    X[:, 0] += np.where(rng.random(n) < 0.5, 3.0, -3.0)
    X[:, 1] += np.where(rng.random(n) < 0.5, 3.0, -3.0)
    diagnosis = np.where(X[:, 0] > 0, "disease", "healthy")
    sex = np.where(X[:, 1] > 0, "M", "F")
    for labels, other in ((diagnosis, {"disease": "healthy", "healthy": "disease"}), (sex, {"F": "M", "M": "F"})):
        flip = rng.random(n) < flipped
        labels[flip] = [other[v] for v in labels[flip]]
    frame = pl.DataFrame({
        "image_uid": [f"S{i:04d}/neck" for i in range(n)], "subject_id": [f"S{i:04d}" for i in range(n)],
        "region": ["neck"] * n, "diagnosis": diagnosis.tolist(), "sex": sex.tolist(),
        "split": rng.choice(["train", "val", "test"], n, p=[0.7, 0.15, 0.15]).tolist(),
    })
    specs = {"diagnosis": AttributeSpec("diagnosis", "categorical", "target", categories=("healthy", "disease")),
             "sex": AttributeSpec("sex", "categorical", "protected", categories=("F", "M"))}
    return RegionData("neck", frame, reduce_embedding(X, 10), specs, 10, X=X, model="synthetic")


@pytest.mark.slow
def test_cleanlab_label_issues_only_for_target_attributes():
    from cohortlens.analysis.discover.quality import data_quality

    rd = labelled_region()
    found = data_quality(rd, _cfg(), np.random.default_rng(0))
    issues = [f for f in found if f.kind == "label_issue"]
    assert {f.attribute for f in issues} == {"diagnosis"}, [f.summary for f in issues]
    assert issues[0].flagged and issues[0].sample_ids
    # the feature-space checks still run
    assert not any(f.kind in ("outlier", "near_duplicate") and not f.sample_ids for f in found)


def test_report_says_protected_labels_were_not_shown_wrong():
    from cohortlens.report.findings import label_issue_note

    frame = findings_frame([Finding("discordant_subgroup", "neck", "sex", None, 0.05, "discordant_fraction", 1e-4,
                                    300, ["S0001/neck"], "sex-discordant images", finding_id="discordant_subgroup-neck-sex")])
    note = label_issue_note(frame)
    assert "target attributes only" in note and "not shown to be wrong" in note
    assert "discordant_subgroup-neck-sex" in note
    assert "none significant" in label_issue_note(frame.clear())


def test_explanation_titles_carry_no_identifiers():
    """The explanation PNG's title is drawn into its pixels, where a publication's text scan cannot see it: image
    uids and subject ids of the cohort become "[id]", everything else stays."""
    from cohortlens.analysis.discover.explain import without_ids

    uids = {"S00148/neck": "neck", "S00162/neck": "neck", "S00200/chest": "chest"}
    text = "cleanlab flags 2 of 300 neck images as near-duplicates: S00148/neck, S00162/neck; subject S00200 too"
    out = without_ids(text, uids)
    assert "S00148" not in out and "S00162" not in out and "S00200" not in out, out
    assert out.startswith("cleanlab flags 2 of 300 neck images as near-duplicates: [id], [id]; subject [id]")
    assert without_ids("site Essen, n=37", uids) == "site Essen, n=37"


def test_pocket_searches_are_one_holm_family_and_every_search_counts():
    """A pocket at p = 0.012 is a finding when BH pools it with density clusters at p = 1e-60, not when Holm
    counts the model's pocket searches (a search that found nothing counts, at p = 1)."""
    from cohortlens.analysis.discover.core import adjust
    from cohortlens.analysis.stats import holm_adjust

    assert np.allclose(holm_adjust(np.array([0.01, 0.04, np.nan, 0.03])), [0.03, 0.06, np.nan, 0.06],
                       equal_nan=True)
    clusters = [Finding("cluster", "neck", "site", "A", 5.0, "enrichment_ratio", 1e-60, 50, [], "c")
                for _ in range(10)]
    chance = Finding("cluster", "lumbar", "site", "M", 3.0, "enrichment_ratio", 0.012, 24, [], "p",
                     tag="pocket", family="pocket")
    real = Finding("cluster", "neck", "site", "E", 6.0, "enrichment_ratio", 0.001, 60, [], "p", tag="pocket",
                   family="pocket")
    searches = [Finding("cluster", r, "vendor", None, 0.0, "enrichment_ratio", 1.0, 0, [], "none",
                        family="pocket") for r in ("neck", "chest", "lumbar", "chest", "lumbar")]
    adjust(clusters + [chance, real] + searches)
    assert real.p_adjusted == pytest.approx(0.007) and real.is_finding(0.05)
    assert chance.p_adjusted == pytest.approx(0.072) and not chance.is_finding(0.05)
    assert "Holm over 7 pocket searches" in chance.details["correction"] and "Holm-adjusted" in chance.description
    pooled = Finding("cluster", "lumbar", "site", "M", 3.0, "enrichment_ratio", 0.012, 24, [], "p", tag="pocket")
    adjust([*clusters, pooled])
    assert pooled.is_finding(0.05)  # what BH within the kind did

"""The test scenarios (confounded, null): determinism, planted correlations and effects, ground truth, and the
scoring of findings against root causes, echoes and negative controls."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from cohortlens.analysis.discover.core import FINDINGS_SCHEMA
from cohortlens.cli import main as cli_main
from cohortlens.demo import population as pop
from cohortlens.demo import scenarios as sc
from cohortlens.demo.generate import generate_demo_cohort
from cohortlens.demo.truth import (
    RECALL_SCHEMA,
    classify_findings,
    ground_truth_recall,
    ground_truth_summary,
)

from conftest import REPO

SMALL = dict(n_subjects=24, size=32, n_slices=6, dicom_fraction=0.25, seed=3)


def read_manifest(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def confounded(tmp_path_factory):
    out = tmp_path_factory.mktemp("confounded")
    summary = generate_demo_cohort(out, n_subjects=120, size=32, n_slices=6, dicom_fraction=0.1, seed=5,
                                   workers=2, scenario="confounded", bad_inputs=True)
    return out, summary, read_manifest(summary["manifest"]), json.loads(Path(summary["ground_truth"]).read_text())


# ---------------------------------------------------------------- files and determinism


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["confounded", "null"])
def test_scenarios_are_deterministic(tmp_path, scenario):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_demo_cohort(a, workers=1, scenario=scenario, **SMALL)
    generate_demo_cohort(b, workers=2, scenario=scenario, **SMALL)
    fa, fb = files(a), files(b)
    assert fa == fb and "attributes.yaml" in fa and len(fa) > 24 * 3
    generate_demo_cohort(c, workers=2, scenario=scenario, **{**SMALL, "seed": 4})
    assert fa["manifest.csv"] != files(c)["manifest.csv"]


def test_default_scenario_is_the_demo(tmp_path):
    generate_demo_cohort(tmp_path / "a", workers=1, **SMALL)
    generate_demo_cohort(tmp_path / "b", workers=1, scenario="demo", **SMALL)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert not (tmp_path / "a" / "attributes.yaml").exists()  # the demo's output is what it always was
    with pytest.raises(ValueError, match="unknown scenario"):
        generate_demo_cohort(tmp_path / "c", scenario="confunded", **SMALL)


def test_cli_scenario(tmp_path, capsys):
    assert cli_main(["demo-data", str(tmp_path), "--scenario", "null", "--subjects", "6", "--size", "32",
                     "--slices", "4", "--workers", "1", "--dicom-fraction", "0"]) == 0
    assert "'scenario': 'null'" in capsys.readouterr().out
    assert json.loads((tmp_path / "ground_truth.json").read_text())["scenario"] == "null"


@pytest.mark.slow
def test_attributes_yaml_declares_every_column_in_config_format(confounded):
    out, _, rows, _ = confounded
    attrs = yaml.safe_load((out / "attributes.yaml").read_text())["attributes"]
    assert set(rows[0]) - {"subject_id", "image", "region"} == set(attrs)
    assert {a for a, s in attrs.items() if s["role"] == "acquisition"} == {"site", "vendor", "batch", "date"}
    assert {a for a, s in attrs.items() if s["role"] == "protected"} == {"sex", "age", "height", "weight"}
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    import jsonschema

    jsonschema.validate(attrs, schema["properties"]["attributes"])
    clean = [r for r in rows if r["subject_id"].startswith("S")]
    for name, spec in attrs.items():
        if "categories" in spec:
            assert {r[name] for r in clean} <= set(spec["categories"]), name
        if spec["type"] == "continuous":
            assert all(spec["min"] <= float(r[name]) <= spec["max"] for r in clean), name
    for r in clean:  # subject-level: one value per subject
        first = next(x for x in clean if x["subject_id"] == r["subject_id"])
        assert all(r[a] == first[a] for a in attrs)


# ---------------------------------------------------------------- the confounded cohort's design


def test_confounded_manifest_has_the_planted_correlations(confounded):
    _, summary, rows, _ = confounded
    assert summary["n_images"] == 3 * 120 + 10 and tuple(rows[0]) == sc.CONFOUNDED_COLUMNS
    subjects = sc.sample_confounded_subjects(4000, 5)
    assert [s["site"] for s in subjects[:120]] == [r["site"] for r in rows if r["region"] == "neck"][:120]

    def share(pred, where):
        sel = [s for s in subjects if where(s)]
        return np.mean([pred(s) for s in sel])

    # vendor follows the site, but every site has both vendors
    x_share = {site: share(lambda s: s["vendor"] == "X", lambda s, site=site: s["site"] == site) for site in pop.SITES}
    assert x_share["Berlin"] > 0.7 and x_share["Essen"] > 0.8 and x_share["Hamburg"] < 0.25
    assert x_share["Mannheim"] < 0.3 and all(0.03 < x < 0.97 for x in x_share.values())
    # site-dependent demographics
    male = {site: share(lambda s: s["sex"] == "M", lambda s, site=site: s["site"] == site) for site in pop.SITES}
    assert male["Essen"] < min(v for k, v in male.items() if k != "Essen") - 0.08
    age = {site: share(lambda s: s["age"], lambda s, site=site: s["site"] == site) for site in pop.SITES}
    assert age["Mannheim"] > max(v for k, v in age.items() if k != "Mannheim") + 8
    weight = {site: share(lambda s: s["weight"], lambda s, site=site: s["site"] == site) for site in pop.SITES}
    assert weight["Essen"] > max(v for k, v in weight.items() if k != "Essen") + 4
    assert share(lambda s: s["height"], lambda s: s["sex"] == "M") - share(lambda s: s["height"],
                                                                           lambda s: s["sex"] == "F") > 0.1
    # Essen recruited early; the batch mostly follows the half-year of the date
    assert max(s["date"] for s in subjects if s["site"] == "Essen") <= "2015-11-30"
    follows = share(lambda s: s["batch"] == sc.batch_of(s["date"], 0.0, 0), lambda s: True)
    assert 0.7 < follows < 0.82
    # a 4 % opposite-sex subgroup whose regions carry the other sex's features
    assert 0.03 < share(lambda s: s["discordant_subgroup"], lambda s: True) < 0.05
    assert all(s["feature_sex"][r] == s["sex"] for s in subjects if not s["discordant_subgroup"] for r in pop.REGIONS)


def test_confounded_image_effects_are_where_they_are_planted():
    eff = sc.confounded_effects()
    base = {**sc.sample_confounded_subject(2, 1), "site": "Berlin", "vendor": "X", "batch": "B2",
            "date": "2015-03-01"}

    def render(region, **kw):
        return pop.render_subject({**base, **kw}, region, 32, 4, 2, eff)

    for region in pop.REGIONS:
        ref = render(region)
        # the protocol change: only Hamburg, only from its date, in every region
        hamburg = [render(region, site="Hamburg", date=d) for d in ("2014-07-01", "2015-09-30", "2015-10-01",
                                                                    "2017-05-30")]
        assert np.array_equal(ref, hamburg[0]) and np.array_equal(ref, hamburg[1])
        assert np.array_equal(hamburg[2], hamburg[3]) and not np.array_equal(hamburg[1], hamburg[2])
        for site in ("Berlin", "Mannheim", "Neubrandenburg"):
            assert np.array_equal(ref, render(region, site=site, date="2016-06-01")), (site, region)
        # the FOV shift: Essen necks only
        assert np.array_equal(ref, render(region, site="Essen")) == (region != "neck")
        # vendor Y's bias field everywhere; weight and batch change nothing
        assert not np.array_equal(ref, render(region, vendor="Y"))
        assert np.array_equal(ref, render(region, weight=base["weight"] + 30, batch="B6"))
    # body fat follows the latent adiposity, not the recorded weight
    fat = render("lumbar", render={"weight": base["render"]["weight"] + 30})
    assert not np.array_equal(render("lumbar"), fat)


def _balanced_accuracy(X, y) -> float:
    Z = PCA(24, random_state=0).fit_transform((X - X.mean(0)) / (X.std(0) + 1e-6))
    pred = cross_val_predict(LogisticRegression(C=0.1, max_iter=3000), Z / Z.std(0), y,
                             cv=StratifiedKFold(5, shuffle=True, random_state=0))
    return balanced_accuracy_score(y, pred)


@pytest.mark.slow
def test_confounded_sex_signal_is_only_moderate():
    subjects = [s for s in sc.sample_confounded_subjects(300, 8) if not s["discordant_subgroup"]]
    sex = np.array([s["sex"] for s in subjects])
    acc = {}
    for effects, name in ((sc.confounded_effects(), "confounded"), (None, "demo")):
        for region in ("neck", "lumbar"):
            X = np.stack([(lambda v: (v[1:3] / v.max()).ravel())(
                pop.render_subject(s, region, 32, 4, 8, effects).astype(np.float32)) for s in subjects])
            acc[name, region] = _balanced_accuracy(X, sex)
    conf = np.mean([acc["confounded", r] for r in ("neck", "lumbar")])
    assert 0.68 < conf < 0.9, acc
    assert all(acc["demo", r] > acc["confounded", r] + 0.05 for r in ("neck", "lumbar")), acc


# ---------------------------------------------------------------- ground truth


def test_confounded_ground_truth_lists_root_causes_echoes_and_controls(confounded):
    _, _, rows, gt = confounded
    assert gt["scenario"] == "confounded" and len(gt["expected_quarantine"]) == 10
    effects = {e["name"]: e for e in gt["effects"]}
    assert set(effects) == {"sex_shape_texture", "age_anatomy", "height_vertebrae", "vendor_bias_field",
                            "site_fov_shift", "site_protocol_change", "discordant_sex"}
    assert (effects["vendor_bias_field"]["attribute"], effects["vendor_bias_field"]["value"]) == ("vendor", "Y")
    assert effects["site_fov_shift"]["value"] == "Essen" and effects["site_fov_shift"]["regions"] == ["neck"]
    protocol = effects["site_protocol_change"]
    assert (protocol["value"], protocol["interaction"], protocol["from_date"]) == ("Hamburg", "date", "2015-10-01")
    assert protocol["regions"] == list(pop.REGIONS)
    assert {c["attribute"] for c in gt["negative_controls"]} == {"weight", "batch"}
    assert gt["echoes"] and {e["kind"] for e in gt["echoes"]} == {"cluster", "attribute_leak", "interaction"}
    for echo in gt["echoes"]:
        cause = echo["explained_by"]
        root = [e for e in gt["effects"] if e["attribute"] == cause["attribute"] and e.get("value") == cause.get("value")]
        assert root, echo  # every echo names one planted root cause
        assert echo["attribute"] not in {c["attribute"] for c in gt["negative_controls"]} or echo["kind"] == "interaction"
    disc = effects["discordant_sex"]
    ids = {r["subject_id"] for r in rows}
    assert set(disc["subgroup"]) <= ids and disc["confounder"]["attribute"] == "height"
    assert set().union(*map(set, disc["subjects"].values())) <= set(disc["subgroup"])
    assert gt["design"]["realised"]["mean_height_by_sex"]["M"] > gt["design"]["realised"]["mean_height_by_sex"]["F"]


def test_null_scenario_labels_are_independent_of_the_images(tmp_path):
    kw = {**SMALL, "n_subjects": 40, "dicom_fraction": 0.0}
    generate_demo_cohort(tmp_path / "demo", workers=2, **kw)
    summary = generate_demo_cohort(tmp_path / "null", workers=2, scenario="null", **kw)
    demo_rows, null_rows = read_manifest(tmp_path / "demo" / "manifest.csv"), read_manifest(summary["manifest"])
    assert [r["image"] for r in demo_rows] == [r["image"] for r in null_rows]
    for rel in {r["image"] for r in demo_rows}:  # the very same voxels ...
        assert (tmp_path / "demo" / rel).read_bytes() == (tmp_path / "null" / rel).read_bytes(), rel
    # ... under permuted acquisition labels: same (site, date) pairs, mostly on other subjects
    pairs = lambda rows: sorted((r["site"], r["date"]) for r in rows)
    assert pairs(demo_rows) == pairs(null_rows)
    moved = np.mean([a["date"] != b["date"] for a, b in zip(demo_rows, null_rows)])
    assert moved > 0.8
    assert all(a[k] == b[k] for a, b in zip(demo_rows, null_rows) for k in ("sex", "age", "height", "weight"))
    # rendering a null subject ignores its recorded site and date
    s = sc.null_subjects(40, 3)[7]
    same = pop.render_subject(s, "neck", 32, 4, 3)
    assert np.array_equal(same, pop.render_subject({**s, "site": "Essen", "date": "2017-01-01"}, "neck", 32, 4, 3))
    gt = json.loads(Path(summary["ground_truth"]).read_text())
    assert {e["attribute"] for e in gt["effects"]} == {"sex", "age", "weight", "height"}
    assert {c["attribute"] for c in gt["negative_controls"]} == {"site", "date"} and gt["echoes"] == []
    assert yaml.safe_load((tmp_path / "null" / "attributes.yaml").read_text())["attributes"]["site"]["role"] == \
        "acquisition"


# ---------------------------------------------------------------- scoring root causes, echoes, false findings

TRUTH = {
    "effects": [
        {"name": "sex_leak", "attribute": "sex", "regions": ["neck", "chest"]},
        {"name": "essen_shift", "attribute": "site", "value": "Essen", "regions": ["neck"]},
        {"name": "hamburg_protocol", "attribute": "site", "value": "Hamburg", "regions": ["neck", "chest"],
         "interaction": "date", "from_date": "2015-10-01"},
        {"name": "vendor_field", "attribute": "vendor", "value": "Y", "complement_values": ["X"],
         "regions": ["neck", "chest"]},
    ],
    "echoes": [
        {"name": "essen_years", "kind": "cluster", "attribute": "date", "value": ["2014", "2015"],
         "regions": ["neck"], "explained_by": {"attribute": "site", "value": "Essen"}},
        {"name": "vendor_date", "kind": "interaction", "attribute": "vendor", "value": "Y", "interaction": "date",
         "regions": ["neck", "chest"], "explained_by": {"attribute": "site", "value": "Hamburg"}},
    ],
    "negative_controls": [{"attribute": "batch"}, {"attribute": "weight"}],
}


def finding(fid, kind, region, attribute, value=None, q=0.01, effect=3.0, details=None, explained_by=None):
    return {"finding_id": fid, "kind": kind, "region": region, "attribute": attribute, "value": value,
            "effect_size": effect, "effect_measure": "m", "p_value": q, "p_adjusted": q, "n": 10,
            "sample_ids": ["S1/neck"], "description": fid, "evidence": [], "details": json.dumps(details or {}),
            "explained_by": explained_by}


def frame(rows, with_explained_by=True) -> pl.DataFrame:
    schema = {f.name: pl.from_arrow(FINDINGS_SCHEMA.empty_table()).schema[f.name] for f in FINDINGS_SCHEMA}
    out = pl.DataFrame(rows, schema={**schema, "explained_by": pl.Utf8})
    return out if with_explained_by else out.drop("explained_by")


ONSET = {"onset": "2015-10-12", "direction": "from"}
ROWS = [
    finding("sex-neck", "attribute_leak", "neck", "sex"),
    finding("sex-chest", "attribute_leak", "chest", "sex"),
    finding("essen", "cluster", "neck", "site", "Essen"),  # the root cause itself
    finding("hamburg", "cluster", "chest", "site", "Hamburg"),
    finding("hamburg-date", "cluster", "chest", "site|vendor×date", "Hamburg|Y, from 2015-10-12", details=ONSET),
    finding("vendor-x", "cluster", "chest", "vendor", "X"),  # the other vendor's images: the same effect
    finding("year-folded", "cluster", "neck", "date", "2014", explained_by="site=Essen"),  # echo, explained
    finding("vendor-date", "attribute_leak", "chest", "vendor×date", "Y"),  # echo, unexplained
    finding("batch", "cluster", "neck", "batch", "B2"),  # negative control
    finding("weight-folded", "attribute_leak", "neck", "weight", explained_by="height"),  # control, explained
    finding("berlin-chest", "cluster", "chest", "site", "Berlin"),  # matches nothing
    finding("outliers", "outlier", "neck", "embedding", q=None),  # data quality: no verdict on attributes
    finding("weak", "cluster", "neck", "site", "Mannheim", q=0.2),  # not significant: ignored
]


def test_verdicts_fold_echoes_and_count_false_findings():
    v = classify_findings(frame(ROWS), TRUTH)
    verdict = dict(zip(v["finding_id"].to_list(), v["verdict"].to_list()))
    assert "weak" not in verdict
    assert verdict == {
        "sex-neck": "planted", "sex-chest": "planted", "essen": "planted", "hamburg": "planted",
        "hamburg-date": "planted", "vendor-x": "planted", "year-folded": "folded", "vendor-date": "unexplained_echo",
        "batch": "false", "weight-folded": "folded", "berlin-chest": "false", "outliers": "data_quality"}
    root = dict(zip(v["finding_id"].to_list(), v["root_cause"].to_list()))
    assert root["year-folded"] == "essen_shift" and root["vendor-date"] == "hamburg_protocol"
    assert root["weight-folded"] is None  # height is no root cause of this truth: folded all the same
    named_like_a_finding = frame([finding("d", "cluster", "chest", "date", "2016", explained_by="site×date=Hamburg")])
    assert classify_findings(named_like_a_finding, TRUTH)["root_cause"].to_list() == ["hamburg_protocol"]

    s = ground_truth_summary(frame(ROWS), TRUTH)
    assert (s["recall"], s["false_findings"], s["unexplained_echoes"], s["folded"]) == (1.0, 2, 1, 2)
    assert sorted(s["false_finding_ids"]) == ["batch", "berlin-chest"] and s["unexplained_echo_ids"] == ["vendor-date"]
    assert s["explained_by_non_root_ids"] == ["weight-folded"]


def test_explained_findings_are_no_findings_of_their_own():
    # the Essen cluster itself explained by the vendor: folded, so the Essen effect is not found
    rows = [r if r["finding_id"] != "essen" else {**r, "explained_by": "vendor=X"} for r in ROWS]
    s = ground_truth_summary(frame(rows), TRUTH)
    assert s["missed"] == ["essen_shift"] and s["recall"] == 0.75
    # the echo given its root cause is folded; a negative-control finding given one is no false finding
    rows = [{**r, "explained_by": "site=Hamburg"} if r["finding_id"] in ("vendor-date", "batch") else r for r in ROWS]
    s = ground_truth_summary(frame(rows), TRUTH)
    assert (s["false_findings"], s["unexplained_echoes"], s["folded"]) == (1, 0, 4)


def test_absent_explained_by_reads_as_null():
    rows = [{**r, "explained_by": None} for r in ROWS]
    with_col = ground_truth_summary(frame(rows), TRUTH)
    without = ground_truth_summary(frame(rows, with_explained_by=False), TRUTH)
    assert with_col == without
    # the echo and the control that had been explained are now an unexplained echo and a false finding
    assert (without["false_findings"], without["unexplained_echoes"], without["folded"]) == (3, 2, 0)
    empty = ground_truth_summary(frame([{**r, "explained_by": ""} for r in ROWS]), TRUTH)
    assert empty == without


def test_recall_table_gains_echo_and_false_finding_columns_and_rows():
    rec = ground_truth_recall(frame(ROWS), TRUTH)
    assert list(rec.schema) == list(RECALL_SCHEMA)
    by = {r["effect"]: r for r in rec.iter_rows(named=True)}
    assert all(by[e["name"]]["found"] for e in TRUTH["effects"])
    assert by["essen_shift"]["explained_ids"] == ["year-folded"] and by["essen_shift"]["row_type"] == "effect"
    assert by["hamburg_protocol"]["unexplained_echoes"] == 1
    assert by["negative control: batch"]["found"] and by["negative control: batch"]["false_findings"] == 1
    assert not by["negative control: weight"]["found"] and by["negative control: weight"]["explained_ids"] == \
        ["weight-folded"]
    assert by["echo: vendor_date"]["found"] and by["echo: vendor_date"]["finding_ids"] == ["vendor-date"]
    assert not by["echo: essen_years"]["found"] and by["echo: essen_years"]["explained_ids"] == ["year-folded"]
    assert by["false findings"]["false_findings"] == 2 and sorted(by["false findings"]["finding_ids"]) == \
        ["batch", "berlin-chest"]
    # a demo-style truth (no echoes) keeps its rows: one per effect and per control
    demo_truth = {k: v for k, v in TRUTH.items() if k != "echoes"}
    assert ground_truth_recall(frame(ROWS), demo_truth).height == len(TRUTH["effects"]) + 2


def test_scoring_a_perfect_detector_on_the_confounded_truth(confounded):
    """Findings as a detector that conditions on the other attributes would report them: every root cause
    found, every echo folded under its root cause: recall 1, nothing false, nothing unexplained."""
    _, _, _, gt = confounded
    eff = {e["name"]: e for e in gt["effects"]}
    rows = []
    for region in gt["effects"][0]["regions"]:
        rows += [finding(f"{a}-{region}", "attribute_leak", region, a) for a in ("sex", "age", "height")]
        rows += [finding(f"disc-{region}", "discordant_subgroup", region, "sex", q=0.001)]
        rows += [finding(f"vendor-{region}", "cluster", region, "vendor", "Y"),
                 finding(f"vendorX-{region}", "cluster", region, "vendor", "X"),
                 finding(f"mannheim-{region}", "cluster", region, "site", "Mannheim", explained_by="vendor=Y"),
                 finding(f"weight-{region}", "attribute_leak", region, "weight", explained_by="height")]
    rows += [finding("co", "discordant_subgroup", "all", "sex", "co-occurrence"),
             finding("essen", "cluster", "neck", "site", "Essen"),
             finding("essen-2014", "cluster", "neck", "date", "2014", explained_by="site=Essen"),
             finding("batch-B1", "cluster", "neck", "batch", "B1", explained_by="site=Essen"),
             finding("hamburg", "cluster", "chest", "site", "Hamburg"),
             finding("essen-chest", "cluster", "chest", "site", "Essen", explained_by="vendor=X"),  # X side
             finding("hamburg-date", "cluster", "chest", "site|vendor|batch×date", "Hamburg|Y|B4, from 2015-10-20",
                     details={"onset": "2015-10-20", "direction": "from"}),
             finding("vendor-date", "attribute_leak", "chest", "vendor×date", "Y", explained_by="site=Hamburg")]
    s = ground_truth_summary(frame(rows), gt)
    assert s["recall"] == 1.0 and s["missed"] == [], s
    assert (s["false_findings"], s["unexplained_echoes"], s["explained_by_non_root_ids"]) == (0, 0, []), s
    assert eff["vendor_bias_field"]["complement_values"] == ["X"]
    # the same findings from a marginal detector (nothing explained): echoes and controls count against it
    marginal = ground_truth_summary(frame([{**r, "explained_by": None} for r in rows]), gt)
    # Mannheim in 3 regions, Essen's chest through the other vendor, the Essen years, vendor×date
    assert marginal["unexplained_echoes"] == 3 + 1 + 1 + 1
    assert marginal["false_findings"] == 3 + 1  # weight in 3 regions, batch

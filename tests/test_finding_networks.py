"""The networks trained per model after the discover stage, on a tiny synthetic preprocessed cohort: the discordant
subgroup's training curves (paper 003, Fig. 3) and the set-vs-rest classifier with GradCAM per finding (paper 003,
3.1); their config section; their place in the report."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from PIL import Image

from cohortlens.analysis.discover.core import Finding, findings_table
from cohortlens.analysis.finding_network_settings import PRESETS, curve_settings, saliency_settings
from cohortlens.analysis.saliency import INDEX_SCHEMA, saliency_findings, write_saliency
from cohortlens.analysis.subgroup_curves import CURVE_SCHEMA, subgroup_findings, write_subgroup_curves
from cohortlens.config import config_problems
from cohortlens.io.tables import write_parquet
from cohortlens.report.findings import findings_section
from cohortlens.report.sections import DEFAULTS as REPORT_DEFAULTS

from conftest import REPO, demo_config

CANVAS, N_SLICES, N_SUBJECTS = 64, 6, 60
REGIONS = ("neck", "chest")
ATTRIBUTES = {"sex": {"type": "categorical", "role": "protected", "categories": ["F", "M"]},
              "site": {"type": "categorical", "role": "acquisition", "categories": ["A", "B"]}}
SQUARE = (slice(8, 24), slice(40, 56))  # the planted set's bright square (rows, cols): the top-right quadrant
ENGINE = {"crop": CANVAS, "width": 0.125, "batch_size": 16, "lr": 3e-3, "lr_schedule": "constant", "log_every": 2,
          "checkpoint_every": 100, "progress_seconds": 0, "num_workers": 0, "predict_batch_size": 128, "seed": 0}
CFG = {"curves": {**ENGINE, "lr": 1e-3, "epochs": 3, "steps_per_epoch": 20, "max_eval_images": None},
       "saliency": {**ENGINE, "stem_stride": 1, "epochs": 2, "steps_per_epoch": 10, "n_bootstrap": 50,
                    "max_rest_images": None}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """60 subjects x 2 regions x 6 slices of 64 px (the middle 4 are center slices), written as the preprocess and
    cohort stages write them. Sex M has a bright top-left corner; the flagged subgroup (every 6th subject) is drawn
    as the other sex; the planted set (every 3rd subject's neck) has a bright square in the top-right quadrant.
    Splits: subjects 0-2 of every 5 train, 3 val, 4 test."""
    root = tmp_path_factory.mktemp("finding_networks")
    rng = np.random.default_rng(0)
    ids = [f"S{i:03d}" for i in range(N_SUBJECTS)]
    sex = np.array(["F", "M"])[rng.permutation(np.arange(N_SUBJECTS) % 2)]
    flagged = np.arange(N_SUBJECTS) % 6 == 1
    in_set = np.arange(N_SUBJECTS) % 3 == 0
    split = np.array(["train", "train", "train", "val", "test"])[np.arange(N_SUBJECTS) % 5]
    slices, index = [], []
    for i, sid in enumerate(ids):
        looks_male = (sex[i] == "M") != flagged[i]
        for region in REGIONS:
            for pos in range(N_SLICES):
                img = rng.normal(0, 0.15, (CANVAS, CANVAS)) - 0.6
                img[16:48, 16:48] += 0.5  # a body
                if looks_male:
                    img[2:22, 2:22] += 1.2
                if in_set[i] and region == "neck":
                    img[SQUARE] += 1.0
                index.append({"slice_uid": f"{sid}/{region}/{pos}", "image_uid": f"{sid}/{region}",
                              "subject_id": sid, "region": region, "shard": 0, "row": len(slices),
                              "slice_position": pos, "is_center": 1 <= pos <= 4})
                slices.append(np.clip(img, -1, 1))
    (root / "pre").mkdir()
    np.save(root / "pre" / "shard-0.npy", np.stack(slices).astype(np.float16))
    write_parquet(pl.DataFrame(index), root / "pre" / "index.parquet")
    site = np.array(["A", "B"])[np.arange(N_SUBJECTS) % 2]
    write_parquet(pl.DataFrame({"subject_id": ids, "sex": sex.tolist(), "site": site.tolist()}),
                  root / "subjects.parquet", metadata={"attributes": ATTRIBUTES})
    write_parquet(pl.DataFrame({"subject_id": ids, "split": split.tolist()}), root / "splits.parquet")
    flagged_ids = [s for s, f in zip(ids, flagged) if f]
    set_ids = [f"{s}/neck" for s, f in zip(ids, in_set) if f]
    # a set nothing in the images separates: every 3rd subject's chest, shifted by 2 (no square, not flagged)
    random_ids = [f"{s}/chest" for i, s in enumerate(ids) if i % 3 == 2]
    (root / "explain").mkdir()
    Image.new("RGB", (8, 8), "white").save(root / "explain" / "mean.png")
    evidence = [str(root / "explain" / "mean.png")]
    subgroup = Finding("discordant_subgroup", "all", "sex", "co-occurrence", 12.0, "observed_over_expected", 1e-4,
                       N_SUBJECTS, [f"{s}/{r}" for s in flagged_ids for r in REGIONS], "planted subgroup",
                       {"subjects": flagged_ids, "paper_subjects": flagged_ids[:2]},
                       finding_id="discordant_subgroup-all-sex-co_occurrence", evidence=evidence)
    cluster = Finding("cluster", "neck", "site", "A", 3.0, "enrichment_ratio", 1e-3, N_SUBJECTS, set_ids,
                      "planted square", {}, finding_id="cluster-neck-site-a-pocket", evidence=evidence)
    noise = Finding("cluster", "chest", "site", "B", 2.0, "enrichment_ratio", 1e-2, N_SUBJECTS, random_ids,
                    "a set without a difference", {}, finding_id="cluster-chest-site-b-pocket", evidence=evidence)
    leak = Finding("attribute_leak", "neck", "sex", None, 0.3, "balanced_accuracy_gain", 1e-3, N_SUBJECTS,
                   set_ids, "a leak (no classifier: not a cluster or subgroup)", {}, finding_id="attribute_leak-neck-sex")
    write_parquet(findings_table([subgroup, cluster, noise, leak]), root / "findings.parquet")
    write_parquet(findings_table([cluster]), root / "no-subgroup.parquet")
    return SimpleNamespace(root=root, flagged=flagged_ids, set_ids=set_ids, split=dict(zip(ids, split)))


def stage_files(c):
    return c.root / "pre" / "index.parquet", c.root / "subjects.parquet", c.root / "splits.parquet"


# ------------------------------------------------------------------------------------------------ training curves


@pytest.fixture(scope="module")
def curves(cohort):
    out = cohort.root / "results" / "findings" / "m"
    frame = write_subgroup_curves(cohort.root / "findings.parquet", *stage_files(cohort), csv_out=out / "c.csv",
                                  png_out=out / "c.png", out_dir=out, model="m",
                                  attributes=ATTRIBUTES, cfg=CFG, threads=1)
    return out, frame


def test_the_subgroup_finding_names_its_flagged_subjects(cohort):
    found = subgroup_findings(pl.read_parquet(cohort.root / "findings.parquet"))
    assert [(f["finding_id"], f["attribute"]) for f in found] == [("discordant_subgroup-all-sex-co_occurrence", "sex")]
    assert found[0]["subjects"] == cohort.flagged  # details.subjects (the calibrated set), not paper_subjects
    assert subgroup_findings(pl.read_parquet(cohort.root / "no-subgroup.parquet")) == []


def test_curves_have_one_row_per_epoch_split_and_group_with_the_group_sizes(cohort, curves):
    out, frame = curves
    on_disk = pl.read_csv(out / "c.csv", schema=CURVE_SCHEMA)
    assert on_disk.columns == ["finding_id", "attribute", "epoch", "split", "group", "accuracy", "n"]
    assert on_disk.equals(frame)
    keys = on_disk.select("epoch", "split", "group").rows()
    assert len(keys) == len(set(keys)) == 3 * 2 * 2
    assert set(keys) == {(e, s, g) for e in (1, 2, 3) for s in ("train", "val") for g in ("flagged", "rest")}
    # n: the images of each cell (every image scored: max_eval_images null), the same after every epoch
    for split in ("train", "val"):
        flagged = sum(cohort.split[s] == split for s in cohort.flagged) * len(REGIONS)
        everyone = sum(v == split for v in cohort.split.values()) * len(REGIONS)
        n = dict(on_disk.filter((pl.col("split") == split) & (pl.col("epoch") == 1)).select("group", "n").rows())
        assert n == {"flagged": flagged, "rest": everyone - flagged} and flagged > 0
    assert on_disk["accuracy"].is_between(0, 1).all()
    assert (out / "c.png").stat().st_size > 0


def test_the_flagged_group_lags_the_rest(curves):
    """The flagged subjects are drawn as the other sex: when the classifier has learnt the rest, it is wrong on their
    recorded sex (later it may memorise them, as in paper 003)."""
    _, frame = curves
    train = frame.filter(pl.col("split") == "train").pivot(on="group", index="epoch", values="accuracy").sort("epoch")
    learnt = train.filter(pl.col("rest") >= 0.9)
    assert learnt.height, train
    assert learnt["flagged"][0] < learnt["rest"][0] - 0.3, train


def test_a_rerun_loads_the_finished_network_and_writes_the_same_curves(cohort, curves, tmp_path):
    out, frame = curves
    checkpoints = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*.pt")}
    assert checkpoints
    again = write_subgroup_curves(cohort.root / "findings.parquet", *stage_files(cohort), csv_out=tmp_path / "c.csv",
                                  png_out=tmp_path / "c.png", out_dir=out, attributes=ATTRIBUTES, cfg=CFG)
    assert again.equals(frame)  # from the checkpoint's log: the callback did not run again
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*.pt")} == checkpoints


def test_without_a_subgroup_the_csv_has_only_its_header(cohort, tmp_path):
    frame = write_subgroup_curves(cohort.root / "no-subgroup.parquet", *stage_files(cohort),
                                  csv_out=tmp_path / "c.csv", png_out=tmp_path / "c.png",
                                  out_dir=tmp_path, attributes=ATTRIBUTES, cfg=CFG)
    assert frame.height == 0
    assert (tmp_path / "c.csv").read_text().strip() == "finding_id,attribute,epoch,split,group,accuracy,n"
    assert (tmp_path / "c.png").stat().st_size > 0 and not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ saliency


@pytest.fixture(scope="module")
def saliency(cohort):
    out = cohort.root / "results" / "findings" / "m"
    frame, maps = write_saliency(cohort.root / "findings.parquet", *stage_files(cohort), attributes=ATTRIBUTES,
                                 cfg=CFG, png_dir=out / "saliency", index_out=out / "saliency.parquet",
                                 out_dir=out, threads=1)
    return out, frame, maps


def test_findings_with_a_sample_set_get_a_classifier_roots_and_larger_effects_first(cohort):
    findings = pl.read_parquet(cohort.root / "findings.parquet")
    chosen = saliency_findings(findings, ("cluster", "discordant_subgroup"), 20)["finding_id"].to_list()
    assert chosen == ["discordant_subgroup-all-sex-co_occurrence", "cluster-neck-site-a-pocket",
                      "cluster-chest-site-b-pocket"]  # the leak is not a set of its own
    echo = findings.with_columns(pl.when(pl.col("finding_id") == "discordant_subgroup-all-sex-co_occurrence")
                                 .then(pl.lit("sex=F")).otherwise(None).alias("explained_by"))
    assert saliency_findings(echo, ("cluster", "discordant_subgroup"), 2)["finding_id"].to_list() == [
        "cluster-neck-site-a-pocket", "cluster-chest-site-b-pocket"]


def test_the_index_is_written_and_the_planted_set_is_separated(cohort, saliency):
    out, frame, _ = saliency
    on_disk = pl.read_parquet(out / "saliency.parquet")
    assert dict(on_disk.schema) == INDEX_SCHEMA and on_disk.equals(frame)
    rows = {r["finding_id"]: r for r in on_disk.iter_rows(named=True)}
    assert list(rows) == ["discordant_subgroup-all-sex-co_occurrence", "cluster-neck-site-a-pocket",
                          "cluster-chest-site-b-pocket"]
    square = rows["cluster-neck-site-a-pocket"]
    test_set = sum(cohort.split[u.split("/")[0]] == "test" for u in cohort.set_ids)
    assert (square["n_set"], square["n_rest"], square["n_test_set"]) == (20, 40, test_set) and test_set > 0
    assert square["n_test"] == sum(v == "test" for v in cohort.split.values())  # the test split's neck images
    assert square["balanced_accuracy"] > 0.9 and square["ci_low"] > 0.5 and not square["weak"], square
    assert square["roc_auc"] > 0.9
    for fid, row in rows.items():
        assert row["png"] == str(out / "saliency" / f"{fid}.png") and (out / "saliency" / f"{fid}.png").is_file()
    # the set that nothing in the images marks is weak: its interval reaches chance, or it is below the threshold
    noise = rows["cluster-chest-site-b-pocket"]
    assert noise["weak"] and (noise["ci_low"] <= 0.5 or noise["balanced_accuracy"] < 0.6), noise


def test_the_saliency_mass_concentrates_on_the_planted_square(saliency):
    _, _, maps = saliency
    (panel,) = maps["cluster-neck-site-a-pocket"]  # one region
    cam = panel["cam"]
    assert cam.shape == (CANVAS, CANVAS) and cam.sum() == pytest.approx(1.0, abs=1e-4)  # unit mass per slice, averaged
    inside = np.zeros(cam.shape, bool)
    inside[SQUARE] = True
    # per pixel, the square holds several times the mass of the rest of the crop
    assert cam[inside].mean() > 3 * cam[~inside].mean(), (cam[inside].mean(), cam[~inside].mean())
    assert panel["image"][SQUARE].mean() > panel["image"][~inside].mean() + 0.5  # the mean image shows it too
    # the subgroup's set spans both regions: one panel each
    assert [p["region"] for p in maps["discordant_subgroup-all-sex-co_occurrence"]] == ["chest", "neck"]


def test_the_report_shows_the_curves_and_each_findings_saliency_beside_its_mean_image(cohort, curves, saliency):
    out = curves[0]
    findings = out.parent / "m.parquet"
    findings.write_bytes((cohort.root / "findings.parquet").read_bytes())
    (out / "discordant-training-curves.csv").write_bytes((out / "c.csv").read_bytes())
    (out / "discordant-training-curves.png").write_bytes((out / "c.png").read_bytes())
    page = findings_section([findings], [], [out / "explain"], REPORT_DEFAULTS,
                            curves=[out / "discordant-training-curves.csv"], saliency=[out / "saliency.parquet"])
    assert "Training curves of the discordant subgroup" in page and "paper 003: rest 96–98 %" in page
    assert page.count("held-out balanced accuracy") == 3 and "separable" in page and "weak</b>" in page
    # the mean image of each of the 3 findings with evidence and a GradCAM beside it, the curves
    assert page.count("data:image/") == 3 * 2 + 1
    # the publication page (k = 15: the sets of 20 images are pictured): a GradCAM only for at least k test images
    # of the set, a curve cell of fewer than k images suppressed and the curves not drawn
    public = findings_section([findings], [], [out / "explain"], {**REPORT_DEFAULTS, "min_cell": 15},
                              publication=True, curves=[out / "discordant-training-curves.csv"],
                              saliency=[out / "saliency.parquet"])
    assert public.count("held-out balanced accuracy") == 3 and "(&lt; 15 of the set)" in public
    assert "flagged suppressed" in public and public.count("data:image/png;base64") == 3
    empty = out.parent / "e" / "discordant-training-curves.csv"
    empty.parent.mkdir()
    empty.write_text("finding_id,attribute,epoch,split,group,accuracy,n\n")
    (out.parent / "e.parquet").write_bytes(findings.read_bytes())
    page = findings_section([out.parent / "e.parquet"], [], [], REPORT_DEFAULTS, curves=[empty])
    assert "No discordant subgroup among this model's findings" in page


def test_the_rule_scripts_write_their_outputs_from_the_finished_networks(cohort, curves, saliency):
    """workflow/scripts/{training_curves,saliency}.py as Snakemake runs them; their checkpoint folders are those of
    the fixtures (results/findings/{model}/checkpoints/), so nothing is trained again."""
    out, frame = curves
    index = saliency[1]
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*.pt")}
    files = dict(zip(("index", "subjects", "splits"), map(str, stage_files(cohort))))
    common = dict(findings=str(cohort.root / "findings.parquet"), images=str(cohort.root / "images.parquet"), **files)
    params = SimpleNamespace(model="m", cfg=CFG, attributes=ATTRIBUTES)
    jobs = {"training_curves": SimpleNamespace(csv=str(out / "discordant-training-curves.csv"),
                                               png=str(out / "discordant-training-curves.png")),
            "saliency": SimpleNamespace(pngs=str(out / "saliency"), index=str(out / "saliency.parquet"))}
    for rule, output in jobs.items():
        job = SimpleNamespace(input=SimpleNamespace(**common), output=output, params=params, threads=1, log=[],
                              rule=rule)
        script = REPO / "workflow" / "scripts" / f"{rule}.py"
        exec(compile(script.read_text(), str(script), "exec"), {"snakemake": job, "__name__": "__main__"})
    assert pl.read_csv(out / "discordant-training-curves.csv", schema=CURVE_SCHEMA).equals(frame)
    assert pl.read_parquet(out / "saliency.parquet").equals(index)
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*.pt")} == before


# ------------------------------------------------------------------------------------------------ config


SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def test_presets_resolve_and_overrides_win():
    assert set(PRESETS) == {"demo", "nako", "chexpert"}
    for preset in PRESETS:
        sup, cs = curve_settings({"preset": preset})
        assert cs.arch == "resnet10" and sup.epochs >= 3
        sup, ss = saliency_settings({"preset": preset})
        assert ss.kinds == ("cluster", "discordant_subgroup")
    sup, ss = saliency_settings({"preset": "demo", "saliency": {"max_findings": 2, "epochs": 1}})
    assert (ss.max_findings, sup.epochs, sup.crop) == (2, 1, 64)
    with pytest.raises(ValueError, match="unknown setting"):
        curve_settings({"curves": {"max_eval": 3}})
    with pytest.raises(ValueError, match="arch"):
        saliency_settings({"saliency": {"arch": "vgg"}})
    with pytest.raises(ValueError, match="sample set"):
        saliency_settings({"saliency": {"kinds": ["attribute_leak"]}})


@pytest.mark.parametrize("section, expected", [
    ({"preset": "demo", "models": ["pca"], "saliency": {"max_findings": 3, "weak_below": 0.7}}, None),
    ({"preset": "dmeo"}, "config key finding_networks.preset = 'dmeo' is not one of ["),
    ({"preset": "demo", "saliency": {"max_finding": 3}},
     "config key finding_networks.saliency.max_finding is not known; did you mean "
     "finding_networks.saliency.max_findings?"),
    ({"curves": {"arch": "resnet18"}}, "config key finding_networks.curves.arch = 'resnet18' is not one of ["),
    ({"models": ["nope"]}, "config key finding_networks.models[0]: 'nope' is not one of the models"),
    ({"saliency": {"kinds": ["outlier"]}}, "config key finding_networks.saliency.kinds[0] = 'outlier' is not one of"),
    ({"saliency": {"weak_below": 0.3}}, "config key finding_networks.saliency.weak_below: 0.3 is less than the minimum of 0.5"),
    ({"curve": {}}, "config key finding_networks.curve is not known; did you mean finding_networks.curves?"),
])
def test_the_config_section_is_checked(section, expected):
    cfg = copy.deepcopy(demo_config())
    cfg["finding_networks"] = section
    problems = config_problems(cfg, SCHEMA)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_the_demo_config_runs_the_demo_preset():
    assert demo_config()["finding_networks"]["preset"] == "demo"
    assert json.loads(json.dumps(PRESETS))  # plain literals (the config check reads them from source)


@pytest.mark.slow  # one epoch of the demo preset's sex classifier over the demo's 8,700 training slices (~15 s)
def test_on_the_demo_the_planted_subgroup_lags_after_one_epoch(demo_results, tmp_path):
    """Paper 003's Fig. 3 on the demo's own planted subgroup: after one pass over the training slices the classifier
    of recorded sex is right on the rest and wrong on many of the flagged subjects, who are the planted ones."""
    import yaml

    cfg = yaml.safe_load((demo_results / "config.yaml").read_text())
    res = demo_results / "results"
    truth = json.loads((demo_results / "data/demo/ground_truth.json").read_text())
    planted = set(next(e for e in truth["effects"] if e["name"] == "discordant_sex")["subgroup"])
    findings = res / "findings/pca.parquet"
    [subgroup] = subgroup_findings(pl.read_parquet(findings))
    assert len(set(subgroup["subjects"]) & planted) >= 0.8 * len(subgroup["subjects"])  # flagged = planted, mostly
    frame = write_subgroup_curves(findings, res / "preprocessed/index.parquet", res / "cohort/subjects.parquet",
                                  res / "cohort/splits.parquet", images=res / "cohort/images.parquet",
                                  attributes=cfg["attributes"], cfg={"preset": "demo", "curves": {"epochs": 1}},
                                  csv_out=tmp_path / "c.csv", png_out=tmp_path / "c.png", out_dir=tmp_path, threads=2)
    train = dict(frame.filter(pl.col("split") == "train").select("group", "accuracy").rows())
    assert train["rest"] >= 0.9 and train["flagged"] < train["rest"] - 0.15, train

"""The shipped real-cohort configs (config/nako.yaml, config/chexpert.yaml) plan their workflow on a tiny cohort laid
out like the real one: only the manifest path (and CheXpert's image_root) is overridden.

The cohort stage is a checkpoint, so a dry run plans every job except the per-shard preprocessing (its shard list
is written by the checkpoint); the cohort tables themselves are built in-process from the same config to show the
tiny manifest is read as the config expects (every row kept, every region present)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from cohortlens.cohort.build import build_cohort
from cohortlens.config import check_config, full_schema
from cohortlens.io.chexpert import FINDING_COLUMNS, chexpert_to_manifest

from conftest import REPO, write_volume
from test_chexpert import HEADER, row
from test_workflow import snakemake, write_config

MANIFEST_SCHEMA = str(REPO / "workflow" / "schemas" / "manifest.schema.yaml")
CONFIG_SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
MODELS = ["pca", "vae", "dae"]


def shipped(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())


def dry_run(workdir: Path, cfg: dict) -> str:
    """The dry run's whole output (snakemake exits 0 or the helper fails the test)."""
    proc = snakemake(workdir, "-n", config=write_config(workdir / "config.yaml", cfg))
    return proc.stdout + proc.stderr


def job_stats(text: str) -> dict[str, int]:
    block = text.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", block, re.M)}


def planned_resources(text: str, rule: str) -> dict[str, dict[str, str]]:
    """model wildcard -> the resources line of each planned `rule` job."""
    out = {}
    for block in re.split(r"\n(?=\[|rule |localrule )", text):
        if not block.startswith(f"rule {rule}:"):
            continue
        model = re.search(r"wildcards: model=(\w+)", block).group(1)
        line = re.search(r"resources: (.*)", block).group(1)
        out[model] = dict(kv.split("=", 1) for kv in line.split(", "))
    return out


def check_plan(text: str, cfg: dict) -> None:
    jobs = job_stats(text)
    methods = cfg.get("project", {}).get("methods", ["tsne", "umap"])  # the schema's default
    n_models, n_maps = len(MODELS), len(methods)
    assert set(cfg["models"]) == set(MODELS)
    assert {k: jobs.get(k) for k in ["cohort", "preprocess_index", "train_pca", "embed_pca", "train_autoencoder",
                                     "embed_autoencoder", "probe", "fairness", "discover", "mitigate", "report",
                                     "publication_report"]} == {
        "cohort": 1, "preprocess_index": 1, "train_pca": 1, "embed_pca": 1, "train_autoencoder": 2,
        "embed_autoencoder": 2, "probe": n_models, "fairness": n_models, "discover": n_models,
        "mitigate": n_models, "report": 1, "publication_report": 1}
    for method in methods:
        assert jobs[f"project_{method}"] == n_models
    assert jobs["plot_projection"] == n_models * n_maps
    # the per-shard jobs are planned only once the cohort checkpoint has written the shard list
    assert "preprocess_shard" not in jobs
    assert "checkpoint jobs" in text
    # one GPU training job per autoencoder, sized by the config's resources
    train = planned_resources(text, "train_autoencoder")
    assert set(train) == {"vae", "dae"}
    for model, res in train.items():
        want = cfg["resources"][f"train_{model}"]
        assert res["gpu"] == "1" and res["cpus_per_gpu"] == str(want["cpus_per_gpu"])
        assert res["runtime"] == str(want["runtime"]) and res["mem_mb"] == str(want["mem_mb"])
    embed = planned_resources(text, "embed_autoencoder")
    assert {m: r["gpu"] for m, r in embed.items()} == {"vae": "1", "dae": "1"}
    # one GPU job per supervised baseline architecture
    assert jobs.get("train_baseline", 0) == len(cfg.get("baselines", {}))
    # the finding networks: one training_curves and one saliency job per model when configured
    n_finding_networks = n_models if "finding_networks" in cfg else 0
    assert jobs.get("training_curves", 0) == jobs.get("saliency", 0) == n_finding_networks


def cohort_tables(cfg: dict):
    c = cfg["cohort"]
    return build_cohort(c["manifest"], attributes=cfg["attributes"], regions=cfg["regions"], split=c["split"],
                        subjects_per_shard=cfg["preprocess"]["subjects_per_shard"], image_root=c.get("image_root"),
                        manifest_schema=MANIFEST_SCHEMA)


# ------------------------------------------------------------------------------------------------ NAKO


NAKO_SITES = ["Augsburg", "Berlin", "Essen", "Mannheim", "Neubrandenburg"]


def nako_manifest(root: Path, n_subjects: int = 10) -> Path:
    """One row per participant x region: 6-digit ids, a sagittal T2w NIfTI per region (thick left-right slices,
    RAS axis 0), the attributes as the NAKO records them (height in m, weight in kg, the MRI date)."""
    rows = []
    for i in range(n_subjects):
        sid = str(100001 + i)
        for j, region in enumerate(["neck", "chest", "lumbar"]):
            rel = f"nifti/{sid}/t2_sag_{region}.nii.gz"
            write_volume(root / rel, shape=(15, 48, 40), spacing=(3.3, 1.1, 1.1), seed=i * 3 + j)
            rows.append({"subject_id": sid, "image": rel, "region": region, "sex": "FM"[i % 2], "age": 24 + 4 * i,
                         "height": round(1.58 + 0.03 * i, 2), "weight": 55.0 + 4.5 * i, "site": NAKO_SITES[i % 5],
                         "date": f"{2014 + i % 4}-{1 + i:02d}-1{i % 10}"})
    manifest = root / "manifest.csv"
    pl.DataFrame(rows).write_csv(manifest)
    return manifest


def test_nako_config_plans_pca_vae_and_dae_on_a_nako_like_cohort(tmp_path):
    cfg = shipped("nako")
    assert [cfg["models"][m]["preset"] for m in ("vae", "dae")] == ["nako", "nako"]
    assert cfg["preprocess"]["canvas"] == [256, 256] and cfg["models"]["pca"]["crop"] == 256
    assert set(cfg["regions"]) == {"neck", "chest", "lumbar"}
    assert cfg["attributes"]["site"]["categories"] == NAKO_SITES

    run = copy.deepcopy(cfg)
    run["cohort"]["manifest"] = str(nako_manifest(tmp_path))
    tables = cohort_tables(run)
    assert tables.quarantine.height == 0, tables.quarantine
    assert tables.images.height == 30 and set(tables.images["region"]) == {"neck", "chest", "lumbar"}
    assert sorted(tables.subjects["site"].unique()) == NAKO_SITES

    check_plan(dry_run(tmp_path, run), run)


# ------------------------------------------------------------------------------------------------ CheXpert


def chexpert_release(root: Path, n_patients: int = 8) -> Path:
    """CheXpert-v1.0-small/train.csv with its quirks (Unknown sex, blank and -1 labels, laterals without AP/PA)
    and a JPG per row at the path the CSV names, relative to `root` (the folder that contains the release)."""
    rng = np.random.default_rng(0)
    lines = []
    for p in range(1, n_patients + 1):
        sex = ["Female", "Male", "Unknown"][p % 3] if p != 1 else "Female"
        study = f"CheXpert-v1.0-small/train/patient{p:05d}/study1"
        lines.append(row(f"{study}/view1_frontal.jpg", sex, str(40 + 5 * p), "Frontal", "AP" if p % 2 else "PA",
                         no_finding="1.0" if p % 4 == 0 else "", cardiomegaly="-1.0" if p % 3 else "1.0",
                         support_devices="1.0"))
        if p % 2:
            lines.append(row(f"{study}/view2_lateral.jpg", sex, str(40 + 5 * p), "Lateral", "",
                             edema="0.0", pleural_effusion="-1.0"))
    csv_path = root / "CheXpert-v1.0-small" / "train.csv"
    csv_path.parent.mkdir(parents=True)
    csv_path.write_text("\n".join([HEADER, *lines]) + "\n", encoding="utf-8")
    for line in lines:
        jpg = root / line.split(",")[0]
        jpg.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(48, 40), dtype=np.uint8)).save(jpg)
    return csv_path


def test_chexpert_config_plans_pca_vae_and_dae_on_a_chexpert_like_cohort(tmp_path):
    cfg = shipped("chexpert")
    assert [cfg["models"][m]["preset"] for m in ("vae", "dae")] == ["chexpert", "chexpert"]
    assert set(FINDING_COLUMNS) <= set(cfg["attributes"])

    # as the config's header says: convert train.csv, image_root = the folder that contains CheXpert-v1.0-small/
    csv_path = chexpert_release(tmp_path / "CheXpert")
    manifest = tmp_path / "data" / "chexpert" / "manifest.parquet"
    manifest.parent.mkdir(parents=True)
    converted = chexpert_to_manifest(csv_path, manifest)
    assert converted["skipped"] == [] and converted["rows_out"] == 12

    run = copy.deepcopy(cfg)
    run["cohort"]["manifest"] = str(manifest)
    run["cohort"]["image_root"] = str(tmp_path / "CheXpert")
    tables = cohort_tables(run)
    assert tables.quarantine.height == 0, tables.quarantine
    assert tables.images.height == 12 and set(tables.images["region"]) == {"frontal", "lateral"}

    check_plan(dry_run(tmp_path, run), run)


@pytest.mark.parametrize("name", ["nako", "chexpert"])
def test_gpu_resources_of_the_autoencoders(name):
    res = shipped(name)["resources"]
    for model in ("vae", "dae"):
        assert res[f"train_{model}"]["gpu"] == 1 and res[f"embed_{model}"]["gpu"] == 1
    for arch in shipped(name)["baselines"]:
        assert res[f"baseline_{arch}"]["gpu"] == 1


# ------------------------------------------------------------------------------------------------ the template


def schema_keys(node: dict, path: tuple = ()):
    """Every settable key of the full schema (library sections filled in), as a path; `*` for a user's name."""
    for key, sub in node.get("properties", {}).items():
        if isinstance(sub, dict) and "not" in sub:  # a key that cannot be set
            continue
        yield path + (key,)
        yield from schema_keys(sub, path + (key,))
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        yield from schema_keys(extra, path + ("*",))


def test_template_names_every_key_and_passes_the_check():
    """config/template.yaml is a valid config as shipped and names every key of every section (the library
    sections' keys too, so a setting added to the library without a word in the template fails here)."""
    text = (REPO / "config" / "template.yaml").read_text()
    cfg = yaml.safe_load(text)
    check_config(cfg, CONFIG_SCHEMA)
    schema = full_schema(CONFIG_SCHEMA)
    assert set(cfg) == set(schema["properties"]) - {"demo"}  # every section but the demo's own
    words = set(re.findall(r"\w+", text))
    missing = [".".join(p) for p in schema_keys(schema) if p[0] != "demo" and p[-1] not in words]
    assert missing == []

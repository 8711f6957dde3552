"""The real Snakemake workflow end to end on tiny cohorts, and what reruns after which change."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import REPO, demo_config, load_test_config, small_manifest, write_volume

pytestmark = pytest.mark.workflow
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(workdir: Path, *args: str, config: Path | None = None, check=True) -> subprocess.CompletedProcess:
    # targets and flags before --configfile: after it, snakemake would read a target as one more config file
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args]
    if config is not None:
        cmd += ["--configfile", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(workdir: Path, config: Path) -> dict[str, int]:
    """Job counts per rule of a dry run (empty when there is nothing to do)."""
    out = snakemake(workdir, "-n", config=config)
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return {}
    block = text.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", block, re.M)}


def tiny_config(root: Path, manifest: Path) -> dict:
    """.test/config/tiny.yaml with the manifest that small_manifest wrote."""
    c = load_test_config("tiny")
    c["cohort"]["manifest"] = str(manifest)
    return c


# every job downstream of the pca embeddings (one model, one map method)
AFTER_EMBEDDING = {"project_tsne": 1, "plot_projection": 1, "probe": 1, "fairness": 1, "discover": 1, "mitigate": 1,
                   "report": 1, "publication_report": 1, "all": 1}


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    manifest = small_manifest(root, 8)
    cfg = tiny_config(root, manifest)
    config = write_config(root / "config.yaml", cfg)
    snakemake(root, config=config)
    return root, cfg, config


def test_complete_run_outputs_and_nothing_left_to_do(completed_run):
    root, cfg, config = completed_run
    res = root / "results"
    for rel in ["cohort/subjects.parquet", "cohort/images.parquet", "cohort/splits.parquet", "cohort/quarantine.parquet",
                "preprocessed/index.parquet", "embeddings/pca/slices.parquet", "embeddings/pca/volumes.parquet",
                "models/pca/model.pt", "models/pca/train_log.csv", "models/pca/reconstructions.png", "report/index.html"]:
        assert (res / rel).stat().st_size > 0, rel
    vols = pl.read_parquet(res / "embeddings/pca/volumes.parquet")
    assert vols.height == 24 and vols.schema["embedding"] == pl.Array(pl.Float32, 12 * 8)
    assert planned_jobs(root, config) == {}


def test_changing_a_pca_setting_reruns_only_pca_and_what_follows(completed_run, tmp_path):
    root, cfg, _ = completed_run
    changed = copy.deepcopy(cfg)
    changed["models"]["pca"]["n_components"] = 6
    jobs = planned_jobs(root, write_config(tmp_path / "c.yaml", changed))
    assert jobs == {"train_pca": 1, "embed_pca": 1, **AFTER_EMBEDDING}


def test_changing_the_perplexity_reruns_only_tsne_and_what_depends_on_it(completed_run, tmp_path):
    root, cfg, _ = completed_run
    changed = copy.deepcopy(cfg)
    changed["project"]["tsne"]["perplexity"] = 30
    assert planned_jobs(root, write_config(tmp_path / "c.yaml", changed)) == {
        "project_tsne": 1, "plot_projection": 1, "report": 1, "publication_report": 1, "all": 1}


def test_analysis_outputs_of_a_tiny_cohort(completed_run):
    root, cfg, _ = completed_run
    res = root / "results"
    for region in [*cfg["regions"], "all"]:
        proj = pl.read_parquet(res / f"projections/pca/{region}/tsne.parquet")
        assert proj.height == (24 if region == "all" else 8)
        assert proj.select(pl.col("x").is_finite().all() & pl.col("y").is_finite().all()).item()
        assert (res / f"plots/pca/{region}/tsne/tsne-sex.html").stat().st_size > 0
    metrics = pl.read_parquet(res / "probes/pca/metrics.parquet")
    assert {"model", "region", "attribute", "metric", "value", "ci_low", "ci_high"} <= set(metrics.columns)
    assert set(metrics["region"]) >= set(cfg["regions"])
    for rel in ["fairness/pca/summary.parquet", "findings/pca.parquet", "findings/pca-tests.parquet",
                "mitigation/pca/reprobe.parquet"]:
        assert (res / rel).exists(), rel


def test_changing_only_the_report_config_reruns_only_the_reports(completed_run, tmp_path):
    root, cfg, _ = completed_run
    changed = copy.deepcopy(cfg)
    changed["report"]["title"] = "another title"
    assert planned_jobs(root, write_config(tmp_path / "c.yaml", changed)) == {"report": 1, "publication_report": 1,
                                                                             "all": 1}


def test_adding_one_subject_reruns_only_its_shard(tmp_path):
    manifest = small_manifest(tmp_path, 8)
    cfg = tiny_config(tmp_path, manifest)
    cfg["preprocess"]["subjects_per_shard"] = 3  # 8 and 9 subjects both give 4 shards
    config = write_config(tmp_path / "config.yaml", cfg)
    index = "results/preprocessed/index.parquet"  # the shards are the point; the analysis stages are not needed
    snakemake(tmp_path, index, config=config)
    pre = tmp_path / "results" / "preprocessed"
    before = {p.name: p.stat().st_mtime_ns for p in pre.glob("shard-*.npy")}
    assert len(before) >= 2

    df = pl.read_csv(manifest, infer_schema=False)
    new = df.filter(pl.col("subject_id") == "T0001").with_columns(
        pl.lit("T0100").alias("subject_id"), pl.col("image").str.replace("T0001", "T0100")
    )
    for rel in new["image"]:
        write_volume(tmp_path / rel, seed=99)
    pl.concat([df, new]).write_csv(manifest)
    run = snakemake(tmp_path, index, config=config)
    ran = re.findall(r"rule preprocess_shard:.*?wildcards: shard=(\d+)", run.stdout + run.stderr, re.S)

    images = pl.read_parquet(tmp_path / "results" / "cohort" / "images.parquet")
    new_shard = images.filter(pl.col("subject_id") == "T0100")["shard"].unique().to_list()
    assert len(new_shard) == 1
    assert [int(s) for s in ran] == new_shard
    after = {p.name: p.stat().st_mtime_ns for p in pre.glob("shard-*.npy")}
    changed = sorted(n for n in after if after[n] != before.get(n))
    assert changed == [f"shard-{new_shard[0]}.npy"]
    assert pl.read_parquet(pre / "index.parquet").filter(pl.col("subject_id") == "T0100").height == 3 * 16
    # the shard's input is its file list (results/cohort/shards/), rewritten by the cohort stage only for that shard
    kept = images["shard"].n_unique() - 1
    assert f"shard lists: 1 written, {kept} unchanged, 0 removed" in (tmp_path / "results/logs/cohort.log").read_text()

    # an image edited in place (same manifest row, so the cohort stage does not rerun) reruns only its shard
    edited = images.filter(pl.col("subject_id") == "T0003")
    write_volume(Path(edited["path"][0]), seed=7)
    run = snakemake(tmp_path, index, config=config)
    ran = re.findall(r"rule preprocess_shard:.*?wildcards: shard=(\d+)", run.stdout + run.stderr, re.S)
    assert "checkpoint cohort" not in run.stdout + run.stderr
    assert [int(s) for s in ran] == edited["shard"].unique().to_list()


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda c: c["preprocess"].update(canvas=[64]), r"canvas"),
        (lambda c: c["attributes"]["sex"].update(type="boolean"), r"boolean"),
        (lambda c: c["regions"]["neck"].update(slice_axis="oblique"), r"slice_axis"),
    ],
)
def test_invalid_config_stops_naming_the_field(tmp_path, edit, expected):
    cfg = demo_config()
    edit(cfg)
    proc = snakemake(tmp_path, "-n", config=write_config(tmp_path / "bad.yaml", cfg), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "validating config file" in out.lower() or "ValidationError" in out, out[-3000:]
    assert re.search(expected, out), out[-3000:]


def test_invalid_manifest_row_stops_naming_file_line_and_field(tmp_path):
    manifest = small_manifest(tmp_path, 3)
    df = pl.read_csv(manifest, infer_schema=False)
    df.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(pl.lit("a b")).otherwise(pl.col("subject_id")).alias("subject_id")).write_csv(manifest)
    config = write_config(tmp_path / "config.yaml", tiny_config(tmp_path, manifest))
    proc = snakemake(tmp_path, config=config, check=False)
    log = (tmp_path / "results" / "logs" / "cohort.log").read_text()
    assert proc.returncode != 0
    assert f"manifest {manifest}: line 4 (data row 3) breaks the manifest schema: field 'subject_id'" in log, log[-2000:]

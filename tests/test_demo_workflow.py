"""The demo as a user runs it: the demo rule makes the cohort (NIfTI + DICOM series), every stage runs,
the report lists it, counts reconcile, and no DICOM patient identifier reaches results/."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pydicom
import pytest
import yaml

from conftest import load_test_config
from test_workflow import planned_jobs, snakemake

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = load_test_config("tiny-demo")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    snakemake(root, config=config)
    return root, config


def identifiers(demo_dir: Path) -> set[str]:
    found = set()
    for f in demo_dir.rglob("*"):
        if f.is_file() and f.suffix not in (".csv", ".json", ".gz") and "garbage" not in f.name:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            for tag in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                value = str(ds.get(tag, "") or "")
                if len(value) >= 6:
                    found.add(value)
    return found


def all_text(results: Path):
    """Every string a reader of results/ could see: file names, bytes, Parquet values and metadata."""
    for f in results.rglob("*"):
        if not f.is_file():
            continue
        yield str(f.relative_to(results))
        if f.suffix == ".parquet":
            table = pq.read_table(f)
            yield str(table.schema.metadata)
            for col in table.column_names:
                if pl.from_arrow(table.select([col])).dtypes[0] in (pl.Utf8, pl.Categorical):
                    yield "\n".join(str(v) for v in table.column(col).to_pylist())
        elif f.suffix != ".npy":
            yield f.read_bytes().decode("latin1")


def test_demo_runs_every_stage_and_counts_reconcile(demo_run):
    root, config = demo_run
    res = root / "results"
    manifest = pl.read_csv(root / "data/demo/manifest.csv")
    assert manifest.height == 72 + 10  # 24 subjects x 3 regions + the planted bad inputs
    index = pl.read_parquet(res / "preprocessed/index.parquet")
    q = pl.concat([pl.read_parquet(res / "cohort/quarantine.parquet"), pl.read_parquet(res / "preprocessed/quarantine.parquet")])
    assert manifest.height == index["image_uid"].n_unique() + q.height
    images = pl.read_parquet(res / "cohort/images.parquet")
    dicom_images = images.filter(pl.col("image").str.starts_with("dicom"))
    assert dicom_images.height >= 6  # a quarter of the subjects, three regions each
    assert index.join(dicom_images.select("image_uid"), on="image_uid").height == dicom_images.height * 14
    html = (res / "report/index.html").read_text()
    assert "images in = images with slices + quarantined: 82 = 72 + 10" in html
    # every planted bad input is quarantined for its own reason, and nothing else is
    expected = json.loads((root / "data/demo/ground_truth.json").read_text())["expected_quarantine"]
    got = sorted(zip(q["image"], q["reason"]))
    assert len(got) == len(expected) == 10
    for (image, reason), want in zip(got, sorted((e["image"], e["reason"]) for e in expected)):
        assert image == want[0] and reason.startswith(want[1]), (image, reason, want)
    assert planned_jobs(root, config) == {}


def test_no_dicom_identifier_reaches_results(demo_run):
    root, _ = demo_run
    secrets = identifiers(root / "data/demo")
    assert len(secrets) >= 6 * 5  # names, ids, accession, institution and UIDs of every DICOM series
    text = "\n".join(all_text(root / "results"))
    leaked = sorted(s for s in secrets if s in text)
    assert not leaked, leaked

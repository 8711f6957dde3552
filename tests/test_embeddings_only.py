"""Imported embeddings (paper 002: 1408-d CT foundation vectors) as a model, and cohorts of embeddings only."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cohortlens.cohort.build import build_cohort
from cohortlens.config import check_config, config_problems, image_problems
from cohortlens.embed.imported import common_dimension, import_embeddings
from cohortlens.io.tables import ManifestError, read_parquet_metadata

from conftest import REPO, demo_config, load_test_config
from test_workflow import planned_jobs, snakemake, write_config

CONFIG_SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DIM = 1408


def cohort_images(n: int = 10, region: str = "chest") -> pl.DataFrame:
    ids = [f"S{i:03d}" for i in range(n)]
    return pl.DataFrame({"image_uid": [f"{s}/{region}" for s in ids], "subject_id": ids, "region": [region] * n})


def vectors(n: int, dim: int = DIM, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32).tolist()


def bad_rows(dim: int = DIM) -> tuple[list[str | None], list, dict[int, str]]:
    """10 cohort subjects' rows plus one of each bad kind: (subject ids, vectors, row -> expected reason start)."""
    sids: list[str | None] = [f"S{i:03d}" for i in range(10)]
    vecs: list = vectors(10, dim)
    vecs[1][5] = float("nan")
    vecs[2][0] = float("inf")
    vecs[3] = vecs[3][: dim - 1]
    vecs[4] = None
    sids += ["X999", "S005", None]  # unknown subject, a duplicate of S005, a missing key
    vecs += vectors(3, dim, seed=1)
    expected = {1: "NaN/inf/empty values: 1 of", 2: "NaN/inf/empty values: 1 of", 3: "wrong dimension:",
                4: "missing embedding", 5: "duplicate (subject_id, region): rows 5, 11",
                10: "unknown subject (not in the cohort", 11: "duplicate (subject_id, region)", 12: "missing subject_id or region"}
    return sids, vecs, expected


def check_import(tmp_path: Path, source: Path, expected: dict[int, str], dim: int = DIM, **kwargs) -> pl.DataFrame:
    out = tmp_path / "out"
    counts = import_embeddings(source, cohort_images(), model="ct", volumes_path=out / "volumes.parquet",
                               quarantine_path=out / "quarantine.parquet", **kwargs)
    quarantine = pl.read_parquet(out / "quarantine.parquet")
    volumes = pl.read_parquet(out / "volumes.parquet")
    # counts reconcile, in the return value, the files and both files' metadata
    assert counts["rows_in"] == counts["rows_out"] + counts["quarantined"]
    assert (counts["rows_out"], counts["quarantined"], counts["dim"]) == (volumes.height, quarantine.height, dim)
    meta = read_parquet_metadata(out / "volumes.parquet")
    assert {k: meta[k] for k in ("rows_in", "rows_out", "quarantined")} == {
        k: counts[k] for k in ("rows_in", "rows_out", "quarantined")}
    assert meta["dim"] == dim and meta["model"] == "ct" and meta["level"] == "volume"
    assert read_parquet_metadata(out / "quarantine.parquet")["rows_in"] == counts["rows_in"]
    # every bad row with its reason, nothing else
    assert quarantine.columns == ["row", "subject_id", "region", "reason"]
    reasons = dict(zip(quarantine["row"].to_list(), quarantine["reason"].to_list()))
    assert set(reasons) == set(expected), reasons
    for row, start in expected.items():
        assert start in reasons[row], (row, reasons[row])
    # the good rows in the contract: the cohort's image_uid, fixed_size_list<float32>[d]
    assert volumes.columns == ["image_uid", "subject_id", "region", "embedding"]
    assert volumes.schema["embedding"] == pl.Array(pl.Float32, dim)
    assert volumes["image_uid"].to_list() == [f"{s}/chest" for s in sorted(volumes["subject_id"].to_list())]
    return volumes


def test_parquet_list_column_every_bad_row_kind_quarantined(tmp_path):
    sids, vecs, expected = bad_rows()
    source = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"subject_id": sids, "region": ["chest"] * len(sids),
                             "embedding": pa.array(vecs, pa.list_(pa.float64()))}), source)
    volumes = check_import(tmp_path, source, expected)
    assert sorted(volumes["subject_id"].to_list()) == ["S000", "S006", "S007", "S008", "S009"]
    good = pl.DataFrame({"v": vecs[0]})["v"].cast(pl.Float32).to_list()
    assert volumes.filter(pl.col("subject_id") == "S000")["embedding"][0].to_list() == good
    assert "wrong dimension: 1407 values, the file's dimension is 1408 (the most common vector length" in \
        pl.read_parquet(tmp_path / "out/quarantine.parquet").filter(pl.col("row") == 3)["reason"][0]


def test_parquet_fixed_size_list_of_any_dimension(tmp_path):
    dim = 24
    sids = [f"S{i:03d}" for i in range(10)] + ["S003"]
    vecs = vectors(11, dim)
    vecs[2] = None  # a null entry of a fixed-size list
    source = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"subject_id": sids, "region": ["chest"] * 11,
                             "embedding": pa.array(vecs, pa.list_(pa.float32(), dim))}), source)
    check_import(tmp_path, source, {2: "missing embedding", 3: "duplicate", 10: "duplicate"}, dim=dim)


def test_csv_with_an_embedding_column(tmp_path):
    sids, vecs, expected = bad_rows(dim=16)
    text = [None if v is None else "[" + ", ".join(repr(x) for x in v) + "]" for v in vecs]
    source = tmp_path / "emb.csv"
    pl.DataFrame({"subject_id": sids, "region": ["chest"] * len(sids), "embedding": text}).write_csv(source)
    check_import(tmp_path, source, expected, dim=16)


def test_csv_with_one_column_per_dimension(tmp_path):
    X = np.asarray(vectors(10, 8))
    X[6, 3] = np.nan  # an empty cell
    frame = pl.DataFrame({"subject_id": [f"S{i:03d}" for i in range(10)], "region": ["chest"] * 10,
                          **{f"e{j}": X[:, j] for j in range(8)}})
    source = tmp_path / "emb.csv"
    frame.write_csv(source)
    check_import(tmp_path, source, {6: "NaN/inf/empty values: 1 of 8"}, dim=8)


def test_npy_with_an_id_file(tmp_path):
    X = np.asarray(vectors(12, DIM))
    X[4, 7] = np.inf
    np.save(tmp_path / "emb.npy", X.astype(np.float32))
    ids = pl.DataFrame({"subject_id": [f"S{i:03d}" for i in range(11)] + ["nobody"], "region": ["chest"] * 12})
    ids.write_csv(tmp_path / "ids.csv")
    check_import(tmp_path, tmp_path / "emb.npy", {4: "NaN/inf/empty values", 10: "unknown subject",
                                                  11: "unknown subject"}, ids=tmp_path / "ids.csv")
    ids.head(5).write_csv(tmp_path / "short.csv")
    with pytest.raises(ValueError, match="12 rows but 5 ids"):
        import_embeddings(tmp_path / "emb.npy", cohort_images(), model="ct", volumes_path=tmp_path / "v.parquet",
                          quarantine_path=tmp_path / "q.parquet", ids=tmp_path / "short.csv")


def test_region_without_a_cohort_image_and_nothing_usable(tmp_path):
    source = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"subject_id": ["S000", "S001"], "region": ["neck", "chest"],
                             "embedding": pa.array([[1.0, 2.0], [float("nan"), 1.0]])}), source)
    with pytest.raises(ValueError, match="none of its 2 rows can be used.*no cohort image of the subject in "
                                         "the region"):
        import_embeddings(source, cohort_images(), model="ct", volumes_path=tmp_path / "v.parquet",
                          quarantine_path=tmp_path / "q.parquet")


def test_a_subject_with_several_images_in_the_region_matches_none(tmp_path):
    """An image_id manifest (several studies per subject and region): a (subject, region) vector fits none."""
    images = pl.concat([cohort_images(3), pl.DataFrame({"image_uid": ["study-2"], "subject_id": ["S000"],
                                                        "region": ["chest"]})])
    source = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"subject_id": ["S000", "S001"], "region": ["chest"] * 2,
                             "embedding": pa.array([[1.0, 2.0], [3.0, 4.0]])}), source)
    counts = import_embeddings(source, images, model="ct", volumes_path=tmp_path / "v.parquet",
                               quarantine_path=tmp_path / "q.parquet")
    assert (counts["rows_out"], counts["quarantined"]) == (1, 1)
    assert pl.read_parquet(tmp_path / "q.parquet")["reason"][0].startswith("the subject has 2 images in the region")


def test_the_dimension_is_the_most_common_length_ties_to_the_first():
    assert common_dimension(np.array([3, 5, 5, 0, 3, 5])) == 5
    assert common_dimension(np.array([0, 4, 7, 7, 4])) == 4  # tie: 4 was met first
    assert common_dimension(np.array([0, 0])) is None


# ------------------------------------------------------------------------------------------------ cohort and config


def attributes() -> dict:
    return load_test_config("embeddings-only")["attributes"]


def write_manifest(path: Path, n: int, image: bool = False, seed: int = 0) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    sex = np.array(["F", "M"])[np.arange(n) % 2]
    frame = pl.DataFrame({"subject_id": [f"S{i:03d}" for i in range(n)], "region": ["chest"] * n,
                          "sex": sex.tolist(), "age": [str(a) for a in rng.integers(40, 80, n)],
                          "site": [["A", "B", "C"][i % 3] for i in range(n)]})
    if image:
        frame = frame.with_columns(pl.format("images/{}.nii.gz", "subject_id").alias("image"))
    frame.write_csv(path)
    return path, sex


def test_a_manifest_without_images_makes_a_cohort_without_image_checks(tmp_path):
    manifest, _ = write_manifest(tmp_path / "manifest.csv", 12)
    tables = build_cohort(manifest, attributes=attributes(), regions={"chest": {}}, split={}, subjects_per_shard=64,
                          manifest_schema=str(REPO / "workflow/schemas/manifest.schema.yaml"))
    assert tables.images.height == 12 and tables.quarantine.height == 0 and tables.n_manifest_rows == 12
    assert tables.images["image"].null_count() == 12 and tables.images["path"].null_count() == 12
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['image'\].*models pca read images"):
        build_cohort(manifest, attributes=attributes(), regions={"chest": {}}, split={}, subjects_per_shard=64,
                     image_models=["pca"])


def test_config_check_an_image_model_on_a_manifest_without_images(tmp_path):
    cfg = load_test_config("embeddings-only")
    cfg["cohort"]["manifest"] = str(write_manifest(tmp_path / "manifest.csv", 4)[0])
    check_config(cfg, CONFIG_SCHEMA)  # imported models only: fine
    cfg["models"]["pca"] = {"crop": 32, "n_components": 8}
    assert image_problems(cfg) == [
        f"config key models.pca reads images, but the manifest {cfg['cohort']['manifest']} has no image column (an "
        "embeddings-only cohort takes only imported models: models.<name>.embeddings: <file>)"]
    with pytest.raises(ValueError, match="config key models.pca reads images"):
        check_config(cfg, CONFIG_SCHEMA)
    write_manifest(tmp_path / "manifest.csv", 4, image=True)  # with images, pca and ct together (mixed) are fine
    check_config(cfg, CONFIG_SCHEMA)


@pytest.mark.parametrize("model, expected", [
    ({"embeddings": "ct.npy"}, "config key models.ct.ids is missing: a .npy array holds no subject ids"),
    ({"embeddings": "ct.h5"}, "config key models.ct.format is missing: the format of 'ct.h5' is not known"),
    ({"embeddings": "ct.h5", "format": "hdf5"}, "config key models.ct.format = 'hdf5' is not one of ['parquet', "
                                                "'csv', 'npy']"),
    ({"embeddings": "ct.parquet", "idz": "x"}, "config key models.ct.idz is not known; did you mean models.ct.ids?"),
    ({"preset": "demo"}, "config key models.ct is not known (known: pca, vae, dae; or an imported model: "
                         "models.ct.embeddings: <file>)"),
])
def test_config_mistakes_of_an_imported_model(model, expected):
    cfg = copy.deepcopy(demo_config())
    cfg["models"]["ct"] = model
    problems = config_problems(cfg, CONFIG_SCHEMA) + image_problems(cfg)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


# ------------------------------------------------------------------------------------------------ the workflow


def write_cohort(root: Path, n: int = 60) -> None:
    """A manifest of n + 2 subjects (no image column) and n good 1408-d vectors with a planted sex signal, then
    three bad rows: a wrong dimension (subject n), NaN (subject n + 1) and an unknown subject."""
    _, sex = write_manifest(root / "manifest.csv", n + 2)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(n, DIM)).astype(np.float32)
    X[:, :64] += 2.0 * (sex[:n] == "M")[:, None]
    rows = [x.tolist() for x in X] + [rng.normal(size=DIM - 8).tolist(), [float("nan")] * DIM,
                                      rng.normal(size=DIM).tolist()]
    sids = [f"S{i:03d}" for i in range(n + 2)] + ["X999"]
    pq.write_table(pa.table({"subject_id": sids, "region": ["chest"] * len(sids),
                             "embedding": pa.array(rows, pa.list_(pa.float32()))}), root / "embeddings.parquet")


@pytest.mark.workflow
def test_embeddings_only_cohort_end_to_end(tmp_path):
    write_cohort(tmp_path)
    config = write_config(tmp_path / "config.yaml", load_test_config("embeddings-only"))
    planned = planned_jobs(tmp_path, config)
    assert planned["import_embeddings"] == 1 and planned["report"] == 1
    assert not [j for j in planned if j.startswith(("preprocess", "train", "embed"))], planned

    proc = snakemake(tmp_path, config=config)
    log = proc.stdout + proc.stderr
    ran = set(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", log, re.M))
    assert {"cohort", "import_embeddings", "probe", "fairness", "discover", "mitigate", "report"} <= ran, ran
    assert not [r for r in ran if r.startswith(("preprocess", "train", "embed"))], ran
    res = tmp_path / "results"
    assert not (res / "preprocessed").exists() and not (res / "models").exists()

    # 63 rows in = 60 written + 3 quarantined (unknown subject, wrong dimension, NaN)
    meta = read_parquet_metadata(res / "embeddings/ct/volumes.parquet")
    assert (meta["rows_in"], meta["rows_out"], meta["quarantined"], meta["dim"]) == (63, 60, 3, DIM)
    quarantine = pl.read_parquet(res / "embeddings/ct/quarantine.parquet")
    assert quarantine["row"].to_list() == [60, 61, 62]
    assert [r.split(":")[0] for r in quarantine["reason"]] == ["wrong dimension", "NaN/inf/empty values",
                                                               "unknown subject (not in the cohort"]

    metrics = pl.read_parquet(res / "probes/ct/metrics.parquet")
    sex = metrics.filter((pl.col("attribute") == "sex") & (pl.col("metric") == "balanced_accuracy"))
    assert sex.height >= 1 and sex["value"].max() >= 0.75, sex  # the planted signal is read
    findings = pl.read_parquet(res / "findings/ct.parquet")
    assert findings.filter((pl.col("kind") == "attribute_leak") & (pl.col("attribute") == "sex")).height == 1
    assert read_parquet_metadata(res / "findings/ct.parquet")["explanations"].startswith(
        "image explanations skipped")
    assert not list((res / "findings/ct").glob("*.png"))  # no explanation images
    page = (res / "report/index.html").read_text()
    assert "No images in this cohort (embeddings only" in page and "image explanations skipped" in page
    assert "Imported embeddings" in page and "wrong dimension" in page
    assert "manifest rows in = rows kept + quarantined: 62 = 62 + 0" in page
    assert (res / "report/publication.html").stat().st_size > 0
    assert planned_jobs(tmp_path, config) == {}


@pytest.mark.workflow
def test_mixed_config_plans_the_image_models_and_the_import(tmp_path):
    """pca on the images and an imported model on an image cohort: a dry run plans both."""
    from conftest import small_manifest

    manifest = small_manifest(tmp_path, 4)
    cfg = load_test_config("tiny")
    cfg["cohort"]["manifest"] = str(manifest)
    cfg["models"]["ct"] = {"embeddings": "ct.parquet"}
    pq.write_table(pa.table({"subject_id": ["T0000"], "region": ["neck"], "embedding": [[1.0, 2.0]]}),
                   tmp_path / "ct.parquet")
    planned = planned_jobs(tmp_path, write_config(tmp_path / "config.yaml", cfg))
    assert planned["cohort"] == planned["train_pca"] == planned["import_embeddings"] == planned["report"] == 1
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["models"]["ct"] == {"embeddings": "ct.parquet"}

"""The mitigate stage: LEACE, INLP and the adversarial VAE on the demo pca embeddings, re-probed."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from cohortlens.analysis.mitigate import (
    REPROBE_SCHEMA,
    debias_adversarial_vae,
    erase_leace,
    reprobe,
    run_mitigation,
)
from cohortlens.io.tables import read_parquet_metadata
from cohortlens.models.adversarial_vae import fit_adversarial_vae
from cohortlens.runtime import limit_threads

from conftest import synthetic_embedding_cohort

REGIONS = ("neck", "chest", "lumbar")


@pytest.fixture(scope="module")
def mitigated(demo_results, tmp_path_factory):
    """The mitigate stage's outputs for pca in the session's demo run (protect sex, keep age; LEACE, INLP, aVAE),
    plus LEACE of a continuous attribute (age), which the demo config does not ask for, computed here."""
    res = demo_results / "results"
    stage = res / "mitigation/pca"
    out = tmp_path_factory.mktemp("mitigate")
    src = res / "embeddings/pca/volumes.parquet"
    subjects, splits = res / "cohort/subjects.parquet", res / "cohort/splits.parquet"
    paths = {
        "leace": stage / "embeddings/pca-leace-sex/volumes.parquet",
        "leace_age": out / "pca-leace-age/volumes.parquet",
        "inlp": stage / "embeddings/pca-inlp-sex/volumes.parquet",
        "avae": stage / "embeddings/pca-avae/volumes.parquet",
    }
    leace_age = erase_leace(src, subjects, splits, "age", paths["leace_age"], threads=1)
    info = {name: read_parquet_metadata(path)["mitigation"] for name, path in paths.items() if name != "leace_age"}
    info["leace_age"] = leace_age
    age_table = reprobe(src, [paths["leace_age"]], subjects, splits, ["age"], [], threads=1)
    return {"src": src, "subjects": subjects, "splits": splits, "paths": paths, "info": info,
            "reprobe": pl.read_parquet(stage / "reprobe.parquet"), "age_reprobe": age_table, "out": stage,
            "avae_dir": stage / "embeddings/pca-avae"}


def _rows(table, method, attribute, probe, metric):
    sel = table.filter((pl.col("method") == method) & (pl.col("attribute") == attribute) & (pl.col("probe") == probe)
                       & (pl.col("metric") == metric))
    assert sorted(sel["region"].to_list()) == sorted(REGIONS), (method, attribute, probe, metric)
    return sel


def test_reprobe_file_schema(mitigated):
    table = mitigated["reprobe"]
    assert dict(table.schema) == REPROBE_SCHEMA
    assert set(table["method"].unique()) == {"leace", "inlp", "avae"}
    assert set(table["probe"].unique()) == {"linear", "rbf_svm", "mlp"}
    # every after-value has its interval and its test against chance; every drop its paired interval
    assert (table["ci_low"] <= table["value"]).all() and (table["value"] <= table["ci_high"]).all()
    assert table["p_vs_chance"].is_between(0, 1).all()
    assert (table["drop_ci_low"] <= table["drop_ci_high"]).all()
    assert set(table.filter(pl.col("attribute") == "sex")["role"].unique()) == {"protected"}
    assert set(table.filter(pl.col("attribute") == "age")["role"].unique()) == {"target"}
    # drop = performance lost: before - after for accuracies, after - before for errors
    ba = table.filter(pl.col("metric") == "balanced_accuracy")
    np.testing.assert_allclose(ba["drop"], ba["value_before"] - ba["value"])
    mae = table.filter(pl.col("metric") == "mae")
    np.testing.assert_allclose(mae["drop"], mae["value"] - mae["value_before"])
    assert (table.filter(pl.col("metric") == "balanced_accuracy")["chance"] == 0.5).all()


def test_mitigated_files_keep_the_embedding_contract(mitigated):
    src_schema = pq.read_schema(mitigated["src"])
    src_keys = pl.read_parquet(mitigated["src"], columns=["image_uid", "subject_id", "region"])
    for name, path in mitigated["paths"].items():
        schema = pq.read_schema(path)
        assert schema.names == src_schema.names, name
        for key in ("image_uid", "subject_id", "region"):
            assert schema.field(key).type == src_schema.field(key).type
        meta = read_parquet_metadata(path)
        assert meta["model"] == path.parent.name and meta["source_model"] == "pca"
        assert meta["dim"] == schema.field("embedding").type.list_size
        assert meta["mitigation"]["method"] == name.split("_")[0]
        assert pl.read_parquet(path, columns=["image_uid", "subject_id", "region"]).equals(src_keys)
    assert read_parquet_metadata(mitigated["paths"]["leace"])["dim"] == src_schema.field("embedding").type.list_size
    assert read_parquet_metadata(mitigated["paths"]["avae"])["dim"] == 64


def test_leace_puts_the_sex_linear_probe_at_chance(mitigated):
    linear = _rows(mitigated["reprobe"], "leace", "sex", "linear", "balanced_accuracy")
    # the demo plants a strong sex signal in every region
    assert (linear["value_before"] >= 0.75).all(), linear
    # LEACE's guarantee for linear probes fitted on the erased train split
    assert ((linear["value"] - 0.5).abs() <= 0.02).all(), linear
    assert mitigated["info"]["leace"]["not_erased"] == []
    # binary sex: the eraser is a rank-1 change of the identity in every region
    assert set(mitigated["info"]["leace"]["erased_rank"].values()) == {1}


def test_leace_nonlinear_attack_is_reported(mitigated):
    nonlinear = _rows(mitigated["reprobe"], "leace", "sex", "rbf_svm", "balanced_accuracy")
    values = nonlinear["value"].to_numpy()
    assert np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()
    assert np.isfinite(nonlinear["value_before"].to_numpy()).all()


def test_leace_keeps_age(mitigated):
    # Binary sex costs LEACE one direction out of 384 and age is drawn independently of sex in the demo, so
    # the age read-out loses only its part along that direction (measured: +0.03 to +0.08 years). Allowed:
    # 20 % worse, and still far (< 30 %) below the constant-predictor MAE.
    age = _rows(mitigated["reprobe"], "leace", "age", "linear", "mae")
    assert (age["value"] <= 1.2 * age["value_before"]).all(), age
    assert (age["value"] <= 0.3 * age["chance"]).all(), age


def test_leace_erases_a_continuous_attribute(mitigated):
    r2 = _rows(mitigated["age_reprobe"], "leace", "age", "linear", "r2")
    assert (r2["value_before"] >= 0.8).all(), r2
    # no covariance with age left on train: the ridge probe learns (almost) nothing that transfers
    assert (r2["value"] <= 0.05).all(), r2


def test_inlp_removes_sex_and_keeps_age(mitigated):
    # INLP has no closed-form guarantee. Measured 0.45-0.74 per region (42 test subjects each), mean 0.56, after
    # the demo's height began to act on body size (sex and height now share a direction in the neck). Judged
    # on the mean over regions: one region's 42 subjects move a balanced accuracy by ±0.1 by chance.
    linear = _rows(mitigated["reprobe"], "inlp", "sex", "linear", "balanced_accuracy")
    assert linear["value"].mean() <= 0.65, linear
    assert linear["value"].mean() <= linear["value_before"].mean() - 0.2, linear
    age = _rows(mitigated["reprobe"], "inlp", "age", "linear", "mae")
    assert (age["value"] <= 1.2 * age["value_before"] + 0.5).all(), age  # measured +0.03 to +0.05 years
    assert all(n > 0 for n in mitigated["info"]["inlp"]["removed_dimensions"].values())


def test_adversarial_vae_reduces_sex_and_keeps_age(mitigated):
    # The aVAE compresses 384 → 64 dims and only approximately hides sex. Measured on the demo over seeds
    # 0-2: linear sex balanced accuracy 0.93 → 0.53-0.62 (mean over regions, 42 test subjects each), age MAE
    # 1.8 → 3.5-3.9 years against 12.8 for the constant predictor. The bounds leave room for another CPU's
    # floating-point path: sex at least 0.2 lower and at most 0.72; age MAE under 40 % of chance.
    table = mitigated["reprobe"]
    linear = _rows(table, "avae", "sex", "linear", "balanced_accuracy")
    assert linear["value"].mean() <= 0.72, linear
    assert linear["value"].mean() <= linear["value_before"].mean() - 0.2, linear
    age = _rows(table, "avae", "age", "linear", "mae")
    assert age["value"].mean() <= 0.4 * age["chance"].mean(), age
    nonlinear = _rows(table, "avae", "sex", "mlp", "balanced_accuracy")
    assert np.isfinite(nonlinear["value"].to_numpy()).all()
    info = mitigated["info"]["avae"]
    # .test/config/demo-pca.yaml caps the adversarial VAE for CI; early stopping ends the demo runs near it
    assert info["epochs"] <= info["config"]["max_epochs"] == 150 and info["input_dim"] == 384
    state = torch.load(mitigated["avae_dir"] / "model.pt", weights_only=True)
    assert state["strata"] == sorted(REGIONS) and "skip.weight" in state["state_dict"]
    assert pl.read_csv(mitigated["avae_dir"] / "train_log.csv").height == info["epochs"]


@pytest.mark.slow
def test_adversarial_vae_accepts_1408_dimensional_embeddings(tmp_path):
    emb, subjects, splits = synthetic_embedding_cohort(tmp_path)
    cfg = {"latent_dim": 16, "hidden_dim": 64, "max_epochs": 15, "min_epochs": 5}
    info = debias_adversarial_vae(emb, subjects, splits, ["sex"], tmp_path / "ct-avae/volumes.parquet",
                                  config=cfg, threads=1)
    assert info["input_dim"] == 1408 and info["dim"] == 16
    out = pl.read_parquet(tmp_path / "ct-avae/volumes.parquet")
    assert out.height == 160 and out.schema["embedding"] == pl.Array(pl.Float32, 16)
    assert np.isfinite(np.stack(out["embedding"].to_numpy())).all()
    assert read_parquet_metadata(tmp_path / "ct-avae/volumes.parquet")["source_model"] == "ct-foundation"
    # LEACE takes the same external input
    leace = erase_leace(emb, subjects, splits, "sex", tmp_path / "ct-leace-sex/volumes.parquet", threads=1)
    assert leace["dim"] == 1408


@pytest.mark.slow
def test_run_mitigation_writes_every_method(tmp_path):
    emb, subjects, splits = synthetic_embedding_cohort(tmp_path, dim=48)
    table = run_mitigation(emb, subjects, splits, tmp_path / "embeddings", tmp_path / "mitigation/reprobe.parquet",
                           protected=["sex"], targets=["age"], models_dir=tmp_path / "models",
                           avae={"latent_dim": 8, "hidden_dim": 32, "max_epochs": 20, "min_epochs": 5}, threads=1)
    for name in ("ct-foundation-leace-sex", "ct-foundation-inlp-sex", "ct-foundation-avae"):
        assert (tmp_path / "embeddings" / name / "volumes.parquet").exists(), name
    assert (tmp_path / "models/ct-foundation-avae/model.pt").exists()
    assert pl.read_csv(tmp_path / "models/ct-foundation-avae/train_log.csv").height > 0
    assert pl.read_parquet(tmp_path / "mitigation/reprobe.parquet").equals(table)
    assert set(table["method"].unique()) == {"leace", "inlp", "avae"} and set(table["model"]) == {"ct-foundation"}
    leace = table.filter((pl.col("method") == "leace") & (pl.col("attribute") == "sex") & (pl.col("probe") == "linear"))
    assert leace["value_before"][0] >= 0.9 and abs(leace["value"][0] - 0.5) <= 0.02
    # the adversarial VAE kept task heads for the target (paper 002) and logged their loss
    log = pl.read_csv(tmp_path / "models/ct-foundation-avae/train_log.csv")
    assert {"train_task", "val_task"} <= set(log.columns) and log["train_task"][-1] < log["train_task"][0]


def test_adversarial_vae_is_deterministic_and_leaves_global_rng_alone():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 40)).astype(np.float32)
    sex = rng.integers(0, 2, 120)
    X[:, 0] += 2 * sex
    train = np.arange(120) < 90
    val = ~train
    cfg = {"latent_dim": 8, "hidden_dim": 32, "max_epochs": 10, "min_epochs": 2, "seed": 3}
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    with limit_threads(1):  # the fit itself is tiny; an oversubscribed pool on a shared CI box is not
        a = fit_adversarial_vae(X, {"sex": ("classification", sex)}, train, val, cfg, device="cpu")
        after = torch.rand(1)
        b = fit_adversarial_vae(X, {"sex": ("classification", sex)}, train, val, cfg, device="cpu")
        c = fit_adversarial_vae(X, {"sex": ("classification", sex)}, train, val, {**cfg, "seed": 4}, device="cpu")
    assert torch.get_num_threads() == threads
    assert torch.equal(before, after)  # the caller's random stream is untouched
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    assert json.dumps(a.history) == json.dumps(b.history)
    assert not np.array_equal(a.transform(X), c.transform(X))

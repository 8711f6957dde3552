"""The probe stage: balancing, bootstrap metrics, SVM probes on the demo's real pca embeddings, outputs."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from cohortlens.analysis._data import load_analysis_table
from cohortlens.analysis.probe import (
    METRICS_SCHEMA,
    OOF_SCHEMA,
    PREDICTIONS_SCHEMA,
    ProbeSettings,
    balanced_accuracy_w,
    bootstrap_weights,
    class_weights,
    model_table,
    model_table_html,
    oof_matrix,
    oof_wide,
    out_of_fold_proba,
    probe_table,
    range_balanced_sample,
    range_bins,
    weighted_auc,
    write_out_of_fold,
    write_probes,
)
from cohortlens.io.tables import read_parquet_metadata

# ------------------------------------------------------------------------------------------- unit


def test_range_balanced_sample_equalises_bins():
    rng = np.random.default_rng(0)
    y = 20 + rng.gamma(2.0, 8.0, size=3000)  # skewed like a cohort's age or weight
    before = np.bincount(range_bins(y, 10), minlength=10)
    assert before.max() > 10 * before[before > 0].min()  # really unbalanced to start with
    idx = range_balanced_sample(y, 10, np.random.default_rng(1))
    after = np.bincount(range_bins(y, 10)[idx], minlength=10)
    occupied = before > 0
    assert (after[occupied] == after[occupied][0]).all()  # every occupied bin equally often
    assert (after[~occupied] == 0).all()
    assert abs(len(idx) - len(y)) <= occupied.sum()
    # bins are over the target range of the sample, not over the values drawn
    assert range_bins(np.array([0.0, 10.0]), 10).tolist() == [0, 9]


def test_class_weights_give_equal_class_totals():
    codes = np.array([0] * 90 + [1] * 10 + [2] * 30)
    w = class_weights(codes, 3)
    totals = np.bincount(codes, weights=w)
    assert np.allclose(totals, totals[0])
    assert np.isclose(w.mean(), 1.0)


def test_weighted_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    scores = np.round(y + rng.normal(0, 1.2, n), 1)  # rounded: ties must count half
    W = rng.integers(0, 4, size=(3, n)).astype(float)
    ours = weighted_auc(scores, y == 1, W)
    ref = [roc_auc_score(y, scores, sample_weight=w) for w in W]
    assert np.allclose(ours, ref)

    y3 = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.6, y3, rng.integers(0, 3, n))
    ours = balanced_accuracy_w(y3, pred, W, 3)
    ref = [balanced_accuracy_score(y3, pred, sample_weight=w) for w in W]
    assert np.allclose(ours, ref)


def test_bootstrap_resamples_whole_subjects():
    subject_codes = np.repeat(np.arange(50), 3)  # three images per subject
    W = np.concatenate(list(bootstrap_weights(subject_codes, 300, np.random.default_rng(0), block=128)))
    assert W.shape == (300, 150)
    per_subject = W.reshape(300, 50, 3)
    assert (per_subject == per_subject[:, :, :1]).all()  # a subject's images are drawn together
    assert (per_subject[:, :, 0].sum(1) == 50).all()


def test_settings_reject_unknown_keys():
    assert ProbeSettings.from_config({"C_grid": [1, 10]}).C_grid == (1.0, 10.0)
    with pytest.raises(ValueError, match="unknown probe setting"):
        ProbeSettings.from_config({"n_boostrap": 10})


# ------------------------------------------------------------------------------------------- demo

FAST = {"n_bootstrap": 300}


def _paths(run):
    res = run / "results"
    return dict(embeddings=res / "embeddings/pca/volumes.parquet", subjects=res / "cohort/subjects.parquet",
                splits=res / "cohort/splits.parquet", images=res / "cohort/images.parquet")


@pytest.fixture(scope="module")
def probe_run(demo_results, tmp_path_factory):
    out = tmp_path_factory.mktemp("probes")
    p = _paths(demo_results)
    metrics = write_probes(p["embeddings"], p["subjects"], p["splits"], out / "metrics.parquet",
                           out / "predictions.parquet", images=p["images"], settings=FAST)
    return out, metrics


def _value(metrics, region, attribute, metric):
    row = metrics.filter((pl.col("region") == region) & (pl.col("attribute") == attribute) & (pl.col("metric") == metric))
    assert row.height == 1, (region, attribute, metric)
    return row.row(0, named=True)


def test_outputs_match_schema(probe_run):
    out, metrics = probe_run
    on_disk = pl.read_parquet(out / "metrics.parquet")
    assert dict(on_disk.schema) == METRICS_SCHEMA
    assert on_disk.equals(metrics)
    preds = pl.read_parquet(out / "predictions.parquet")
    assert dict(preds.schema) == PREDICTIONS_SCHEMA
    assert set(preds["split"].unique()) == {"val", "test"}
    sex = preds.filter(pl.col("attribute") == "sex")
    assert set(sex["y_true"].unique()) <= {"F", "M"} and sex["class_scores"].list.len().unique().to_list() == [2]
    age = preds.filter(pl.col("attribute") == "age")
    assert age["y_true_value"].null_count() == 0 and age["class_scores"].null_count() == age.height
    # every (region, attribute) scored on the test split has as many test predictions as n_test
    n_test = metrics.group_by("region", "attribute").agg(pl.col("n_test").first())
    counted = preds.filter(pl.col("split") == "test").group_by("region", "attribute").len()
    assert n_test.join(counted, on=["region", "attribute"]).select((pl.col("n_test") == pl.col("len")).all()).item()
    meta = read_parquet_metadata(out / "metrics.parquet")
    assert meta["model"] == "pca" and meta["settings"]["n_bootstrap"] == 300
    assert {"C", "gamma", "backend", "tuned_on"} <= set(meta["params"]["neck"]["sex"])


def test_sex_is_decodable_in_every_region(probe_run):
    _, metrics = probe_run
    for region in ("neck", "chest", "lumbar"):
        ba = _value(metrics, region, "sex", "balanced_accuracy")
        assert ba["value"] > 0.75 and ba["ci_low"] > 0.5, ba
        assert ba["ci_low"] <= ba["value"] <= ba["ci_high"]
        auc = _value(metrics, region, "sex", "roc_auc")
        assert auc["ci_low"] > 0.5 and auc["chance"] == 0.5


def test_region_is_decodable_across_regions(probe_run):
    _, metrics = probe_run
    ba = _value(metrics, "all", "region", "balanced_accuracy")
    assert ba["value"] >= 0.98 and ba["chance"] == pytest.approx(1 / 3)
    assert ba["n_test"] == 3 * _value(metrics, "neck", "sex", "balanced_accuracy")["n_test"]


def test_age_beats_the_train_mean(probe_run):
    _, metrics = probe_run
    for region in ("neck", "chest", "lumbar"):
        mae = _value(metrics, region, "age", "mae")
        # chance = MAE of predicting the train mean for every test subject
        assert mae["ci_high"] < mae["chance"], mae


def test_fast_path_agrees_with_exact_svc(demo_results):
    p = _paths(demo_results)
    table = load_analysis_table(p["embeddings"], p["subjects"], p["splits"], region=["neck", "chest", "lumbar"])
    exact, _, prm_e = probe_table(table, ["sex"], {"backend": "exact", "n_bootstrap": 0})
    approx, _, prm_a = probe_table(table, ["sex"], {"backend": "approx", "n_bootstrap": 0})
    assert prm_e["sex"]["backend"] == "exact" and prm_a["sex"]["backend"] == "approx"
    e = exact.filter(pl.col("metric") == "balanced_accuracy")["value"].item()
    a = approx.filter(pl.col("metric") == "balanced_accuracy")["value"].item()
    assert abs(e - a) <= 0.04, (e, a)  # 132 test images: one image is 0.8 points


def test_probe_is_deterministic_for_a_seed(demo_results):
    p = _paths(demo_results)
    table = load_analysis_table(p["embeddings"], p["subjects"], p["splits"], region="chest")
    runs = [probe_table(table, ["sex", "weight"], {"n_bootstrap": 100, "seed": 3}) for _ in range(2)]
    assert runs[0][0].equals(runs[1][0]) and runs[0][1].equals(runs[1][1])
    other = probe_table(table, ["weight"], {"n_bootstrap": 100, "seed": 4})[0]
    assert not other["ci_low"].equals(runs[0][0].filter(pl.col("attribute") == "weight")["ci_low"])


def test_out_of_fold_probabilities(demo_results, tmp_path):
    p = _paths(demo_results)
    table = load_analysis_table(p["embeddings"], p["subjects"], p["splits"], region="neck")
    oof = out_of_fold_proba(table, "sex", FAST)
    assert oof.height == table.frame.height  # every image with a recorded sex
    labels, P, classes = oof_matrix(oof)
    assert classes == ["F", "M"] and np.allclose(P.sum(1), 1.0)
    train = oof["split"] == "train"
    assert (oof.filter(train)["fold"] >= 0).all() and (oof.filter(~train)["fold"] == -1).all()
    # each train subject is predicted by a model that never saw it; still well above chance
    assert (P.argmax(1) == labels)[train.to_numpy()].mean() > 0.8
    with pytest.raises(ValueError):
        out_of_fold_proba(table, "age")

    long = write_out_of_fold(p["embeddings"], p["subjects"], p["splits"], tmp_path / "oof.parquet",
                             regions=["neck"], settings=FAST)
    assert dict(long.schema) == OOF_SCHEMA
    assert set(long["attribute"].unique()) == {"sex"}  # the only categorical protected attribute of the demo
    back = oof_wide(pl.read_parquet(tmp_path / "oof.parquet"), "neck", "sex").sort("image_uid")
    assert np.allclose(back.select("F", "M").to_numpy(), oof.sort("image_uid").select("F", "M").to_numpy())


def test_model_table_layout(probe_run):
    _, metrics = probe_run
    vae_like = metrics.with_columns(pl.lit("other").alias("model"), pl.col("value") * 0.9)
    both = pl.concat([metrics, vae_like])
    table = model_table(both)
    assert table.columns[:3] == ["model", "region", "region balanced accuracy ↑"]
    assert "sex balanced accuracy ↑" in table.columns and "age MAE ↓" in table.columns
    assert table.height == 2 * 4  # two models × (neck, chest, lumbar, all)
    all_rows = table.filter(pl.col("region") == "all")
    assert all_rows["region balanced accuracy ↑"].null_count() == 0
    html = model_table_html(both)
    assert html.startswith("<table") and html.count("<tr>") == 1 + table.height
    # lower MAE is better: the scaled-down copy wins the age column, the original wins sex
    neck = table.filter(pl.col("region") == "neck")
    assert f"<b>{neck.filter(pl.col('model') == 'other')['age MAE ↓'].item():.3f}" in html
    assert f"<b>{neck.filter(pl.col('model') == 'pca')['sex balanced accuracy ↑'].item():.3f}" in html

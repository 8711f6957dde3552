"""The probe stage: balancing, bootstrap metrics, SVM probes on the demo's real pca embeddings, outputs."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from cohortlens.analysis.balance import class_weights, density_weights, range_bins, stratified_subsample
from cohortlens.analysis.model_table import BACKEND_NAMES, model_table
from cohortlens.analysis.out_of_fold import OOF_SCHEMA, oof_matrix, oof_wide, out_of_fold_proba, write_out_of_fold
from cohortlens.analysis.probe import METRICS_SCHEMA, PREDICTIONS_SCHEMA, probe_table, write_probes
from cohortlens.analysis.probe_fit import make_task, prepare_attribute
from cohortlens.analysis.probe_settings import ProbeSettings
from cohortlens.analysis.stats import balanced_accuracy_w, bootstrap_weights, weighted_auc
from cohortlens.analysis.table import AnalysisTable, AttributeSpec, load_analysis_table
from cohortlens.io.tables import read_parquet_metadata
from cohortlens.report.model_table import model_table_html

from conftest import synthetic_embedding_cohort

# ------------------------------------------------------------------------------------------- unit


def skewed_weight_table(n: int = 2000, dim: int = 32, seed: int = 0) -> AnalysisTable:
    """Lognormal body weight (a long right tail, like NAKO's), carried by three embedding dimensions plus noise:
    a probe trained on the raw distribution shrinks its predictions towards the mean."""
    rng = np.random.default_rng(seed)
    weight = np.exp(rng.normal(np.log(75.0), 0.3, n))
    z = (np.log(weight) - np.log(75.0)) / 0.3
    X = rng.standard_normal((n, dim)).astype(np.float32)
    X[:, 0] += z
    X[:, 1] += np.tanh(z)
    X[:, 2] += 0.5 * z
    sex = np.where(X[:, 3] + 0.5 * rng.standard_normal(n) > 0, "M", "F")
    frame = pl.DataFrame({
        "image_uid": [f"S{i:05d}/neck" for i in range(n)], "subject_id": [f"S{i:05d}" for i in range(n)],
        "region": ["neck"] * n, "weight": weight, "sex": sex,
        "split": rng.choice(["train", "val", "test"], n, p=[0.7, 0.1, 0.2]),
    })
    specs = {"weight": AttributeSpec("weight", "continuous", "protected"),
             "sex": AttributeSpec("sex", "categorical", "protected", categories=("F", "M"))}
    return AnalysisTable(frame=frame, X=X, specs=specs, model="synthetic")


SMALL_GRID = {"C_grid": [0.1, 1.0, 10.0], "gamma_grid": [0.3, 1.0], "n_bootstrap": 0}


def test_regression_weights_use_every_row_once_and_flatten_the_target():
    table = skewed_weight_table()
    prep = prepare_attribute(table, "weight")
    train = prep.rows["train"]
    settings = ProbeSettings()
    task, _, _ = make_task(prep, train, settings, np.random.default_rng(0), cap=None)
    assert np.array_equal(np.sort(task.fit_rows), np.sort(train))  # every train row, none twice
    w = task.weights
    assert (w > 0).all() and np.isclose(w.mean(), 1.0)
    assert w.max() / w.min() <= settings.weight_cap + 1e-9
    y = prep.values[train]
    bins = range_bins(y, settings.n_bins)
    raw = np.bincount(bins, minlength=settings.n_bins) / len(y)
    weighted = np.bincount(bins, weights=w, minlength=settings.n_bins) / w.sum()
    assert raw.max() > 100 * raw[raw > 0].min()  # a long tail: the outermost bin 2 rows, the densest ~400
    # flatter: the densest bin's share halves, the effective number of bins (exp entropy) rises from ~5.7 to
    # ~8.4 of 10, and the densest-to-sparsest ratio shrinks by exactly the cap (the tail bins are the capped ones)
    occupied = raw > 0
    assert weighted.max() < 0.5 * raw.max(), (raw, weighted)

    def effective_bins(p):
        return np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())

    assert effective_bins(weighted) > 1.4 * effective_bins(raw), (raw, weighted)
    ratio_raw = raw[occupied].max() / raw[occupied].min()
    ratio_weighted = weighted[occupied].max() / weighted[occupied].min()
    assert ratio_weighted == pytest.approx(ratio_raw / settings.weight_cap)
    # standardised under the weights, so the SVR tube (epsilon) refers to the fitted distribution
    assert np.isclose(np.average(task.target, weights=w), 0.0) and np.isclose(np.average(task.target**2, weights=w), 1.0)

    # without balancing every weight is 1
    plain, _, _ = make_task(prep, train, ProbeSettings(balance_regression=False), np.random.default_rng(0), None)
    assert (plain.weights == 1).all() and np.array_equal(plain.fit_rows, task.fit_rows)


def test_density_weights_cap_and_degenerate_targets():
    rng = np.random.default_rng(1)
    y = np.concatenate([rng.normal(70, 5, 5000), [250.0]])  # one extreme subject
    w = density_weights(y, 10, cap=4.0)
    assert w.max() / w.min() == pytest.approx(4.0)  # the outlier counts 4 rows, not 5000 / 10 copies
    assert np.isclose(w.mean(), 1.0)
    assert np.allclose(density_weights(np.full(7, 3.0), 10), 1.0)
    assert np.allclose(density_weights(y, 10, cap=1.0), 1.0)
    with pytest.raises(ValueError, match="cap"):
        density_weights(y, 10, cap=0.5)


def test_exact_cap_subsamples_without_copies():
    groups = np.array([0] * 5 + [1] * 40 + [2] * 1000)
    idx = stratified_subsample(groups, 100, np.random.default_rng(0))
    assert len(idx) == 100 and len(np.unique(idx)) == 100
    counts = np.bincount(groups[idx], minlength=3)
    assert counts[0] == 5 and counts[1] == 40 and counts[2] == 55  # small groups whole, the rest to the large
    assert np.array_equal(stratified_subsample(groups, 5000, np.random.default_rng(0)), np.arange(len(groups)))
    table = skewed_weight_table(n=1500)
    prep = prepare_attribute(table, "weight")
    task, _, _ = make_task(prep, prep.rows["train"], ProbeSettings(), np.random.default_rng(0), cap=300)
    assert len(task.fit_rows) == 300 and len(np.unique(task.fit_rows)) == 300
    assert task.weights.max() / task.weights.min() <= ProbeSettings().weight_cap + 1e-9


@pytest.mark.slow
def test_weighted_regression_reaches_the_tails():
    table = skewed_weight_table()
    out = {}
    for balance in (True, False):
        _, preds, _ = probe_table(table, ["weight"], {**SMALL_GRID, "backend": "exact", "balance_regression": balance})
        test = preds.filter(pl.col("split") == "test")
        out[balance] = test["y_true_value"].to_numpy(), test["y_pred_value"].to_numpy()
    y, balanced = out[True]
    _, plain = out[False]
    lo, hi = np.quantile(y, [0.1, 0.9])
    tails = (y < lo) | (y > hi)
    # measured: tail MAE 15.2 (weights) vs 19.9 (unweighted); prediction sd 21.0 vs 17.4 (target sd 24.8)
    assert np.abs(balanced - y)[tails].mean() < 0.9 * np.abs(plain - y)[tails].mean()
    assert balanced.std() > plain.std() and balanced.std() > 0.75 * y.std()


def test_model_table_names_the_backend_that_ran():
    table = skewed_weight_table(n=600)
    fast = {**SMALL_GRID, "C_grid": [1.0], "gamma_grid": [1.0], "nystroem_components": 128}
    approx, _, _ = probe_table(table, ["sex", "weight"], {**fast, "backend": "approx"})
    exact, _, _ = probe_table(table, ["sex", "weight"], {**fast, "backend": "exact"})
    assert set(approx["backend"]) == {"approx"} and set(exact["backend"]) == {"exact"}
    both = pl.concat([approx, exact.with_columns(pl.lit("other").alias("model"))])
    t = model_table(both)
    assert t.columns[:5] == ["model", "supervision", "type", "region", "probe"]
    assert set(t["supervision"]) == {"semi"} and set(t["type"]) == {"embedding"}  # probes of embeddings
    assert dict(zip(t["model"], t["probe"])) == {"synthetic": "Nyström RBF + ridge", "other": "SVM (RBF, exact)"}
    html = model_table_html(both)
    assert "<td>Nyström RBF + ridge</td>" in html and "<td>SVM (RBF, exact)</td>" in html
    assert BACKEND_NAMES["cuml"] == "cuML SVM"
    # a metrics file from before the backend was recorded still renders, and says so
    assert model_table(approx.drop("backend"))["probe"].to_list() == ["not recorded"]


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


def test_write_probes_returns_what_it_writes(tmp_path):
    emb, subjects, splits = synthetic_embedding_cohort(tmp_path, dim=24, n_subjects=120)
    metrics = write_probes(emb, subjects, splits, tmp_path / "metrics.parquet", tmp_path / "predictions.parquet",
                           settings={**SMALL_GRID, "n_bootstrap": 20})
    on_disk = pl.read_parquet(tmp_path / "metrics.parquet")
    assert dict(on_disk.schema) == METRICS_SCHEMA and on_disk.equals(metrics)
    assert set(metrics["attribute"]) == {"sex", "age"}
    assert dict(pl.read_parquet(tmp_path / "predictions.parquet").schema) == PREDICTIONS_SCHEMA


def _paths(run):
    res = run / "results"
    return dict(embeddings=res / "embeddings/pca/volumes.parquet", subjects=res / "cohort/subjects.parquet",
                splits=res / "cohort/splits.parquet", images=res / "cohort/images.parquet")


@pytest.fixture(scope="module")
def probe_run(demo_results):
    """The probe stage's own outputs for pca in the session's demo run (.test/config/demo-pca.yaml:
    probe.n_bootstrap 300), read back as written."""
    out = demo_results / "results/probes/pca"
    return out, pl.read_parquet(out / "metrics.parquet")


def _value(metrics, region, attribute, metric):
    row = metrics.filter((pl.col("region") == region) & (pl.col("attribute") == attribute) & (pl.col("metric") == metric))
    assert row.height == 1, (region, attribute, metric)
    return row.row(0, named=True)


def test_outputs_match_schema(probe_run):
    out, metrics = probe_run
    on_disk = pl.read_parquet(out / "metrics.parquet")
    assert dict(on_disk.schema) == METRICS_SCHEMA
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
    assert table.columns[:6] == ["model", "supervision", "type", "region", "probe", "region balanced accuracy ↑"]
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

"""Repeated subject-level cross-validation of the probes for cohorts with a small test split (`probe_cv`)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cohortlens.analysis.model_table import model_table
from cohortlens.analysis.probe import METRICS_SCHEMA, probe_table
from cohortlens.analysis.probe_cv import cv_fold_assignment
from cohortlens.analysis.probe_settings import ProbeSettings
from cohortlens.analysis.table import load_analysis_table
from cohortlens.report.model_table import model_table_html

from conftest import synthetic_embedding_cohort

N_SUBJECTS = 100  # the fixture's split: 70 train, 10 val, 20 test subjects
FAST = {"C_grid": [1.0, 10.0], "gamma_grid": [1.0], "n_bootstrap": 200}
CV = {**FAST, "cv_below_test_subjects": 30, "cv_folds": 3, "cv_repeats": 2}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    emb, subjects, splits = synthetic_embedding_cohort(tmp_path_factory.mktemp("cv"), dim=200, n_subjects=N_SUBJECTS)
    return load_analysis_table(emb, subjects, splits, region="chest")


@pytest.fixture(scope="module")
def cv_run(cohort):
    return probe_table(cohort, ["sex", "age"], CV, region="chest")


def test_small_test_split_is_scored_by_repeated_cv(cohort, cv_run):
    metrics, predictions, params = cv_run
    assert dict(metrics.schema) == METRICS_SCHEMA
    assert metrics["evaluation"].to_list() == ["repeated_cv(3x2)"] * 3  # sex: BA + AUC, age: MAE
    assert params["sex"]["evaluation"] == "repeated_cv(3x2)" and len(params["age"]["cv_tuned"]) == 6
    # every subject with a value is evaluated (one image per subject here), not only the 20 test subjects
    assert metrics["n_test"].to_list() == [N_SUBJECTS] * 3
    assert (metrics["n_train"] < N_SUBJECTS).all() and (metrics["n_train"] >= N_SUBJECTS * 2 // 3 - 1).all()
    for row in metrics.iter_rows(named=True):
        assert row["ci_low"] <= row["value"] <= row["ci_high"] and row["ci_low"] < row["ci_high"], row
    ba = metrics.filter(pl.col("metric") == "balanced_accuracy").row(0, named=True)
    assert ba["value"] > 0.75 and ba["chance"] == 0.5  # the planted sex signal survives the CV
    mae = metrics.filter(pl.col("metric") == "mae").row(0, named=True)
    assert mae["value"] < mae["chance"]
    # the predictions stay the fixed-split model's (fairness and the CheXpert mean AUC read the test split)
    assert set(predictions["split"]) == {"val", "test"}
    assert predictions.filter(pl.col("split") == "test")["subject_id"].n_unique() == 20


def test_folds_never_split_a_subject():
    rng = np.random.default_rng(0)
    subjects = np.repeat([f"S{i:03d}" for i in range(60)], 3)  # three images per subject
    strata = np.repeat(rng.integers(0, 2, 60), 3)
    folds, n_folds = cv_fold_assignment(subjects, strata, 5, 4, seed=0)
    assert n_folds == 5 and folds.shape == (4, len(subjects)) and (folds >= 0).all()
    for r in range(4):
        per_subject = pl.DataFrame({"s": subjects, "f": folds[r]}).group_by("s").agg(pl.col("f").n_unique())
        assert (per_subject["f"] == 1).all()
        assert set(folds[r]) == set(range(5))
        for f in range(5):  # stratified: each fold holds both classes
            assert set(strata[folds[r] == f]) == {0, 1}
    assert not np.array_equal(folds[0], folds[1])  # a fresh shuffle per repeat
    # fewer folds when a stratum has fewer subjects than folds
    few = np.repeat([0] * 57 + [1] * 3, 3)
    assert cv_fold_assignment(subjects, few, 5, 1, seed=0)[1] == 3


def test_large_test_split_keeps_the_fixed_split(cohort):
    fixed, _, params = probe_table(cohort, ["sex"], {**CV, "cv_below_test_subjects": 10}, region="chest")
    default, _, _ = probe_table(cohort, ["sex"], FAST, region="chest")
    assert set(fixed["evaluation"]) == {"test_split"} and params["sex"]["evaluation"] == "test_split"
    assert fixed.equals(default)  # exactly the behaviour without the CV keys
    assert fixed["n_test"].to_list() == [20, 20]


def test_model_table_says_which_evaluation_ran(cv_run):
    metrics = cv_run[0]
    fixed = metrics.with_columns(pl.lit("fixed").alias("model"), pl.lit("test_split").alias("evaluation"),
                                 pl.lit(10).cast(pl.Int64).alias("n_test"))
    t = model_table(pl.concat([metrics, fixed]))
    probes = dict(zip(t["model"], t["probe"]))
    assert probes["fixed"] == "SVM (RBF, exact)"
    assert probes["ct-foundation"] == "SVM (RBF, exact); repeated_cv(3x2): age, sex"
    html = model_table_html(pl.concat([metrics, fixed]))
    assert f"<td>{N_SUBJECTS}</td>" in html and "<td>10</td>" in html


def test_cv_settings_reject_typos():
    assert ProbeSettings.from_config({"cv_folds": 3}).cv_folds == 3
    assert ProbeSettings().cv_below_test_subjects == 0  # off unless configured
    with pytest.raises(ValueError, match="unknown probe setting"):
        ProbeSettings.from_config({"cv_fold": 3})

"""The fairness stage: fairlearn MetricFrame numbers, subject bootstrap CIs, flags, binning, demo run."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from cohortlens.analysis.fairness import GROUPS_SCHEMA, OVERALL, SUMMARY_SCHEMA, fairness_tables
from cohortlens.analysis.fairness_groups import bin_edges, protected_groups
from cohortlens.analysis.fairness_metrics import bootstrap_binary, metric_frame_binary
from cohortlens.analysis.table import AttributeSpec

SPECS = {
    "finding": AttributeSpec("finding", "categorical", "target", categories=("negative", "positive")),
    "sex": AttributeSpec("sex", "categorical", "protected", categories=("F", "M")),
    "age": AttributeSpec("age", "continuous", "protected"),
}


def _frame(y_true, y_pred, score, sex, age=None, images_per_subject=1):
    n = len(y_true)
    subjects = [f"S{i:04d}" for i in range(n)]
    preds = pl.DataFrame({
        "model": ["m"] * n * images_per_subject,
        "region": ["chest"] * n * images_per_subject,
        "attribute": ["finding"] * n * images_per_subject,
        "subject_id": [s for s in subjects for _ in range(images_per_subject)],
        "image_uid": [f"{s}/{k}" for s in subjects for k in range(images_per_subject)],
        "split": ["test"] * n * images_per_subject,
        "y_true": [("positive" if t else "negative") for t in y_true for _ in range(images_per_subject)],
        "y_pred": [("positive" if p else "negative") for p in y_pred for _ in range(images_per_subject)],
        "score": [float(s) for s in score for _ in range(images_per_subject)],
    })
    subj = pl.DataFrame({"subject_id": subjects, "sex": list(sex),
                         "age": list(age) if age is not None else [50.0] * n})
    return preds, subj


def _value(groups, group, metric, protected="sex"):
    row = groups.filter((pl.col("group") == group) & (pl.col("metric") == metric) & (pl.col("protected") == protected))
    assert row.height == 1, (group, metric)
    return row["value"][0]


def test_metric_frame_numbers_equal_a_hand_computation():
    # F: TP, FN, TN, FP -> accuracy 1/2, TPR 1/2, FPR 1/2, selection 2/4
    # M: TP, TP, TP, TN -> accuracy 1,   TPR 1,   FPR 0,   selection 3/4
    y_true = [1, 1, 0, 0, 1, 1, 1, 0]
    y_pred = [1, 0, 0, 1, 1, 1, 1, 0]
    score = [0.9, 0.2, 0.1, 0.6, 0.8, 0.7, 0.9, 0.3]
    sex = ["F"] * 4 + ["M"] * 4
    preds, subj = _frame(y_true, y_pred, score, sex)
    groups, summary = fairness_tables(preds, subj, SPECS, {"targets": ["finding"], "protected": ["sex"],
                                                           "n_boot": 50, "min_group_size": 1})
    assert set(groups.columns) == set(GROUPS_SCHEMA) and set(summary.columns) == set(SUMMARY_SCHEMA)
    assert (groups["positive"] == "positive").all()
    hand = {
        "F": {"accuracy": 0.5, "tpr": 0.5, "fnr": 0.5, "fpr": 0.5, "selection_rate": 0.5, "balanced_accuracy": 0.5,
              # positives 0.9, 0.2 vs negatives 0.1, 0.6: pairs won 0.9>0.1, 0.9>0.6, 0.2>0.1 -> 3/4
              "roc_auc": 0.75, "count": 4},
        "M": {"accuracy": 1.0, "tpr": 1.0, "fnr": 0.0, "fpr": 0.0, "selection_rate": 0.75, "balanced_accuracy": 1.0,
              "roc_auc": 1.0, "count": 4},
        OVERALL: {"accuracy": 0.75, "tpr": 0.8, "selection_rate": 5 / 8, "fpr": 1 / 3, "count": 8},
    }
    for group, metrics in hand.items():
        for metric, expected in metrics.items():
            assert _value(groups, group, metric) == pytest.approx(expected), (group, metric)
    by_measure = {r["measure"]: r for r in summary.iter_rows(named=True)}
    assert by_measure["demographic_parity_difference"]["value"] == pytest.approx(0.25)
    assert by_measure["demographic_parity_difference"]["group_high"] == "M"
    # max(TPR gap 0.5, FPR gap 0.5)
    assert by_measure["equalized_odds_difference"]["value"] == pytest.approx(0.5)
    assert by_measure["accuracy_difference"]["value"] == pytest.approx(0.5)
    assert by_measure["roc_auc_difference"]["value"] == pytest.approx(0.25)


def test_vectorised_bootstrap_at_unit_weights_equals_metric_frame():
    rng = np.random.default_rng(3)
    n = 120
    y_true = rng.random(n) < 0.4
    y_pred = rng.random(n) < 0.5
    score = rng.normal(size=n) + y_true
    groups = rng.choice(["a", "b", "c"], n).astype(object)
    y_true[groups == "c"] = False  # a group without positives: TPR undefined, not 0
    by_group, _ = metric_frame_binary(y_true, y_pred, score, groups.astype(str))
    codes = np.searchsorted(np.array(["a", "b", "c"]), groups.astype(str))
    boot = bootstrap_binary(y_true, y_pred, score, codes, 3, np.ones((1, n)))
    for k, g in enumerate(["a", "b", "c"]):
        for metric in ("accuracy", "balanced_accuracy", "tpr", "fnr", "fpr", "selection_rate", "count", "roc_auc"):
            expected = by_group[g][metric]
            got = boot[metric][0, k]
            if np.isnan(expected):
                assert np.isnan(got), (g, metric)
            else:
                assert got == pytest.approx(expected), (g, metric)
    assert np.isnan(by_group["c"]["tpr"]) and np.isnan(by_group["c"]["roc_auc"])


def _gap_example(rng, n_per_group, error_f, error_m):
    y_true = rng.random(2 * n_per_group) < 0.5
    errors = np.concatenate([rng.random(n_per_group) < error_f, rng.random(n_per_group) < error_m])
    y_pred = y_true ^ errors
    score = np.where(y_pred, 1.0, -1.0) + rng.normal(scale=0.5, size=2 * n_per_group)
    return y_true, y_pred, score, ["F"] * n_per_group + ["M"] * n_per_group


def test_planted_group_gap_is_flagged():
    rng = np.random.default_rng(0)
    preds, subj = _frame(*_gap_example(rng, 200, error_f=0.05, error_m=0.35))
    _, summary = fairness_tables(preds, subj, SPECS, {"targets": ["finding"], "protected": ["sex"], "n_boot": 400})
    flagged = {r["measure"]: r for r in summary.iter_rows(named=True)}
    for measure in ("accuracy_difference", "balanced_accuracy_difference", "equalized_odds_difference",
                    "roc_auc_difference"):
        assert flagged[measure]["flagged"], flagged[measure]
        assert flagged[measure]["ci_low"] > 0
    assert flagged["accuracy_difference"]["group_high"] == "F"
    assert flagged["accuracy_difference"]["value"] == pytest.approx(0.30, abs=0.08)


def test_no_flag_without_a_gap():
    # group M is an exact copy of group F: every difference is 0, every signed-gap CI straddles 0
    rng = np.random.default_rng(1)
    y_true, y_pred, score, _ = _gap_example(rng, 150, 0.2, 0.2)
    y_true, y_pred, score = y_true[:150], y_pred[:150], score[:150]
    preds, subj = _frame(np.tile(y_true, 2), np.tile(y_pred, 2), np.tile(score, 2), ["F"] * 150 + ["M"] * 150)
    _, summary = fairness_tables(preds, subj, SPECS, {"targets": ["finding"], "protected": ["sex"], "n_boot": 400})
    assert summary.height == 6
    assert not summary["flagged"].any(), summary
    assert summary["value"].abs().max() < 1e-12
    assert (summary["ci_low"] < 0).all() and (summary["ci_high"] > 0).all()


def test_bootstrap_resamples_subjects_not_images():
    # three identical images per subject carry no extra information: the CI must not shrink
    rng = np.random.default_rng(2)
    data = _gap_example(rng, 60, 0.1, 0.3)
    settings = {"targets": ["finding"], "protected": ["sex"], "n_boot": 600, "seed": 5}
    _, one = fairness_tables(*_frame(*data), SPECS, settings)
    _, three = fairness_tables(*_frame(*data, images_per_subject=3), SPECS, settings)
    w1 = (one["ci_high"] - one["ci_low"]).to_numpy()
    w3 = (three["ci_high"] - three["ci_low"]).to_numpy()
    np.testing.assert_allclose(one["value"].to_numpy(), three["value"].to_numpy())
    np.testing.assert_allclose(w3, w1, rtol=1e-9)  # same seed, same subject draws, same intervals


def test_continuous_protected_attribute_is_binned_on_the_cohort():
    spec = SPECS["age"]
    cohort_ages = np.linspace(20, 80, 61)
    edges = bin_edges(cohort_ages, spec, 3)
    assert edges == [40.0, 60.0]
    labels, order = protected_groups(np.array([25.0, 40.0, 59.9, 60.0, np.nan]), spec, edges)
    assert order == ["< 40", "[40, 60)", ">= 60"]
    assert labels.tolist() == ["< 40", "[40, 60)", "[40, 60)", ">= 60", None]
    assert bin_edges(cohort_ages, spec, [30, 50]) == [30.0, 50.0]
    date_spec = AttributeSpec("date", "date", "acquisition")
    days = [float((dt.date(2015, 1, 1) - dt.date(1970, 1, 1)).days)]
    assert protected_groups(np.array([days[0] - 1, days[0]]), date_spec, days)[0].tolist() == [
        "< 2015-01-01", ">= 2015-01-01"]


def test_multiclass_target_is_scored_one_vs_rest():
    specs = {"view": AttributeSpec("view", "categorical", "target", categories=("AP", "PA", "LL")),
             "sex": SPECS["sex"]}
    rng = np.random.default_rng(4)
    n = 90
    truth = rng.choice(["AP", "PA", "LL"], n)
    pred = np.where(rng.random(n) < 0.8, truth, rng.choice(["AP", "PA", "LL"], n))
    preds = pl.DataFrame({"region": ["frontal"] * n, "attribute": ["view"] * n,
                          "subject_id": [f"S{i}" for i in range(n)], "image_uid": [f"S{i}/0" for i in range(n)],
                          "split": ["test"] * n, "y_true": truth, "y_pred": pred})
    subj = pl.DataFrame({"subject_id": [f"S{i}" for i in range(n)], "sex": rng.choice(["F", "M"], n)})
    groups, summary = fairness_tables(preds, subj, specs, {"targets": ["view"], "protected": ["sex"], "n_boot": 50},
                                      model="m")
    assert set(summary["positive"].unique()) == {"AP", "PA", "LL"}
    for cls in ("AP", "PA", "LL"):
        acc = groups.filter((pl.col("positive") == cls) & (pl.col("group") == OVERALL)
                            & (pl.col("metric") == "accuracy"))
        assert acc["value"][0] == pytest.approx(np.mean((truth == cls) == (pred == cls)))


@pytest.fixture(scope="module")
def demo_fairness(demo_results):
    """The probe and fairness stages' outputs for pca in the session's demo run (.test/config/demo-pca.yaml:
    targets sex, protected age and site, 300 bootstraps)."""
    res = demo_results / "results"
    out = res / "fairness"
    metrics = pl.read_parquet(res / "probes/pca/metrics.parquet")
    summary = pl.read_parquet(out / "pca/summary.parquet")
    return res, out, metrics, summary


def test_demo_fairness_tables(demo_fairness):
    res, out, metrics, summary = demo_fairness
    groups = pl.read_parquet(out / "pca/groups.parquet")
    assert dict(groups.schema) == GROUPS_SCHEMA and dict(summary.schema) == SUMMARY_SCHEMA
    assert set(summary["region"].unique()) == {"neck", "chest", "lumbar"}
    assert set(summary["protected"].unique()) == {"age", "site"}
    assert len(set(groups.filter(pl.col("protected") == "age")["group"].unique()) - {OVERALL}) == 3  # default bins
    predictions = pl.read_parquet(res / "probes/pca/predictions.parquet").filter(pl.col("split") == "test")
    for region in ("neck", "chest", "lumbar"):
        n_test = predictions.filter(pl.col("region") == region)["subject_id"].n_unique()
        counts = groups.filter((pl.col("region") == region) & (pl.col("protected") == "site") &
                               (pl.col("metric") == "count") & (pl.col("group") != OVERALL))
        assert counts["value"].sum() == n_test
        # overall balanced accuracy and AUC are the probe's own test numbers for sex (same rows; the AUC
        # also checks that the probe's score is read as the score of the positive class M)
        for metric in ("balanced_accuracy", "roc_auc"):
            probe_value = metrics.filter((pl.col("region") == region) & (pl.col("attribute") == "sex") &
                                         (pl.col("metric") == metric))["value"][0]
            ours = groups.filter((pl.col("region") == region) & (pl.col("protected") == "site") &
                                 (pl.col("group") == OVERALL) & (pl.col("metric") == metric))["value"][0]
            assert ours == pytest.approx(probe_value), (region, metric)
    finite = summary.filter(pl.col("value").is_finite())
    assert finite.height > 0
    assert (finite["flagged"] == ((finite["ci_low"] > 0) | (finite["ci_high"] < 0))).all()

"""Attack probes: tuned nonlinear attackers see what erasing the linear part leaves; their test against chance
is calibrated; the adversarial VAE's task head keeps the target."""

from __future__ import annotations

import numpy as np
import pytest

from cohortlens.analysis.attack import bootstrap_ci, fit_predict, metric_values, p_vs_chance
from cohortlens.models.adversarial_vae import fit_adversarial_vae
from cohortlens.runtime import limit_threads


def _xor_world(n=600, seed=0):
    """Sex lives in the sign of x0·x1: no linear classifier can read it, an RBF SVM or an MLP can."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    y = np.where(X[:, 0] * X[:, 1] > 0, "M", "F").astype(object)
    train = np.arange(n) < int(0.7 * n)
    return X, y, train, ~train


def test_tuned_attackers_read_what_a_linear_probe_cannot():
    X, y, train, test = _xor_world()
    with limit_threads(1):
        scores = {p: metric_values("classification", y[test], fit_predict(X, y, "classification", p, train, test))
                  for p in ("linear", "rbf_svm", "mlp")}
    assert scores["linear"]["balanced_accuracy"] < 0.62, scores
    assert scores["rbf_svm"]["balanced_accuracy"] > 0.85 and scores["mlp"]["balanced_accuracy"] > 0.75, scores
    pred = fit_predict(X, y, "classification", "rbf_svm", train, test)
    assert p_vs_chance("balanced_accuracy", y[test], pred) <= 0.002


@pytest.mark.slow
def test_test_against_chance_is_calibrated_on_a_null_world():
    ps = []
    with limit_threads(1):
        for rep in range(12):
            rng = np.random.default_rng(50 + rep)
            X = rng.normal(size=(150, 5))
            y = rng.choice(["F", "M"], 150).astype(object)
            train = np.arange(150) < 105
            pred = fit_predict(X, y, "classification", "rbf_svm", train, ~train, seed=rep)
            ps.append(p_vs_chance("balanced_accuracy", y[~train], pred, n_perm=199, seed=rep))
    assert sum(p <= 0.05 for p in ps) <= 2 and np.mean(ps) > 0.3, ps


def test_regression_attack_and_intervals():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 4))
    age = 50 + 10 * np.sin(2 * X[:, 0]) + rng.normal(0, 1, 400)  # nonlinear in the embedding
    train = np.arange(400) < 280
    with limit_threads(1):
        lin = fit_predict(X, age, "regression", "linear", train, ~train)
        svm = fit_predict(X, age, "regression", "rbf_svm", train, ~train)
    m_lin, m_svm = metric_values("regression", age[~train], lin), metric_values("regression", age[~train], svm)
    assert m_svm["mae"] < 0.6 * m_lin["mae"], (m_lin, m_svm)
    ci = bootstrap_ci("mae", age[~train], svm, pred_before=lin)
    assert ci["ci_low"] <= m_svm["mae"] <= ci["ci_high"]
    # MAE drop before (linear) → after (svm) is negative (the svm is better): its interval excludes 0
    assert ci["drop_ci_high"] < 0
    assert p_vs_chance("mae", age[~train], svm, n_perm=199) <= 0.01


@pytest.mark.slow
def test_adversarial_vae_task_head_keeps_the_target():
    """Paper 002: the debiased latent keeps the clinical task. A 4-d latent without the linear skip must choose
    what to keep; with the task head it keeps age (held-out ridge R² from μ), without it much less."""
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(0)
    n = 500
    X = rng.normal(size=(n, 30)).astype(np.float32)
    sex = rng.integers(0, 2, n)
    age = rng.uniform(40, 80, n)
    X[:, :4] += 2.0 * sex[:, None]
    X[:, 4:6] += ((age - 60) / 10)[:, None] * 0.8
    train, val = np.arange(n) < 350, (np.arange(n) >= 350) & (np.arange(n) < 420)
    test = np.arange(n) >= 420
    r2 = {}
    for task_weight in (0.0, 1.0):
        cfg = {"latent_dim": 4, "hidden_dim": 32, "max_epochs": 80, "min_epochs": 20, "batch_size": 64,
               "linear_skip": False, "task_weight": task_weight}
        with limit_threads(1):
            fit = fit_adversarial_vae(X, {"sex": ("classification", sex)}, train, val, cfg, device="cpu",
                                      task_targets={"age": ("regression", age)})
        assert [t.name for t in fit.tasks] == (["age"] if task_weight else [])
        assert "train_task" in fit.history[0] and "val_task" in fit.history[0]
        Z = fit.transform(X)
        r2[task_weight] = RidgeCV().fit(Z[train], age[train]).score(Z[test], age[test])
    assert r2[1.0] > max(0.3, r2[0.0] + 0.1), r2

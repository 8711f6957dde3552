"""The probe's settings (config `probe:`): one frozen dataclass read by every part of the probe: the backend
and its kernel approximation (`probe_backends`), the balanced training task and the C/γ tuning (`probe_fit`),
the bootstrap (`probe`), the repeated cross-validation of small cohorts (`probe_cv`) and the out-of-fold probabilities (`out_of_fold`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from cohortlens.analysis.balance import DEFAULT_WEIGHT_CAP


@dataclass(frozen=True)
class ProbeSettings:
    """Probe hyperparameters (config `probe:`); every field has the default used when the key is absent."""

    seed: int = 0
    backend: str = "auto"  # auto | cuml | exact | approx
    n_bootstrap: int = 1000
    n_bins: int = 10  # regression: equal-width bins over the target range, the density of the balancing weights
    weight_cap: float = DEFAULT_WEIGHT_CAP  # regression: largest / smallest balancing weight
    balance_regression: bool = True  # False: every training row weight 1 (the probe drifts to the mean)
    C_grid: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)
    gamma_grid: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)  # multiples of 1/(n_features · var), sklearn's 'scale'
    epsilon: float = 0.1  # SVR tube in standard deviations of the target
    min_val: int = 50  # fewer val rows than this: tune on a held-out fifth of the train subjects instead
    exact_max_train: int = 5000
    pca_dims: int = 256
    pca_fit_rows: int = 4000
    nystroem_components: int = 1024
    feature_cache_mb: int = 512  # Nyström feature matrices kept across attributes (approx backend)
    # fewer test subjects than this (per attribute and region): metrics from repeated subject-level CV over
    # train+val+test instead of the fixed test split (`probe_cv`); 0: always the test split
    cv_below_test_subjects: int = 0
    cv_folds: int = 5  # fewer when a class (or target quintile) has fewer subjects
    cv_repeats: int = 5

    @classmethod
    def from_config(cls, cfg: Mapping | "ProbeSettings" | None) -> "ProbeSettings":
        if isinstance(cfg, ProbeSettings):
            return cfg
        cfg = dict(cfg or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - names
        if unknown:
            raise ValueError(f"unknown probe setting(s) {sorted(unknown)}; known: {sorted(names)}")
        for key in ("C_grid", "gamma_grid"):
            if key in cfg:
                cfg[key] = tuple(float(v) for v in cfg[key])
        return cls(**cfg)

"""The direction of a finding in a DAE's z_sem (`analysis.counterfactuals` draws the strips along it): the difference
of the set's and the rest's mean standardised embedding at equal recorded continuous traits, its σ, and its way back
to raw z_sem. Decisions: docs/findings.md, "Counterfactual strips"."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from cohortlens.analysis.discover.core import INTERACTION_SEP
from cohortlens.analysis.table import AnalysisTable, attribute_values


@dataclass(frozen=True)
class FindingDirection:
    """u (unit, standardised space), σ of the projections on u, the raw z_sem direction u ⊙ std, and the
    distance between the class means along u (‖mean(set) - mean(rest)‖, standardised units)."""

    unit: np.ndarray
    sigma: float
    raw: np.ndarray
    mean_gap: float
    n_set: int
    n_rest: int

    @property
    def gap_sigma(self) -> float:
        """How many σ the class means lie apart along u."""
        return self.mean_gap / self.sigma

    def step(self, s: float) -> np.ndarray:
        """The raw z_sem displacement of s σ along the direction."""
        return (s * self.sigma) * self.raw


def finding_direction(embeddings: np.ndarray, in_set: np.ndarray, in_rest: np.ndarray | None = None,
                      std: np.ndarray | None = None, covariates: np.ndarray | None = None) -> FindingDirection:
    """The set's direction in standardised embeddings (n, d), unit-normalised; σ = std of the projections of
    set ∪ rest onto it; `std` (d,) maps it back to raw z_sem (the embedding's train-split std).

    Without `covariates` it is the difference of the class means. With `covariates` (n, k), recorded traits of the
    same images, it is the set indicator's coefficient in the least-squares model Z ~ 1 + set + covariates fitted on
    set ∪ rest: the difference of the means *at equal covariates*, so that the direction of sex does not carry
    body height along with it (an echo of a covariate is not what the set looks like)."""
    Z = np.asarray(embeddings, dtype=np.float64)
    in_set = np.asarray(in_set, dtype=bool)
    in_rest = ~in_set if in_rest is None else np.asarray(in_rest, dtype=bool) & ~in_set
    if in_set.sum() < 2 or in_rest.sum() < 2:
        raise ValueError(f"a direction needs two images on each side (set {in_set.sum()}, rest {in_rest.sum()})")
    used = in_set | in_rest
    if covariates is not None and np.asarray(covariates).size:
        C = np.asarray(covariates, dtype=np.float64)[used]
        design = np.column_stack([np.ones(used.sum()), in_set[used].astype(np.float64), C])
        diff = np.linalg.lstsq(design, Z[used], rcond=None)[0][1]
    else:
        diff = Z[in_set].mean(0) - Z[in_rest].mean(0)
    gap = float(np.linalg.norm(diff))
    if not np.isfinite(gap) or gap == 0.0:
        raise ValueError("the set and the rest have the same mean embedding: no direction")
    unit = diff / gap
    sigma = float((Z[used] @ unit).std(ddof=1))
    std = np.ones(Z.shape[1]) if std is None else np.asarray(std, dtype=np.float64)
    return FindingDirection(unit=unit, sigma=sigma, raw=unit * std, mean_gap=gap, n_set=int(in_set.sum()),
                            n_rest=int(in_rest.sum()))


def direction_covariates(frame: pl.DataFrame, table: AnalysisTable, attribute: str) -> tuple[np.ndarray, list[str]]:
    """The recorded continuous traits (age, height, weight, …; not dates, not the finding's own attribute) of
    `frame`'s images as an (n, k) matrix, standardised, a missing value set to the mean (it then adds nothing),
    and their names. A trait recorded for fewer than half of the images, or constant, is left out."""
    own = attribute.split(INTERACTION_SEP)[0]
    columns, names = [], []
    for name, spec in table.specs.items():
        if name == own or spec.type != "continuous" or name not in frame.columns:
            continue
        v = attribute_values(frame, spec)
        ok = np.isfinite(v)
        if ok.sum() < max(2, 0.5 * len(v)) or np.nanstd(v) == 0:
            continue
        v = np.where(ok, v, np.nanmean(v))
        columns.append((v - v.mean()) / v.std())
        names.append(name)
    return (np.column_stack(columns) if columns else np.zeros((frame.height, 0))), names

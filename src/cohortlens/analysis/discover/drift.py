"""Drift along the acquisition date (the `non_iid` kind): are images acquired close in time close in embedding
space, within the acquisition strata (site, scanner)?

What is cleanlab's and what is ours:

* cleanlab (`Datalab.find_issues(issue_types={"non_iid": ...})`): the kNN graph of the features (its metric
  and k) and the statistic, the Kolmogorov–Smirnov distance between the distribution of |i − j| over kNN
  pairs (i, j) in the row order and that distribution for random pairs.
* ours: the strata and the p-value. The graph is built within each stratum (the joint values of the
  categorical acquisition attributes that are not a function of the date, `drift_strata`; features centred
  per stratum), the rows ordered by date within it, and cleanlab's statistic computed per stratum. A site
  that recruited in one period and looks different then cannot make neighbours look close in time, and a
  drift inside one site is not diluted by the pairs of the others. The region's statistic combines the
  strata (each stratum's statistic standardised by its permutation mean and spread, weighted by the square
  root of its size). Its p-value: the dates permuted within the strata `drift_permutations` times, p = (1 +
  #{permuted ≥ observed}) / (1 + permutations). Null: within each stratum the images' dates are exchangeable
  with respect to their neighbourhoods. cleanlab's own p-value (a Gaussian KDE fitted to 25 random orders,
  integrated far into its tail) is not used: on the null scenario's embeddings it gave p = 3.8e-5 for a
  random date order (docs/findings.md).

Images without a date, and strata with fewer than MIN_ROWS dated images, are left out of the test. Ties in
the date are ordered at random (seeded), not by row. A significant drift that one stratum value carries alone
is named site×date, as everywhere in the discover stage (`core.confine_to_any_stratum`, on the same
permutations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cohortlens.analysis.discover.core import (
    Finding,
    RegionData,
    confine_to_any_stratum,
    date_proxies,
    interaction_name,
    stratum_attributes,
)

MIN_ROWS = 20  # cleanlab's kNN graph asks for 10 neighbours; below this it reports no non-IID result


@dataclass(frozen=True)
class DriftSettings:
    drift_permutations: int = 999  # date orders permuted within the strata per drift test


def knn_neighbours(features: np.ndarray) -> np.ndarray:
    """cleanlab's kNN graph of the rows as an (n, k) array of neighbour indices."""
    from cleanlab import Datalab

    lab = Datalab(data={"row": np.arange(len(features))}, verbosity=0)
    lab.find_issues(features=np.ascontiguousarray(features, dtype=np.float32), issue_types={"non_iid": {}})
    graph = lab.get_info("statistics")["weighted_knn_graph"]
    return graph.indices.reshape(graph.shape[0], -1)


def order_statistic(positions: np.ndarray, neighbours: np.ndarray) -> float:
    """cleanlab's non-IID statistic for rows at these positions of the order: the largest gap between the
    empirical CDF of |position_i − position_j| over kNN pairs and the CDF of that distance for random pairs
    of n ordered rows, P(d) ∝ n − d."""
    n = len(positions)
    gaps = np.sort(np.abs(positions[:, None] - positions[neighbours]).ravel())
    gaps = np.append(gaps, n - 1).astype(np.int64)
    background = np.cumsum((n - np.arange(1, n)) / (n * (n - 1) / 2))
    foreground = np.arange(len(gaps)) / (len(gaps) - 1)
    return float(np.max(np.abs(foreground - background[gaps - 1])))


@dataclass
class StratumDrift:
    """cleanlab's statistic in each stratum, observed and on every permutation of the dates within it."""

    rows: list[np.ndarray]  # the region's rows of each tested stratum
    observed: np.ndarray  # (strata,)
    permuted: np.ndarray  # (permutations, strata)

    def p_value(self, strata: np.ndarray | None = None) -> tuple[float, float]:
        """(combined statistic, permutation p) over the strata selected by the boolean mask (all by default)."""
        sel = np.ones(len(self.rows), bool) if strata is None else np.asarray(strata, bool)
        if not sel.any():
            return float("nan"), float("nan")
        mean, sd = self.permuted.mean(0), self.permuted.std(0) + 1e-12
        weight = np.sqrt([len(r) for r in self.rows]) * sel
        observed = float(((self.observed - mean) / sd) @ weight)
        permuted = ((self.permuted - mean) / sd) @ weight
        return observed, float((1 + (permuted >= observed - 1e-12).sum()) / (1 + len(permuted)))

    def effect(self) -> float:
        """The strata's statistic above its permutation mean, weighted by their sizes."""
        n = np.array([len(r) for r in self.rows], float)
        return float(((self.observed - self.permuted.mean(0)) * n).sum() / n.sum())


def stratum_drift(features: np.ndarray, days: np.ndarray, strata: np.ndarray | None, permutations: int,
                  rng: np.random.Generator) -> StratumDrift | None:
    """The drift statistic of `features` along `days` in each stratum, and on `permutations` orders with the
    dates permuted within it; None when no stratum has MIN_ROWS dated images."""
    ok = np.isfinite(days)
    labels = np.zeros(len(days), object) if strata is None else np.asarray(strata, dtype=object).astype(str)
    rows, graphs, positions = [], [], []
    for value in np.unique(labels[ok]):
        idx = np.flatnonzero(ok & (labels == value))
        if len(idx) < MIN_ROWS:
            continue
        F = np.asarray(features[idx], dtype=np.float64)
        rows.append(idx)
        graphs.append(knn_neighbours(F - F.mean(0)))
        pos = np.empty(len(idx), np.int64)
        pos[np.lexsort((rng.random(len(idx)), days[idx]))] = np.arange(len(idx))  # ties in random order
        positions.append(pos)
    if not rows:
        return None
    observed = np.array([order_statistic(p, g) for p, g in zip(positions, graphs)])
    permuted = np.array([[order_statistic(rng.permutation(p), g) for p, g in zip(positions, graphs)]
                         for _ in range(permutations)])
    return StratumDrift(rows, observed, permuted)


def drift_test(features: np.ndarray, days: np.ndarray, strata: np.ndarray | None, permutations: int,
               rng: np.random.Generator) -> tuple[float, float]:
    """(combined statistic, permutation p) of a drift along `days` within `strata`; NaN when untestable."""
    result = stratum_drift(features, days, strata, permutations, rng)
    return (float("nan"), float("nan")) if result is None else result.p_value()


def drift_strata(rd: RegionData, date_attr: str | None) -> list[str]:
    """The acquisition attributes a drift along the date is tested within: every categorical acquisition
    attribute that is not mostly a function of the date (`core.date_proxies`)."""
    if date_attr is None:
        return []
    proxies = date_proxies(rd, date_attr)
    return [a for a in stratum_attributes(rd) if a not in proxies]


def _labels(rd: RegionData, attribute: str) -> np.ndarray:
    return np.array([str(v) for v in rd.values(attribute)], dtype=object)


def joint_labels(rd: RegionData, attributes: list[str]) -> np.ndarray | None:
    if not attributes:
        return None
    parts = [_labels(rd, a) for a in attributes]
    return np.array(["|".join(p[i] for p in parts) for i in range(rd.n)], dtype=object)


def date_drift(rd: RegionData, cfg: dict, rng: np.random.Generator) -> list[Finding]:
    """The drift test of one region (one `non_iid` test, significant or not), named after the one stratum value
    that carries it alone when there is one."""
    dates = rd.attributes(types=("date",))
    if not dates:
        return []
    date_attr = dates[0]
    given = drift_strata(rd, date_attr)
    result = stratum_drift(rd.Zc, rd.values(date_attr), joint_labels(rd, given), int(cfg["drift_permutations"]),
                           rng)
    if result is None:
        return []
    statistic, p = result.p_value()
    tested = np.zeros(rd.n, bool)
    tested[np.concatenate(result.rows)] = True
    details = {"order": date_attr, "statistic": statistic, "null": "dates permuted within the strata",
               "permutations": int(cfg["drift_permutations"]), "given": given, "tested": int(tested.sum()),
               "source": "cleanlab kNN graph and non-IID statistic per stratum; permutation p"}
    where = f"within {' and '.join(given)}" if given else "in the region"
    summary = (f"{rd.region} embeddings {'drift with' if p <= cfg['alpha'] else 'show no drift with'} the "
               f"{date_attr} {where}: neighbours in the embedding (cleanlab's kNN graph) are closer in "
               f"{date_attr} than by chance")
    attribute, value = date_attr, None
    if stratum_attributes(rd) and p <= cfg["alpha"]:
        def test(keep):  # the strata wholly inside `keep`, from the same permutations
            return result.p_value(np.array([keep[r].all() for r in result.rows]))[1]

        stratum, site, p_without = confine_to_any_stratum(rd, test, cfg["alpha"], test_within=test)
        details["p_without_stratum"] = p_without
        if site is not None:
            attribute, value = interaction_name(stratum, date_attr), site
            details["stratum"] = stratum
            summary += f"; carried by {stratum} {site} alone (without it p = {p_without[stratum][site]:.2g})"
    return [Finding("non_iid", rd.region, attribute, value, result.effect(), "non_iid_ks", p, int(tested.sum()),
                    [], summary, details)]

"""Conditional tests of one region's findings: the p-value of a leak, a cluster's enrichment or a pocket when
the finding's attribute A is only exchangeable within strata of other attributes (one, or two jointly).

The tests are the discover stage's own, re-run under a narrower null (docs/findings.md, "Root causes"):

* a leak: the same permutation test with A's labels permuted within B's strata (a number given a number:
  Freedman–Lane on the linear fit instead of bins);
* a density cluster: a one-sided Cochran–Mantel–Haenszel test of (member, A = a) stratified by B;
* a neighbourhood pocket: the pocket search itself with A's labels permuted within B's strata, since the
  pocket was selected by A's labels.

`causes` decides from these p-values which attribute a finding is the echo of.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from cohortlens.analysis.discover.clusters import knn, largest_pocket_null, p_of, permuted_among
from cohortlens.analysis.discover.core import Finding, RegionData, categorical_view
from cohortlens.analysis.discover.leaks import _run
from cohortlens.analysis.table import present

MISSING = "(missing)"
BINS = 5  # quantile bins of a continuous or date attribute used as strata (CMH; two numbers jointly)
BLOCK = 10  # images per block of one number or date inside its categorical cell (permutation strata)


def stratum_labels(rd: RegionData, attribute: str) -> np.ndarray:
    """Strata of one attribute: its categories, or quintile bins of a number or date; missing is a stratum."""
    values = rd.values(attribute)
    ok = present(values)
    out = np.full(rd.n, MISSING, dtype=object)
    if rd.specs[attribute].is_categorical:
        out[ok] = values[ok].astype(str)
        return out
    v = values[ok].astype(float)
    edges = np.unique(np.quantile(v, np.linspace(0, 1, BINS + 1)[1:-1])) if len(v) else np.array([])
    out[ok] = np.digitize(v, edges).astype(str)
    return out


def joint_labels(rd: RegionData, attributes: tuple[str, ...], within_acquisition: bool = False) -> np.ndarray:
    """Strata for conditioning on the attributes jointly (with `within_acquisition` also within the region's
    acquisition strata, which a date is always tested within). Categories are crossed. One number or date among
    them becomes blocks of BLOCK images adjacent in it inside each categorical cell: quintiles left the age
    difference inside the top bin, so an older site still looked older given age (the confounded scenario's
    Mannheim pocket). Two numbers are crossed as quintiles."""
    categorical = [b for b in attributes if rd.specs[b].is_categorical]
    numbers = [b for b in attributes if not rd.specs[b].is_categorical]
    parts = [stratum_labels(rd, b) for b in categorical + (numbers if len(numbers) > 1 else [])]
    if within_acquisition and rd.strata() is not None:
        parts.insert(0, np.asarray(rd.strata(), dtype=object))
    cells = (np.array(["|".join(map(str, t)) for t in zip(*parts)], dtype=object) if parts
             else np.full(rd.n, "", dtype=object))
    if len(numbers) != 1:
        return cells
    values = rd.values(numbers[0])
    ok = present(values)
    out = np.array([f"{c}|{MISSING}" for c in cells], dtype=object)
    for cell in np.unique(cells[ok]):
        idx = np.flatnonzero(ok & (cells == cell))
        order = idx[np.argsort(values[idx].astype(float), kind="stable")]
        out[order] = [f"{cell}|b{i // BLOCK}" for i in range(len(order))]
    return out


def covariate_design(rd: RegionData, given: tuple[str, ...]) -> np.ndarray:
    """Columns of a least-squares fit on `given`: each number (a date as days) standardised and squared, each
    category one-hot (missing its own level, the first level dropped). NaN where a number is missing."""
    cols = []
    for b in given:
        if rd.specs[b].is_categorical:
            labels = stratum_labels(rd, b)
            cols += [(labels == v).astype(float) for v in np.unique(labels)[1:]]
            continue
        v = np.asarray(rd.values(b), float)
        ok = np.isfinite(v)
        z = (v - v[ok].mean()) / (v[ok].std() or 1.0) if ok.any() else v
        cols += [z, z ** 2]
    return np.column_stack(cols) if cols else np.zeros((rd.n, 0))


def _excess(res: dict) -> float:
    null = np.asarray(res["null"], float)
    return float((res["stat"] - null.mean()) / (null.std() or 1.0))


def cmh_greater(members: np.ndarray, is_v: np.ndarray, ok: np.ndarray, strata: np.ndarray) -> float:
    """One-sided Cochran–Mantel–Haenszel p-value (continuity-corrected normal approximation) that membership
    and `is_v` are positively associated within strata. 1.0 when no stratum varies in both (no evidence left)."""
    diff, var = 0.0, 0.0
    for s in np.unique(strata[ok]):
        m = ok & (strata == s)
        n = int(m.sum())
        if n < 2:
            continue
        a = int((members & is_v & m).sum())
        n1, m1 = int((members & m).sum()), int((is_v & m).sum())
        diff += a - n1 * m1 / n
        var += n1 * (n - n1) * m1 * (n - m1) / (n * n * (n - 1))
    if var <= 0:
        return 1.0
    return float(norm.sf((diff - 0.5) / np.sqrt(var)))


class RegionTests:
    """The significant findings of one region and the conditional tests run on them (cached)."""

    def __init__(self, rd: RegionData, findings: list[Finding], cfg: dict, rng: np.random.Generator):
        self.rd, self.cfg, self.alpha = rd, cfg, cfg["alpha"]
        self.seed = int(rng.integers(2**31))
        self.findings = findings
        self._leak_cache: dict[tuple[str, tuple[str, ...]], tuple[float, float]] = {}  # (p, excess)
        self._knn: dict[int, np.ndarray] = {}

    def neighbours(self, k: int) -> np.ndarray:
        if k not in self._knn:
            self._knn[k] = knn(self.rd.Zc, k)
        return self._knn[k]

    def has_effect(self, attribute: str) -> bool:
        return any(f.attribute == attribute for f in self.findings)

    def root_value(self, attribute: str) -> str | None:
        """The value of B its own strongest finding names (Essen for a site), None for a number."""
        own = [f for f in self.findings if f.attribute == attribute and f.value is not None]
        if not own:
            return None
        return max(own, key=lambda f: (f.kind == "cluster", f.effect_size or 0.0)).value

    def marginal_p(self, attribute: str) -> float:
        ps = [f.p_value for f in self.findings if f.attribute == attribute and f.p_value is not None]
        return min(ps) if ps else 1.0

    def leak_p_given(self, attribute: str, given: str | tuple[str, ...]) -> float:
        """Leak test of `attribute` with labels permuted within strata of `given` (one attribute or several
        jointly; a date also within the acquisition strata it is always tested in)."""
        return self._leak_given(attribute, given)[0]

    def leak_excess_given(self, attribute: str, given: str | tuple[str, ...]) -> float:
        """How far the leak of `attribute` given `given` stands above its permutation null, in null SDs: what is
        left of the finding. Orders candidate causes whose p-values all sit at the permutation floor."""
        return self._leak_given(attribute, given)[1]

    def _leak_given(self, attribute: str, given: str | tuple[str, ...]) -> tuple[float, float]:
        """(p, excess) of the conditional leak test, computed once per (attribute, given)."""
        given = (given,) if isinstance(given, str) else tuple(given)
        key = (attribute, given)
        if key not in self._leak_cache:
            spec = self.rd.specs[attribute]
            numbers = [b for b in given if not self.rd.specs[b].is_categorical]
            rng = np.random.default_rng(self.seed)
            if numbers and not spec.is_categorical and spec.type != "date":
                # a number given numbers (and categories): Freedman–Lane on a quadratic fit in the numbers plus
                # the categories' offsets, residuals permuted within the categories' cells. Quintile strata left
                # the covariate's variation inside each bin, and with it residual confounding; a linear fit left
                # weight = BMI x height² curved in height, and two numbers crossed as quintiles made weight
                # *more* significant given height and age than given height alone (confounded scenario)
                categories = tuple(b for b in given if b not in numbers)
                res = _run(self.rd, attribute, self.cfg, rng, covariate=covariate_design(self.rd, given),
                           strata=joint_labels(self.rd, categories) if categories else None)
            else:
                res = _run(self.rd, attribute, self.cfg, rng,
                           strata=joint_labels(self.rd, given, within_acquisition=spec.type == "date"))
            self._leak_cache[key] = (1.0, 0.0) if res is None else (float(res["p"]), _excess(res))
        return self._leak_cache[key]

    def pocket_p_given(self, f: Finding, ok: np.ndarray, given: tuple[str, ...]) -> float:
        """The pocket search of A = a repeated with A's labels permuted within strata of `given` among the images
        it searched (`ok`; a date also within its acquisition strata, as in its own search): p of this pocket's
        size against the largest pocket of a in each permuted cohort."""
        rd, cfg = self.rd, self.cfg
        nbrs = self.neighbours(int(f.details["k"]))
        codes = np.array([str(x) for x in categorical_view(rd, f.attribute)], dtype=object)
        strata = joint_labels(rd, given, within_acquisition=rd.specs[f.attribute].type == "date")
        perm = permuted_among(ok, cfg["pocket_permutations"], np.random.default_rng(self.seed), strata)
        null = largest_pocket_null(codes, ok, [str(f.value)], perm, nbrs, cfg)
        return p_of(int(f.details["neighbourhoods"]), null)

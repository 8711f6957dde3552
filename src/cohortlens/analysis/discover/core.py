"""Shared pieces of the discover stage: the finding record and file schema, per-region data in a reduced
embedding space, multiple-testing correction and the date helpers every detector needs.

Every detector module (`leaks`, `clusters`, `subgroups`, `quality`)
returns a list of `Finding`s for *all* tests it ran, significant or not; `stage.discover` corrects them
per kind (Benjamini-Hochberg over every test of that kind, so the correction counts the tests that were not
significant too) and keeps the significant ones as findings.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from cohortlens.analysis.stats import bh_adjust, holm_adjust
from cohortlens.analysis.table import AttributeSpec, attribute_values, present

# Test families corrected for the family-wise error (Holm) rather than the false discovery rate: the
# neighbourhood-pocket searches. Their evidence is weak (tens of images, p near the permutation floor at best),
# and pooled in one BH family with the density clusters' p = 1e-60 BH let chance pockets of p = 0.006-0.012
# through (one per trained embedding of the confounded scenario; docs/findings.md).
HOLM_FAMILIES = ("pocket",)
# The BH family of the within-stratum date leaks. Pooled with the region-level leaks (sex, age: p at the
# permutation floor in every region), BH's threshold rose until two null-world date leaks at p = 0.015 were
# findings (the null scenario's dae neck, docs/findings.md).
WITHIN_FAMILY = "date_within_stratum"

KINDS = ("attribute_leak", "cluster", "discordant_subgroup", "label_issue", "outlier", "near_duplicate", "non_iid")
# A site x date finding is named like this, so that "date" alone always means a date effect that is not
# explained by one site (the negative-control rule, see clusters.confine_date_effect).
INTERACTION_SEP = "×"

FINDINGS_SCHEMA = pa.schema([
    ("finding_id", pa.string()),
    ("kind", pa.string()),
    ("region", pa.string()),
    ("attribute", pa.string()),
    ("value", pa.string()),
    ("effect_size", pa.float64()),
    ("effect_measure", pa.string()),
    ("p_value", pa.float64()),
    ("p_adjusted", pa.float64()),
    ("n", pa.int64()),
    ("sample_ids", pa.list_(pa.string())),
    ("description", pa.string()),
    ("evidence", pa.list_(pa.string())),
    ("details", pa.string()),  # JSON: the numbers behind the description (proportions, onset, parameters)
    # "attribute=value" of the root cause when conditioning on it explains this finding (an echo; the report folds
    # it under its root cause), null when the finding survives conditioning on every other attribute
    ("explained_by", pa.string()),
])


@dataclass(frozen=True)
class CoreSettings:
    """Settings of the stage and of every detector (the config `discover:` section; each detector module declares
    its own beside it, `settings.DEFAULTS` merges them)."""

    alpha: float = 0.05  # FDR level of a finding
    seed: int = 0
    # BLAS threads: the matrices here are small (n x 64), and two OpenBLAS threads on a shared 2-core
    # machine made the ridge probes 3x slower than one.
    blas_threads: int = 1
    # Above this many images a region is analysed on a random sample of whole subjects (kernel-free, but the
    # permutation tests hold n x (permutations + 1) predictions in memory).
    max_region_images: int = 20000
    probe_dims: int = 64  # PCA dims of the standardised embedding for probes and the discordant subgroup
    cluster_dims: int = 20  # leading PCA dims for density clusters, neighbourhoods and cleanlab features
    folds: int = 5
    # Fold sets per leak test; every image's out-of-fold prediction is the mean over them. With one set a
    # re-test's p near alpha moved with the shuffle (confounded world 4, lumbar weight given height: 0.045 or
    # 0.115), and whether a finding was folded under its cause with it (docs/findings.md, Root causes).
    fold_repeats: int = 3
    permutations: int = 199  # permutation tests of leaks, onsets and co-occurrence
    min_value_count: int = 10  # values rarer than this in a region are not tested


@dataclass
class Finding:
    """One test and, when significant, one finding. `summary` is the sentence without the p-values; the
    description adds them once the correction is known."""

    kind: str
    region: str
    attribute: str
    value: str | None
    effect_size: float
    effect_measure: str
    p_value: float | None
    n: int
    sample_ids: list[str]
    summary: str
    details: dict = field(default_factory=dict)
    p_adjusted: float | None = None
    evidence: list[str] = field(default_factory=list)
    finding_id: str = ""
    # Detectors without a test (cleanlab's flags) report a finding whenever they flag something.
    flagged: bool | None = None
    # A significant test below the detector's effect-size floor (e.g. a cluster hardly above the base rate)
    # stays in the tests table but is not a finding.
    reportable: bool = True
    tag: str = ""  # distinguishes tests of one kind/region/attribute/value in the id (e.g. which cluster)
    explained_by: str | None = None  # "attribute=value" of the root cause (causes), None: survives
    family: str | None = None  # the correction family (None: the kind's BH family; HOLM_FAMILIES: Holm)

    def is_finding(self, alpha: float) -> bool:
        if not self.reportable:
            return False
        if self.p_value is None:
            return bool(self.flagged)
        return self.p_adjusted is not None and self.p_adjusted < alpha

    @property
    def description(self) -> str:
        if self.p_value is None:
            return self.summary
        adjusted = "Holm-adjusted" if self.family in HOLM_FAMILIES else "FDR-adjusted"
        return f"{self.summary} (p={fmt_p(self.p_value)}, {adjusted} {fmt_p(self.p_adjusted)})"

    def row(self, alpha: float | None = None) -> dict:
        description = self.description
        if alpha is not None and self.p_value is not None and not self.is_finding(alpha):
            # the tests table keeps what was checked, too
            below = not self.reportable and self.p_adjusted is not None and self.p_adjusted < alpha
            description = ("not a finding (significant, below the relevance floor): " if below
                           else "not a finding: ") + description
        return {
            "finding_id": self.finding_id,
            "kind": self.kind,
            "region": self.region,
            "attribute": self.attribute,
            "value": self.value,
            "effect_size": _float(self.effect_size),
            "effect_measure": self.effect_measure,
            "p_value": _float(self.p_value),
            "p_adjusted": _float(self.p_adjusted),
            "n": int(self.n),
            "sample_ids": [str(s) for s in self.sample_ids],
            "description": description,
            "evidence": list(self.evidence),
            "details": json.dumps(self.details, sort_keys=True, default=_json_default),
            "explained_by": self.explained_by,
        }


def _float(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (_dt.date, _dt.datetime)):
        return o.isoformat()
    return str(o)


def fmt_p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def findings_table(findings: list[Finding], alpha: float | None = None) -> pa.Table:
    """The findings as Arrow with exactly FINDINGS_SCHEMA (what the parquet file holds)."""
    return pa.Table.from_pylist([f.row(alpha) for f in findings], schema=FINDINGS_SCHEMA)


def findings_frame(findings: list[Finding], alpha: float | None = None) -> pl.DataFrame:
    return pl.from_arrow(findings_table(findings, alpha))


def adjust(findings: list[Finding]) -> None:
    """Benjamini-Hochberg within each family, over every test of that family that has a p-value (in every
    region). A test's family is its kind unless it names its own (`Finding.family`: the within-site date leaks);
    HOLM_FAMILIES are corrected by Holm instead. `details["family"]` names a family that is not the kind."""
    for family in {f.family or f.kind for f in findings}:
        tested = [f for f in findings if (f.family or f.kind) == family and f.p_value is not None]
        if not tested:
            continue
        ps = np.clip(np.array([f.p_value for f in tested], float), 0.0, 1.0)
        holm = family in HOLM_FAMILIES
        for f, q in zip(tested, holm_adjust(ps) if holm else bh_adjust(ps)):
            f.p_adjusted = float(q)
            if f.family:
                f.details["family"] = f.family
                f.details["correction"] = (f"Holm over {len(tested)} {family} searches" if holm
                                           else f"BH over {len(tested)} {family.replace('_', ' ')} tests")
    _gate_by_the_stratum_leak(findings)


def _gate_by_the_stratum_leak(findings: list[Finding]) -> None:
    """A density cluster's or pocket's date comparison within stratum S = s (Mann-Whitney of S's images inside
    vs outside) says *where* and *from when* a date effect within S shows; whether S has one at all is the
    within-S date leak's question. The comparison is its child in a fixed-sequence gate: its adjusted p is the
    larger of its own and the leak's, so it is a finding only where the leak is. Without the gate a trained dae's
    Essen-look cluster, 151 of Essen's 176 neck images, was "date within site Essen" at FDR 0.037 (92 % vs 68 %
    before a date; confounded scenario, seed 0) where the within-Essen leak saw nothing; the scenario renders no
    date effect at Essen. A stratum too small for the leak (`interaction_min_site`) keeps its own p."""
    leaks = {(f.region, f.attribute, str(f.value)): f for f in findings
             if f.kind == "attribute_leak" and f.family == WITHIN_FAMILY and f.p_adjusted is not None}
    for f in findings:
        if f.kind != "cluster" or f.details.get("test") != "mann_whitney_u" or f.p_adjusted is None:
            continue
        leak = leaks.get((f.region, f.attribute, str(f.details.get("site"))))
        if leak is None:
            continue
        f.details["gate"] = {"within_stratum_leak_p_adjusted": leak.p_adjusted, "p_adjusted_own": f.p_adjusted}
        f.p_adjusted = max(f.p_adjusted, leak.p_adjusted)


def assign_ids(findings: list[Finding]) -> None:
    """Readable, unique ids (also the PNG names): kind-region-attribute-value[-k]."""
    seen: dict[str, int] = {}
    for f in findings:
        base = "-".join(_slug(x) for x in (f.kind, f.region, f.attribute, f.value or "", f.tag) if x)
        k = seen.get(base, 0)
        seen[base] = k + 1
        f.finding_id = base if k == 0 else f"{base}-{k + 1}"


def _slug(text: str) -> str:
    text = str(text).replace(INTERACTION_SEP, "x")
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()[:40] or "x"


# ----------------------------------------------------------------------------------------------------------
# per-region data


@dataclass
class RegionData:
    """The images of one region: keys, attributes and the reduced embedding (standardised, then PCA)."""

    region: str
    frame: pl.DataFrame
    Z: np.ndarray  # (n, probe_dims) PCA scores of the standardised embedding, float64
    specs: dict[str, AttributeSpec]
    cluster_dims: int
    X: np.ndarray | None = None  # the embedding itself (float32), for the probe stage's SVM probabilities
    model: str | None = None

    @property
    def n(self) -> int:
        return self.frame.height

    @property
    def Zc(self) -> np.ndarray:
        """The leading components: the space of density clusters, neighbourhoods and cleanlab's kNN."""
        return self.Z[:, : self.cluster_dims]

    @property
    def image_uids(self) -> np.ndarray:
        return np.asarray(self.frame["image_uid"].to_list(), dtype=object)

    @property
    def subjects(self) -> np.ndarray:
        return np.asarray(self.frame["subject_id"].to_list(), dtype=object)

    def values(self, attribute: str) -> np.ndarray:
        return attribute_values(self.frame, self.specs[attribute])

    def attributes(self, roles=("protected", "acquisition"), types=None) -> list[str]:
        return [a for a, s in self.specs.items()
                if a in self.frame.columns and s.role in roles and (types is None or s.type in types)]

    @property
    def strata_name(self) -> str:
        return "|".join(self.attributes(roles=("acquisition",), types=("categorical",)))

    def strata(self) -> np.ndarray | None:
        """Joint value of the categorical acquisition attributes (the site): dates are tested within it."""
        cols = self.attributes(roles=("acquisition",), types=("categorical",))
        if not cols:
            return None
        parts = [np.asarray(self.values(c), dtype=object) for c in cols]
        return np.array(["|".join(str(p[i]) for p in parts) for i in range(self.n)], dtype=object)


def reduce_embedding(X: np.ndarray, dims: int, seed: int = 0) -> np.ndarray:
    """Standardise every embedding dimension (dead ones stay 0), then PCA to `dims` components.

    Standardising first keeps one high-variance slice position from dominating the volume embedding; PCA
    then removes the redundancy of the 12 concatenated center slices (the demo's 384 dims have ~30 real ones).
    """
    X = np.asarray(X, dtype=np.float64)
    Xs = StandardScaler().fit_transform(X)
    Xs[:, ~np.isfinite(Xs).all(0)] = 0.0
    k = int(max(1, min(dims, X.shape[0] - 1, X.shape[1])))
    return PCA(n_components=k, random_state=seed).fit_transform(Xs)


# ----------------------------------------------------------------------------------------------------------
# dates and categories


def days_to_dates(days: np.ndarray) -> np.ndarray:
    return np.asarray(days, dtype="float64").astype("int64").astype("datetime64[D]")


def date_str(day: float) -> str:
    return str(np.datetime64(int(round(day)), "D"))


def years_of(days: np.ndarray) -> np.ndarray:
    """Calendar year of each date (object array of strings, None where missing)."""
    out = np.full(len(days), None, dtype=object)
    ok = np.isfinite(days)
    out[ok] = (days_to_dates(days[ok]).astype("datetime64[Y]").astype(int) + 1970).astype(str)
    return out


def categorical_view(rd: RegionData, attribute: str) -> np.ndarray:
    """A categorical reading of an attribute for enrichment tests: the category itself, or a date's year."""
    spec = rd.specs[attribute]
    vals = rd.values(attribute)
    if spec.is_categorical:
        return vals
    if spec.type == "date":
        return years_of(vals)
    raise ValueError(f"{attribute} is continuous; it has no categorical view")


def value_counts(values: np.ndarray) -> dict[str, int]:
    ok = present(values)
    cats, counts = np.unique(values[ok].astype(str), return_counts=True)
    return dict(zip(cats.tolist(), counts.tolist()))


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def interaction_name(stratum_attribute: str, attribute: str) -> str:
    return f"{stratum_attribute}{INTERACTION_SEP}{attribute}"


def stratum_attributes(rd: "RegionData") -> list[str]:
    """The categorical acquisition attributes (site, scanner, batch, ...): the strata a date effect may live in."""
    return rd.attributes(roles=("acquisition",), types=("categorical",))


# A stratum with at least this share of its images inside another one's is the more specific of the two: it is
# named as the carrier of an effect both carry, and is not explained by the larger one (dated_causes).
MOSTLY_INSIDE = 0.8


def date_proxies(rd: "RegionData", date_attr: str, threshold: float = 0.3) -> set[str]:
    """Categorical attributes that are mostly a function of the date (a processing batch per half-year): the
    share of the date's variance between their values (η²) is at least `threshold`. Such an attribute cannot
    stratify a date effect: within one batch the date barely varies, so conditioning on it removes any date
    effect, real or not."""
    days = rd.values(date_attr)
    ok = np.isfinite(days)
    out = set()
    d = days[ok]
    total = ((d - d.mean()) ** 2).sum() if ok.any() else 0.0
    if total <= 0:
        return out
    for b in rd.attributes(types=("categorical",)):
        labels = np.array([str(v) for v in rd.values(b)], dtype=object)[ok]
        between = sum((labels == v).sum() * (d[labels == v].mean() - d.mean()) ** 2 for v in np.unique(labels))
        if between / total >= threshold:
            out.add(b)
    return out


def confine_to_any_stratum(rd: "RegionData", test_without, alpha: float, test_within=None,
                           min_rest: int = 10) -> tuple[str | None, str | None, dict]:
    """`confine_to_stratum` for each categorical acquisition attribute in turn: (attribute, value, p without
    each value per attribute). Among attributes with a carrying value, the one whose removal weakens the effect
    most, unless another carrying value lies mostly inside it (`MOSTLY_INSIDE` of its images): that one is the
    more specific place. The finding is then named after that attribute (date within scanner X, not "within site
    X"). By the p-values alone, between nested strata the name was a coin toss: a trained dae's neck drift of site
    Hamburg's protocol change was named after scanner Y (p 0.412 without Y's 291 images, 0.411 without
    Hamburg's 132, 85 % of them on Y; confounded world 2) and stood as an echo of Hamburg's change."""
    carrying, p_all = [], {}
    for attribute in stratum_attributes(rd):
        values = rd.values(attribute)
        value, p_without = confine_to_stratum(test_without, values, alpha, test_within, min_rest)
        p_all[attribute] = p_without
        if value is not None:
            carrying.append((attribute, value, p_without[value],
                             np.array([v is not None and str(v) == value for v in values])))
    if not carrying:
        return None, None, p_all
    best = max(carrying, key=lambda c: c[2])
    while True:
        inside = [c for c in carrying if c[3].sum() < best[3].sum()
                  and (c[3] & best[3]).sum() >= MOSTLY_INSIDE * c[3].sum()]
        if not inside:
            return best[0], best[1], p_all
        best = max(inside, key=lambda c: c[2])


def confine_to_stratum(test_without, strata: np.ndarray, alpha: float, test_within=None,
                       min_rest: int = 10) -> tuple[str | None, dict]:
    """Is a significant effect carried by one stratum (one site) alone?

    `test_without(keep_mask) -> p` reruns the same test without one stratum, `test_within(keep_mask) -> p`
    on that stratum alone. The effect is attributed to stratum s if without s it is no longer significant at
    `alpha` and within s it is; among several such strata, the one whose removal weakens it most. Otherwise
    it is a main effect (None): dropping one of several sites costs a real main effect only a fraction of its
    power, and a borderline effect that several removals would break stays a main effect (the conservative
    side for a negative control).
    """
    p_without: dict[str, float] = {}
    labels = np.array([None if v is None else str(v) for v in strata], dtype=object)
    for s in sorted({v for v in labels if v is not None}):
        keep = labels != s
        if keep.sum() < min_rest:
            continue
        p_without[s] = float(test_without(keep))
    candidates = [s for s, p in p_without.items() if p > alpha]
    if test_within is not None:
        # a stratum too small to test on its own cannot carry the effect alone
        candidates = [s for s in candidates
                      if (labels == s).sum() >= min_rest and float(test_within(labels == s)) <= alpha]
    if not candidates:
        return None, p_without
    return max(candidates, key=p_without.get), p_without

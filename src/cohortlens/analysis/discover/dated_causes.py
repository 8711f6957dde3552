"""Root causes of date effects within a stratum (date within site S, date within scanner X; leaks, cluster comparisons
and cleanlab's non-IID alike), the date part of `causes`: the within-stratum date leak re-run (a) without the images
of another significant date stratum — when the protocol change of site S is the cause, "date within scanner X"
vanishes once site S's images are left out, while site S's effect does not vanish without scanner X's other images —
and (b) with dates permuted within another acquisition attribute's values inside the stratum (null: the date is no
more predictable than the other attribute's values make it), provided conditioning on the other attribute moves the
test's permutation null towards the observed statistic by at least half of its excess (`explained_share`; a scanner
spread evenly over a site's years leaves the null where it was and cannot explain the date effect, however the
re-test's p moves); and (c) without the rival's images *and* with dates permuted within a third attribute (two
causes together). Attributes that are largely a function of the date (a half-yearly batch: η² of the date by
its values ≥ 0.3) are never used to condition a date effect, nor as a rival stratum of one that is not.
"""

from __future__ import annotations

import numpy as np

from cohortlens.analysis.discover.conditional import RegionTests, stratum_labels
from cohortlens.analysis.discover.core import (
    INTERACTION_SEP,
    MOSTLY_INSIDE,
    Finding,
    date_proxies,
    stratum_attributes,
)
from cohortlens.analysis.discover.echoes import mark
from cohortlens.analysis.discover.leaks import _run

# B explains a date effect within S only when permuting the dates within B's values lifts the permutation null by at
# least this share of the observed statistic's excess over the free null (docs/findings.md, Root causes).
MIN_EXPLAINED_SHARE = 0.5


def _stratum_of(f: Finding) -> tuple[str, str, str]:
    """(stratum attribute, its value, the date attribute) of a date-within-stratum finding."""
    stratum, date_attr = f.attribute.split(INTERACTION_SEP, 1)
    value = f.details.get("site", f.value)
    return stratum, str(value).split(",")[0], date_attr


def explain_interactions(reg: RegionTests, interactions: list[Finding]) -> None:
    """A date effect within stratum S = s is re-tested (as a within-stratum date leak)

    * given each other acquisition attribute B (dates permuted within B's values, inside S = s): when B's
      values explain it (e.g. date within scanner X, explained by site: a site's protocol change, or a site's
      own look plus its recruitment period), and B has a finding of its own;
    * without the images of each other significant date stratum B = b: when it vanishes, B = b's effect does
      not vanish without S = s's images, and B = b's effect survives dates permuted within S's values, B = b
      is the cause. A stratum that lies mostly inside another is the more specific one and is not explained
      by it. When the effect survives without B = b's images, it is re-run without them *and* with dates
      permuted within a third attribute C's values: two causes together (site Hamburg's protocol change and
      site Essen's own look with its early recruitment, inside scanner Y) explain what neither explains alone.
    """
    rd = reg.rd
    cache: dict[tuple, dict | None] = {}

    def leak(date_attr, keep, given_attr=None) -> dict | None:
        """The within-stratum date leak on `keep`, dates permuted within `given_attr`'s values (else freely). The
        same seed every time: the same folds, so a conditional null and the free one differ by the strata only."""
        key = (date_attr, keep.tobytes(), given_attr)
        if key not in cache:
            cache[key] = None if keep.sum() < reg.cfg["interaction_min_site"] else _run(
                rd, date_attr, reg.cfg, np.random.default_rng(reg.seed), keep=keep, conditional=False,
                strata=None if given_attr is None else stratum_labels(rd, given_attr))
        return cache[key]

    def p_of(res: dict | None) -> float | None:
        return None if res is None else float(res["p"])

    def images_of(s1, v1, s2=None, v2=None) -> np.ndarray:
        keep = stratum_labels(rd, s1) == v1
        return keep if s2 is None else keep & (stratum_labels(rd, s2) != v2)

    def without(s1, v1, s2, v2, date_attr) -> float | None:
        return p_of(leak(date_attr, images_of(s1, v1, s2, v2)))

    def stands(res: dict | None) -> bool:
        """What is left is a date effect by the stage's own rule: significant and above the relevance floor.
        Without Hamburg's 24 images, "date within vendor X" (a trained vae, confounded world 2, lumbar) kept R²
        0.00-0.02 at p 0.01-0.06: significant by chance or not, too little to be a finding of its own."""
        return res is not None and res["p"] <= reg.alpha and res["stat"] >= reg.cfg["min_r2"]

    def jointly(s1, v1, s2, v2, date_attr, proxies) -> tuple[str | None, dict | None]:
        """The other attribute C (and its test) that explains what is left of the effect without B = b's images,
        if one does: C has an effect of its own and conditioning on C lifts the null of what is left; of several,
        the one with the largest p."""
        rest = images_of(s1, v1, s2, v2)
        best, best_res = None, None
        for c in stratum_attributes(rd):
            if c == s1 or c in proxies or not reg.has_effect(c):
                continue
            res = leak(date_attr, rest, c)
            if res is None or explained_share(leak(date_attr, rest), res) < MIN_EXPLAINED_SHARE:
                continue
            if best_res is None or res["p"] > best_res["p"]:
                best, best_res = c, res
        return best, best_res

    def given(s1, v1, b, date_attr) -> float | None:
        return p_of(leak(date_attr, images_of(s1, v1), b))

    significant = {_stratum_of(f) for f in interactions}
    for f in interactions:
        s1, v1, date_attr = _stratum_of(f)
        n1 = int((stratum_labels(rd, s1) == v1).sum())
        proxies = date_proxies(rd, date_attr)
        # 1. without another significant date stratum's images
        tested = {}
        for s2, v2, d2 in sorted(significant):
            if s2 == s1 or d2 != date_attr or s2 in proxies and s1 not in proxies:
                continue
            inside = (stratum_labels(rd, s1) == v1) & (stratum_labels(rd, s2) == v2)
            if inside.sum() >= MOSTLY_INSIDE * n1:
                continue  # mostly inside the rival: the more specific one, and too little left to test without it
            left = leak(date_attr, images_of(s1, v1, s2, v2))
            p1 = p_of(left)
            tested[f"{s2}={v2}"] = p1
            test = "within-stratum date leak without the rival stratum"
            if stands(left):
                c, left = jointly(s1, v1, s2, v2, date_attr, proxies)
                if c is None:
                    continue  # survives without the rival's images
                p1 = p_of(left)
                tested[f"{s2}={v2}, dates within {c}"] = p1
                if stands(left):
                    continue
                test = f"{test}, dates permuted within {c}"
                f.details["jointly_with"] = c
            if p1 is None:
                continue
            below = float(left["stat"]) if p1 <= reg.alpha else None
            p2 = without(s2, v2, s1, v1, date_attr)
            n2 = int((stratum_labels(rd, s2) == v2).sum())
            # a date proxy (a half-yearly batch) would remove any date effect of the rival: no evidence either way
            rival_given = None if s1 in proxies else given(s2, v2, s1, date_attr)
            if rival_given is not None and rival_given > reg.alpha:
                continue  # the rival is itself explained by this stratum's attribute: it cannot be the cause
            if p2 is None or p2 <= reg.alpha or n2 < n1:
                mark(f, s2, v2, test, p1, p2, inseparable=p2 is not None and p2 > reg.alpha, below_floor=below)
                break
        f.details["p_without_rival"] = tested
        if f.explained_by is not None:
            continue
        # 2. given another acquisition attribute's values (not a date proxy: it would remove any date effect)
        p_given = {}
        for b in stratum_attributes(rd):
            if b == s1 or b in proxies:
                continue
            p = given(s1, v1, b, date_attr)
            if p is not None:
                p_given[b] = p
        f.details["p_given"] = {b: round(p, 4) for b, p in p_given.items()}
        for b in sorted((b for b, p in p_given.items() if p > reg.alpha), key=p_given.get, reverse=True):
            own = [v for s2, v, d2 in significant if s2 == b and d2 == date_attr]
            if own:
                # B has date strata of its own: the cause is one of them unless it vanishes given S as well
                reverse = [given(b, v, s1, date_attr) for v in own]
                if all(r is not None and r > reg.alpha for r in reverse) and min(
                        int((stratum_labels(rd, b) == v).sum()) for v in own) > n1:
                    continue  # both vanish given the other, this stratum is the smaller: it is the root
                mark(f, b, own[0], "date leak within the stratum, permuted within the other attribute",
                     p_given[b], min((r for r in reverse if r is not None), default=None))
                break
            if reg.has_effect(b):
                share = explained_share(leak(date_attr, images_of(s1, v1)), leak(date_attr, images_of(s1, v1), b))
                f.details.setdefault("explained_share", {})[b] = round(share, 3)
                if share < MIN_EXPLAINED_SHARE:
                    continue  # the null did not move: B's values do not carry the date, the re-test only lost it
                mark(f, b, reg.root_value(b), "date leak within the stratum, permuted within the other attribute",
                     p_given[b], None)
                break
        if f.explained_by is None:
            f.details["survives_conditioning"] = sorted(tested) + sorted(p_given)


def explained_share(free: dict | None, given: dict | None) -> float:
    """How much of the observed statistic's excess over its free permutation null the conditional null takes up:
    (mean null given B - mean free null) / (observed - mean free null), from two runs of the same test on the
    same folds. Permuting the dates within B's values keeps whatever date information B's values carry; when
    that information is what the embedding predicts the date from, the conditional null rises to the observed
    statistic (share near 1). A B drawn independently of the date leaves the null where it was (share near 0),
    whatever the re-test's p does. This replaced a Kruskal–Wallis test of the dates by B's values, which
    lacked power where the embedding sees B well (docs/findings.md, Root causes). 0 without an excess."""
    if free is None or given is None:
        return 0.0
    base = float(np.mean(free["null"]))
    excess = float(free["stat"]) - base
    return 0.0 if excess <= 0 else float((np.mean(given["null"]) - base) / excess)

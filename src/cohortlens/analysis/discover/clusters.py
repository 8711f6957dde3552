"""Clusters: groups of images that sit together in embedding space and over-represent an attribute value.

Two detectors share one space (standardised embedding, leading `cluster_dims` PCA components, per region):

* **Density clusters** (sklearn HDBSCAN, min_cluster_size a fraction of n, noise excluded). Every cluster
  is tested for enrichment of every categorical attribute value and every year of a date: one-sided Fisher
  exact test, effect = enrichment ratio (share in the cluster / share in the region). The clustering never
  sees the attributes, so the test is valid as it stands.
* **Neighbourhood pockets**, for acquisition attributes (site, year of acquisition). A shifted
  subpopulation that overlaps the rest (the demo's flat Neubrandenburg necks move the back contour by about
  one standard deviation of its natural variation) is no density mode, so HDBSCAN cannot delineate it; but
  the neighbourhoods of its members over-represent the site. As in Milo's differential-abundance test on a
  kNN graph (Dann et al., Nat Biotechnol 2022): every image's k nearest neighbours form a neighbourhood;
  neighbourhoods whose count of a value exceeds the base rate (binomial tail, BH at `neighbourhood_q`)
  are joined into pockets along the kNN graph; a pocket's p-value is a permutation test of the largest
  pocket over all values of the attribute (labels permuted, graph fixed), so it is corrected for the search
  over values and neighbourhoods.

Both report kind `cluster`. For every cluster or pocket that over-represents a site, the dates of that site's
images inside vs outside it are compared (Mann-Whitney U, effect = rank-biserial correlation) and the onset
is estimated as the date that best separates them: that is the site×date interaction finding
("Neubrandenburg images in this pocket were all acquired from 2015-06-01 on").

Negative control for dates: a year enrichment is reported as `date` only if it survives leaving out the
site that carries it most (`confine_to_stratum`); otherwise it is named `site×date` with that site as value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.stats import binom, fisher_exact, mannwhitneyu
from sklearn.cluster import HDBSCAN
from sklearn.neighbors import NearestNeighbors

from cohortlens.analysis.discover.core import (
    Finding,
    RegionData,
    categorical_view,
    confine_to_any_stratum,
    date_str,
    interaction_name,
    pct,
    stratum_attributes,
    value_counts,
)
from cohortlens.analysis.discover.leaks import permutation_index
from cohortlens.analysis.stats import bh_adjust
from cohortlens.analysis.table import present


@dataclass(frozen=True)
class ClusterSettings:
    """Settings of the cluster and neighbourhood-pocket detector."""

    pocket_permutations: int = 999  # permutation test of neighbourhood pockets (cheap: the kNN graph is fixed)
    min_cluster_fraction: float = 0.03  # HDBSCAN min_cluster_size = max(min_cluster_size, fraction * n)
    min_cluster_size: int = 10
    min_samples: int = 5
    stability_runs: int = 20  # HDBSCAN reruns on 80% subsamples; a cluster is tested only if it recurs
    min_stability: float = 0.6  # mean best Jaccard over the reruns (Hennig's clusterboot: < 0.5 = dissolved)
    neighbourhood_k: int = 15  # neighbours of one neighbourhood (pockets); grows as sqrt(n) on large regions
    neighbourhood_q: float = 0.05  # per-neighbourhood BH level that makes a neighbourhood part of a pocket
    min_pocket: int = 3  # neighbourhoods a pocket needs
    min_enrichment: float = 1.5  # a cluster is reported for a value only above this ratio to the base rate
    interaction_min: int = 5  # members of a site inside and outside a cluster for the site x date test
    max_date_categories: int = 12  # year bins of a date attribute tested for enrichment


def clusters(rd: RegionData, cfg: dict, rng: np.random.Generator) -> list[Finding]:
    out: list[Finding] = []
    labels = density_labels(rd.Zc, cfg)
    stability = cluster_stability(rd.Zc, labels, cfg, rng)
    for k in sorted(set(labels.tolist()) - {-1}):
        if stability[k] < cfg["min_stability"]:
            continue
        members = labels == k
        name = f"density cluster {k}"
        meta = {"tag": f"cluster{k}", "method": "hdbscan", "cluster": int(k), "dims": int(rd.Zc.shape[1]),
                "min_cluster_size": min_cluster_size(rd.n, cfg), "stability": round(stability[k], 3)}
        out += enrichment_tests(rd, members, name, meta, cfg)
        out += interaction_tests(rd, members, name, meta, cfg)
    for pocket in neighbourhood_pockets(rd, cfg, rng):
        out.append(pocket["finding"])
        if pocket["stratum"] is not None:
            out += interaction_tests(rd, pocket["members"], pocket["name"], pocket["meta"], cfg,
                                     only=pocket["stratum"])
    return out


# ----------------------------------------------------------------------------------------------------------
# density clusters


def min_cluster_size(n: int, cfg: dict) -> int:
    return int(max(cfg["min_cluster_size"], round(cfg["min_cluster_fraction"] * n)))


def density_labels(Zc: np.ndarray, cfg: dict) -> np.ndarray:
    n = len(Zc)
    if n < 2 * cfg["min_cluster_size"]:
        return np.full(n, -1)
    mcs = min_cluster_size(n, cfg)
    return HDBSCAN(min_cluster_size=mcs, min_samples=min(cfg["min_samples"], mcs), copy=True).fit_predict(Zc)


def cluster_stability(Zc: np.ndarray, labels: np.ndarray, cfg: dict, rng: np.random.Generator) -> dict[int, float]:
    """Mean best Jaccard of each cluster with the clusters of HDBSCAN reruns on 80% subsamples.

    Hennig's clusterboot criterion: a density cluster that dissolves when a fifth of the images is left out
    is noise of the estimator, and testing its attribute composition only adds false findings.
    """
    ks = sorted(set(labels.tolist()) - {-1})
    if not ks:
        return {}
    n = len(Zc)
    scores = {k: [] for k in ks}
    for _ in range(cfg["stability_runs"]):
        sub = np.sort(rng.choice(n, int(0.8 * n), replace=False))
        sub_labels = density_labels(Zc[sub], cfg)
        for k in ks:
            a = labels[sub] == k
            best = 0.0
            for k2 in set(sub_labels.tolist()) - {-1}:
                b = sub_labels == k2
                best = max(best, (a & b).sum() / max((a | b).sum(), 1))
            scores[k].append(best)
    return {k: float(np.mean(v)) if v else 1.0 for k, v in scores.items()}


def _categorical_attributes(rd: RegionData, roles=("protected", "acquisition")) -> list[str]:
    return rd.attributes(roles=roles, types=("categorical", "date"))


def enrichment_tests(rd: RegionData, members: np.ndarray, name: str, meta: dict, cfg: dict) -> list[Finding]:
    """One-sided Fisher test of every value of every categorical view (category, year of a date)."""
    out = []
    strata = rd.strata()
    for attribute in _categorical_attributes(rd):
        view = categorical_view(rd, attribute)
        ok = present(view)
        if len(np.unique(view[ok].astype(str))) > cfg["max_date_categories"] and rd.specs[attribute].type == "date":
            continue
        for value, count in value_counts(view).items():
            if count < cfg["min_value_count"]:
                continue
            is_v = np.array([str(x) == value for x in view]) & ok
            f = _fisher_finding(rd, members & ok, is_v, ok, attribute, value, name, meta, cfg)
            if rd.specs[attribute].type == "date" and strata is not None and f.p_value <= cfg["alpha"]:
                _confine_date(rd, f, members, is_v, ok, cfg)
            out.append(f)
    return out


def _table(members, is_v, ok):
    a = int((members & is_v).sum())
    b = int((members & ok & ~is_v).sum())
    c = int((~members & is_v).sum())
    d = int((~members & ok & ~is_v).sum())
    return a, b, c, d


def _fisher_p(members, is_v, ok) -> float:
    a, b, c, d = _table(members, is_v, ok)
    if a + b == 0 or c + d == 0:
        return 1.0
    return float(fisher_exact([[a, b], [c, d]], alternative="greater").pvalue)


def _fisher_finding(rd, members, is_v, ok, attribute, value, name, meta, cfg) -> Finding:
    a, b, c, d = _table(members, is_v, ok)
    size = a + b
    share = a / max(size, 1)
    base = (a + c) / max(a + b + c + d, 1)
    ratio = share / base if base > 0 else float("nan")
    p = _fisher_p(members, is_v, ok)
    shown = f"{attribute} {value}" if rd.specs[attribute].type != "date" else f"{attribute} in {value}"
    summary = (f"{name} (n={size}, {rd.region}) is {pct(share)} {shown} vs {pct(base)} overall "
               f"(enrichment {ratio:.1f}×, one-sided Fisher exact test)")
    details = dict(meta, share=share, base_rate=base, count=a, size=size, test="fisher_exact")
    f = Finding("cluster", rd.region, attribute, value, ratio, "enrichment_ratio", p, size,
                rd.image_uids[members].tolist(), summary, details, tag=meta.get("tag", ""))
    f.reportable = bool(ratio >= cfg["min_enrichment"])
    return f


def _confine_date(rd, f: Finding, members, is_v, ok, cfg, min_rest: int = 10) -> None:
    def fisher(keep):
        return _fisher_p(members & keep, is_v & keep, ok & keep)

    def within(keep):
        # a date effect within S compares the cluster's images of S with S's other images: a cluster that is
        # nearly all of S (site Essen's look, 118 of its 125 neck images) has no such comparison, only S's
        # recruitment period, and 7 images left outside decided "date within Essen" (p 0.03 within)
        if min((members & keep & ok).sum(), (~members & keep & ok).sum()) < min_rest:
            return 1.0
        return fisher(keep)

    stratum, value, p_without = confine_to_any_stratum(rd, fisher, cfg["alpha"], test_within=within,
                                                       min_rest=min_rest)
    f.details["p_without_stratum"] = p_without
    if value is not None:
        f.details.update(year=f.value, stratum=stratum)
        f.attribute = interaction_name(stratum, f.attribute)
        f.value = value
        f.summary += (f"; carried by {stratum} {value} alone (without it p = {p_without[stratum][value]:.2g}): "
                      f"a date effect within {stratum} {value}, not a date effect of its own")


# ----------------------------------------------------------------------------------------------------------
# site x date within a cluster or pocket


def onset(inside: np.ndarray, outside: np.ndarray) -> tuple[float, str, float]:
    """The date that best separates inside from outside dates (max |share after t inside - outside|).

    Returns (date in days, 'from' if inside is later else 'before', the separation)."""
    cand = np.unique(np.concatenate([inside, outside]))
    if len(cand) < 2:
        return float(cand[0]), "from", 0.0
    thr = np.concatenate([[cand[0]], (cand[:-1] + cand[1:]) / 2 + 0.5])  # first day after each midpoint
    after_in = (inside[None, :] >= thr[:, None]).mean(1)
    after_out = (outside[None, :] >= thr[:, None]).mean(1)
    j = after_in - after_out
    best = int(np.argmax(np.abs(j)))
    return float(np.floor(thr[best])), ("from" if j[best] >= 0 else "before"), float(abs(j[best]))


def interaction_tests(rd: RegionData, members: np.ndarray, name: str, meta: dict, cfg: dict,
                      only: tuple[str, str] | None = None) -> list[Finding]:
    """Dates of one stratum's images (a site's, a scanner's) inside vs outside a cluster or pocket: a date
    effect within that stratum. Strata are each categorical acquisition attribute's values, tested where the
    group over-represents them (`only`: the one stratum a pocket was selected for)."""
    out = []
    dates = rd.attributes(types=("date",))
    for stratum in stratum_attributes(rd):
        if only is not None and stratum != only[0]:
            continue
        labels = np.asarray([str(v) for v in rd.values(stratum)], dtype=object)
        for date_attr in dates:
            days = rd.values(date_attr)
            for value, count in value_counts(rd.values(stratum)).items():
                if only is not None and value != only[1]:
                    continue
                in_stratum = (labels == value) & np.isfinite(days)
                inside, outside = days[in_stratum & members], days[in_stratum & ~members]
                if min(len(inside), len(outside)) < cfg["interaction_min"]:
                    continue
                share_in = (members & (labels == value)).sum() / max(members.sum(), 1)
                if only is None and share_in < cfg["min_enrichment"] * count / rd.n:
                    continue
                test = mannwhitneyu(inside, outside, alternative="two-sided")
                rbc = 2.0 * test.statistic / (len(inside) * len(outside)) - 1.0
                t, direction, sep = onset(inside, outside)
                frac_in = float(np.mean(inside >= t) if direction == "from" else np.mean(inside < t))
                frac_out = float(np.mean(outside >= t) if direction == "from" else np.mean(outside < t))
                shown = f"{value}, {direction} {date_str(t)}"
                summary = (f"{stratum} {value} images in {name} ({rd.region}) were acquired {direction} "
                           f"{date_str(t)}: {pct(frac_in)} of the {len(inside)} inside vs {pct(frac_out)} of the "
                           f"{len(outside)} outside (rank-biserial {rbc:+.2f}, Mann-Whitney U) — a {date_attr} "
                           f"effect within {stratum} {value}")
                details = dict(meta, stratum=stratum, site=value, onset=date_str(t), direction=direction,
                               separation=sep, share_inside=frac_in, share_outside=frac_out,
                               n_inside=len(inside), n_outside=len(outside), test="mann_whitney_u", group=name)
                ids = rd.image_uids[in_stratum & members]
                out.append(Finding("cluster", rd.region, interaction_name(stratum, date_attr), shown, rbc,
                                   "rank_biserial", float(test.pvalue), len(inside) + len(outside), ids.tolist(),
                                   summary, details, tag=meta.get("tag", "")))
    return out


# ----------------------------------------------------------------------------------------------------------
# neighbourhood pockets


def neighbourhood_k(n: int, cfg: dict) -> int:
    return int(min(n - 1, max(cfg["neighbourhood_k"], round(np.sqrt(n) / 2))))


def knn(Zc: np.ndarray, k: int) -> np.ndarray:
    """Indices of each point's k nearest neighbours, itself excluded."""
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(Zc).kneighbors(Zc)
    return idx[:, 1:]


def enriched_neighbourhoods(is_v: np.ndarray, ok: np.ndarray, nbrs: np.ndarray, q: float) -> np.ndarray:
    """(rows, n) mask of neighbourhoods over-representing the value, for one or many label vectors."""
    is_v, ok = np.atleast_2d(is_v), np.atleast_2d(ok)
    counts = is_v[:, nbrs].sum(2)
    valid = np.maximum(ok[:, nbrs].sum(2), 1)
    base = is_v.sum(1) / np.maximum(ok.sum(1), 1)
    p = binom.sf(counts - 1, valid, base[:, None])
    return bh_adjust(p, axis=1) <= q


def pockets_of(sig: np.ndarray, nbrs: np.ndarray, min_pocket: int) -> list[np.ndarray]:
    """Enriched neighbourhoods joined along the kNN graph: centre indices of each pocket."""
    if sig.sum() < min_pocket:
        return []
    centres = np.flatnonzero(sig)
    pos = -np.ones(len(sig), dtype=np.int64)
    pos[centres] = np.arange(len(centres))
    rows = np.repeat(np.arange(len(centres)), nbrs.shape[1])
    cols = pos[nbrs[centres].ravel()]
    keep = cols >= 0
    graph = coo_matrix((np.ones(keep.sum()), (rows[keep], cols[keep])), shape=(len(centres),) * 2)
    n_comp, comp = connected_components(graph, directed=False)
    groups = [centres[comp == c] for c in range(n_comp)]
    return [g for g in groups if len(g) >= min_pocket]


def permuted_among(searched: np.ndarray, n_perm: int, rng: np.random.Generator,
                   strata: np.ndarray | None = None) -> np.ndarray:
    """(n_perm, n) index rows that permute the labels among the `searched` images only (within `strata`, if
    given); every other image keeps its own label."""
    idx = np.flatnonzero(searched)
    local = permutation_index(len(idx), n_perm, rng, None if strata is None else strata[idx])
    perm = np.tile(np.arange(len(searched)), (len(local), 1))
    perm[:, idx] = idx[local]
    return perm


def largest_pocket_null(codes, ok, values, perm, nbrs, cfg) -> np.ndarray:
    """Size of the largest pocket over all values, for every permuted label vector."""
    null = np.zeros(len(perm))
    batch = max(1, int(2e7 // (nbrs.size + 1)))  # bounds the (batch, n, k) neighbour-count arrays
    for start in range(0, len(perm), batch):
        idx = perm[start : start + batch]
        pv, pok = codes[idx], ok[idx]
        for v in values:
            sig = enriched_neighbourhoods((pv == v) & pok, pok, nbrs, cfg["neighbourhood_q"])
            for j in np.flatnonzero(sig.sum(1) >= cfg["min_pocket"]):
                sizes = [len(g) for g in pockets_of(sig[j], nbrs, cfg["min_pocket"])]
                null[start + j] = max([null[start + j], *sizes])
    return null


def neighbourhood_pockets(rd: RegionData, cfg: dict, rng: np.random.Generator) -> list[dict]:
    """Pockets for every acquisition attribute value, each with a permutation p-value, step-down over values.

    A strongly structured value (Essen's shifted necks) leaves the rest of the space with more of every other
    value than the base rate; testing Mannheim against a null in which Essen is unstructured would call that
    complement a Mannheim pocket. So values are tested in rounds: the value with the largest pocket is taken
    first (p from the round's null of the largest pocket over the values still in play); if significant, its
    images leave the reference set (they count neither as hits nor in the base rate) and the next round tests
    the remaining values against the remaining images, with labels permuted among them only.
    """
    if rd.n < 3 * cfg["neighbourhood_k"]:
        return []
    k = neighbourhood_k(rd.n, cfg)
    nbrs = knn(rd.Zc, k)
    strata = rd.strata()
    out = []
    for attribute in _categorical_attributes(rd, roles=("acquisition",)):
        view = categorical_view(rd, attribute)
        codes = np.array([str(x) for x in view], dtype=object)
        remaining = present(view)
        counts = value_counts(view)
        values = [v for v, c in counts.items() if c >= cfg["min_value_count"] and c <= 0.5 * remaining.sum()]
        is_date = rd.specs[attribute].type == "date"
        set_aside: list[str] = []
        while values:
            found = {v: pockets_of(enriched_neighbourhoods((codes == v) & remaining, remaining, nbrs,
                                                           cfg["neighbourhood_q"])[0], nbrs, cfg["min_pocket"])
                     for v in values}
            found = {v: g for v, g in found.items() if g}
            if not found:
                # a search that found nothing is a test of the family too (p = 1): Holm counts every search
                out.append(_no_pocket(rd, attribute, values, set_aside))
                break
            # Null of the largest pocket over the values in play: labels permuted among the remaining images
            # (dates within site), the graph fixed.
            perm = permuted_among(remaining, cfg["pocket_permutations"], rng,
                                  strata if (is_date and strata is not None) else None)
            null = largest_pocket_null(codes, remaining, values, perm, nbrs, cfg)
            stat = {v: max(len(g) for g in groups) for v, groups in found.items()}
            best = max(stat, key=stat.get)
            final = p_of(stat[best], null) > cfg["alpha"]
            # In the last round every value's pockets are recorded (none significant); before it only the
            # best value's, the others are tested again against the reference set without it.
            for v in (found if final else [best]):
                for centres in found[v]:
                    out.append(_pocket_finding(rd, attribute, v, centres, nbrs, (codes == v) & remaining, remaining,
                                               null, k, strata, list(set_aside), cfg))
            if final:
                break
            remaining &= codes != best
            set_aside.append(best)
            values = [v for v in values if v != best]
    return out


def _no_pocket(rd: RegionData, attribute: str, values: list[str], set_aside: list[str]) -> dict:
    rest = f" among the images outside {attribute} {', '.join(set_aside)}" if set_aside else ""
    f = Finding("cluster", rd.region, attribute, None, 0.0, "enrichment_ratio", 1.0, 0, [],
                f"no neighbourhood pocket of {attribute} ({len(values)} values) in {rd.region}{rest}",
                {"tag": "pocket", "method": "knn_pocket", "test": "permutation_max_pocket", "set_aside": set_aside},
                tag="pocket-search", family="pocket")
    f.reportable = False
    return {"finding": f, "members": None, "name": None, "meta": None, "stratum": None}


def p_of(stat: float, null: np.ndarray) -> float:
    return float((1 + np.sum(null >= stat)) / (1 + len(null)))


def _pocket_finding(rd, attribute, value, centres, nbrs, is_v, ok, null, k, strata, set_aside, cfg) -> dict:
    members = np.zeros(rd.n, dtype=bool)
    members[centres] = True
    members[nbrs[centres].ravel()] = True
    size = int(members.sum())
    share = (members & is_v).sum() / max((members & ok).sum(), 1)
    base = is_v.sum() / max(ok.sum(), 1)
    ratio = share / base
    p = p_of(len(centres), null)
    name = f"neighbourhood pocket of {attribute} {value}"
    shown = f"{attribute} {value}" if rd.specs[attribute].type != "date" else f"{attribute} in {value}"
    reference = ("overall" if not set_aside else
                 f"of the images outside {attribute} {', '.join(set_aside)}, whose own pocket was found first")
    summary = (f"neighbourhood pocket (n={size}, {rd.region}) is {pct(share)} {shown} vs {pct(base)} {reference} "
               f"(enrichment {ratio:.1f}×): {len(centres)} neighbourhoods of {k} images over-represent it "
               f"(permutation test of the largest pocket)")
    meta = {"tag": "pocket", "method": "knn_pocket", "k": k, "neighbourhoods": int(len(centres)),
            "dims": int(rd.Zc.shape[1]), "set_aside": set_aside}
    details = dict(meta, share=float(share), base_rate=float(base), size=size, test="permutation_max_pocket",
                   permutations=len(null))
    f = Finding("cluster", rd.region, attribute, value, ratio, "enrichment_ratio", p, size,
                rd.image_uids[members].tolist(), summary, details, tag="pocket", family="pocket")
    f.reportable = bool(ratio >= cfg["min_enrichment"])
    # a pocket of a site is tested for a date effect within that site; a pocket of a date (selected by the date)
    # is not tested for a date effect at all: its dates differ from the rest by construction (circular)
    stratum = (attribute, value) if rd.specs[attribute].is_categorical else None
    if rd.specs[attribute].type == "date" and strata is not None and p <= cfg["alpha"]:
        _confine_date(rd, f, members, is_v, ok, cfg)
    return {"finding": f, "members": members, "name": name, "meta": meta, "stratum": stratum}

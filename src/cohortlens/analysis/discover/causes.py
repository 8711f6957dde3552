"""Root causes, not echoes: every significant leak, cluster and date-interaction finding tested again
conditional on each other attribute.

When acquisition attributes are correlated (a scanner model bought by some sites, a site that recruits older
people), a real effect of one attribute makes the others look leaky or clustered too: their marginal tests
are significant only through the first. Each finding of attribute A is therefore re-tested given every other
recorded attribute B (protected and acquisition; a number or date in blocks of adjacent images, `conditional`):

* **leaks**: the same permutation test with A's labels permuted only *within strata of B*. Its null is "the
  embedding knows nothing of A beyond what it knows of B"; a probe that reads B alone scores as well on the
  permuted labels as on the real ones. A number given a number (weight given height) keeps B's linear part of
  A and permutes only the residuals (Freedman–Lane): bins of a strong covariate leave residual confounding.
  cleanlab's non-IID drift along the date is re-tested as a date leak given B.
* **density-cluster enrichment**: a one-sided Cochran–Mantel–Haenszel test of (member, A = a) stratified by
  B. Its null is "within every stratum of B, A = a is no more common in the group than outside it". A density
  cluster is found without A's labels, so the test does not inherit a selection.
* **neighbourhood pockets of A = a**: the pocket search itself re-run with A's labels permuted within strata of
  B (among the images the search saw), the null of the largest pocket of a against this pocket's size. A
  pocket is *selected* by A's labels, so a CMH test of the same labels given B inherits the selection: an echo
  of B still looked enriched given B (an A that shares a scanner with a look of its own: p_given 0.006). The
  permutation repeats the selection under the null "A's labels are exchangeable within B's strata".
* **date effects within a stratum**: `dated_causes` (without a rival stratum's images, dates permuted within
  another attribute's values, or both).

A finding is an **echo of B** when its conditional test given B is no longer significant (p > alpha), B has a
significant finding of its own in that region, and B's effect survives conditioning on A (the asymmetry that
names the cause). When neither survives the other (two attributes too collinear to separate), the one with
the weaker marginal evidence is marked explained with `inseparable: true`. A leak, cluster or pocket that no
single B explains is tried given two attributes jointly (`_decide_jointly`; the named one gets the other as
`details.jointly_with`); what survives that and stands alone for its value is tried given the region's root
causes together (`explain_by_roots`). The tests themselves live in `conditional`. Echoes keep their row in
findings.parquet with `explained_by = "B=value"` and `details.explained_by` (attribute, value, p_marginal,
p_conditional, p_reverse, test); the report folds them under their root cause. A finding that survives every
conditioning says so (`details.survives_conditioning`).

These conditional p-values only ever demote a finding selected by its marginal test; they are never reported
as evidence for a finding. A conditional test that inherits the selection is too small, and then an echo
survives as a finding of its own; the pocket test above repeats the selection for that reason.
"""

from __future__ import annotations

import itertools

import numpy as np

from cohortlens.analysis.discover.conditional import RegionTests, cmh_greater, joint_labels, stratum_labels
from cohortlens.analysis.discover.core import (
    Finding,
    RegionData,
    categorical_view,
    date_proxies,
)
from cohortlens.analysis.discover.dated_causes import explain_interactions
from cohortlens.analysis.discover.echoes import is_interaction, mark, unmark
from cohortlens.analysis.discover.subgroup_epochs import acquisition_epochs, epoch_name, with_epochs
from cohortlens.analysis.table import present

JOINT_CANDIDATES = 3  # the attributes that explain most of a finding alone, tried two at a time


def _others(rd: RegionData, attribute: str) -> list[str]:
    return [b for b in rd.attributes() if b != attribute]


def _decide(reg: RegionTests, f: Finding, p_given: dict[str, float], reverse, test: str, p_jointly=None,
            excess=None) -> None:
    """Mark `f` as an echo of the first attribute (largest conditional p) that explains it; failing that, of two
    attributes together (`p_jointly(pair)`, candidates by p and then by `excess(b)`, what is left of the finding
    given b); or as surviving."""
    f.details["p_given"] = {b: round(p, 4) for b, p in p_given.items()}
    for b in sorted((b for b, p in p_given.items() if p > reg.alpha), key=p_given.get, reverse=True):
        if not reg.has_effect(b):
            continue  # conditioning on an attribute without an effect of its own only costs power
        p_rev = reverse(b)
        if p_rev <= reg.alpha:
            mark(f, b, reg.root_value(b), test, p_given[b], p_rev)
            return
        # neither survives the other: the weaker marginal evidence is the echo
        if (reg.marginal_p(b), -abs(_strongest(reg, b))) < (f.p_value or 1.0, -abs(f.effect_size or 0.0)):
            mark(f, b, reg.root_value(b), test, p_given[b], p_rev, inseparable=True)
            return
    if p_jointly is not None and _decide_jointly(reg, f, p_given, reverse, test, p_jointly, excess):
        return
    f.details["survives_conditioning"] = sorted(p_given)


def _decide_jointly(reg: RegionTests, f: Finding, p_given: dict[str, float], reverse, test: str, p_jointly,
                    excess=None) -> bool:
    """Two causes can make one echo: a site that is both older and mostly on the scanner with a look of its own
    survives conditioning on either alone (confounded scenario, dae seed 2 at 1000 subjects: Mannheim's lumbar
    pocket, p 0.006 given age, 0.002 given vendor). The attributes with an effect of their own that explain most
    alone are tried in pairs; the pair explains when the finding is gone given both, and the pair's member
    with the larger p alone is named, provided its own effect survives conditioning on the finding's attribute.
    Most p-values alone sit at the permutation floor (0.005 at 199 permutations), so the candidates are ranked by
    p and then by what is left of the finding given each (`excess`): ranked by p alone, ties fell to the
    alphabet, and the site behind weight's echo (a site's heavier subjects) was never tried beside height. The
    attribute that explains most alone is also paired with every other one that has an effect: an echo of a
    half-yearly batch (itself an echo) ranked above the site in one world."""
    def rank(b: str) -> tuple[float, float]:
        return -p_given[b], excess(b) if excess is not None else 0.0

    ranked = sorted((b for b in p_given if reg.has_effect(b)), key=rank)
    pairs = list(itertools.combinations(ranked[:JOINT_CANDIDATES], 2))
    pairs += [(ranked[0], b) for b in ranked[JOINT_CANDIDATES:]]
    tried = {}
    for pair in pairs:
        p = p_jointly(pair)
        tried["+".join(pair)] = round(p, 4)
        if p <= reg.alpha:
            continue
        for b in sorted(pair, key=p_given.get, reverse=True):
            p_rev = reverse(b)
            if p_rev <= reg.alpha:
                f.details["p_given_jointly"] = tried
                mark(f, b, reg.root_value(b), f"{test}, two attributes jointly", p, p_rev,
                     jointly_with=next(x for x in pair if x != b))
                return True
    if tried:
        f.details["p_given_jointly"] = tried
    return False


def _strongest(reg: RegionTests, attribute: str) -> float:
    return max((f.effect_size or 0.0 for f in reg.findings if f.attribute == attribute), default=0.0)


def explain_leak(reg: RegionTests, f: Finding) -> None:
    p_given = {b: reg.leak_p_given(f.attribute, b) for b in _others(reg.rd, f.attribute)}
    _decide(reg, f, p_given, lambda b: reg.leak_p_given(b, f.attribute), "permutation within strata",
            lambda pair: reg.leak_p_given(f.attribute, pair), lambda b: reg.leak_excess_given(f.attribute, b))


def explain_cluster(reg: RegionTests, f: Finding) -> None:
    rd = reg.rd
    members, is_v, ok = _cluster_sets(rd, f)
    own = stratum_labels(rd, f.attribute)
    pocket = f.details.get("method") == "knn_pocket"
    if pocket:
        # only where B could explain it (an attribute without an effect of its own is skipped by _decide anyway):
        # each of these re-runs the pocket search pocket_permutations times
        p_given = {b: (reg.pocket_p_given(f, ok, (b,)) if reg.has_effect(b) else
                       cmh_greater(members, is_v, ok, joint_labels(rd, (b,)))) for b in _others(rd, f.attribute)}

        def jointly(pair):
            return reg.pocket_p_given(f, ok, pair)
    else:
        # one number as blocks of adjacent images, as in every other conditional test (quintiles left an older
        # site older inside the top bin)
        p_given = {b: cmh_greater(members, is_v, ok, joint_labels(rd, (b,))) for b in _others(rd, f.attribute)}

        def jointly(pair):
            return cmh_greater(members, is_v, ok, joint_labels(rd, pair))

    def reverse(b: str) -> float:
        if not rd.specs[b].is_categorical and rd.specs[b].type != "date":
            return reg.leak_p_given(b, f.attribute)
        bview = categorical_view(rd, b)
        bok = present(bview) & ok
        counts = {}
        for v in np.unique(bview[bok].astype(str)):
            hit = bok & (bview.astype(str) == v)
            counts[v] = (members & hit).sum() / max(hit.sum(), 1)
        best = max(counts, key=counts.get)
        return cmh_greater(members, bok & (bview.astype(str) == best), bok, own)

    _decide(reg, f, p_given, reverse, "pocket search permuted within strata" if pocket else "Cochran-Mantel-Haenszel",
            jointly)


def explain_echoes(regions: list[RegionData], tests: list[Finding], cfg: dict, rng: np.random.Generator) -> list[dict]:
    """Sets `explained_by` on every significant leak, cluster and interaction finding that another attribute
    explains (in place). Run after the correction: only findings are re-tested. Returns the root dated changes
    (`acquisition_epochs`), which the subgroup takes as covariates."""
    for rd in regions:
        sig = _significant(tests, rd, cfg["alpha"])
        if not sig:
            continue
        reg = RegionTests(rd, sig, cfg, rng)
        for f in sig:
            if is_interaction(f) or f.attribute not in rd.specs:
                continue
            if f.kind in ("attribute_leak", "non_iid"):  # a drift along the date is re-tested as a date leak
                explain_leak(reg, f)
            elif f.value is not None:
                explain_cluster(reg, f)
        explain_interactions(reg, [f for f in sig if is_interaction(f)])
        name_the_root(reg)
    return explain_by_roots(regions, tests, cfg, rng)


# An echo of B, B itself all echoes of C, is renamed after C unless it is still significant given C at this
# level: then it carries something of B that C does not explain (docs/findings.md, Root causes).
ROOT_DOUBT = 0.01


def name_the_root(reg: RegionTests) -> None:
    """An echo of an echo is named after the root. A cluster of batch B1 that is site Essen's look with Essen's
    early dates is explained best by "date 2014" (given the date p 0.57, given the site 0.45), and date 2014 is
    itself Essen's echo: the report would fold B1 under an echo. When every finding of the named attribute B is
    an echo of C, the finding does not clearly survive C (given C p > ROOT_DOUBT) and C's root findings survive
    conditioning on the finding's attribute, the finding is named after C (`details.explained_by.via` keeps B).
    The finding is already an echo (of B); this only picks the name, so C needs no p above alpha, only no clear
    evidence against it: asking alpha failed whenever the re-test given C fell at 0.01-0.05 by chance."""
    for f in reg.findings:
        named = f.details.get("explained_by")
        if not named or f.details.get("jointly_with") or is_interaction(f):
            continue
        b = named["attribute"]
        own = [g for g in reg.findings if g.attribute == b]
        if not own or any(g.explained_by is None for g in own):
            continue  # B has a root finding of its own
        p_given = f.details.get("p_given") or {}
        causes = {g.details["explained_by"]["attribute"] for g in own} - {f.attribute, b}
        for c in sorted(causes, key=lambda c: p_given.get(c, 0.0), reverse=True):
            roots = [g for g in reg.findings if g.attribute == c and g.explained_by is None]
            p_rev = min(((g.details.get("p_given") or {}).get(f.attribute, 1.0) for g in roots), default=1.0)
            if p_given.get(c, 0.0) <= ROOT_DOUBT or p_rev > reg.alpha:
                continue
            via = f"{b}={named['value']}" if named["value"] is not None else b
            unmark(f)
            mark(f, c, reg.root_value(c), named["test"], p_given[c], p_rev)
            f.details["explained_by"]["via"] = via
            f.summary += f" (through {via.replace('=', ' ')}, itself an echo of {c})"
            break


def explain_by_roots(regions: list[RegionData], tests: list[Finding], cfg: dict, rng: np.random.Generator) -> list[dict]:
    """Last pass: a leak, cluster or pocket that survived every single and paired conditioning, and is the only
    standing finding of its attribute's value in the region, is tried given the region's root causes together:
    the JOINT_CANDIDATES attributes with a root finding of their own that explain most of it alone, and every
    root dated change of a stratum that is not a date proxy, as a before / after attribute (`subgroup_epochs`).
    One echo can need three causes: in the confounded scenario (dae seed 2, neck) a pocket of site Berlin, found
    after Essen's, survived vendor (p 0.007) and vendor with age (0.016): the other sites' images of scanner X
    carry Hamburg's changed protocol or Mannheim's older subjects, so the plain images of X are mostly Berlin's.
    A value with another standing finding (scanner X's leak beside its cluster) is left alone: conditioning on
    many strata at once costs power, and a value established by one test needs no second. The causes named are
    those without which the finding survives (each left out in turn), else the one that explains most alone;
    the rest go to `details.jointly_with`. Roots are findings this stage did not explain, so the test conditions
    on effects already established, not on echoes. Returns the root dated changes (this pass marks no date
    effect, so they are final)."""
    alpha = cfg["alpha"]
    epochs = acquisition_epochs(tests, alpha)
    for rd in with_epochs(regions, epochs):
        roots = [f for f in _significant(tests, rd, alpha) if f.explained_by is None]
        lone = [f for f in roots if not is_interaction(f) and f.attribute in rd.specs and f.value is not None
                and rd.specs[f.attribute].type != "date"
                and not any(g is not f and (g.attribute, str(g.value)) == (f.attribute, str(f.value)) for g in roots)]
        if not lone:
            continue
        reg = RegionTests(rd, roots, cfg, rng)
        dated = [(e["attribute"], epoch_name(e)) for e in epochs if epoch_name(e) in rd.specs
                 and e["attribute"] not in date_proxies(rd, e["date_attribute"])]
        for f in lone:
            p_alone = f.details.get("p_given") or {}
            causes = [b for b in sorted(p_alone, key=p_alone.get, reverse=True)
                      if b != f.attribute and reg.has_effect(b)][:JOINT_CANDIDATES]
            # a dated change of A = a ("before" / "after" inside a, missing elsewhere) encodes a itself: given it,
            # A's own finding vanishes by construction (a trained vae's vendor X leak, given "vendor X from
            # 2015-08-24", p 1.0, was folded under sex)
            given = tuple(causes + [name for attribute, name in dated if attribute != f.attribute])
            if not causes or len(given) < 3:
                continue  # one or two attributes: tried already
            p = _p_given(reg, f, given)
            f.details["p_given_roots"] = {"given": list(given), "p": round(p, 4)}
            if p <= alpha:
                continue
            # which of them it needs: left out in turn, the finding stands again
            needed = {b: _p_given(reg, f, tuple(x for x in given if x != b)) for b in causes}
            f.details["p_given_roots"]["left_out"] = {b: round(q, 4) for b, q in needed.items()}
            named = sorted((b for b, q in needed.items() if q <= alpha), key=needed.get) or causes[:1]
            f.details.pop("survives_conditioning", None)
            mark(f, named[0], reg.root_value(named[0]), "the region's root causes jointly", p, None,
                 jointly_with=", ".join(x for x in given if x != named[0]))
    return epochs


def _p_given(reg: RegionTests, f: Finding, given: tuple[str, ...]) -> float:
    rd = reg.rd
    if f.kind == "cluster" and f.details.get("method") == "knn_pocket":
        return reg.pocket_p_given(f, _searched(rd, f), given)
    if f.kind == "cluster":
        members, is_v, ok = _cluster_sets(rd, f)
        return cmh_greater(members, is_v, ok, joint_labels(rd, given))
    return reg.leak_p_given(f.attribute, given)


def _significant(tests: list[Finding], rd: RegionData, alpha: float) -> list[Finding]:
    """The region's significant findings whose attribute can be conditioned on: leaks, clusters, drifts."""
    return [f for f in tests if f.region == rd.region and f.is_finding(alpha)
            and f.kind in ("attribute_leak", "cluster", "non_iid")]


def _searched(rd: RegionData, f: Finding) -> np.ndarray:
    """The images a cluster's search saw: A recorded, and not among the values set aside before it. A pocket
    searched after other values' pockets were set aside was found among the rest, so its conditional tests compare
    within the same images (with the set-aside site's images as non-members, a site that shares their scanner
    looked enriched at every scanner)."""
    view = categorical_view(rd, f.attribute)
    ok = present(view)
    return ok & ~np.isin(np.array([str(x) for x in view], dtype=object), [str(v) for v in f.details.get("set_aside") or []])


def _cluster_sets(rd: RegionData, f: Finding) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(members, A = a among the searched images, the searched images) of a cluster or pocket finding."""
    members = np.isin(rd.image_uids, np.asarray(f.sample_ids, dtype=object))
    ok = _searched(rd, f)
    is_v = ok & np.array([str(x) == str(f.value) for x in categorical_view(rd, f.attribute)])
    return members, is_v, ok

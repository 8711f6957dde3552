"""Each finding as a statement a reader can repeat: one plain-language sentence built from a row of
results/findings/{model}.parquet (its kind, attribute, value, effect, n and the numbers in `details`), the
evidence behind it (test, p, n) and what conditioning did to it. Plain text, no HTML: the findings section
(`cohortlens.report.findings`) escapes and arranges it, the publication page passes it through the same
suppression as a description (ids withheld, dates to the month, counts below k as "< k").

Counts of images or subjects are always written "N of M …", "N images" or "N subjects", the forms
`publication.suppress_small_counts` recognises, so a publication never shows a small count in a headline.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Mapping, Sequence

from cohortlens.analysis.discover.core import INTERACTION_SEP as SEP  # an interaction attribute: site×date
from cohortlens.analysis.discover.core import fmt_p
from cohortlens.report.units import unit_of

_TESTS = {
    "fisher_exact": "one-sided Fisher exact test of the cluster's members",
    "permutation_max_pocket": "permutation test of the largest pocket",
    "mann_whitney_u": "Mann-Whitney U test of the dates inside vs outside",
}
_QUALITY = {"outlier": ("is an outlier of the embedding (isolated from its nearest neighbours)",
                        "are outliers of the embedding (isolated from their nearest neighbours)"),
            "near_duplicate": ("has a near-duplicate (an almost identical embedding)",
                               "are near-duplicates (almost identical embeddings)")}


def details_of(row: Mapping) -> dict:
    """The row's `details` (JSON text in the Parquet file) as a dict; {} if absent or unreadable."""
    d = row.get("details")
    if isinstance(d, Mapping):
        return dict(d)
    try:
        return json.loads(d) if d else {}
    except (TypeError, ValueError):
        return {}


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def join_words(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = [str(i) for i in items]
    return " and ".join(items) if len(items) < 3 else f"{', '.join(items[:-1])} and {items[-1]}"


def _images(region: str | None) -> str:
    return "images" if region in (None, "", "all") else f"{region} images"


def _count(row: Mapping, d: Mapping) -> int:
    """The number of images a finding flags: its sample set, else its effect × n."""
    ids = row.get("sample_ids")
    if ids is not None and len(ids):
        return len(ids)
    if d.get("count") is not None:
        return int(d["count"])
    return int(round((row.get("effect_size") or 0.0) * (row.get("n") or 0)))


def interval_days(interval: Sequence[str] | None) -> int | None:
    """Days between the two ISO dates of an onset's interval (None if not two dates)."""
    try:
        a, b = (dt.date.fromisoformat(str(x)) for x in interval)
    except (TypeError, ValueError):
        return None
    return (b - a).days


def _covariates(d: Mapping) -> list[str]:
    names = [str(c).split("=")[0] for c in d.get("covariates") or []]
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------ headlines

def _leak(row: Mapping, d: Mapping, units: Mapping | None) -> str:
    attr, value, region = str(row["attribute"]), row.get("value"), row.get("region")
    where = f"the {_images(region)}"
    if SEP in attr:
        stratum, date_attr = attr.split(SEP, 1)
        site = value or d.get("site")
        r2 = f"R² {row['effect_size']:.2f}"
        if "onset" not in d and not str(d.get("scope", "")).startswith("within"):
            return f"The {date_attr} is recognisable in {where} only through {stratum} {site} ({r2})"
        whose = f"{_cap(stratum)} {site}'s {_images(region)}"
        if d.get("shape") == "step" and d.get("onset"):
            iv = d.get("interval") or []
            days = interval_days(iv)
            span = (f" (95 % interval {iv[0]} … {iv[1]}, {days} {unit_of(date_attr, units) or 'days'})"
                    if days is not None else "")
            return (f"{whose} changed {d.get('direction', 'from')} {d['onset']}{span}: the {date_attr} is "
                    f"recognisable within the {stratum} ({r2})")
        if d.get("shape") == "drift":
            return f"{whose} drift with the {date_attr}, without a single onset ({r2} within the {stratum})"
        return f"The {date_attr} is recognisable in {stratum} {site}'s {_images(region)} ({r2})"
    if row.get("effect_measure") == "balanced_accuracy_minus_chance":
        chance = d.get("chance")
        ba = d.get("balanced_accuracy", (row.get("effect_size") or 0.0) + (chance or 0.0))
        text = f"{_cap(attr)} is recognisable in {where} (balanced accuracy {ba:.2f}"
        text += f", chance {chance:.2f}" if chance is not None else ""
        auc = d.get("auc") or {}
        if value is not None and len(auc) > 2 and value in auc:
            text += f"; best recognised: {value}, AUC {auc[value]:.2f}"
        return text + ")"
    text = f"{_cap(attr)} is recognisable in {where}"
    if d.get("p_without_stratum"):
        text += f" beyond {join_words(list(d['p_without_stratum']))}"
    r = f", r = {d['pearson_r']:.2f}" if d.get("pearson_r") is not None else ""
    return f"{text} (R² {row['effect_size']:.2f} of out-of-fold predictions{r})"


def _group(d: Mapping) -> str:
    return "neighbourhood pocket" if d.get("method") == "knn_pocket" else "cluster"


def _cluster(row: Mapping, d: Mapping, units: Mapping | None) -> str:
    attr, value, region = str(row["attribute"]), row.get("value"), row.get("region")
    if SEP in attr and row.get("effect_measure") == "rank_biserial":
        stratum, date_attr = attr.split(SEP, 1)
        site, direction, onset = d.get("site", str(value).split(",")[0]), d.get("direction", "from"), d.get("onset")
        verb = f"changed from {onset}" if direction == "from" else f"differ before {onset}"
        return (f"{_cap(stratum)} {site}'s {_images(region)} {verb}: {pct(d.get('share_inside', 0))} of the "
                f"{d.get('n_inside')} images in a {_group(d)} of the {stratum} vs {pct(d.get('share_outside', 0))} "
                f"of the {d.get('n_outside')} images outside it were acquired {direction} that date")
    size, share, base = d.get("size", row.get("n")), d.get("share"), d.get("base_rate")
    set_aside = d.get("set_aside") or []
    if SEP in attr:  # a date year's cluster carried by one stratum
        stratum, date_attr = attr.split(SEP, 1)
        year = d.get("year", "")
        subject = f"{_cap(stratum)} {value}'s {_images(region)} from {year}"
        return (f"{subject} are recognisable: a {_group(d)} of {size} images, {pct(share or 0)} from {year} vs "
                f"{pct(base or 0)} overall")
    is_date = unit_of(attr, units) == "days" and str(value).isdigit()
    subject = f"The year {value} ({attr})" if is_date else f"{_cap(attr)} {value}"
    shown = f"from {value}" if is_date else str(value)
    # the pockets of one attribute are searched in turn, each value set aside once its pocket is found
    reference = (f"of the images outside {attr} {join_words(set_aside)}, whose own pocket was found first"
                 if set_aside else "overall")
    if share is None or base is None:
        return f"{subject} is recognisable in the {_images(region)}: a {_group(d)} of {size} images"
    return (f"{subject} is recognisable in the {_images(region)}: a {_group(d)} of {size} images, {pct(share)} "
            f"{shown} vs {pct(base)} {reference}")


def _subgroup(row: Mapping, d: Mapping) -> str:
    attr, region, n = str(row["attribute"]), row.get("region"), row.get("n")
    if row.get("value") == "co-occurrence" or region == "all":
        if d.get("flagged") is not None and d.get("tested") is not None:
            text = f"{d['flagged']} of {d['tested']} subjects look like another {attr}"
            if d.get("multi_region_flagged") is not None:
                text += f" ({d['multi_region_flagged']} subjects in ≥ 2 regions)"
            covs = [c for c in d.get("covariates") or []]
            return text + (f", beyond the classifiers' error given their {join_words(covs)}" if covs else "")
        observed, expected = d.get("observed") or [], d.get("expected") or []
        obs, exp = sum(observed[2:]), sum(expected[2:])
        return (f"{obs} of {n} subjects look like another {attr} in ≥ 2 regions ({exp:.2g} expected if the "
                f"regions were independent)")
    count = _count(row, d)
    covs = _covariates(d)
    given = f", given {join_words(covs)}" if covs else ""
    return f"{count} of {n} {_images(region)} look like another {attr} than recorded{given}"


def _quality(row: Mapping, d: Mapping) -> str:
    kind, region, n = row["kind"], row.get("region"), row.get("n")
    if kind == "non_iid":
        attr, value = str(row["attribute"]), row.get("value")
        if SEP in attr:
            stratum, date_attr = attr.split(SEP, 1)
            return f"The {region} embeddings drift with the {date_attr} within {stratum} {value}"
        return f"The {region} embeddings drift with the {attr}" + (
            f", given {join_words(d['given'])}" if d.get("given") else "")
    count = _count(row, d)
    if kind == "label_issue":
        return (f"{count} of {n} {_images(region)} have a recorded {row['attribute']} that disagrees with the "
                f"embedding (cleanlab label issues)")
    one, many = _QUALITY.get(kind, (f"is flagged ({kind})", f"are flagged ({kind})"))
    return f"{count} of {n} {_images(region)} {one if count == 1 else many}"


def headline(row: Mapping, units: Mapping[str, str] | None = None) -> str:
    """One sentence (no HTML, no final full stop) saying what a finding is, e.g. "Site Essen is recognisable in
    the neck images: a cluster of 88 images, 51 % Essen vs 15 % overall". `row`: a findings row as a dict;
    `units`: {attribute: unit} (`units.attribute_units`), for the days of an onset's interval."""
    d = details_of(row)
    kind = row.get("kind")
    try:
        if kind == "attribute_leak":
            return _leak(row, d, units)
        if kind == "cluster":
            return _cluster(row, d, units)
        if kind == "discordant_subgroup":
            return _subgroup(row, d)
        if kind in ("outlier", "near_duplicate", "label_issue", "non_iid"):
            return _quality(row, d)
    except (KeyError, TypeError, ValueError):
        pass  # a row of an unexpected shape: its own description says it
    text = str(row.get("description") or row.get("finding_id") or "")
    return text.split(" — ")[0].split(" (p=")[0]


# ------------------------------------------------------------------------------------------------- evidence

def _test_name(row: Mapping, d: Mapping) -> str:
    kind = row.get("kind")
    if kind == "attribute_leak":
        text = (f"permutation test of a {d.get('folds', 5)}-fold subject-grouped ridge probe "
                f"({d.get('permutations', '?')} permutations)")
        if d.get("onset") and d.get("shape"):
            text += (f"; onset: two-mean step, 95 % interval from {d.get('bootstraps', '?')} subject bootstraps, "
                     f"{d['shape']} by BIC, step beyond drift p = {fmt_p(d.get('p_step'))}")
        return text
    if kind == "cluster":
        name = _TESTS.get(d.get("test"), d.get("test") or "enrichment test")
        if d.get("permutations") and d.get("test") == "permutation_max_pocket":
            name += f" ({d['permutations']} permutations)"
        if d.get("stability") is not None:
            name += f"; cluster stability {d['stability']:.2f}"
        return name
    if kind == "discordant_subgroup":
        if row.get("value") == "co-occurrence":
            return ("mixture likelihood ratio of the regions against a null fitted per recorded "
                    f"{row.get('attribute')}, Benjamini-Hochberg over subjects (Simes)")
        return ("binomial count against the region's calibrated null and Stouffer's z of the subjects the other "
                "regions flag, Bonferroni-combined")
    if kind == "non_iid":
        return (f"cleanlab's non-IID statistic of the kNN graph against the date order, dates permuted within "
                f"the strata ({d.get('permutations', '?')} permutations)")
    return "cleanlab Datalab flags (no test)"


_EFFECTS = {"balanced_accuracy_minus_chance": "balanced accuracy above chance {:.2f}", "r2": "R² {:.2f}",
            "enrichment_ratio": "enrichment {:.1f}×", "rank_biserial": "rank-biserial {:+.2f}",
            "observed_over_expected": "{:.1f}× the count expected if the regions were independent",
            "non_iid_ks": "KS distance of neighbours' date ranks from random pairs {:.3f}"}


def evidence(row: Mapping) -> str:
    """The evidence of a finding in one line: test, p (raw and FDR-adjusted), effect and n."""
    d = details_of(row)
    parts = [_test_name(row, d)]
    if row.get("p_value") is not None:
        correction = d.get("correction")  # Holm over a family's searches; otherwise BH within the kind
        adjusted = f"{correction}: {fmt_p(row.get('p_adjusted'))}" if correction else \
            f"FDR-adjusted {fmt_p(row.get('p_adjusted'))}"
        parts.append(f"p = {fmt_p(row['p_value'])}, {adjusted}")
    measure, effect = row.get("effect_measure"), row.get("effect_size")
    if effect is not None and measure in _EFFECTS:
        parts.append("effect: " + _EFFECTS[measure].format(effect))
    elif effect is not None and measure in ("discordant_fraction", "fraction_flagged"):
        parts.append(f"effect: {pct(effect) if effect >= 0.01 else f'{100 * effect:.1f} %'} of the images")
    if row.get("n") is not None:
        what = "subjects" if row.get("value") == "co-occurrence" else "images"
        parts.append(f"n = {row['n']} {what}")
    return "; ".join(parts)


def conditioning(row: Mapping) -> str:
    """What re-testing given the other attributes did (discover.causes): '' when it was not re-tested."""
    d = details_of(row)
    cause = d.get("explained_by")
    if isinstance(cause, Mapping):
        shown = f"{cause.get('attribute')} {cause['value']}" if cause.get("value") is not None else cause.get("attribute")
        p = cause.get("p_conditional")
        text = f"Explained by {shown}: given {cause.get('attribute')}, p = {fmt_p(p)}"
        return text + (" (the two cannot be separated in this cohort)" if cause.get("inseparable") else "")
    if row.get("explained_by"):
        return f"Explained by {str(row['explained_by']).replace('=', ' ')}"
    survives = d.get("survives_conditioning")
    if survives:
        return f"Survives conditioning on {join_words([str(s).replace('=', ' ') for s in survives])}"
    return ""

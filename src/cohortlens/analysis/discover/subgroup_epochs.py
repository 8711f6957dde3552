"""Dated acquisition changes as covariates of the discordant subgroup.

The subgroup's null is conditional on the recorded covariates, the site among them, as additive terms of the
evidence's LDA (`subgroup_evidence`). A protocol change at one site from a date shifts that site's later images;
the site's term then takes the *average* shift, so its earlier images look shifted the other way. Where the
change has a component along the sex direction, the earlier images of one sex look like the other sex beyond
what the covariates explain: on the confounded scenario at 1000 subjects 8 of the pca's 10 false flags were
Hamburg subjects, 7 of them women scanned before the change (docs/findings.md, discordant subgroups).

So every date effect within a stratum that discover reports as a root cause (significant, not explained by
another attribute) and dates with an onset becomes one more categorical acquisition covariate: "before" or
"after" the onset inside the stratum, nothing outside it (`"{attribute} {value} from {onset}"`). The onset of a
stratum found in several regions is the median of theirs. This uses the acquisition findings of the same data to
choose covariates, but never the protected attribute: it can only remove acquisition structure from the
subgroup's evidence, not add a sex difference.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics

import numpy as np
import polars as pl

from cohortlens.analysis.discover.core import INTERACTION_SEP, WITHIN_FAMILY, Finding, RegionData
from cohortlens.analysis.table import AttributeSpec


def acquisition_epochs(tests: list[Finding], alpha: float) -> list[dict]:
    """One {attribute, value, date_attribute, onset} per stratum with a root date effect that has an onset."""
    onsets: dict[tuple[str, str, str], list[str]] = {}
    for f in tests:
        if f.family != WITHIN_FAMILY or not f.is_finding(alpha) or f.explained_by is not None:
            continue
        onset, stratum = f.details.get("onset"), f.details.get("stratum")
        if onset is None or stratum is None or INTERACTION_SEP not in f.attribute:
            continue
        date_attr = f.attribute.split(INTERACTION_SEP, 1)[1]
        onsets.setdefault((stratum, str(f.details.get("site", f.value)), date_attr), []).append(onset)
    out = []
    for (attribute, value, date_attr), found in sorted(onsets.items()):
        days = sorted(dt.date.fromisoformat(d).toordinal() for d in found)
        onset = dt.date.fromordinal(int(statistics.median_low(days))).isoformat()
        out.append({"attribute": attribute, "value": value, "date_attribute": date_attr, "onset": onset})
    return out


def epoch_name(epoch: dict) -> str:
    return f"{epoch['attribute']} {epoch['value']} from {epoch['onset']}"


def with_epochs(regions: list[RegionData], epochs: list[dict]) -> list[RegionData]:
    """The regions with one categorical subject-level acquisition attribute per epoch: "after" / "before" the
    onset inside the stratum, missing outside it or without a date (the covariate's baseline)."""
    if not epochs:
        return regions
    out = []
    for rd in regions:
        frame, specs = rd.frame, dict(rd.specs)
        for e in epochs:
            if e["attribute"] not in specs or e["date_attribute"] not in specs:
                continue
            inside = np.array([v is not None and str(v) == e["value"] for v in rd.values(e["attribute"])])
            days = np.asarray(rd.values(e["date_attribute"]), float)
            onset = float(np.datetime64(e["onset"], "D").astype(np.int64))
            label = np.where(~inside | ~np.isfinite(days), None, np.where(days >= onset, "after", "before"))
            name = epoch_name(e)
            frame = frame.with_columns(pl.Series(name, label.tolist(), dtype=pl.Utf8))
            specs[name] = AttributeSpec(name, "categorical", "acquisition", "subject", ("before", "after"))
        out.append(dataclasses.replace(rd, frame=frame, specs=specs))
    return out

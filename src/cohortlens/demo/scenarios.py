"""Test scenarios beside the demo cohort: a confounded cohort and a null cohort, with their ground truth.

The demo cohort (``population.py``) has independent sites, dates and demographics and a strong sex signal,
so detectors tuned on it prove little about a real cohort. The two scenarios here use the same renderer
(``phantom.phantom_volume``) and writers:

* ``confounded``: demographics depend on the site, the scanner ``vendor`` is tied to the site (not 1:1),
  a processing ``batch`` follows the date; root causes are one vendor's bias field, one site's FOV shift
  and one site's protocol change from a date, besides a weaker sex signal, age, height and a 4 %
  opposite-sex subgroup. Marginally, every attribute correlated with a root cause looks "leaky" or
  "clustered" too: those ECHOES are listed in ``ground_truth.json`` with the root cause that explains
  them. Recorded weight and batch have no image effect (negative controls); body fat follows a latent
  adiposity the manifest does not record.
* ``null``: the demo cohort with site and date permuted across subjects after rendering: no acquisition
  attribute has any image effect (the images still carry the demo's site structure, but it belongs to no
  recorded label).

Ground truth lists root causes under ``effects`` (the demo's format, so ``truth`` matches them
the same way), ``echoes`` (attribute, value, regions, kind, explained_by) and ``negative_controls``.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .phantom import EFFECTS, REGIONS, effects_for_size
from .population import (
    BMI_LOG_MEAN_SD,
    DISCORDANT_REGION_P,
    DISCORDANT_SUBGROUP_P,
    HEIGHT_MEAN_SD,
    HEIGHT_RANGE,
    MANIFEST_COLUMNS,
    SITES,
    STUDY_END,
    STUDY_START,
    WEIGHT_RANGE,
    ground_truth,
    sample_subjects,
    subject_id,
)
from .streams import NULL_PERMUTATION_ENTROPY, SCENARIO_ATTR_STREAM, seed_sequence
from .write import write_cohort

SCENARIOS = ("demo", "confounded", "null")
VENDORS = ("X", "Y")
BATCH_MONTHS = 6
BATCHES = tuple(f"B{k + 1}" for k in range(6))  # half-years of the three study years
CONFOUNDED_COLUMNS = (*MANIFEST_COLUMNS[:-1], "vendor", "batch", "date")

# How the confounded cohort's attributes depend on the site (recorded in ground_truth.json as `design`).
CONFOUNDED_DESIGN: dict = {
    "site_share": {s: 0.2 for s in SITES},
    # Vendor mostly follows the site, but every site has both: vendor and site stay distinguishable.
    "vendor_x_share": {"Berlin": 0.8, "Essen": 0.9, "Hamburg": 0.15, "Mannheim": 0.2, "Neubrandenburg": 0.5},
    "male_share": {"Essen": 0.35, "other": 0.5},
    "age_range": {"Mannheim": [32.0, 84.0], "other": [20.0, 72.0]},
    "median_bmi": {"Essen": 29.0, "other": 26.0},  # recorded weight = BMI x height^2
    # Essen recruited only in the first 18 months: its images are old ones (a date echo of its FOV shift).
    "recruitment": {"Essen": ["2014-06-01", "2015-11-30"], "other": [STUDY_START.isoformat(), STUDY_END.isoformat()]},
    # Half-year processing batch of the acquisition date, except for re-processed scans (any batch).
    "batch_follows_date": 0.7,
    "height_mean_sd": HEIGHT_MEAN_SD,  # men taller: tall women and short men look like the other sex
}


def _by_site(table: Mapping, site: str):
    return table.get(site, table.get("other"))


def confounded_effects() -> dict:
    """The confounded scenario's effect table for ``phantom_volume``."""
    eff = copy.deepcopy(EFFECTS)
    del eff["site_flat_neck"]
    # A weaker sex signal than the demo's: per-region sex probes only moderately accurate.
    eff["sex_shape_texture"] = {
        "male_vertebral_depth_factor": 1.09,
        "male_vertebral_width_factor": 1.09,
        "marrow_texture": {"F": {"amplitude": 0.12, "cycles_per_vertebra": 2.0},
                           "M": {"amplitude": 0.18, "cycles_per_vertebra": 1.75}},
        "muscle_signal": {"F": 277.0, "M": 263.0},
    }
    eff["vendor_bias_field"] = {
        "vendor": "Y", "regions": list(REGIONS),
        # log field added to the subject's own (per-coefficient SD 0.035): brighter superior, darker edges
        "log_field": {"y": 0.0, "z": 0.08, "z2": -0.08},
    }
    eff["site_protocol_change"] = {
        "site": "Hamburg", "regions": list(REGIONS), "from_date": "2015-10-01",
        "contrast_gamma": 0.9,  # tissue signal s -> 1000 (s / 1000) ** gamma: brighter mid-tones
    }
    return eff


def batch_of(date: str, rng_draw: float, other: int) -> str:
    """The processing batch: the half-year of the date, or (re-processed scans) the batch ``other``."""
    d = dt.date.fromisoformat(date)
    block = ((d.year - STUDY_START.year) * 12 + d.month - STUDY_START.month) // BATCH_MONTHS
    block = min(max(block, 0), len(BATCHES) - 1)
    return BATCHES[block] if rng_draw < CONFOUNDED_DESIGN["batch_follows_date"] else BATCHES[other]


def sample_confounded_subject(seed: int, index: int) -> dict:
    """Attributes of one subject of the confounded scenario (fixed draw count: index-keyed like the demo)."""
    d = CONFOUNDED_DESIGN
    rng = np.random.default_rng(seed_sequence(seed, index, SCENARIO_ATTR_STREAM))
    site = SITES[int(rng.choice(len(SITES), p=[d["site_share"][s] for s in SITES]))]
    vendor = "X" if rng.random() < d["vendor_x_share"][site] else "Y"
    sex = "M" if rng.random() < _by_site(d["male_share"], site) else "F"
    age = round(float(rng.uniform(*_by_site(d["age_range"], site))), 1)
    mu, sd = HEIGHT_MEAN_SD[sex]
    height = round(float(np.clip(rng.normal(mu, sd), *HEIGHT_RANGE)), 2)
    bmi = math.exp(rng.normal(math.log(_by_site(d["median_bmi"], site)), BMI_LOG_MEAN_SD[1]))
    weight = round(float(np.clip(bmi * height ** 2, *WEIGHT_RANGE)), 1)
    # Body fat in the image follows an adiposity the manifest does not record: weight has no image effect.
    latent_bmi = math.exp(rng.normal(*BMI_LOG_MEAN_SD))
    render_weight = round(float(latent_bmi * height ** 2), 1)
    first, last = (dt.date.fromisoformat(x) for x in _by_site(d["recruitment"], site))
    date = (first + dt.timedelta(days=int(rng.integers((last - first).days + 1)))).isoformat()
    batch = batch_of(date, float(rng.random()), int(rng.integers(len(BATCHES))))
    in_subgroup = bool(rng.random() < DISCORDANT_SUBGROUP_P)
    flips = rng.random(len(REGIONS)) < DISCORDANT_REGION_P
    other = "F" if sex == "M" else "M"
    feature_sex = {r: (other if in_subgroup and f else sex) for r, f in zip(REGIONS, flips)}
    return dict(index=index, subject_id=subject_id(index), sex=sex, age=age, height=height, weight=weight,
                site=site, vendor=vendor, batch=batch, date=date, discordant_subgroup=in_subgroup,
                feature_sex=feature_sex, render={"weight": render_weight})


def sample_confounded_subjects(n_subjects: int, seed: int = 0) -> list[dict]:
    return [sample_confounded_subject(seed, i) for i in range(n_subjects)]


def null_subjects(n_subjects: int, seed: int = 0) -> list[dict]:
    """The demo's subjects with (site, date) permuted jointly across subjects; images keep the true ones."""
    subjects = sample_subjects(n_subjects, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, NULL_PERMUTATION_ENTROPY]))
    perm = rng.permutation(n_subjects)
    out = []
    for s, j in zip(subjects, perm):
        donor = subjects[int(j)]
        out.append({**s, "site": donor["site"], "date": donor["date"],
                    "render": {"site": s["site"], "date": s["date"]}})
    return out


# ---------------------------------------------------------------------------------------------------------
# ground truth


def _effect(name: str, attribute: str, description: str, params: Mapping, value: str | None = None,
            regions: Sequence[str] = REGIONS, **extra) -> dict:
    out = {"name": name, "attribute": attribute}
    if value is not None:
        out["value"] = value
    out.update(regions=list(params.get("regions", regions)), description=description, **extra)
    out.update({k: v for k, v in params.items() if k not in ("regions", "site", "vendor")})
    return out


def _echo(name: str, kind: str, attribute: str, regions: Sequence[str], explained_by: Mapping, why: str,
          value=None, **extra) -> dict:
    """An association a marginal detector sees that one root cause (``explained_by``) fully explains.

    ``kind``: attribute_leak, cluster or interaction (an ``<stratum>×<interaction>`` finding whose stratum
    is ``attribute``); ``value`` (optional) is one value or a list of values (e.g. years of a date).
    """
    out = {"name": name, "kind": kind, "attribute": attribute}
    if value is not None:
        out["value"] = value
    out.update(regions=list(regions), explained_by=dict(explained_by), description=why, **extra)
    return out


def _realised(subjects: Sequence[Mapping]) -> dict:
    """What the sampled cohort actually looks like (the planted correlations, counted)."""
    by_site = {site: [s for s in subjects if s["site"] == site] for site in SITES}

    def mean(xs):
        return round(float(np.mean(xs)), 3) if xs else None

    return {
        "vendor_by_site": {site: {v: sum(s["vendor"] == v for s in ss) for v in VENDORS}
                           for site, ss in by_site.items()},
        "male_share_by_site": {site: mean([s["sex"] == "M" for s in ss]) for site, ss in by_site.items()},
        "mean_age_by_site": {site: mean([s["age"] for s in ss]) for site, ss in by_site.items()},
        "mean_weight_by_site": {site: mean([s["weight"] for s in ss]) for site, ss in by_site.items()},
        "mean_height_by_sex": {sx: mean([s["height"] for s in subjects if s["sex"] == sx]) for sx in "FM"},
    }


def confounded_truth(subjects: Sequence[Mapping], *, seed: int, size: int, n_slices: int,
                     dicom_fraction: float) -> dict:
    eff = effects_for_size(size, confounded_effects())
    gt = ground_truth(subjects, seed=seed, size=size, n_slices=n_slices, dicom_fraction=dicom_fraction)
    discordant = next(e for e in gt["effects"] if e["name"] == "discordant_sex")
    discordant["confounder"] = {
        "attribute": "height",
        "description": "men are taller and height changes the vertebrae, so tall women and short men sit among "
                       "the other sex in every region: their discordance co-occurs across regions without "
                       "any subgroup (a null that assumes independent regions calls that a subgroup too)"}
    fov, protocol, vendor = eff["site_fov_shift"], eff["site_protocol_change"], eff["vendor_bias_field"]
    hamburg, essen = {"attribute": "site", "value": protocol["site"]}, {"attribute": "site", "value": fov["site"]}
    vendor_y = {"attribute": "vendor", "value": vendor["vendor"]}
    gt["scenario"] = "confounded"
    gt["design"] = {**copy.deepcopy(CONFOUNDED_DESIGN), "realised": _realised(subjects)}
    gt["effects"] = [
        _effect("sex_shape_texture", "sex", "male vertebral bodies deeper and wider, coarser marrow texture, "
                "darker muscle; weaker than the demo's (per-region sex probes ~0.8 balanced accuracy)",
                eff["sex_shape_texture"]),
        _effect("age_anatomy", "age", "discs thinner and darker, marrow brighter with age (linear)",
                eff["age_anatomy"]),
        _effect("height_vertebrae", "height", "vertebral body height scales with body height",
                eff["height_vertebrae"]),
        _effect("vendor_bias_field", "vendor", f"vendor {vendor['vendor']}'s receive chain adds a smooth bias "
                "field (brighter superior, darker at the top and bottom edges)", vendor, value=vendor["vendor"],
                complement_values=[v for v in VENDORS if v != vendor["vendor"]]),
        _effect("site_fov_shift", "site", "whole neck image content shifted superiorly (field-of-view "
                "placement)", fov, value=fov["site"]),
        _effect("site_protocol_change", "site", f"new sequence parameters at {protocol['site']} from "
                f"{protocol['from_date']} on: T2 contrast changed in every region", protocol,
                value=protocol["site"], interaction="date"),
        discordant,
    ]
    years_hamburg = [str(y) for y in range(int(protocol["from_date"][:4]) + 1, STUDY_END.year + 1)]
    essen_years = [str(y) for y in range(STUDY_START.year, int(CONFOUNDED_DESIGN["recruitment"]["Essen"][1][:4]) + 1)]
    gt["echoes"] = [
        _echo("mannheim_via_vendor", "cluster", "site", REGIONS, vendor_y,
              f"Mannheim scans mostly on vendor {vendor['vendor']}: the bias-field clusters over-represent it "
              "(its older subjects add to that)", value="Mannheim"),
        _echo("x_sites_via_vendor", "cluster", "site", REGIONS, vendor_y,
              f"Berlin and Essen scan mostly on the other vendor: the clusters of images without vendor "
              f"{vendor['vendor']}'s bias field over-represent them (Essen's necks are its own root cause)",
              value=["Berlin", "Essen"]),
        _echo("essen_years", "cluster", "date", fov["regions"], essen,
              "Essen recruited only in the first 18 months: its shifted necks over-represent those years",
              value=essen_years),
        _echo("hamburg_years", "cluster", "date", REGIONS, hamburg,
              f"{protocol['site']}'s changed images are all from {protocol['from_date']} on: clusters of them "
              "over-represent the later years", value=years_hamburg),
        _echo("hamburg_date_leak", "attribute_leak", "date", REGIONS, hamburg,
              f"the date is predictable only through {protocol['site']}'s protocol change"),
        _echo("vendor_date", "interaction", "vendor", REGIONS, hamburg,
              f"within vendor {vendor['vendor']} (mostly {protocol['site']}) the date is predictable from the "
              "protocol change", value=vendor["vendor"], interaction="date", from_date=protocol["from_date"]),
        _echo("batch_date", "interaction", "batch", REGIONS, hamburg,
              "batches span dates across the protocol change (re-processed scans): within a batch the date is "
              "predictable through it", interaction="date", from_date=protocol["from_date"]),
    ]
    gt["negative_controls"] = [
        {"attribute": "weight",
         "description": "no image effect: body fat follows a latent adiposity the manifest does not record; "
                        "recorded weight correlates with height and sex (root causes) and is higher at Essen",
         "correlated_with": [{"attribute": "height"}, {"attribute": "sex"}, essen]},
        {"attribute": "batch",
         "description": "processing batch: no image effect; follows the date (half-years), hence correlated with "
                        "Essen's early recruitment and Hamburg's protocol change",
         "correlated_with": [{"attribute": "date"}, essen, hamburg]},
    ]
    return gt


def null_truth(subjects: Sequence[Mapping], *, seed: int, size: int, n_slices: int, dicom_fraction: float) -> dict:
    gt = ground_truth(subjects, seed=seed, size=size, n_slices=n_slices, dicom_fraction=dicom_fraction)
    site_effects = {"site_fov_shift", "site_flat_neck"}
    eff = effects_for_size(size)
    gt["scenario"] = "null"
    gt["effects"] = [e for e in gt["effects"] if e["name"] not in site_effects]
    gt["echoes"] = []
    gt["negative_controls"] = [
        {"attribute": a, "description": f"{a} permuted across subjects after rendering: no image effect"}
        for a in ("site", "date")]
    # The images still carry the demo's site structure, under the subjects' true (unrecorded) labels.
    truly = {name: [s["subject_id"] for s in subjects
                    if s["render"]["site"] == eff[name]["site"]
                    and (name != "site_flat_neck" or s["render"]["date"] >= eff[name]["from_date"])]
             for name in sorted(site_effects)}
    gt["unlabelled_structure"] = [
        {"name": name, "regions": eff[name]["regions"], "subjects": ids,
         "description": "present in the images, tied to no recorded attribute (the labels were permuted)"}
        for name, ids in truly.items()]
    return gt


# ---------------------------------------------------------------------------------------------------------
# attributes and writing


def attribute_declarations(scenario: str) -> dict:
    """The `attributes:` block of a config for a scenario's manifest (config/config.yaml's format)."""
    subject = {"level": "subject"}
    attrs = {
        "sex": {"type": "categorical", "role": "protected", **subject, "categories": ["F", "M"]},
        "age": {"type": "continuous", "role": "protected", **subject, "min": 18, "max": 100, "unit": "years"},
        "height": {"type": "continuous", "role": "protected", **subject, "min": 1.2, "max": 2.2, "unit": "m"},
        "weight": {"type": "continuous", "role": "protected", **subject, "min": 30, "max": 250, "unit": "kg"},
        "site": {"type": "categorical", "role": "acquisition", **subject, "categories": list(SITES)},
    }
    if scenario == "confounded":
        attrs["vendor"] = {"type": "categorical", "role": "acquisition", **subject, "categories": list(VENDORS)}
        attrs["batch"] = {"type": "categorical", "role": "acquisition", **subject, "categories": list(BATCHES)}
    attrs["date"] = {"type": "date", "role": "acquisition", **subject, "min": "2014-01-01", "max": "2018-12-31"}
    return attrs


def attributes_yaml(scenario: str) -> str:
    import yaml

    lines = [f"# attributes of the '{scenario}' scenario's manifest: paste into the config (see docs/demo-cohort.md)",
             "attributes:"]
    for name, spec in attribute_declarations(scenario).items():
        flow = yaml.safe_dump(spec, default_flow_style=True, sort_keys=False, width=10_000).strip()
        lines.append(f"  {name}: {flow}")
    return "\n".join(lines) + "\n"


def generate_scenario(out_dir, scenario: str, *, n_subjects: int, size: int, n_slices: int,
                      dicom_fraction: float, seed: int, workers: int, bad_inputs: bool) -> dict:
    """Write a test scenario (manifest.csv, images, ground_truth.json, attributes.yaml) into ``out_dir``."""
    if scenario == "confounded":
        subjects, effects, truth = sample_confounded_subjects(n_subjects, seed), confounded_effects(), confounded_truth
        columns, fill = CONFOUNDED_COLUMNS, {"vendor": VENDORS[0], "batch": BATCHES[0]}
    elif scenario == "null":
        subjects, effects, truth = null_subjects(n_subjects, seed), None, null_truth
        columns, fill = MANIFEST_COLUMNS, None
    else:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    summary = write_cohort(out_dir, subjects, size=size, n_slices=n_slices, dicom_fraction=dicom_fraction,
                           seed=seed, workers=workers, bad_inputs=bad_inputs, effects=effects, columns=columns,
                           bad_row_fill=fill)
    gt = truth(subjects, seed=seed, size=size, n_slices=n_slices, dicom_fraction=dicom_fraction)
    gt["expected_quarantine"] = summary.pop("expected_quarantine")
    Path(summary["ground_truth"]).write_text(json.dumps(gt, indent=1))
    attributes = Path(out_dir) / "attributes.yaml"
    attributes.write_text(attributes_yaml(scenario))
    return {**summary, "scenario": scenario, "attributes": str(attributes)}

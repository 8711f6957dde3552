"""The demo cohort's population: who its subjects are (attributes drawn per subject), how a subject's image
is rendered, and the ground truth of the effects planted in it.

A subject's attributes and images depend only on the seed and its index (see ``streams``): a smaller
cohort's subjects and voxels are a prefix of a larger one's with the same seed; only the choice of DICOM
subjects depends on the cohort size. Writing a sampled cohort to disk is ``write.py``; the test scenarios
(``scenarios.py``) reuse these pieces.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Mapping, Sequence

import numpy as np

from .phantom import (
    FOV_MM,
    REGIONS,
    affine,
    effects_for_size,
    phantom_volume,
    spacing,
)
from .streams import ATTR_STREAM, REGION_STREAM, seed_sequence

SITES = ("Berlin", "Essen", "Hamburg", "Mannheim", "Neubrandenburg")
STUDY_START = dt.date(2014, 6, 1)
STUDY_END = dt.date(2017, 5, 31)
AGE_RANGE = (20.0, 72.0)
HEIGHT_RANGE = (1.45, 2.05)
WEIGHT_RANGE = (40.0, 150.0)
HEIGHT_MEAN_SD = {"F": (1.655, 0.065), "M": (1.79, 0.07)}
BMI_LOG_MEAN_SD = (math.log(26.0), 0.17)
DISCORDANT_SUBGROUP_P = 0.04
DISCORDANT_REGION_P = 0.75
MANIFEST_COLUMNS = ("subject_id", "image", "region", "sex", "age", "height", "weight", "site", "date")


def subject_id(index: int) -> str:
    return f"S{index + 1:05d}"


def study_year(date: str | dt.date) -> int:
    """Study year 1, 2 or 3 counted from 2014-06-01."""
    d = dt.date.fromisoformat(str(date)[:10])
    return 1 + sum(d >= dt.date(STUDY_START.year + k, 6, 1) for k in (1, 2))


def region_rng(seed: int, index: int, region: str) -> np.random.Generator:
    """The generator a subject's region image is rendered from."""
    return np.random.default_rng(seed_sequence(seed, index, REGION_STREAM + REGIONS.index(region)))


def sample_subject(seed: int, index: int) -> dict:
    """Attributes of subject ``index`` (0-based), rounded as written to the manifest.

    Rendering uses these rounded values so the manifest is exactly what drove the image.
    """
    rng = np.random.default_rng(seed_sequence(seed, index, ATTR_STREAM))
    sex = "M" if rng.random() < 0.5 else "F"
    age = round(float(rng.uniform(*AGE_RANGE)), 1)
    mu, sd = HEIGHT_MEAN_SD[sex]
    height = round(float(np.clip(rng.normal(mu, sd), *HEIGHT_RANGE)), 2)
    bmi = math.exp(rng.normal(*BMI_LOG_MEAN_SD))
    weight = round(float(np.clip(bmi * height ** 2, *WEIGHT_RANGE)), 1)
    site = SITES[int(rng.integers(len(SITES)))]
    n_days = (STUDY_END - STUDY_START).days + 1
    date = (STUDY_START + dt.timedelta(days=int(rng.integers(n_days)))).isoformat()
    # Drawn for everyone so that membership never shifts the stream.
    in_subgroup = bool(rng.random() < DISCORDANT_SUBGROUP_P)
    flips = rng.random(len(REGIONS)) < DISCORDANT_REGION_P
    other = "F" if sex == "M" else "M"
    feature_sex = {r: (other if in_subgroup and f else sex) for r, f in zip(REGIONS, flips)}
    return dict(index=index, subject_id=subject_id(index), sex=sex, age=age, height=height,
                weight=weight, site=site, date=date, discordant_subgroup=in_subgroup,
                feature_sex=feature_sex)


def sample_subjects(n_subjects: int, seed: int = 0) -> list[dict]:
    return [sample_subject(seed, i) for i in range(n_subjects)]


def render_subject(subject: Mapping, region: str, size: int, n_slices: int, seed: int,
                   effects: Mapping | None = None) -> np.ndarray:
    """Exactly the array the generator writes for this subject and region.

    A scenario subject may carry ``render``: values that drive the image but differ from the recorded
    ones (the null scenario's true site and date, the confounded scenario's latent body fat); ``effects``
    is the scenario's effect table (default: the demo's).
    """
    params = {**subject, **subject["render"]} if subject.get("render") else subject
    return phantom_volume(params, region, size, n_slices, region_rng(seed, subject["index"], region),
                          effects=effects)


def ground_truth(subjects: Sequence[Mapping], *, seed: int, size: int, n_slices: int,
                 dicom_fraction: float) -> dict:
    eff = effects_for_size(size)
    flipped = {r: [s["subject_id"] for s in subjects if s["feature_sex"][r] != s["sex"]] for r in REGIONS}
    subgroup = [s["subject_id"] for s in subjects if s["discordant_subgroup"]]
    n_flips = [sum(s["feature_sex"][r] != s["sex"] for r in REGIONS) for s in subjects]
    sexes = eff["sex_shape_texture"]
    return {
        "seed": seed,
        "n_subjects": len(subjects),
        "size": size,
        "n_slices": n_slices,
        "geometry": {
            "axes": ["x: left->right (sagittal slice axis)", "y: posterior->anterior",
                     "z: inferior->superior"],
            "orientation": "RAS+",
            "spacing_mm": list(spacing(size, n_slices)),
            "fov_mm": FOV_MM,
            "affine": affine(size, n_slices).tolist(),
        },
        "effects": [
            {"name": "sex_shape_texture", "attribute": "sex", "regions": list(REGIONS),
             "description": "male vertebral bodies deeper and wider, coarser/stronger marrow texture, "
                            "darker (leaner) muscle", **sexes},
            {"name": "age_anatomy", "attribute": "age", "regions": list(REGIONS),
             "description": "discs thinner and darker, marrow brighter with age (linear)",
             **eff["age_anatomy"]},
            {"name": "weight_fat", "attribute": "weight", "regions": list(REGIONS),
             "description": "subcutaneous fat thickness grows linearly with BMI = weight/height^2",
             **eff["weight_fat"]},
            {"name": "height_vertebrae", "attribute": "height", "regions": list(REGIONS),
             "description": "vertebral body height scales with body height",
             **eff["height_vertebrae"]},
            {"name": "site_fov_shift", "attribute": "site", "value": eff["site_fov_shift"]["site"],
             "description": "whole neck image content shifted superiorly (field-of-view placement)",
             **{k: v for k, v in eff["site_fov_shift"].items() if k != "site"}},
            {"name": "site_flat_neck", "attribute": "site", "value": eff["site_flat_neck"]["site"],
             "description": "flatter cervical lordosis (neck support) from study year 2 on",
             "interaction": "date", **{k: v for k, v in eff["site_flat_neck"].items() if k != "site"}},
            {"name": "discordant_sex", "attribute": "sex", "regions": list(REGIONS),
             "description": "subgroup whose images carry the opposite sex's features, correlated "
                            "across regions",
             "subgroup_probability": DISCORDANT_SUBGROUP_P,
             "region_flip_probability": DISCORDANT_REGION_P,
             "subjects": flipped, "subgroup": subgroup,
             "subjects_by_n_flipped_regions": {str(k): n_flips.count(k) for k in range(1, 4)}},
        ],
        "negative_controls": [
            {"attribute": "date",
             "description": "no image effect except through the Neubrandenburg site x year interaction"},
        ],
        "dicom": {
            "fraction": dicom_fraction,
            "subjects": [s["subject_id"] for s in subjects if s["dicom"]],
            "sort_by": "ImagePositionPatient along the slice normal "
                       "(InstanceNumber is interleaved acquisition order)",
        },
    }

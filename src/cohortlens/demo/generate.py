"""Synthetic demo cohort: subjects, planted biases, NIfTI/DICOM files, ground truth.

Every random quantity comes from a SeedSequence keyed by (seed, subject index,
stream) -- the same keys ``SeedSequence(seed).spawn(n)[i].spawn(...)`` would
give -- so a subject's attributes and images depend only on the seed and its
index: not on the worker count, the chunking, or ``n_subjects`` (a smaller
cohort's subjects and voxels are a prefix of a larger one's with the same seed;
only the choice of DICOM subjects depends on the cohort size).

``generate_demo_cohort(..., scenario=...)`` also writes the test scenarios of
``scenarios.py`` (confounded, null) with the same renderer and writers.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import datetime as dt
import functools
import gzip
import json
import math
import multiprocessing
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from .dicom import write_dicom_series
from .phantom import (
    EFFECTS,
    FOV_MM,
    REGIONS,
    affine,
    effects_for_size,
    phantom_volume,
    spacing,
)

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

# SeedSequence stream numbers below the subject index.
# region r renders from stream 1 + r; identifiers (dicom.py) from 4; scenario attributes (scenarios.py) from 5
_ATTR_STREAM, _IDENT_STREAM = 0, 4
_DICOM_PICK_ENTROPY = 0x44434D  # separate entropy word: never collides with a subject key



def subject_id(index: int) -> str:
    return f"S{index + 1:05d}"


def study_year(date: str | dt.date) -> int:
    """Study year 1, 2 or 3 counted from 2014-06-01."""
    d = dt.date.fromisoformat(str(date)[:10])
    return 1 + sum(d >= dt.date(STUDY_START.year + k, 6, 1) for k in (1, 2))


def _seq(seed: int, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=tuple(key))


def region_rng(seed: int, index: int, region: str) -> np.random.Generator:
    """The generator a subject's region image is rendered from."""
    return np.random.default_rng(_seq(seed, index, 1 + REGIONS.index(region)))


def sample_subject(seed: int, index: int) -> dict:
    """Attributes of subject ``index`` (0-based), rounded as written to the manifest.

    Rendering uses these rounded values so the manifest is exactly what drove the image.
    """
    rng = np.random.default_rng(_seq(seed, index, _ATTR_STREAM))
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


def dicom_subject_indices(n_subjects: int, dicom_fraction: float, seed: int) -> list[int]:
    """Deterministic choice of round(fraction * n) subjects to write as DICOM."""
    k = int(round(min(max(dicom_fraction, 0.0), 1.0) * n_subjects))
    rng = np.random.default_rng(np.random.SeedSequence([seed, _DICOM_PICK_ENTROPY]))
    return sorted(int(i) for i in rng.choice(n_subjects, size=k, replace=False)) if k else []


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


# ---------------------------------------------------------------------------
# writers


@functools.lru_cache(maxsize=8)
def _nifti_header(size: int, n_slices: int) -> bytes:
    img = nib.Nifti1Image(np.zeros((n_slices, size, size), "<i2"), affine(size, n_slices))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    raw = img.to_bytes()
    return raw[: len(raw) - n_slices * size * size * 2]


def write_nifti(path: Path, vol: np.ndarray, size: int, n_slices: int) -> None:
    """Single-file NIfTI-1 (.nii.gz): the header is shared by every volume of a cohort."""
    if vol.shape != (n_slices, size, size):
        raise ValueError(f"volume shape {vol.shape} does not match ({n_slices}, {size}, {size})")
    data = np.asarray(vol, "<i2").tobytes(order="F")  # NIfTI stores x fastest
    # mtime=0 makes the gzip stream byte-identical across runs.
    path.write_bytes(gzip.compress(_nifti_header(size, n_slices) + data, compresslevel=1, mtime=0))


def _render_chunk(task: tuple) -> int:
    out_dir, seed, size, n_slices, subjects, effects = task
    out = Path(out_dir)
    for subject in subjects:
        for region in REGIONS:
            vol = render_subject(subject, region, size, n_slices, seed, effects)
            rel = image_path(subject, region)
            if subject["dicom"]:
                write_dicom_series(out / rel, vol, subject, region, size, n_slices, seed)
            else:
                write_nifti(out / rel, vol, size, n_slices)
    return len(subjects)


def image_path(subject: Mapping, region: str) -> str:
    """Manifest path of an image, relative to the manifest's folder."""
    stem = f"{subject['subject_id']}_{region}"
    return f"dicom/{stem}/" if subject.get("dicom") else f"images/{stem}.nii.gz"


def _chunks(items: Sequence, n: int) -> Iterable[Sequence]:
    for start in range(0, len(items), n):
        yield items[start:start + n]


def _pool_context():
    # fork on Linux: spawn and forkserver re-run the caller's __main__ in every
    # worker, which breaks unguarded scripts such as Snakemake's `script:`
    # wrappers. The workers only run numpy/nibabel/pydicom code of their own,
    # so locks held by the parent's other threads at fork time cannot bite.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


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


def plant_bad_inputs(out: Path, *, size: int, n_slices: int, seed: int) -> tuple[list[list[str]], list[dict]]:
    """Extra manifest rows whose images or values are broken in the ways real cohorts break.

    They belong to extra subjects (Q0001...) with no other image, so the clean cohort, its effects and
    its ground truth are untouched; each is expected in quarantine with the reason given.
    """
    import nibabel as nib
    import pydicom

    from cohortlens.demo.phantom import affine as phantom_affine

    (out / "bad").mkdir(exist_ok=True)
    rows, expected = [], []

    def row(i: int, image: str, reason: str, **attrs) -> None:
        base = sample_subject(seed, 10_000_000 + i)
        values = {**{k: base[k] for k in ("sex", "age", "height", "weight", "site", "date")}, **attrs}
        sid = f"Q{i:04d}"
        rows.append([sid, image, "neck", values["sex"], f"{values['age']:.1f}", f"{values['height']:.2f}",
                     f"{values['weight']:.1f}", values["site"], values["date"]])
        expected.append({"subject_id": sid, "image": image, "reason": reason})
        return base

    def volume(i: int) -> np.ndarray:
        return render_subject(sample_subject(seed, 10_000_000 + i), "neck", size, n_slices, seed)

    p = out / "bad" / "Q0001_truncated.nii.gz"
    write_nifti(p, volume(1), size, n_slices)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    row(1, "bad/Q0001_truncated.nii.gz", "truncated gzip")
    write_nifti(out / "bad" / "Q0002_zero.nii.gz", np.zeros((n_slices, size, size), np.int16), size, n_slices)
    row(2, "bad/Q0002_zero.nii.gz", "empty image")

    nan_vol = volume(3).astype(np.float32)
    nan_vol[n_slices // 2, size // 2, size // 2] = np.nan
    nib.save(nib.Nifti1Image(nan_vol, phantom_affine(size, n_slices)), out / "bad" / "Q0003_nan.nii.gz")
    row(3, "bad/Q0003_nan.nii.gz", "NaN/Inf voxels")
    few = volume(4)[: max(1, n_slices // 2)]
    nib.save(nib.Nifti1Image(few.astype(np.int16), phantom_affine(size, n_slices)), out / "bad" / "Q0004_few.nii.gz")
    row(4, "bad/Q0004_few.nii.gz", "too few slices")
    row(5, "bad/Q0005_missing.nii.gz", "missing file")
    write_nifti(out / "bad" / "Q0006_age.nii.gz", volume(6), size, n_slices)
    row(6, "bad/Q0006_age.nii.gz", "attribute 'age'", age=140.0)
    write_nifti(out / "bad" / "Q0007_dup.nii.gz", volume(7), size, n_slices)
    row(7, "bad/Q0007_dup.nii.gz", "duplicate image key")
    row(7, "bad/Q0007_dup.nii.gz", "duplicate image key")
    folder = out / "bad" / "Q0008_gap"
    subject8 = sample_subject(seed, 10_000_008)
    write_dicom_series(folder, volume(8), subject8, "neck", size, n_slices, seed)
    positions = sorted((float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[0]), f) for f in folder.iterdir())
    positions[len(positions) // 2][1].unlink()  # a slice lost in transfer: a gap in the middle of the series
    row(8, "bad/Q0008_gap/", "DICOM series has a gap")
    (out / "bad" / "Q0009_garbage.dcm").write_bytes(b"not a dicom file" * 64)
    row(9, "bad/Q0009_garbage.dcm", "unreadable DICOM")
    return rows, expected


def _manifest_value(subject: Mapping, column: str) -> str:
    if column in ("age", "weight"):
        return f"{subject[column]:.1f}"
    if column == "height":
        return f"{subject[column]:.2f}"
    return subject[column]


def write_cohort(out_dir, subjects: list[dict], *, size: int, n_slices: int, dicom_fraction: float,
                 seed: int, workers: int, bad_inputs: bool, effects: Mapping | None = None,
                 columns: Sequence[str] = MANIFEST_COLUMNS, bad_row_fill: Mapping | None = None) -> dict:
    """Images, manifest.csv and (optionally) the planted bad inputs of a sampled cohort.

    Marks each subject's ``dicom`` flag; returns the summary plus ``expected_quarantine``. The bad rows
    get ``bad_row_fill`` for columns the demo does not have (they are quarantined before any attribute is
    used, but a manifest needs every column).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_subjects = len(subjects)
    on_dicom = set(dicom_subject_indices(n_subjects, dicom_fraction, seed))
    for s in subjects:
        s["dicom"] = s["index"] in on_dicom
    if on_dicom:
        (out / "dicom").mkdir(exist_ok=True)

    workers = max(1, int(workers or 1))
    chunk = max(1, min(100, math.ceil(n_subjects / (4 * workers))))
    tasks = [(str(out), seed, size, n_slices, list(c), effects) for c in _chunks(subjects, chunk)]
    if workers == 1 or len(tasks) == 1:
        for t in tasks:
            _render_chunk(t)
    else:
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(tasks)),
                                    mp_context=_pool_context()) as pool:
            for _ in pool.map(_render_chunk, tasks):
                pass

    bad_rows, expected_quarantine = plant_bad_inputs(out, size=size, n_slices=n_slices, seed=seed) if bad_inputs else ([], [])
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(columns)
        for s in subjects:
            for region in REGIONS:
                row = {"image": image_path(s, region), "region": region}
                wr.writerow([row[c] if c in row else _manifest_value(s, c) for c in columns])
        for bad in bad_rows:
            row = {**(bad_row_fill or {}), **dict(zip(MANIFEST_COLUMNS, bad))}
            wr.writerow([row[c] for c in columns])
    return {
        "n_subjects": n_subjects,
        "n_images": n_subjects * len(REGIONS) + len(bad_rows),
        "n_dicom_series": len(on_dicom) * len(REGIONS),
        "manifest": str(manifest),
        "ground_truth": str(out / "ground_truth.json"),
        "out_dir": str(out),
        "expected_quarantine": expected_quarantine,
    }


def generate_demo_cohort(out_dir, *, n_subjects: int = 300, size: int = 64, n_slices: int = 16,
                         dicom_fraction: float = 0.1, seed: int = 0, workers: int = 2,
                         bad_inputs: bool = False, scenario: str = "demo") -> dict:
    """Write the demo cohort (images, manifest.csv, ground_truth.json) into ``out_dir``.

    ``scenario`` "confounded" or "null" writes one of the test cohorts of ``scenarios.py`` instead (plus
    ``attributes.yaml``). Returns ``{n_subjects, n_images, n_dicom_series, manifest, ground_truth,
    out_dir}`` (+ ``scenario`` and ``attributes`` for the test scenarios).
    When ``workers > 1`` images are rendered in a process pool (forked on
    Linux; elsewhere the calling script needs an ``if __name__ == "__main__":``
    guard).
    """
    kw = dict(size=size, n_slices=n_slices, dicom_fraction=dicom_fraction, seed=seed, workers=workers,
              bad_inputs=bad_inputs)
    if scenario != "demo":
        from .scenarios import generate_scenario

        return generate_scenario(out_dir, scenario, n_subjects=n_subjects, **kw)
    subjects = sample_subjects(n_subjects, seed)
    summary = write_cohort(out_dir, subjects, **kw)
    gt = ground_truth(subjects, seed=seed, size=size, n_slices=n_slices, dicom_fraction=dicom_fraction)
    gt["expected_quarantine"] = summary.pop("expected_quarantine")
    Path(summary["ground_truth"]).write_text(json.dumps(gt, indent=1))
    return summary


__all__ = [
    "EFFECTS", "MANIFEST_COLUMNS", "REGIONS", "SITES", "dicom_subject_indices",
    "generate_demo_cohort", "ground_truth", "image_path", "region_rng", "render_subject",
    "sample_subject", "sample_subjects", "study_year", "subject_id", "write_cohort", "write_dicom_series",
    "write_nifti",
]

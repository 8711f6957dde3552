"""Writing a sampled cohort to disk: NIfTI and DICOM images (rendered in a process pool), manifest.csv and
the planted bad inputs that the preprocess stage must quarantine.

Used by the demo cohort (``generate.py``) and the test scenarios (``scenarios.py``) alike.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import functools
import gzip
import math
import multiprocessing
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from .dicom import write_dicom_series
from .phantom import REGIONS, affine
from .population import MANIFEST_COLUMNS, render_subject, sample_subject
from .streams import DICOM_PICK_ENTROPY


def dicom_subject_indices(n_subjects: int, dicom_fraction: float, seed: int) -> list[int]:
    """Deterministic choice of round(fraction * n) subjects to write as DICOM."""
    k = int(round(min(max(dicom_fraction, 0.0), 1.0) * n_subjects))
    rng = np.random.default_rng(np.random.SeedSequence([seed, DICOM_PICK_ENTROPY]))
    return sorted(int(i) for i in rng.choice(n_subjects, size=k, replace=False)) if k else []


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


def plant_bad_inputs(out: Path, *, size: int, n_slices: int, seed: int) -> tuple[list[list[str]], list[dict]]:
    """Extra manifest rows whose images or values are broken in the ways real cohorts break.

    They belong to extra subjects (Q0001...) with no other image, so the clean cohort, its effects and
    its ground truth are untouched; each is expected in quarantine with the reason given.
    """
    import pydicom

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
    nib.save(nib.Nifti1Image(nan_vol, affine(size, n_slices)), out / "bad" / "Q0003_nan.nii.gz")
    row(3, "bad/Q0003_nan.nii.gz", "NaN/Inf voxels")
    few = volume(4)[: max(1, n_slices // 2)]
    nib.save(nib.Nifti1Image(few.astype(np.int16), affine(size, n_slices)), out / "bad" / "Q0004_few.nii.gz")
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

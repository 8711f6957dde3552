"""Synthetic demo cohort: subjects, planted biases, NIfTI/DICOM files, ground truth.

``generate_demo_cohort`` is the entry point: it samples the demo population (``population.py``), writes it
(``write.py``) and its ground truth; with ``scenario=...`` it writes one of the test scenarios of
``scenarios.py`` (confounded, null) with the same renderer and writers instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from .population import ground_truth, sample_subjects
from .scenarios import generate_scenario
from .write import write_cohort

__all__ = ["generate_demo_cohort"]


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
        return generate_scenario(out_dir, scenario, n_subjects=n_subjects, **kw)
    subjects = sample_subjects(n_subjects, seed)
    summary = write_cohort(out_dir, subjects, **kw)
    gt = ground_truth(subjects, seed=seed, size=size, n_slices=n_slices, dicom_fraction=dicom_fraction)
    gt["expected_quarantine"] = summary.pop("expected_quarantine")
    Path(summary["ground_truth"]).write_text(json.dumps(gt, indent=1))
    return summary

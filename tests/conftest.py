"""Shared fixtures: small real NIfTI cohorts written with nibabel, and the demo/test configs."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "workflow" / "schemas" / "manifest.schema.yaml")


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.fixture
def config() -> dict:
    return copy.deepcopy(demo_config())


def write_volume(path: Path, shape=(16, 40, 40), seed=0, spacing=(4.0, 1.0, 1.0), data=None) -> Path:
    rng = np.random.default_rng(seed)
    if data is None:
        data = rng.uniform(0, 500, size=shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def small_manifest(root: Path, n_subjects=6, regions=("neck", "chest", "lumbar"), shape=(16, 40, 40)) -> Path:
    """A manifest of n_subjects x regions tiny NIfTI volumes with valid demo attributes."""
    rows = []
    sites = ["Berlin", "Essen", "Hamburg", "Mannheim", "Neubrandenburg"]
    for i in range(n_subjects):
        sid = f"T{i:04d}"
        for j, region in enumerate(regions):
            rel = f"images/{sid}_{region}.nii.gz"
            write_volume(root / rel, shape=shape, seed=i * 10 + j)
            rows.append(
                {"subject_id": sid, "image": rel, "region": region, "sex": "FM"[i % 2], "age": str(20 + 3 * i),
                 "height": "1.75", "weight": "70", "site": sites[i % 5], "date": f"2015-0{1 + i % 9}-15"}
            )
    manifest = root / "manifest.csv"
    pl.DataFrame(rows).write_csv(manifest)
    return manifest


@pytest.fixture(scope="session")
def demo_results(tmp_path_factory) -> Path:
    """The full default demo (300 subjects, 64 px, every model and stage) run once per test session through the
    real workflow; returns the run directory (results/ and data/demo/ inside). Analysis tests read from it."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("demo_full")
    cfg = demo_config()
    cfg["demo"]["out_dir"] = "data/demo"
    # the autoencoders run their demo presets for a fraction of their steps: the suite checks that every stage
    # runs and what the pca baseline finds; `make demo` (run by .ci/run before the suite) trains them fully
    for name in ("vae", "dae"):
        if name in cfg["models"]:
            cfg["models"][name].update(steps=40, checkpoint_every=20)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    proc = subprocess.run(
        [snakemake, "--snakefile", str(REPO / "Snakefile"), "--directory", str(root), "--configfile",
         str(root / "config.yaml"), "--cores", "2"],
        capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return root

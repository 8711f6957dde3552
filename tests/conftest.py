"""Shared fixtures: small real NIfTI cohorts written with nibabel, and the demo/test configs."""

from __future__ import annotations

import os

# as the Snakefile does for every job, before anything loads torch's OpenMP runtime: idle threads sleep instead of
# spinning (the suite runs beside other work on 2 cores; docs/benchmarks.md)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import yaml

from cohortlens.embed.parquet import VOLUME_KEYS, EmbeddingWriter
from cohortlens.io.tables import write_parquet

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


def synthetic_embedding_cohort(tmp_path, dim=1408, n_subjects=160, seed=0):
    """External embeddings (e.g. CT foundation vectors) in the contract schema with a planted sex signal."""
    rng = np.random.default_rng(seed)
    subjects = [f"C{i:04d}" for i in range(n_subjects)]
    sex = rng.choice(["F", "M"], n_subjects)
    age = rng.uniform(40, 80, n_subjects)
    X = rng.normal(size=(n_subjects, dim)).astype(np.float32)
    X[:, :8] += 2.0 * (sex == "M")[:, None]
    X[:, 8:16] += ((age - 60) / 10)[:, None]
    frame = pl.DataFrame({"image_uid": [f"{s}/chest" for s in subjects], "subject_id": subjects,
                          "region": ["chest"] * n_subjects})
    emb = tmp_path / "ct/volumes.parquet"
    with EmbeddingWriter(emb, VOLUME_KEYS, dim, {"model": "ct-foundation", "dim": dim, "level": "volume"}) as w:
        w.write(frame, X)
    attrs = {"sex": {"type": "categorical", "role": "protected", "categories": ["F", "M"]},
             "age": {"type": "continuous", "role": "target"}}
    write_parquet(pl.DataFrame({"subject_id": subjects, "sex": sex.tolist(), "age": age}),
                  tmp_path / "subjects.parquet", metadata={"attributes": attrs})
    split = np.where(np.arange(n_subjects) % 10 < 7, "train", np.where(np.arange(n_subjects) % 10 < 8, "val", "test"))
    write_parquet(pl.DataFrame({"subject_id": subjects, "split": split.tolist()}), tmp_path / "splits.parquet")
    return emb, tmp_path / "subjects.parquet", tmp_path / "splits.parquet"


TEST_CONFIGS = REPO / ".test" / "config"


def load_test_config(name: str) -> dict:
    """A config file of .test/config/ (the suite's own configs, like snakemake-workflows' .test/)."""
    return yaml.safe_load((TEST_CONFIGS / f"{name}.yaml").read_text())


@pytest.fixture(scope="session")
def demo_results(tmp_path_factory) -> Path:
    """The default demo cohort (300 subjects, 64 px) through every stage with the pca baseline
    (.test/config/demo-pca.yaml), run once per test session through the real workflow; returns the run
    directory (results/, data/demo/ and config.yaml inside). Analysis tests read the stages' outputs from it."""
    import shutil
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("demo_pca")
    shutil.copyfile(TEST_CONFIGS / "demo-pca.yaml", root / "config.yaml")
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    proc = subprocess.run(
        [snakemake, "--snakefile", str(REPO / "Snakefile"), "--directory", str(root), "--configfile",
         str(root / "config.yaml"), "--cores", "2"],
        capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return root


# With pytest-xdist (`make test`: -n 2 --dist loadgroup) a worker runs whole groups: one per test module, so a
# module-scoped fixture is built once, and one for every test of the session's demo run, so that run is built
# once. The longest groups go first, so that neither worker is left with one of them at the end.
LONG_GROUPS = ("test_slurm", "demo", "test_scenario_findings", "test_workflow", "test_embeddings_only")


# Session fixtures used by more than one module: a test that uses one runs in that fixture's group, so that the
# fixture is built by one worker only (tiny_cohort lives in test_training; test_vae imports it).
SHARED_FIXTURE_GROUPS = {"demo_results": "demo", "tiny_cohort": "test_training"}


def _group(item) -> str:
    fixtures = getattr(item, "fixturenames", ())
    for fixture, group in SHARED_FIXTURE_GROUPS.items():
        if fixture in fixtures:
            return group
    module = getattr(item, "module", None)
    return module.__name__ if module is not None else item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    # the tiers of docs/testing.md: every test that reads the session's demo run is marked `demo`
    for item in items:
        group = _group(item)
        if group == "demo":
            item.add_marker(pytest.mark.demo)
        item.add_marker(pytest.mark.xdist_group(group))
    rank = {g: i for i, g in enumerate(LONG_GROUPS)}
    items.sort(key=lambda it: rank.get(_group(it), len(rank)))  # stable: file order within a group


@pytest.hookimpl(optionalhook=True)  # an xdist hook, called in the controlling process with a worker's test ids
def pytest_xdist_node_collection_finished(node, ids):
    # A pytest that xdist cannot group for (pytest 9 with xdist 3.8, pyproject.toml) would build the demo run and
    # every module's fixtures once per worker: stop instead of doubling the suite's time unnoticed.
    if node.config.getoption("dist") == "loadgroup" and ids and "@" not in ids[0]:
        raise pytest.UsageError("pytest-xdist --dist loadgroup did not group the tests (see pyproject.toml's note "
                                "on pytest < 9); run with TEST_WORKERS=0")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (small networks: thread start-up costs more than it saves), the
    previous count restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

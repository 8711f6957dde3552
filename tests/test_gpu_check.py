"""bench/gpu_check.py (the prepared GPU check) on the CPU at tiny sizes, its wheel set-up, and the CPU fallback of
the cuML paths on a GPU machine without cuML (CUDA present, cuML absent: what the GPU machine here is)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cohortlens.analysis import project
from cohortlens.analysis.probe_backends import resolve_backend
from cohortlens.analysis.probe_settings import ProbeSettings
from cohortlens.runtime import cuml_available, select_device

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_runs_whole_on_the_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--out", str(out)], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert rep["done"] and rep["errors"] == [] and rep["mode"] == "cpu" and rep["tiny"]
    assert rep["env"]["auto_device"] == "cpu" and rep["env"]["cuml_available"] is False
    assert rep["setup"]["missing_before"] == []  # the project's venv has every module: nothing to install
    assert rep["cohort"]["slices"] > 0 and rep["cohort"]["volumes"] == 3 * rep["cohort"]["subjects"]

    # training throughput of every variant, through the real trainer
    assert set(rep["train"]) == {"vae", "vae_no_hessian", "dae"}
    for name, row in rep["train"].items():
        assert row["img_per_s"] > 0 and row["median_window_img_per_s"] > 0 and row["first_steps_s"] > 0, name
        assert row["device"] == "cpu" and row["channels_last"] and not row["amp_bf16"]
    assert rep["train"]["vae"]["hessian_weight"] > 0 and rep["train"]["vae_no_hessian"]["hessian_weight"] == 0
    # compile asked in its own runs; the trainer applies it on CUDA only
    assert {k for k in rep["compile"] if not k.startswith("_")} == {
        f"{v}{m}" for v in ("vae", "vae_no_hessian", "dae") for m in ("", "@reduce-overhead")}
    assert rep["compile"]["dae@reduce-overhead"]["compile_mode"] == "reduce-overhead"
    assert all(r["img_per_s"] > 0 and r["compile"] and not r["compile_applied"] and not r["helps"]
               for k, r in rep["compile"].items() if not k.startswith("_"))

    # the trainer's deterministic key at the NAKO presets (on the CPU a no-op: the rows exist and ran)
    det = {k: r for k, r in rep["deterministic_train"].items() if not k.startswith("_")}
    assert set(det) == {"vae", "dae"} and all(r["deterministic"] and r["img_per_s"] > 0 for r in det.values()), det

    # the supervised engine (baselines, finding networks) for each architecture, through train_supervised
    assert set(rep["supervised"]) == {"resnet10", "resnet34", "densenet121"}
    for name, row in rep["supervised"].items():
        assert row["img_per_s"] > 0 and row["finite"] and row["device"] == "cpu", (name, row)
        assert row["channels_last"] and not row["amp_bf16"] and row["timed_steps"] == 2, (name, row)
    assert "## Supervised baselines" in md

    # embedding throughput of both encoders
    for name in ("vae", "dae"):
        e = rep["embed"][name]
        assert e["stage_slices_per_s"] > 0 and e["bare_slices_per_s"] > 0 and e["finite"], name
        assert e["slices"] == rep["cohort"]["slices"]
        assert e["stage_vs_bare_max_diff_sd"] < 1e-3, e  # the same vectors on the CPU (float32, same kernels)
    assert rep["embed"]["dae"]["normalise"] == "train_zscore"
    assert set(rep["embed"]["dae"]["stage_parts_s"]) == {"load_model", "read_encode_write", "standardise"}

    # where a training step's time goes: the step at the preset's batch and a larger one, and the profiler's ops
    for name in ("dae", "vae"):
        prof = rep["profile"][name]
        assert set(prof["by_batch"]) == {"4", "8"} and all(v["img_per_s"] > 0 for v in prof["by_batch"].values())
        assert prof["profiled"]["wall_ms_per_step"] > 0 and len(prof["top_ops"]) > 0, prof
    assert "## Step profile: dae" in md

    # the tiny demo's train + embed jobs: shape, NaN, a second seeded run identical (on the CPU: always)
    for name, dim in (("vae", 128), ("dae", 32)):
        d = rep["demo"][name]
        assert d["shape_ok"] and d["nan_free"] and d["slices"] == d["index_slices"] and d["dim"] == dim, d
        assert d["volume_dim"] == 12 * dim and d["identical"] and d["max_abs_diff"] == 0, d
        strict = rep["determinism_strict"]["models"][name]
        assert strict["shape_ok"] and strict["nan_free"] and strict["identical"], strict
    assert rep["determinism_strict"]["_process"]["status"] == "ok"
    assert isinstance(rep["determinism_strict"]["nondeterministic_ops"], list)

    # the figures against their targets, and the report
    t = rep["targets"]
    assert t["dae_train_img_per_s"]["target"] == 150 and t["dae_train_img_per_s"]["value"] > 0
    assert t["embed_vae_slices_per_s"]["target"] == t["embed_dae_slices_per_s"]["target"] == 3000
    assert not any(x["applies"] for x in t.values())  # the targets are for the GPU at full size
    assert "## Training (NAKO presets)" in md and "## Embedding" in md and "2nd run identical" in md


def test_gpu_check_only_runs_the_named_sections_and_rejects_an_unknown_one(tmp_path):
    bad = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--only", "compile,traning", "--out",
                          str(tmp_path / "bad")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode != 0 and "traning" in bad.stderr and "deterministic_train" in bad.stderr
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--only", "train", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["sections"] == ["train"] and set(rep["train"]) == {"vae", "vae_no_hessian", "dae"}
    assert not rep.get("supervised") and not rep.get("embed") and "demo" not in rep and "compile" not in rep


def fake_wheel(folder: Path, name: str = "gpucheck_fake", version: str = "1.0") -> Path:
    """A minimal valid pure-Python wheel of a package `name` with `VALUE = 42`."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{dist}/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def test_packed_wheel_unpacks_to_the_same_contents(tmp_path):
    gc = load_gpu_check()
    wheel = fake_wheel(tmp_path / "w")
    before = {i.filename: zipfile.ZipFile(wheel).read(i) for i in zipfile.ZipFile(wheel).infolist()}
    packed = gc.pack_wheel(wheel)
    assert packed.name == wheel.name + ".xz" and not wheel.exists()
    again = gc.unpack_wheel(packed, tmp_path / "u")
    assert again.name == wheel.name
    with zipfile.ZipFile(again) as z:
        assert {i.filename: z.read(i) for i in z.infolist()} == before


def test_setup_installs_only_missing_modules_without_a_registry(tmp_path, monkeypatch):
    gc = load_gpu_check()
    wheels = tmp_path / "wheels"
    gc.pack_wheel(fake_wheel(wheels))  # as bench/gpu_wheels.sh stores a large wheel
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(gc, "NEEDED", {"gpucheck_fake": ["gpucheck-fake"], "json": ["json-not-needed"]})
    monkeypatch.delitem(sys.modules, "gpucheck_fake", raising=False)
    res = gc.setup(wheels, tmp_path / "site")
    assert res["missing_before"] == ["gpucheck_fake"] and res["installed"] == ["gpucheck_fake-1.0-py3-none-any.whl"]
    assert sys.path[0] == str(tmp_path / "site")
    assert __import__("gpucheck_fake").VALUE == 42
    # a required module without a wheel stops the set-up with what to do
    monkeypatch.setattr(gc, "NEEDED", {"gpucheck_absent": ["gpucheck-absent"]})
    with pytest.raises(RuntimeError, match="bench/gpu_wheels.sh"):
        gc.setup(wheels, tmp_path / "site2")


# ------------------------------------------------------------------------------------------- cuML fallback


@pytest.fixture
def cuda_machine(monkeypatch):
    """torch sees a CUDA device and CuPy (in the GPU image) counts one; cuml_available's cache is cleared."""
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    cuml_available.cache_clear()
    yield monkeypatch
    cuml_available.cache_clear()


def no_cuml(monkeypatch) -> None:
    for name in ("cuml", "cuml.manifold", "cuml.svm"):
        monkeypatch.setitem(sys.modules, name, None)  # `import cuml` raises ImportError


def test_cuda_without_cuml_resolves_the_cpu_backends(cuda_machine):
    no_cuml(cuda_machine)
    assert select_device("auto").type == "cuda"  # the models would train on the GPU ...
    assert cuml_available() is False  # ... while the analysis stays on the CPU libraries
    assert project._backend("auto") == "cpu"
    settings = ProbeSettings()
    assert resolve_backend("auto", 100, settings) == "exact"
    assert resolve_backend("auto", settings.exact_max_train + 1, settings) == "approx"


@pytest.mark.slow
def test_cuda_without_cuml_maps_with_opentsne(cuda_machine):
    no_cuml(cuda_machine)
    # the t-SNE entry point reaches openTSNE (a cuML import would raise here)
    X = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    out = project.tsne(X, perplexity=5, n_iter=50, pca_dims=None, backend="auto", n_jobs=1)
    assert out.shape == (40, 2) and np.isfinite(out).all()


def test_cuda_with_cuml_picks_cuml(cuda_machine):
    cuda_machine.setitem(sys.modules, "cuml", types.ModuleType("cuml"))
    assert cuml_available() is True
    assert project._backend("auto") == "cuml"
    assert resolve_backend("auto", 100, ProbeSettings()) == "cuml"
    assert project._backend("cpu") == "cpu" and resolve_backend("exact", 100, ProbeSettings()) == "exact"

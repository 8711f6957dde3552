"""The shared trainer on a real preprocessed cohort: data stream, resume after SIGKILL, SIGTERM / SIGUSR1
checkpoints, seeded determinism, outputs, and the embedding contract of autoencoder embeddings."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from PIL import Image

from cohortlens.cohort.build import build_cohort
from cohortlens.demo.generate import generate_demo_cohort
from cohortlens.embed.autoencoder import embed_autoencoder
from cohortlens.embed.parquet import config_hash
from cohortlens.io.tables import read_parquet_metadata, write_parquet
from cohortlens.models.modelfile import load_model
from cohortlens.models.registry import resolve_config
from cohortlens.models.training.data import SliceBatches, batch_loader, training_rows
from cohortlens.models.training.ema import ema_decay_at, ema_update
from cohortlens.models.training.settings import fingerprint
from cohortlens.models.training.stage import train_from_files
from cohortlens.preprocess.shard import preprocess_shard
from cohortlens.preprocess.store import SliceStore, center_crop

from conftest import SCHEMA, demo_config

CANVAS = 48
CROP = 32


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """24 phantom subjects x 3 regions x 14 slices of 48 px through the real cohort and preprocess stages."""
    root = tmp_path_factory.mktemp("tiny_cohort")
    cfg = demo_config()
    generate_demo_cohort(root / "demo", n_subjects=24, size=CANVAS, n_slices=14, dicom_fraction=0.0, seed=0, workers=1)
    tables = build_cohort(root / "demo" / "manifest.csv", attributes=cfg["attributes"], regions=cfg["regions"],
                          split=cfg["cohort"]["split"], subjects_per_shard=8, manifest_schema=SCHEMA)
    write_parquet(tables.splits, root / "splits.parquet")
    pre = dict(cfg["preprocess"], canvas=[CANVAS, CANVAS])
    index = []
    for k in sorted(tables.images["shard"].unique()):
        preprocess_shard(tables.images, k, regions=cfg["regions"], preprocess=pre, out_slices=root / "pre" / f"shard-{k}.npy",
                         out_index=root / "pre" / f"index-{k}.parquet", out_quarantine=root / "pre" / f"q-{k}.parquet")
        index.append(pl.read_parquet(root / "pre" / f"index-{k}.parquet"))
    write_parquet(pl.concat(index), root / "pre" / "index.parquet")
    return root


def tiny_config(**overrides) -> dict:
    cfg = {"preset": "demo", "crop": CROP, "channels": [8, 16], "latent_dim": 8, "batch_size": 8, "steps": 40,
           "lr": 3e-3, "warmup_steps": 5, "checkpoint_every": 20, "log_every": 10, "hessian_batch": 4,
           "progress_seconds": 0, "qa_images": 8}
    return {**cfg, **overrides}


def paths(cohort: Path) -> tuple[Path, Path]:
    return cohort / "pre" / "index.parquet", cohort / "splits.parquet"


# ------------------------------------------------------------------------------------------- data stream


def test_training_rows_are_the_train_split(tiny_cohort):
    index, splits = pl.read_parquet(paths(tiny_cohort)[0]), pl.read_parquet(paths(tiny_cohort)[1])
    train_subjects = set(splits.filter(pl.col("split") == "train")["subject_id"])
    rows = training_rows(index, splits, "all")
    assert set(rows["subject_id"]) == train_subjects and rows.height == 14 * 3 * len(train_subjects)
    centre = training_rows(index, splits, "center")
    assert centre.height == 12 * 3 * len(train_subjects) and centre["is_center"].all()


def test_batches_depend_only_on_seed_and_step(tiny_cohort):
    store = SliceStore(paths(tiny_cohort)[0])
    rows = training_rows(store.index, pl.read_parquet(paths(tiny_cohort)[1]), "all")
    shards, offsets = rows["shard"].to_numpy(), rows["row"].to_numpy()

    def batches(seed=0):
        return SliceBatches(store.shard_dir, shards, offsets, store.canvas, batch_size=16, crop=CROP, seed=seed)

    data = batches()
    # one epoch of the stream is a permutation of the training rows
    n = rows.height
    epoch = np.concatenate([data.indices(s) for s in range(-(-n // 16))])[:n]
    assert np.array_equal(np.sort(epoch), np.arange(n))
    assert not np.array_equal(data.indices(0), batches(seed=1).indices(0))
    # worker processes and a fresh dataset give the same batches (what resuming relies on)
    serial = [b for b in batch_loader(data, 3, 9, 0, torch.device("cpu"))]
    parallel = [b for b in batch_loader(batches(), 3, 9, 2, torch.device("cpu"))]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(parallel) == 6
    # each sample is a crop of the slice it claims to be, at an offset inside the canvas
    b = serial[0]
    assert b.shape == (16, 1, CROP, CROP) and b.dtype == torch.float32
    idx = data.indices(3)
    offsets_seen = set()
    for i in range(16):
        full = np.asarray(store.shard(int(shards[idx[i]]))[offsets[idx[i]]], np.float32)
        hits = [(y, x) for y in range(CANVAS - CROP + 1) for x in range(CANVAS - CROP + 1)
                if np.array_equal(full[y : y + CROP, x : x + CROP], b[i, 0].numpy())]
        assert hits
        offsets_seen.add(hits[0])
    assert len(offsets_seen) > 1  # random crops, not a fixed window


# ------------------------------------------------------------------------------------------- subprocess runs


def start_training(cfg: dict, cohort: Path, out: Path, log: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    index, splits = paths(cohort)
    cmd = [sys.executable, "-m", "cohortlens.cli", "train", "vae", "--config", str(out / "cfg.yaml"),
           "--index", str(index), "--splits", str(splits), "--out", str(out), "--threads", "1"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, "training ended before the test could interrupt it"
        assert time.monotonic() - t0 < timeout, "timed out waiting for training progress"
        time.sleep(0.05)


def step_of(path: Path) -> int:
    return int(re.search(r"step-(\d+)\.pt", path.name).group(1))


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_exactly_where_the_checkpoint_left_off(tiny_cohort, tmp_path):
    cfg = tiny_config(steps=100, checkpoint_every=20)
    run = tmp_path / "run"
    victim = start_training(cfg, tiny_cohort, run, tmp_path / "first.log")
    ckpts = lambda: sorted((run / "checkpoints").glob("*/step-*.pt"))
    wait_for(lambda: any(step_of(p) >= 40 for p in ckpts()), victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    assert victim.returncode == -signal.SIGKILL
    assert not (run / "model.pt").exists()
    last = max(step_of(p) for p in ckpts())
    assert 40 <= last < 100

    rerun = start_training(cfg, tiny_cohort, run, tmp_path / "second.log")
    # meanwhile the same recipe uninterrupted, in this process (single-threaded like the subprocess)
    train_from_files("vae", cfg, *paths(tiny_cohort), model_path=tmp_path / "ref" / "model.pt", threads=1)
    assert rerun.wait(300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert "resuming from" in (tmp_path / "second.log").read_text() and f"(step {last})" in (tmp_path / "second.log").read_text()

    log = pl.read_csv(run / "train_log.csv")
    ref = pl.read_csv(tmp_path / "ref" / "train_log.csv")
    assert log["step"].to_list() == list(range(10, 101, 10))  # no gap, no repeated steps
    first_after = log.filter(pl.col("step") == last + 10)["loss"][0]
    assert first_after < 0.7 * log["loss"][0]  # continues the curve, no reset to the initial loss
    # the resumed run is the uninterrupted run: same data order, noise, optimizer state, bit for bit
    for col in ("loss", "recon", "kl", "hessian", "lr"):
        assert log[col].to_list() == ref[col].to_list(), col
    resumed = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    unbroken = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_writes_a_checkpoint_and_exits_nonzero(tiny_cohort, tmp_path, signum):
    # no periodic checkpoint in reach: any checkpoint on disk was written because of the signal
    cfg = tiny_config(steps=100_000, checkpoint_every=1_000_000, log_every=2)
    log_path = tmp_path / "train.log"
    proc = start_training(cfg, tiny_cohort, tmp_path / "out", log_path)
    wait_for(lambda: "step 4/100000" in log_path.read_text(), proc)
    proc.send_signal(signum)
    assert proc.wait(120) == 128 + signum
    text = log_path.read_text()
    m = re.search(rf"{signal.Signals(signum).name} at step (\d+): checkpoint (\S+), exit {128 + signum}", text)
    assert m, text[-2000:]
    step, path = int(m.group(1)), Path(m.group(2))
    assert step >= 4 and path.exists() and [path] == list((tmp_path / "out" / "checkpoints").glob("*/step-*.pt"))
    state = torch.load(path, weights_only=True)
    assert state["step"] == step and state["log"][-1]["step"] <= step
    assert not (tmp_path / "out" / "model.pt").exists()


# ------------------------------------------------------------------------------------------- in-process runs


def train_and_embed(cohort: Path, out: Path, cfg: dict, normalise=None) -> pl.DataFrame:
    index, splits = paths(cohort)
    train_from_files("vae", cfg, index, splits, model_path=out / "model.pt", threads=1)
    embed_autoencoder(out / "model.pt", index, slices_path=out / "emb" / "slices.parquet",
                      volumes_path=out / "emb" / "volumes.parquet", splits_path=splits, normalise=normalise,
                      batch_size=64, threads=1)
    return pl.read_parquet(out / "emb" / "slices.parquet")


def test_same_seed_gives_identical_embeddings(tiny_cohort, tmp_path):
    cfg = tiny_config(steps=30, seed=3)
    a = train_and_embed(tiny_cohort, tmp_path / "a", cfg)
    b = train_and_embed(tiny_cohort, tmp_path / "b", cfg)
    c = train_and_embed(tiny_cohort, tmp_path / "c", {**cfg, "seed": 4})
    ea, eb, ec = (np.stack(x["embedding"].to_numpy()) for x in (a, b, c))
    assert a["slice_uid"].to_list() == b["slice_uid"].to_list()
    assert np.array_equal(ea, eb)
    assert not np.allclose(ea, ec)


def test_outputs_and_embedding_contract_with_ema_and_train_zscore(tiny_cohort, tmp_path):
    cfg = tiny_config(steps=40, ema_decay=0.9)
    index_path, splits_path = paths(tiny_cohort)
    out = tmp_path / "vae"
    slices = train_and_embed(tiny_cohort, out, cfg, normalise="train_zscore")
    volumes = pl.read_parquet(out / "emb" / "volumes.parquet")

    # training outputs
    log = pl.read_csv(out / "train_log.csv")
    assert log.columns == ["step", "loss", "recon", "kl", "hessian", "lr", "img_per_s", "elapsed_s"]
    assert log["step"].to_list() == [10, 20, 30, 40] and (log["img_per_s"] > 0).all()
    assert Image.open(out / "reconstructions.png").size == (8 * CROP, 2 * CROP)  # inputs above reconstructions
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["model"] == "vae" and state["steps"] == 40 and "ema_state_dict" in state
    assert not all(torch.equal(state["ema_state_dict"][k], state["state_dict"][k]) for k in state["state_dict"])

    # contract: one row per slice / image, d and 12·d, keys, metadata
    index = pl.read_parquet(index_path)
    assert slices.height == index.height and volumes.height == index["image_uid"].n_unique()
    assert slices.columns == ["slice_uid", "image_uid", "subject_id", "region", "slice_position", "is_center", "embedding"]
    assert volumes.columns == ["image_uid", "subject_id", "region", "embedding"]
    assert slices.schema["embedding"] == pl.Array(pl.Float32, 8) and volumes.schema["embedding"] == pl.Array(pl.Float32, 96)
    meta = read_parquet_metadata(out / "emb" / "slices.parquet")
    vmeta = read_parquet_metadata(out / "emb" / "volumes.parquet")
    resolved = resolve_config("vae", cfg)
    assert (meta["model"], meta["dim"], meta["level"], meta["weights"]) == ("vae", 8, "slice", "ema")
    assert (vmeta["dim"], vmeta["level"], vmeta["center_slices"]) == (96, "volume", 12)
    assert meta["config_hash"] == vmeta["config_hash"] == config_hash(resolved)
    norm = meta["normalisation"]
    assert norm["method"] == "zscore" and len(norm["mean"]) == len(norm["std"]) == 8

    # standardised on the train split's slices
    splits = pl.read_parquet(splits_path)
    train = slices.join(splits.filter(pl.col("split") == "train").select("subject_id"), on="subject_id")
    assert norm["n"] == train.height
    e_train = np.stack(train["embedding"].to_numpy()).astype(np.float64)
    np.testing.assert_allclose(e_train.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(e_train.std(0, ddof=1), 1, atol=1e-4)

    # a volume is its 12 center slices concatenated in slice order
    some = volumes.row(5, named=True)
    centre = slices.filter((pl.col("image_uid") == some["image_uid"]) & pl.col("is_center")).sort("slice_position")
    assert np.array_equal(np.asarray(some["embedding"]), np.concatenate(centre["embedding"].to_list()))

    # the vectors are the EMA encoder's μ of the fixed center crop, standardised
    model, info = load_model(out / "model.pt")
    assert info["weights"] == "ema"
    store = SliceStore(index_path)
    rows = slices.head(20)
    crops = torch.from_numpy(np.ascontiguousarray(center_crop(store.read(rows.select("slice_uid").join(index, on="slice_uid", maintain_order="left")), CROP))).unsqueeze(1)
    expected = (model.embed(crops).numpy() - np.array(norm["mean"])) / np.array(norm["std"])
    np.testing.assert_allclose(np.stack(rows["embedding"].to_numpy()), expected, rtol=1e-4, atol=1e-4)
    raw_model, raw_info = load_model(out / "model.pt", use_ema=False)
    assert raw_info["weights"] == "raw" and not torch.allclose(raw_model.embed(crops), model.embed(crops))


def test_fingerprint_ignores_operational_keys_but_not_the_recipe_or_data():
    cfg = resolve_config("vae", tiny_config())
    base = fingerprint("vae", cfg, ["a/0", "a/1"])
    assert base == fingerprint("vae", {**cfg, "num_workers": 4, "checkpoint_every": 7, "device": "cuda"}, ["a/0", "a/1"])
    # deterministic kernels change the last bits, not the recipe: a study can switch them on and resume
    assert base == fingerprint("vae", {**cfg, "deterministic": True}, ["a/0", "a/1"])
    assert base == fingerprint("vae", {**cfg, "steps": 10_000}, ["a/0", "a/1"])  # extend a constant-lr run
    assert base != fingerprint("vae", {**cfg, "lr_schedule": "cosine"}, ["a/0", "a/1"])
    assert base != fingerprint("vae", {**cfg, "lr": 1e-4}, ["a/0", "a/1"])
    assert base != fingerprint("vae", cfg, ["a/0", "a/1", "b/0"])
    assert base != fingerprint("dae", cfg, ["a/0", "a/1"])


def test_ema_warmup_follows_the_schedule_and_resumes():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def run(avg_fn, steps, ema=None):
        model = torch.nn.Linear(3, 2)
        ema = ema or AveragedModel(model, multi_avg_fn=avg_fn, use_buffers=True)
        for t in range(steps):
            with torch.no_grad():
                model.weight.fill_(float(t))
            ema.update_parameters(model)
        return ema

    # the weight takes the value t at update t: the EMA is then a closed-form weighted mean of 0..steps-1
    steps, decay = 250, 0.999
    warm = float(run(ema_update(decay), steps).module.weight[0, 0])
    expected = 0.0
    for t in range(1, steps):
        d = min(decay, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * t
    assert warm == pytest.approx(expected, rel=1e-5)
    # without warm-up 0.999 keeps the start: 250 updates move the average only a few steps from 0
    cold = float(run(ema_update(decay, warmup=False), steps).module.weight[0, 0])
    torch_own = float(run(get_ema_multi_avg_fn(decay), steps).module.weight[0, 0])
    assert cold == pytest.approx(torch_own, rel=1e-5) and cold < 0.15 * (steps - 1) < 0.8 * (steps - 1) < warm
    assert ema_decay_at(decay, 10) == pytest.approx(11 / 20) and ema_decay_at(decay, 100_000) == decay
    # the update count is in the state dict, so a resumed run continues the schedule where it stopped
    ema = run(ema_update(decay), 100)
    state = ema.state_dict()
    assert int(state["n_averaged"]) == 100


def test_the_dae_encoder_learns_at_its_own_rate_through_the_trainer(tiny_cohort, tmp_path):
    """`encoder_lr_mult` reaches the optimiser of the real training loop: at 0 the semantic encoder keeps its
    initial weights while the UNet trains; at 1 both move."""
    from cohortlens.models.dae import DiffusionAutoencoder

    index, splits = paths(tiny_cohort)
    cfg = {"preset": "demo", "crop": CROP, "base_channels": 8, "norm_groups": 4, "steps": 3, "batch_size": 4,
           "checkpoint_every": 100, "log_every": 1, "progress_seconds": 0, "seed": 0}
    moved = {}
    for mult in (0.0, 1.0):
        out = tmp_path / f"m{mult}"
        train_from_files("dae", {**cfg, "encoder_lr_mult": mult}, index, splits, model_path=out / "model.pt",
                         log_csv=out / "log.csv", threads=1)
        model, _ = load_model(out / "model.pt", use_ema=False)
        torch.manual_seed(0)  # the trainer seeds the initial weights with the config's seed
        fresh = DiffusionAutoencoder.from_config(model.config)
        moved[mult] = {part: max(float((a - b).abs().max()) for a, b in
                                 zip(getattr(model, part).parameters(), getattr(fresh, part).parameters()))
                       for part in ("encoder", "unet")}
    print(moved)
    assert moved[0.0]["encoder"] == 0.0 and moved[0.0]["unet"] > 0
    assert moved[1.0]["encoder"] > 0 and moved[1.0]["unet"] > 0
    groups = DiffusionAutoencoder.from_config({**model.config, "encoder_lr_mult": 4.0}).parameter_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 4e-3]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_grad_clip_bounds_the_step_of_a_model_with_parameter_groups():
    """`grad_clip` clips over every parameter the optimiser holds, also when the model gives it parameter groups
    (the DAE's encoder at its own rate; clipping the groups themselves failed at the first step)."""
    from cohortlens.models.dae import DiffusionAutoencoder
    from cohortlens.models.training.loop import train_step

    torch.manual_seed(0)
    model = DiffusionAutoencoder.from_config(resolve_config("dae", {"preset": "demo", "crop": CROP, "base_channels": 8,
                                                                    "norm_groups": 4}))
    optimizer = torch.optim.AdamW(model.parameter_groups(1e-3))
    x = torch.rand(4, 1, CROP, CROP) * 2 - 1

    def grad_norm() -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                           if p.grad is not None])))

    loss, parts = train_step(model.training_loss, x, optimizer, torch.device("cpu"), amp=False, grad_clip=None)
    unclipped = grad_norm()
    train_step(model.training_loss, x, optimizer, torch.device("cpu"), amp=False, grad_clip=1e-3)
    assert torch.isfinite(loss) and unclipped > 1e-2
    assert grad_norm() == pytest.approx(1e-3, rel=1e-3)


def test_compile_mode_must_be_one_of_torch_compiles_modes():
    from cohortlens.models.training.settings import TrainSettings

    assert TrainSettings.from_config({"compile": True, "compile_mode": "reduce-overhead"}).compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainSettings.from_config({"compile_mode": "fast"})

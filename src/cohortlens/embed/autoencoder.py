"""Embedding with a trained autoencoder (any registered model) into the contract's Parquet files.

- The EMA weights are used when model.pt has them; the input is the fixed center crop of the training crop size.
- Slices stream through `write_embeddings` a few images at a time (peak memory bounded by the batch, not the
  cohort), the encoder sees minibatches of `batch_size` slices.
- `normalise="train_zscore"` (the DAE's semantic latents need it): every embedding dimension is standardised
  with the mean / std over the train split's slices. The encoder runs once: the raw vectors go to temporary
  files in the output folder while the train statistics accumulate (Chan's parallel mean/variance update in
  float64), then both files are rewritten standardised, streamed by record batch. Volume vectors are the
  concatenated standardised slice vectors. The statistics are stored in the metadata (`normalisation`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cohortlens.embed.parquet import SLICE_KEYS, VOLUME_KEYS, EmbeddingWriter, config_hash, write_embeddings
from cohortlens.io.tables import read_parquet_metadata
from cohortlens.models.modelfile import load_model
from cohortlens.preprocess.store import SliceStore, center_crop
from cohortlens.runtime import limit_threads, select_device
from cohortlens.types import PathLike

NORMALISATIONS = (None, "none", "train_zscore")
# slices read per write_embeddings batch are capped by this many bytes of float32 canvas
READ_BUDGET_BYTES = 256 * 2**20


class RunningMoments:
    """Per-dimension mean and variance over batches of vectors (Chan et al.'s pairwise update, float64)."""

    def __init__(self, dim: int):
        self.n = 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros(dim, np.float64)

    def update(self, x: np.ndarray) -> None:
        if len(x) == 0:
            return
        x = np.asarray(x, np.float64)
        n_b, mean_b = len(x), x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / n
        self.n = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n - 1, 1))


def make_encoder(model, crop: int, device: torch.device, batch_size: int, amp: bool = True
                 ) -> Callable[[np.ndarray], np.ndarray]:
    """(n, H, W) float32 slices -> (n, dim) float32 embeddings of their center crops, in minibatches.

    On CUDA each minibatch goes through one of two pinned staging buffers and is copied without blocking, so the
    host fills the next buffer while the device encodes; the vectors stay on the device until the whole batch is
    encoded (one synchronisation per call, not per minibatch)."""
    use_amp = amp and device.type == "cuda"
    cuda = device.type == "cuda"
    staging: list[torch.Tensor | None] = [None, None]
    copied: list[torch.cuda.Event | None] = [None, None]

    def to_device(chunk: np.ndarray, slot: int) -> torch.Tensor:
        src = torch.from_numpy(chunk)
        if not cuda:
            return src.contiguous().unsqueeze(1)
        buf = staging[slot]
        if buf is None or buf.shape[1:] != src.shape[1:] or buf.shape[0] < len(src):
            buf = staging[slot] = torch.empty((batch_size, *src.shape[1:]), dtype=torch.float32, pin_memory=True)
        if copied[slot] is not None:
            copied[slot].synchronize()  # the device has finished reading this buffer's previous minibatch
        buf[: len(src)].copy_(src)
        x = buf[: len(src)].to(device, non_blocking=True)
        copied[slot] = torch.cuda.Event()
        copied[slot].record()
        return x.unsqueeze(1).contiguous(memory_format=torch.channels_last)

    def encode(batch: np.ndarray) -> np.ndarray:
        crops = center_crop(batch, crop)
        if len(crops) == 0:
            return np.empty((0, model.embedding_dim), np.float32)
        vectors = []
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            for k, lo in enumerate(range(0, len(crops), batch_size)):
                vectors.append(model.embed(to_device(crops[lo : lo + batch_size], k % 2)).float())
        return torch.cat(vectors).cpu().numpy()

    return encode


def _images_per_batch(index: pl.DataFrame, canvas: tuple[int, int]) -> int:
    per_image = int(index.group_by("image_uid").len()["len"].max() or 1)
    return int(max(1, min(64, READ_BUDGET_BYTES // (per_image * canvas[0] * canvas[1] * 4))))


def _standardise_file(raw: Path, out: Path, keys: dict, mean: np.ndarray, std: np.ndarray, normalisation: dict) -> int:
    meta = read_parquet_metadata(raw)
    meta["normalisation"] = normalisation
    dim = int(meta["dim"])
    reps = dim // len(mean)
    mean_t, std_t = np.tile(mean, reps).astype(np.float32), np.tile(std, reps).astype(np.float32)
    reader = pq.ParquetFile(raw)
    with EmbeddingWriter(out, keys, dim, meta) as writer:
        for batch in reader.iter_batches(batch_size=8192):
            emb = batch.column("embedding")
            vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            frame = pl.from_arrow(pa.Table.from_batches([batch.drop_columns(["embedding"])]))
            writer.write(frame, (vectors - mean_t) / std_t)
    return writer.n


def embed_autoencoder(
    model_path: PathLike,
    index_path: PathLike,
    *,
    slices_path: PathLike,
    volumes_path: PathLike,
    splits_path: PathLike | None = None,
    normalise: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    threads: int = 1,
    amp: bool = True,
) -> dict[str, Any]:
    """Embed every slice of the index (and every image's center slices as one volume vector)."""
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    normalise = None if normalise == "none" else normalise
    dev = select_device(device)
    with limit_threads(threads, device=dev):  # caps torch and BLAS threads on the CPU only
        return _embed(model_path, index_path, slices_path, volumes_path, splits_path, normalise, batch_size, dev, amp)


def _embed(model_path, index_path, slices_path, volumes_path, splits_path, normalise, batch_size, dev, amp) -> dict:
    t0 = time.perf_counter()
    model, info = load_model(model_path, dev)
    seconds = {"load_model": time.perf_counter() - t0}
    cfg = info["config"]
    crop = int(cfg["crop"])
    store = SliceStore(index_path)
    encode = make_encoder(model, crop, dev, int(batch_size), amp)
    metadata = {"model": info["model"], "config_hash": config_hash(cfg), "normalisation": None, "crop": crop,
                "weights": info["weights"], "steps": info["steps"], "fingerprint": info["fingerprint"]}
    per_batch = _images_per_batch(store.index, store.canvas)
    if normalise is None:
        t0 = time.perf_counter()
        summary = write_embeddings(store.index, store.read, encode, model.embedding_dim, slices_path, volumes_path,
                                   metadata, batch_images=per_batch)
        seconds["read_encode_write"] = time.perf_counter() - t0
        return {**summary, "weights": info["weights"], "normalisation": None, "seconds": _rounded(seconds)}

    if splits_path is None:
        raise ValueError("normalise='train_zscore' needs splits_path (the train split's subjects)")
    train_subjects = pl.read_parquet(splits_path).filter(pl.col("split") == "train")["subject_id"].unique()
    moments = RunningMoments(model.embedding_dim)

    def count_train(part: pl.DataFrame, vectors: np.ndarray) -> None:
        moments.update(vectors[part["subject_id"].is_in(train_subjects.implode()).to_numpy()])

    slices_path, volumes_path = Path(slices_path), Path(volumes_path)
    slices_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=slices_path.parent, prefix=".raw-embeddings-") as tmp:
        raw_s, raw_v = Path(tmp) / "slices.parquet", Path(tmp) / "volumes.parquet"
        t0 = time.perf_counter()
        summary = write_embeddings(store.index, store.read, encode, model.embedding_dim, raw_s, raw_v, metadata,
                                   batch_images=per_batch, observe=count_train)
        seconds["read_encode_write"] = time.perf_counter() - t0
        if moments.n < 2:
            raise ValueError(f"train_zscore: {moments.n} train slices in the index; need at least 2")
        std = moments.std
        constant = std < 1e-12
        std = np.where(constant, 1.0, std)  # a dimension constant on train (collapsed latent) is only centred
        normalisation = {"method": "zscore", "fit_on": "train split, all embedded slices", "n": int(moments.n),
                         "mean": moments.mean.tolist(), "std": std.tolist(), "constant_dims": int(constant.sum())}
        t0 = time.perf_counter()
        _standardise_file(raw_s, slices_path, SLICE_KEYS, moments.mean, std, normalisation)
        _standardise_file(raw_v, volumes_path, VOLUME_KEYS, moments.mean, std, normalisation)
        seconds["standardise"] = time.perf_counter() - t0
    return {**summary, "weights": info["weights"], "normalisation": "train_zscore", "n_train_slices": moments.n,
            "seconds": _rounded(seconds)}


def _rounded(seconds: dict) -> dict:
    return {k: round(v, 3) for k, v in seconds.items()}

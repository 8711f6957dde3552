"""The `pca` baseline: IncrementalPCA on center-cropped slices, fit on the train split.

It has the same train/embed life cycle as the autoencoders (model file, training log, QA picture, embedding
through `cohortlens.embed.pca`) and fits in seconds, so it is the reference row of every analysis.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.decomposition import IncrementalPCA

from cohortlens.io.tables import atomic_path
from cohortlens.models.training.data import training_rows
from cohortlens.preprocess.store import SliceStore, center_crop


class SlicePCA:
    def __init__(self, n_components: int = 32, crop: int = 64, whiten: bool = False):
        self.n_components = int(n_components)
        self.crop = int(crop)
        self.whiten = bool(whiten)
        self.ipca: IncrementalPCA | None = None

    def _flat(self, batch: np.ndarray) -> np.ndarray:
        return center_crop(batch, self.crop).reshape(batch.shape[0], -1)

    def fit(self, store: SliceStore, rows: pl.DataFrame, batch_size: int = 512, log_path: str | None = None) -> "SlicePCA":
        # IncrementalPCA needs every batch to hold at least n_components samples.
        batch_size = max(batch_size, self.n_components)
        if rows.height < self.n_components:
            raise ValueError(f"pca: {rows.height} training slices < n_components {self.n_components}")
        self.ipca = IncrementalPCA(n_components=self.n_components, whiten=self.whiten)
        log = []
        n_batches = -(-rows.height // batch_size)
        for i, (_, batch) in enumerate(store.batches(rows, batch_size)):
            x = self._flat(batch)
            if x.shape[0] < self.n_components:  # fold a short final batch into the previous fit
                break
            self.ipca.partial_fit(x)
            log.append(
                {"step": i + 1, "of": n_batches, "n_seen": int(self.ipca.n_samples_seen_),
                 "explained_variance_ratio": float(self.ipca.explained_variance_ratio_.sum())}
            )
        if log_path:
            with atomic_path(log_path, ".csv") as tmp, open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(log[0]))
                writer.writeheader()
                writer.writerows(log)
        return self

    def transform(self, batch: np.ndarray) -> np.ndarray:
        return self.ipca.transform(self._flat(batch)).astype(np.float32)

    def reconstruct(self, batch: np.ndarray) -> np.ndarray:
        flat = self.ipca.inverse_transform(self.ipca.transform(self._flat(batch)))
        return flat.reshape(batch.shape[0], self.crop, self.crop)

    @property
    def dim(self) -> int:
        return self.n_components

    def save(self, path: str | os.PathLike) -> None:
        import torch

        state = {
            "model": "pca",
            "n_components": self.n_components,
            "crop": self.crop,
            "whiten": self.whiten,
            "components": torch.from_numpy(self.ipca.components_.copy()),
            "mean": torch.from_numpy(self.ipca.mean_.copy()),
            "explained_variance": torch.from_numpy(self.ipca.explained_variance_.copy()),
            "explained_variance_ratio": torch.from_numpy(self.ipca.explained_variance_ratio_.copy()),
            "singular_values": torch.from_numpy(self.ipca.singular_values_.copy()),
            "n_samples_seen": int(self.ipca.n_samples_seen_),
        }
        with atomic_path(path, ".pt") as tmp:
            torch.save(state, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SlicePCA":
        import torch

        state = torch.load(path, weights_only=True)
        self = cls(state["n_components"], state["crop"], state["whiten"])
        ipca = IncrementalPCA(n_components=self.n_components, whiten=self.whiten)
        ipca.components_ = state["components"].numpy()
        ipca.mean_ = state["mean"].numpy()
        ipca.explained_variance_ = state["explained_variance"].numpy()
        ipca.explained_variance_ratio_ = state["explained_variance_ratio"].numpy()
        ipca.singular_values_ = state["singular_values"].numpy()
        ipca.n_samples_seen_ = state["n_samples_seen"]
        ipca.n_components_ = self.n_components
        ipca.n_features_in_ = ipca.mean_.shape[0]
        self.ipca = ipca
        return self


def save_reconstructions(model: SlicePCA, batch: np.ndarray, path: str | os.PathLike) -> None:
    """QA picture: originals (top row) above their reconstructions (bottom row)."""
    from PIL import Image

    orig = center_crop(batch, model.crop)
    rec = model.reconstruct(batch)
    grid = np.concatenate([np.concatenate(list(orig), axis=1), np.concatenate(list(rec), axis=1)], axis=0)
    img = ((np.clip(grid, -1, 1) + 1) * 127.5).astype(np.uint8)
    with atomic_path(path, Path(path).suffix) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def fit_pca_from_files(index_path, splits_path, cfg: dict, *, model_path, log_csv, reconstructions) -> SlicePCA:
    """Fit on the train split's slices (center slices by default) and write model, log and QA image."""
    store = SliceStore(index_path)
    # shard order (training_rows) reads the memory maps sequentially (a random order costs a seek per slice at
    # 300k slices); a shard holds all regions of its subjects, so batches still mix regions
    rows = training_rows(store.index, pl.read_parquet(splits_path), cfg.get("fit_slices", "center"))
    model = SlicePCA(cfg["n_components"], cfg["crop"], cfg.get("whiten", False))
    model.fit(store, rows, int(cfg.get("batch_size", 1024)), log_path=log_csv)
    model.save(model_path)
    save_reconstructions(model, store.read(rows.head(8)), reconstructions)
    return model

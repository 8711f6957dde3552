"""Embedding with the pca baseline into the contract's Parquet files."""

from __future__ import annotations

from cohortlens.embed.parquet import config_hash, write_embeddings
from cohortlens.models.pca import SlicePCA
from cohortlens.preprocess.store import SliceStore


def embed_pca(model_path, index_path, cfg: dict, *, slices_path, volumes_path) -> dict:
    model = SlicePCA.load(model_path)
    store = SliceStore(index_path)
    metadata = {"model": "pca", "config_hash": config_hash(cfg), "normalisation": None, "crop": model.crop}
    return write_embeddings(
        store.index, store.read, model.transform, model.dim, slices_path, volumes_path, metadata
    )

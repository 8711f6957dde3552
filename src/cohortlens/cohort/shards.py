"""Per-shard file lists: what decides when a preprocess shard reruns, without one Snakemake input per image.

The cohort checkpoint writes `shard-{k}.tsv` (the shard's image_uid, region and path, in the images table's
order) and rewrites a list only when its content changed, so a list's mtime moves exactly when its shard's
rows do: one new, removed or re-labelled image makes only its own shard's list newer than the shard's
outputs. An image edited in place (same row, new file) is caught by `files_stamp`, a digest of the listed
files' mtime and size that the preprocess rule passes as a param. Both replace one input per image: at
CheXpert scale (223k images) Snakemake's per-file bookkeeping of those inputs cost ~20 s per dry run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import polars as pl

from cohortlens.io.tables import atomic_path

LIST_COLUMNS = ("image_uid", "region", "path")


def shard_list_path(directory: str | os.PathLike, shard: int) -> str:
    return os.path.join(directory, f"shard-{int(shard)}.tsv")


def write_shard_lists(images: pl.DataFrame, directory: str | os.PathLike) -> dict[str, list[int]]:
    """Write one list per shard of `images`, leaving lists whose content is unchanged untouched (mtime kept)
    and removing the lists of shards that no longer exist. Returns the shards written, kept and removed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[int]] = {"written": [], "kept": [], "removed": []}
    shards = set()
    for (shard,), rows in images.select("shard", *LIST_COLUMNS).group_by("shard", maintain_order=True):
        shards.add(int(shard))
        path = Path(shard_list_path(directory, shard))
        text = rows.select(LIST_COLUMNS).write_csv(separator="\t").encode()
        if path.exists() and path.read_bytes() == text:
            out["kept"].append(int(shard))
            continue
        with atomic_path(path, ".tsv") as tmp:
            tmp.write_bytes(text)
        out["written"].append(int(shard))
    for stale in directory.glob("shard-*.tsv"):
        k = stale.stem.removeprefix("shard-")
        if k.isdigit() and int(k) not in shards:
            stale.unlink()
            out["removed"].append(int(k))
    return {k: sorted(v) for k, v in out.items()}


def read_shard_list(path: str | os.PathLike) -> list[str]:
    """The image paths of one shard list."""
    return pl.read_csv(path, separator="\t", columns=["path"], schema_overrides={"path": pl.Utf8})["path"].to_list()


def files_stamp(paths: list[str]) -> str:
    """Digest of each file's path, mtime (ns) and size ('missing' for a file that is gone): changes when any
    file is replaced, touched, grows or disappears. One stat per file, no Snakemake bookkeeping."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\t{st.st_mtime_ns}\t{st.st_size}\n".encode())
        except FileNotFoundError:
            h.update(f"{p}\tmissing\n".encode())
    return h.hexdigest()

"""Tabular I/O shared by every stage: manifests in, Parquet out, always written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


class ManifestError(ValueError):
    """A problem with the manifest as a whole: the run stops and the message names the file (and row)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    Readers (and a Snakemake rerun after a crash) never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet(table: pl.DataFrame | pa.Table, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a Parquet file atomically; `metadata` goes into the file's key-value metadata as JSON strings."""
    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    if metadata:
        existing = dict(table.schema.metadata or {})
        existing.update({k.encode(): json.dumps(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(existing)
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(table, tmp)


def read_parquet_metadata(path: str | os.PathLike) -> dict:
    raw = pq.read_schema(path).metadata or {}
    out = {}
    for k, v in raw.items():
        key = k.decode()
        if key.startswith("ARROW:") or key == "pandas":
            continue
        try:
            out[key] = json.loads(v)
        except (ValueError, UnicodeDecodeError):
            out[key] = v.decode(errors="replace")
    return out


def _check_utf8(path: Path) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError(
            f"manifest {path}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}); "
            "re-encode it as UTF-8"
        ) from None


def read_manifest(path: str | os.PathLike) -> pl.DataFrame:
    """Read a manifest (CSV, TSV or Parquet) with every column as text; typing is the schema's job.

    Reading as text keeps '007' subject ids and odd values intact so validation can name them.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path}: file not found")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix == ".parquet":
        try:
            df = pl.read_parquet(path)
        except Exception as exc:  # pyarrow/polars raise several types for corrupt files
            raise ManifestError(f"manifest {path}: unreadable Parquet ({exc})") from None
        return df.with_columns(pl.all().cast(pl.Utf8))
    if suffix not in (".csv", ".tsv", ".txt"):
        raise ManifestError(f"manifest {path}: unsupported extension '{suffix}' (use .csv, .tsv or .parquet)")
    _check_utf8(path)
    sep = "\t" if suffix == ".tsv" else ","
    try:
        df = pl.read_csv(path, separator=sep, infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        raise ManifestError(f"manifest {path}: malformed {suffix[1:].upper()} ({exc})") from None
    # Blank cells mean "not recorded": normalise them to null once, here.
    return df.with_columns(pl.all().str.strip_chars().replace("", None))

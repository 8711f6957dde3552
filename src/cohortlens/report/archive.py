"""The results archive: the report, the run's tables, the config, package versions and SHA-256 checksums in one
`.tar.gz`, written only after a scan proves that no DICOM identifier of the cohort's input files is inside.

Members (paths inside the archive, under `cohortlens-results/`):

* `report/index.html`, and every listed results file under its path relative to `results/` (Parquet tables,
  train logs, explanation PNGs; directories are taken whole);
* `config.yaml`: the config the run used; `versions.json`: Python, platform and key package versions;
* `SHA256SUMS`: `sha256  path` of every other member (`sha256sum -c` checks an unpacked archive).

The identifier scan reads the headers of the DICOM inputs listed in images.parquet (one file per series:
identifiers are per patient and study) and looks for every non-empty identifying value (patient name, id,
birth date, institution, accession number, physicians, study id, UIDs of study and series...) in every member:
text as is, Parquet files decoded (every cell and the key-value metadata), PNG text chunks and the images
inlined in the report as data URIs. Any hit stops the archive (`IdentifierFound`).

The workflow writes two kinds (docs/report.md): internal (this module's members under `cohortlens-internal/`) and
publication (`report.publish`: aggregates only, under `cohortlens-publication/`, after the release check of
`report.release`, passed in as `check`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import gzip
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import re
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import polars as pl
import pyarrow.parquet as pq
import yaml

from cohortlens.io.tables import atomic_path
from cohortlens.types import PathLike

log = logging.getLogger(__name__)

ROOT = "cohortlens-results"  # the members' folder; the workflow names it per kind (cohortlens-internal, -publication)

# DICOM attributes whose values identify a person, a visit or an institution (PS3.15 basic profile, the
# ones such a cohort's headers carry). Dates other than the birth date are acquisition attributes the cohort
# may declare itself (its `date` column), so they are not scanned.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "MilitaryRank", "MedicalRecordLocator",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
    "RequestingPhysician", "AccessionNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "StationName", "DeviceSerialNumber", "IssuerOfPatientID",
)
# values shorter than this are too generic to search for (e.g. a one-letter sex code would match anything)
MIN_LENGTH = 4
# packages whose versions go into versions.json (those installed)
KEY_PACKAGES = ("cohortlens", "snakemake", "numpy", "polars", "pyarrow", "scikit-learn", "scipy", "torch",
                "opentsne", "umap-learn", "plotly", "matplotlib", "kaleido", "fairlearn", "cleanlab", "hdbscan", "pydicom",
                "nibabel", "pillow", "pyyaml", "cuml")
_DICOM_SUFFIXES = {"", ".dcm", ".dicom", ".dic", ".ima"}


class IdentifierFound(RuntimeError):
    """A DICOM identifier occurs in a member of the archive."""


# ------------------------------------------------------------------------------------------- identifiers

def _value_forms(keyword: str, value) -> set[str]:
    """The strings a value may appear as: itself, a person name with ^ as spaces and reordered, a DA date
    also as ISO."""
    values = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    out: set[str] = set()
    for v in values:
        s = str(v).strip()
        if not s:
            continue
        out.add(s)
        if "^" in s:
            parts = [p for p in s.split("^") if p]
            out.add(" ".join(parts))
            if len(parts) >= 2:
                out.add(" ".join([*parts[1:], parts[0]]))  # given family
                out.add(f"{parts[0]}, {' '.join(parts[1:])}")
        if keyword.endswith("Date") and re.fullmatch(r"\d{8}", s):
            out.add(f"{s[:4]}-{s[4:6]}-{s[6:]}")
    return {s for s in out if len(s) >= MIN_LENGTH}


def _is_dicom_path(p: Path) -> bool:
    return p.is_dir() or (p.is_file() and p.suffix.lower() in _DICOM_SUFFIXES)


def _series_file(p: Path) -> Path | None:
    if p.is_file():
        return p
    for f in sorted(p.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            return f
    return None


def dicom_identifiers(paths: Iterable[PathLike], keywords: Sequence[str] = IDENTIFYING_KEYWORDS) -> dict[str, str]:
    """identifier string -> 'Keyword (file)' from the headers of DICOM files/series folders (one file per
    series). Paths that are not DICOM (NIfTI, PNG) are skipped; unreadable ones are logged and skipped."""
    import pydicom

    found: dict[str, str] = {}
    for raw in paths:
        p = Path(raw)
        if not _is_dicom_path(p):
            continue
        f = _series_file(p)
        if f is None:
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception as exc:
            log.warning("identifier scan: cannot read %s (%s)", f, exc)
            continue
        for kw in keywords:
            value = ds.get(kw)
            if value is None:
                continue
            for form in _value_forms(kw, value):
                found.setdefault(form, f"{kw} ({f})")
    return found


def identifiers_from_images(images_parquet: PathLike, base: PathLike | None = None) -> dict[str, str]:
    """dicom_identifiers of the DICOM inputs of images.parquet (`path` column, relative to `base`, default
    the working directory, i.e. the Snakemake workdir)."""
    frame = pl.read_parquet(images_parquet, columns=["path"])
    base = Path(base) if base is not None else Path.cwd()
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in frame["path"].unique().to_list()]
    return dicom_identifiers(paths)


# ----------------------------------------------------------------------------------------------- scanning

_DATA_URI = re.compile(rb"data:image/[a-z+]+;base64,([A-Za-z0-9+/=]+)")


def _png_text(data: bytes) -> bytes:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, decompressed."""
    import zlib

    out, pos = [], 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt":
            out.append(chunk)
        elif kind == b"zTXt":
            key, _, rest = chunk.partition(b"\0")
            try:
                out.append(key + b"\0" + zlib.decompress(rest[1:]))
            except zlib.error:
                out.append(chunk)
        elif kind == b"iTXt":
            key, _, rest = chunk.partition(b"\0")
            flag = rest[:1]
            text = rest[2:].split(b"\0", 2)[-1]
            if flag == b"\1":
                try:
                    text = zlib.decompress(text)
                except zlib.error:
                    pass
            out.append(key + b"\0" + text)
        pos += 12 + length
    return b"\n".join(out)


def _parquet_text(data: bytes) -> bytes:
    """Every cell (nested lists included) and the key-value metadata of a Parquet file, as text."""
    table = pq.read_table(io.BytesIO(data))
    meta = table.schema.metadata or {}
    parts = [k + b"=" + v for k, v in meta.items()]
    frame = pl.from_arrow(table)
    if frame.height:
        parts.append(frame.write_ndjson().encode())
    parts.append(",".join(frame.columns).encode())
    return b"\n".join(parts)


def member_texts(name: str, data: bytes) -> list[bytes]:
    """The byte strings the scan searches in a member: its raw bytes, and decoded forms of Parquet, PNG and
    the report's data-URI images, gzip."""
    texts = [data]
    low = name.lower()
    if low.endswith(".parquet"):
        texts.append(_parquet_text(data))
    elif low.endswith(".png"):
        texts.append(_png_text(data))
    elif low.endswith(".gz"):
        texts += member_texts(name[:-3], gzip.decompress(data))
    if low.endswith((".html", ".htm", ".svg", ".json")):
        for m in _DATA_URI.finditer(data):
            try:
                blob = base64.b64decode(m.group(1))
            except ValueError:
                continue
            texts.append(blob)
            if blob.startswith(b"\x89PNG"):
                texts.append(_png_text(blob))
    return texts


def _is_binary(name: str) -> bool:
    return name.lower().endswith((".parquet", ".png", ".gz", ".npy", ".pt"))


def scan_bytes(name: str, data: bytes, identifiers: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(member, identifier, its source) for every identifier found in a member."""
    texts = member_texts(name, data)
    hits = []
    for ident, source in identifiers.items():
        needle = ident.encode()
        if not any(needle in t for t in texts):
            continue
        if needle.isdigit():
            # a bare number (a DA date) counts only as a number of its own: not inside a longer number or a
            # decimal (0.19670703 is an embedding value), and not in the raw bytes of a binary file
            pattern = re.compile(rb"(?<![\d.])" + needle + rb"(?![\d.])")
            candidates = texts[1:] if _is_binary(name) else texts
            if not any(pattern.search(t) for t in candidates):
                continue
        hits.append((name, ident, source))
    return hits


def scan_archive(archive: PathLike, identifiers: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """Scan every regular member of a .tar.gz; returns the hits (empty = clean)."""
    hits = []
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            if m.isfile():
                hits += scan_bytes(m.name, tar.extractfile(m).read(), identifiers)
    return hits


# ----------------------------------------------------------------------------------------------- writing

def package_versions(packages: Sequence[str] = KEY_PACKAGES) -> dict:
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"python": sys.version.split()[0], "implementation": platform.python_implementation(),
            "platform": platform.platform(), "machine": platform.machine(), "packages": versions,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


# What a run's archive holds by default (globs under results/): the tables and small files of every stage.
# Left out: slice-level embeddings and preprocessed shards (large, and pixel data), model checkpoints, the
# mitigated embeddings, the per-attribute interactive plot pages (the report has the maps) and the logs.
DEFAULT_MEMBERS = (
    "cohort/*.parquet",
    "preprocessed/index.parquet",
    "preprocessed/quarantine.parquet",
    "embeddings/*/volumes.parquet",
    "embeddings/*/quarantine.parquet",  # an imported model's bad rows
    "models/*/train_log.csv",
    "models/*/reconstructions.png",
    "projections/*/*/*.parquet",
    "probes/*/*.parquet",
    "baselines/*/*.parquet",
    "baselines/*/train_log.csv",
    "fairness/*/*.parquet",
    "findings/*.parquet",
    "findings/*/*.png",
    "counterfactuals/*.parquet",  # the DAE's counterfactual index and strips (the .npy decodes stay out: pixel data)
    "counterfactuals/*/*.png",
    "findings/*/*.png",  # the training curves (and explanation PNGs of runs before explain/)
    "findings/*/explain/*.png",
    "findings/*/discordant-training-curves.csv",
    "findings/*/saliency.parquet",
    "findings/*/saliency/*.png",
    "plots/*/*/*.pdf",  # the static maps for publication (the interactive pages stay out)
    "plots/*/*/*.svg",
    "mitigation/*/reprobe.parquet",
    "report/publication.html",
    "report/publication-maps/*.png",
)


def default_files(results_dir: PathLike = "results", patterns: Sequence[str] = DEFAULT_MEMBERS) -> list[Path]:
    root = Path(results_dir)
    return sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})


def collect_files(paths: Iterable[PathLike], results_dir: PathLike = "results") -> dict[str, Path]:
    """archive name (relative to results/) -> file, for files and the files under listed directories.
    Files outside results/ keep their path relative to the working directory."""
    results_dir = Path(os.path.abspath(results_dir))
    out: dict[str, Path] = {}
    for raw in paths:
        p = Path(raw)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.name.startswith("."):
                continue  # atomic-write temporaries
            r = Path(os.path.abspath(f))  # symlinks kept: the name is where the run put the file
            try:
                name = r.relative_to(results_dir).as_posix()
            except ValueError:
                name = Path(os.path.relpath(r)).as_posix()
                if name.startswith("../"):
                    raise ValueError(f"{f}: outside the working directory; not archived") from None
            out[name] = f
    return dict(sorted(out.items()))


def _add(tar: tarfile.TarFile, name: str, data: bytes, root: str = ROOT) -> None:
    info = tarfile.TarInfo(f"{root}/{name}")
    info.size = len(data)
    info.mtime = 0  # reproducible members; the creation time is in versions.json
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_archive(
    out_path: PathLike,
    *,
    report: PathLike | None = None,
    files: Iterable[PathLike] = (),
    config: Mapping,
    images_parquet: PathLike | None = None,
    results_dir: PathLike = "results",
    sums_path: PathLike | None = None,
    extra_identifiers: Mapping[str, str] | None = None,
    members: Mapping[str, bytes] | None = None,
    root: str = ROOT,
    check: Callable[[Mapping[str, bytes], Mapping[str, str]], None] | None = None,
) -> dict:
    """Write the archive (atomically) after scanning every member for the DICOM identifiers of the inputs in
    `images_parquet` (plus `extra_identifiers`); raises IdentifierFound (and writes nothing) on a hit.
    Members: `report` as report/index.html, the `files` (under their names relative to `results_dir`) and
    `members` ({name: bytes}, e.g. the publication archive's aggregates), then config.yaml, versions.json and
    SHA256SUMS, all under `root/`. `check(members, identifiers)` runs before anything is written and may
    raise (the publication archive's release check). `sums_path` also gets the SHA256SUMS file beside the
    archive. Returns a summary."""
    out: dict[str, bytes] = {"report/index.html": Path(report).read_bytes()} if report is not None else {}
    for name, path in collect_files(files, results_dir).items():
        if name not in out:
            out[name] = path.read_bytes()
    out.update(members or {})
    out["config.yaml"] = yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)),
                                        sort_keys=False, allow_unicode=True).encode()
    out["versions.json"] = (json.dumps(package_versions(), indent=2) + "\n").encode()
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in out.items())
    out["SHA256SUMS"] = sums.encode()

    identifiers = dict(identifiers_from_images(images_parquet)) if images_parquet is not None else {}
    identifiers.update(extra_identifiers or {})
    if check is not None:  # the release check covers the DICOM identifiers too, with everything else it finds
        check(out, identifiers)
    hits = [h for name, data in out.items() for h in scan_bytes(name, data, identifiers)]
    if hits:
        lines = "\n".join(f"  {m}: {i!r} ({s})" for m, i, s in hits[:50])
        raise IdentifierFound(f"{len(hits)} DICOM identifier occurrence(s) in the archive; not written:\n{lines}")
    with atomic_path(out_path, ".tar.gz") as tmp:
        with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            for name, data in out.items():
                _add(tar, name, data, root)
    if sums_path is not None:
        with atomic_path(sums_path) as tmp:
            tmp.write_bytes(out["SHA256SUMS"])
    summary = {"members": len(out), "bytes": Path(out_path).stat().st_size,
               "identifiers_scanned": len(identifiers)}
    log.info("archive %s: %s", out_path, summary)
    return summary

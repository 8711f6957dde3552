"""The release check of a publication archive: nothing that identifies a participant may be in any member.

`cohort_needles` collects what must not leave the institution from the cohort's own tables:

* subject ids (subjects, images and quarantine tables; image uids are `subject/region`), matched as whole tokens
  of letters, digits, `_` and `-` (also inside a file name such as `S00006_chest.nii.gz`);
* exact dates: every value of the cohort's date columns, found written as 2015-05-27, 2015_05_27, 2015/05/27,
  2015.05.27 or 20150527 (a month such as 2015-05 is not exact; dates the config publishes itself, the declared
  bounds of a date attribute, are left out);
* file paths: the `image` and `path` values of images.parquet and the quarantine tables, and their file names,
  found as a path or the end of a longer path;
* DICOM identifiers: the header values of `archive.identifiers_from_images` (the existing scan);
* cells below k: an integer below k (above 0) in a count column (`COUNT_COLUMNS`) of a Parquet member or of an
  HTML table of the report.

Every member is searched as the archive's identifier scan does (`archive.member_texts`: raw text, Parquet cells
and metadata, PNG text chunks, the report's data-URI images); binary members only in their decoded forms.
`release_problems` returns (member, reason, value) for each hit; `check_release` raises `ReleaseCheckFailed`
naming them.
"""

from __future__ import annotations

import html
import io
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterable, Mapping

import polars as pl
import pyarrow.parquet as pq

from cohortlens.report.archive import member_texts, scan_bytes
from cohortlens.report.publication import DATE_PATTERN
from cohortlens.types import PathLike

# columns (Parquet) and table headers (HTML) that hold numbers of participants or images
COUNT_COLUMNS = frozenset({"n", "count", "images", "subjects", "n_images", "n_subjects", "n_set", "n_inside",
                           "n_outside", "participants", "size"})
MIN_PATH_LENGTH = 6  # shorter file names (e.g. "a.png") are too generic to search for
_TOKEN = re.compile(rb"[A-Za-z0-9_\-]+")
_PATHISH = re.compile(rb"[A-Za-z0-9_.\-/\\~:]+")
_COMPACT = re.compile(rb"(?<![\d.])\d{8}(?![\d.])")
_DATA_URI = re.compile(rb"data:[a-z]+/[a-z0-9.+\-]+;base64,[A-Za-z0-9+/=]+")


class ReleaseCheckFailed(RuntimeError):
    """A member of a publication archive holds participant-level data."""


@dataclass
class Needles:
    """What must not be in a publication (see the module docstring)."""

    subject_ids: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)  # ISO yyyy-mm-dd
    paths: set[str] = field(default_factory=set)
    identifiers: dict[str, str] = field(default_factory=dict)  # DICOM value -> 'Keyword (file)'
    min_cell: int = 10


def _iso_dates(frame: pl.DataFrame) -> set[str]:
    out: set[str] = set()
    for name, dtype in frame.schema.items():
        if dtype == pl.Date or isinstance(dtype, pl.Datetime):
            out.update(d.isoformat() for d in frame[name].cast(pl.Date).drop_nulls().unique().to_list())
    return out


def cohort_needles(subjects: pl.DataFrame, images: pl.DataFrame, quarantines: Iterable[pl.DataFrame] = (), *,
                   identifiers: Mapping[str, str] | None = None, min_cell: int = 10,
                   public_dates: Iterable[str] = ()) -> Needles:
    """The needles of a cohort from its tables (subjects.parquet, images.parquet, the quarantine tables)."""
    frames = [subjects, images, *quarantines]
    ids: set[str] = set()
    for f in frames:
        if "subject_id" in f.columns:
            ids.update(str(v) for v in f["subject_id"].drop_nulls().unique().to_list())
    dates = set().union(*(_iso_dates(f) for f in frames)) - {str(d) for d in public_dates}
    paths: set[str] = set()
    for f in frames:
        for c in ("image", "path"):
            if c in f.columns and f[c].dtype == pl.Utf8:
                for p in f[c].drop_nulls().unique().to_list():
                    p = p.replace("\\", "/").rstrip("/")
                    paths.update(s for s in (p, PurePosixPath(p).name) if len(s) >= MIN_PATH_LENGTH)
    return Needles(ids, dates, paths, dict(identifiers or {}), int(min_cell))


def public_dates(config: Mapping) -> set[str]:
    """The dates a config publishes itself: min / max of its date attributes."""
    out = set()
    for spec in (config.get("attributes") or {}).values():
        if isinstance(spec, Mapping) and spec.get("type") == "date":
            out.update(str(spec[k]) for k in ("min", "max") if spec.get(k) is not None)
    return out


# -------------------------------------------------------------------------------------------- searching

def _searchable(name: str, data: bytes) -> list[bytes]:
    """The texts of a member to search: decoded forms (and the raw bytes of a text member), with data-URI
    blobs cut out of the raw text (their decoded forms are searched instead) and JSON's escaped slashes undone."""
    texts = member_texts(name, data)
    binary = name.lower().endswith((".parquet", ".png", ".gz", ".npy", ".pt"))
    out = []
    for i, t in enumerate(texts):
        if i == 0 and binary:
            continue
        if t.startswith(b"\x89PNG"):
            continue  # an inlined image's pixels; its text chunks follow as a text of their own
        out.append(_DATA_URI.sub(b"data:", t).replace(b"\\/", b"/"))
    return out


def _find_ids(text: bytes, ids: set[str]) -> set[str]:
    hits = set()
    for m in _TOKEN.finditer(text):
        token = m.group(0).decode()
        if "_" in token or "-" in token:  # an id inside a name such as S00006_chest or site-S00006
            parts = re.split(r"[_\-]", token)
            spans = [(i, j) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
            found = {s.join(parts[i:j]) for s in "_-" for i, j in spans} & ids
        elif token in ids:
            found = {token}
        else:
            continue
        if found and token.isdigit():  # a numeric id counts only as a number of its own, not in a decimal
            before, after = text[m.start() - 1:m.start()], text[m.end():m.end() + 1]
            if b"." in (before, after):
                continue
        hits |= found
    return hits


def _find_dates(text: bytes, dates: set[str]) -> set[str]:
    hits = set()
    for m in DATE_PATTERN.finditer(text.decode("utf-8", "replace")):
        iso = f"{m.group(1)}-{m.group(3)}-{m.group(4)}"
        if iso in dates:
            hits.add(m.group(0))
    return hits


def _find_paths(text: bytes, paths: set[str]) -> set[str]:
    hits = set()
    for m in _PATHISH.finditer(text):
        token = m.group(0).decode("utf-8", "replace").replace("\\", "/")
        pieces = token.split("/")
        for i in range(len(pieces)):
            tail = "/".join(pieces[i:])
            if tail in paths:
                hits.add(tail)
                break
    return hits


def _parquet_small_cells(data: bytes, k: int) -> list[str]:
    table = pq.read_table(io.BytesIO(data))
    frame = pl.from_arrow(table)
    out = []
    for c in frame.columns:
        if c.lower() in COUNT_COLUMNS and frame.schema[c].is_integer():
            rows = frame.with_row_index("_row").filter((pl.col(c) > 0) & (pl.col(c) < k))
            out += [f"column {c}, row {r}: {v}" for r, v in rows.select("_row", c).iter_rows()]
    return out


_TABLE = re.compile(r"<table[^>]*>(.*?)</table>", re.S)
_ROW = re.compile(r"<tr[^>]*>(.*?)</tr>", re.S)
_CELL = re.compile(r"<t([hd])[^>]*>(.*?)</t[hd]>", re.S)


def html_small_cells(page: str, k: int) -> list[str]:
    """Integers below k (above 0) in the count columns (COUNT_COLUMNS headers) of the page's tables."""
    out = []
    for t_index, t in enumerate(_TABLE.finditer(page)):
        header: list[str] = []
        for row in _ROW.finditer(t.group(1)):
            cells = [(kind, html.unescape(re.sub(r"<[^>]+>", "", text)).strip()) for kind, text in _CELL.findall(row.group(1))]
            if cells and all(kind == "h" for kind, _ in cells):
                header = [text.lower() for _, text in cells]
                continue
            for col, (_, text) in zip(header, cells):
                if col in COUNT_COLUMNS and text.isdigit() and 0 < int(text) < k:
                    out.append(f"table {t_index + 1}, column {col}: {text}")
    return out


def release_problems(members: Mapping[str, bytes], needles: Needles) -> list[tuple[str, str, str]]:
    """(member, reason, value) for everything a publication must not hold (empty = clean)."""
    problems = []
    for name, data in members.items():
        texts = [name.encode(), *_searchable(name, data)]  # a member's name may carry an id or a date too
        for reason, found in (("subject id", lambda t: _find_ids(t, needles.subject_ids)),
                              ("exact date", lambda t: _find_dates(t, needles.dates)),
                              ("file path", lambda t: _find_paths(t, needles.paths))):
            values = set().union(*(found(t) for t in texts))
            problems += [(name, reason, v) for v in sorted(values)]
        if needles.identifiers:
            problems += [(m, f"DICOM identifier ({src})", i) for m, i, src in scan_bytes(name, data, needles.identifiers)]
        low = name.lower()
        if low.endswith(".parquet"):
            problems += [(name, f"cell below k={needles.min_cell}", c) for c in _parquet_small_cells(data, needles.min_cell)]
        elif low.endswith((".html", ".htm")):
            problems += [(name, f"cell below k={needles.min_cell}", c)
                         for c in html_small_cells(data.decode("utf-8", "replace"), needles.min_cell)]
    return problems


def format_problems(problems: list[tuple[str, str, str]], limit: int = 50) -> str:
    lines = "\n".join(f"  {m}: {reason}: {v!r}" for m, reason, v in problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} problem(s) in the publication archive; not written:\n{lines}{more}"


def check_release(members: Mapping[str, bytes], needles: Needles) -> None:
    """Raise ReleaseCheckFailed naming each member and reason, if anything is found."""
    problems = release_problems(members, needles)
    if problems:
        raise ReleaseCheckFailed(format_problems(problems))


def check_archive(archive: PathLike, needles: Needles) -> list[tuple[str, str, str]]:
    """release_problems of every regular member of a written .tar.gz."""
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return release_problems(members, needles)

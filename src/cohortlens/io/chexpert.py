"""Convert CheXpert's ``train.csv`` / ``valid.csv`` into a cohortlens manifest.

The manifest keeps one row per image. CheXpert has several views per study
and several studies per patient, so ``(subject_id, region)`` repeats; the
``image_id`` column (``patient00001/study1/view1_frontal``) is what keeps
rows unique.

Nothing is dropped silently: every data row either lands in the manifest or
is listed in ``skipped`` with its 1-based line number in the source file
(the header is line 1), so ``rows_in == rows_out + len(skipped)`` always.

Labels (docs/chexpert.md): a -1 ("uncertain") follows ``uncertain`` (keep, or
the paper's U-Ones = positive / U-Zeros = negative); a blank ("not mentioned")
follows ``blank`` (null, or negative: the usual evaluation convention). Two
columns are derived: ``view`` (frontal/lateral, also the region) and
``finding`` (any of the 12 pathologies positive vs the labeller's
``No Finding``), a binary target where ``No Finding`` itself is only 1 or blank.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import tempfile
from pathlib import Path

import polars as pl

__all__ = [
    "BLANK_POLICIES",
    "CHEXPERT_FINDINGS",
    "COMPETITION_COLUMNS",
    "COMPETITION_FINDINGS",
    "FINDING_COLUMNS",
    "PATHOLOGIES",
    "UNCERTAIN_POLICIES",
    "chexpert_to_manifest",
    "finding_column",
]

CHEXPERT_FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)


def finding_column(name: str) -> str:
    """Manifest column name for a CheXpert observation ("Pleural Effusion" -> "pleural_effusion")."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


FINDING_COLUMNS: tuple[str, ...] = tuple(finding_column(f) for f in CHEXPERT_FINDINGS)

# What the derived `finding` attribute counts: every observation except "No Finding" itself and
# "Support Devices" (a device, not a pathology; CheXpert's labeller sets No Finding next to it).
PATHOLOGIES: tuple[str, ...] = tuple(f for f in CHEXPERT_FINDINGS if f not in ("No Finding", "Support Devices"))
_PATHOLOGY_COLUMNS = tuple(finding_column(f) for f in PATHOLOGIES)

# The five observations of the CheXpert competition (Irvin et al. 2019); their mean ROC AUC is the
# competition's score (analysis.chexpert_auc).
COMPETITION_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion",
)
COMPETITION_COLUMNS: tuple[str, ...] = tuple(finding_column(f) for f in COMPETITION_FINDINGS)

# keep = leave the label as CheXpert's labeller reported it; positive/negative
# are the U-Ones / U-Zeros policies from the CheXpert paper.
UNCERTAIN_POLICIES: dict[str, str] = {
    "keep": "uncertain",
    "positive": "positive",
    "negative": "negative",
}

# null = a blank ("not mentioned") stays unknown; negative = blank counts as absent, the convention of
# CheXpert evaluations on train.csv (valid.csv, labelled by radiologists, has no blanks).
BLANK_POLICIES: dict[str, str | None] = {
    "null": None,
    "negative": "negative",
}

_REQUIRED_COLUMNS: tuple[str, ...] = (
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
    *CHEXPERT_FINDINGS,
)

# Any prefix is allowed before patientNNNNN/ because users may have the full
# or the "-small" release, train or valid, possibly re-rooted. Control
# characters (e.g. a newline inside a quoted field) never belong in a path.
_PATH_RE = re.compile(
    r"^/?(?:[^/\x00-\x1f]+/)*(?P<patient>patient\d+)/(?P<study>study\d+)/"
    r"(?P<stem>[^/\x00-\x1f]+)\.[A-Za-z0-9]+\Z"
)

_SEX = {"male": "M", "female": "F", "unknown": None, "": None}
_VIEW = {"frontal": "frontal", "lateral": "lateral"}
_PROJECTIONS = {"AP", "PA", "LL", "RL"}

_SUFFIXES = (".csv", ".tsv", ".parquet")

_UTF8_BOM = b"\xef\xbb\xbf"

_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Utf8,
    "image": pl.Utf8,
    "region": pl.Utf8,
    "image_id": pl.Utf8,
    "study": pl.Utf8,
    "sex": pl.Utf8,
    "age": pl.Int64,
    "view": pl.Utf8,
    "projection": pl.Utf8,
    **{c: pl.Utf8 for c in FINDING_COLUMNS},
    "finding": pl.Utf8,
}


class _Malformed(Exception):
    """A row that cannot be converted; the message is the reason reported."""


def _read_text(csv_path: Path) -> str:
    data = csv_path.read_bytes()
    # Excel-saved CSVs carry a BOM; it would otherwise glue onto "Path".
    start = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        raise ValueError(
            f"{csv_path}: not valid UTF-8 at byte offset {offset} "
            f"(byte 0x{data[offset]:02x})"
        ) from None


def _finding(raw: str, column: str, uncertain_label: str, blank_label: str | None) -> str | None:
    if raw == "":
        return blank_label  # "not mentioned" in the report: null unless blank = negative
    try:
        value = float(raw)
    except ValueError:
        raise _Malformed(f"{column}: value {raw!r} not in {{1, 0, -1, blank}}") from None
    if value == 1.0:
        return "positive"
    if value == 0.0:
        return "negative"
    if value == -1.0:
        return uncertain_label
    raise _Malformed(f"{column}: value {raw!r} not in {{1, 0, -1, blank}}")


def _age(raw: str) -> int | None:
    if raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _Malformed(f"Age: {raw!r} is not a number") from None
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise _Malformed(f"Age: {raw!r} is not a non-negative integer")
    # CheXpert uses 0 as a placeholder for an unrecorded age.
    return int(value) or None


def _any_finding(row: dict[str, object]) -> str | None:
    """positive: a pathology is positive (after the uncertain policy); negative: the labeller's No Finding is
    1; null: neither (e.g. only uncertain labels under keep) or both (contradictory labels)."""
    positive = any(row[c] == "positive" for c in _PATHOLOGY_COLUMNS)
    nothing = row["no_finding"] == "positive"
    if positive == nothing:
        return None
    return "positive" if positive else "negative"


def _convert_row(fields: dict[str, str], uncertain_label: str, blank_label: str | None) -> dict[str, object]:
    path = fields["Path"]
    if path == "":
        raise _Malformed("missing Path")
    match = _PATH_RE.match(path)
    if match is None:
        raise _Malformed(f"Path {path!r} does not match .../patientNNNNN/studyN/<image>")

    view_raw = fields["Frontal/Lateral"]
    region = _VIEW.get(view_raw.lower())
    if region is None:
        raise _Malformed(f"Frontal/Lateral: unknown value {view_raw!r}")

    sex_raw = fields["Sex"]
    if sex_raw.lower() not in _SEX:
        raise _Malformed(f"Sex: unknown value {sex_raw!r}")

    # Lateral rows have no AP/PA in CheXpert: a blank is null, never an error.
    projection = fields["AP/PA"].upper() or None
    if projection is not None and projection not in _PROJECTIONS:
        raise _Malformed(f"AP/PA: unknown value {fields['AP/PA']!r}")

    row: dict[str, object] = {
        "subject_id": match["patient"],
        "image": path,
        "region": region,
        "image_id": f"{match['patient']}/{match['study']}/{match['stem']}",
        "study": match["study"],
        "sex": _SEX[sex_raw.lower()],
        "age": _age(fields["Age"]),
        "view": region,
        "projection": projection,
    }
    for finding, column in zip(CHEXPERT_FINDINGS, FINDING_COLUMNS):
        row[column] = _finding(fields[finding], finding, uncertain_label, blank_label)
    row["finding"] = _any_finding(row)
    return row


def _write_atomic(frame: pl.DataFrame, out_path: Path, suffix: str) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace is a rename on one filesystem; a crash
    # mid-write never leaves a truncated manifest for Snakemake to pick up.
    fd, tmp_name = tempfile.mkstemp(
        dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp"
    )
    os.close(fd)
    try:
        if suffix == ".csv":
            frame.write_csv(tmp_name)
        elif suffix == ".tsv":
            frame.write_csv(tmp_name, separator="\t")
        else:
            frame.write_parquet(tmp_name)
        os.replace(tmp_name, out_path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def chexpert_to_manifest(
    csv_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    uncertain: str = "keep",
    blank: str = "null",
) -> dict:
    """Convert a CheXpert label CSV into a cohortlens manifest.

    ``uncertain`` decides what a -1 label becomes: ``"keep"`` -> ``"uncertain"``,
    ``"positive"`` (U-Ones) or ``"negative"`` (U-Zeros). ``blank`` decides what
    a blank label becomes: ``"null"`` (unknown) or ``"negative"``.

    Returns ``{"rows_in", "rows_out", "skipped"}`` where ``skipped`` is a list
    of ``(line_number, reason)``. Raises ``ValueError`` for a bad policy or
    output suffix, a missing required column, undecodable bytes or broken CSV
    quoting, since those mean the file as a whole is not CheXpert-shaped.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(
            f"uncertain must be one of {sorted(UNCERTAIN_POLICIES)}, got {uncertain!r}"
        )
    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank must be one of {sorted(BLANK_POLICIES)}, got {blank!r}")
    uncertain_label = UNCERTAIN_POLICIES[uncertain]
    blank_label = BLANK_POLICIES[blank]
    csv_path = Path(csv_path)
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    # Checked before reading so a typo does not cost a full pass over train.csv.
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"{out_path}: output must end in one of {', '.join(_SUFFIXES)}"
        )

    text = _read_text(csv_path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{csv_path}: file is empty, expected a CheXpert header")
        header = [h.strip() for h in header]
        missing = [c for c in _REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{csv_path}: missing required column(s) "
                + ", ".join(repr(c) for c in missing)
            )
        index = {name: i for i, name in enumerate(header)}

        rows: list[dict[str, object]] = []
        skipped: list[tuple[int, str]] = []
        first_seen: dict[str, int] = {}
        rows_in = 0
        end_line = reader.line_num
        for record in reader:
            # A quoted field may span lines; report where the record starts.
            line = end_line + 1
            end_line = reader.line_num
            if not record:
                continue  # blank line: not a data row, as in pandas/polars
            rows_in += 1
            if len(record) != len(header):
                skipped.append(
                    (line, f"expected {len(header)} fields, got {len(record)}")
                )
                continue
            fields = {name: record[index[name]].strip() for name in _REQUIRED_COLUMNS}
            try:
                row = _convert_row(fields, uncertain_label, blank_label)
                image_id = str(row["image_id"])
                if image_id in first_seen:
                    raise _Malformed(
                        f"duplicate image {image_id!r} (first on line {first_seen[image_id]})"
                    )
            except _Malformed as exc:
                skipped.append((line, str(exc)))
                continue
            first_seen[image_id] = line
            rows.append(row)
    except csv.Error as exc:
        raise ValueError(f"{csv_path}: line {reader.line_num}: malformed CSV: {exc}") from None

    frame = pl.DataFrame(rows, schema=_SCHEMA)
    _write_atomic(frame, out_path, suffix)
    return {"rows_in": rows_in, "rows_out": frame.height, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m cohortlens.io.chexpert",
        description="Convert CheXpert train.csv/valid.csv into a cohortlens manifest.",
    )
    parser.add_argument("csv_path", help="CheXpert train.csv or valid.csv")
    parser.add_argument("out_path", help="manifest to write (.csv, .tsv or .parquet)")
    parser.add_argument(
        "--uncertain",
        choices=sorted(UNCERTAIN_POLICIES),
        default="keep",
        help="what -1 labels become: keep (uncertain), positive (U-Ones), negative (U-Zeros)",
    )
    parser.add_argument(
        "--blank",
        choices=sorted(BLANK_POLICIES),
        default="null",
        help="what blank labels become: null (unknown) or negative (blank = absent, for evaluation)",
    )
    args = parser.parse_args(argv)
    try:
        result = chexpert_to_manifest(
            args.csv_path, args.out_path, uncertain=args.uncertain, blank=args.blank
        )
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{args.out_path}: {result['rows_out']} of {result['rows_in']} rows written")
    for line, reason in result["skipped"]:
        print(f"  skipped line {line}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

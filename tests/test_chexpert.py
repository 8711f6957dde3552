"""Tests for the CheXpert -> cohortlens manifest converter."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from cohortlens.io.chexpert import (
    CHEXPERT_FINDINGS,
    FINDING_COLUMNS,
    chexpert_to_manifest,
    main,
)

REPO = Path(__file__).resolve().parents[1]

HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,"
    "Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,"
    "Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices"
)
PREFIX = "CheXpert-v1.0-small/train/"


def row(path, sex, age, view, proj, **findings):
    """One CSV line; findings by manifest column name, all others blank."""
    unknown = set(findings) - set(FINDING_COLUMNS)
    assert not unknown, unknown
    values = [findings.get(c, "") for c in FINDING_COLUMNS]
    return ",".join([path, sex, age, view, proj, *values])


# Line numbers in the comments are the 1-based CSV lines (header is line 1).
ROWS = [
    # 2: patient 1, study 1, frontal AP
    row(PREFIX + "patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP",
        no_finding="", cardiomegaly="1.0", edema="-1.0", support_devices="1.0"),
    # 3: same study, lateral (AP/PA blank as in CheXpert)
    row(PREFIX + "patient00001/study1/view2_lateral.jpg", "Female", "68", "Lateral", "",
        cardiomegaly="1.0", edema="-1.0", support_devices="1.0"),
    # 4: second study of patient 1, frontal PA
    row(PREFIX + "patient00001/study2/view1_frontal.jpg", "Female", "69", "Frontal", "PA",
        no_finding="1.0", cardiomegaly="0.0", pleural_effusion="-1.0"),
    # 5: male, several uncertain labels
    row(PREFIX + "patient00002/study1/view1_frontal.jpg", "Male", "87", "Frontal", "AP",
        lung_opacity="-1.0", atelectasis="-1.0", pneumonia="0.0", fracture="1.0"),
    # 6: lateral with LL projection
    row(PREFIX + "patient00002/study1/view2_lateral.jpg", "Male", "87", "Lateral", "LL",
        lung_opacity="-1.0"),
    # 7: Unknown sex, age 0 (CheXpert's placeholder)
    row(PREFIX + "patient00003/study1/view1_frontal.jpg", "Unknown", "0", "Frontal", "PA",
        no_finding="1.0"),
    # 8: missing age, every finding explicitly negative
    row(PREFIX + "patient00004/study1/view1_frontal.jpg", "Male", "", "Frontal", "AP",
        **{c: "0.0" for c in FINDING_COLUMNS}),
    # 9: lateral RL
    row(PREFIX + "patient00005/study1/view1_lateral.jpg", "Female", "41", "Lateral", "RL",
        enlarged_cardiomediastinum="-1.0", lung_lesion="1.0", pleural_other="0.0"),
    # 10: malformed - missing Path
    row("", "Male", "50", "Frontal", "AP", edema="1.0"),
    # 11: malformed - Path without patientNNNNN/studyN
    row(PREFIX + "p00006/s1/view1_frontal.jpg", "Male", "50", "Frontal", "AP"),
    # 12: malformed - unknown Frontal/Lateral value
    row(PREFIX + "patient00007/study1/view1_frontal.jpg", "Male", "50", "Oblique", "AP"),
    # 13: malformed - finding value outside {1, 0, -1, blank}
    row(PREFIX + "patient00008/study1/view1_frontal.jpg", "Male", "50", "Frontal", "AP",
        pneumothorax="2.0"),
    # 14: valid split, integer-formatted labels
    row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Male", "73",
        "Frontal", "AP", no_finding="0", consolidation="1", pneumothorax="-1"),
]

GOOD_LINES = [2, 3, 4, 5, 6, 7, 8, 9, 14]
BAD_LINES = {10: "Path", 11: "Path", 12: "Frontal/Lateral", 13: "Pneumothorax"}


def write_csv(tmp_path: Path, rows=ROWS, header=HEADER, name="train.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def source(tmp_path):
    return write_csv(tmp_path)


def convert(source: Path, tmp_path: Path, suffix=".parquet", **kw):
    out = tmp_path / f"manifest{suffix}"
    result = chexpert_to_manifest(source, out, **kw)
    return result, pl.read_parquet(out) if suffix == ".parquet" else out


def by_image_id(df: pl.DataFrame) -> dict[str, dict]:
    return {r["image_id"]: r for r in df.iter_rows(named=True)}


# --- constants ---------------------------------------------------------------


def test_findings_match_chexpert_header():
    assert len(CHEXPERT_FINDINGS) == 14
    assert CHEXPERT_FINDINGS == tuple(HEADER.split(",")[5:])
    assert FINDING_COLUMNS[0] == "no_finding"
    assert FINDING_COLUMNS[1] == "enlarged_cardiomediastinum"
    assert FINDING_COLUMNS[-1] == "support_devices"
    assert all(c.replace("_", "").isalpha() and c.islower() for c in FINDING_COLUMNS)


# --- mapping -----------------------------------------------------------------


def test_columns_and_types(source, tmp_path):
    _, df = convert(source, tmp_path)
    assert df.columns[:3] == ["subject_id", "image", "region"]
    assert set(df.columns) == {
        "subject_id", "image", "region", "image_id", "study", "sex", "age", "view", "projection",
        *FINDING_COLUMNS, "finding",
    }
    assert df.schema["age"] == pl.Int64
    for c in ("subject_id", "image", "region", "image_id", "study", "sex", "view", "projection",
              *FINDING_COLUMNS, "finding"):
        assert df.schema[c] == pl.Utf8, c


def test_identifiers_and_views(source, tmp_path):
    _, df = convert(source, tmp_path)
    rows = by_image_id(df)
    assert list(df["image_id"]) == [
        "patient00001/study1/view1_frontal",
        "patient00001/study1/view2_lateral",
        "patient00001/study2/view1_frontal",
        "patient00002/study1/view1_frontal",
        "patient00002/study1/view2_lateral",
        "patient00003/study1/view1_frontal",
        "patient00004/study1/view1_frontal",
        "patient00005/study1/view1_lateral",
        "patient64541/study1/view1_frontal",
    ]
    assert df["image_id"].is_unique().all()

    r = rows["patient00001/study2/view1_frontal"]
    assert r["subject_id"] == "patient00001"
    assert r["study"] == "study2"
    # Path is kept verbatim and relative: the image root lives in the config.
    assert r["image"] == PREFIX + "patient00001/study2/view1_frontal.jpg"
    assert rows["patient64541/study1/view1_frontal"]["image"] == (
        "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"
    )
    assert {r["region"] for r in rows.values()} == {"frontal", "lateral"}
    assert rows["patient00001/study1/view2_lateral"]["region"] == "lateral"
    assert rows["patient00005/study1/view1_lateral"]["region"] == "lateral"
    assert rows["patient00002/study1/view1_frontal"]["region"] == "frontal"


def test_absolute_and_rerooted_paths_are_kept_verbatim(tmp_path):
    paths = [
        "/data/CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg",
        "My Scans/patient00002/study3/view2_lateral.png",
        "patient00003/study1/view1_frontal.jpg",
    ]
    source = write_csv(tmp_path, rows=[row(p, "Male", "50", "Frontal", "AP") for p in paths])
    result, df = convert(source, tmp_path)
    assert result["skipped"] == []
    assert df["image"].to_list() == paths
    assert df["image_id"].to_list() == [
        "patient00001/study1/view1_frontal",
        "patient00002/study3/view2_lateral",
        "patient00003/study1/view1_frontal",
    ]


def test_subject_region_pairs_may_repeat(source, tmp_path):
    _, df = convert(source, tmp_path)
    p1 = df.filter(pl.col("subject_id") == "patient00001")
    assert p1.height == 3
    assert sorted(p1["study"].unique()) == ["study1", "study2"]
    assert p1.filter(pl.col("region") == "frontal").height == 2


def test_sex_age_projection(source, tmp_path):
    _, df = convert(source, tmp_path)
    rows = by_image_id(df)
    p = "patient0000{}/study1/view1_{}"
    assert rows[p.format(1, "frontal")]["sex"] == "F"
    assert rows[p.format(2, "frontal")]["sex"] == "M"
    assert rows[p.format(3, "frontal")]["sex"] is None  # Unknown

    assert rows[p.format(1, "frontal")]["age"] == 68
    assert rows["patient00001/study2/view1_frontal"]["age"] == 69
    assert rows[p.format(3, "frontal")]["age"] is None  # 0
    assert rows[p.format(4, "frontal")]["age"] is None  # blank

    assert rows[p.format(1, "frontal")]["projection"] == "AP"
    assert rows["patient00001/study2/view1_frontal"]["projection"] == "PA"
    assert rows["patient00002/study1/view2_lateral"]["projection"] == "LL"
    assert rows[p.format(5, "lateral")]["projection"] == "RL"
    assert rows["patient00001/study1/view2_lateral"]["projection"] is None


def test_findings_keep(source, tmp_path):
    _, df = convert(source, tmp_path, uncertain="keep")
    rows = by_image_id(df)
    r = rows["patient00001/study1/view1_frontal"]
    assert r["cardiomegaly"] == "positive"
    assert r["edema"] == "uncertain"
    assert r["support_devices"] == "positive"
    assert r["no_finding"] is None  # blank = not mentioned, not negative
    assert r["pneumonia"] is None

    assert all(rows["patient00004/study1/view1_frontal"][c] == "negative" for c in FINDING_COLUMNS)

    r = rows["patient00005/study1/view1_lateral"]
    assert (r["enlarged_cardiomediastinum"], r["lung_lesion"], r["pleural_other"]) == (
        "uncertain", "positive", "negative",
    )
    # "1"/"0"/"-1" without decimals are accepted too.
    r = rows["patient64541/study1/view1_frontal"]
    assert (r["no_finding"], r["consolidation"], r["pneumothorax"]) == (
        "negative", "positive", "uncertain",
    )
    values = set()
    for c in FINDING_COLUMNS:
        values |= set(df[c].drop_nulls())
    assert values == {"positive", "negative", "uncertain"}


@pytest.mark.parametrize("policy", ["positive", "negative"])
def test_findings_uncertain_policies(source, tmp_path, policy):
    _, kept = convert(source, tmp_path, uncertain="keep")
    _, df = convert(source, tmp_path, uncertain=policy)
    for c in FINDING_COLUMNS:
        assert "uncertain" not in set(df[c].drop_nulls()), c
        expected = kept[c].replace("uncertain", policy)
        assert df[c].to_list() == expected.to_list(), c
    r = by_image_id(df)["patient00002/study1/view1_frontal"]
    assert r["lung_opacity"] == r["atelectasis"] == policy
    assert r["pneumonia"] == "negative" and r["fracture"] == "positive"


def test_bad_uncertain_policy(source, tmp_path):
    with pytest.raises(ValueError, match="uncertain"):
        chexpert_to_manifest(source, tmp_path / "m.csv", uncertain="U-Ones")
    assert not (tmp_path / "m.csv").exists()


# --- row accounting ----------------------------------------------------------


def test_row_accounting(source, tmp_path):
    result, df = convert(source, tmp_path)
    assert set(result) == {"rows_in", "rows_out", "skipped"}
    assert result["rows_in"] == len(ROWS) == 13
    assert result["rows_out"] == df.height == len(GOOD_LINES)
    assert result["rows_in"] == result["rows_out"] + len(result["skipped"])
    skipped = dict(result["skipped"])
    assert sorted(skipped) == sorted(BAD_LINES)
    for line, field in BAD_LINES.items():
        assert field in skipped[line], (line, skipped[line])
    assert "missing Path" in skipped[10]
    assert "patientNNNNN/studyN" in skipped[11]
    assert "Oblique" in skipped[12]
    assert "2.0" in skipped[13]
    assert all(isinstance(line, int) and isinstance(reason, str)
               for line, reason in result["skipped"])


@pytest.mark.parametrize(
    "bad, expected",
    [
        (row(PREFIX + "patient00009/study1/view1_frontal.jpg", "Male", "50", "Frontal", "AP",
             edema="yes"), "Edema"),
        (row(PREFIX + "patient00009/study1/view1_frontal.jpg", "Male", "50", "Frontal", "AP",
             edema="0.5"), "Edema"),
        (row(PREFIX + "patient00009/study1/view1_frontal.jpg", "Male", "50", "Frontal", "AP",
             edema="nan"), "Edema"),
        (row(PREFIX + "patient00009/study1/view1_frontal.jpg", "Other", "50", "Frontal", "AP"),
         "Sex"),
        (row(PREFIX + "patient00009/study1/view1_frontal.jpg", "Male", "fifty", "Frontal", "AP"),
         "Age"),
        (row(PREFIX + "patient00009/study1/view1_frontal.jpg", "Male", "-3", "Frontal", "AP"),
         "Age"),
        (row(PREFIX + "patient00009/study1/view1_frontal.jpg", "Male", "50", "Frontal", "XX"),
         "AP/PA"),
        (row(PREFIX + "patient00009/study1", "Male", "50", "Frontal", "AP"), "Path"),
        (row(PREFIX + "patient00009/study1/view1_frontal.jpg", "Male", "50", "", "AP"),
         "Frontal/Lateral"),
        (PREFIX + "patient00009/study1/view1_frontal.jpg,Male,50,Frontal", "fields"),
        # Same image twice would break image_id uniqueness.
        (ROWS[0], "duplicate"),
    ],
)
def test_other_malformed_rows_are_reported(tmp_path, bad, expected):
    source = write_csv(tmp_path, rows=[ROWS[0], bad])
    result, df = convert(source, tmp_path)
    assert result["rows_in"] == 2
    assert result["rows_out"] == df.height == 1
    assert len(result["skipped"]) == 1
    line, reason = result["skipped"][0]
    assert line == 3
    assert expected in reason


def test_line_numbers_follow_multiline_records_and_blank_lines(tmp_path):
    # A quoted Path with an embedded newline occupies lines 2-3; a blank
    # line (4) is not a data row; the malformed row is on line 5.
    quoted = '"' + PREFIX + 'patient00001/study1/\nview1_frontal.jpg"' + ROWS[0][ROWS[0].index(","):]
    bad = row("", "Male", "50", "Frontal", "AP")
    source = write_csv(tmp_path, rows=[quoted, "", bad])
    result, df = convert(source, tmp_path)
    assert result["rows_in"] == 2
    assert result["rows_out"] == 0
    assert [line for line, _ in result["skipped"]] == [2, 5]
    assert df.height == 0
    assert df.columns[:3] == ["subject_id", "image", "region"]


def test_crlf_bom_and_padded_header(tmp_path):
    header = " " + HEADER.replace(",", " ,")
    body = "\r\n".join([header, *ROWS]) + "\r\n"
    source = tmp_path / "valid.csv"
    source.write_bytes(b"\xef\xbb\xbf" + body.encode())
    result, df = convert(source, tmp_path)
    assert result["rows_out"] == len(GOOD_LINES)
    assert sorted(line for line, _ in result["skipped"]) == sorted(BAD_LINES)
    assert not any(s.endswith("\r") for s in df["support_devices"].drop_nulls())


def test_extra_columns_and_reordered_header(tmp_path):
    cols = HEADER.split(",")
    order = [*reversed(cols), "Extra"]
    lines = [",".join(order)]
    for r in ROWS[:3]:
        values = dict(zip(cols, next(csv.reader([r]))))
        values["Extra"] = "x"
        lines.append(",".join(values[c] for c in order))
    source = write_csv(tmp_path, rows=lines[1:], header=lines[0])
    result, df = convert(source, tmp_path)
    assert result["rows_out"] == 3 and result["skipped"] == []
    assert "Extra" not in df.columns and "extra" not in df.columns
    r = by_image_id(df)["patient00001/study1/view1_frontal"]
    assert (r["sex"], r["age"], r["projection"], r["edema"]) == ("F", 68, "AP", "uncertain")


# --- output formats ----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_output_formats_round_trip(source, tmp_path, suffix):
    out = tmp_path / "out" / f"manifest{suffix}"
    result = chexpert_to_manifest(source, out)
    assert result["rows_out"] == len(GOOD_LINES)
    # Only the manifest itself is left behind: the temp file was renamed.
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    _, reference = convert(source, tmp_path)
    if suffix == ".parquet":
        df = pl.read_parquet(out)
    else:
        sep = "\t" if suffix == ".tsv" else ","
        text = out.read_text()
        assert text.splitlines()[0].split(sep)[:3] == ["subject_id", "image", "region"]
        df = pl.read_csv(out, separator=sep, schema=reference.schema)
    assert df.columns == reference.columns
    assert df.equals(reference, null_equal=True)
    assert df.filter(pl.col("age").is_null()).height == 2
    assert df.filter(pl.col("sex").is_null()).height == 1


def test_output_overwrites_existing_atomically(source, tmp_path):
    out = tmp_path / "manifest.csv"
    out.write_text("stale\n")
    chexpert_to_manifest(source, out)
    assert out.read_text().startswith("subject_id,image,region")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "train.csv"]


def test_failed_write_leaves_no_temp_and_keeps_old(source, tmp_path, monkeypatch):
    out = tmp_path / "manifest.parquet"
    out.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(OSError, match="disk full"):
        chexpert_to_manifest(source, out)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.parquet", "train.csv"]


def test_unknown_output_suffix(source, tmp_path):
    with pytest.raises(ValueError, match=r"\.csv, \.tsv, \.parquet"):
        chexpert_to_manifest(source, tmp_path / "manifest.json")
    assert not (tmp_path / "manifest.json").exists()


# --- whole-file errors -------------------------------------------------------


@pytest.mark.parametrize("column", ["Path", "Frontal/Lateral", "AP/PA", "Sex", "Age", "Fracture"])
def test_missing_column(tmp_path, column):
    header = ",".join(c for c in HEADER.split(",") if c != column)
    source = write_csv(tmp_path, rows=[], header=header)
    with pytest.raises(ValueError) as err:
        chexpert_to_manifest(source, tmp_path / "m.csv")
    assert str(source) in str(err.value)
    assert repr(column) in str(err.value)
    assert not (tmp_path / "m.csv").exists()


def test_empty_file(tmp_path):
    source = tmp_path / "train.csv"
    source.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        chexpert_to_manifest(source, tmp_path / "m.csv")


def test_header_only_writes_empty_manifest(tmp_path):
    source = write_csv(tmp_path, rows=[])
    result = chexpert_to_manifest(source, tmp_path / "m.parquet")
    assert result == {"rows_in": 0, "rows_out": 0, "skipped": []}
    df = pl.read_parquet(tmp_path / "m.parquet")
    assert df.height == 0 and "support_devices" in df.columns


def test_non_utf8(tmp_path):
    good = ("\n".join([HEADER, *ROWS[:2]]) + "\n").encode()
    # Latin-1 "é" in a path, as a mis-exported file would have.
    bad_line = ROWS[2].replace("patient00001", "patient00001\xe9", 1).encode("latin-1")
    source = tmp_path / "train.csv"
    source.write_bytes(good + bad_line + b"\n")
    offset = len(good) + bad_line.index(b"\xe9")
    with pytest.raises(ValueError) as err:
        chexpert_to_manifest(source, tmp_path / "m.csv")
    msg = str(err.value)
    assert str(source) in msg
    assert f"byte offset {offset}" in msg
    assert not (tmp_path / "m.csv").exists()


def test_non_utf8_offset_counts_bom(tmp_path):
    source = tmp_path / "train.csv"
    source.write_bytes(b"\xef\xbb\xbf" + HEADER.encode() + b"\n\xff\n")
    with pytest.raises(ValueError, match=f"byte offset {3 + len(HEADER) + 1}"):
        chexpert_to_manifest(source, tmp_path / "m.csv")


def test_broken_quoting(tmp_path):
    source = write_csv(tmp_path, rows=['"a"b,Male'])
    with pytest.raises(ValueError, match=r"train\.csv.*line 2"):
        chexpert_to_manifest(source, tmp_path / "m.csv")


# --- CLI and config ----------------------------------------------------------


def test_cli(source, tmp_path, capsys):
    out = tmp_path / "m.tsv"
    assert main([str(source), str(out), "--uncertain", "negative"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(GOOD_LINES)} of {len(ROWS)} rows written" in printed
    assert "skipped line 12" in printed
    df = pl.read_csv(out, separator="\t")
    assert "uncertain" not in set(df["edema"].drop_nulls())


def test_cli_error_exits_2(tmp_path, capsys):
    source = write_csv(tmp_path, rows=[], header="Path,Sex")
    with pytest.raises(SystemExit) as exc:
        main([str(source), str(tmp_path / "m.csv")])
    assert exc.value.code == 2
    assert "missing required column" in capsys.readouterr().err


def test_chexpert_config_is_valid_and_accepts_every_converted_row(source, tmp_path):
    """config/chexpert.yaml passes the config schema and the cohort stage quarantines no converted row
    for an attribute reason (missing image files aside: the test CSV has no pixels)."""
    from snakemake.utils import validate

    from cohortlens.cohort.build import build_cohort

    cfg = yaml.safe_load((REPO / "config" / "chexpert.yaml").read_text())
    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    attrs = cfg["attributes"]
    assert set(attrs) == {"sex", "age", "view", "projection", "finding", *FINDING_COLUMNS}
    assert cfg["regions"]["frontal"]["center_slices"] == 1
    _, df = convert(source, tmp_path)
    tables = build_cohort(tmp_path / "manifest.parquet", attributes=attrs, regions=list(cfg["regions"]), split=cfg["cohort"]["split"],
                          subjects_per_shard=4, image_root=str(tmp_path),
                          manifest_schema=str(REPO / "workflow" / "schemas" / "manifest.schema.yaml"))
    assert tables.n_manifest_rows == df.height
    assert set(tables.quarantine["reason"]) == {"missing file"}


# --- CheXpert as evaluated: policies, derived attributes, the competition AUC ------------------------------

# train.csv as the real file has it: its exact header, labels written 1.0 / 0.0 / -1.0 / blank, "Unknown" sex
# with age 0, laterals with a blank AP/PA, several studies per patient, No Finding only ever 1.0 or blank.
REAL_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
               "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
               "Pleural Effusion,Pleural Other,Fracture,Support Devices")
T = "CheXpert-v1.0-small/train/"
REAL_ROWS = [
    T + "patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
    T + "patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
    T + "patient00002/study1/view1_frontal.jpg,Female,83,Frontal,AP,,,,1.0,,,-1.0,,,,,,1.0,",
    T + "patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,-1.0,,,,,,1.0,",
    T + "patient00003/study1/view1_frontal.jpg,Male,41,Frontal,AP,,,,,,1.0,,,,0.0,,,,",
    T + "patient00004/study1/view1_frontal.jpg,Female,20,Frontal,PA,1.0,0.0,,,,,,,,,0.0,,,",
    T + "patient00004/study1/view2_lateral.jpg,Female,20,Lateral,,1.0,0.0,,,,,,,,,0.0,,,",
    T + "patient00005/study1/view1_frontal.jpg,Unknown,0,Frontal,AP,,,,,,,,,-1.0,,,,,",
    T + "patient00005/study2/view1_lateral.jpg,Unknown,0,Lateral,,,,0.0,,,,,,,,-1.0,,,1.0",
    T + "patient00006/study1/view1_frontal.jpg,Male,55,Frontal,PA,1.0,,1.0,,,,,,,,,,,",
    T + "patient00006/study1/view2_lateral.jpg,Male,55,Lateral,,,,,,,,,,,,,,,",
    T + "patient00007/study1/view1_frontal.jpg,Male,72,Frontal,AP,,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,",
]
# expected `finding` per image under each uncertain policy (the blank policy does not change it)
FINDING = {  # image_id: (keep, positive = U-Ones, negative = U-Zeros)
    "patient00001/study1/view1_frontal": ("negative",) * 3,  # No Finding 1.0 beside Support Devices 1.0
    "patient00002/study2/view1_frontal": ("positive",) * 3,
    "patient00002/study1/view1_frontal": ("positive",) * 3,
    "patient00002/study1/view2_lateral": ("positive",) * 3,
    "patient00003/study1/view1_frontal": ("positive",) * 3,
    "patient00004/study1/view1_frontal": ("negative",) * 3,
    "patient00004/study1/view2_lateral": ("negative",) * 3,
    "patient00005/study1/view1_frontal": (None, "positive", None),  # only Atelectasis -1.0
    "patient00005/study2/view1_lateral": (None, "positive", None),  # Pleural Effusion -1.0, Support Devices 1.0
    "patient00006/study1/view1_frontal": (None,) * 3,  # No Finding 1.0 and Cardiomegaly 1.0 contradict
    "patient00006/study1/view2_lateral": (None,) * 3,  # nothing labelled
    "patient00007/study1/view1_frontal": (None,) * 3,  # all negative, but No Finding blank
}
POLICY_INDEX = {"keep": 0, "positive": 1, "negative": 2}


@pytest.fixture
def real(tmp_path):
    assert all(len(r.split(",")) == len(REAL_HEADER.split(",")) == 19 for r in REAL_ROWS)
    return write_csv(tmp_path, rows=REAL_ROWS, header=REAL_HEADER)


def expected_label(raw: str, uncertain: str, blank: str) -> str | None:
    """The label policy written out independently of the converter."""
    return {"1.0": "positive", "0.0": "negative",
            "-1.0": {"keep": "uncertain", "positive": "positive", "negative": "negative"}[uncertain],
            "": {"null": None, "negative": "negative"}[blank]}[raw]


@pytest.mark.parametrize("blank", ["null", "negative"])
@pytest.mark.parametrize("uncertain", ["keep", "positive", "negative"])
def test_real_file_labels_follow_the_uncertain_and_blank_policies(real, tmp_path, uncertain, blank):
    result, df = convert(real, tmp_path, uncertain=uncertain, blank=blank)
    assert result == {"rows_in": 12, "rows_out": 12, "skipped": []}
    rows = by_image_id(df)
    with real.open(newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(rows) == 12
    for rec in records:
        r = rows[rec["Path"].removeprefix(T).removesuffix(".jpg")]
        for finding, column in zip(CHEXPERT_FINDINGS, FINDING_COLUMNS):
            assert r[column] == expected_label(rec[finding], uncertain, blank), (rec["Path"], finding)
    values = set().union(*(set(df[c].unique()) for c in FINDING_COLUMNS))
    assert ("uncertain" in values) == (uncertain == "keep")
    assert (None in values) == (blank == "null")


def test_real_file_sex_age_view_and_projection(real, tmp_path):
    _, df = convert(real, tmp_path, uncertain="positive", blank="negative")
    rows = by_image_id(df)
    assert df["view"].to_list() == df["region"].to_list()
    assert df.filter(pl.col("view") == "lateral")["image_id"].to_list() == [
        "patient00002/study1/view2_lateral", "patient00004/study1/view2_lateral",
        "patient00005/study2/view1_lateral", "patient00006/study1/view2_lateral"]
    # laterals have no AP/PA: null, and nothing was skipped for it
    assert df.filter(pl.col("view") == "lateral")["projection"].null_count() == 4
    assert df.filter(pl.col("view") == "frontal")["projection"].to_list() == ["AP", "AP", "AP", "AP", "PA", "AP",
                                                                               "PA", "AP"]
    p5 = rows["patient00005/study1/view1_frontal"]
    assert (p5["sex"], p5["age"]) == (None, None)  # Unknown, 0
    assert (rows["patient00001/study1/view1_frontal"]["sex"], rows["patient00003/study1/view1_frontal"]["sex"]) == (
        "F", "M")
    # several studies per patient, one subject
    assert df.filter(pl.col("subject_id") == "patient00002")["study"].to_list() == ["study2", "study1", "study1"]
    assert df.group_by("subject_id").len().height == 7


@pytest.mark.parametrize("blank", ["null", "negative"])
@pytest.mark.parametrize("uncertain", ["keep", "positive", "negative"])
def test_derived_finding_attribute(real, tmp_path, uncertain, blank):
    _, df = convert(real, tmp_path, uncertain=uncertain, blank=blank)
    got = dict(zip(df["image_id"], df["finding"]))
    assert got == {k: v[POLICY_INDEX[uncertain]] for k, v in FINDING.items()}
    # the reason for it: in train.csv No Finding is one class (or blank), `finding` has two
    assert set(df["no_finding"].drop_nulls()) == ({"positive"} if blank == "null" else {"positive", "negative"})
    assert set(df["finding"].drop_nulls()) == {"positive", "negative"}


def test_bad_blank_policy(real, tmp_path):
    with pytest.raises(ValueError, match="blank"):
        chexpert_to_manifest(real, tmp_path / "m.csv", blank="zero")
    assert not (tmp_path / "m.csv").exists()


def test_cli_poster_policies(real, tmp_path, capsys):
    out = tmp_path / "m.parquet"
    assert main([str(real), str(out), "--uncertain", "positive", "--blank", "negative"]) == 0
    assert "12 of 12 rows written" in capsys.readouterr().out
    df = pl.read_parquet(out)
    for c in FINDING_COLUMNS:
        assert df[c].null_count() == 0 and set(df[c]) <= {"positive", "negative"}, c
    assert df.filter(pl.col("image_id") == "patient00005/study1/view1_frontal")["atelectasis"].item() == "positive"
    with pytest.raises(SystemExit):
        main([str(real), str(out), "--blank", "zero"])


def test_chexpert_config_accepts_the_real_file_under_the_poster_policies(real, tmp_path):
    from cohortlens.cohort.build import build_cohort

    cfg = yaml.safe_load((REPO / "config" / "chexpert.yaml").read_text())
    attrs = cfg["attributes"]
    assert attrs["view"] == {"type": "categorical", "role": "acquisition", "categories": ["frontal", "lateral"],
                             "level": "image"}
    assert attrs["finding"]["role"] == "target" and attrs["finding"]["categories"] == ["positive", "negative"]
    _, df = convert(real, tmp_path, uncertain="positive", blank="negative")
    tables = build_cohort(tmp_path / "manifest.parquet", attributes=attrs, regions=list(cfg["regions"]),
                          split=cfg["cohort"]["split"], subjects_per_shard=4, image_root=str(tmp_path),
                          manifest_schema=str(REPO / "workflow" / "schemas" / "manifest.schema.yaml"))
    assert tables.n_manifest_rows == df.height == 12
    assert set(tables.quarantine["reason"]) == {"missing file"}


# --- the competition mean AUC ------------------------------------------------------------------------------


def _predictions(rng, attribute, classes, n=60, split="test", flip=False):
    """A probe's predictions for one finding: y_true from the classes, class_scores in the order of `classes`
    (the positive class's score is noisy truth), subjects shared between findings."""
    y = rng.choice(classes, n)
    s = (y == "positive") + rng.normal(0, 0.8, n)
    s = -s if flip else s
    cols = {c: (s if c == "positive" else -s + (0.3 if c == "uncertain" else 0)) for c in classes}
    scores = np.column_stack([cols[c] for c in classes])
    frame = pl.DataFrame({"model": "m", "region": "frontal", "attribute": attribute,
                          "subject_id": [f"S{i % 25}" for i in range(n)], "image_uid": [f"S{i % 25}/{i}" for i in range(n)],
                          "split": split, "y_true": y.tolist(), "class_scores": scores.tolist()})
    pos = y != "uncertain"
    return frame, roc_auc_score(y[pos] == "positive", s[pos])


def test_competition_mean_auc_matches_roc_auc_score():
    from cohortlens.analysis.chexpert_auc import competition_metrics, finding_aucs
    from cohortlens.io.chexpert import COMPETITION_COLUMNS

    rng = np.random.default_rng(3)
    classes = {"atelectasis": ["positive", "negative"], "cardiomegaly": ["negative", "positive"],
               "consolidation": ["positive", "negative"], "edema": ["positive", "negative", "uncertain"],
               "pleural_effusion": ["positive", "negative"], "fracture": ["positive", "negative"]}
    frames, expected = [], {}
    for a, cls in classes.items():
        frame, auc = _predictions(rng, a, np.array(cls))
        frames += [frame, _predictions(rng, a, np.array(cls), split="val", flip=True)[0]]  # val must not count
        expected[a] = auc
    preds = pl.concat(frames)
    assert COMPETITION_COLUMNS == ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion")

    per = finding_aucs(preds, classes)
    assert per["attribute"].to_list() == list(COMPETITION_COLUMNS)  # fracture is not a competition finding
    assert per["auc"].to_list() == pytest.approx([expected[a] for a in COMPETITION_COLUMNS], abs=1e-12)
    edema = preds.filter((pl.col("attribute") == "edema") & (pl.col("split") == "test"))
    assert per.filter(pl.col("attribute") == "edema")["n_positive"].item() + per.filter(
        pl.col("attribute") == "edema")["n_negative"].item() == edema.filter(pl.col("y_true") != "uncertain").height

    (row,) = competition_metrics(preds, classes, model="m", region="frontal", backend="exact", n_bootstrap=200,
                                 seed=0)
    mean = np.mean([expected[a] for a in COMPETITION_COLUMNS])
    assert 0.6 < mean < 0.95
    assert row["value"] == pytest.approx(mean, abs=1e-12)
    assert row["ci_low"] < row["value"] < row["ci_high"]
    assert (row["attribute"], row["kind"], row["metric"], row["chance"]) == ("chexpert_competition", "summary",
                                                                             "mean_auc", 0.5)
    # the images scored, each once: the five findings share their images
    assert row["n_test"] == preds.filter((pl.col("split") == "test") & (pl.col("y_true") != "uncertain"))[
        "image_uid"].n_unique() == 60
    # all five or no mean: a missing finding, or one with a single label in its test rows
    assert competition_metrics(preds.filter(pl.col("attribute") != "edema"), classes, model="m", region="frontal",
                               backend="exact", n_bootstrap=0, seed=0) == []
    one_label = preds.filter((pl.col("attribute") != "consolidation") | (pl.col("y_true") == "negative"))
    assert competition_metrics(one_label, classes, model="m", region="frontal", backend="exact", n_bootstrap=0,
                               seed=0) == []
    # a probe without a class `positive` (e.g. sex) has no AUC here
    assert finding_aucs(preds, {**classes, "atelectasis": ["F", "M"]})["attribute"].to_list() == list(
        COMPETITION_COLUMNS[1:])


def _metrics(rows):
    from cohortlens.analysis.probe import METRICS_SCHEMA

    base = {"kind": "classification", "metric": "balanced_accuracy", "ci_low": 0.5, "ci_high": 0.9, "n_train": 10,
            "n_test": 5, "chance": 0.5, "backend": "exact"}
    return pl.DataFrame([{**base, **r} for r in rows], schema=METRICS_SCHEMA)


def test_model_table_shows_the_competition_mean_auc(tmp_path):
    from cohortlens.analysis.chexpert_auc import COMPETITION_LABEL
    from cohortlens.analysis.model_table import model_table
    from cohortlens.report.model_table import model_table_html, model_table_section

    plain = [{"model": m, "region": "frontal", "attribute": "sex", "value": v} for m, v in (("pca", 0.6), ("vae", 0.7))]
    summary = [{"model": m, "region": "frontal", "attribute": "chexpert_competition", "kind": "summary",
                "metric": "mean_auc", "value": v, "ci_low": v - 0.05, "ci_high": v + 0.05, "n_train": None}
               for m, v in (("pca", 0.712), ("vae", 0.801))]
    without = model_table(_metrics(plain))
    assert COMPETITION_LABEL not in without.columns
    table = model_table(_metrics(plain + summary))
    assert table.columns == ["model", "supervision", "type", "region", "probe", "sex balanced accuracy ↑",
                             COMPETITION_LABEL]
    assert dict(zip(table["model"], table[COMPETITION_LABEL])) == {"pca": 0.712, "vae": 0.801}
    html = model_table_html(_metrics(plain + summary))
    assert f"<th>{COMPETITION_LABEL}</th>" in html
    assert "<b>0.801 <span class='muted'>[0.751, 0.851]</span></b>" in html and "0.712" in html
    # the report's section explains the column only where it is shown
    for name, rows in (("plain", plain), ("summary", plain + summary)):
        _metrics(rows).write_parquet(tmp_path / f"{name}.parquet")
    assert "Pleural Effusion" not in model_table_section([tmp_path / "plain.parquet"])
    assert "Pleural Effusion" in model_table_section([tmp_path / "summary.parquet"])


def test_probe_stage_writes_the_competition_mean_auc(tmp_path):
    """End to end through run_probes: the probe records its class order, and the mean AUC row on its test
    predictions agrees with the probe's own ROC AUC per finding (one scoring path checks the other)."""
    from cohortlens.analysis.probe import run_probes
    from cohortlens.embed.parquet import VOLUME_KEYS, EmbeddingWriter
    from cohortlens.io.chexpert import COMPETITION_COLUMNS
    from cohortlens.io.tables import write_parquet

    rng = np.random.default_rng(0)
    n, dim = 160, 16
    subjects = [f"patient{i:05d}" for i in range(n)]
    X = rng.normal(size=(n, dim)).astype(np.float32)
    labels = {}
    for i, a in enumerate(COMPETITION_COLUMNS):
        pos = rng.random(n) < 0.4
        X[:, 2 * i:2 * i + 2] += 1.5 * pos[:, None]
        labels[a] = np.where(pos, "positive", "negative").astype(object)
    labels["edema"][rng.random(n) < 0.15] = "uncertain"  # the keep policy: a third class, left out of the AUC
    emb = tmp_path / "pca/volumes.parquet"
    with EmbeddingWriter(emb, VOLUME_KEYS, dim, {"model": "pca", "dim": dim, "level": "volume"}) as w:
        w.write(pl.DataFrame({"image_uid": [f"{s}/frontal" for s in subjects], "subject_id": subjects,
                              "region": ["frontal"] * n}), X)
    attrs = {a: {"type": "categorical", "role": "target", "categories": ["positive", "negative", "uncertain"]}
             for a in COMPETITION_COLUMNS}
    write_parquet(pl.DataFrame({"subject_id": subjects, **{a: v.tolist() for a, v in labels.items()}}),
                  tmp_path / "subjects.parquet", metadata={"attributes": attrs})
    split = np.where(np.arange(n) % 10 < 6, "train", np.where(np.arange(n) % 10 < 7, "val", "test"))
    write_parquet(pl.DataFrame({"subject_id": subjects, "split": split.tolist()}), tmp_path / "splits.parquet")
    settings = {"C_grid": [1.0, 10.0], "gamma_grid": [1.0], "n_bootstrap": 50, "backend": "exact"}

    metrics, preds, params = run_probes(emb, tmp_path / "subjects.parquet", tmp_path / "splits.parquet",
                                        settings=settings)
    assert params["frontal"]["cardiomegaly"]["classes"] == ["positive", "negative"]
    assert params["frontal"]["edema"]["classes"] == ["positive", "negative", "uncertain"]
    (row,) = metrics.filter(pl.col("attribute") == "chexpert_competition").iter_rows(named=True)
    assert (row["model"], row["region"], row["metric"], row["backend"]) == ("pca", "frontal", "mean_auc", "exact")
    own = metrics.filter(pl.col("metric") == "roc_auc").sort("attribute")
    binary = own.filter(pl.col("attribute") != "edema")["value"].to_list()
    edema = preds.filter((pl.col("attribute") == "edema") & (pl.col("split") == "test")
                         & (pl.col("y_true") != "uncertain"))
    edema_auc = roc_auc_score(edema["y_true"] == "positive", edema["class_scores"].list.get(0))
    assert row["value"] == pytest.approx(np.mean([*binary, edema_auc]), abs=1e-9)
    assert row["value"] > 0.75  # the planted signal, scored with the right sign
    assert row["ci_low"] <= row["value"] <= row["ci_high"]
    # no competition findings, no row
    m2, _, _ = run_probes(emb, tmp_path / "subjects.parquet", tmp_path / "splits.parquet", settings=settings,
                          probe_attributes=["cardiomegaly", "edema"])
    assert "chexpert_competition" not in set(m2["attribute"])

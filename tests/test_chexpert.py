"""Tests for the CheXpert -> cohortlens manifest converter."""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest
import yaml

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
        "subject_id", "image", "region", "image_id", "study", "sex", "age", "projection",
        *FINDING_COLUMNS,
    }
    assert df.schema["age"] == pl.Int64
    for c in ("subject_id", "image", "region", "image_id", "study", "sex", "projection",
              *FINDING_COLUMNS):
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
    assert set(attrs) == {"sex", "age", "projection", *FINDING_COLUMNS}
    assert cfg["regions"]["frontal"]["center_slices"] == 1
    _, df = convert(source, tmp_path)
    tables = build_cohort(tmp_path / "manifest.parquet", attributes=attrs, regions=list(cfg["regions"]), split=cfg["cohort"]["split"],
                          subjects_per_shard=4, image_root=str(tmp_path),
                          manifest_schema=str(REPO / "workflow" / "schemas" / "manifest.schema.yaml"))
    assert tables.n_manifest_rows == df.height
    assert set(tables.quarantine["reason"]) == {"missing file"}

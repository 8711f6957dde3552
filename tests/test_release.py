"""The publication archive's rules on small synthetic tables and pages: small-cell suppression, public findings,
coarsened map attributes, and the release check, which must catch every kind of planted participant-level data
(subject ids, exact dates, file paths, DICOM identifiers, cells below k) and name the member and the reason."""

from __future__ import annotations

import base64
import datetime as dt
import io
import tarfile

import polars as pl
import pytest

from cohortlens.analysis.table import AttributeSpec
from cohortlens.report.archive import write_archive
from cohortlens.report.findings import findings_section
from cohortlens.report.publication import (
    OTHER,
    coarsen_attributes,
    coarsen_dates,
    fairness_groups_public,
    fairness_summary_public,
    findings_public,
    quarantine_reasons,
    reason_kind,
    suppress_small_cells,
    withhold_ids,
)
from cohortlens.report.publish import parquet_bytes
from cohortlens.report.release import (
    ReleaseCheckFailed,
    check_release,
    cohort_needles,
    html_small_cells,
    public_dates,
    release_problems,
)
from cohortlens.report.sections import DEFAULTS, fairness_section

K = 10


@pytest.fixture
def cohort():
    subjects = pl.DataFrame({"subject_id": ["S00001", "S00002", "S00003"], "sex": ["F", "M", "F"],
                             "date": [dt.date(2015, 5, 27), dt.date(2016, 1, 2), dt.date(2014, 1, 1)]})
    images = pl.DataFrame({"image_uid": ["S00001/neck", "S00002/neck", "S00003/neck"],
                           "subject_id": ["S00001", "S00002", "S00003"], "region": ["neck"] * 3,
                           "image": ["images/S00001_neck.nii.gz", "images/S00002_neck.nii.gz", "dicom/S00003_neck"],
                           "path": ["data/demo/images/S00001_neck.nii.gz", "data/demo/images/S00002_neck.nii.gz",
                                    "data/demo/dicom/S00003_neck"]})
    quarantine = pl.DataFrame({"stage": ["cohort"], "manifest_line": [9], "image_uid": ["Q0001/neck"],
                               "subject_id": ["Q0001"], "region": ["neck"], "image": ["bad/Q0001_missing.nii.gz"],
                               "reason": ["missing file"]})
    return subjects, images, quarantine


@pytest.fixture
def needles(cohort):
    subjects, images, quarantine = cohort
    config = {"attributes": {"date": {"type": "date", "min": "2014-01-01", "max": "2018-12-31"}}}
    return cohort_needles(subjects, images, [quarantine], identifiers={"DEMO^PATIENT^7": "PatientName (x.dcm)"},
                          min_cell=K, public_dates=public_dates(config))


def _clean_members() -> dict[str, bytes]:
    counts = pl.DataFrame({"what": ["region"], "value": ["neck"], "unit": ["images"], "n": [120]})
    page = ("<html><table><thead><tr><th>group</th><th>n</th></tr></thead><tbody><tr><td>F</td><td>&lt; 10</td></tr>"
            "<tr><td>M</td><td>57</td></tr></tbody></table><p>acquired from 2015-05; balanced accuracy 0.20150527; "
            "p = 0.0123; 3 of 4 findings</p><img src='data:image/png;base64,"
            + base64.b64encode(b"\x89PNG....S00001....").decode() + "'></html>")
    return {"report/publication.html": page.encode(), "cohort/counts.parquet": parquet_bytes(counts),
            "config.yaml": b"attributes:\n  date: {type: date, min: '2014-01-01', max: '2018-12-31'}\n"}


def test_release_check_passes_clean_members(needles):
    assert release_problems(_clean_members(), needles) == []
    check_release(_clean_members(), needles)


@pytest.mark.parametrize("member, data, reason, value", [
    ("report/publication.html", b"<p>outlier: S00002/neck</p>", "subject id", "S00002"),
    ("findings/pca.parquet", None, "subject id", "S00001"),
    ("findings/pca/S00003_neck.png", b"\x89PNG", "subject id", "S00003"),
    ("report/publication.html", b"<p>quarantined: Q0001</p>", "subject id", "Q0001"),
    ("report/publication.html", b"<p>from 2015-05-27</p>", "exact date", "2015-05-27"),
    ("findings/pca/cluster-from_2016_01_02-pocket.png", b"\x89PNG", "exact date", "2016_01_02"),
    ("notes.txt", b"onset 20150527.", "exact date", "20150527"),
    ("models/pca/train_log.csv", b"step,file\n1,data/demo/images/S00002_neck.nii.gz\n", "file path",
     "data/demo/images/S00002_neck.nii.gz"),
    ("report/publication.html", b"<td>/mnt/cohort/dicom/S00003_neck</td>", "file path", "dicom/S00003_neck"),
    ("report/publication.html", b"<p>DEMO^PATIENT^7</p>", "DICOM identifier", "DEMO^PATIENT^7"),
    ("fairness/pca/groups.parquet", None, "cell below k", "column n, row 1: 3"),
    ("report/publication.html", b"<table><thead><tr><th>reason</th><th>images</th></tr></thead><tbody><tr><td>x</td>"
                                b"<td>4</td></tr></tbody></table>", "cell below k", "table 1, column images: 4"),
])
def test_release_check_catches_each_kind(needles, member, data, reason, value):
    if member == "findings/pca.parquet":
        data = parquet_bytes(pl.DataFrame({"finding_id": ["outlier-neck"], "description": ["flags S00001/neck"]}))
    if member == "fairness/pca/groups.parquet":
        data = parquet_bytes(pl.DataFrame({"group": ["F", "M"], "n": [40, 3]}))
    members = {**_clean_members(), member: data}
    problems = release_problems(members, needles)
    assert any(m == member and r.startswith(reason) and v == value for m, r, v in problems), problems
    with pytest.raises(ReleaseCheckFailed, match=reason):
        check_release(members, needles)


def test_release_check_in_parquet_metadata_and_png_text(needles):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, PngImagePlugin

    buf = io.BytesIO()
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({"note": "S00002 on 2016-01-02"}), buf)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "images/S00001_neck.nii.gz", zip=True)
    png = io.BytesIO()
    Image.new("L", (4, 4)).save(png, "PNG", pnginfo=info)
    page = f"<img src='data:image/png;base64,{base64.b64encode(png.getvalue()).decode()}'>".encode()
    problems = release_problems({"a.parquet": buf.getvalue(), "r.html": page}, needles)
    found = {(m, r, v) for m, r, v in problems}
    assert ("a.parquet", "subject id", "S00002") in found
    assert ("a.parquet", "exact date", "2016-01-02") in found
    assert ("r.html", "file path", "images/S00001_neck.nii.gz") in found


def test_a_failed_release_check_writes_nothing(tmp_path, needles):
    out = tmp_path / "cohortlens-publication.tar.gz"

    def check(members, identifiers):
        check_release(members, needles)

    with pytest.raises(ReleaseCheckFailed, match="notes.txt: subject id"):
        write_archive(out, members={"notes.txt": b"S00001"}, config={}, root="cohortlens-publication", check=check)
    assert not out.exists()
    write_archive(out, members=_clean_members(), config={"x": 1}, root="cohortlens-publication", check=check)
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert "cohortlens-publication/report/publication.html" in names and "cohortlens-publication/SHA256SUMS" in names


def test_html_small_cells_reads_count_columns_only():
    page = ("<table><thead><tr><th>metric</th><th>n</th><th>value</th></tr></thead><tbody>"
            "<tr><td>acc</td><td>12</td><td>3</td></tr><tr><td>auc</td><td>&lt; 10</td><td>0</td></tr>"
            "<tr><td>x</td><td>0</td><td>1</td></tr><tr><td>y</td><td>9</td><td>1</td></tr></tbody></table>")
    assert html_small_cells(page, K) == ["table 1, column n: 9"]


# ------------------------------------------------------------------------------------------ suppression

def test_suppress_small_cells():
    frame = pl.DataFrame({"group": ["a", "b", "c"], "n": [3, 0, 25], "value": [0.5, None, 0.7]})
    out = suppress_small_cells(frame, K)
    assert out["n"].to_list() == [None, 0, 25] and out["value"].to_list() == [None, None, 0.7]
    assert out["suppressed"].to_list() == [True, False, False]


def test_fairness_public_suppresses_small_groups_and_their_gaps():
    groups = pl.DataFrame({"model": "pca", "region": "neck", "target": "sex", "positive": "M", "protected": "site",
                           "group": ["Berlin", "Essen", "Hamburg"], "metric": "accuracy", "value": [0.9, 0.8, 0.6],
                           "ci_low": [0.8, 0.7, 0.3], "ci_high": [1.0, 0.9, 0.9], "n": [30, 25, 4]})
    summary = pl.DataFrame({"model": "pca", "region": "neck", "target": "sex", "positive": "M", "protected": "site",
                            "measure": ["accuracy_difference", "selection_difference"], "value": [0.3, 0.1],
                            "ci_low": [0.1, -0.1], "ci_high": [0.5, 0.3], "flagged": [True, False],
                            "group_high": ["Berlin", "Berlin"], "group_low": ["Hamburg", "Essen"], "n": [59, 59]})
    g = fairness_groups_public(groups, K)
    assert g.filter(pl.col("group") == "Hamburg").row(0, named=True)["value"] is None
    assert g.filter(pl.col("group") == "Berlin")["n"].item() == 30
    s = fairness_summary_public(summary, groups, K)
    assert s["suppressed"].to_list() == [True, False]
    first = s.row(0, named=True)
    assert first["value"] is None and first["group_low"] is None and first["flagged"] is None
    assert s.row(1, named=True)["value"] == 0.1


def test_fairness_section_publication(tmp_path):
    groups = pl.DataFrame({"model": "pca", "region": "neck", "target": "sex", "positive": "M", "protected": "site",
                           "group": ["Berlin", "Hamburg"], "metric": "accuracy", "value": [0.9, 0.6],
                           "ci_low": [0.8, 0.3], "ci_high": [1.0, 0.9], "n": [30, 4]})
    summary = pl.DataFrame({"model": "pca", "region": "neck", "target": "sex", "positive": "M", "protected": "site",
                            "measure": ["accuracy_difference"], "value": [0.3], "ci_low": [0.1], "ci_high": [0.5],
                            "flagged": [True], "group_high": ["Berlin"], "group_low": ["Hamburg"], "n": [34]})
    groups.write_parquet(tmp_path / "groups.parquet")
    summary.write_parquet(tmp_path / "summary.parquet")
    cfg = dict(DEFAULTS)
    page = fairness_section([tmp_path / "summary.parquet"], [tmp_path / "groups.parquet"], cfg, publication=True)
    assert html_small_cells(page, K) == [] and "&lt; 10" in page and "0 of 1 gaps flagged" in page
    full = fairness_section([tmp_path / "summary.parquet"], [tmp_path / "groups.parquet"], cfg)
    assert html_small_cells(full, K) == ["table 2, column n: 4"]


def test_quarantine_reasons_merge_small_kinds():
    reasons = (["missing file"] * 12 + ["attribute 'age': 140.0 is outside [18, 100]"] * 3
               + ["duplicate image key 'Q0007/neck' (manifest lines 908, 909)"] * 2)
    q = pl.DataFrame({"stage": "cohort", "reason": reasons})
    out = quarantine_reasons(q, K)
    assert out.rows() == [("cohort", "missing file", 12, False), ("all", "other kinds (each < 10 images)", None, True)]
    assert quarantine_reasons(q, 2)["reason"].to_list() == ["missing file", "attribute 'age'", "duplicate image key"]
    assert reason_kind("too few slices: 8 < center_slices 12") == "too few slices"
    assert "Q0007" not in reason_kind("duplicate image key 'Q0007/neck' (manifest lines 908, 909)")


def test_findings_public_and_text():
    ids = {"S00001", "S00002", "S00001/neck", "S00002/neck"}
    frame = pl.DataFrame({
        "finding_id": ["near_duplicate-neck", "cluster-neck-from_2015_05_27-pocket"], "kind": ["near_duplicate", "cluster"],
        "region": "neck", "attribute": [None, "site"], "value": [None, "Essen, from 2015-05-27"],
        "effect_size": [0.1, 0.7], "effect_measure": "x", "p_value": [0.01, 0.001], "p_adjusted": [0.02, 0.002],
        "n": [300, 58], "sample_ids": [["S00001/neck", "S00002/neck"], [f"S{i:05d}/neck" for i in range(20)]],
        "description": ["near-duplicates: S00001/neck, S00002/neck", "acquired from 2015-05-27"],
        "evidence": [["a.png"], ["b.png"]], "details": ['{"scores": {"S00001/neck": 1}}', "{}"],
        "explained_by": [None, None]})
    out = findings_public(frame, K, ids)
    assert "sample_ids" not in out.columns and "details" not in out.columns and "evidence" not in out.columns
    assert out["n_set"].to_list() == [None, 20]
    assert out["description"].to_list() == ["near-duplicates: (ids withheld)", "acquired from 2015-05"]
    assert out["finding_id"][1] == "cluster-neck-from_2015_05-pocket" and out["value"][1] == "Essen, from 2015-05"
    assert coarsen_dates("0.20150527 and 2015-13-45") == "0.20150527 and 2015-13-45"
    assert withhold_ids("S000012 is not S00001", {"S00001"}) == "S000012 is not (ids withheld)"


def test_findings_section_publication_pictures_only_sets_of_k(tmp_path):
    from PIL import Image

    d = tmp_path / "pca"
    d.mkdir()
    for name in ("small.png", "large.png"):
        Image.new("L", (4, 4), 128).save(d / name)
    frame = pl.DataFrame({
        "finding_id": ["outlier-neck", "cluster-neck"], "kind": ["outlier", "cluster"], "region": "neck",
        "attribute": [None, "site"], "value": [None, "Essen"], "effect_size": [0.9, 0.5], "effect_measure": "x",
        "p_value": [0.01, 0.001], "p_adjusted": [0.02, 0.002], "n": [300, 300],
        "sample_ids": [["S00001/neck"], [f"S{i:05d}/neck" for i in range(12)]],
        "description": ["cleanlab flags 1 of 300 neck images as outliers: S00001/neck", "a cluster"],
        "evidence": [[str(d / "small.png")], [str(d / "large.png")]], "details": ["{}", "{}"],
        "explained_by": [None, None]})
    frame.write_parquet(tmp_path / "pca.parquet")
    cfg = dict(DEFAULTS)
    ids = {f"S{i:05d}" for i in range(20)}
    page = findings_section([tmp_path / "pca.parquet"], [], [d], cfg, publication=True, ids=ids)
    assert "S00001" not in page and "(ids withheld)" in page
    assert "Described, not pictured" in page and "outlier-neck" in page
    assert page.count("data:image/png") == 1
    full = findings_section([tmp_path / "pca.parquet"], [], [d], cfg)
    assert "S00001/neck" in full and full.count("data:image/") == 2  # the full page: PNG or lossless WebP


def test_coarsen_attributes():
    n = 60
    frame = pl.DataFrame({"x": [float(i) for i in range(n)], "y": [0.0] * n,
                          "age": [20.0 + i for i in range(n)],
                          "date": [dt.date(2014 + i % 3, 1 + i % 12, 1 + i % 28) for i in range(n)],
                          "site": ["A"] * 50 + ["B"] * 7 + ["C"] * 3})
    specs = {"age": AttributeSpec("age", "continuous", "protected"), "date": AttributeSpec("date", "date", "acquisition"),
             "site": AttributeSpec("site", "categorical", "acquisition", categories=("A", "B", "C"))}
    out, new = coarsen_attributes(frame, specs, K)
    assert all(s.is_categorical for s in new.values())
    assert set(out["date"].to_list()) == {"2014", "2015", "2016"}
    assert set(out["site"].to_list()) == {"A", OTHER}
    ages = out["age"].value_counts()
    assert ages.height >= 2 and ages["count"].min() >= K
    assert not any(v == str(a) for v, a in zip(out["age"].to_list(), frame["age"].to_list()))


def test_small_counts_in_text_are_suppressed():
    from cohortlens.report.publication import suppress_small_counts

    text = "cleanlab flags 1 of 300 chest images as outliers; 12 of 300 images; 3 subjects, 25 participants"
    assert suppress_small_counts(text, 10) == ("cleanlab flags < 10 of 300 chest images as outliers; 12 of 300 "
                                               "images; < 10 subjects, 25 participants")
    # other numbers stay: statistics, dates, ids, regions
    for other in ("balanced accuracy 0.97 vs 0.50", "p=0.005", "from 2015-05", "R² 0.96 (r = 0.98)", "0 of 300 images"):
        assert suppress_small_counts(other, 10) == other

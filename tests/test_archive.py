"""The results archives of the demo run (rule `archive`, kinds internal and publication): members, checksums,
config, versions, an identifier scan that finds the demo's DICOM identifiers wherever one is planted, and a
publication archive in which no subject id, exact date or file path of the cohort occurs."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import polars as pl
import pytest
import yaml

from cohortlens.report.archive import (
    IdentifierFound,
    default_files,
    identifiers_from_images,
    member_texts,
    scan_archive,
    scan_bytes,
    write_archive,
)

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = "results/archive/cohortlens-internal.tar.gz"
PUBLICATION = "results/archive/cohortlens-publication.tar.gz"


@pytest.fixture(scope="module")
def archived(demo_results) -> Path:
    """The archive rule (both kinds) run on the demo run (same config file, its working directory)."""
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    proc = subprocess.run(
        [snakemake, "--snakefile", str(REPO / "Snakefile"), "--directory", str(demo_results), "--cores", "1",
         ARCHIVE, PUBLICATION, "--configfile", str(demo_results / "config.yaml")],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return demo_results


def _contains(full, part) -> bool:
    if isinstance(part, dict):
        return isinstance(full, dict) and all(k in full and _contains(full[k], v) for k, v in part.items())
    return full == part


def _members(path: Path, root: str = "cohortlens-internal") -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        names = [m for m in tar.getmembers() if m.isfile()]
        assert all(m.name.startswith(f"{root}/") for m in names), root
        return {m.name[len(root) + 1:]: tar.extractfile(m).read() for m in names}


def test_archive_members(archived):
    members = _members(archived / ARCHIVE)
    for name in ("report/index.html", "report/publication.html", "config.yaml", "versions.json", "SHA256SUMS", "cohort/subjects.parquet",
                 "cohort/images.parquet", "cohort/splits.parquet", "cohort/quarantine.parquet",
                 "preprocessed/index.parquet", "preprocessed/quarantine.parquet", "embeddings/pca/volumes.parquet",
                 "models/pca/train_log.csv"):
        assert name in members, name
    res = archived / "results"
    expected = {p.relative_to(res).as_posix() for p in default_files(res)}
    assert expected <= set(members)
    # the analysis tables of every stage the run has
    for stage in ("projections", "probes", "fairness", "findings", "mitigation"):
        if (res / stage).exists():
            assert any(n.startswith(f"{stage}/") and n.endswith(".parquet") for n in members), stage
    # no pixel data or checkpoints
    assert not [n for n in members if n.endswith((".npy", ".pt")) or n.startswith(("logs/", "plots/"))]
    assert "embeddings/pca/slices.parquet" not in members
    assert members["report/index.html"] == (res / "report/index.html").read_bytes()


def test_archive_checksums_config_versions(archived):
    members = _members(archived / ARCHIVE)
    sums = members["SHA256SUMS"].decode().splitlines()
    listed = {}
    for line in sums:
        digest, name = line.split("  ", 1)
        listed[name] = digest
    assert set(listed) == set(members) - {"SHA256SUMS"}
    for name, digest in listed.items():
        assert hashlib.sha256(members[name]).hexdigest() == digest, name
    assert (archived / "results/archive/cohortlens-internal.SHA256SUMS").read_bytes() == members["SHA256SUMS"]

    config = yaml.safe_load(members["config.yaml"])
    used = yaml.safe_load((archived / "config.yaml").read_text())
    # the run's config file, with the schema's defaults filled in by the workflow
    assert _contains(config, used)

    versions = json.loads(members["versions.json"])
    assert versions["python"].count(".") == 2 and versions["platform"]
    for package in ("cohortlens", "snakemake", "polars", "numpy", "plotly", "pydicom"):
        assert versions["packages"].get(package), package


def test_identifier_scan_finds_planted_identifiers(archived, tmp_path, monkeypatch):
    monkeypatch.chdir(archived)  # images.parquet paths are relative to the run's directory
    identifiers = identifiers_from_images("results/cohort/images.parquet")
    sources = " ".join(identifiers.values())
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber"):
        assert kw in sources, kw
    # the shipped archive is clean
    assert scan_archive(ARCHIVE, identifiers) == []

    patient_id = next(i for i, s in identifiers.items() if s.startswith("PatientID"))
    name = next(i for i, s in identifiers.items() if s.startswith("PatientName") and "^" in i)
    birth = next(i for i, s in identifiers.items() if s.startswith("PatientBirthDate") and "-" not in i)
    # found in a Parquet cell (compressed on disk), in its key-value metadata, in HTML text, in a PNG text
    # chunk inside a data URI, and as an ISO date
    subjects = pl.read_parquet("results/cohort/subjects.parquet")
    leaky = tmp_path / "subjects.parquet"
    subjects.with_columns(pl.lit(patient_id).alias("note")).write_parquet(leaky)
    assert scan_bytes("x.parquet", leaky.read_bytes(), identifiers)
    with_meta = tmp_path / "meta.parquet"
    import pyarrow.parquet as pq

    pq.write_table(subjects.to_arrow().replace_schema_metadata({"who": name}), with_meta)
    assert scan_bytes("y.parquet", with_meta.read_bytes(), identifiers)
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", f"series of {name}", zip=True)
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG", pnginfo=info)
    import base64

    page = f"<html><img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'></html>"
    assert scan_bytes("report/index.html", page.encode(), identifiers)
    iso = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    assert scan_bytes("a.txt", f"born {iso}".encode(), identifiers)
    # a bare date inside a longer number or a decimal (an embedding value) is not a hit; on its own it is
    assert not scan_bytes("b.txt", f"1{birth}7,0.{birth},-2.{birth}".encode(), {birth: "PatientBirthDate"})
    assert scan_bytes("c.csv", f"S00001,{birth},F".encode(), {birth: "PatientBirthDate"})

    # and the archive is refused, nothing written
    out = tmp_path / "archive.tar.gz"
    with pytest.raises(IdentifierFound, match="PatientID"):
        write_archive(out, report="results/report/index.html", files=[leaky], config={"x": 1},
                      images_parquet="results/cohort/images.parquet", results_dir=tmp_path)
    assert not out.exists()


# ------------------------------------------------------------------------------------------- publication

def _cohort(run: Path):
    res = run / "results"
    subjects = pl.read_parquet(res / "cohort/subjects.parquet")
    images = pl.read_parquet(res / "cohort/images.parquet")
    quarantines = [pl.read_parquet(res / "cohort/quarantine.parquet"),
                   pl.read_parquet(res / "preprocessed/quarantine.parquet")]
    return subjects, images, quarantines


def test_publication_archive_members(archived):
    members = _members(archived / PUBLICATION, "cohortlens-publication")
    for name in ("report/publication.html", "config.yaml", "versions.json", "SHA256SUMS", "cohort/counts.parquet",
                 "quarantine/reasons.parquet", "probes/pca/metrics.parquet", "findings/pca.parquet",
                 "findings/pca-tests.parquet", "models/pca/train_log.csv"):
        assert name in members, name
    res = archived / "results"
    if (res / "fairness").exists():
        assert "fairness/pca/summary.parquet" in members and "fairness/pca/groups.parquet" in members
    if (res / "mitigation").exists():
        assert "mitigation/pca/reprobe.parquet" in members
    assert any(n.startswith("report/maps/") and n.endswith(".png") for n in members)
    # aggregates only: no table with a row per participant or image, no embedding, no full report
    forbidden = ("report/index.html", "cohort/subjects.parquet", "cohort/images.parquet", "cohort/splits.parquet",
                 "cohort/quarantine.parquet", "preprocessed/", "embeddings/", "projections/", "plots/",
                 "probes/pca/predictions.parquet", "models/pca/reconstructions.png")
    assert not [n for n in members if n.startswith(forbidden)]
    findings = pl.read_parquet(io.BytesIO(members["findings/pca.parquet"]))
    assert not {"sample_ids", "details", "evidence"} & set(findings.columns)
    # an explanation image only for a set of at least k images
    k = 10
    original = pl.read_parquet(res / "findings/pca.parquet")
    small = [r["finding_id"] for r in original.iter_rows(named=True) if r["evidence"] and len(r["sample_ids"]) < k]
    pngs = {n for n in members if n.startswith("findings/pca/")}
    assert not [f for f in small if f"findings/pca/{f}.png" in pngs]
    assert (archived / "results/archive/cohortlens-publication.SHA256SUMS").read_bytes() == members["SHA256SUMS"]


def test_publication_archive_passes_the_release_check(archived, monkeypatch):
    from cohortlens.report.release import check_archive, cohort_needles, public_dates

    monkeypatch.chdir(archived)
    subjects, images, quarantines = _cohort(archived)
    config = yaml.safe_load((archived / "config.yaml").read_text())
    needles = cohort_needles(subjects, images, quarantines, min_cell=10, public_dates=public_dates(config),
                             identifiers=identifiers_from_images("results/cohort/images.parquet"))
    assert needles.subject_ids and needles.dates and needles.paths and needles.identifiers
    assert check_archive(PUBLICATION, needles) == []
    # the internal archive is the complete one: the same check finds participant-level data in it
    problems = check_archive(ARCHIVE, needles)
    reasons = {r for _, r, _ in problems}
    assert {"subject id", "exact date", "file path"} <= reasons, reasons


def test_no_subject_id_date_or_path_in_any_publication_member(archived):
    """Independent of the release check: plain searches of every member (raw text and decoded Parquet / PNG
    text / data-URI images) for the cohort's subject ids, exact dates in any spelling and file paths."""
    subjects, images, quarantines = _cohort(archived)
    ids = set(subjects["subject_id"]) | set(images["subject_id"])
    for q in quarantines:
        ids |= set(q["subject_id"].drop_nulls())
    id_re = re.compile(rb"(?<![A-Za-z0-9])(" + b"|".join(re.escape(i.encode()) for i in sorted(ids)) + rb")(?![0-9])")
    dates = set(subjects["date"].drop_nulls()) if "date" in subjects.columns else set()
    spellings = {f"{d:%Y}{sep}{d:%m}{sep}{d:%d}".encode() for d in dates for sep in ("-", "_", "/", ".", "")}
    date_re = re.compile(rb"(?<![\d.])(" + b"|".join(re.escape(s) for s in sorted(spellings)) + rb")(?!\d)")
    paths = {p.encode() for c in ("image", "path") for p in images[c].to_list()}
    paths |= {Path(p.decode()).name.encode() for p in paths}
    members = _members(archived / PUBLICATION, "cohortlens-publication")
    for name, data in members.items():
        texts = [name.encode(), *member_texts(name, data)]
        if name.endswith((".parquet", ".png")):
            texts = texts[:1] + texts[2:]  # compressed bytes: searched decoded
        for t in texts:
            t = re.sub(rb"data:image/png;base64,[A-Za-z0-9+/=]+", b"", t)  # searched decoded (member_texts)
            assert not id_re.search(t), (name, id_re.search(t).group(0))
            assert not date_re.search(t), (name, date_re.search(t).group(0))
            assert not [p for p in paths if p in t], name

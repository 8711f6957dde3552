"""The cohort stage on real files: tables, splits, shards, and every manifest-level bad input."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from cohortlens.cohort.build import assign_shards, assign_splits, build_cohort, shard_count, stable_unit_hash
from cohortlens.cohort.shards import files_stamp, read_shard_list, shard_list_path, write_shard_lists
from cohortlens.io.tables import ManifestError

from conftest import SCHEMA, small_manifest


def build(manifest, config, **kw):
    return build_cohort(
        manifest,
        attributes=config["attributes"],
        regions=list(config["regions"]),
        split=config["cohort"]["split"],
        subjects_per_shard=kw.pop("subjects_per_shard", 2),
        manifest_schema=SCHEMA,
        **kw,
    )


def edit_manifest(manifest, fn):
    df = pl.read_csv(manifest, infer_schema=False)
    fn(df).write_csv(manifest)


def test_clean_manifest_gives_consistent_tables(tmp_path, config):
    t = build(small_manifest(tmp_path, 6), config)
    assert t.n_manifest_rows == 18
    assert t.quarantine.height == 0
    assert t.images.height == 18
    assert t.subjects.height == 6 and set(t.subjects["n_images"]) == {3}
    assert t.subjects["age"].dtype == pl.Float64
    assert set(t.splits["split"]) <= {"train", "val", "test"}
    # every region of a subject lands in the same shard
    assert t.images.group_by("subject_id").agg(pl.col("shard").n_unique())["shard"].max() == 1


def test_splits_are_subject_level_stratified_seeded_and_stable():
    n = 2000
    subjects = pl.DataFrame(
        {"subject_id": [f"S{i:05d}" for i in range(n)], "sex": ["F", "M"] * (n // 2), "age": [20.0 + (i * 7) % 52 for i in range(n)]}
    )
    attrs = {"sex": {"type": "categorical"}, "age": {"type": "continuous"}}
    fractions = {"train": 0.8, "val": 0.05, "test": 0.15}
    a = assign_splits(subjects, ["sex", "age"], attrs, fractions, seed=1)
    counts = dict(a.group_by("split").len().iter_rows())
    assert abs(counts["train"] - 1600) <= 8 and abs(counts["val"] - 100) <= 8 and abs(counts["test"] - 300) <= 8
    for (sex,), part in a.join(subjects, on="subject_id").group_by("sex"):
        share = (part["split"] == "test").mean()
        assert 0.13 < share < 0.17, (sex, share)
    assert a.equals(assign_splits(subjects, ["sex", "age"], attrs, fractions, seed=1))
    assert not a.equals(assign_splits(subjects, ["sex", "age"], attrs, fractions, seed=2))
    # one more subject moves only a handful of existing subjects to another split
    more = pl.concat([subjects, pl.DataFrame({"subject_id": ["S99999"], "sex": ["F"], "age": [33.0]})])
    b = assign_splits(more, ["sex", "age"], attrs, fractions, seed=1)
    moved = a.join(b, on="subject_id").filter(pl.col("split") != pl.col("split_right")).height
    assert moved <= 10


def test_shards_power_of_two_and_stable_under_growth():
    assert [shard_count(n, 64) for n in (1, 64, 65, 128, 129, 300)] == [1, 1, 2, 2, 4, 8]
    ids = [f"S{i:05d}" for i in range(300)]
    s1 = assign_shards(ids, 8)
    s2 = assign_shards(ids + ["S99999"], 8)
    assert (s1 == s2[:300]).all()
    assert len(set(s1)) == 8
    assert (stable_unit_hash(ids, 3) == stable_unit_hash(ids, 3)).all()


def test_shard_lists_are_rewritten_only_when_their_rows_change(tmp_path, config):
    """The preprocess rule's rerun signal: a list's mtime moves only with its shard's rows (docs/architecture.md)."""
    manifest = small_manifest(tmp_path, 8)
    t = build(manifest, config, subjects_per_shard=3)  # 8 and 9 subjects: 4 shards
    lists = tmp_path / "shards"
    shards = sorted(t.images["shard"].unique())
    assert write_shard_lists(t.images, lists) == {"written": shards, "kept": [], "removed": []}
    for k in shards:
        assert read_shard_list(shard_list_path(lists, k)) == t.images.filter(pl.col("shard") == k)["path"].to_list()
    before = {p.name: p.stat().st_mtime_ns for p in lists.glob("shard-*.tsv")}

    edit_manifest(manifest, lambda df: pl.concat([df, df.filter(pl.col("subject_id") == "T0001").with_columns(
        pl.lit("T0100").alias("subject_id"))]))  # a new subject (its files are T0001's)
    t2 = build(manifest, config, subjects_per_shard=3)
    new = t2.images.filter(pl.col("subject_id") == "T0100")["shard"].unique().to_list()
    assert write_shard_lists(t2.images, lists) == {"written": new, "kept": [k for k in shards if k not in new],
                                                  "removed": []}
    after = {p.name: p.stat().st_mtime_ns for p in lists.glob("shard-*.tsv")}
    assert sorted(n for n in after if after[n] != before[n]) == [f"shard-{new[0]}.tsv"]
    # fewer shards: the lists of shards that are gone are removed
    assert write_shard_lists(t2.images.filter(pl.col("shard") == new[0]), lists)["removed"] == [
        k for k in shards if k != new[0]]
    assert [p.name for p in lists.glob("shard-*.tsv")] == [f"shard-{new[0]}.tsv"]


def test_files_stamp_changes_with_any_listed_file(tmp_path):
    paths = [str(tmp_path / f"{i}.bin") for i in range(3)]
    for p in paths:
        Path(p).write_bytes(b"x")
    stamp = files_stamp(paths)
    assert files_stamp(paths) == stamp
    Path(paths[1]).write_bytes(b"xy")  # replaced in place
    assert files_stamp(paths) != stamp
    stamp = files_stamp(paths)
    os.utime(paths[2], ns=(1, 1))  # an older file put in its place
    assert files_stamp(paths) != stamp
    stamp = files_stamp(paths)
    os.unlink(paths[0])
    assert files_stamp(paths) != stamp


def test_missing_file_is_quarantined(tmp_path, config):
    m = small_manifest(tmp_path, 4)
    (tmp_path / "images" / "T0001_chest.nii.gz").unlink()
    t = build(m, config)
    assert t.quarantine.height == 1
    row = t.quarantine.row(0, named=True)
    assert row["reason"] == "missing file" and row["subject_id"] == "T0001" and row["region"] == "chest"
    assert row["manifest_line"] == 6
    assert t.images.height + t.quarantine.height == t.n_manifest_rows


def test_duplicate_subject_region_rows_are_quarantined(tmp_path, config):
    m = small_manifest(tmp_path, 4)
    edit_manifest(m, lambda df: pl.concat([df, df[3:4]]))
    t = build(m, config)
    assert t.quarantine.height == 2
    assert all("duplicate image key 'T0001/neck' (manifest lines 5, 14)" == r for r in t.quarantine["reason"])
    assert t.images.height + t.quarantine.height == t.n_manifest_rows == 13


@pytest.mark.parametrize(
    "column,value,expected",
    [
        ("sex", "X", "attribute 'sex': 'X' is not one of ['F', 'M']"),
        ("age", "240", "attribute 'age': 240 is outside [18, 100]"),
        ("age", "forty", "attribute 'age': 'forty' is not a number"),
        ("date", "2015-13-45", "attribute 'date': '2015-13-45' is not a date"),
        ("region", "knee", "region 'knee' is not declared in config regions"),
    ],
)
def test_attribute_values_outside_schema_are_quarantined(tmp_path, config, column, value, expected):
    m = small_manifest(tmp_path, 4)
    edit_manifest(m, lambda df: df.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(pl.lit(value)).otherwise(pl.col(column)).alias(column)))
    t = build(m, config)
    reasons = t.quarantine["reason"].to_list()
    assert any(r.startswith(expected) for r in reasons), reasons
    assert t.quarantine.filter(pl.col("manifest_line") == 9).height == 1
    assert t.images.height + t.quarantine.height == t.n_manifest_rows


def test_conflicting_subject_attribute_quarantines_the_subject(tmp_path, config):
    m = small_manifest(tmp_path, 4)
    edit_manifest(m, lambda df: df.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("M")).otherwise(pl.col("sex")).alias("sex")))
    t = build(m, config)
    assert set(t.quarantine["subject_id"]) == {"T0000"}
    assert t.quarantine.height == 3
    assert "conflicting values of subject attribute 'sex'" in t.quarantine["reason"][0]


def test_non_utf8_manifest_stops_with_file_and_offset(tmp_path, config):
    m = small_manifest(tmp_path, 2)
    raw = m.read_bytes().replace(b"Berlin", b"M\xfcnchen", 1)
    m.write_bytes(raw)
    with pytest.raises(ManifestError, match=r"manifest .*manifest.csv: not UTF-8 \(byte 0xfc at offset \d+, line 2\)"):
        build(m, config)


def test_missing_attribute_column_stops(tmp_path, config):
    m = small_manifest(tmp_path, 2)
    edit_manifest(m, lambda df: df.drop("weight"))
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['weight'\]"):
        build(m, config)


def test_row_breaking_manifest_schema_names_line_and_field(tmp_path, config):
    m = small_manifest(tmp_path, 3)
    edit_manifest(m, lambda df: df.with_columns(pl.when(pl.int_range(pl.len()) == 4).then(pl.lit("bad id")).otherwise(pl.col("subject_id")).alias("subject_id")))
    with pytest.raises(ManifestError, match=r"line 6 \(data row 5\) breaks the manifest schema: .*subject_id"):
        build(m, config)


def test_missing_manifest_and_bad_extension(tmp_path, config):
    with pytest.raises(ManifestError, match="file not found"):
        build(tmp_path / "nope.csv", config)
    bad = tmp_path / "m.xlsx"
    bad.write_text("x")
    with pytest.raises(ManifestError, match="unsupported extension"):
        build(bad, config)


def test_tsv_and_parquet_manifests_read_the_same(tmp_path, config):
    m = small_manifest(tmp_path, 3)
    df = pl.read_csv(m, infer_schema=False)
    df.write_csv(tmp_path / "manifest.tsv", separator="\t")
    df.write_parquet(tmp_path / "manifest.parquet")
    a = build(m, config).images
    assert a.equals(build(tmp_path / "manifest.tsv", config).images)
    assert a.equals(build(tmp_path / "manifest.parquet", config).images)

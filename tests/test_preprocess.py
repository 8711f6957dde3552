"""Preprocess library on real NIfTI files: orientation, slicing, scaling, canvas, shards, bad inputs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from cohortlens.cohort.build import build_cohort
from cohortlens.io.npyshard import NpyShardWriter
from cohortlens.preprocess.shard import preprocess_shard
from cohortlens.preprocess.slices import (
    SliceError,
    center_indices,
    choose_slice_axis,
    intensity_max,
    rescale,
    slice_stack,
    to_canvas,
)
from cohortlens.preprocess.store import SliceStore, center_crop

from conftest import SCHEMA, small_manifest, write_volume


def marker_volume():
    """RAS volume (x=LR, y=PA, z=IS), sagittal slices 4 mm thick, a marker superior-anterior."""
    vol = np.zeros((16, 30, 40), np.float32)
    vol[:, 25:30, 35:40] = 100.0  # most anterior (high y) and most superior (high z)
    return vol


def test_sagittal_display_orientation_superior_top_anterior_left():
    vol = marker_volume()
    stack = slice_stack(vol, np.diag([4.0, 1.0, 1.0, 1.0]))
    assert stack.shape == (16, 40, 30)  # rows = superior->inferior, cols = anterior->posterior
    assert stack[8, :5, :5].min() == 100.0 and stack[8, -5:, -5:].max() == 0.0


def test_orientation_is_independent_of_voxel_storage_order():
    vol = marker_volume()
    ras = slice_stack(vol, np.diag([4.0, 1.0, 1.0, 1.0]))
    # the same anatomy stored with flipped y/z voxel axes and an affine that says so
    flipped = vol[:, ::-1, ::-1].copy()
    affine = np.diag([4.0, -1.0, -1.0, 1.0])
    affine[:3, 3] = [0, 29, 39]
    assert np.array_equal(slice_stack(flipped, affine), ras)
    # and stored with axes permuted (z, x, y)
    perm = np.transpose(vol, (2, 0, 1)).copy()
    affine_p = np.zeros((4, 4))
    affine_p[0, 1], affine_p[1, 2], affine_p[2, 0], affine_p[3, 3] = 4.0, 1.0, 1.0, 1.0
    assert np.array_equal(slice_stack(perm, affine_p), ras)


def test_slice_axis_auto_is_largest_spacing_and_configurable():
    assert choose_slice_axis(np.array([4.0, 1.0, 1.0])) == 0
    assert choose_slice_axis(np.array([0.8, 0.8, 5.0])) == 2
    assert choose_slice_axis(np.array([1.0, 1.0, 1.0]), "axial") == 2
    axial = slice_stack(np.zeros((20, 22, 8)), np.diag([1.0, 1.0, 5.0, 1.0]))
    assert axial.shape == (8, 22, 20)


def test_rescale_maps_zero_max_to_minus_one_one_and_percentile():
    x = np.array([[[0.0, 50.0, 100.0, -20.0]]], np.float32)
    np.testing.assert_allclose(rescale(x), [[[-1, 0, 1, -1]]])
    y = np.linspace(0, 100, 1001, dtype=np.float32)[None, None]
    assert rescale(y, 50.0).max() == 1.0 and rescale(y, 50.0)[0, 0, 500] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "values,reason",
    [(np.float32("nan"), "NaN/Inf voxels"), (np.float32("inf"), "NaN/Inf voxels")],
)
def test_rescale_rejects_non_finite(values, reason):
    x = np.ones((2, 3, 3), np.float32)
    x[1, 1, 1] = values
    with pytest.raises(SliceError, match=reason):
        rescale(x)


def test_rescale_rejects_all_zero():
    with pytest.raises(SliceError, match="all-zero"):
        rescale(np.zeros((2, 3, 3), np.float32))


def test_to_canvas_pads_and_crops_centered_in_float16():
    x = np.full((1, 4, 10), -1.0, np.float32)
    x[0, :, 2:8] = 0.0
    out = to_canvas(x, (8, 6))
    assert out.shape == (1, 8, 6) and out.dtype == np.float16
    assert (out[0, 2:6] == 0.0).all() and out[0, :2].max() == -1.0 and out[0, 6:].max() == -1.0
    assert intensity_max(np.arange(101, dtype=np.float32), 90.0) == (pytest.approx(90.0), True)
    assert intensity_max(np.arange(101, dtype=np.float32)) == (100.0, False)
    assert list(center_indices(16, 12)) == list(range(2, 14))
    assert list(center_indices(13, 12)) == list(range(0, 12))


def test_npy_shard_writer_streams_and_is_memory_mappable(tmp_path):
    path = tmp_path / "s.npy"
    with NpyShardWriter(path, (3, 4)) as w:
        assert w.append(np.full((2, 3, 4), 0.5)) == 0
        assert w.append(np.full((5, 3, 4), -0.25)) == 2
    arr = np.load(path, mmap_mode="r")
    assert arr.shape == (7, 3, 4) and arr.dtype == np.float16 and arr[1, 0, 0] == 0.5 and arr[6, 2, 3] == -0.25
    with pytest.raises(RuntimeError):
        with NpyShardWriter(tmp_path / "t.npy", (3, 4)) as w:
            w.append(np.zeros((1, 3, 4)))
            raise RuntimeError("job killed")
    assert not (tmp_path / "t.npy").exists() and list(tmp_path.iterdir()) == [path]


def run_shards(tmp_path, manifest, config):
    t = build_cohort(manifest, attributes=config["attributes"], regions=list(config["regions"]),
                     split=config["cohort"]["split"], subjects_per_shard=2, manifest_schema=SCHEMA)
    out = tmp_path / "pre"
    cfg = dict(config["preprocess"], canvas=[32, 32])
    results, idx, qua = [], [], []
    for k in sorted(t.images["shard"].unique()):
        r = preprocess_shard(t.images, k, regions=config["regions"], preprocess=cfg, out_slices=out / f"shard-{k}.npy",
                             out_index=out / f"index-{k}.parquet", out_quarantine=out / f"quarantine-{k}.parquet", threads=2)
        results.append(r)
        idx.append(pl.read_parquet(out / f"index-{k}.parquet"))
        qua.append(pl.read_parquet(out / f"quarantine-{k}.parquet"))
    return t, results, pl.concat(idx), pl.concat(qua), out


def test_shards_hold_every_slice_with_index_and_center_flags(tmp_path, config):
    t, results, index, quarantine, out = run_shards(tmp_path, small_manifest(tmp_path, 6), config)
    assert quarantine.height == 0
    assert index.height == 18 * 16 and sum(r.n_slices for r in results) == index.height
    assert index.group_by("image_uid").agg(pl.col("is_center").sum())["is_center"].unique().to_list() == [12]
    store = SliceStore(index, out)
    batch = store.read(index.head(5))
    assert batch.shape == (5, 32, 32) and batch.min() >= -1.0 and batch.max() <= 1.0
    assert center_crop(batch, 16).shape == (5, 16, 16)
    # the stored slice equals the slice computed directly from the NIfTI file
    row = index.filter((pl.col("subject_id") == "T0003") & (pl.col("region") == "chest") & (pl.col("slice_position") == 7))
    img = nib.load(tmp_path / "images" / "T0003_chest.nii.gz")
    vol = np.asarray(img.dataobj, np.float32)
    direct = to_canvas(rescale(slice_stack(vol, img.affine)), (32, 32), np.float32)[7]
    np.testing.assert_allclose(store.read(row)[0], direct, atol=1e-3)



def test_reads_in_any_row_order_equal_slice_by_slice_reads(tmp_path):
    """store.read takes a sequential path for runs of consecutive shard rows and fancy indexing otherwise: both
    give each requested row's slice, in the order asked, across shards."""
    rng = np.random.default_rng(0)
    shards = {k: rng.normal(size=(7, 4, 5)).astype(np.float32) for k in (0, 1)}
    for k, a in shards.items():
        np.save(tmp_path / f"shard-{k}.npy", a)
    index = pl.DataFrame({"shard": [0] * 7 + [1] * 7, "row": list(range(7)) * 2})
    store = SliceStore(index, tmp_path)
    for rows in ([0, 1, 2], [3, 1, 6, 0], [7, 8, 9, 2, 3], [13, 0, 12, 1], [5], [9, 8, 10, 11]):
        got = store.read(index[rows])
        want = np.stack([shards[int(index["shard"][r])][int(index["row"][r])] for r in rows])
        np.testing.assert_array_equal(got, want)


def corrupt(tmp_path, name, how):
    path = tmp_path / "images" / name
    if how == "nan":
        d = np.ones((16, 40, 40), np.float32); d[3, 3, 3] = np.nan; write_volume(path, data=d)
    elif how == "zero":
        write_volume(path, data=np.zeros((16, 40, 40), np.float32))
    elif how == "4d":
        write_volume(path, data=np.ones((16, 40, 40, 2), np.float32))
    elif how == "few":
        write_volume(path, data=np.ones((8, 40, 40), np.float32))
    elif how == "truncated":
        raw = path.read_bytes(); path.write_bytes(raw[: len(raw) // 2])
    elif how == "2d":
        write_volume(path, data=np.ones((40, 40), np.float32))


@pytest.mark.parametrize(
    "how,reason",
    [
        ("nan", "NaN/Inf"),
        ("zero", "all-zero"),
        ("4d", "wrong dimensionality"),
        ("few", "too few slices: 8 < center_slices 12"),
        ("truncated", "gzip"),
        ("2d", "wrong dimensionality"),
    ],
)
def test_bad_images_are_quarantined_and_counts_reconcile(tmp_path, config, how, reason):
    manifest = small_manifest(tmp_path, 4)
    corrupt(tmp_path, "T0002_lumbar.nii.gz", how)
    t, results, index, quarantine, _ = run_shards(tmp_path, manifest, config)
    assert quarantine.height == 1, quarantine
    q = quarantine.row(0, named=True)
    assert q["image_uid"] == "T0002/lumbar" and q["stage"] == "preprocess" and reason in q["reason"], q["reason"]
    assert index.filter(pl.col("image_uid") == "T0002/lumbar").height == 0
    assert t.n_manifest_rows == index["image_uid"].n_unique() + quarantine.height + t.quarantine.height

"""Tests for cohortlens.io.readers on real files from pydicom, pydicom-data and nibabel.

Test files that get modified are copied into tmp_path first.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIB_DATA
from PIL import Image
from pydicom.data import get_testdata_file

from cohortlens.io.image import ImageReadError, LoadedImage, rgb_to_gray
from cohortlens.io.readers import read_image

NIB_DATA = Path(NIB_DATA)
DICOMDIRTESTS = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"
CT5N = DICOMDIRTESTS / "98892001" / "CT5N"  # 5 axial CT slices, 2.5 mm apart
CT2 = DICOMDIRTESTS / "77654033" / "CT2"  # 4 axial CT slices, one 202.5 mm away
MR700 = DICOMDIRTESTS / "98892003" / "MR700"  # 7 radial slices, 7 orientations
SECRET = "SECRET"


def data(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(path)


def ras(lps) -> np.ndarray:
    x, y, z = (float(v) for v in lps)
    return np.array([-x, -y, z])


def slices_by_normal(files) -> list[pydicom.Dataset]:
    """Independent reference ordering: IPP projected on row x column cosines."""
    dss = [pydicom.dcmread(f) for f in files]

    def along_normal(ds):
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        return float(np.cross(iop[:3], iop[3:]) @ np.array(ds.ImagePositionPatient, dtype=float))

    return sorted(dss, key=along_normal)


def modality_values(ds: pydicom.Dataset, pixels: np.ndarray | None = None) -> np.ndarray:
    pixels = ds.pixel_array if pixels is None else pixels
    return pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def assert_volume_matches_slices(img: LoadedImage, slices: list[pydicom.Dataset]) -> None:
    """Affine maps voxel (i, j, k) to the RAS position of pixel (row j, col i) of slice k."""
    assert img.array.dtype == np.float32
    assert img.affine is not None and img.affine.shape == (4, 4) and img.affine.dtype == np.float64
    assert img.array.shape == (slices[0].Columns, slices[0].Rows, len(slices))
    for k, ds in enumerate(slices):
        origin = img.affine @ [0, 0, k, 1]
        np.testing.assert_allclose(origin[:3], ras(ds.ImagePositionPatient), atol=1e-3)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        step_i = img.affine @ [1, 0, k, 1] - origin
        step_j = img.affine @ [0, 1, k, 1] - origin
        np.testing.assert_allclose(step_i[:3], ras(iop[:3] * col_spacing), atol=1e-4)
        np.testing.assert_allclose(step_j[:3], ras(iop[3:] * row_spacing), atol=1e-4)
        np.testing.assert_array_equal(img.array[:, :, k], modality_values(ds).T.astype(np.float32))


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- NIfTI


def test_nifti_matches_nibabel():
    path = NIB_DATA / "anatomical.nii"
    img = read_image(path)
    ref = nib.load(path)
    assert img.kind == "nifti"
    assert img.array.dtype == np.float32 and img.array.shape == (33, 41, 25)
    np.testing.assert_array_equal(img.array, ref.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(img.affine, ref.affine)
    assert img.affine.dtype == np.float64


def test_nifti_4d_is_returned_as_is():
    img = read_image(str(NIB_DATA / "example4d.nii.gz"))  # str paths work too
    assert img.array.shape == (128, 96, 24, 2)
    assert img.array.dtype == np.float32


def test_nifti_trailing_singleton_axes_beyond_three_are_dropped(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(
        nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6, 1, 1), affine), tmp_path / "a.nii"
    )
    nib.save(nib.Nifti1Image(np.ones((4, 5, 1), dtype=np.uint8), affine), tmp_path / "b.nii.gz")
    a = read_image(tmp_path / "a.nii")
    assert a.array.shape == (4, 5, 6)
    np.testing.assert_array_equal(a.array, np.arange(120).reshape(4, 5, 6))
    assert read_image(tmp_path / "b.nii.gz").array.shape == (4, 5, 1)  # spatial singleton stays


def test_nifti_scaling_is_applied(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    nii = nib.Nifti1Image(raw, np.eye(4))
    nii.header.set_slope_inter(2.0, 10.0)
    nib.save(nii, tmp_path / "scaled.nii.gz")
    img = read_image(tmp_path / "scaled.nii.gz")
    np.testing.assert_array_equal(img.array, raw * 2.0 + 10.0)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_nifti_gz(tmp_path, keep):
    rng = np.random.default_rng(0)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(32, 32, 32)).astype(np.float32), np.eye(4)), path)
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])  # 0.01: cut inside the header
    with pytest.raises(ImageReadError, match=r"^truncated gzip: "):
        read_image(path)


def test_unreadable_nifti(tmp_path):
    (tmp_path / "garbage.nii").write_bytes(np.random.default_rng(1).bytes(2000))
    with pytest.raises(ImageReadError, match=r"^unreadable NIfTI: "):
        read_image(tmp_path / "garbage.nii")
    shutil.copy(NIB_DATA / "anatomical.nii", tmp_path / "not_gzipped.nii.gz")
    with pytest.raises(ImageReadError, match=r"^unreadable NIfTI: not gzip-compressed"):
        read_image(tmp_path / "not_gzipped.nii.gz")


@pytest.mark.parametrize("name", ["nope.nii.gz", "nope.dcm", "nope_dir"])
def test_missing_path(tmp_path, name):
    with pytest.raises(ImageReadError) as err:
        read_image(tmp_path / name)
    assert str(err.value) == "missing file"


# ----------------------------------------------------------------------- DICOM series


def test_series_ct5n_sorted_by_position_not_instance_number():
    files = sorted(CT5N.iterdir())
    slices = slices_by_normal(files)
    # The fixture is only a meaningful test of the ordering because both the
    # file names and InstanceNumber run against the normal.
    assert [ds.InstanceNumber for ds in slices] == [10, 9, 8, 7, 6]
    img = read_image(CT5N)
    assert img.kind == "dicom-series"
    assert img.array.shape == (16, 16, 5)
    assert_volume_matches_slices(img, slices)
    assert np.linalg.norm(img.affine[:3, 2]) == pytest.approx(2.5)
    assert img.array.min() < -500  # RescaleIntercept -1024 applied (HU)


def test_series_nibabel_pair_as_two_slices(tmp_path):
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(NIB_DATA / name, tmp_path / name)
    img = read_image(tmp_path)
    assert img.kind == "dicom-series"
    assert img.array.shape == (256, 256, 2)
    assert_volume_matches_slices(img, slices_by_normal(sorted(tmp_path.iterdir())))


def rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


@pytest.mark.parametrize("tilt_mm", [0.0, 0.7])
def test_series_oblique_and_tilted_affine_matches_every_ipp(tmp_path, tilt_mm):
    """CT5N rotated into an oblique plane, optionally with a gantry-tilt shear.

    File names and InstanceNumbers are scrambled, so only the positions can
    give the right order.
    """
    rot = rotation(np.radians(25), np.radians(-40))
    names = ["c", "a", "e", "b", "d"]
    for k, ds in enumerate(slices_by_normal(sorted(CT5N.iterdir()))):
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        row, col = rot @ iop[:3], rot @ iop[3:]
        ipp = rot @ np.array(ds.ImagePositionPatient, dtype=float) + k * tilt_mm * col
        ds.ImageOrientationPatient = [round(float(v), 6) for v in np.r_[row, col]]
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        ds.InstanceNumber = (k * 3) % 5 + 1
        ds.save_as(tmp_path / names[k])
    img = read_image(tmp_path)
    assert_volume_matches_slices(img, slices_by_normal(sorted(tmp_path.iterdir())))


def test_series_ignores_non_dicom_files_dicomdir_and_recurses(tmp_path):
    for i, f in enumerate(sorted(CT5N.iterdir())):
        sub = tmp_path / ("a" if i % 2 else "b") / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, sub / f.name)
    shutil.copy(DICOMDIRTESTS / "DICOMDIR", tmp_path / "DICOMDIR")
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / "thumb.dcm").write_bytes(b"\x89PNG not really")
    img = read_image(tmp_path)
    assert img.array.shape == (16, 16, 5)


def test_series_ct2_has_a_gap():
    # CT2 is slices 18, 180, 181, 182 of a scan: one slice 202.5 mm below three
    # contiguous 1.25 mm slices.
    with pytest.raises(ImageReadError) as err:
        read_image(CT2)
    assert str(err.value) == (
        "DICOM series has a gap: spacing 1.25 mm expected, 202.5 mm between slices 0 and 1"
    )


def test_series_with_middle_slice_removed(tmp_path):
    folder = copy_dir(CT5N, tmp_path / "ct")
    middle = slices_by_normal(sorted(folder.iterdir()))[2]
    (folder / Path(middle.filename).name).unlink()
    with pytest.raises(ImageReadError) as err:
        read_image(folder)
    assert str(err.value) == "DICOM series has a gap: spacing 2.5 mm expected, 5.0 mm between slices 1 and 2"


def test_series_duplicate_position(tmp_path):
    folder = copy_dir(CT5N, tmp_path / "ct")
    shutil.copy(folder / "3023", folder / "3023_again")
    with pytest.raises(ImageReadError, match="duplicate slice positions: 6 slices at 5 distinct positions"):
        read_image(folder)


def shift_slice(folder: Path, sorted_index: int, mm: float) -> None:
    ds = slices_by_normal(sorted(folder.iterdir()))[sorted_index]
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ipp[2] += mm  # CT5N is axial: z is the normal
    ds.ImagePositionPatient = ipp
    ds.save_as(ds.filename)


def test_series_uneven_spacing(tmp_path):
    folder = copy_dir(CT5N, tmp_path / "ct")
    shift_slice(folder, 2, 0.5)
    with pytest.raises(ImageReadError, match=r"^DICOM series has uneven spacing: spacing 2.5 mm expected, "):
        read_image(folder)


def test_spacing_tolerance_is_configurable(tmp_path):
    folder = copy_dir(CT5N, tmp_path / "ct")
    shift_slice(folder, 2, 0.075)  # 3 % of the 2.5 mm spacing
    assert read_image(folder).array.shape == (16, 16, 5)
    with pytest.raises(ImageReadError, match="uneven spacing"):
        read_image(folder, spacing_tolerance=0.01)


def test_series_mr700_is_radial_not_a_volume():
    # MR700 looks like an oblique stack, but every slice has its own row
    # cosine: the planes rotate about a shared axis (a radial acquisition).
    with pytest.raises(ImageReadError, match="mixes orientations: 7 distinct orientations among 7 slices"):
        read_image(MR700)


def test_folder_with_several_series(tmp_path):
    with pytest.raises(ImageReadError, match="holds 3 series"):
        read_image(DICOMDIRTESTS / "98892003" / "MR2")
    folder = copy_dir(CT5N, tmp_path / "mixed")
    for f in CT2.iterdir():
        shutil.copy(f, folder / f"ct2_{f.name}")
    with pytest.raises(ImageReadError) as err:
        read_image(folder)
    assert str(err.value) == "DICOM folder holds 2 series; expected one"


def test_folder_without_dicom_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    shutil.copy(DICOMDIRTESTS / "DICOMDIR", tmp_path / "DICOMDIR")
    with pytest.raises(ImageReadError, match="no DICOM images in folder"):
        read_image(tmp_path)


def test_folder_with_one_projection_image():
    img = read_image(DICOMDIRTESTS / "77654033" / "CR1")
    assert img.kind == "dicom-single" and img.array.shape == (16, 16) and img.affine is None


# ------------------------------------------------------------------ single DICOM files


def test_single_ct_slice_is_a_one_slice_volume():
    path = data("CT_small.dcm")
    img = read_image(path)
    ds = pydicom.dcmread(path)
    assert img.kind == "dicom-single"
    assert img.array.shape == (128, 128, 1)
    assert_volume_matches_slices(img, [ds])
    np.testing.assert_allclose(img.affine[:3, 2], [0, 0, float(ds.SliceThickness)])


def test_xray_monochrome1_inverted_high_is_bright():
    path = data("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    img = read_image(path)
    assert img.kind == "dicom-single" and img.affine is None
    assert img.array.shape == (1955, 1841) and img.array.dtype == np.float32
    np.testing.assert_array_equal(img.array, (2**15 - 1) - ds.pixel_array.astype(np.float32))


def test_monochrome1_with_rescale_is_reflected_within_the_rescaled_range():
    path = DICOMDIRTESTS / "77654033" / "CR1" / "6154"  # no extension; slope 0.684, intercept 200
    ds = pydicom.dcmread(path)
    lo, hi = 200.0, (2**ds.BitsStored - 1) * 0.684 + 200.0
    img = read_image(path)
    np.testing.assert_allclose(img.array, lo + hi - modality_values(ds), rtol=1e-6)


def test_jpeg2000_matches_uncompressed():
    lossless = read_image(data("MR_small_jp2klossless.dcm"))
    plain = read_image(data("MR_small.dcm"))
    assert lossless.array.shape == (64, 64, 1)
    np.testing.assert_array_equal(lossless.array, plain.array)
    np.testing.assert_array_equal(lossless.affine, plain.affine)
    nm = read_image(data("JPEG2000.dcm"))  # signed 16-bit NM, no geometry -> 2-D
    assert nm.affine is None and nm.array.shape == (1024, 256) and nm.array.min() < 0
    np.testing.assert_array_equal(nm.array, read_image(data("JPEG2000_UNC.dcm")).array)


def test_rgb_dicom_becomes_luminance():
    path = data("SC_rgb.dcm")
    img = read_image(path)
    assert img.array.shape == (100, 100) and img.affine is None
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float64)
    np.testing.assert_allclose(img.array, rgb @ [0.299, 0.587, 0.114], atol=1e-3)


def test_jpeg_baseline_ybr_decodes_close_to_uncompressed():
    jpeg = read_image(data("SC_rgb_jpeg_dcmtk.dcm"))  # lossy baseline JPEG, YBR_FULL
    plain = read_image(data("SC_rgb.dcm"))
    assert jpeg.array.shape == (100, 100)
    assert np.abs(jpeg.array - plain.array).max() < 4
    lossless = read_image(data("SC_rgb_jpeg_gdcm.dcm"))  # JPEG lossless process 14
    np.testing.assert_array_equal(lossless.array, plain.array)


def test_enhanced_ct_multiframe_geometry_from_functional_groups():
    path = data("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    img = read_image(path)
    assert img.kind == "dicom-multiframe" and img.array.shape == (512, 512, 2)
    # Normal is -z here, so the frame at z=-149 comes before the one at z=-159.
    positions = [
        fg.PlanePositionSequence[0].ImagePositionPatient for fg in ds.PerFrameFunctionalGroupsSequence
    ]
    assert [float(p[2]) for p in positions] == [-159.0, -149.0]
    for k, frame in enumerate([1, 0]):
        np.testing.assert_allclose((img.affine @ [0, 0, k, 1])[:3], ras(positions[frame]), atol=1e-6)
        expected = ds.pixel_array[frame].astype(np.float32) - 1024  # shared PixelValueTransformation
        np.testing.assert_array_equal(img.array[:, :, k], expected.T)
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), [0.388672, 0.388672, 10.0])


def test_multiframe_without_geometry_is_rejected():
    # pydicom-data's emri_small.dcm is an Enhanced MR object whose functional
    # groups were stripped: 10 frames, no positions, no pixel spacing.
    with pytest.raises(ImageReadError, match=r"multi-frame image without plane geometry \(10 frames\)"):
        read_image(data("emri_small.dcm"))


def test_truncated_pixel_data():
    with pytest.raises(ImageReadError, match=r"^unreadable DICOM: pixel data could not be decoded"):
        read_image(data("MR_truncated.dcm"))


def test_garbage_named_dcm(tmp_path):
    (tmp_path / "x.dcm").write_bytes(np.random.default_rng(2).bytes(4096))
    with pytest.raises(ImageReadError) as err:
        read_image(tmp_path / "x.dcm")
    assert str(err.value) == "unreadable DICOM: not a DICOM file"


def test_dicom_without_pixels(tmp_path):
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(data("rtplan.dcm"))


def test_unknown_extension(tmp_path):
    (tmp_path / "scan.xyz").write_bytes(b"hello world" * 50)
    with pytest.raises(ImageReadError) as err:
        read_image(tmp_path / "scan.xyz")
    assert str(err.value) == "unsupported image format: .xyz"
    shutil.copy(data("CT_small.dcm"), tmp_path / "scan.bin")  # any name works for real DICOM
    assert read_image(tmp_path / "scan.bin").array.shape == (128, 128, 1)


# ------------------------------------------------------------------------------ privacy


def write_secret_copy(src: Path, dst: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.PatientName = "SECRET^NAME"
    ds.PatientID = "SECRET-ID-42"
    ds.InstitutionName = "SECRET HOSPITAL"
    ds.AccessionNumber = "SECRETACC"
    ds.save_as(dst)
    return dst


def assert_no_secret(obj) -> None:
    assert SECRET not in repr(obj)
    assert SECRET not in str(obj)


def test_header_values_do_not_leave_the_reader(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        img = read_image(write_secret_copy(data("CT_small.dcm"), tmp_path / "ok.dcm"))
        assert set(vars(img)) == {"array", "affine", "kind"}
        assert img.array.dtype == np.float32 and img.affine.dtype == np.float64
        assert_no_secret(img)

        # Error paths: undecodable pixels in a single file, a gap in a series.
        bad = write_secret_copy(data("MR_truncated.dcm"), tmp_path / "bad.dcm")
        series = tmp_path / "series"
        series.mkdir()
        for f in sorted(CT2.iterdir()):
            write_secret_copy(f, series / f.name)
        for target in (bad, series):
            with pytest.raises(ImageReadError) as err:
                read_image(target)
            assert_no_secret(err.value)
            assert err.value.__cause__ is None

    for w in caught:
        assert SECRET not in str(w.message)
    assert SECRET not in caplog.text


# ------------------------------------------------------------------------------ raster


def test_png_rgb_to_luminance(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, size=(12, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    img = read_image(tmp_path / "x.png")
    assert img.kind == "raster" and img.affine is None and img.array.dtype == np.float32
    assert img.array.shape == (12, 7)
    np.testing.assert_allclose(img.array, rgb.astype(np.float64) @ [0.299, 0.587, 0.114], atol=1e-3)
    np.testing.assert_array_equal(img.array, rgb_to_gray(rgb))


def test_png_16bit_keeps_full_range(tmp_path):
    values = (np.arange(60, dtype=np.uint16) * 1000).reshape(6, 10)
    Image.fromarray(values).save(tmp_path / "deep.PNG")  # suffix is case-insensitive
    np.testing.assert_array_equal(read_image(tmp_path / "deep.PNG").array, values)


def test_jpeg_exif_orientation_gives_display_orientation(tmp_path):
    stored = np.tile(np.linspace(0, 250, 40).astype(np.uint8), (20, 1))  # 20 rows x 40 cols
    stored[:5] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=100, exif=exif)
    img = read_image(tmp_path / "photo.jpg")
    assert img.array.shape == (40, 20)
    assert np.abs(img.array - np.rot90(stored, -1)).max() < 8


def test_truncated_png(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    blob = (tmp_path / "x.png").read_bytes()
    (tmp_path / "x.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageReadError, match=r"^unreadable image: "):
        read_image(tmp_path / "x.png")


def test_nifti2_and_nifti1_gz_read_identically_to_nibabel(tmp_path):
    import nibabel as nib

    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    for cls, name in ((nib.Nifti1Image, "a.nii.gz"), (nib.Nifti2Image, "b.nii.gz")):
        img = cls(data, affine)
        img.header.set_slope_inter(0.5, 10)
        nib.save(img, tmp_path / name)
        got = read_image(tmp_path / name)
        ref = nib.load(tmp_path / name)
        assert np.array_equal(got.array, ref.get_fdata(dtype=np.float32)), name
        assert np.allclose(got.affine, ref.affine)

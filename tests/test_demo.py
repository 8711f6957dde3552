"""The synthetic demo cohort: files, determinism, and that every planted effect is really there."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cohortlens.demo import phantom as ph
from cohortlens.demo import population as pop
from cohortlens.demo.generate import generate_demo_cohort
from cohortlens.demo.phantom import phantom_volume

N_COHORT, SIZE, N_SLICES = 200, 48, 8
EFFECT_NAMES = {"sex_shape_texture", "age_anatomy", "weight_fat", "height_vertebrae", "site_fov_shift",
                "site_flat_neck", "discordant_sex"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = generate_demo_cohort(out, n_subjects=N_COHORT, size=SIZE, n_slices=N_SLICES,
                                   dicom_fraction=0.1, seed=7, workers=2)
    with open(summary["manifest"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    gt = json.loads(Path(summary["ground_truth"]).read_text())
    return out, summary, rows, gt


def read_dicom_series(folder: Path) -> tuple[np.ndarray, list]:
    """(x, y, z) RAS array from a sagittal series, sorted by position along the slice normal."""
    dss = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    iop = np.asarray(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(normal @ np.asarray(d.ImagePositionPatient, float)))
    # rows run inferior (-S), columns posterior (+P): flip both to get (y: P->A, z: I->S)
    vol = np.stack([d.pixel_array.T[::-1, ::-1] for d in dss])
    return vol, dss


def load_image(root: Path, rel: str) -> np.ndarray:
    path = root / rel
    if path.is_dir():
        return read_dicom_series(path)[0]
    return np.asanyarray(nib.load(path).dataobj)


def center_slices(subjects, region, size, n_slices=4, seed=0):
    """Volume-max-normalised centre slices rendered in memory, flattened."""
    out = []
    for s in subjects:
        v = pop.render_subject(s, region, size, n_slices, seed).astype(np.float32)
        out.append((v[n_slices // 2] / v.max()).ravel())
    return np.stack(out)


# ---------------------------------------------------------------- files and determinism


@pytest.mark.slow
def test_manifest_columns_and_ranges(cohort):
    out, summary, rows, _ = cohort
    assert summary["n_subjects"] == N_COHORT and summary["n_images"] == 3 * N_COHORT == len(rows)
    assert tuple(rows[0].keys()) == pop.MANIFEST_COLUMNS
    by_subject = {}
    for r in rows:
        by_subject.setdefault(r["subject_id"], []).append(r["region"])
        assert r["sex"] in {"F", "M"}
        assert 20 <= float(r["age"]) <= 72
        assert 1.45 <= float(r["height"]) <= 2.05
        assert 40 <= float(r["weight"]) <= 150
        assert r["site"] in pop.SITES
        assert "2014-06-01" <= r["date"] <= "2017-05-31"
        assert (out / r["image"]).exists(), r["image"]
        assert not Path(r["image"]).is_absolute()
    assert list(by_subject) == [f"S{i:05d}" for i in range(1, N_COHORT + 1)]
    assert all(sorted(v) == sorted(pop.REGIONS) for v in by_subject.values())
    subjects = {r["subject_id"]: r for r in rows}.values()
    frac_m = np.mean([r["sex"] == "M" for r in subjects])
    assert 0.35 < frac_m < 0.65
    h = {sx: np.mean([float(r["height"]) for r in subjects if r["sex"] == sx]) for sx in "FM"}
    assert h["M"] - h["F"] > 0.08
    hw = np.array([[float(r["height"]), float(r["weight"])] for r in subjects])
    assert np.corrcoef(hw.T)[0, 1] > 0.2
    assert {pop.study_year(r["date"]) for r in subjects} == {1, 2, 3}


def test_nifti_geometry(cohort):
    out, _, rows, _ = cohort
    rel = next(r["image"] for r in rows if r["image"].endswith(".nii.gz"))
    img = nib.load(out / rel)
    assert img.shape == (N_SLICES, SIZE, SIZE)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.count_nonzero(img.affine[:3, :3] - np.diag(np.diag(img.affine[:3, :3]))) == 0
    zooms = img.header.get_zooms()
    assert zooms[0] == max(zooms) and zooms[1] == zooms[2] == pytest.approx(280 / SIZE)
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.int16 and data.min() >= 0 and 800 < data.max() < 2000


@pytest.mark.slow
def test_same_seed_same_cohort_regardless_of_workers(tmp_path):
    kw = dict(n_subjects=24, size=32, n_slices=6, dicom_fraction=0.25, seed=3)
    a, b = tmp_path / "a", tmp_path / "b"
    generate_demo_cohort(a, workers=1, **kw)
    generate_demo_cohort(b, workers=2, **kw)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 24 * 3
    for rel in files_a:  # gzip without timestamps: byte-identical files, not just equal arrays
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = tmp_path / "c"
    generate_demo_cohort(c, workers=2, **{**kw, "seed": 4})
    assert (a / "manifest.csv").read_text() != (c / "manifest.csv").read_text()


def test_subjects_do_not_depend_on_cohort_size():
    assert pop.sample_subjects(10, 5) == pop.sample_subjects(25, 5)[:10]
    s = pop.sample_subject(5, 3)
    np.testing.assert_array_equal(pop.render_subject(s, "chest", 32, 4, 5),
                                  pop.render_subject(pop.sample_subjects(4, 5)[3], "chest", 32, 4, 5))


def test_ground_truth_lists_every_effect(cohort):
    _, _, rows, gt = cohort
    assert gt["seed"] == 7 and gt["n_subjects"] == N_COHORT and gt["size"] == SIZE and gt["n_slices"] == N_SLICES
    effects = {e["name"]: e for e in gt["effects"]}
    assert set(effects) == EFFECT_NAMES
    assert all(e["attribute"] in {"sex", "age", "weight", "height", "site"} for e in gt["effects"])
    assert effects["site_fov_shift"]["value"] == "Essen" and effects["site_fov_shift"]["regions"] == ["neck"]
    assert effects["site_fov_shift"]["shift_voxels"] == round(0.12 * SIZE)
    assert effects["site_flat_neck"]["value"] == "Neubrandenburg"
    assert effects["site_flat_neck"]["from_date"] == "2015-06-01"
    assert gt["negative_controls"] == [{"attribute": "date", **gt["negative_controls"][0]}]
    disc = effects["discordant_sex"]
    ids = {r["subject_id"] for r in rows}
    assert disc["subgroup"] and set(disc["subgroup"]) <= ids
    assert set(disc["subjects"]) == set(pop.REGIONS)
    flipped = set().union(*map(set, disc["subjects"].values()))
    assert flipped and flipped <= set(disc["subgroup"])


def test_discordant_flips_are_correlated_across_regions():
    subjects = pop.sample_subjects(5000, 11)
    n_flip = np.array([sum(s["feature_sex"][r] != s["sex"] for r in pop.REGIONS) for s in subjects])
    assert 0.025 < np.mean([s["discordant_subgroup"] for s in subjects]) < 0.055
    p = (n_flip.sum() / 3) / len(subjects)  # per-region flip rate
    assert 0.02 < p < 0.04
    expected_multi = len(subjects) * (3 * p ** 2 * (1 - p) + p ** 3)  # if regions flipped independently
    assert (n_flip >= 2).sum() > 5 * expected_multi
    assert all(s["feature_sex"][r] == s["sex"] for s in subjects if not s["discordant_subgroup"]
               for r in pop.REGIONS)


# ---------------------------------------------------------------- DICOM


@pytest.mark.slow
def test_dicom_series(cohort):
    out, _, rows, gt = cohort
    dicom_rows = [r for r in rows if r["image"].startswith("dicom/")]
    subjects = sorted({r["subject_id"] for r in dicom_rows})
    assert len(subjects) == round(0.1 * N_COHORT) and subjects == gt["dicom"]["subjects"]
    assert all({r["region"] for r in dicom_rows if r["subject_id"] == s} == set(pop.REGIONS) for s in subjects)
    sampled = {s["subject_id"]: s for s in pop.sample_subjects(N_COHORT, 7)}
    series_uids, shuffled_names, shuffled_numbers = set(), 0, 0
    for r in dicom_rows:
        folder = out / r["image"]
        names = sorted(p.name for p in folder.glob("*.dcm"))
        assert len(names) == N_SLICES
        vol, dss = read_dicom_series(folder)
        d0 = dss[0]
        assert d0.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert d0.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" == d0.file_meta.MediaStorageSOPClassUID
        assert d0.Modality == "MR" and d0.pixel_array.dtype == np.uint16
        assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.SOPInstanceUID for d in dss}) == N_SLICES
        series_uids.add(d0.SeriesInstanceUID)
        assert d0.StudyDate == r["date"].replace("-", "")
        assert d0.InstitutionName == f"{r['site']} Imaging Centre"
        assert d0.PatientID != r["subject_id"] and str(d0.PatientName).startswith("DEMO^PATIENT")
        # slice positions: equally spaced along the normal by the slice thickness, matching the NIfTI affine
        pos = np.array([d.ImagePositionPatient for d in dss], float)
        np.testing.assert_allclose(np.diff(-pos[:, 0]), float(d0.SliceThickness))
        aff = ph.affine(SIZE, N_SLICES)
        np.testing.assert_allclose(-pos[:, 0], aff[0, 3] + np.arange(N_SLICES) * aff[0, 0])
        np.testing.assert_allclose(pos[0, 1:], [-(aff[1, 3] + (SIZE - 1) * aff[1, 1]),
                                               aff[2, 3] + (SIZE - 1) * aff[2, 2]], atol=1e-6)
        np.testing.assert_allclose([float(v) for v in d0.PixelSpacing], [280 / SIZE] * 2)
        # the voxels are exactly what the NIfTI path would have held
        np.testing.assert_array_equal(vol, pop.render_subject(sampled[r["subject_id"]], r["region"], SIZE, N_SLICES, 7))
        by_file = [pydicom.dcmread(folder / n, stop_before_pixels=True) for n in names]
        shuffled_names += [float(d.SliceLocation) for d in by_file] != sorted(float(d.SliceLocation) for d in by_file)
        shuffled_numbers += [int(d.InstanceNumber) for d in dss] != list(range(1, N_SLICES + 1))
    assert len(series_uids) == len(dicom_rows)
    assert shuffled_names > len(dicom_rows) // 2 and shuffled_numbers == len(dicom_rows)


def test_dicom_identifiers_never_leak(cohort):
    out, summary, rows, _ = cohort
    text = Path(summary["manifest"]).read_text() + Path(summary["ground_truth"]).read_text()
    folders = sorted({r["image"] for r in rows if r["image"].startswith("dicom/")})
    assert folders
    for rel in folders:
        d = pydicom.dcmread(next((out / rel).glob("*.dcm")), stop_before_pixels=True)
        for value in (str(d.PatientName), d.PatientID, d.AccessionNumber, d.InstitutionName,
                      d.PatientBirthDate, d.StudyID, d.StudyInstanceUID, d.SeriesInstanceUID):
            assert value and value not in text, value
        assert str(d.PatientName)[len("DEMO^PATIENT"):].isdigit() and len(d.PatientID) == 11


# ---------------------------------------------------------------- planted effects, measured on the images


@pytest.mark.slow
def test_essen_neck_is_shifted_superiorly_and_only_the_neck(cohort):
    out, _, rows, gt = cohort
    shift = next(e for e in gt["effects"] if e["name"] == "site_fov_shift")["shift_voxels"]

    def mean_slice(region, essen):
        imgs = [load_image(out, r["image"])[N_SLICES // 2].astype(float) for r in rows
                if r["region"] == region and (r["site"] == "Essen") == essen]
        assert len(imgs) >= 20
        return np.mean(imgs, axis=0)  # (y, z)

    def best_z_offset(a, b, max_lag=12):
        """Lag d maximising the correlation of a[:, z + d] with b[:, z]."""
        scores = {}
        for d in range(-max_lag, max_lag + 1):
            x, y = (a[:, d:], b[:, : SIZE - d]) if d >= 0 else (a[:, :d], b[:, -d:])
            scores[d] = np.corrcoef(x.ravel(), y.ravel())[0, 1]
        return max(scores, key=scores.get)

    assert shift == 6
    assert abs(best_z_offset(mean_slice("neck", True), mean_slice("neck", False)) - shift) <= 1
    assert best_z_offset(mean_slice("chest", True), mean_slice("chest", False)) == 0
    assert best_z_offset(mean_slice("lumbar", True), mean_slice("lumbar", False)) == 0


def test_site_effects_touch_only_the_neck():
    s = {**pop.sample_subject(0, 1), "date": "2016-02-02"}
    for region in pop.REGIONS:
        ref = pop.render_subject({**s, "site": "Berlin"}, region, 32, 4, 0)
        for site in ("Essen", "Neubrandenburg"):
            same = np.array_equal(ref, pop.render_subject({**s, "site": site}, region, 32, 4, 0))
            assert same == (region != "neck"), (region, site)


def _neck_back_curvature(vol: np.ndarray) -> float:
    """Quadratic coefficient of the posterior skin line over the cervical rows (negative = lordosis)."""
    sl = vol[vol.shape[0] // 2].astype(float)  # (y: P->A, z: I->S)
    size = sl.shape[0]
    z = (np.arange(size) - (size - 1) / 2) * 280 / size
    rows = np.nonzero((z > -75) & (z < 35))[0]
    thr = 0.5 * np.percentile(sl, 99)
    edge = []
    for k in rows:
        prof = sl[:, k]
        j = int(np.argmax(prof > thr))
        edge.append(j - 1 + (thr - prof[j - 1]) / (prof[j] - prof[j - 1]))
    return float(np.polyfit(z[rows], edge, 2)[0])


def test_neubrandenburg_neck_flatter_from_year_two(cohort):
    out, _, rows, _ = cohort
    groups = {"nb_year1": [], "nb_later": [], "others": []}
    for r in rows:
        if r["region"] != "neck" or r["site"] == "Essen":
            continue
        if r["site"] != "Neubrandenburg":
            key = "others"
        else:
            key = "nb_year1" if pop.study_year(r["date"]) == 1 else "nb_later"
        groups[key].append(_neck_back_curvature(load_image(out, r["image"])))
    assert all(len(v) >= 5 for v in groups.values()), {k: len(v) for k, v in groups.items()}
    med = {k: np.median(v) for k, v in groups.items()}
    assert med["others"] < 0 and med["nb_year1"] < 0  # anterior bulge of the back of the neck: lordosis
    assert abs(med["nb_later"]) < 0.6 * abs(med["others"])
    assert abs(med["nb_later"]) < 0.6 * abs(med["nb_year1"])
    assert abs(med["nb_year1"]) > 0.6 * abs(med["others"])


def test_date_is_a_negative_control():
    s = pop.sample_subject(0, 5)
    for site in ("Berlin", "Essen", "Hamburg", "Mannheim"):
        for region in pop.REGIONS:
            imgs = [phantom_volume({**s, "site": site, "date": d}, region, 32, 4, np.random.default_rng(9))
                    for d in ("2014-07-01", "2015-12-24", "2017-05-30")]
            assert all(np.array_equal(imgs[0], im) for im in imgs[1:]), (site, region)
    nb = [phantom_volume({**s, "site": "Neubrandenburg", "date": d}, "neck", 32, 4, np.random.default_rng(9))
          for d in ("2014-07-01", "2015-05-31", "2015-06-01", "2017-05-30")]
    assert np.array_equal(nb[0], nb[1]) and np.array_equal(nb[2], nb[3]) and not np.array_equal(nb[1], nb[2])


@pytest.fixture(scope="module")
def memory_cohort():
    subjects = pop.sample_subjects(360, 21)
    return subjects, {r: center_slices(subjects, r, 32) for r in pop.REGIONS}


@pytest.mark.slow
def test_sex_is_linearly_separable_and_discordant_images_look_like_the_other_sex(memory_cohort):
    subjects, X = memory_cohort
    sex = np.array([s["sex"] == "M" for s in subjects])
    flipped_total, flipped_opposite = 0, 0
    for region in pop.REGIONS:
        flip = np.array([s["feature_sex"][region] != s["sex"] for s in subjects])
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
        pred = cross_val_predict(model, X[region], sex, cv=5)
        assert (pred == sex)[~flip].mean() > 0.85, region
        flipped_total += flip.sum()
        flipped_opposite += (pred != sex)[flip].sum()
    assert flipped_total >= 8
    assert flipped_opposite / flipped_total > 0.7


@pytest.mark.slow
def test_age_weight_height_are_linearly_measurable(memory_cohort):
    subjects, X = memory_cohort
    for attr, r_min in (("age", 0.6), ("weight", 0.6), ("height", 0.3)):
        y = np.array([s[attr] for s in subjects])
        for region in pop.REGIONS:
            pred = cross_val_predict(RidgeCV(alphas=np.logspace(-1, 4, 11)), X[region], y, cv=5)
            assert np.corrcoef(pred, y)[0, 1] > r_min, (attr, region)


def test_phantom_effects_change_the_intended_anatomy():
    base = dict(sex="F", age=40.0, height=1.72, weight=74.0, site="Berlin", date="2016-01-01")

    def render(**kw):
        return phantom_volume({**base, **kw}, "lumbar", 64, 4, np.random.default_rng(0), noise=False)[2]

    # fat: more bright voxels along the back with higher weight
    fat_thin, fat_thick = render(weight=55.0), render(weight=110.0)
    back = slice(0, 16)
    assert (fat_thick[back] > 600).sum() > 1.5 * (fat_thin[back] > 600).sum()
    # age: marrow and paraspinal muscle only get brighter, never darker (discs thin and dim locally)
    diff = render(age=70.0).astype(int) - render(age=22.0)
    assert (diff > 20).sum() > 3 * (diff < -20).sum() > 0
    # discordant: feature_sex renders the other sex's anatomy, nothing else about the subject changes
    assert np.array_equal(render(sex="M", feature_sex={"lumbar": "F"}), render(sex="F"))
    assert not np.array_equal(render(sex="M"), render(sex="F"))

"""Sagittal spine MRI phantoms for the synthetic demo cohort.

A volume is a mid-sagittal 2-D template (anterior-posterior x inferior-superior)
extruded laterally, with every structure given its own lateral half-width.
Array axes are (x, y, z) = (left->right slice axis, posterior->anterior,
inferior->superior), i.e. RAS+ with a diagonal affine (see :func:`affine`).

All anatomy is defined in millimetres, so the same subject renders consistently
at any matrix size; soft (tanh) edges about one voxel wide stand in for partial
volume so that small matrices do not alias.

The planted cohort effects (sex, age, BMI, height, site and site x date) are
all read from ``params`` + :data:`EFFECTS` inside :func:`phantom_volume`, which
is the single place that decides how an attribute changes the image. The
generator records the same :data:`EFFECTS` in ``ground_truth.json``. The test
scenarios (``scenarios.py``) pass their own effect table: without the two site
effects, and with the optional ``vendor_bias_field`` and ``site_protocol_change``
(:data:`SCENARIO_EFFECT_KEYS`), which the demo table leaves out.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping

import numpy as np

REGIONS = ("neck", "chest", "lumbar")
FOV_MM = 280.0
SLICE_THICKNESS_MM = 3.3  # at full resolution (NAKO-like); thicker on small matrices, see spacing()
MIN_SLICE_TO_PIXEL = 1.25
REFERENCE_HEIGHT_M = 1.72
REFERENCE_BMI = 25.0
REFERENCE_AGE = 20.0

# Parameters of the planted effects. Kept as plain JSON-able data so that the
# ground truth can be written from exactly the values the renderer used.
EFFECTS: dict = {
    "sex_shape_texture": {
        # Men: vertebral bodies deeper (AP) and wider; coarser, stronger marrow
        # trabecular texture; leaner (darker on T2) paraspinal/body-wall muscle.
        # The muscle and mean-marrow differences are what a linear model sees,
        # the shape and texture frequency are the "subtle" part.
        "male_vertebral_depth_factor": 1.10,
        "male_vertebral_width_factor": 1.10,
        "marrow_texture": {
            "F": {"amplitude": 0.08, "cycles_per_vertebra": 2.5},
            "M": {"amplitude": 0.25, "cycles_per_vertebra": 1.5},
        },
        "muscle_signal": {"F": 310.0, "M": 230.0},
    },
    "age_anatomy": {
        "reference_age": REFERENCE_AGE,
        "disc_height_fraction_per_year": -0.007,
        "disc_signal_fraction_per_year": -0.004,
        "marrow_signal_per_year": 5.0,
        # Fatty infiltration of the paraspinal (posterior) muscles only, so that
        # it is spatially distinct from the sex effect on all muscle.
        "paraspinal_muscle_signal_per_year": 2.0,
    },
    "weight_fat": {
        # Subcutaneous fat thickness (mm) = at_bmi_25 + per_bmi_unit * (BMI - 25), >= 1.5 mm.
        "reference_bmi": REFERENCE_BMI,
        "subcutaneous_fat_mm": {
            "neck": {"at_bmi_25": 7.0, "per_bmi_unit": 0.9},
            "chest": {"at_bmi_25": 11.0, "per_bmi_unit": 1.3},
            "lumbar": {"at_bmi_25": 15.0, "per_bmi_unit": 1.8},
        },
        "lumbar_abdomen_depth_mm_per_bmi_unit": 3.0,
    },
    "height_vertebrae": {
        # Vertebral body height multiplied by (height / reference) ** exponent.
        "reference_height_m": REFERENCE_HEIGHT_M,
        "exponent": 1.0,
        # taller people have larger vertebrae in every direction (depth and width too), not only taller ones:
        # with height acting on the vertebral height alone, the within-sex spread of height (±4 %) changed the
        # images less than the per-subject size jitter, and no embedding showed height beyond sex
        "body_size_exponent": 1.5,
    },
    "site_fov_shift": {
        "site": "Essen",
        "regions": ["neck"],
        "fov_fraction": 0.12,  # rounded to whole voxels: 8 at size 64
        "direction": "superior",
    },
    "site_flat_neck": {
        "site": "Neubrandenburg",
        "regions": ["neck"],
        "from_date": "2015-06-01",
        "lordosis_factor": 0.3,
    },
}

# Mid-sagittal anatomy per region, millimetres unless noted. y is measured
# from the FOV centre (positive anterior), z likewise (positive superior).
ANATOMY: dict = {
    "neck": dict(
        spine_y=-38.0, curve_amp=14.0, curve_z=-10.0, curve_width=75.0,
        anchor_z=70.0, direction=-1, first_offset=2.0,  # levels counted down from the skull base
        vert_height=15.0, disc_height=5.5, vert_depth=18.0, vert_width=20.0,
        canal_depth=13.0, canal_width=22.0, cord_depth=8.0, cord_width=12.0,
        spinous_length=18.0, spinous_slope=0.5, spinous_thickness=0.35,
        post_depth=50.0, ant_depth=60.0,
    ),
    "chest": dict(
        spine_y=-38.0, curve_amp=-22.0, curve_z=10.0, curve_width=120.0,
        anchor_z=130.0, direction=-1, first_offset=0.0,
        vert_height=20.0, disc_height=5.0, vert_depth=26.0, vert_width=30.0,
        canal_depth=12.0, canal_width=20.0, cord_depth=7.0, cord_width=10.0,
        spinous_length=24.0, spinous_slope=0.9, spinous_thickness=0.35,
        post_depth=52.0, ant_depth=215.0,
    ),
    "lumbar": dict(
        spine_y=-32.0, curve_amp=18.0, curve_z=25.0, curve_width=80.0,
        anchor_z=-80.0, direction=1, first_offset=None,  # None: one full disc above the sacrum
        vert_height=27.0, disc_height=10.0, vert_depth=34.0, vert_width=45.0,
        canal_depth=16.0, canal_width=24.0, cord_depth=0.0, cord_width=0.0,
        spinous_length=28.0, spinous_slope=0.15, spinous_thickness=0.5,
        post_depth=62.0, ant_depth=150.0, sacral_slope=0.9,
    ),
}

# T2w FSE-like tissue signal on a 0..1000 scale.
SIGNAL = dict(
    fat=820.0, csf=950.0, cord=420.0, disc=720.0, marrow=360.0, lung=40.0,
    vessel=70.0, brain=520.0, skull=80.0, viscera=330.0, air=0.0,
)
HEART_TO_MUSCLE = 0.8  # myocardium is muscle, so the heart carries the sex muscle signal too

# Per-subject anatomical jitter (standard deviations), independent of every attribute.
JITTER = dict(
    spine_y_mm=3.0, anchor_z_mm=3.0, curve_factor=0.15, size_factor=0.04,
    depth_factor=0.05, lateral_mm=2.0, organ_mm=8.0,
)
NOISE_SIGMA = 15.0
BIAS_SIGMA = 0.035
GAIN_SIGMA = 0.03
N_BOWEL_BLOBS = 8


def slice_thickness(size: int) -> float:
    """Sagittal slice thickness in mm.

    Readers find the slice axis as the one with the largest spacing, so the
    slices stay at least 1.25x thicker than the in-plane pixels even when a
    small matrix spreads the 280 mm FOV over pixels coarser than 3.3 mm
    (size 64: 4.375 mm pixels, 5.5 mm slices). Rounded to 0.25 mm.
    """
    return max(SLICE_THICKNESS_MM, math.ceil(MIN_SLICE_TO_PIXEL * FOV_MM / size * 4.0) / 4.0)


def spacing(size: int, n_slices: int) -> tuple[float, float, float]:
    """Voxel spacing (x, y, z) in mm: thick sagittal slices, square in-plane pixels."""
    return (slice_thickness(size), FOV_MM / size, FOV_MM / size)


def affine(size: int, n_slices: int) -> np.ndarray:
    """Diagonal RAS+ affine with the volume centred on the scanner origin."""
    sp = np.asarray(spacing(size, n_slices))
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = -0.5 * (np.array([n_slices, size, size]) - 1) * sp
    return aff


# Effects only the test scenarios plant; absent from EFFECTS, so the demo renders as before.
SCENARIO_EFFECT_KEYS = ("vendor_bias_field", "site_protocol_change")


def fov_shift_voxels(size: int, effects: Mapping = EFFECTS) -> int:
    """Essen superior shift in whole voxels, so that it is an exact image translation."""
    if "site_fov_shift" not in effects:
        return 0
    return int(round(effects["site_fov_shift"]["fov_fraction"] * size))


def _step(u, w):
    return 0.5 * (1.0 + np.tanh(u / w))


def _centerline(region: str, an: dict, z: np.ndarray, y_shift: float, curve_amp: float,
                anchor_z: float):
    """Spine centre line y_c(z), its slope, arc length, and the (sacrum-free) body line."""
    zf = np.linspace(z[0] - 40.0, z[-1] + 40.0, 8 * len(z) + 1)
    body = an["spine_y"] + y_shift + curve_amp * np.exp(
        -0.5 * ((zf - an["curve_z"]) / an["curve_width"]) ** 2)
    yc = body
    if region == "lumbar":
        # The sacrum bends posteriorly below L5/S1 (softplus keeps the kink
        # smooth); the back of the body does not follow it.
        w = 8.0
        yc = body - an["sacral_slope"] * w * np.logaddexp(0.0, (anchor_z - zf) / w)
    slope = np.gradient(yc, zf)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(yc), np.diff(zf)))])
    s_anchor = np.interp(anchor_z, zf, arc)
    return (np.interp(z, zf, yc), np.interp(z, zf, slope), np.interp(z, zf, arc) - s_anchor,
            np.interp(z, zf, body))


def _nearest_period(u, offset, period):
    """Distance (along u) to the nearest repeat of a periodic structure."""
    r = (u - offset) / period
    return np.abs(r - np.round(r)) * period


def _site_from_date(eff: Mapping | None, params: Mapping, region: str) -> bool:
    """Does a step change of one site from a date on (an effect entry, or None) apply to this image?"""
    return bool(eff) and (region in eff["regions"] and params["site"] == eff["site"]
                          and str(params["date"])[:10] >= eff["from_date"])


def _flatten_neck(params: Mapping, region: str, effects: Mapping) -> bool:
    return _site_from_date(effects.get("site_flat_neck"), params, region)


def _vendor_log_field(params: Mapping, region: str, effects: Mapping, yn, zn):
    """Extra log bias field of one scanner vendor (its receive chain), or None."""
    eff = effects.get("vendor_bias_field")
    if not eff or region not in eff["regions"] or params.get("vendor") != eff["vendor"]:
        return None
    c = eff["log_field"]
    return c["y"] * yn + c["z"] * zn + c["z2"] * zn ** 2


def phantom_volume(params: Mapping, region: str, size: int = 64, n_slices: int = 16,
                   rng: np.random.Generator | int | None = None,
                   effects: Mapping | None = None, noise: bool = True) -> np.ndarray:
    """Render one region of one subject as an int16 volume of shape (n_slices, size, size).

    ``params`` needs ``sex`` (F/M), ``age`` (years), ``height`` (m), ``weight`` (kg),
    ``site`` and ``date`` (ISO string); optional ``feature_sex`` maps a region to the
    sex whose features are rendered (the discordant subgroup). ``rng`` supplies the
    subject's anatomical jitter, texture phases, bias field and noise; it is always
    consumed identically, so an attribute never changes the random stream (the same
    rng seed with a different date renders the same image unless an effect applies).
    """
    if region not in ANATOMY:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    effects = EFFECTS if effects is None else effects
    rng = np.random.default_rng(rng)
    an = ANATOMY[region]

    # ---- random draws, fixed order and count -------------------------------
    j = rng.standard_normal(8)
    phase = rng.uniform(0.0, 2.0 * np.pi, 2)
    bias_c = rng.standard_normal(6) * BIAS_SIGMA
    gain = math.exp(GAIN_SIGMA * rng.standard_normal())
    blobs = rng.uniform(size=(N_BOWEL_BLOBS, 4))
    noise_re = rng.standard_normal((n_slices, size, size), dtype=np.float32)
    noise_im = rng.standard_normal((n_slices, size, size), dtype=np.float32)

    # ---- attribute-driven knobs --------------------------------------------
    sex_eff, age_eff = effects["sex_shape_texture"], effects["age_anatomy"]
    fsex = (params.get("feature_sex") or {}).get(region, params["sex"])
    male = fsex == "M"
    age_years = float(params["age"]) - age_eff["reference_age"]
    height = float(params["height"])
    bmi = float(params["weight"]) / height ** 2

    vox = FOV_MM / size
    w = max(0.5 * vox, 1.0)  # edge softness ~ one voxel of partial volume
    size_f = 1.0 + JITTER["size_factor"] * j[3]
    size_f *= (height / effects["height_vertebrae"]["reference_height_m"]) \
        ** effects["height_vertebrae"].get("body_size_exponent", 0.0)
    h_v = an["vert_height"] * size_f * (height / effects["height_vertebrae"]["reference_height_m"]) \
        ** effects["height_vertebrae"]["exponent"]
    h_d = an["disc_height"] * size_f * max(0.3, 1.0 + age_eff["disc_height_fraction_per_year"] * age_years)
    depth = an["vert_depth"] * size_f * (sex_eff["male_vertebral_depth_factor"] if male else 1.0)
    width = an["vert_width"] * size_f * (sex_eff["male_vertebral_width_factor"] if male else 1.0)
    tex = sex_eff["marrow_texture"]["M" if male else "F"]
    muscle = sex_eff["muscle_signal"]["M" if male else "F"]
    paraspinal = muscle + age_eff["paraspinal_muscle_signal_per_year"] * age_years
    marrow = SIGNAL["marrow"] + age_eff["marrow_signal_per_year"] * age_years
    disc_sig = SIGNAL["disc"] * max(0.3, 1.0 + age_eff["disc_signal_fraction_per_year"] * age_years)
    fat_p = effects["weight_fat"]["subcutaneous_fat_mm"][region]
    fat = max(1.5, fat_p["at_bmi_25"] + fat_p["per_bmi_unit"] * (bmi - effects["weight_fat"]["reference_bmi"]))

    curve_amp = an["curve_amp"] * (1.0 + JITTER["curve_factor"] * j[2])
    if _flatten_neck(params, region, effects):
        curve_amp *= effects["site_flat_neck"]["lordosis_factor"]
    z_shift = 0.0
    fov_eff = effects.get("site_fov_shift")
    if fov_eff and region in fov_eff["regions"] and params["site"] == fov_eff["site"]:
        z_shift = fov_shift_voxels(size, effects) * vox  # anatomy moves superiorly in the FOV

    # ---- 2-D mid-sagittal template ------------------------------------------
    coords = (np.arange(size) - 0.5 * (size - 1)) * vox
    z_rows = coords - z_shift  # anatomical z seen at each image row
    anchor_z = an["anchor_z"] + JITTER["anchor_z_mm"] * j[1]
    yc, slope, arc, ybody = _centerline(region, an, z_rows, JITTER["spine_y_mm"] * j[0], curve_amp,
                                        anchor_z)
    Y = coords[:, None]  # (y, 1)
    Z = z_rows[None, :]  # (1, z)
    delta = Y - yc[None, :]  # AP offset from the spine centre at the same height
    norm = np.sqrt(1.0 + slope ** 2)[None, :]
    t = delta / norm  # perpendicular to the spine, + anterior
    s = arc[None, :] + delta * (slope[None, :] / norm)
    u = an["direction"] * s  # along the spine from the anchor, increasing away from it
    first = an["first_offset"] if an["first_offset"] is not None else h_d
    valid = _step(u - first + 0.5 * h_d, w)  # vertebrae exist only on the spine side of the anchor
    period = h_v + h_d
    vcenter = first + 0.5 * h_v

    depth_f = 1.0 + JITTER["depth_factor"] * j[4]
    post = an["post_depth"] * depth_f
    ant = an["ant_depth"] * (1.0 + JITTER["depth_factor"] * j[5])
    if region == "lumbar":
        ant += effects["weight_fat"]["lumbar_abdomen_depth_mm_per_bmi_unit"] * (bmi - REFERENCE_BMI)
    if region == "neck":  # shoulders and upper back widen the body at the bottom of the FOV
        post = post + 25.0 * _step(-95.0 - Z, 15.0)
        ant = ant + 70.0 * _step(-85.0 - Z, 15.0)

    x_scan = (np.arange(n_slices) - 0.5 * (n_slices - 1)) * slice_thickness(size)
    x = x_scan - JITTER["lateral_mm"] * j[6]  # the subject lies slightly off the midline
    w_lat = 0.5 * slice_thickness(size)  # lateral edges softened over half a slice: the slab average

    def lateral(half_width):
        if half_width is None:
            return np.ones(n_slices, np.float32)
        return _step(half_width - np.abs(x), w_lat).astype(np.float32)

    vol = np.zeros((n_slices, size, size), np.float32)

    def paint(mask2d, value, half_width=None):
        alpha = lateral(half_width)[:, None, None] * np.asarray(mask2d, np.float32)[None]
        vol[...] += alpha * (np.asarray(value, np.float32) - vol)

    # Body wall: subcutaneous fat shell around muscle / soft tissue.
    db = Y - ybody[None, :]
    paint(_step(db + post + fat, w) * _step(ant + fat - db, w), SIGNAL["fat"])
    paint(_step(db + post, w) * _step(ant - db, w), muscle)
    paint(_step(db + post, w) * _step(-0.5 * depth - 4.0 - delta, w), paraspinal)

    organ_j = JITTER["organ_mm"] * j[7]
    if region == "neck":
        z_sb = anchor_z
        # Airway anterior to the cervical spine, up to the pharynx.
        paint(_step(7.0 - np.abs(t - (0.5 * depth + 14.0)), w) * _step(z_sb + 15.0 - Z, w),
              SIGNAL["air"], 8.0)
        # Head: scalp fat, skull, posterior fossa; the face stays soft tissue.
        cy, cz = np.interp(z_sb, z_rows, yc) - 5.0 + 0.5 * organ_j, z_sb + 85.0
        dy, dz = Y - cy, Z - cz
        rho = np.sqrt((dy / 92.0) ** 2 + (dz / 85.0) ** 2) + 1e-9
        dist = (rho - 1.0) * np.hypot(dy, dz) / rho  # signed distance along rays
        paint(_step(-dist, w), SIGNAL["fat"])
        paint(_step(-(dist + 5.0), w), SIGNAL["skull"])
        paint(_step(-(dist + 12.0), w) * _step(cy + 25.0 - Y, w), SIGNAL["brain"])
    elif region == "chest":
        paint(_step(delta - (0.5 * depth + 6.0), w) * _step(ant - 30.0 - delta, w), SIGNAL["lung"])
        paint(_step(11.0 - np.abs(t - (0.5 * depth + 13.0)), w), SIGNAL["vessel"], 10.0)
        hz = -45.0 + organ_j
        hy = np.interp(hz, z_rows, yc) + 0.5 * depth + 95.0
        paint(_step(1.0 - np.sqrt(((Y - hy) / 60.0) ** 2 + ((Z - hz) / 70.0) ** 2), w / 60.0),
              HEART_TO_MUSCLE * muscle, 50.0)
    else:
        # Abdomen with bowel loops (bright fluid / dark gas) at random positions.
        inside = _step(delta - (0.5 * depth + 4.0), w) * _step(ant - 8.0 - delta, w)
        by = yc[None, :] + 0.5 * depth + 20.0 + blobs[:, 0, None, None] * (ant - 0.5 * depth - 40.0)
        bz = (blobs[:, 1, None, None] - 0.5) * FOV_MM
        amp = blobs[:, 2, None, None] * 400.0 - 150.0
        sig = 10.0 + 12.0 * blobs[:, 3, None, None]
        bowel = (amp * np.exp(-0.5 * (((Y - by) ** 2 + (Z - bz) ** 2) / sig ** 2))).sum(0)
        paint(inside, np.clip(SIGNAL["viscera"] + bowel, 20.0, 900.0))
        paint(_step(10.0 - np.abs(t - (0.5 * depth + 14.0)), w) * inside, SIGNAL["vessel"], 10.0)

    # Vertebral bodies with sex-specific trabecular texture (attenuated by the
    # voxel's box average, so it never aliases on small matrices).
    along = _nearest_period(u, vcenter, period)
    body = _step(0.5 * h_v - along, w) * _step(0.5 * depth - np.abs(t), w) * valid
    k_tex = 2.0 * np.pi * tex["cycles_per_vertebra"] / h_v
    mtf = float(np.sinc(tex["cycles_per_vertebra"] / h_v * vox)) ** 2
    texture = 0.5 * (1.0 + np.cos(k_tex * u + phase[0]) * np.cos(k_tex * t + phase[1]) * mtf)
    paint(body, marrow * (1.0 - tex["amplitude"] * texture), 0.5 * width)
    # Discs: bright nucleus, darker annulus.
    disc = (1.0 - _step(0.5 * h_v - along, w)) * _step(0.5 * depth - np.abs(t), w) * valid
    disc = disc * _step(u - first + h_d, w)
    paint(disc, disc_sig * (0.55 + 0.45 * _step(0.35 * depth - np.abs(t), w)), 0.5 * width)
    if region == "lumbar":
        sac_depth = depth * np.clip(1.0 + u / 150.0, 0.3, 1.0)
        paint(_step(-u, w) * _step(0.5 * sac_depth - np.abs(t), w), 0.9 * marrow, 0.5 * width)

    # Spinal canal (CSF), cord, spinous processes.
    t_post = -0.5 * depth - 2.0
    canal = _step(t - (t_post - an["canal_depth"]), w) * _step(t_post - t, w)
    if region == "lumbar":  # the thecal sac ends around S2
        canal = canal * _step(u + 35.0, w)
    paint(canal, SIGNAL["csf"], 0.5 * an["canal_width"])
    if an["cord_depth"] > 0:
        t_cord = t_post - 0.5 * an["canal_depth"]
        paint(_step(0.5 * an["cord_depth"] - np.abs(t - t_cord), w), SIGNAL["cord"], 0.5 * an["cord_width"])
    t_arch = t_post - an["canal_depth"] - 3.0
    # Spinous processes slope caudally with depth; u runs cranially for the lumbar spine.
    u_sp = u + an["direction"] * an["spinous_slope"] * (t_arch - t)
    along_sp = _nearest_period(u_sp, vcenter, period)
    spinous = (_step(0.5 * an["spinous_thickness"] * h_v - along_sp, w)
               * _step(t - (t_arch - an["spinous_length"]), w) * _step(t_arch + 3.0 - t, w) * valid)
    paint(spinous, 0.85 * marrow, 5.0)

    # ---- acquisition: sequence contrast, receive-coil profile, smooth bias field, gain, Rician noise
    protocol = effects.get("site_protocol_change")
    if _site_from_date(protocol, params, region):
        # New sequence parameters change the T2 contrast of every tissue (a monotone signal curve).
        vol = (1000.0 * (np.maximum(vol, 0.0) / 1000.0) ** protocol["contrast_gamma"]).astype(np.float32)
    yn = coords[:, None] / (0.5 * FOV_MM)
    zn = coords[None, :] / (0.5 * FOV_MM)
    xn = x_scan[:, None, None] / (0.5 * FOV_MM)  # fields belong to the scanner, not the subject
    coil = 0.8 + 0.35 * np.exp(-(yn + 1.0) / 0.85)  # posterior spine coil
    poly2d = bias_c[0] * yn + bias_c[1] * zn + bias_c[2] * yn ** 2 + bias_c[3] * zn ** 2 + bias_c[4] * yn * zn
    vendor_field = _vendor_log_field(params, region, effects, yn, zn)
    if vendor_field is not None:
        poly2d = poly2d + vendor_field
    field = (gain * coil * np.exp(poly2d)).astype(np.float32)[None] * np.exp(bias_c[5] * xn).astype(np.float32)
    vol *= field
    if noise:
        vol = np.sqrt((vol + NOISE_SIGMA * noise_re) ** 2 + (NOISE_SIGMA * noise_im) ** 2)
    return np.clip(np.rint(vol), 0, 4095).astype(np.int16)


def effects_for_size(size: int, effects: Mapping = EFFECTS) -> dict:
    """Copy of the effect parameters with size-dependent values resolved."""
    out = copy.deepcopy(dict(effects))
    if "site_fov_shift" in out:
        out["site_fov_shift"]["shift_voxels"] = fov_shift_voxels(size, effects)
        out["site_fov_shift"]["shift_mm"] = fov_shift_voxels(size, effects) * FOV_MM / size
    return out

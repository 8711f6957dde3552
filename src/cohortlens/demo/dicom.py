"""DICOM MR series writer of the synthetic cohorts: one file per sagittal slice, shuffled file names,
interleaved InstanceNumbers, synthetic patient identifiers that must never reach ``results/``.

Called by ``write.py``; the voxels are exactly those of the NIfTI path.
"""

from __future__ import annotations

import datetime as dt
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from .phantom import REGIONS, affine, spacing
from .streams import IDENT_STREAM, seed_sequence

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_BODY_PART = {"neck": "CSPINE", "chest": "TSPINE", "lumbar": "LSPINE"}


def _identifiers(seed: int, subject: Mapping) -> dict:
    """Synthetic identifying header values (they must never reach the manifest)."""
    rng = np.random.default_rng(seed_sequence(seed, subject["index"], IDENT_STREAM))

    def digits(n: int) -> str:
        return "".join(str(d) for d in rng.integers(0, 10, n))

    acq = dt.date.fromisoformat(subject["date"])
    birth = acq - dt.timedelta(days=int(round(float(subject["age"]) * 365.25)))
    minutes = int(rng.integers(7 * 60, 19 * 60))
    return dict(
        PatientName=f"DEMO^PATIENT{digits(6)}",
        PatientID=f"PID{digits(8)}",
        AccessionNumber=f"ACC{digits(9)}",
        StudyID=f"ST{digits(6)}",
        PatientBirthDate=birth.strftime("%Y%m%d"),
        InstitutionName=f"{subject['site']} Imaging Centre",
        StudyDate=acq.strftime("%Y%m%d"),
        StudyTime=f"{minutes // 60:02d}{minutes % 60:02d}00",
    )


_PER_SLICE_TAGS = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)


def _encode(ds) -> bytes:
    """Explicit VR little endian encoding of a (partial) dataset, no preamble or meta."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds, parent_encoding="ISO_IR 100")
    return fp.getvalue()


def _ds(value: float) -> str:
    """Decimal string within the 16-character DS limit."""
    return f"{value:.10g}"


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit-VR little-endian data element (the handful of VRs used per slice)."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "OW") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in ("OB", "OW"):
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _file_meta(sop_uid: str) -> bytes:
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    body = b"".join((
        _element(0x00020001, "OB", b"\0\1"),
        _element(0x00020002, "UI", MR_IMAGE_STORAGE.encode()),
        _element(0x00020003, "UI", sop_uid.encode()),
        _element(0x00020010, "UI", str(ExplicitVRLittleEndian).encode()),
        _element(0x00020012, "UI", str(PYDICOM_IMPLEMENTATION_UID).encode()),
        _element(0x00020013, "SH", b"COHORTLENS_DEMO"),
    ))
    return _element(0x00020000, "UL", struct.pack("<I", len(body))) + body


def write_dicom_series(folder: Path, vol: np.ndarray, subject: Mapping, region: str,
                       size: int, n_slices: int, seed: int) -> None:
    """One MR series, one file per sagittal slice, files in shuffled order.

    Geometry matches the NIfTI affine: RAS voxel (i, j, k) maps to pixel
    (row = size-1-k, col = size-1-j) of slice i, with row cosine +P and column
    cosine -S in LPS. InstanceNumber follows an interleaved acquisition
    (even slices first), so only ImagePositionPatient gives the spatial order.

    pydicom spends ~5 ms encoding a 70-element dataset, which would dominate
    generation time, so the series-constant elements are encoded once by
    pydicom and the file meta and five per-slice elements are encoded here and
    spliced in at their tag-sorted positions (tests check the result is
    byte-identical to pydicom's own ``save_as``).
    """
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.dcm"):
        stale.unlink()
    ident = _identifiers(seed, subject)
    sx, sy, sz = spacing(size, n_slices)
    origin = affine(size, n_slices)[:3, 3]
    sid, rix = subject["subject_id"], REGIONS.index(region)
    ent = [str(seed), sid]
    acquisition = list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))
    instance_number = {sl: k + 1 for k, sl in enumerate(acquisition)}
    rng = np.random.default_rng(seed_sequence(seed, subject["index"], IDENT_STREAM, 1 + rix))
    file_order = rng.permutation(n_slices)
    pix = np.ascontiguousarray(vol[:, ::-1, ::-1].transpose(0, 2, 1)).astype("<u2")

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident["StudyDate"]
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ident["StudyTime"]
    ds.AccessionNumber = ident["AccessionNumber"]
    ds.Modality = "MR"
    # the confounded scenario records its scanner vendor where a real series does
    ds.Manufacturer = f"cohortlens phantom {subject['vendor']}" if subject.get("vendor") else "cohortlens phantom"
    ds.InstitutionName = ident["InstitutionName"]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "DEMO spine"
    ds.SeriesDescription = f"t2_tse_sag_{region}"
    ds.PatientName = ident["PatientName"]
    ds.PatientID = ident["PatientID"]
    ds.PatientBirthDate = ident["PatientBirthDate"]
    ds.PatientSex = subject["sex"]
    ds.PatientAge = f"{int(float(subject['age'])):03d}Y"
    ds.PatientSize = f"{float(subject['height']):.2f}"
    ds.PatientWeight = f"{float(subject['weight']):.1f}"
    ds.BodyPartExamined = _BODY_PART[region]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = ["SK", "SP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = _ds(sx)
    ds.SpacingBetweenSlices = _ds(sx)
    ds.RepetitionTime = "3500"
    ds.EchoTime = "100"
    ds.EchoTrainLength = "16"
    ds.MagneticFieldStrength = "3"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=ent + ["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=ent + [region, "series"])
    ds.StudyID = ident["StudyID"]
    ds.SeriesNumber = 1 + rix
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=ent + [region, "frame"])
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pix.shape[1], pix.shape[2]
    ds.PixelSpacing = [_ds(sz), _ds(sy)]  # row spacing (S), column spacing (P)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "500"
    ds.WindowWidth = "1000"

    # Constant elements grouped by the gaps between the per-slice tags.
    cuts = [Tag(t) for t in _PER_SLICE_TAGS]
    groups = [Dataset() for _ in range(len(cuts) + 1)]
    for tag in ds.keys():
        groups[sum(tag > c for c in cuts)].add(ds[tag])
    const = [_encode(g) for g in groups]

    for name_no, i in enumerate(file_order):
        i = int(i)
        sop_uid = generate_uid(entropy_srcs=ent + [region, "instance", str(i)])
        x_ras = origin[0] + i * sx
        position = (-x_ras, -(origin[1] + (size - 1) * sy), origin[2] + (size - 1) * sz)
        per_slice = (
            _element(_PER_SLICE_TAGS[0], "UI", sop_uid.encode()),
            _element(_PER_SLICE_TAGS[1], "IS", str(instance_number[i]).encode()),
            _element(_PER_SLICE_TAGS[2], "DS", "\\".join(_ds(v) for v in position).encode()),
            _element(_PER_SLICE_TAGS[3], "DS", _ds(x_ras).encode()),
            _element(_PER_SLICE_TAGS[4], "OW", pix[i].tobytes()),
        )
        body = b"".join(c + v for c, v in zip(const, per_slice)) + const[-1]
        (folder / f"{name_no:04d}.dcm").write_bytes(b"\0" * 128 + b"DICM" + _file_meta(sop_uid) + body)

"""Shared fixtures: the real LIDC sample and nodule patches held in tests/data, and tiny hand-made CT series."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SAMPLE_ROOT = DATA / "lidc_idri_sample"
PATCHES_ROOT = DATA / "node21_nodule_patches"
SAMPLE_SERIES = {
    "LIDC-IDRI-0001": "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192",
    "LIDC-IDRI-0002": "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919",
    "LIDC-IDRI-0003": "1.3.6.1.4.1.14519.5.2.1.6279.6001.170706757615202213033480003264",
}


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The real LIDC-IDRI sample held in the repository (tests/data/lidc_idri_sample, see its README)."""
    return SAMPLE_ROOT


@pytest.fixture(scope="session")
def nodule_patches_root() -> Path:
    """Sixteen real LUNA16 nodule patches with masks held in the repository (tests/data/node21_nodule_patches)."""
    return PATCHES_ROOT


def write_ct_slice(
    path: Path, stored: np.ndarray, z: float, *, series_uid: str, patient_id: str = "TEST-0001",
    pixel_spacing: float = 1.0, origin_xy=(-16.0, -16.0), slope: float = 1.0, intercept: float = -1024.0,
    padding: int | None = None, instance: int = 1, modality: str = "CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    orientation=(1, 0, 0, 0, 1, 0),
) -> Path:  # fmt: skip
    """Write one small CT slice with the given stored values (int16) and header fields."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.PatientID = patient_id
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(origin_xy[0]), float(origin_xy[1]), float(z)]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if padding is not None:
        ds.PixelPaddingValue = padding
    ds.PixelData = stored.astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def make_series(tmp_path):
    """Factory: write a tiny series of `n` slices at positions `zs` (default 0..n-1) and return its files."""

    def _make(folder="series", n=4, zs=None, size=32, value=0, series_uid=None, **kw):
        uid = series_uid or generate_uid()
        zs = list(range(n)) if zs is None else list(zs)
        files = []
        for i, z in enumerate(zs):
            stored = np.full((size, size), value, dtype=np.int16) + i
            files.append(
                write_ct_slice(tmp_path / folder / f"{i:03d}.dcm", stored, z, series_uid=uid, instance=i + 1, **kw)
            )
        return files

    return _make


@pytest.fixture
def sample_copy(sample_root, tmp_path) -> Path:
    """A writable copy of the real sample (for tests that rearrange or damage files)."""
    dst = tmp_path / "sample"
    shutil.copytree(sample_root, dst)
    return dst


def read_hu(path: Path) -> np.ndarray:
    """Stored pixels of a DICOM file as HU (slope/intercept only)."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

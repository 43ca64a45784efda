"""Find CT series under a DICOM root of any folder layout, reading headers only.

Works on TCIA's ``patient/study-UID/series-UID/*.dcm`` layout, the newer NBIA layout
(``LIDC-IDRI-0001/01-01-2000-NA-NA-30178/3000566.000000-NA-03192/1-001.dcm``) and flat
folders alike, because series are grouped by their SeriesInstanceUID, never by path.
XML reads, SR/SEG objects, localizers, non-CT and non-DICOM files are skipped and counted.
Damaged files (unreadable, truncated, a ``.dcm`` without DICOM header, a header without Modality or
image size) are skipped too, but also reported: to their series (by SeriesInstanceUID, or by folder
when that cannot be read), whose case then fails, or else on their own. Symbolic links are followed
(each real folder once); folders that cannot be read are reported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

__all__ = ["SeriesInfo", "DicomIndex", "index_dicom", "CT_IMAGE_STORAGE", "PATIENT_DIR"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_NOT_DICOM_SUFFIXES = {".xml", ".json", ".csv", ".txt", ".md", ".zip", ".gz", ".nii", ".mhd", ".raw", ".png", ".jpg"}
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_HEADER_TAGS = [
    "SOPClassUID", "Modality", "ImageType", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
    "Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames",
]  # fmt: skip
_MODALITY = re.compile(r"^[A-Z0-9]{2,16}$")
PATIENT_DIR = re.compile(r"^LIDC-IDRI-\d{4}$")


@dataclass(frozen=True)
class SeriesInfo:
    """One CT series found under the root.

    Args:
        series_uid: SeriesInstanceUID.
        study_uid: StudyInstanceUID.
        patient_id: PatientID as stored in the files.
        files: paths of the series' image files (unsorted; sorting needs positions).
        damaged: ``(path, reason)`` of damaged files of the series: its SeriesInstanceUID, or (when that
            cannot be read) its folder. Default none.
    """

    series_uid: str
    study_uid: str
    patient_id: str
    files: tuple[str, ...]
    damaged: tuple[tuple[str, str], ...] = ()


@dataclass
class DicomIndex:
    """What :func:`index_dicom` found.

    Args:
        series: CT series by SeriesInstanceUID.
        skipped: ``(path, reason)`` for every file that was not a usable CT image (damaged ones too).
        n_files: files looked at.
        damaged: ``(path, reason)`` of damaged files that belong to none of ``series`` (by UID or folder).
        folder_errors: ``(folder, reason)`` of folders that could not be read.
    """

    series: dict[str, SeriesInfo] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_files: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)
    folder_errors: list[tuple[str, str]] = field(default_factory=list)


def _classify(path: str) -> tuple[tuple[str, str, str] | None, str, bool]:
    """Header-only read of one file: ``(key, reason, damaged)``.

    ``key`` is ``(series, study, patient)`` (``None`` when the file is no usable CT image or its series
    cannot be read); ``reason`` is empty for a usable CT image, else why it is left out; ``damaged`` is
    True for a file that is (or is named as) DICOM but cannot be read whole: unreadable, truncated or with
    a damaged header. Such a file fails its case; genuinely non-DICOM and non-CT files are only skipped.
    """
    named_dicom = Path(path).suffix.lower() in _DICOM_SUFFIXES
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            header_end = f.tell()  # pydicom leaves the file at the PixelData tag, or at the end without one
    except InvalidDicomError:
        if named_dicom:
            return None, "damaged DICOM file (named .dcm but no DICOM header: header bytes overwritten?)", True
        return None, "not a DICOM file", False
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})", True
    except Exception as exc:  # truncated / corrupt headers raise many kinds of errors
        return None, f"damaged DICOM header ({type(exc).__name__}: {exc})", True
    modality = str(ds.get("Modality", "")).strip().upper()
    sop = str(ds.get("SOPClassUID", "")).strip()
    series = str(ds.get("SeriesInstanceUID", "")).strip()
    study, patient = str(ds.get("StudyInstanceUID", "")).strip(), str(ds.get("PatientID", "")).strip()
    key = (series, study, patient) if series else None
    if not _MODALITY.match(modality):  # Modality is required in every DICOM object: missing or garbled = damaged
        return key, f"damaged DICOM header (Modality {modality or 'missing'}, file of {size} bytes: truncated?)", True
    if modality != "CT":
        return None, f"not CT (Modality {modality})", False
    if sop and sop != CT_IMAGE_STORAGE:
        return None, f"not a CT image object (SOPClassUID {sop})", False
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return None, "localizer (scout) image", False
    if not series or not ds.get("Rows") or not ds.get("Columns"):
        missing = [t for t in ("SeriesInstanceUID", "Rows", "Columns") if not ds.get(t)]
        return key, f"damaged CT header ({', '.join(missing)} missing, file of {size} bytes: truncated?)", True
    needed = _pixel_bytes(ds)
    if size - header_end < needed + 8:
        return key, f"truncated: {size} bytes, the pixel data needs {needed} after a header of {header_end}", True
    return key, "", False


def _pixel_bytes(ds) -> int:
    """Bytes of uncompressed pixel data the header announces (1 for compressed data: some must be there)."""
    tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if tsyntax not in _UNCOMPRESSED:
        return 1
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * samples * frames * (int(ds.get("BitsAllocated", 16) or 16) // 8)


def _walk(root: Path, patients: set[str] | None) -> tuple[list[str], list[tuple[str, str]]]:
    """Files under ``root`` (symbolic links followed, each real folder once) and the folders that could not be read."""
    files: list[str] = []
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()

    def _error(exc: OSError) -> None:
        errors.append((str(exc.filename or "?"), f"cannot read folder ({exc.strerror or exc})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or a second link to one folder: its files are listed once
            dirnames[:] = []
            continue
        seen.add(real)
        if patients is not None:
            # prune patient folders we were not asked for (the filter by PatientID still applies)
            dirnames[:] = [d for d in dirnames if not PATIENT_DIR.match(d) or d in patients]
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() in _NOT_DICOM_SUFFIXES:
                continue
            files.append(os.path.join(dirpath, name))
    return files, errors


def _classify_many(paths: Sequence[str]) -> list[tuple[tuple[str, str, str] | None, str, bool]]:
    return [_classify(p) for p in paths]


def index_dicom(
    root: str | Path,
    *,
    patients: Iterable[str] | None = None,
    workers: int = 1,
    progress: bool = False,
) -> DicomIndex:
    """Index the CT series under ``root`` by reading DICOM headers only.

    Args:
        root: folder to search recursively.
        patients: keep only these PatientIDs (folders named like another LIDC patient are
            not descended into). Default None keeps all.
        workers: processes used to read headers. Default 1.
        progress: show a progress bar. Default False.

    Returns:
        A :class:`DicomIndex`.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM root {root} is not a folder")
    wanted = set(patients) if patients is not None else None
    paths, folder_errors = _walk(root, wanted)
    index = DicomIndex(n_files=len(paths), folder_errors=folder_errors)
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results_iter = pool.map(_classify_many, chunks)
            results = [r for chunk in _progress(results_iter, len(chunks), progress) for r in chunk]
    else:
        results = [r for chunk in _progress(map(_classify_many, chunks), len(chunks), progress) for r in chunk]
    grouped: dict[str, list[str]] = {}
    meta: dict[str, tuple[str, str]] = {}
    damaged: list[tuple[str, str, tuple[str, str, str] | None]] = []
    for path, (key, reason, bad) in zip(paths, results):
        if key is None or bad:
            index.skipped.append((path, reason))
            if bad and (key is None or wanted is None or key[2] in wanted):
                damaged.append((path, reason, key))
            continue
        series, study, patient = key
        if wanted is not None and patient not in wanted:
            continue
        grouped.setdefault(series, []).append(path)
        meta.setdefault(series, (study, patient))
    by_folder: dict[str, set[str]] = {}
    for series, files in grouped.items():
        for f in files:
            by_folder.setdefault(os.path.dirname(f), set()).add(series)
    bad_of: dict[str, list[tuple[str, str]]] = {}
    for path, reason, key in damaged:
        owners = {key[0]} & grouped.keys() if key else by_folder.get(os.path.dirname(path), set())
        for series in owners:
            bad_of.setdefault(series, []).append((path, reason))
        if not owners:
            index.damaged.append((path, reason))
    for series, files in grouped.items():
        study, patient = meta[series]
        index.series[series] = SeriesInfo(series, study, patient, tuple(files), tuple(bad_of.get(series, ())))
    return index


def _progress(it, total: int, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="indexing DICOM headers", unit="chunk")

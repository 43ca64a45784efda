"""Find CT series under a DICOM root of any folder layout, reading headers only.

Works on TCIA's ``patient/study-UID/series-UID/*.dcm`` layout, the newer NBIA layout
(``LIDC-IDRI-0001/01-01-2000-NA-NA-30178/3000566.000000-NA-03192/1-001.dcm``) and flat
folders alike, because series are grouped by their SeriesInstanceUID, never by path.
XML reads, SR/SEG objects, localizers, non-CT and non-DICOM files are skipped and counted.
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

__all__ = ["SeriesInfo", "DicomIndex", "index_dicom", "CT_IMAGE_STORAGE"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_NOT_DICOM_SUFFIXES = {".xml", ".json", ".csv", ".txt", ".md", ".zip", ".gz", ".nii", ".mhd", ".raw", ".png", ".jpg"}
_HEADER_TAGS = [
    "SOPClassUID", "Modality", "ImageType", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
]  # fmt: skip
_PATIENT_DIR = re.compile(r"^LIDC-IDRI-\d{4}$")


@dataclass(frozen=True)
class SeriesInfo:
    """One CT series found under the root.

    Args:
        series_uid: SeriesInstanceUID.
        study_uid: StudyInstanceUID.
        patient_id: PatientID as stored in the files.
        files: paths of the series' image files (unsorted; sorting needs positions).
    """

    series_uid: str
    study_uid: str
    patient_id: str
    files: tuple[str, ...]


@dataclass
class DicomIndex:
    """What :func:`index_dicom` found.

    Args:
        series: CT series by SeriesInstanceUID.
        skipped: ``(path, reason)`` for every file that was not a usable CT image.
        n_files: files looked at.
    """

    series: dict[str, SeriesInfo] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_files: int = 0


def _classify(path: str) -> tuple[tuple[str, str, str] | None, str]:
    """Header-only read of one file: ((series, study, patient), "") or (None, reason to skip)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        return None, "not a DICOM file"
    except Exception as exc:  # truncated / corrupt headers raise many kinds of errors
        return None, f"unreadable DICOM header ({type(exc).__name__}: {exc})"
    modality = str(ds.get("Modality", "")).upper()
    sop = str(ds.get("SOPClassUID", ""))
    if modality != "CT":
        return None, f"not CT (Modality {modality or 'missing'})"
    if sop and sop != CT_IMAGE_STORAGE:
        return None, f"not a CT image object (SOPClassUID {sop})"
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return None, "localizer (scout) image"
    series = str(ds.get("SeriesInstanceUID", "")).strip()
    if not series:
        return None, "no SeriesInstanceUID"
    return (series, str(ds.get("StudyInstanceUID", "")).strip(), str(ds.get("PatientID", "")).strip()), ""


def _walk(root: Path, patients: set[str] | None) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        if patients is not None:
            # prune patient folders we were not asked for (the filter by PatientID still applies)
            dirnames[:] = [d for d in dirnames if not _PATIENT_DIR.match(d) or d in patients]
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() in _NOT_DICOM_SUFFIXES:
                continue
            files.append(os.path.join(dirpath, name))
    return files


def _classify_many(paths: Sequence[str]) -> list[tuple[tuple[str, str, str] | None, str]]:
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
    paths = _walk(root, wanted)
    index = DicomIndex(n_files=len(paths))
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results_iter = pool.map(_classify_many, chunks)
            results = [r for chunk in _progress(results_iter, len(chunks), progress) for r in chunk]
    else:
        results = [r for chunk in _progress(map(_classify_many, chunks), len(chunks), progress) for r in chunk]
    grouped: dict[str, list[str]] = {}
    meta: dict[str, tuple[str, str]] = {}
    for path, (key, reason) in zip(paths, results):
        if key is None:
            index.skipped.append((path, reason))
            continue
        series, study, patient = key
        if wanted is not None and patient not in wanted:
            continue
        grouped.setdefault(series, []).append(path)
        meta.setdefault(series, (study, patient))
    for series, files in grouped.items():
        study, patient = meta[series]
        index.series[series] = SeriesInfo(series, study, patient, tuple(files))
    return index


def _progress(it, total: int, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="indexing DICOM headers", unit="chunk")

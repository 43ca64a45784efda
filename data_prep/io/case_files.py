"""The part every preparation step shares for one case: lung mask, the three files, their record."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.io.writers import write_image
from data_prep.ops.lung_mask import lung_mask
from data_prep.ops.resample import Grid, grid_to_sitk

__all__ = ["SUBDIRS", "write_case"]

SUBDIRS = ("images", "labels/nodules", "labels/lungs")


def write_case(out: str | Path, case_id: str, grid: Grid, hu: np.ndarray, nodules: np.ndarray) -> dict:
    """Compute the lung field, write image and labels of one case, and describe them.

    The lung field includes the nodules (juxtapleural ones too). Labels are written first and
    the image last, so a case counts as finished (its image exists) only when all three exist.

    Args:
        out: output folder (sub-folders :data:`SUBDIRS` made).
        case_id: file stem.
        grid: the grid of ``hu`` and ``nodules``.
        hu: int16 HU, shape ``grid.shape`` (z, y, x).
        nodules: uint8 nodule labels on the same grid.

    Returns:
        Record fields: ``files`` (relative paths), ``shape_zyx``, ``spacing_zyx_mm``,
        ``origin_xyz_mm``, ``lung_volume_ml`` and ``warnings``.
    """
    lungs = lung_mask(hu, grid.spacing)
    lungs[nodules > 0] = 1
    files = {
        "image": f"images/{case_id}.nii.gz",
        "label": f"labels/nodules/{case_id}.nii.gz",
        "lung": f"labels/lungs/{case_id}.nii.gz",
    }
    root = Path(out)
    write_image(grid_to_sitk(nodules, grid), root / files["label"])
    write_image(grid_to_sitk(lungs, grid), root / files["lung"])
    write_image(grid_to_sitk(hu, grid), root / files["image"])
    return {
        "files": files,
        "shape_zyx": list(grid.shape),
        "spacing_zyx_mm": list(grid.spacing),
        "origin_xyz_mm": list(grid.origin),
        "lung_volume_ml": round(float(lungs.sum()) * float(np.prod(grid.spacing)) / 1000, 1),
        "warnings": [] if lungs.any() else ["lung mask is empty (no lung in the available slices?)"],
    }

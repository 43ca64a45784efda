"""Per-nodule features and labels of the pGGN tables: shape and HU statistics of a mask, reader labels.

Pure functions on arrays (``(z, y, x)`` order, spacing in mm in the same order); the ``pggn`` and
``pggn-table`` steps call them. Labels come from the readers' median characteristics:

* ``malignant``: 1 when the median malignancy is at least ``malignant_min`` (default 4), 0 when
  it is at most ``benign_max`` (default 2), empty (left out) in between (medians 2.5, 3, 3.5);
* ``ggn``: 1 when the median texture (1 ground glass ... 5 solid) is at most ``ggn_max_texture``
  (default 2), else 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from data_prep.annotations.lidc_nodules import CHARACTERISTICS

__all__ = [
    "LabelRules",
    "FEATURE_CHARACTERISTICS",
    "reader_labels",
    "shape_features",
    "hu_features",
    "HU_COLUMNS",
    "SHAPE_COLUMNS",
]

#: Reader characteristics that are table features: all of the LIDC XML's except malignancy.
FEATURE_CHARACTERISTICS = tuple(col for col in CHARACTERISTICS.values() if col != "malignancy")
SHAPE_COLUMNS = ("volume_mm3", "surface_area_mm2", "equivalent_diameter_mm", "bbox_x_mm", "bbox_y_mm", "bbox_z_mm")
HU_COLUMNS = ("hu_mean", "hu_std", "hu_min", "hu_p10", "hu_median", "hu_p90", "hu_max", "solid_fraction")


@dataclass(frozen=True)
class LabelRules:
    """How the reader medians become labels.

    Args:
        malignant_min: median malignancy at or above this is malignant (1). Default 4.
        benign_max: median malignancy at or below this is benign (0). Default 2.
        ggn_max_texture: median texture at or below this is ground glass. Default 2.
    """

    malignant_min: float = 4.0
    benign_max: float = 2.0
    ggn_max_texture: float = 2.0

    def __post_init__(self):
        if not self.benign_max < self.malignant_min:
            raise ValueError(f"benign_max ({self.benign_max}) must be below malignant_min ({self.malignant_min})")

    def manifest(self) -> dict:
        return asdict(self)


def reader_labels(malignancy: float, texture: float, rules: LabelRules = LabelRules()) -> dict:
    """``malignant`` (1, 0 or "" when left out) and ``ggn`` (1 or 0) from the readers' medians.

    Args:
        malignancy: median malignancy rating (1-5).
        texture: median texture rating (1 ground glass ... 5 solid).
        rules: thresholds. Default ``LabelRules()``.
    """
    if malignancy >= rules.malignant_min:
        malignant: int | str = 1
    elif malignancy <= rules.benign_max:
        malignant = 0
    else:
        malignant = ""
    return {"malignant": malignant, "ggn": int(texture <= rules.ggn_max_texture)}


def shape_features(mask: np.ndarray, spacing: tuple[float, float, float]) -> dict:
    """Volume, surface area (marching cubes), sphere-equivalent diameter and bounding-box size of a mask.

    Args:
        mask: boolean mask, shape (z, y, x), not empty.
        spacing: voxel size (z, y, x) in mm.

    Returns:
        ``volume_mm3``, ``surface_area_mm2``, ``equivalent_diameter_mm``, ``bbox_{x,y,z}_mm``.
    """
    from skimage.measure import marching_cubes, mesh_surface_area

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("empty mask")
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    sub = np.pad(mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1], 1).astype(np.float32)
    verts, faces, _, _ = marching_cubes(sub, 0.5, spacing=tuple(float(s) for s in spacing))
    volume = float(mask.sum()) * float(np.prod(spacing))
    extent = (hi - lo + 1) * np.asarray(spacing, dtype=float)
    return {
        "volume_mm3": round(volume, 3),
        "surface_area_mm2": round(float(mesh_surface_area(verts, faces)), 3),
        "equivalent_diameter_mm": round(float((6 * volume / np.pi) ** (1 / 3)), 3),
        "bbox_x_mm": round(float(extent[2]), 3),
        "bbox_y_mm": round(float(extent[1]), 3),
        "bbox_z_mm": round(float(extent[0]), 3),
    }


def hu_features(hu: np.ndarray, mask: np.ndarray, solid_hu: float = -300.0) -> dict:
    """HU statistics inside a mask and the solid-component fraction (share of voxels above ``solid_hu``).

    Args:
        hu: HU values, any shape.
        mask: boolean mask of the same shape, not empty.
        solid_hu: voxels above this HU count as solid component. Default -300.

    Returns:
        ``hu_mean``, ``hu_std``, ``hu_min``, ``hu_p10``, ``hu_median``, ``hu_p90``, ``hu_max``, ``solid_fraction``.
    """
    values = np.asarray(hu, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    if values.size == 0:
        raise ValueError("empty mask")
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {
        "hu_mean": round(float(values.mean()), 2),
        "hu_std": round(float(values.std()), 2),
        "hu_min": float(values.min()),
        "hu_p10": round(float(p10), 2),
        "hu_median": round(float(p50), 2),
        "hu_p90": round(float(p90), 2),
        "hu_max": float(values.max()),
        "solid_fraction": round(float((values > solid_hu).mean()), 4),
    }

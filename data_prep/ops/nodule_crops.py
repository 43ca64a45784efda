"""Nodule crops from a HU image: a cube of fixed physical size around a centre, and the mask's
bounding box resampled to a fixed number of voxels (linear interpolation, air outside the scan)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = ["HU_AIR", "fixed_crop", "bbox_crop"]

HU_AIR = -1024


def _resample(image: sitk.Image, size: Sequence[int], spacing: Sequence[float], origin: Sequence[float]) -> sitk.Image:
    """Linear resampling of ``image`` onto an identity-direction grid ((x, y, z) order), air outside, int16."""
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in size])
    f.SetOutputSpacing([float(s) for s in spacing])
    f.SetOutputOrigin([float(o) for o in origin])
    f.SetOutputDirection(image.GetDirection())
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(HU_AIR)
    f.SetOutputPixelType(sitk.sitkFloat32)
    out = f.Execute(image)
    return sitk.Cast(sitk.Round(out), sitk.sitkInt16)


def fixed_crop(
    image: sitk.Image, centre_xyz: Sequence[float], crop_mm: float = 48.0, spacing: float = 1.0
) -> sitk.Image:
    """An int16 cube of ``crop_mm`` edge at ``spacing`` centred on a world point (LPS mm, x, y, z).

    Args:
        image: HU image with identity direction.
        centre_xyz: world centre (x, y, z) mm.
        crop_mm: cube edge in mm. Default 48.
        spacing: voxel size in mm. Default 1.

    Returns:
        Image of ``round(crop_mm / spacing)`` voxels per axis; -1024 where the cube leaves the scan.
    """
    n = max(1, int(round(crop_mm / spacing)))
    origin = [c - (n - 1) / 2 * spacing for c in centre_xyz]
    return _resample(image, (n, n, n), (spacing,) * 3, origin)


def bbox_crop(image: sitk.Image, mask_zyx: np.ndarray, size: int = 32) -> sitk.Image:
    """The mask's tight bounding box cut from ``image`` and resampled to ``size`` voxels per axis.

    The output grid spans exactly the box's voxel extents (outer faces), each axis stretched on its own.

    Args:
        image: HU image with identity direction.
        mask_zyx: boolean mask on the image's grid, array order (z, y, x), not empty.
        size: voxels per axis of the output. Default 32.
    """
    idx = np.argwhere(mask_zyx)
    lo, hi = idx.min(axis=0)[::-1], idx.max(axis=0)[::-1]  # (x, y, z) voxel indices
    sp = np.asarray(image.GetSpacing(), dtype=float)
    extent = (hi - lo + 1) * sp
    new_sp = extent / size
    lo_world = np.asarray(image.TransformIndexToPhysicalPoint([int(v) for v in lo]), dtype=float)
    origin = lo_world - sp / 2 + new_sp / 2
    return _resample(image, (size,) * 3, new_sp, origin)

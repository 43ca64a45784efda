"""Resample axial slice stacks onto a regular grid at a target spacing.

Slices may be unevenly spaced: in-plane resampling is done by SimpleITK (linear, multi-threaded),
and the through-plane step interpolates linearly between the two real slice positions that
bracket each target plane, so irregular or slightly gapped series come out geometrically right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

__all__ = ["Grid", "target_grid", "resample_stack", "grid_to_sitk"]


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid in LPS world space with identity direction.

    Args:
        origin: world (x, y, z) mm of voxel index (0, 0, 0).
        spacing: (z, y, x) mm.
        shape: (z, y, x) voxels.
    """

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    def world_to_index(self, xyz) -> np.ndarray:
        """World (x, y, z) mm -> continuous voxel index in (x, y, z) order."""
        sz, sy, sx = self.spacing
        return (np.asarray(xyz, dtype=float) - np.asarray(self.origin)) / np.array([sx, sy, sz])

    def sub_grid(self, lo_xyz, hi_xyz) -> tuple[Grid, tuple[slice, slice, slice]] | None:
        """The part of this grid whose voxel centres lie inside the world box [lo, hi] (x, y, z mm).

        Returns:
            (sub-grid, (z, y, x) slices into this grid's arrays), or None when the box misses it.
        """
        lo = np.ceil(self.world_to_index(lo_xyz) - 1e-6).astype(int)
        hi = np.floor(self.world_to_index(hi_xyz) + 1e-6).astype(int)
        size_xyz = np.array(self.shape[::-1])
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, size_xyz - 1)
        if np.any(hi < lo):
            return None
        sz, sy, sx = self.spacing
        origin = tuple(float(o + i * s) for o, i, s in zip(self.origin, lo, (sx, sy, sz)))
        shape = tuple(int(v) for v in (hi - lo + 1)[::-1])
        slices = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo[::-1], hi[::-1]))
        return Grid(origin, self.spacing, shape), slices


def target_grid(
    z_positions: np.ndarray, origin_xy: tuple[float, float], pixel_spacing: tuple[float, float], n_rows: int,
    n_cols: int, spacing: tuple[float, float, float],
) -> Grid:  # fmt: skip
    """The grid at ``spacing`` that covers a slice stack, starting at its first voxel centre.

    Args:
        z_positions: increasing world z of the slices, shape (z,).
        origin_xy: world (x, y) of pixel (row 0, column 0).
        pixel_spacing: (row = y, column = x) spacing, mm.
        n_rows: rows (y) per slice.
        n_cols: columns (x) per slice.
        spacing: target (z, y, x) spacing, mm.
    """
    sz, sy, sx = (float(s) for s in spacing)
    if min(sz, sy, sx) <= 0:
        raise ValueError(f"target spacing must be positive, got {spacing}")
    extent_z = float(z_positions[-1] - z_positions[0])
    extent_y = (n_rows - 1) * pixel_spacing[0]
    extent_x = (n_cols - 1) * pixel_spacing[1]
    shape = tuple(int(np.floor(e / s + 1e-6)) + 1 for e, s in ((extent_z, sz), (extent_y, sy), (extent_x, sx)))
    return Grid((float(origin_xy[0]), float(origin_xy[1]), float(z_positions[0])), (sz, sy, sx), shape)


def _resample_in_plane(stack: np.ndarray, origin_xy, pixel_spacing, grid: Grid, fill: float) -> np.ndarray:
    """(z, rows, cols) -> (z, grid y, grid x) float32 with bilinear interpolation."""
    img = sitk.GetImageFromArray(stack)
    img.SetSpacing((float(pixel_spacing[1]), float(pixel_spacing[0]), 1.0))
    img.SetOrigin((float(origin_xy[0]), float(origin_xy[1]), 0.0))
    _, ny, nx = grid.shape
    ref_spacing = (grid.spacing[2], grid.spacing[1], 1.0)
    ref_origin = (grid.origin[0], grid.origin[1], 0.0)
    out = sitk.Resample(
        img, (nx, ny, stack.shape[0]), sitk.Transform(), sitk.sitkLinear, ref_origin, ref_spacing,
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), float(fill), sitk.sitkFloat32,
    )  # fmt: skip
    return sitk.GetArrayFromImage(out)


def _interpolate_z(planes: np.ndarray, z_positions: np.ndarray, grid: Grid, fill: float, chunk: int = 32) -> np.ndarray:
    """Linear interpolation along z from real slice positions to the grid's planes."""
    nz = grid.shape[0]
    zt = grid.origin[2] + np.arange(nz) * grid.spacing[0]
    out = np.empty((nz,) + planes.shape[1:], dtype=np.float32)
    if len(z_positions) == 1:
        out[:] = fill
        out[np.abs(zt - z_positions[0]) < 1e-3] = planes[0]
        return out
    lower = np.clip(np.searchsorted(z_positions, zt, side="right") - 1, 0, len(z_positions) - 2)
    w = (zt - z_positions[lower]) / (z_positions[lower + 1] - z_positions[lower])
    outside = (w < -1e-6) | (w > 1 + 1e-6)
    w = np.clip(w, 0.0, 1.0).astype(np.float32)
    for a in range(0, nz, chunk):
        b = min(a + chunk, nz)
        lo, wb = lower[a:b], w[a:b, None, None]
        np.multiply(planes[lo], 1.0 - wb, out=out[a:b])
        out[a:b] += planes[lo + 1] * wb
    out[outside] = fill
    return out


def resample_stack(
    stack: np.ndarray, z_positions: np.ndarray, origin_xy: tuple[float, float], pixel_spacing: tuple[float, float],
    grid: Grid, *, fill: float = 0.0, round_to_int16: bool = False,
) -> np.ndarray:  # fmt: skip
    """Resample a stack of axial slices onto ``grid`` (trilinear, at the real slice positions).

    Args:
        stack: slices, shape (z, rows = y, cols = x), any real dtype.
        z_positions: increasing world z (mm) of each slice, shape (z,).
        origin_xy: world (x, y) mm of pixel (row 0, column 0).
        pixel_spacing: (row = y, column = x) mm.
        grid: target grid; parts outside the stack get ``fill``.
        fill: value outside the stack. Default 0.
        round_to_int16: round to the nearest integer and return int16 (HU volumes). Default False.

    Returns:
        float32 (or int16) array of shape ``grid.shape`` (z, y, x).
    """
    if stack.ndim != 3 or stack.shape[0] != len(z_positions):
        raise ValueError(f"stack of shape {stack.shape} does not match {len(z_positions)} z positions")
    if len(z_positions) > 1 and np.any(np.diff(z_positions) <= 0):
        raise ValueError("z positions must be strictly increasing")
    z_positions = np.asarray(z_positions, dtype=float)
    # the z planes of the stack that the grid needs (one beyond on each side)
    zt = grid.origin[2] + np.array([0, grid.shape[0] - 1]) * grid.spacing[0]
    first = max(int(np.searchsorted(z_positions, zt[0], side="right")) - 1, 0)
    last = min(int(np.searchsorted(z_positions, zt[1], side="left")) + 1, len(z_positions))
    z_used = z_positions[first:last]
    steps = np.diff(z_used)
    if len(steps) and np.ptp(steps) <= 1e-4 * steps.mean():  # evenly spaced: one trilinear pass
        img = _resample_3d(stack[first:last], z_used[0], float(steps.mean()), origin_xy, pixel_spacing, grid, fill)
        if round_to_int16:  # rounding and casting in ITK (multi-threaded, no float copy in numpy)
            img = sitk.Cast(sitk.Round(img), sitk.sitkInt16)
        return sitk.GetArrayFromImage(img)
    planes = _resample_in_plane(stack[first:last], origin_xy, pixel_spacing, grid, fill)
    out = _interpolate_z(planes, z_used, grid, fill)
    return np.rint(out, out=out).astype(np.int16) if round_to_int16 else out


def _resample_3d(stack, z0: float, dz: float, origin_xy, pixel_spacing, grid: Grid, fill: float) -> sitk.Image:
    """Evenly spaced slices: a single multi-threaded SimpleITK trilinear resampling."""
    img = sitk.GetImageFromArray(stack)
    img.SetSpacing((float(pixel_spacing[1]), float(pixel_spacing[0]), dz))
    img.SetOrigin((float(origin_xy[0]), float(origin_xy[1]), float(z0)))
    return sitk.Resample(
        img, tuple(int(n) for n in grid.shape[::-1]), sitk.Transform(), sitk.sitkLinear, grid.origin,
        tuple(float(s) for s in grid.spacing[::-1]), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), float(fill),
        sitk.sitkFloat32,
    )  # fmt: skip


def grid_to_sitk(array: np.ndarray, grid: Grid) -> sitk.Image:
    """Wrap a (z, y, x) array on ``grid`` as a SimpleITK image with its geometry."""
    if tuple(array.shape) != tuple(grid.shape):
        raise ValueError(f"array shape {array.shape} does not match grid shape {grid.shape}")
    img = sitk.GetImageFromArray(array)
    img.SetOrigin(grid.origin)
    img.SetSpacing(tuple(float(s) for s in grid.spacing[::-1]))
    return img

"""Binary-mask helpers of the lung mask: one-voxel dilations, closing, per-slice hole filling and
border connectivity, block means onto a coarse grid and the coarse <-> full grid boxes and slabs.

Arrays are ``(z, y, x)``; "in-plane" and "per slice" mean within an axial slice (axes 1, 2).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "FACE_2D", "SLAB_VOXELS", "Slab", "reconstruct", "dilate", "block_mean", "border_connected_2d", "fill_holes_2d",
    "closing", "bounding_box", "bit", "points_box", "fine_box", "slab_boxes", "upsample",
]  # fmt: skip

# Full-grid work goes a slab of slices at a time, of about this many voxels (cache-friendly).
SLAB_VOXELS = 1 << 20

# A slab: its coarse box, its full-grid box, and its rows (z) in the full-grid box it is part of.
Slab = tuple[tuple[slice, ...], tuple[slice, ...], slice]

FACE_2D = np.zeros((3, 3, 3), dtype=bool)
FACE_2D[1] = ndi.generate_binary_structure(2, 1)


def reconstruct(mask: np.ndarray, marker: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The components of ``mask`` (3D, or as ``structure`` connects) that contain a voxel of
    ``marker``, and their number."""
    labels, n = ndi.label(mask, structure, output=np.int32)
    hit = np.zeros(n + 1, dtype=bool)
    hit[labels[marker]] = True  # label 0 (not in ``mask``) is no component
    hit[0] = False
    return hit[labels], int(hit.sum())


def dilate(mask: np.ndarray, full: bool = True, axes: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    """Dilation by one voxel along ``axes``: 26-neighbour (``full``) or 6-neighbour, zero beyond
    the border. ``~dilate(~mask)`` is the erosion that keeps the mask at the border."""
    out = mask.copy()
    for i, axis in enumerate(axes):
        src = out.copy() if full and i > 0 else mask
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        out[tuple(hi)] |= src[tuple(lo)]
        out[tuple(lo)] |= src[tuple(hi)]
    return out


def block_mean(hu: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    """Mean over ``factor``-sized blocks, shape ``ceil(shape / factor)``, float32 (edge-padded)."""
    if factor == (1, 1, 1):
        return hu.astype(np.float32, copy=False)
    if hu.dtype.kind in "iub" and hu.dtype.itemsize <= 2:
        # Exact integer block sums, one axis at a time and a slab of slices at a time (the fast
        # way for int16 HU); the same float32 result as summing in float32 below, as those sums
        # are exact too.
        out = np.empty(tuple(-(-n // f) for n, f in zip(hu.shape, factor)), dtype=np.float32)
        step = max(1, SLAB_VOXELS // (hu[0].size * factor[0]))
        for z in range(0, out.shape[0], step):
            sums = hu[z * factor[0] : (z + step) * factor[0]]
            for axis, f in enumerate(factor):
                sums = _block_sum(sums, f, axis)
            out[z : z + step] = sums
        out /= int(np.prod(factor))
        return out
    pad = [(0, (-n) % f) for n, f in zip(hu.shape, factor)]
    if any(p for _, p in pad):
        hu = np.pad(hu, pad, mode="edge")
    out = np.zeros(tuple(n // f for n, f in zip(hu.shape, factor)), dtype=np.float32)
    fz, fy, fx = factor
    for i in range(fz):
        for j in range(fy):
            for k in range(fx):
                out += hu[i::fz, j::fy, k::fx]
    out /= fz * fy * fx
    return out


def _block_sum(a: np.ndarray, f: int, axis: int) -> np.ndarray:
    """int32 sums over ``f``-long blocks along ``axis``, the last block edge-padded."""
    if f == 1:
        return a

    def every_fth(start: int) -> np.ndarray:
        return a[(slice(None),) * axis + (slice(start, None, f),)]

    out = every_fth(0).astype(np.int32)
    n_blocks = out.shape[axis]
    last = every_fth(a.shape[axis] - 1)  # the last slab, repeated as padding
    for start in range(1, f):
        part = every_fth(start)
        n = part.shape[axis]
        out[(slice(None),) * axis + (slice(0, n),)] += part
        if n < n_blocks:
            out[(slice(None),) * axis + (slice(n, n_blocks),)] += last
    return out


def border_connected_2d(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` connected, within their axial slice, to the slice's border."""
    labels, n = ndi.label(mask, FACE_2D)
    if n == 0:
        return np.zeros_like(mask)
    touching = np.zeros(n + 1, dtype=bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        touching[face] = True
    touching[0] = False
    return touching[labels]


def fill_holes_2d(mask: np.ndarray, max_area: float, keep_out: np.ndarray | None = None) -> np.ndarray:
    """``mask`` with its axial holes (background not reaching the slice border) of at most
    ``max_area`` pixels filled, except holes that touch ``keep_out``. Fills a C-contiguous
    ``mask`` in place."""
    labels, n = ndi.label(~mask, FACE_2D, output=np.int32)
    is_hole = np.ones(n + 1, dtype=bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        is_hole[face] = False
    is_hole[0] = False
    # Sizes and the rest only over the (few) hole voxels, not the whole background.
    holes = np.flatnonzero(np.take(is_hole, labels, mode="clip"))  # faster than is_hole[labels]
    hole_labels = labels.ravel()[holes]
    fill = np.bincount(hole_labels, minlength=n + 1) <= max_area
    if keep_out is not None:
        fill[hole_labels[np.ravel(keep_out)[holes]]] = False
    mask = np.ascontiguousarray(mask)
    mask.ravel()[holes] |= fill[hole_labels]
    return mask


def closing(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Binary closing with an approximate ellipsoid of ``radius_mm`` (alternating 6/26-neighbour
    steps, as many along each axis as fit in the radius)."""
    steps = [int(round(radius_mm / s)) for s in spacing]
    n = max(steps)
    if n == 0 or not mask.any():
        return mask.copy()
    bbox = bounding_box(mask, margin=n + 1)
    # Edge padding: at the first and last slice the lung goes on beyond the volume.
    crop = np.pad(mask[bbox], n + 1, mode="edge")
    # Odd steps 26-neighbour, even steps 6-neighbour: an octagonal approximation of a ball.
    passes = [(bool(i % 2), tuple(a for a, k in enumerate(steps) if i < k)) for i in range(n)]
    for full, axes in passes:
        crop = dilate(crop, full, axes)
    crop = ~crop  # the erosion: dilations of the complement
    for full, axes in passes:
        crop = dilate(crop, full, axes)
    crop = ~crop
    out = np.zeros_like(mask)
    out[bbox] = crop[(slice(n + 1, -(n + 1)),) * 3]
    return out


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Bounding box of a non-empty ``mask``, widened by ``margin`` and clipped to the array."""
    out = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        out.append(slice(max(hit[0] - margin, 0), min(hit[-1] + 1 + margin, mask.shape[axis])))
    return tuple(out)


def bit(code: np.ndarray, k: int, out: np.ndarray) -> np.ndarray:
    """Bit ``k`` of the uint8 array ``code`` as a bool array, computed in ``out`` (uint8, of
    ``code``'s shape)."""
    np.right_shift(code, k, out=out)
    np.bitwise_and(out, 1, out=out)
    return out.view(bool)


def points_box(
    points: tuple[np.ndarray, ...], selected: np.ndarray, margin: tuple[int, ...] = (0, 0, 0)
) -> tuple[slice, ...]:
    """Bounding box of the ``selected`` ones of ``points`` (index arrays, one per axis, as
    ``np.nonzero`` gives), widened by ``margin``; non-empty ``selected``."""
    return tuple(
        slice(max(int(c[selected].min()) - m, 0), int(c[selected].max()) + 1 + m) for c, m in zip(points, margin)
    )


def fine_box(box: tuple[slice, ...], factor: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The full-grid box (of an array of ``shape``) covered by the coarse box ``box``."""
    return tuple(slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(box, factor, shape))


def slab_boxes(box: tuple[slice, ...], factor: tuple[int, ...], shape: tuple[int, ...]) -> list[Slab]:
    """The coarse ``box`` cut along z into slabs of about ``SLAB_VOXELS`` full-grid voxels."""
    fine = fine_box(box, factor, shape)
    area = (fine[1].stop - fine[1].start) * (fine[2].stop - fine[2].start)
    step = max(1, SLAB_VOXELS // (area * factor[0]))
    out = []
    for z in range(box[0].start, box[0].stop, step):
        cbox = (slice(z, min(z + step, box[0].stop)), *box[1:])
        fbox = fine_box(cbox, factor, shape)
        out.append((cbox, fbox, slice(fbox[0].start - fine[0].start, fbox[0].stop - fine[0].start)))
    return out


def upsample(coarse: np.ndarray, box: tuple[slice, ...], factor: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """``coarse[box]`` on the full grid (each coarse voxel repeated ``factor`` times along each
    axis), cropped to ``fine_box(box, factor, shape)``."""
    out = coarse[box]
    for axis in (2, 1, 0):  # the last axis first, while the array is small: the fastest order
        out = np.repeat(out, factor[axis], axis=axis)
    return out[tuple(slice(0, s.stop - s.start) for s in fine_box(box, factor, shape))]

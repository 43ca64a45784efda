"""Nodules of the synthetic chest phantom: attenuation by texture class and placement.

A nodule arrives as a boolean outline on the scan's pixel grid (:class:`NoduleSpec`, (z, y, x)),
e.g. the 50 % consensus of a pylidc cluster; it is painted with HU from its texture class and
kept inside lung by a ball of parenchyma around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["NoduleSpec", "nodule_hu", "NoduleDraw", "prepare_nodules", "nodule_balls", "paint_nodules"]

NODULE_MARGIN_MM = 8.0  # lung kept around each nodule, beyond its radius


@dataclass(frozen=True)
class NoduleSpec:
    """One nodule to draw, on the pixel grid of the scan.

    Args:
        mask: (z, y, x) boolean outline (e.g. a 50 % reader consensus).
        z_positions: world z (mm) of each slice of ``mask``.
        row0: image row of ``mask[:, 0, :]``.
        col0: image column of ``mask[:, :, 0]``.
        texture: LIDC texture rating (1 ground glass ... 5 solid), e.g. the readers' median.
        label: value of this nodule in the ``nodules`` truth mask.
    """

    mask: np.ndarray
    z_positions: Sequence[float]
    row0: int
    col0: int
    texture: float
    label: int


def nodule_hu(spec: NoduleSpec, rng: np.random.Generator, pixel_spacing: float) -> np.ndarray:
    """HU of each voxel of a nodule from its texture class, (z, y, x) like ``spec.mask``.

    Ground glass (texture < 2.5): about -700 to -400; part-solid (2.5 to 3.5): a solid core (the
    inner half by distance to the edge) in a ground-glass rim; solid (> 3.5): about 0 to +80.
    A little voxel noise (sd 10 HU) is added.

    Args:
        spec: the nodule.
        rng: random generator.
        pixel_spacing: in-plane spacing (mm), for the core/rim split.
    """
    mask = np.asarray(spec.mask, dtype=bool)
    ggo = -650.0 + 120.0 * (min(spec.texture, 2.5) - 1.0) + rng.uniform(-40.0, 40.0)
    solid = rng.uniform(10.0, 70.0)
    if spec.texture < 2.5:
        values = np.full(mask.shape, ggo)
    elif spec.texture < 3.5:
        dz = float(np.median(np.diff(spec.z_positions))) if len(spec.z_positions) > 1 else pixel_spacing
        depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=(abs(dz), pixel_spacing, pixel_spacing))
        depth = depth[1:-1, 1:-1, 1:-1]
        values = np.where(depth >= 0.5 * depth.max(), solid, ggo)
    else:
        values = np.full(mask.shape, solid)
    return (values + rng.normal(0.0, 10.0, mask.shape)).astype(np.float32)


@dataclass
class NoduleDraw:
    """A nodule ready to paint: its HU and its lung ball."""

    spec: NoduleSpec
    values: np.ndarray  # (z, y, x) HU like spec.mask
    centre: np.ndarray  # (z mm, row, col)
    ball_mm: float


def prepare_nodules(nodules: Sequence[NoduleSpec], rng: np.random.Generator, ps: float) -> list[NoduleDraw]:
    """HU, centre and lung-ball radius (nodule radius + ``NODULE_MARGIN_MM``) of each non-empty nodule.

    Args:
        nodules: the nodules.
        rng: random generator for :func:`nodule_hu`.
        ps: in-plane pixel spacing (mm).
    """
    out = []
    for spec in nodules:
        mask = np.asarray(spec.mask, dtype=bool)
        if not mask.any():
            continue
        kk, rr, cc = np.nonzero(mask)
        zz = np.asarray(spec.z_positions, dtype=np.float64)[kk]
        centre = np.array([zz.mean(), rr.mean() + spec.row0, cc.mean() + spec.col0])
        offsets = np.column_stack(
            [zz - centre[0], (rr + spec.row0 - centre[1]) * ps, (cc + spec.col0 - centre[2]) * ps]
        )
        radius = np.linalg.norm(offsets, axis=1).max()
        out.append(NoduleDraw(spec, nodule_hu(spec, rng, ps), centre, radius + NODULE_MARGIN_MM))
    return out


def nodule_balls(nodules: list[NoduleDraw], z: float, shape: tuple[int, int], ps: float) -> np.ndarray:
    """Union of the lung balls kept around nodules in the slice at world z, boolean (rows, cols).

    Args:
        nodules: prepared nodules.
        z: world z of the slice (mm).
        shape: (rows, cols) of the slice.
        ps: in-plane pixel spacing (mm).
    """
    balls = np.zeros(shape, dtype=bool)
    for nd in nodules:
        dz = z - nd.centre[0]
        if abs(dz) >= nd.ball_mm:
            continue
        rad = np.sqrt(nd.ball_mm**2 - dz**2) / ps
        r0, r1 = max(int(nd.centre[1] - rad), 0), min(int(nd.centre[1] + rad) + 2, shape[0])
        c0, c1 = max(int(nd.centre[2] - rad), 0), min(int(nd.centre[2] + rad) + 2, shape[1])
        rr, cc = np.ogrid[r0:r1, c0:c1]
        balls[r0:r1, c0:c1] |= (rr - nd.centre[1]) ** 2 + (cc - nd.centre[2]) ** 2 <= rad**2
    return balls


def paint_nodules(hu: np.ndarray, labels: np.ndarray, nodules: list[NoduleDraw], z: float) -> None:
    """Paint the nodule slices that lie at world z (within 0.001 mm), in place.

    Args:
        hu: (rows, cols) HU slice.
        labels: (rows, cols) nodule truth slice; gets each nodule's label.
        nodules: prepared nodules.
        z: world z of the slice (mm).
    """
    for nd in nodules:
        hits = np.nonzero(np.isclose(np.asarray(nd.spec.z_positions, dtype=np.float64), z, atol=1e-3))[0]
        for m in hits:
            mask, values = nd.spec.mask[m], nd.values[m]
            r0, c0 = nd.spec.row0, nd.spec.col0
            rs = slice(max(r0, 0), min(r0 + mask.shape[0], hu.shape[0]))
            cs = slice(max(c0, 0), min(c0 + mask.shape[1], hu.shape[1]))
            sub = (slice(rs.start - r0, rs.stop - r0), slice(cs.start - c0, cs.stop - c0))
            m2 = np.asarray(mask[sub], dtype=bool)
            hu[rs, cs][m2] = values[sub][m2]
            labels[rs, cs][m2] = nd.spec.label

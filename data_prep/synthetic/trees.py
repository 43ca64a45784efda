"""Tube trees of the synthetic chest phantom: airways and pulmonary vessels, grown and rasterized.

Trees live in the millimetre frame of :mod:`data_prep.synthetic.anatomy` (X = patient right ->
left, Y = anterior -> posterior, both relative to the image centre; Z = world z) and are returned
as (n, 8) segment arrays: start (X, Y, Z), end (X, Y, Z), start radius, end radius (mm).
:func:`rasterize_tubes` turns them into signed distances on the slices to render, (z, y, x).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data_prep.synthetic.anatomy import TRACHEA_UV, ChestAnatomy

__all__ = [
    "grow_tree", "colonize_tree", "airway_segments", "vessel_segments", "TubeField", "rasterize_tubes", "SD_SCALE",
]  # fmt: skip

SD_SCALE = 100.0  # signed distances are stored as int16 hundredths of a millimetre


# ---- growing ----------------------------------------------------------------------------------
def _unit(a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` (..., 3) scaled to unit length."""
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-9)


def grow_tree(
    rng: np.random.Generator,
    roots: list[tuple[np.ndarray, np.ndarray, float]],
    inside: Callable[[np.ndarray], np.ndarray],
    min_radius: float,
    max_segments: int,
    length_per_radius: float = 6.0,
    radius_ratios: tuple[float, float] = (0.85, 0.72),
    outward_bias: float = 0.35,
) -> np.ndarray:
    """Grow bifurcating tube trees whose branches get thinner towards the periphery.

    Grown one generation at a time (vectorized), so ``max_segments`` trims the finest generation.
    Each branch ends in two children turned to opposite sides in a random plane; a branch whose
    end or midpoint leaves ``inside`` is halved, and dropped if it still leaves.

    Args:
        rng: random generator.
        roots: (start (X, Y, Z) mm, direction, radius mm) of each first branch.
        inside: maps points (n, 3) in mm to booleans (n,).
        min_radius: branches thinner than this (mm) are not grown.
        max_segments: cap on the number of segments.
        length_per_radius: segment length / radius (jittered +-30 %, at least 3 mm).
        radius_ratios: child radius / parent radius of the major and the minor child.
        outward_bias: pull of each child direction away from its tree's root.

    Returns:
        (n, 8) float array of segments: start (X, Y, Z), end (X, Y, Z), start radius, end radius.
    """
    start = np.array([r[0] for r in roots], dtype=np.float64).reshape(-1, 3)
    direction = _unit(np.array([r[1] for r in roots], dtype=np.float64).reshape(-1, 3))
    radius = np.array([r[2] for r in roots], dtype=np.float64)
    origin = start.copy()
    out: list[np.ndarray] = []
    total = 0
    while len(start) and total < max_segments:
        keep = radius >= min_radius
        start, direction, radius, origin = start[keep], direction[keep], radius[keep], origin[keep]
        length = np.maximum(3.0, length_per_radius * radius * rng.uniform(0.7, 1.3, len(radius)))[:, None]
        end = start + direction * length
        ok = inside(end) & inside(start + direction * length / 2)
        half = ~ok & inside(start + direction * length / 2) & inside(start + direction * length / 4)
        end = np.where(half[:, None], start + direction * length / 2, end)
        keep = np.flatnonzero(ok | half)
        if len(keep) > max_segments - total:  # trim the finest generation evenly
            keep = np.sort(rng.choice(keep, max_segments - total, replace=False))
        start, end, direction, radius, origin = (x[keep] for x in (start, end, direction, radius, origin))
        out.append(np.column_stack([start, end, radius, radius * 0.92]))
        total += len(start)
        axis = _unit(np.cross(direction, _unit(rng.normal(size=direction.shape))))
        outward = end - origin
        outward = np.where(np.linalg.norm(outward, axis=1, keepdims=True) > 1e-6, _unit(outward), direction)
        children = []
        for ratio, angle in zip(
            radius_ratios, (rng.uniform(0.15, 0.5, len(radius)), -rng.uniform(0.4, 0.95, len(radius)))
        ):
            turned = direction * np.cos(angle)[:, None] + np.cross(axis, direction) * np.sin(angle)[:, None]
            children.append((end, _unit(turned + outward_bias * outward), radius * ratio, origin))
        start, direction, radius, origin = (np.concatenate(parts) for parts in zip(*children))
    return np.concatenate(out) if out else np.zeros((0, 8))


def _segment(a: np.ndarray, b: np.ndarray, ra: float, rb: float) -> np.ndarray:
    return np.concatenate([a, b, [ra, rb]])


def airway_segments(anat: ChestAnatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Trachea, main and lobar bronchi, then a few generations of smaller bronchi.

    Args:
        anat: the anatomy (sets the carina height and the hila).
        rng: random generator for the peripheral branches.

    Returns:
        (central, peripheral): (n, 8) segment arrays as in :func:`grow_tree`; ``central`` is the
        trachea and the two main bronchi (outside the lung field), ``peripheral`` everything else.
    """
    mm = anat.to_mm
    top = mm(*TRACHEA_UV, anat.t_of(anat.z_max + 10.0))
    carina = mm(*TRACHEA_UV, anat.carina_t)
    right_hilum = mm(-0.17, 0.14, anat.carina_t - 0.06)
    left_hilum = mm(0.19, 0.17, anat.carina_t - 0.09)
    central = np.stack(
        [
            _segment(top, carina, 8.5, 8.5),
            _segment(carina, right_hilum, 6.5, 6.0),
            _segment(carina, left_hilum, 5.5, 5.0),
        ]
    )
    lobar_targets = [  # (from, to, radius): upper lobes up-lateral, lower lobes down-posterior
        (right_hilum, mm(-0.30, 0.16, anat.carina_t + 0.02), 4.2),
        (right_hilum, mm(-0.22, 0.20, anat.carina_t - 0.16), 4.8),
        (left_hilum, mm(0.31, 0.14, anat.carina_t - 0.02), 4.2),
        (left_hilum, mm(0.25, 0.24, anat.carina_t - 0.19), 4.5),
    ]
    lobar = np.stack([_segment(a, b, r, r * 0.9) for a, b, r in lobar_targets])
    roots = [(b, b - a, r * 0.8) for a, b, r in lobar_targets]
    small = grow_tree(rng, roots, anat.lung_contains_mm, min_radius=1.2, max_segments=200, length_per_radius=5.0)
    return central, np.concatenate([lobar, small])


def colonize_tree(
    rng: np.random.Generator,
    roots: np.ndarray,
    attractors: np.ndarray,
    step_mm: float = 4.0,
    influence_mm: float = 30.0,
    kill_mm: float = 6.0,
    leaf_radius_mm: float = 0.55,
    radius_exponent: float = 2.3,
    max_iterations: int = 150,
) -> np.ndarray:
    """Grow a tube tree that fills a region evenly (space colonization), radii by Murray's law.

    Each iteration, every attractor pulls the nearest tree node within ``influence_mm``; pulled nodes
    grow one ``step_mm`` towards the mean pull; attractors within ``kill_mm`` of the tree are
    removed. Radii: ``leaf_radius_mm`` at the tips, ``r_parent**e = sum(r_child**e)`` upwards.

    Args:
        rng: random generator (a little jitter breaks ties).
        roots: (m, 3) starting nodes (mm).
        attractors: (n, 3) points spread through the region to fill (mm).
        step_mm: growth per iteration.
        influence_mm: how far an attractor pulls.
        kill_mm: attractors this close to the tree are reached.
        leaf_radius_mm: radius of the finest branches.
        radius_exponent: e of Murray's law (3 in the ideal case; lower gives thicker trunks).
        max_iterations: cap on iterations.

    Returns:
        (n, 8) segment array as in :func:`grow_tree` (one segment per non-root node).
    """
    from scipy.spatial import cKDTree

    nodes = [np.asarray(roots, dtype=np.float64).reshape(-1, 3)]
    parents = [np.full(len(nodes[0]), -1)]
    active = np.asarray(attractors, dtype=np.float64)
    all_nodes = nodes[0]
    for _ in range(max_iterations):
        if not len(active):
            break
        dist, idx = cKDTree(all_nodes).query(active, distance_upper_bound=influence_mm)
        pulled = np.isfinite(dist)
        if not pulled.any():
            break
        pull = _unit(active[pulled] - all_nodes[idx[pulled]])
        total = np.zeros_like(all_nodes)
        np.add.at(total, idx[pulled], pull)
        growing = np.flatnonzero(np.linalg.norm(total, axis=1) > 1e-6)
        direction = _unit(total[growing] + rng.normal(scale=0.05, size=(len(growing), 3)))
        new = all_nodes[growing] + step_mm * direction
        nodes.append(new)
        parents.append(growing)
        all_nodes = np.concatenate([all_nodes, new])
        reached, _ = cKDTree(new).query(active, distance_upper_bound=kill_mm)
        active = active[~np.isfinite(reached)]
    parent = np.concatenate(parents)
    flow = np.zeros(len(all_nodes))  # r ** radius_exponent
    has_child = np.zeros(len(all_nodes), dtype=bool)
    has_child[parent[parent >= 0]] = True
    flow[~has_child] = leaf_radius_mm**radius_exponent
    for i in range(len(all_nodes) - 1, -1, -1):  # children always come after their parent
        if parent[i] >= 0:
            flow[parent[i]] += flow[i]
    radius = flow ** (1.0 / radius_exponent)
    child = np.flatnonzero(parent >= 0)
    return np.column_stack([all_nodes[parent[child]], all_nodes[child], radius[child], radius[child]])


def vessel_segments(anat: ChestAnatomy, rng: np.random.Generator, attractors_per_lung: int = 3000) -> np.ndarray:
    """Pulmonary vessel trees grown from both hila to fill the lung field evenly.

    Args:
        anat: the anatomy.
        rng: random generator.
        attractors_per_lung: points spread through each lung that the tree grows to reach (more
            points, finer and denser trees).

    Returns:
        (n, 8) segment array as in :func:`grow_tree`.
    """
    h = anat.half_width_mm
    trees = []
    for side in (-1.0, 1.0):
        n_try = attractors_per_lung * 12
        pts = np.column_stack(
            [side * rng.uniform(0.0, h, n_try), rng.uniform(-h, h, n_try), rng.uniform(anat.z_min, anat.z_max, n_try)]
        )
        pts = pts[anat.lung_contains_mm(pts)][:attractors_per_lung]
        hilum = anat.to_mm(0.20 * side, 0.10, anat.carina_t - 0.12)
        roots = hilum + np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 25.0], [0.0, 0.0, -25.0]])
        trees.append(colonize_tree(rng, roots, pts))
    return np.concatenate(trees)


# ---- rasterizing ------------------------------------------------------------------------------
@dataclass
class TubeField:
    """Signed distance (int16, 1/100 mm; large = far) to a union of tubes, in a window of the image."""

    sd: np.ndarray  # (nz, window rows, window cols)
    window: tuple[slice, slice]  # (rows, cols) of the image covered by ``sd``

    def coverage(self, i: int, ps: float, offset_mm: float = 0.0) -> np.ndarray:
        """Partial-volume fraction of each window pixel of slice i inside the surface ``sd = offset``."""
        return np.clip(0.5 - (self.sd[i].astype(np.float32) / SD_SCALE - offset_mm) / ps, 0.0, 1.0)


def _segment_boxes(segments, z, shape, ps, pad_mm) -> np.ndarray:
    """(n, 6) int boxes k0, k1, r0, r1, c0, c1 of each segment (clipped to the volume)."""
    ny, nx = shape
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    reach = np.maximum(segments[:, 6], segments[:, 7]) + pad_mm + ps
    lo = np.minimum(segments[:, 0:3], segments[:, 3:6]) - reach[:, None]
    hi = np.maximum(segments[:, 0:3], segments[:, 3:6]) + reach[:, None]
    return np.stack(
        [
            np.searchsorted(z, lo[:, 2]), np.searchsorted(z, hi[:, 2]),
            np.clip(np.floor(lo[:, 1] / ps + cy), 0, ny), np.clip(np.ceil(hi[:, 1] / ps + cy) + 1, 0, ny),
            np.clip(np.floor(lo[:, 0] / ps + cx), 0, nx), np.clip(np.ceil(hi[:, 0] / ps + cx) + 1, 0, nx),
        ],
        axis=1,
    ).astype(int)  # fmt: skip


def rasterize_tubes(
    segments: np.ndarray, z: np.ndarray, shape: tuple[int, int], ps: float, pad_mm: float, slab_mm: float = 0.0
) -> TubeField:
    """Rasterize tapered tubes as signed distances, in the window that holds them all.

    Args:
        segments: (n, 8) segments as the growers of this module return them.
        z: (nz,) world z of the slices, increasing.
        shape: (rows, cols) of a slice.
        ps: pixel spacing (mm).
        pad_mm: how far outside each tube distances are needed.
        slab_mm: z distances shorter than this count as 0, so that a slice shows the tubes that
            cross its thickness (as partial volume does in real CT) and not only its centre plane.

    Returns:
        A :class:`TubeField` whose ``sd`` is (z, window rows, window cols).
    """
    ny, nx = shape
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    far = np.iinfo(np.int16).max
    boxes = _segment_boxes(segments, z, shape, ps, pad_mm + slab_mm).reshape(-1, 6)
    keep = (boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2]) & (boxes[:, 5] > boxes[:, 4])
    segments, boxes = segments[keep], boxes[keep]
    if not len(boxes):
        return TubeField(np.full((len(z), 1, 1), far, dtype=np.int16), (slice(0, 1), slice(0, 1)))
    wr0, wr1, wc0, wc1 = boxes[:, 2].min(), boxes[:, 3].max(), boxes[:, 4].min(), boxes[:, 5].max()
    sd = np.full((len(z), wr1 - wr0, wc1 - wc0), far, dtype=np.int16)
    for seg, (k0, k1, r0, r1, c0, c1) in zip(segments, boxes):
        a, b, ra, rb = seg[:3], seg[3:6], seg[6], seg[7]
        pz = (z[k0:k1] - a[2]).astype(np.float32)[:, None, None]
        py = ((np.arange(r0, r1) - cy) * ps - a[1]).astype(np.float32)[None, :, None]
        px = ((np.arange(c0, c1) - cx) * ps - a[0]).astype(np.float32)[None, None, :]
        ab = (b - a).astype(np.float32)
        s = np.clip((pz * ab[2] + py * ab[1] + px * ab[0]) * (1.0 / max(float(ab @ ab), 1e-6)), 0.0, 1.0)
        dz = np.maximum(np.abs(pz - s * ab[2]) - slab_mm, 0.0)
        dist = np.sqrt(dz**2 + (py - s * ab[1]) ** 2 + (px - s * ab[0]) ** 2)
        value = np.clip((dist - (ra + s * (rb - ra))) * SD_SCALE, -far, far).astype(np.int16)
        view = sd[k0:k1, r0 - wr0 : r1 - wr0, c0 - wc0 : c1 - wc0]
        np.minimum(view, value, out=view)
    return TubeField(sd, (slice(wr0, wr1), slice(wc0, wc1)))

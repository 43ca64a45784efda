"""The anatomy the lung mask is built from, on the coarse grid: the body's centre line, the lung
components, the airways (trachea, main bronchi), the right/left split and the mediastinal zone.

See steps 2-4 of :mod:`data_prep.ops.lung_mask`. Arrays are ``(z, y, x)``, spacings ``(z, y, x)`` mm.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from data_prep.ops.mask_morphology import FACE_2D, bounding_box, dilate, points_box, reconstruct

__all__ = [
    "MIN_LUNG_ML", "CENTRAL_MM", "body_centre_x", "select_lungs", "find_airways", "split_x", "mediastinum",
    "deep_inside",
]  # fmt: skip

# A component whose inner coarse voxels are mostly below this HU is gas (bowel, stomach, table,
# an isolated trachea), not lung: even emphysematous parenchyma has its median above it.
GAS_HU = -975.0
# Lung components: at least MIN_LUNG_ML, reaching MIN_LUNG_REACH_MM or farther from the body's
# centre (unlike the oesophagus and trachea), and LATERAL_REL_VOLUME of the largest one, or
# CENTRAL_REL_VOLUME of it when their mean lies within CENTRAL_MM of the centre.
MIN_LUNG_ML = 1.0
MIN_LUNG_REACH_MM = 40.0
LATERAL_REL_VOLUME = 0.01
CENTRAL_REL_VOLUME = 0.10
CENTRAL_MM = 60.0
# Airway cross-sections: AIRWAY_AREA_MM2 in area, elongation (axis ratio) up to
# AIRWAY_MAX_ELONGATION, centroid within CENTRAL_MM of the body's centre, at least
# AIRWAY_DARK_FRACTION of it darker than the parenchyma's median + AIRWAY_CONTRAST_HU / 2, and
# in a ring 2-3 voxels out at most AIRWAY_MAX_RING_AIR air and at least
# AIRWAY_MIN_RING_MEDIASTINUM mediastinal zone. Those of AIRWAY_SEED_MM2 or more seed the rest.
# Dark air is looked for below the parenchyma's median + AIRWAY_CONTRAST_HU (kept within
# AIRWAY_DARK_HU) and at stricter thresholds AIRWAY_STEP_HU apart; a result above
# AIRWAY_MAX_FRACTION of the lung volume is not airway.
AIRWAY_AREA_MM2 = (20.0, 1000.0)
AIRWAY_MAX_ELONGATION = 5.0
AIRWAY_DARK_FRACTION = 0.25
AIRWAY_MAX_RING_AIR = 0.6
AIRWAY_MIN_RING_MEDIASTINUM = 0.2
AIRWAY_SEED_MM2 = 80.0
AIRWAY_CONTRAST_HU = -60.0
AIRWAY_DARK_HU = (-990.0, -900.0)
AIRWAY_STEP_HU = 20.0
AIRWAY_MAX_FRACTION = 0.05
# Half-width (fraction of the body's width) of the window around the body's centre where the
# right/left split of each slice is searched.
SPLIT_WINDOW_FRACTION = 0.15


def body_centre_x(body: np.ndarray, sx: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice body centre (mass centroid, voxel x) and width (mm); shapes ``(z,)``."""
    cols = body.sum(axis=1, dtype=np.float64)  # (z, x)
    xs = np.arange(body.shape[2])
    mass = cols.sum(axis=1)
    centre = np.where(mass > 0, (cols * xs).sum(axis=1) / np.maximum(mass, 1), body.shape[2] / 2)
    present = cols > 0
    first = np.argmax(present, axis=1)
    last = body.shape[2] - 1 - np.argmax(present[:, ::-1], axis=1)
    width = np.where(present.any(axis=1), (last - first + 1) * sx, body.shape[2] * sx)
    return centre, width


def select_lungs(
    internal: np.ndarray,
    coarse: np.ndarray,
    body_cx: np.ndarray,
    cspacing: tuple[float, float, float],
    cvox_ml: float,
) -> np.ndarray:
    """Keep the internal-air components that look like lung: not mostly gas, big enough,
    reaching out from the middle, and large next to the largest one (more so in the middle)."""
    out = np.zeros_like(internal)
    if not internal.any():
        return out
    box = bounding_box(internal)
    internal = internal[box]
    labels, n = ndi.label(internal, output=np.int32)
    idx = np.flatnonzero(internal)  # the voxels of the components, in the order of ``[internal]``
    lab = labels.ravel()[idx]
    z, _, x = np.unravel_index(idx, labels.shape)
    count = np.bincount(lab, minlength=n + 1).astype(np.float64)
    # Gas fraction over the inner voxels, away from the partial-volume edge of thin gas (a
    # component without inner voxels is no lung either).
    inner = (~dilate(~internal, full=False))[internal]
    gas_inner = inner & (coarse[box][internal] < GAS_HU)
    gas = np.bincount(lab, weights=gas_inner, minlength=n + 1)
    n_inner = np.bincount(lab, weights=inner, minlength=n + 1)
    offset_mm = np.abs(x + box[2].start - body_cx[z + box[0].start]) * cspacing[2]
    offset = np.bincount(lab, weights=offset_mm, minlength=n + 1) / np.maximum(count, 1)
    reaches = np.bincount(lab, weights=offset_mm >= MIN_LUNG_REACH_MM, minlength=n + 1) > 0
    volume = count * cvox_ml
    lung_like = (gas < 0.5 * n_inner) & (volume >= MIN_LUNG_ML) & reaches
    lung_like[0] = False
    if not lung_like.any():
        return out
    rel = np.where(offset < CENTRAL_MM, CENTRAL_REL_VOLUME, LATERAL_REL_VOLUME)
    keep = lung_like & (volume >= rel * volume[lung_like].max())
    out[box] = keep[labels]
    return out


def find_airways(
    lungs: np.ndarray,
    coarse: np.ndarray,
    zone: np.ndarray,
    body_cx: np.ndarray,
    cspacing: tuple[float, float, float],
    air_threshold: float,
) -> tuple[np.ndarray | None, float | None]:
    """Trachea and main bronchi within ``lungs`` (coarse grid, shapes ``(z, y, x)``).

    Airway-like cross-sections (see ``AIRWAY_*`` and step 3 of :mod:`data_prep.ops.lung_mask`) are looked
    for among the islands of air (``air_threshold``) and among dark air, below the parenchyma's
    median + ``AIRWAY_CONTRAST_HU`` and at stricter thresholds down to ``AIRWAY_DARK_HU[0]``: a
    lumen that touches dark lung at one threshold is separate at a stricter one. The results are
    united.

    Returns:
        ``(airway, threshold)``: the airway and the most lenient threshold that contributed to it,
        or ``(None, None)`` when there is none.
    """
    shape, nx = lungs.shape, lungs.shape[2]
    _, sy, sx = cspacing
    band = CENTRAL_MM / sx
    box = list(bounding_box(lungs))
    x0 = max(box[2].start, int(body_cx[box[0]].min() - band))
    x1 = min(box[2].stop, int(np.ceil(body_cx[box[0]].max() + band)) + 1, nx)
    if x1 <= x0:
        return None, None
    box[2] = slice(x0, x1)
    box = tuple(box)
    parenchyma = float(np.median(coarse[lungs]))
    start = float(np.clip(parenchyma + AIRWAY_CONTRAST_HU, *AIRWAY_DARK_HU))
    two_lungs = zone.any(axis=(1, 2))[box[0]]
    lungs, zone, coarse = (np.ascontiguousarray(a[box]) for a in (lungs, zone, coarse))
    centre = body_cx[box[0]] - x0
    limit = AIRWAY_MAX_FRACTION * np.count_nonzero(lungs)
    darker = parenchyma + AIRWAY_CONTRAST_HU / 2
    airway = np.zeros(lungs.shape, dtype=bool)
    used = None
    for threshold in [air_threshold, *np.arange(start, AIRWAY_DARK_HU[0] - 1, -AIRWAY_STEP_HU)]:
        dark = (coarse < threshold) & lungs
        grown = _airway_sections(dark, coarse, air_threshold, darker, zone, two_lungs, centre, sy, sx)
        if grown.any() and np.count_nonzero(grown) <= limit:
            airway |= grown
            used = float(threshold) if used is None else used
    if used is None:
        return None, None
    out = np.zeros(shape, dtype=bool)
    out[box] = airway
    return out, used


def _airway_sections(
    air: np.ndarray,
    coarse: np.ndarray,
    air_threshold: float,
    darker: float,
    zone: np.ndarray,
    two_lungs: np.ndarray,
    centre: np.ndarray,
    sy: float,
    sx: float,
) -> np.ndarray:
    """The axial components of ``air`` that look like an airway lumen and connect in 3D to a
    large one (``AIRWAY_*``). ``air``, ``coarse`` (HU), ``zone`` (mediastinum) are ``(z, y, x)``;
    ``two_lungs`` (slice has a mediastinal zone) and ``centre`` (body centre, voxels) ``(z,)``."""
    labels, n = ndi.label(air, FACE_2D)
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    lab = flat[idx]
    z, y, x = np.unravel_index(idx, labels.shape)
    ym, xm = y * sy, x * sx
    count = np.bincount(lab, minlength=n + 1).astype(np.float64)

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(lab, weights=values, minlength=n + 1) / np.maximum(count, 1)

    cy, cx = mean(ym), mean(xm)
    vyy = mean(ym * ym) - cy * cy
    vxx = mean(xm * xm) - cx * cx
    vxy = mean(xm * ym) - cx * cy
    half_trace = (vxx + vyy) / 2
    root = np.sqrt(np.maximum(half_trace**2 - (vxx * vyy - vxy**2), 0))
    elongation = np.sqrt((half_trace + root + sx * sy) / (half_trace - root + sx * sy))
    slice_of = np.zeros(n + 1, dtype=np.int64)
    slice_of[lab] = z
    area = count * sy * sx
    like = (
        (area >= AIRWAY_AREA_MM2[0])
        & (area <= AIRWAY_AREA_MM2[1])
        & (elongation <= AIRWAY_MAX_ELONGATION)
        & (np.abs(cx - centre[slice_of] * sx) <= CENTRAL_MM)
        & (mean(coarse.ravel()[idx] < darker) >= AIRWAY_DARK_FRACTION)
    )
    like[0] = False
    if not like.any():
        return np.zeros_like(air)
    # The ring lies within 3 voxels of a candidate in its slice: work in the candidates' box
    # (the filters give the same there, as there is nothing beyond it).
    box = points_box((z, y, x), like[lab], margin=(0, 3, 3))
    candidates = np.where(like[labels[box]], labels[box], 0)
    near = dilate(candidates > 0, axes=(1, 2))
    ring_label = ndi.maximum_filter(candidates, size=(1, 7, 7))
    ring = (ring_label > 0) & ~near
    ring_label = ring_label[ring]
    ring_size = np.maximum(np.bincount(ring_label, minlength=n + 1), 1)
    ring_air = np.bincount(ring_label, weights=coarse[box][ring] < air_threshold, minlength=n + 1)
    ring_zone = np.bincount(ring_label, weights=zone[box][ring], minlength=n + 1)
    like &= ring_air <= AIRWAY_MAX_RING_AIR * ring_size
    like &= (ring_zone >= AIRWAY_MIN_RING_MEDIASTINUM * ring_size) | ~two_lungs[slice_of]
    out = np.zeros_like(air)
    if like.any():
        box = points_box((z, y, x), like[lab])
        seeds = like & (area >= AIRWAY_SEED_MM2)
        out[box] = reconstruct(like[labels[box]], seeds[labels[box]])[0]
    return out


def split_x(lungs: np.ndarray, body_cx: np.ndarray, body_w: np.ndarray, sx: float) -> np.ndarray:
    """Per-slice x (voxels, shape ``(z,)``) that separates the right lung (below) from the left:
    the column near the body's centre crossed by the fewest lung voxels."""
    nx = lungs.shape[2]
    xs = np.arange(nx)
    profile = lungs.sum(axis=1)  # (z, x)
    distance = np.abs(xs[None, :] - body_cx[:, None])
    window = distance <= np.maximum(SPLIT_WINDOW_FRACTION * body_w / sx, 1.0)[:, None]
    cost = np.where(window, profile * (2.0 * nx) + distance, np.inf)
    return np.argmin(cost, axis=1)


def mediastinum(lungs: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Voxels between the medial edges of the right and left lung, row by row."""
    nx = lungs.shape[2]
    xs = np.arange(nx)
    right = lungs & (xs < split[:, None, None])
    left = lungs & (xs >= split[:, None, None])
    right_edge = nx - 1 - np.argmax(right[:, :, ::-1], axis=2)
    left_edge = np.argmax(left, axis=2)
    both = right.any(axis=2) & left.any(axis=2)
    return (xs > right_edge[..., None]) & (xs < left_edge[..., None]) & both[..., None]


def deep_inside(mask: np.ndarray, depth: tuple[float, float]) -> np.ndarray:
    """Voxels more than ``depth`` = ``(dy, dx)`` voxels inside ``mask``'s y-extent in their
    column and inside its x-extent in their row, per slice: the hilum and the middle of the
    chest, where the costal pleura (and a juxtapleural nodule on it) is not."""
    ny, nx = mask.shape[1:]
    dy, dx = depth
    xs, ys = np.arange(nx), np.arange(ny)[:, None]
    row_first = np.argmax(mask, axis=2)[..., None]
    row_last = nx - 1 - np.argmax(mask[:, :, ::-1], axis=2)[..., None]
    col_first = np.argmax(mask, axis=1)[:, None, :]
    col_last = ny - 1 - np.argmax(mask[:, ::-1, :], axis=1)[:, None, :]
    in_row = (xs >= row_first + dx) & (xs <= row_last - dx)
    in_col = (ys >= col_first + dy) & (ys <= col_last - dy)
    return in_row & in_col

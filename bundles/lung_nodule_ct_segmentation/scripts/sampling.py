"""Patch centres for training: nodules, and negatives where a nodule detector's false positives arise.

``FgBgToIndicesd`` with an intensity threshold draws negative centres from every dense voxel of the
body. In a chest CT nearly all of those are chest wall, mediastinum and heart: easy tissue. The
false positives of a nodule segmenter are almost all inside the lungs (vessels, bifurcations,
airway walls, fissures, pleura). :class:`HardNegativeIndicesd` draws a configurable share of the
negative centres from dense voxels inside the (slightly dilated) lung mask and the rest from the
other dense voxels, and caps the stored index lists so a cached data set stays small.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from .transforms import source_name, to_numpy, voxel_spacing

__all__ = ["HardNegativeIndicesd", "negative_indices"]

logger = logging.getLogger(__name__)


def negative_indices(
    dense: np.ndarray, lung: np.ndarray | None, lung_fraction: float, max_indices: int, rng: np.random.Generator
) -> tuple[np.ndarray, int, int]:
    """Flat indices of negative patch centres: a ``lung_fraction`` share inside ``lung``, the rest outside.

    Args:
        dense: boolean volume of candidate negative centres (dense, non-nodule voxels).
        lung: boolean volume (same shape) of the dilated lungs, or None.
        lung_fraction: share of the returned indices inside ``lung`` (0..1).
        max_indices: at most this many indices are returned (uniform subsample).
        rng: random generator for the subsample.

    Returns:
        ``(indices, n_lung, n_other)``: the indices and how many candidates lay inside / outside.
        Without a lung mask, or when one side is empty, the indices are drawn from all of ``dense``.
    """
    flat = dense.ravel()
    if lung is None:
        idx = np.flatnonzero(flat)
        n_lung, n_other = 0, idx.size
        inside = idx[:0]
        outside = idx
    else:
        lung_flat = lung.ravel()
        inside = np.flatnonzero(flat & lung_flat)
        outside = np.flatnonzero(flat & ~lung_flat)
        n_lung, n_other = inside.size, outside.size
    f = float(np.clip(lung_fraction, 0.0, 1.0))
    if n_lung == 0 or n_other == 0 or f in (0.0, 1.0):
        # one side only: the side asked for when it has candidates, else every candidate
        pool = inside if f == 1.0 and n_lung else outside if f == 0.0 and n_other else np.flatnonzero(flat)
        take = min(pool.size, max_indices)
        return (rng.choice(pool, take, replace=False) if take < pool.size else pool), n_lung, n_other
    # total n such that f*n <= n_lung and (1-f)*n <= n_other, capped
    n = int(min(n_lung / f, n_other / (1.0 - f), max_indices))
    k_lung = max(1, int(round(f * n)))
    k_other = max(1, n - k_lung)
    a = rng.choice(inside, min(k_lung, n_lung), replace=False)
    b = rng.choice(outside, min(k_other, n_other), replace=False)
    return np.concatenate([a, b]), n_lung, n_other


class HardNegativeIndicesd(MapTransform):
    """Foreground and hard-negative centre indices for ``RandCropByPosNegLabeld``.

    Writes ``<key>_fg_indices`` (every nodule voxel) and ``<key>_bg_indices`` (negatives), flat
    indices into the spatial shape, like ``FgBgToIndicesd``. Negative candidates are voxels outside
    the nodules whose image value exceeds ``image_threshold`` (e.g. the window-scaled -600 HU); a
    ``lung_fraction`` share of the drawn negatives lies inside the lung mask grown by
    ``lung_margin_mm`` (so juxtapleural tissue and the pleura count as lung), the rest elsewhere in
    the body. Without a lung mask in the item (``lung_key`` missing, e.g. a MONAI Label datalist)
    or with an empty one, the negatives are drawn from all dense voxels, as ``FgBgToIndicesd``
    does, and a line is logged naming the file.

    Args:
        keys: label key(s) (``(C, H, W, D)``, nodules > 0).
        image_key: the window-scaled image.
        lung_key: the lung mask (same grid as the image). Default "lung".
        image_threshold: negatives only where ``image > image_threshold``.
        lung_fraction: share of negative centres inside the lungs. Default 0.75.
        lung_margin_mm: the lung mask is grown by this many mm. Default 5.
        max_indices: cap on the stored negative indices per scan (memory of a cached data set).
            Default 200000.
        seed: seed of the subsample. Default 0.
        allow_missing_keys: as MONAI. Default False.
    """

    def __init__(
        self, keys: KeysCollection, image_key: str = "image", lung_key: str = "lung", image_threshold: float = 0.0,
        lung_fraction: float = 0.75, lung_margin_mm: float = 5.0, max_indices: int = 200000, seed: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= lung_fraction <= 1.0:
            raise ValueError(f"lung_fraction must be in [0, 1], got {lung_fraction}")
        self.image_key = image_key
        self.lung_key = lung_key
        self.image_threshold = float(image_threshold)
        self.lung_fraction = float(lung_fraction)
        self.lung_margin_mm = float(lung_margin_mm)
        self.max_indices = int(max_indices)
        self.seed = int(seed)

    def _lung(self, d: Mapping, shape: tuple) -> np.ndarray | None:
        lung = d.get(self.lung_key)
        if lung is None:
            return None
        arr = to_numpy(lung)
        mask = (arr > 0).any(axis=0) if arr.ndim == len(shape) + 1 else arr > 0
        if mask.shape != tuple(shape):
            raise ValueError(
                f"{source_name(d, self.lung_key)}: lung mask shape {mask.shape} differs from the image's {tuple(shape)} "
                "after preprocessing; the lung mask must be on the scan's grid"
            )
        if not mask.any():
            return None
        if self.lung_margin_mm > 0:
            spacing = voxel_spacing(d[self.image_key])
            dist = ndimage.distance_transform_edt(~mask, sampling=spacing)
            mask = dist <= self.lung_margin_mm
        return mask

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = to_numpy(d[self.image_key])[0]
        for key in self.key_iterator(d):
            label = to_numpy(d[key]).reshape((-1,) + image.shape).any(axis=0)
            fg = np.flatnonzero(label)
            dense = (image > self.image_threshold) & ~label
            lung = self._lung(d, image.shape)
            if lung is None:
                logger.info("%s: no lung mask (or an empty one); negative patches from all dense voxels", source_name(d, self.image_key))
            rng = np.random.default_rng(self.seed)
            bg, _, _ = negative_indices(dense, lung, self.lung_fraction, self.max_indices, rng)
            d[f"{key}_fg_indices"] = fg
            d[f"{key}_bg_indices"] = bg
        return d

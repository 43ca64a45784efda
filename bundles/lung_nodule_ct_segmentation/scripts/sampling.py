"""Patch centres for training: nodules, and negatives where a nodule detector's false positives arise.

``FgBgToIndicesd`` with an intensity threshold draws negative centres from every dense voxel of the
body. In a chest CT nearly all of those are chest wall, mediastinum and heart: easy tissue. The
false positives of a nodule segmenter are almost all inside the lungs (vessels, bifurcations,
airway walls, fissures, pleura). :class:`HardNegativeIndicesd` draws a configurable share of the
negative centres from dense voxels inside the (slightly dilated) lung mask and the rest from the
other dense voxels, and caps the stored index lists so a cached data set stays small.

Positive centres are every nodule voxel by default, so a 30 mm nodule gets about 1000 times the
patches of a 3 mm one and nodules in a rare setting are rarely seen. Optionally each nodule (a
connected component of the label) gets the same number of centres (``positive_balance="nodule"``),
and nodules that touch soft tissue (the mean of a thin shell around them above ``attached_threshold``:
juxtapleural, juxtavascular, in a fissure) get ``attached_weight`` times as many: these are the
nodules a detector misses, and they are a small share of any training set.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from .transforms import source_name, to_numpy, voxel_spacing

__all__ = [
    "HardNegativeIndicesd",
    "attached_scan_sampler",
    "require_unweighted_scans",
    "negative_indices",
    "positive_indices",
    "shell_means",
]

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


def shell_means(components: np.ndarray, n: int, image: np.ndarray, spacing, shell_mm: float) -> np.ndarray:
    """Mean of ``image`` over the shell of each labelled component (``1..n``): voxels outside every
    component within ``shell_mm`` of it, each shell voxel given to its nearest component.

    Each component is measured in its own bounding box grown by the shell, so the cost follows the
    nodules, not the scan. Returns an array of length ``n`` (index k-1 for component k); NaN for a
    component with no shell.
    """
    means = np.full(n, np.nan)
    pad = [int(np.ceil(shell_mm / sp)) + 1 for sp in spacing]
    for k, box in enumerate(ndimage.find_objects(components, max_label=n), start=1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - p, 0), b.stop + p) for b, p in zip(box, pad))
        comp = components[box]
        dist, nearest = ndimage.distance_transform_edt(comp == 0, sampling=spacing, return_indices=True)
        shell = (dist > 0) & (dist <= shell_mm) & (comp[tuple(nearest)] == k)
        if shell.any():
            means[k - 1] = float(image[box][shell].mean(dtype=np.float64))
    return means


def positive_indices(
    label: np.ndarray, image: np.ndarray, spacing, balance: str, per_nodule: int, attached_threshold: float | None,
    attached_weight: float, shell_mm: float, rng: np.random.Generator,
) -> tuple[np.ndarray, int, int]:  # fmt: skip
    """Flat indices of positive patch centres, with per-nodule weights.

    ``balance="voxel"``: every nodule voxel once (a nodule's share grows with its volume);
    ``"nodule"``: ``per_nodule`` voxels of each nodule (drawn with replacement), the same share for
    every nodule. A nodule whose shell mean (``shell_means``) exceeds ``attached_threshold`` gets
    ``attached_weight`` times its share (voxel mode: its voxels repeated ``round(attached_weight)``
    times). Without ``attached_threshold`` in voxel mode this is ``np.flatnonzero(label)``.

    Returns ``(indices, n_attached)``: the attached nodules are counted whenever
    ``attached_threshold`` is given, whatever ``attached_weight`` (``attached_scan_sampler`` uses
    the count).
    """
    if balance not in ("voxel", "nodule"):
        raise ValueError(f"positive_balance must be 'voxel' or 'nodule', got {balance!r}")
    if balance == "voxel" and attached_threshold is None:
        return np.flatnonzero(label), 0
    components, n = ndimage.label(label)
    attached = np.zeros(n, dtype=bool)
    if attached_threshold is not None and n:
        attached = np.nan_to_num(shell_means(components, n, image, spacing, shell_mm), nan=-np.inf) > attached_threshold
    flat = components.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(1, n + 2))
    parts = []
    for k in range(n):
        voxels = order[bounds[k] : bounds[k + 1]]
        w = attached_weight if attached[k] else 1.0
        if balance == "voxel":
            parts.append(np.tile(voxels, max(1, int(round(w)))))
        else:
            parts.append(rng.choice(voxels, max(1, int(round(per_nodule * w))), replace=True))
    idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return idx, int(attached.sum())


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
        positive_balance: "voxel" (default: every nodule voxel is a positive centre) or "nodule"
            (``per_nodule`` centres per nodule, whatever its size); see :func:`positive_indices`.
        per_nodule: positive centres per nodule in "nodule" mode. Default 1000.
        attached_threshold: a nodule whose surrounding shell has a mean image value above this
            (same scale as ``image``; e.g. the window-scaled -600 HU) counts as attached to soft
            tissue. None (default): no nodule is, and no shell is measured.
        attached_weight: attached nodules get this many times the positive centres. Default 1.
        shell_mm: shell thickness around a nodule for ``attached_threshold``. Default 3.
        allow_missing_keys: as MONAI. Default False.
    """

    def __init__(
        self, keys: KeysCollection, image_key: str = "image", lung_key: str = "lung", image_threshold: float = 0.0,
        lung_fraction: float = 0.75, lung_margin_mm: float = 5.0, max_indices: int = 200000, seed: int = 0,
        positive_balance: str = "voxel", per_nodule: int = 1000, attached_threshold: float | None = None,
        attached_weight: float = 1.0, shell_mm: float = 3.0, allow_missing_keys: bool = False,
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
        if positive_balance not in ("voxel", "nodule"):
            raise ValueError(f"positive_balance must be 'voxel' or 'nodule', got {positive_balance!r}")
        if attached_weight < 1.0 or per_nodule < 1 or shell_mm <= 0:
            raise ValueError(
                "attached_weight must be >= 1, per_nodule >= 1 and shell_mm > 0; "
                f"got {attached_weight}, {per_nodule}, {shell_mm}"
            )
        self.positive_balance = positive_balance
        self.per_nodule = int(per_nodule)
        self.attached_threshold = None if attached_threshold is None else float(attached_threshold)
        self.attached_weight = float(attached_weight)
        self.shell_mm = float(shell_mm)

    def _lung(self, d: Mapping, shape: tuple) -> np.ndarray | None:
        lung = d.get(self.lung_key)
        if lung is None:
            return None
        arr = to_numpy(lung)
        mask = (arr > 0).any(axis=0) if arr.ndim == len(shape) + 1 else arr > 0
        if mask.shape != tuple(shape):
            raise ValueError(
                f"{source_name(d, self.lung_key)}: lung mask shape {mask.shape} differs from the image's "
                f"{tuple(shape)} after preprocessing; the lung mask must be on the scan's grid"
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
            rng = np.random.default_rng(self.seed)
            fg, n_att = positive_indices(
                label, image, voxel_spacing(d[self.image_key]), self.positive_balance, self.per_nodule,
                self.attached_threshold, self.attached_weight, self.shell_mm, rng,
            )  # fmt: skip
            if n_att > 0:
                logger.info(
                    "%s: %d nodule(s) touch soft tissue, weighted x%g",
                    source_name(d, self.image_key),
                    n_att,
                    self.attached_weight,
                )
            dense = (image > self.image_threshold) & ~label
            lung = self._lung(d, image.shape)
            if lung is None:
                logger.info(
                    "%s: no lung mask (or an empty one); negative patches from all dense voxels",
                    source_name(d, self.image_key),
                )
            bg, _, _ = negative_indices(dense, lung, self.lung_fraction, self.max_indices, rng)
            d[f"{key}_fg_indices"] = fg
            d[f"{key}_n_attached"] = n_att
            d[f"{key}_bg_indices"] = bg
        return d


def attached_scan_sampler(dataset, weight: float, key: str = "label_n_attached"):
    """A sampler that draws the scans holding an attached nodule ``weight`` times as often, or None.

    Within a scan, ``attached_weight`` only moves positive centres between its nodules; a scan is
    still drawn once per epoch. With 3-5 % of nodules attached to soft tissue in a training set,
    their scans need to be drawn more often as well. ``dataset`` is a fully cached ``CacheDataset``
    whose items went through :class:`HardNegativeIndicesd` (which writes ``<label>_n_attached``);
    ``len(dataset)`` scans are drawn per epoch, with replacement. ``weight == 1``: None (the data
    loader shuffles as usual).
    """
    import torch
    from torch.utils.data import WeightedRandomSampler

    weight = float(weight)
    if weight == 1.0:
        return None
    if weight < 1.0:
        raise ValueError(f"attached_scan_weight must be >= 1, got {weight}")
    cache = getattr(dataset, "_cache", None)
    if cache is None or len(cache) != len(dataset) or any(item is None for item in cache):
        raise ValueError(
            "attached_scan_weight > 1 needs the whole training set cached (cache_rate 1.0, a CacheDataset)"
        )
    counts = []
    for item in cache:
        if key not in item:
            raise ValueError(
                f"attached_scan_weight > 1: the cached items have no {key!r} (HardNegativeIndicesd writes it)"
            )
        counts.append(int(item[key]))
    n = sum(c > 0 for c in counts)
    logger.info(
        "attached_scan_weight %g: %d of %d training scans hold a nodule touching soft tissue", weight, n, len(counts)
    )
    weights = torch.tensor([weight if c > 0 else 1.0 for c in counts], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=len(counts), replacement=True)


def require_unweighted_scans(weight: float) -> None:
    """multi_gpu_train.json draws scans with ``DistributedSampler``: refuse ``attached_scan_weight`` there
    rather than ignore it."""
    if float(weight) != 1.0:
        raise ValueError(
            f"attached_scan_weight {weight}: weighted scan sampling is single-process only (multi_gpu_train.json "
            "draws scans with DistributedSampler); leave it at 1 there (attached_weight still applies)"
        )

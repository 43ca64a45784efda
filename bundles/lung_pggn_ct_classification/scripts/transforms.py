"""Input checks and the nodule box used by the configs' preprocessing."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform

__all__ = ["CheckImaged", "CheckSpatialShaped", "NoduleBoxd"]


def _name(img, key) -> str:
    meta = getattr(img, "meta", {}) or {}
    return str(meta.get("filename_or_obj", key))


def _nonfinite_in_nifti(name: str) -> int:
    """Non-finite voxels of a floating-point NIfTI file, read with nibabel (ITK's NIfTI reader turns them into 0)."""
    if not name.lower().endswith((".nii", ".nii.gz")) or not Path(name).is_file():
        return 0
    try:
        import nibabel as nib
    except ImportError:  # nibabel is optional: without it, such a file reads as ITK gives it
        return 0
    img = nib.load(name)
    if not np.issubdtype(img.get_data_dtype(), np.floating):
        return 0
    return int((~np.isfinite(np.asanyarray(img.dataobj))).sum())


class CheckImaged(MapTransform):
    """Refuse, naming its file, an image that is not one 3-D volume or that holds NaN or infinite voxels.

    Put after ``EnsureChannelFirstd``: a 3-D scan is then (1, H, W, D); a 2-D image, a 4-D series or a
    multi-channel image is not, and a NaN voxel would silently spread through smoothing and the network.
    A floating-point NIfTI file is also read with nibabel (when installed), since ITK's NIfTI reader (the
    ``SimpleITKReader``) reads NaN and infinite voxels as 0.

    Args:
        keys: keys of channel-first images (the first one is named "image" in messages, the others by their key).
        allow_missing_keys: skip absent keys. Default False.
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for n, key in enumerate(self.key_iterator(d)):
            img, name = d[key], _name(d[key], key)
            what = "image" if n == 0 else str(key)
            if img.ndim != 4 or img.shape[0] != 1:
                want = "the model takes one 3-D CT" if n == 0 else "not one 3-D volume"
                raise ValueError(f"{name}: {what} of shape {tuple(img.shape)}, {want} (1, H, W, D)")
            bad = _nonfinite_in_nifti(name)
            if not bad and torch.is_floating_point(torch.as_tensor(img)):
                bad = int((~torch.isfinite(torch.as_tensor(img))).sum())
            if bad:
                raise ValueError(f"{name}: {bad} of {img[0].numel()} voxels of the {what} are NaN or infinite")
        return d


class CheckSpatialShaped(MapTransform):
    """Refuse an image whose spatial shape is not ``spatial_size``, naming its file.

    The crops are made at a fixed size by ``data_prep pggn`` (``--bbox-size``, ``--crop-mm``);
    resizing another size silently would change what the network sees.

    Args:
        keys: keys of channel-first images (C, H, W, D).
        spatial_size: the expected (H, W, D).
        allow_missing_keys: skip absent keys. Default False.
    """

    def __init__(self, keys, spatial_size: Sequence[int], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape[1:])
            if shape != self.spatial_size:
                meta = getattr(d[key], "meta", {}) or {}
                name = meta.get("filename_or_obj", f"'{key}'")
                raise ValueError(
                    f"crop {name} has spatial shape {shape}, the model takes {self.spatial_size} "
                    "(set `spatial_size` to match, or make the crops with the matching data_prep pggn "
                    "--bbox-size/--crop-mm)"
                )
        return d


def _component_near(mask: np.ndarray, centre: np.ndarray, spacing: np.ndarray, max_mm: float | None = None):
    """The 6-connected component of ``mask`` (H, W, D) holding the voxel nearest to ``centre`` (voxel index; ``spacing``
    in mm), or an empty mask when there is none within ``max_mm``."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    idx = np.argwhere(labels > 0)
    dist = np.sqrt((((idx - centre) * spacing) ** 2).sum(axis=1))
    best = int(np.argmin(dist))
    if max_mm is not None and dist[best] > max_mm:
        return np.zeros_like(mask, dtype=bool)
    return labels == labels[tuple(idx[best])]


class NoduleBoxd(MapTransform):
    """Make the network's input from what a user has, with the geometry of ``data_prep pggn``'s bounding-box crops.

    The training crops (``crops/bbox``) are the tight bounding box of the nodule's mask (no margin),
    each axis resampled linearly to ``spatial_size`` voxels, HU rounded to integers. This transform
    makes the same from a CT region centred on the nodule, of any size and spacing:

    - the box is the one of the mask component nearest to the region's centre, from ``mask_key``
      when the item has a mask (any non-zero voxel; same grid as the image), else estimated: the
      image smoothed (Gaussian, ``sigma_mm``), thresholded at ``level`` of the way from the lung (the
      10th percentile within ``max_radius_mm``) to the nodule (the brightest smoothed value within
      ``seed_mm`` of the centre), kept within ``max_radius_mm`` of the centre;
    - the box's voxels are resampled (MONAI ``SpatialResample``, bilinear) onto ``spatial_size`` voxels
      spanning exactly the box's outer faces, as ``data_prep.pggn.bbox_crop`` does, and rounded.

    ``geometry``: ``"crop"`` takes the image as it is (a training-kind crop; ``CheckSpatialShaped``
    refuses other shapes); ``"box"`` always cuts the box; ``"auto"`` (default) takes an image without a
    mask whose shape is ``spatial_size`` as a training-kind crop, and cuts the box otherwise.
    Images are channel-first (1, H, W, D) MetaTensors in a common orientation (after ``Orientationd``).
    The mask key is removed.

    Args:
        keys: the image key.
        spatial_size: the network's (H, W, D).
        mask_key: the optional mask's key. Default ``"mask"``.
        geometry: ``"auto"``, ``"crop"`` or ``"box"``. Default ``"auto"``.
        sigma_mm: smoothing before the threshold (no mask). Default 0.7.
        seed_mm: radius around the centre where the nodule's value is taken (no mask). Default 2.
        max_radius_mm: the nodule is looked for within this distance of the centre (no mask). Default 20.
        min_threshold: lowest threshold in HU (no mask). Default -800.
        level: where the threshold lies between lung (0) and nodule (1) (no mask). Default 0.4.
    """

    def __init__(
        self, keys, spatial_size: Sequence[int], mask_key: str = "mask", geometry: str = "auto",
        sigma_mm: float = 0.7, seed_mm: float = 2.0, max_radius_mm: float = 20.0, min_threshold: float = -800.0,
        level: float = 0.4,
    ):  # fmt: skip
        super().__init__(keys)
        if geometry not in ("auto", "crop", "box"):
            raise ValueError(f"input_geometry must be 'auto', 'crop' or 'box', got {geometry!r}")
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.mask_key, self.geometry = mask_key, geometry
        self.sigma_mm, self.seed_mm = sigma_mm, seed_mm
        self.max_radius_mm, self.min_threshold, self.level = max_radius_mm, min_threshold, level

    def _estimate(self, image: np.ndarray, centre: np.ndarray, spacing: np.ndarray, name: str) -> np.ndarray:
        from scipy import ndimage

        smooth = ndimage.gaussian_filter(image, self.sigma_mm / spacing, mode="nearest")
        dist = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(np.indices(image.shape), centre, spacing)))
        near, ball = dist <= max(self.seed_mm, dist.min()), dist <= max(self.max_radius_mm, dist.min())
        nodule, lung = float(smooth[near].max()), float(np.percentile(smooth[ball], 10))
        threshold = max(lung + self.level * (nodule - lung), self.min_threshold)
        if nodule <= threshold:
            raise ValueError(f"{name}: nothing brighter than the lung at its centre (is it centred on the nodule?)")
        box = _component_near((smooth >= threshold) & ball, centre, spacing, max(self.seed_mm, dist.min()))
        idx = np.argwhere(box)
        if idx.min() == 0 or (idx.max(axis=0) == np.asarray(image.shape) - 1).any():
            raise ValueError(
                f"{name}: the nodule found at its centre reaches the region's edge, so the region does not hold all "
                "of it (cut a larger region around the nodule, or give its mask)"
            )
        return box

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from monai.data import MetaTensor
        from monai.transforms import SpatialResample

        d = dict(data)
        mask = d.pop(self.mask_key, None)
        for key in self.key_iterator(d):
            img = d[key]
            meta = getattr(img, "meta", {}) or {}
            name = str(meta.get("filename_or_obj", key))
            if img.ndim != 4 or img.shape[0] != 1:
                raise ValueError(f"{name}: image of shape {tuple(img.shape)}, the model takes one 3-D CT (1, H, W, D)")
            shape = tuple(img.shape[1:])
            if self.geometry == "crop" or (self.geometry == "auto" and mask is None and shape == self.spatial_size):
                continue
            if min(shape) < 2:
                raise ValueError(f"{name}: spatial shape {shape} is not a 3-D region")
            affine = torch.as_tensor(img.affine, dtype=torch.float64)
            spacing = np.sqrt((affine[:3, :3].numpy() ** 2).sum(axis=0))
            centre = (np.asarray(shape, dtype=float) - 1) / 2
            array = np.asarray(img[0].detach().cpu().numpy(), dtype=np.float32)
            if mask is not None:
                if tuple(mask.shape[1:]) != shape:
                    raise ValueError(f"{name}: its mask has spatial shape {tuple(mask.shape[1:])}, the image {shape}")
                box = _component_near(np.asarray(mask[0]) > 0, centre, spacing)
                if not box.any():
                    raise ValueError(f"{name}: its mask is empty")
            else:
                box = self._estimate(array, centre, spacing, name)
            idx = np.argwhere(box)
            lo, n = idx.min(axis=0), idx.max(axis=0) - idx.min(axis=0) + 1
            scale = torch.as_tensor(n / np.asarray(self.spatial_size), dtype=torch.float64)
            to_box = torch.eye(4, dtype=torch.float64)
            to_box[:3, :3] = torch.diag(scale)
            to_box[:3, 3] = torch.as_tensor(lo, dtype=torch.float64) - 0.5 + 0.5 * scale
            src = MetaTensor(torch.as_tensor(array)[None], affine=affine, meta=dict(meta))
            resample = SpatialResample(mode="bilinear", padding_mode="border")
            out = resample(src, dst_affine=affine @ to_box, spatial_size=self.spatial_size)
            d[key] = torch.round(out)
        return d

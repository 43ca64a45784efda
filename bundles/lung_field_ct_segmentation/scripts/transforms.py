"""Transforms MONAI lacks for the lung-field bundle: an input check and a per-slice label indicator."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["InputError", "CheckCTd", "SliceLabeld", "KeepInsideBodyd"]


class InputError(ValueError):
    """Raised by :class:`CheckCTd` for input that is not a usable CT volume (or lung mask)."""


def _name(img) -> str:
    meta = getattr(img, "meta", {}) or {}
    name = meta.get("filename_or_obj", "<in-memory array>")
    return str(name[0] if isinstance(name, (list, tuple)) and name else name)


def _spacing(img) -> np.ndarray | None:
    """Voxel spacing (mm) from the reader's metadata, or None when the reader found none."""
    meta = getattr(img, "meta", {}) or {}
    if "pixdim" not in meta and "spacing" not in meta:  # NumpyReader, PILReader: no geometry at all
        return None
    affine = np.asarray(meta.get("affine", np.eye(4)), dtype=float)
    return np.linalg.norm(affine[:3, :3], axis=0)


class CheckCTd(MapTransform):
    """Refuse input that is not a 3D CT volume in HU (and labels that do not fit it), naming the file.

    Runs after ``LoadImaged`` + ``EnsureChannelFirstd``, before any resampling, so that the user sees
    one clear message instead of a traceback from deep inside MONAI. Data are not changed.

    Checks on ``image_key`` (shape ``(C, H, W, D)``):
        - three spatial dimensions (a 2D image or a single PNG slice is refused);
        - a voxel spacing read from the file (``.npy`` arrays or PNGs have none), finite and positive;
        - one channel (a 4D file, e.g. several time points or echoes, is refused);
        - no NaN or infinite voxel: a CT holds finite HU only, and any value put in their place (air,
          tissue) would change the lung mask (air inside the body is segmented as lung);
        - raw Hounsfield units: some air (minimum below ``air_below``, default -500 HU) and a maximum
          below ``max_value`` (default 40000): a windowed/normalized image (0..1, 0..255) or raw
          stored values without RescaleIntercept are refused;
        - when ``pixdim`` is given: an axial field of view of at least ``min_pixels`` pixels of ``pixdim`` mm
          in each in-plane direction (the network needs slices of more than 16 pixels; a chest CT spans
          200-500 mm).

    Checks on ``label_key`` (when present in the data):
        - the same spatial shape as the image;
        - not empty (a lung mask must contain lung).

    Args:
        keys: keys of the image and, optionally, the label; the first is the image.
        air_below: the image must contain values below this (HU). Default -500.
        max_value: the image must stay below this. Default 40000.
        allow_missing_keys: skip keys absent from the data (labels at inference). Default True.
        pixdim: the in-plane spacing (mm) the image will be resampled to; None skips the size check. Default None.
        min_pixels: the smallest in-plane size, in pixels of ``pixdim``. Default 32.
    """

    def __init__(
        self,
        keys: KeysCollection,
        air_below: float = -500.0,
        max_value: float = 40000.0,
        allow_missing_keys: bool = True,
        pixdim: Sequence[float] | None = None,
        min_pixels: int = 32,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.air_below = air_below
        self.max_value = max_value
        self.pixdim = None if pixdim is None else [float(p) for p in pixdim][:2]
        self.min_pixels = min_pixels

    def check_image(self, img) -> None:
        """Raise :class:`InputError` when ``img`` (C, H, W, D) is not a 3D CT volume in HU."""
        name = _name(img)
        shape = tuple(img.shape)
        if len(shape) != 4:
            raise InputError(
                f"{name}: image has {len(shape) - 1} spatial dimension(s) (shape {shape[1:]}), expected a 3D CT "
                "volume (NIfTI, MetaImage or NRRD file, or DICOM series folder); 2D slices are not accepted"
            )
        if shape[0] != 1:
            raise InputError(
                f"{name}: image has {shape[0]} channels or volumes (shape {shape}, e.g. a 4D file of several time "
                "points), expected one 3D CT volume"
            )
        spacing = _spacing(img)
        if spacing is None:
            raise InputError(f"{name}: image has no voxel spacing in its header; give a CT volume with spacing")
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise InputError(f"{name}: image voxel spacing {spacing.round(4).tolist()} is not finite and positive")
        self.check_finite(img, name)
        lo, hi = float(img.min()), float(img.max())
        if lo >= self.air_below or hi >= self.max_value:
            raise InputError(
                f"{name}: intensity range [{lo:g}, {hi:g}] is not a CT in Hounsfield units (expected air below "
                f"{self.air_below:g} HU and values below {self.max_value:g}); "
                "give raw HU, not a windowed or normalized image"
            )
        if self.pixdim is not None:
            self.check_size(img, name)

    @staticmethod
    def check_finite(img, name: str) -> None:
        """Raise :class:`InputError` when ``img`` holds NaN or infinite voxels: their count and slices."""
        data = torch.as_tensor(img)
        if not data.is_floating_point() or (np.isfinite(float(data.min())) and np.isfinite(float(data.max()))):
            return  # the fast path: min and max propagate NaN and show an inf
        bad = ~torch.isfinite(data)
        n_bad = int(bad.sum())
        if n_bad:
            slices = torch.nonzero(bad.flatten(0, -2).any(0)).flatten().tolist()  # along the file's last axis
            raise InputError(
                f"{name}: {n_bad} of {data.numel()} voxels are NaN or infinite (slices {slices[0]}-{slices[-1]} of "
                f"{data.shape[-1]}); a CT holds finite HU only: fix the file (e.g. set out-of-field voxels to -1024)"
            )

    def check_size(self, img, name: str) -> None:
        """Raise :class:`InputError` when the axial field of view is under ``min_pixels`` pixels of ``pixdim``."""
        affine = np.asarray((getattr(img, "meta", {}) or {}).get("affine", np.eye(4)), dtype=float)
        counts = np.asarray(img.shape[1:4], dtype=float)
        fov = np.abs(affine[:2, :3]) @ counts  # mm along the world's x and y (the axial plane after Orientationd)
        if np.any(fov / np.asarray(self.pixdim) < self.min_pixels):
            need = " x ".join(f"{self.min_pixels * p:g}" for p in self.pixdim)
            raise InputError(
                f"{name}: axial field of view {fov[0]:.0f} x {fov[1]:.0f} mm is too small for the model (it needs "
                f"at least {need} mm: {self.min_pixels} pixels of {' x '.join(f'{p:g}' for p in self.pixdim)} mm); "
                "a chest CT spans 200-500 mm"
            )

    def check_label(self, lab, img) -> None:
        """Raise :class:`InputError` when ``lab`` (C, H, W, D) does not fit ``img`` or is empty."""
        name = _name(lab)
        if tuple(lab.shape[1:]) != tuple(img.shape[1:]):
            raise InputError(
                f"{name}: label shape {tuple(lab.shape[1:])} differs from image {_name(img)} "
                f"shape {tuple(img.shape[1:])}"
            )
        if not bool((lab > 0).any()):
            raise InputError(f"{name}: label is empty (no lung voxel)")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        img = d[self.keys[0]] if self.keys[0] in d else None
        if img is None:
            raise InputError(f"no '{self.keys[0]}' in the input data (keys: {sorted(map(str, d))})")
        self.check_image(img)
        for key in keys:
            if key != self.keys[0]:
                self.check_label(d[key], img)
        return d


class SliceLabeld(MapTransform):
    """Mark every voxel of each slice along ``spatial_dim`` with whether that slice has label.

    ``RandCropByPosNegLabeld`` fed with this key and ``spatial_size`` ``(-1, -1, 1)`` draws "positive"
    (lung) and "negative" (no-lung) slices in the ratio ``pos : neg``, which a voxel-level label
    cannot do (background voxels lie on lung slices too).

    Args:
        keys: the label key(s), shape (C, H, W, D).
        new_key_postfix: the indicator is stored under ``key + new_key_postfix``. Default ``"_slice"``.
        spatial_dim: spatial axis of the slices (2 = D = axial for RAS/LPS volumes). Default 2.
    """

    def __init__(self, keys: KeysCollection, new_key_postfix: str = "_slice", spatial_dim: int = 2) -> None:
        super().__init__(keys)
        self.postfix = new_key_postfix
        self.spatial_dim = spatial_dim

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = torch.as_tensor(d[key])
            axis = self.spatial_dim + 1
            other = tuple(a for a in range(lab.ndim) if a != axis)
            has = torch.amax((lab > 0).to(torch.uint8), dim=other, keepdim=True)
            d[f"{key}{self.postfix}"] = has.expand(lab.shape).clone()
        return d


class KeepInsideBodyd(MapTransform):
    """Zero a prediction outside the patient's body (air around the patient, under the table).

    The body is the largest 3D connected component (face connectivity) of ``image > threshold``, with
    holes filled slice by slice along ``spatial_dim``. Lungs lie inside it; air outside the body,
    which a slice model can mistake for lung, does not.

    Args:
        keys: prediction key(s), shape (C, H, W, D), on the grid of ``image_key``.
        image_key: the preprocessed image, shape (1, H, W, D). Default ``"image"``.
        threshold: body threshold in the image's (windowed) units; e.g. -500 HU in a [-1000, 400]
            window scaled to [0, 1] is ``500 / 1400``. Default 0.357.
        spatial_dim: spatial axis of the slices (2 = axial for RAS/LPS volumes). Default 2.
    """

    def __init__(
        self, keys: KeysCollection, image_key: str = "image", threshold: float = 0.357, spatial_dim: int = 2
    ) -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.threshold = threshold
        self.spatial_dim = spatial_dim

    def body_mask(self, image) -> np.ndarray:
        """Boolean (H, W, D) body mask of a (1, H, W, D) image."""
        from scipy import ndimage

        img = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)[0]
        body = img > self.threshold
        lab, n = ndimage.label(body)
        if n == 0:
            return body
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        body = lab == int(sizes.argmax())
        body = np.moveaxis(body, self.spatial_dim, 0)
        for k in range(body.shape[0]):
            body[k] = ndimage.binary_fill_holes(body[k])
        return np.moveaxis(body, 0, self.spatial_dim)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        body = None
        for key in self.key_iterator(d):
            if body is None:
                body = torch.as_tensor(self.body_mask(d[self.image_key]))
            d[key] = d[key] * body.to(device=d[key].device, dtype=d[key].dtype)[None]
        return d

"""Sliding-window inference with a window fitted to thin scans and optional flip test-time augmentation."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer

from .flags import as_flag

__all__ = ["NoduleSlidingWindowInferer"]


def _windows(size: int, roi: int, overlap: float) -> int:
    """Windows ``SlidingWindowInferer`` places along an axis of ``size`` (``monai.data.utils.dense_patch_slices``)."""
    if roi >= size:
        return 1
    step = max(int(roi * (1 - overlap)), 1)
    return -(-(size - roi) // step) + 1


class NoduleSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` that shrinks the window to thin scans, combines scales and can average flipped passes.

    The network is fully convolutional, so the window may be larger than the training patch (fewer
    overlaps on a whole chest) and, along an axis where the scan is shorter than the window, is cut
    to the scan's size rounded up to ``size_divisible`` (``SlidingWindowInferer`` would pad a 20-slice
    scan to the window's full depth and compute on air). In a coarse pass (a scale above 1) the
    window is then made, along each axis, as small as it can be without adding windows there; the
    1 mm pass keeps the full window, because the network's output depends on how much context its
    window gives (measured: shrinking it there moved single nodules by up to 0.4 Dice).

    Args:
        roi_size: the largest window ``(H, W, D)``.
        sw_batch_size: windows per forward pass. Default 1.
        overlap: overlap between windows. Default 0.25.
        mode: blending, ``"gaussian"`` or ``"constant"``. Default "gaussian".
        flip_tta: also run the input flipped along each non-empty subset of ``flip_axes`` and average
            the (unflipped) logits. Default False.
        flip_axes: spatial axes (0-based, of ``(H, W, D)``) for test-time flips. Default (0, 1, 2)
            (7 extra passes); ``(0, 1)`` gives 3.
        size_divisible: the window is kept a multiple of this (the network's total stride). Default 8.
        scales: run the network on the scan at each of these voxel-size factors (``2.0``: voxels twice as
            large, so a 30 mm mass looks like the 15 mm nodules the patches taught) and keep the voxelwise
            maximum of the logits, resampled back to the scan's grid. Default ``(1.0,)`` (one pass).
        kwargs: other ``SlidingWindowInferer`` arguments (``sigma_scale``, ``padding_mode``, ``cval``,
            ``sw_device``, ``device``, ``progress``, ...).
    """

    def __init__(
        self, roi_size: Sequence[int] | int, sw_batch_size: int = 1, overlap: float = 0.25, mode: str = "gaussian",
        flip_tta: bool = False, flip_axes: Sequence[int] = (0, 1, 2), size_divisible: int = 8,
        scales: Sequence[float] = (1.0,), **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, **kwargs)
        self.max_roi_size = self.roi_size
        self.flip_tta = as_flag(flip_tta, "flip_tta (the config's tta)")
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.size_divisible = int(size_divisible)
        self.scales = tuple(float(f) for f in scales)
        if not self.scales or min(self.scales) < 1.0:
            raise ValueError(f"scales must be voxel-size factors >= 1.0 (1.0 is the scan as it is), got {scales!r}.")

    def _fit_roi(self, shape: Sequence[int], tight: bool = False) -> None:
        roi = self.max_roi_size
        roi = [roi] * len(shape) if isinstance(roi, int) else list(roi)
        overlap = self.overlap if isinstance(self.overlap, Sequence) else [self.overlap] * len(shape)
        div = self.size_divisible
        fitted = []
        for r, s, o in zip(roi, shape, overlap):
            r = min(int(r), -(-int(s) // div) * div)
            if tight:  # the same number of windows along this axis can often be smaller ones (a 315-voxel
                # axis takes five 96-voxel windows at overlap 0.25, or five of 80): less work, same cover
                need = _windows(s, r, o)
                r = next(c for c in range(div, r + 1, div) if _windows(s, c, o) <= need)
            fitted.append(r)
        self.roi_size = fitted

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Logits ``(B, C, H, W, D)`` for ``inputs`` ``(B, C_in, H, W, D)``."""
        out = None
        shape = tuple(inputs.shape[2:])
        for f in self.scales:
            if f == 1.0:
                logits = self._one_scale(inputs, network, *args, tight=False, **kwargs)
            else:
                small = [max(1, round(s / f)) for s in shape]
                x = F.interpolate(inputs, size=small, mode="area")
                logits = self._one_scale(x, network, *args, tight=True, **kwargs)
                logits = F.interpolate(logits, size=shape, mode="trilinear", align_corners=False)
            out = logits if out is None else torch.maximum(out, logits)
        return out

    def _one_scale(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, tight: bool = False, **kwargs: Any
    ) -> torch.Tensor:
        self._fit_roi(inputs.shape[2:], tight)
        out = super().__call__(inputs, network, *args, **kwargs)
        if not self.flip_tta:
            return out
        n = 1
        subsets = [s for r in range(1, len(self.flip_axes) + 1) for s in itertools.combinations(self.flip_axes, r)]
        for axes in subsets:
            dims = [a + 2 for a in axes]
            out = out + torch.flip(super().__call__(torch.flip(inputs, dims), network, *args, **kwargs), dims)
            n += 1
        return out / n

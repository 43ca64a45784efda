"""Sliding-window inference with a window fitted to thin scans and optional flip test-time augmentation."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer

from .flags import as_flag

__all__ = ["NoduleSlidingWindowInferer"]


class NoduleSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` that shrinks the window to thin scans and can average flipped passes.

    The network is fully convolutional, so the window may be larger than the training patch (fewer
    overlaps on a whole chest) and, along an axis where the scan is shorter than the window, is cut
    to the scan's size rounded up to ``size_divisible`` (``SlidingWindowInferer`` would pad a 20-slice
    scan to the window's full depth and compute on air).

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
        kwargs: other ``SlidingWindowInferer`` arguments (``sigma_scale``, ``padding_mode``, ``cval``,
            ``sw_device``, ``device``, ``progress``, ...).
    """

    def __init__(
        self, roi_size: Sequence[int] | int, sw_batch_size: int = 1, overlap: float = 0.25, mode: str = "gaussian",
        flip_tta: bool = False, flip_axes: Sequence[int] = (0, 1, 2), size_divisible: int = 8, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, **kwargs)
        self.max_roi_size = self.roi_size
        self.flip_tta = as_flag(flip_tta, "flip_tta (the config's tta)")
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.size_divisible = int(size_divisible)

    def _fit_roi(self, shape: Sequence[int]) -> None:
        roi = self.max_roi_size
        roi = [roi] * len(shape) if isinstance(roi, int) else list(roi)
        div = self.size_divisible
        self.roi_size = [min(int(r), -(-int(s) // div) * div) for r, s in zip(roi, shape)]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits ``(B, C, H, W, D)`` for ``inputs`` ``(B, C_in, H, W, D)``."""
        self._fit_roi(inputs.shape[2:])
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

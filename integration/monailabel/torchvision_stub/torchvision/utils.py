"""Minimal ``make_grid``/``save_image`` so that importing MONAI Label works (see the package docstring)."""

from __future__ import annotations

import math

import torch

__all__ = ["make_grid", "save_image"]


def make_grid(tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0, **kwargs):
    """Tile a (B, C, H, W) batch into one (C, H', W') image."""
    t = torch.as_tensor(tensor)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    b, c, h, w = t.shape
    ncol = min(nrow, b)
    nrows = math.ceil(b / ncol)
    grid = t.new_full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for k in range(b):
        r, q = divmod(k, ncol)
        grid[:, padding + r * (h + padding): padding + r * (h + padding) + h, padding + q * (w + padding): padding + q * (w + padding) + w] = t[k]
    return grid


def save_image(tensor, fp, **kwargs):
    raise NotImplementedError("the torchvision stand-in cannot save images; install a real torchvision for that")

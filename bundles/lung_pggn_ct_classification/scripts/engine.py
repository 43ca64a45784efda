"""Batch preparation for one or two network inputs, and the loss with the reconstruction term."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.engines.utils import PrepareBatch

__all__ = ["PrepareBatchKeys", "BCEWithReconstructionLoss"]


class PrepareBatchKeys(PrepareBatch):
    """Give the network ``batch[k]`` for each of ``input_keys`` as positional inputs.

    ``["image"]`` (image-only), ``["features"]`` (tabular-only) or ``["image", "features"]``
    (fusion); the label is ``batch["label"]`` (B, 1), or None when absent (inference).

    Args:
        input_keys: batch keys passed to the network in order.
        label_key: the label's key. Default ``"label"``.
    """

    def __init__(self, input_keys: Sequence[str], label_key: str = "label"):
        self.input_keys = list(input_keys)
        self.label_key = label_key

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        inputs = [
            torch.as_tensor(batchdata[k]).float().to(device=device, non_blocking=non_blocking) for k in self.input_keys
        ]
        label = batchdata.get(self.label_key)
        if label is not None:
            label = torch.as_tensor(label).float().to(device=device, non_blocking=non_blocking)
        return inputs[0], label, tuple(inputs[1:]), {}


class BCEWithReconstructionLoss(nn.Module):
    """``BCEWithLogits(pred[:, :1], label) + reconstruction_weight * mean(pred[:, 1:] ** 2)``.

    ``pred[:, 1:]`` is the reconstruction residual the tabular network returns in training
    (absent for the image and fusion networks, whose loss is then plain BCE).

    Args:
        reconstruction_weight: lambda of the reconstruction term. Default 0.5.
        pos_weight: weight of the positive class in the BCE term. Default None.
    """

    def __init__(self, reconstruction_weight: float = 0.5, pos_weight: float | None = None):
        super().__init__()
        self.reconstruction_weight = float(reconstruction_weight)
        self.bce = nn.BCEWithLogitsLoss(pos_weight=None if pos_weight is None else torch.tensor([float(pos_weight)]))

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.bce.pos_weight is not None:
            self.bce.pos_weight = self.bce.pos_weight.to(pred.device)
        loss = self.bce(pred[:, :1], label.reshape(-1, 1).to(pred.dtype))
        if pred.shape[1] > 1 and self.reconstruction_weight:
            loss = loss + self.reconstruction_weight * pred[:, 1:].pow(2).mean()
        return loss

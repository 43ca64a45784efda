"""Handlers MONAI lacks: gradient-norm clipping for ``SupervisedTrainer``, HD95 in millimetres."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.engines.utils import IterationEvents
from monai.handlers import HausdorffDistance

__all__ = ["GradientClipHandler", "HausdorffDistanceMM"]


class GradientClipHandler:
    """Clip the gradient norm between backward and optimizer step of a MONAI ``SupervisedTrainer``.

    ``SupervisedTrainer`` has no clipping argument; it fires ``IterationEvents.BACKWARD_COMPLETED``
    after ``loss.backward()`` and before ``optimizer.step()``. With AMP the gradients are unscaled
    first (``GradScaler.unscale_``), so ``max_norm`` is in true gradient units either way.

    Args:
        max_norm: largest total gradient norm (``torch.nn.utils.clip_grad_norm_``). Default 1.0.
        norm_type: the p of the p-norm. Default 2.0.
    """

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        self.max_norm = max_norm
        self.norm_type = norm_type

    def attach(self, engine) -> None:
        """Register on ``engine`` (a ``SupervisedTrainer``)."""
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm, norm_type=self.norm_type)


class HausdorffDistanceMM(HausdorffDistance):
    """``monai.handlers.HausdorffDistance`` in millimetres: the spacing is read from each prediction's affine.

    MONAI's handler passes no spacing to the metric, so distances come out in voxels. Predictions
    are decollated ``MetaTensor`` items of shape (C, H, W, D); all items of one call must share a
    spacing (one volume per validation batch, as in this bundle's configs).

    Args:
        args, kwargs: as ``monai.handlers.HausdorffDistance`` (``percentile=95`` for HD95).
    """

    def update(self, output: Sequence[torch.Tensor]) -> None:
        """Accumulate one batch ``[y_pred, y]`` with the predictions' voxel spacing."""
        if len(output) != 2:
            raise ValueError(f"output must have length 2, got {len(output)}.")
        y_pred, y = output
        first = y_pred[0] if isinstance(y_pred, (list, tuple)) else y_pred
        affine = getattr(first, "affine", None)
        spacing = None
        if affine is not None:
            aff = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=float)
            aff = aff[0] if aff.ndim == 3 else aff  # (B, 4, 4) when batched
            spacing = np.linalg.norm(aff[:3, :3], axis=0).tolist()
        self.metric_fn(y_pred, y, spacing=spacing)

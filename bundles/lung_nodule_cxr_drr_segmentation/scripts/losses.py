"""Loss of the fusion network: Tversky + focal Tversky + weighted BCE on the nodule mask, BCE on the
multi-scale attention maps. Every weight is a config key; the phase handler changes
``seg_scale`` and ``attention_weight`` between training phases."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FusionSegLoss"]


class FusionSegLoss(nn.Module):
    """``seg_scale * (w_t * Tversky + w_ft * FocalTversky + w_bce * wBCE) + attention_weight * mean_s BCE_s``.

    The Tversky index ``TP / (TP + alpha FP + beta FN)`` is computed over the whole batch (images
    without a nodule are valid negatives: they add false positives only), with ``smooth`` in numerator
    and denominator. Focal Tversky is ``(1 - TI) ** gamma`` (gamma < 1 keeps a gradient near TI = 1,
    Abraham & Khan 2019). The BCE terms weight positive pixels by ``pos_weight`` (nodules cover well
    under 1% of a radiograph).

    Args:
        tversky_weight: weight of the Tversky loss. Default 0.4.
        focal_tversky_weight: weight of the focal Tversky loss. Default 0.3.
        bce_weight: weight of the weighted BCE on the mask. Default 0.3.
        attention_weight: weight of the attention BCE (the phases change it). Default 0.5.
        tversky_alpha: false-positive weight of the Tversky index. Default 0.3.
        tversky_beta: false-negative weight of the Tversky index. Default 0.7.
        focal_gamma: exponent of the focal Tversky loss. Default 0.75.
        pos_weight: positive-pixel weight of the mask BCE. Default 20.
        attention_pos_weight: positive weight of the attention BCE. Default 5.
        smooth: smoothing of the Tversky index. Default 1.0.
    """

    def __init__(
        self,
        tversky_weight: float = 0.4,
        focal_tversky_weight: float = 0.3,
        bce_weight: float = 0.3,
        attention_weight: float = 0.5,
        tversky_alpha: float = 0.3,
        tversky_beta: float = 0.7,
        focal_gamma: float = 0.75,
        pos_weight: float = 20.0,
        attention_pos_weight: float = 5.0,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        self.tversky_weight = tversky_weight
        self.focal_tversky_weight = focal_tversky_weight
        self.bce_weight = bce_weight
        self.attention_weight = attention_weight
        self.seg_scale = 1.0
        self.tversky_alpha = tversky_alpha
        self.tversky_beta = tversky_beta
        self.focal_gamma = focal_gamma
        self.pos_weight = pos_weight
        self.attention_pos_weight = attention_pos_weight
        self.smooth = smooth
        self.last: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``pred`` (B, 1 + S, H, W) logits against ``target`` (B, 1, H, W) in {0, 1}.

        Channel 0 of ``pred`` is the mask, channels 1.. the attention maps.
        """
        pred, target = (
            pred.float(),
            target.float(),
        )  # under AMP the logits arrive in float16: sums and powers in float32
        seg = pred[:, 0:1]
        zero = pred.new_zeros(())
        total = zero
        if self.seg_scale > 0:
            p = torch.sigmoid(seg)
            tp = (p * target).sum()
            fp = (p * (1 - target)).sum()
            fn = ((1 - p) * target).sum()
            ti = (tp + self.smooth) / (tp + self.tversky_alpha * fp + self.tversky_beta * fn + self.smooth)
            tversky = 1 - ti
            focal = tversky.clamp_min(1e-7) ** self.focal_gamma
            bce = F.binary_cross_entropy_with_logits(seg, target, pos_weight=seg.new_tensor(self.pos_weight))
            seg_loss = self.tversky_weight * tversky + self.focal_tversky_weight * focal + self.bce_weight * bce
            total = total + self.seg_scale * seg_loss
            self.last.update(
                tversky=float(tversky.detach()), focal_tversky=float(focal.detach()), bce=float(bce.detach())
            )
        if self.attention_weight > 0 and pred.shape[1] > 1:
            att = pred[:, 1:]
            att_loss = F.binary_cross_entropy_with_logits(
                att, target.expand_as(att), pos_weight=att.new_tensor(self.attention_pos_weight)
            )
            total = total + self.attention_weight * att_loss
            self.last["attention_bce"] = float(att_loss.detach())
        return total

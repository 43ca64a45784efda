"""Evaluation writer: per-image Dice, IoU, precision, recall, the attention map's Dice and the nodule's
contrast in the DRR (CSV), and a summary by nodule size (>= ``size_threshold_mm`` and smaller, the large
ones also split by DRR contrast, and pairs without a nodule)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

__all__ = ["PerImageMetrics", "binary_scores", "drr_contrast", "soft_dice"]


def binary_scores(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision, recall of two binary arrays; NaN where undefined (no nodule and none predicted).

    Args:
        pred: predicted mask, any shape, {0, 1}.
        label: reference mask, same shape, {0, 1}.
    """
    p = np.asarray(pred) > 0.5
    g = np.asarray(label) > 0.5
    tp = float(np.logical_and(p, g).sum())
    fp = float(np.logical_and(p, ~g).sum())
    fn = float(np.logical_and(~p, g).sum())
    nan = float("nan")
    return {
        "dice": 2 * tp / (2 * tp + fp + fn) if g.any() else nan,
        "iou": tp / (tp + fp + fn) if g.any() else nan,
        "precision": tp / (tp + fp) if tp + fp > 0 else nan,
        "recall": tp / (tp + fn) if g.any() else nan,
        "fp_pixels": fp,
        "label_pixels": float(g.sum()),
    }


def soft_dice(prob: np.ndarray, label: np.ndarray) -> float:
    """Threshold-free Dice ``2 sum(p g) / (sum p + sum g)`` of a probability map; NaN without a nodule.

    Args:
        prob: probabilities in [0, 1], any shape.
        label: reference mask, same shape, {0, 1}.
    """
    p = np.asarray(prob, np.float64)
    g = (np.asarray(label) > 0.5).astype(np.float64)
    return float(2 * (p * g).sum() / (p.sum() + g.sum())) if g.any() else float("nan")


def drr_contrast(drr: np.ndarray, label: np.ndarray, inner: int = 3, outer: int = 8) -> float:
    """How far the nodule stands out of its surroundings in the DRR: ``(mean in mask - mean in ring) / std in ring``.

    The ring holds the pixels between ``inner`` and ``outer`` pixels (chessboard distance) from the mask,
    so vessels and ribs crossing the nodule's neighbourhood raise its standard deviation. The value does
    not change under an affine intensity scaling, so it can be computed on the normalised network input.
    NaN without a nodule, with an empty ring or a constant ring.

    Args:
        drr: the DRR, (H, W).
        label: reference mask, (H, W), {0, 1}.
        inner: ring's inner distance, pixels. Default 3.
        outer: ring's outer distance, pixels. Default 8.
    """
    g = torch.as_tensor(np.asarray(label) > 0.5, dtype=torch.float32)[None, None]
    if not g.any():
        return float("nan")
    grow = lambda r: F.max_pool2d(g, 2 * r + 1, stride=1, padding=r)[0, 0].numpy() > 0  # noqa: E731
    ring = grow(outer) & ~grow(inner)
    d = np.asarray(drr, np.float64)
    if ring.sum() < 2 or d[ring].std() == 0:
        return float("nan")
    return float((d[g[0, 0].numpy() > 0].mean() - d[ring].mean()) / d[ring].std())


def _mean(values: Sequence[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


class PerImageMetrics:
    """Collect per-image scores during evaluation; write ``per_image.csv`` and ``metrics.csv`` at the end.

    ``attention_dice`` is the soft (threshold-free) Dice of the 1/4-scale attention probability map
    against the mask; ``attention_dice_thresholded`` thresholds it at ``attention_threshold`` first.
    ``drr_contrast`` is :func:`drr_contrast` of the DRR channel of the network input (``image``
    channel 1) against the mask: how visible the nodule is in the DRR the network was given.

    Reads, per decollated item, ``pred`` (1, H, W) binary and ``attention`` (1, H, W) probability from
    ``engine.state.output`` and ``label``, ``xray_path`` and ``max_diameter_mm`` from
    ``engine.state.batch``. Metrics are computed on the network grid (``image_size``). Pairs without a
    nodule have no Dice/IoU/recall (NaN) and count their false-positive pixels.

    ``metrics.csv`` rows: ``all`` (pairs with a nodule), ``>=10mm``, ``<10mm``, ``>=10mm_contrast<=1``,
    ``>=10mm_contrast>1`` (the large ones by ``drr_contrast`` against ``contrast_threshold``), ``no_nodule``; columns:
    group, n, dice, iou, precision, recall, attention_dice, attention_dice_thresholded, fp_pixels
    (means over the group's images, NaN entries left out).

    Args:
        output_dir: folder for the CSV files (created).
        size_threshold_mm: nodule size that splits the groups. Default 10.
        attention_threshold: probability above which the attention map counts as foreground. Default 0.5.
        contrast_threshold: DRR contrast that splits the large nodules' pairs. Default 1.
        per_image_filename: Default "per_image.csv".
        summary_filename: Default "metrics.csv".
    """

    def __init__(
        self,
        output_dir: str,
        size_threshold_mm: float = 10.0,
        attention_threshold: float = 0.5,
        per_image_filename: str = "per_image.csv",
        summary_filename: str = "metrics.csv",
        contrast_threshold: float = 1.0,
    ) -> None:
        self.output_dir = str(output_dir)
        self.contrast_threshold = contrast_threshold
        self.size_threshold_mm = size_threshold_mm
        self.attention_threshold = attention_threshold
        self.per_image_filename = per_image_filename
        self.summary_filename = summary_filename
        self.rows: list[dict] = []
        self.summary: dict[str, dict] = {}

    def attach(self, engine: Engine) -> None:
        """Register on the evaluator."""
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        """Score every item of the last batch."""
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):
            batch, output = [batch], [output]
        for b, o in zip(batch, output):
            pred = torch.as_tensor(o["pred"]).detach().cpu().numpy()[0]
            label = torch.as_tensor(o.get("label", b.get("label"))).detach().cpu().numpy()[0]
            row = {
                "attention_dice_thresholded": float("nan"),
                "xray": str(b.get("xray_path", "")),
                "case_id": str(b.get("case_id", "")),
                "max_diameter_mm": float(torch.as_tensor(b.get("max_diameter_mm", 0.0))),
            }
            row.update(binary_scores(pred, label))
            image = b.get("image")
            row["drr_contrast"] = float("nan")
            if image is not None and torch.as_tensor(image).shape[0] >= 2:
                row["drr_contrast"] = drr_contrast(torch.as_tensor(image).detach().cpu().numpy()[1], label)
            if "attention" in o:
                att = torch.as_tensor(o["attention"]).detach().cpu().numpy()[0].astype(np.float64)
                row["attention_dice"] = soft_dice(att, label)
                row["attention_dice_thresholded"] = binary_scores(att >= self.attention_threshold, label)["dice"]
            else:
                row["attention_dice"] = float("nan")
            self.rows.append(row)

    def groups(self) -> dict[str, list[dict]]:
        """Rows by group: all (with a nodule), >= threshold, < threshold, no nodule."""
        t, c = self.size_threshold_mm, self.contrast_threshold
        pos = [r for r in self.rows if r["label_pixels"] > 0]
        large = [r for r in pos if r["max_diameter_mm"] >= t]
        return {
            "all": pos,
            f">={t:g}mm": large,
            f"<{t:g}mm": [r for r in pos if r["max_diameter_mm"] < t],
            f">={t:g}mm_contrast<={c:g}": [r for r in large if r.get("drr_contrast", math.nan) <= c],
            f">={t:g}mm_contrast>{c:g}": [r for r in large if r.get("drr_contrast", math.nan) > c],
            "no_nodule": [r for r in self.rows if r["label_pixels"] == 0],
        }

    def write(self, engine: Engine | None = None) -> None:
        """Write both CSV files and keep the summary in ``self.summary`` (and ``engine.state.metrics``)."""
        os.makedirs(self.output_dir, exist_ok=True)
        cols = [
            "xray",
            "case_id",
            "max_diameter_mm",
            "dice",
            "iou",
            "precision",
            "recall",
            "attention_dice",
            "attention_dice_thresholded",
            "fp_pixels",
            "label_pixels",
            "drr_contrast",
        ]
        with open(os.path.join(self.output_dir, self.per_image_filename), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: r.get(k) for k in cols})
        keys = ["dice", "iou", "precision", "recall", "attention_dice", "attention_dice_thresholded", "fp_pixels"]
        self.summary = {
            g: {"n": len(rs), **{k: _mean([r[k] for r in rs]) for k in keys}} for g, rs in self.groups().items()
        }
        with open(os.path.join(self.output_dir, self.summary_filename), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["group", "n", *keys])
            for g, s in self.summary.items():
                w.writerow([g, s["n"], *[f"{s[k]:.4f}" for k in keys]])
        if engine is not None:
            for g, s in self.summary.items():
                for k in ("dice", "attention_dice"):
                    engine.state.metrics[f"{g}_{k}"] = s[k]

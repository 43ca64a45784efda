"""Figures of the report, written as PNG files with matplotlib (Agg backend, no screen needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

__all__ = ["read_array", "learning_curves", "ct_outlines", "xray_panels", "roc_curve_png"]

REF_COLOUR, PRED_COLOUR = "#22c55e", "#ef4444"


def read_array(path: str | Path) -> np.ndarray:
    """Image file -> numpy array as SimpleITK reads it: (z, y, x) for 3D, (H, W) for 2D."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _save(fig, png: Path) -> Path:
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return png


def learning_curves(event_dir: str | Path, png: Path, title: str = "") -> Path | None:
    """Plot every scalar in the TensorBoard event files under ``event_dir``: losses left, metrics right.

    Returns:
        ``png``, or None when no scalar was found.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, tuple[list[int], list[float]]] = {}
    for f in sorted(Path(event_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            steps, values = series.setdefault(tag, ([], []))
            for ev in acc.Scalars(tag):
                steps.append(ev.step)
                values.append(ev.value)
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for tag, (steps, values) in sorted(series.items()):
        order = np.argsort(steps, kind="stable")
        ax = axes[0] if "loss" in tag.lower() else axes[1]
        ax.plot(np.asarray(steps)[order], np.asarray(values)[order], marker="." if len(steps) < 40 else None, label=tag)
    axes[0].set_title("training loss")
    axes[0].set_xlabel("iteration or epoch")
    axes[1].set_title("validation")
    axes[1].set_xlabel("epoch")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, png)


def _outline(ax, mask: np.ndarray, colour: str) -> None:
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)


def ct_outlines(image: str | Path, pred: str | Path | None, ref: str | Path | None, png: Path, title: str = "",
                window: tuple[float, float] = (-1000.0, 400.0)) -> Path:  # fmt: skip
    """An axial and a coronal CT slice with the reference (green) and predicted (red) outlines.

    The slices go through the reference's (else the prediction's) largest cross-section. ``pred`` and
    ``ref`` must be on the image's grid (the bundles save predictions in the input's geometry).
    """
    ct = read_array(image).astype(np.float32)
    p = read_array(pred) > 0 if pred else None
    r = read_array(ref) > 0 if ref else None
    for name, m in (("prediction", p), ("reference", r)):
        if m is not None and m.shape != ct.shape:
            raise ValueError(
                f"{name} {pred if name == 'prediction' else ref} has shape {m.shape}, image {image} has {ct.shape}"
            )
    focus = r if r is not None and r.any() else p
    if focus is not None and focus.any():
        z = int(np.argmax(focus.sum(axis=(1, 2))))
        y = int(np.argmax(focus.sum(axis=(0, 2))))
    else:
        z, y = ct.shape[0] // 2, ct.shape[1] // 2
    spacing = sitk.ReadImage(str(image)).GetSpacing()  # (x, y, z)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    views = [
        (
            ct[z],
            p[z] if p is not None else None,
            r[z] if r is not None else None,
            f"axial slice {z}",
            spacing[1] / spacing[0],
        ),
        (
            ct[::-1, y],
            p[::-1, y] if p is not None else None,
            r[::-1, y] if r is not None else None,
            f"coronal row {y}",
            spacing[2] / spacing[0],
        ),
    ]
    for ax, (img, pm, rm, name, aspect) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect)
        _outline(ax, rm, REF_COLOUR)
        _outline(ax, pm, PRED_COLOUR)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle((title + "  " if title else "") + "(green: reference, red: prediction)", fontsize=10)
    return _save(fig, png)


def xray_panels(xray: str | Path, drr: str | Path, attention: str | Path | None, pred: str | Path | None,
                ref: str | Path | None, png: Path, title: str = "") -> Path:  # fmt: skip
    """X-ray with reference/prediction outlines, the DRR, and the attention map over the X-ray."""
    x = read_array(xray).astype(np.float32)
    d = read_array(drr).astype(np.float32)
    p = read_array(pred) > 0 if pred else None
    r = read_array(ref) > 0 if ref else None
    a = read_array(attention).astype(np.float32) if attention else None
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    axes[0].imshow(x, cmap="gray")
    _outline(axes[0], r, REF_COLOUR)
    _outline(axes[0], p, PRED_COLOUR)
    axes[0].set_title("X-ray-like image: reference (green), prediction (red)", fontsize=8)
    axes[1].imshow(d, cmap="gray")
    _outline(axes[1], r, REF_COLOUR)
    axes[1].set_title("DRR of the CT (nodule projection in green)", fontsize=8)
    axes[2].imshow(x, cmap="gray")
    if a is not None:
        if a.shape != x.shape:  # attention saved at a coarser scale: stretch it over the image
            from scipy.ndimage import zoom

            a = zoom(a, (x.shape[0] / a.shape[0], x.shape[1] / a.shape[1]), order=1)
        axes[2].imshow(a, cmap="magma", alpha=0.5, vmin=0, vmax=max(float(a.max()), 1e-6))
    _outline(axes[2], r, REF_COLOUR)
    axes[2].set_title("attention map from the DRR path", fontsize=8)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, png)


def roc_curve_png(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], png: Path, title: str = "") -> Path:
    """ROC curves of ``(name, y_true, y_score)`` triples, with their AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for name, y, s in curves:
        y, s = np.asarray(y).astype(int), np.asarray(s, dtype=float)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f}, n={len(y)})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "ROC", fontsize=10)
    return _save(fig, png)

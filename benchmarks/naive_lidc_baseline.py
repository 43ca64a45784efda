"""The naive way to prepare one LIDC scan, as older lung repositories do it; the benchmark's baseline.

Per-slice pydicom reads sorted by z, ``scipy.ndimage.zoom`` (order 1 for HU, order 0 for masks),
pylidc consensus masks pasted into a full native volume, a scipy-only lung mask (threshold,
3D labelling, 3D closing, hole filling) and nibabel writes. Not used by the project.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from scipy import ndimage


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2


def naive_lung_mask(hu: np.ndarray) -> np.ndarray:
    air = hu < -320
    lab, n = ndimage.label(air)
    border = np.unique(
        np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()])
    )
    sizes = ndimage.sum(air, lab, range(n + 1))
    sizes[border] = 0
    sizes[0] = 0
    keep = np.argsort(sizes)[-2:]
    mask = np.isin(lab, keep[sizes[keep] > 0])
    mask = ndimage.binary_closing(mask, structure=_ball(5))
    for z in range(mask.shape[0]):
        mask[z] = ndimage.binary_fill_holes(mask[z])
    return mask.astype(np.uint8)


def prepare_naive(files: list[str], scan, pl, out: Path, spacing: float = 1.0) -> tuple[int, ...]:
    """Prepare one scan the naive way; returns the output shape (z, y, x)."""
    slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices]).astype(
        np.float32
    )
    hu = np.clip(hu, -1024, 3071)
    z = np.array([float(d.ImagePositionPatient[2]) for d in slices])
    ps = float(slices[0].PixelSpacing[0])
    factors = (float(np.median(np.diff(z))) / spacing, ps / spacing, ps / spacing)
    image = ndimage.zoom(hu, factors, order=1).astype(np.int16)
    labels = np.zeros(hu.shape, dtype=np.uint8)  # (z, row, col)
    db_z = np.asarray(scan.slice_zvals)
    for k, cluster in enumerate(scan.cluster_annotations(), start=1):
        cmask, cbbox = pl.utils.consensus(cluster, clevel=0.5, ret_masks=False)
        for kk in range(cmask.shape[2]):
            zk = db_z[cbbox[2].start + kk]
            idx = int(np.argmin(np.abs(z - zk)))
            if abs(z[idx] - zk) < 0.1:
                labels[idx, cbbox[0], cbbox[1]][cmask[:, :, kk]] = k
    labels = ndimage.zoom(labels, factors, order=0)
    lungs = naive_lung_mask(image)
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    for name, arr in (("image", image), ("label", labels), ("lung", lungs)):
        nib.save(nib.Nifti1Image(np.transpose(arr, (2, 1, 0)), affine), str(out / f"{name}.nii.gz"))
    return image.shape

"""One case in arrays: the DRR, the X-ray-like stand-in and the projected masks of every pose.

:func:`render_case_arrays` renders what the ``drr`` step (:mod:`data_prep.steps.drr`) writes, from
the HU volume, its nodule labels and lung mask, with the step's settings :class:`DrrParams`; the
projector and the attenuation curves are in :mod:`data_prep.ops.drr_projector`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from data_prep.ops.drr_projector import (
    CT_CURVE,
    DrrGeometry,
    XrayStyle,
    hu_channels,
    line_integral,
    make_poses,
    project_volume,
    scale_unit,
    slab_bounds,
    xray_like,
)

__all__ = ["DrrParams", "DRR_REGIONS", "render_case_arrays"]

DRR_REGIONS = ("body", "lungs")


@dataclass(frozen=True)
class DrrParams:
    """Settings of the ``drr`` step (all of them change outputs and go into the manifest).

    Args:
        geometry: detector and distances. Default :class:`DrrGeometry` ().
        poses: poses per case, the first the plain PA. Default 3.
        seed: seed of the pose and noise draws (per case and pose). Default 0.
        max_rotation_deg: largest rotation of poses >= 1 about each axis. Default 5.
        max_shift_mm: largest shift of poses >= 1 across the beam (x and z). Default 15.
        max_depth_mm: largest shift along the beam (magnification change). Default 50.
        ray_step_mm: coronal planes are averaged in groups about this thick along the beam (the
            samples per ray). Default 4 (on a 2 mm scan, 0.05 % mean difference from a
            1500-samples-per-ray nanodrr rendering; see benchmarks/bench_drr.py).
        mask_min_mm: a label pixel is 1 where its ray runs at least this far through the mask.
            Default 1.
        xray: the X-ray-like stand-in's style. Default :class:`XrayStyle` ().
        drr_region: ``"body"`` (default): the DRR integrates every voxel, like a radiograph.
            ``"lungs"``: a lung-field DRR: only the voxels of the lung field count, so ribs,
            spine, heart and diaphragm vanish and what is left is parenchyma, vessels and what
            sits in the lung. The lung field is segmented again from the CT's HU by
            :func:`data_prep.ops.lung_mask.lung_mask` (not read from the prepared ``labels/lungs``,
            which holds the nodule labels too: a DRR made with it would trace the annotation);
            the isocentre is then the centre of that field, so nothing rendered depends on the
            labels. The X-ray-like stand-in always integrates the whole body.
        drr_slabs: also render the DRR's region in this many slabs of equal depth along the beam
            (anterior to posterior thirds for 3), each scaled like the DRR, so that the slabs add
            up to it (up to its clipping at 1). A nodule then overlaps only the vessels of its own
            slab. Default 0 (none).
    """

    geometry: DrrGeometry = field(default_factory=DrrGeometry)
    poses: int = 3
    seed: int = 0
    max_rotation_deg: float = 5.0
    max_shift_mm: float = 15.0
    max_depth_mm: float = 50.0
    ray_step_mm: float = 4.0
    mask_min_mm: float = 1.0
    xray: XrayStyle = field(default_factory=XrayStyle)
    drr_region: str = "body"
    drr_slabs: int = 0

    def __post_init__(self):
        if self.drr_region not in DRR_REGIONS:
            raise ValueError(f"drr_region must be one of {', '.join(DRR_REGIONS)}, got {self.drr_region!r}")
        if self.poses < 1:
            raise ValueError(f"poses must be at least 1, got {self.poses}")
        if not 0 <= self.drr_slabs <= 8:
            raise ValueError(f"drr_slabs must be 0 (none) to 8, got {self.drr_slabs}")
        if self.ray_step_mm <= 0 or self.mask_min_mm <= 0:
            raise ValueError("ray_step_mm and mask_min_mm must be positive")

    def manifest(self) -> dict:
        return asdict(self)


def render_case_arrays(
    hu: np.ndarray, nodules: np.ndarray, lungs: np.ndarray, spacing: Sequence[float], params: DrrParams = DrrParams(),
    *, key: str = "case", lung_field: np.ndarray | None = None,
) -> list[dict]:  # fmt: skip
    """All poses of one case: DRR, X-ray-like image, projected masks and per-nodule statistics.

    Args:
        hu: HU ``(Z, Y, X)``.
        nodules: nodule labels ``(Z, Y, X)`` (0 background, k = nodule k).
        lungs: lung mask ``(Z, Y, X)``.
        spacing: (z, y, x) mm.
        params: step settings. Default :class:`DrrParams` ().
        key: case id (seeds the poses and the noise).
        lung_field: with ``params.drr_region == "lungs"``, the voxels the DRR integrates
            ``(Z, Y, X)``. Default None: :func:`data_prep.ops.lung_mask.lung_mask` of ``hu``.

    Returns:
        One dict per pose: ``pose`` (:class:`Pose`), ``drr``, ``xray`` (float32 (H, W) in [0, 1]),
        ``drr_slabs`` (``params.drr_slabs`` float32 (H, W) in [0, 1], anterior first),
        ``nodules``, ``lungs`` (uint8 (H, W) 0/1), ``nodule_stats`` (per label k present in the
        CT mask: ``projected_area_px``, ``centroid_row``, ``centroid_col``), ``drr_scale``.
    """
    if hu.ndim != 3 or hu.shape != nodules.shape or hu.shape != lungs.shape:
        raise ValueError(
            f"image, nodule and lung arrays must be 3D of one shape, got {hu.shape}, {nodules.shape}, {lungs.shape}"
        )
    spacing = np.asarray(spacing, float)
    channels = hu_channels(hu)
    vol = [channels, (lungs > 0).astype(np.float32)[None]]
    framing = lungs
    if params.drr_region == "lungs":  # two more channels: the HU channels inside the lung field
        if lung_field is None:
            from data_prep.ops.lung_mask import lung_mask

            lung_field = lung_mask(hu, tuple(spacing))
        if lung_field.shape != hu.shape:
            raise ValueError(f"lung_field {lung_field.shape} does not match the image {hu.shape}")
        if not lung_field.any():
            raise ValueError(
                "drr_region 'lungs': no lung field found in the CT (lung_mask is empty), the DRR would be blank"
            )
        vol.append(channels * (lung_field > 0)[None])
        framing = lung_field  # nothing of the rendering depends on the labels
    lung_idx = np.argwhere(framing > 0)
    if len(lung_idx):  # isocentre: centre of the lung field's bounding box, (x, y, z) index
        iso = ((lung_idx.min(0) + lung_idx.max(0)) / 2.0)[::-1]
    else:
        iso = (np.array(hu.shape[::-1]) - 1) / 2.0
    region = vol[-1] if params.drr_region == "lungs" else channels  # the HU channels the DRR integrates
    first_slab = sum(v.shape[0] for v in vol)
    for a, b in slab_bounds(framing, params.drr_slabs):  # coronal slabs of the framing field's depth (y)
        part = np.zeros_like(region)
        part[:, :, a:b, :] = region[:, :, a:b, :]
        vol.append(part)
    vol = np.concatenate(vol)
    labels = [int(k) for k in np.unique(nodules) if k > 0]
    # the nodules are projected from a crop around them (same isocentre, same pose)
    crop = None
    if labels:
        idx = np.argwhere(nodules > 0)
        lo = np.maximum(idx.min(0) - 2, 0)
        hi = np.minimum(idx.max(0) + 3, nodules.shape)
        sub = nodules[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        crop = (np.stack([(sub == k).astype(np.float32) for k in labels]), iso - lo[::-1])
    g = params.geometry
    poses = make_poses(params.poses, key, seed=params.seed, max_rotation_deg=params.max_rotation_deg,
                       max_shift_mm=params.max_shift_mm, max_depth_mm=params.max_depth_mm)  # fmt: skip
    results = []
    for k, pose in enumerate(poses):
        proj = project_volume(vol, spacing, g, pose, iso_index=iso, ray_step_mm=params.ray_step_mm)
        drr, scale = scale_unit(line_integral(proj[3:5] if params.drr_region == "lungs" else proj[:2], CT_CURVE))
        slabs = [
            np.clip(
                line_integral(proj[first_slab + 2 * j : first_slab + 2 * j + 2], CT_CURVE) / scale, 0.0, 1.0
            ).astype(np.float32)
            for j in range(params.drr_slabs)
        ]
        rng = np.random.default_rng([int(params.seed), zlib.crc32(key.encode()), k])
        xray = xray_like(proj[:2], params.xray, rng)
        lung2d = (proj[2] >= params.mask_min_mm).astype(np.uint8)
        nod2d = np.zeros((g.size, g.size), dtype=np.uint8)
        stats = {}
        if crop is not None:
            nproj = project_volume(crop[0], spacing, g, pose, iso_index=crop[1], ray_step_mm=None)
            for lab, p in zip(labels, nproj):
                m = p >= params.mask_min_mm
                nod2d |= m.astype(np.uint8)
                rr, cc = np.nonzero(m)
                stats[lab] = {
                    "projected_area_px": int(m.sum()),
                    "centroid_row": round(float(rr.mean()), 2) if len(rr) else "",
                    "centroid_col": round(float(cc.mean()), 2) if len(cc) else "",
                }
        results.append({"pose": pose, "drr": drr, "xray": xray, "nodules": nod2d, "lungs": lung2d,
                        "nodule_stats": stats, "drr_scale": scale, "drr_slabs": slabs})  # fmt: skip
    return results

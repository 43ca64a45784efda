"""The ``drr`` step: prepared CT volumes -> chest-radiograph-like 2D images with projected masks.

For every case of a prepared folder (``lidc`` or ``luna16`` step output) and every pose ``k``
(``k = 0`` the plain PA pose, ``k >= 1`` small seeded rotations, shifts and depth changes), one
sample ``<case_id>_p<k>`` is rendered in a cone-beam chest-radiograph geometry and written:

``images/drr/<sample>.nii.gz`` (the DRR: line integral of the linear attenuation coefficient
mu(HU) at a CT-like effective energy, scaled to [0, 1], higher = more attenuation; with
``drr_region="lungs"`` only the voxels of the CT's lung field count, see :class:`DrrParams`),
``images/xray/<sample>.nii.gz`` (an "X-ray-like" rendering of the same CT in the same pose: a
lower-energy attenuation curve with more bone contrast, detector blur, quantum and read noise and a
contrast curve; it is a rendering of the CT, NOT a radiograph), ``labels/nodules/<sample>.nii.gz``
and ``labels/lungs/<sample>.nii.gz`` (uint8 0/1: the pixels whose ray crosses at least
``mask_min_mm`` of the CT mask), then ``nodules.csv``, ``datalist.json`` and ``manifest.json``.

Geometry (PA): the X-ray source is behind the patient (+y, posterior, LPS), the detector in front
of the chest at ``odd`` mm from the isocentre (the centre of the lung field, or of the volume when
the lung mask is empty), ``sdd`` mm from the source. Image rows run from head (row 0) to feet,
columns from the patient's right to left (a PA film in the standard viewing orientation).

The projector samples every ray where it crosses each (optionally binned) coronal plane of the
volume, bilinearly within the plane (Joseph's method along the beam axis), for any pose, with no
resampling of the volume; all channels (two HU channels that make any bilinear HU -> mu curve
linear, and the masks) go through one ``grid_sample`` per group of planes. Core functions work on
numpy arrays ``(C, Z, Y, X)`` with (z, y, x) spacing; SimpleITK is only used at the file edges.
"""

from __future__ import annotations

import csv
import json
import math
import time
import traceback
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # torch is the drr extra, not a core dependency
    raise ImportError("the drr step needs torch: pip install -c constraints.txt -e '.[drr]'") from exc

from data_prep.io.writers import OutputError, package_versions, prepare_out_dir, write_csv, write_image, write_json

from data_prep.run.manifest import Manifest
from data_prep.run.cases import run_cases

__all__ = [
    "DrrGeometry", "Pose", "AttenuationCurve", "XrayStyle", "DrrParams", "CT_CURVE", "XRAY_CURVE",
    "make_poses", "rotation_matrix", "slab_bounds", "hu_channels", "project_volume", "line_integral", "scale_unit",
    "xray_like", "render_case_arrays", "prepare_drr", "render_case", "PreparedFolderError",
    "SUBDIRS", "NODULE_COLUMNS", "DRR_REGIONS",
]  # fmt: skip

SUBDIRS = ("images/drr", "images/xray", "labels/nodules", "labels/lungs")
DRR_REGIONS = ("body", "lungs")
NODULE_COLUMNS = ["sample", "case_id", "pose", "label", "diameter_mm", "projected_area_px", "centroid_row", "centroid_col"]


class PreparedFolderError(FileNotFoundError):
    """The --prepared folder is not a data_prep output (no datalist.json, no images, bad entries)."""


@dataclass(frozen=True)
class DrrGeometry:
    """Cone-beam chest-radiograph geometry (PA).

    Args:
        sdd: source-to-detector distance, mm. Default 1800 (the usual chest-stand distance).
        odd: isocentre (patient centre) to detector distance, mm. Default 180, so the
            magnification at the isocentre is ``sdd / (sdd - odd)`` = 1.11.
        size: detector pixels per side (square image). Default 512.
        detector_mm: detector width and height, mm. Default 430 (a 43 x 43 cm flat panel), so the
            pixel size is ``detector_mm / size`` = 0.84 mm at 512.
    """

    sdd: float = 1800.0
    odd: float = 180.0
    size: int = 512
    detector_mm: float = 430.0

    def __post_init__(self):
        if not (self.sdd > 0 and 0 < self.odd < self.sdd and self.size >= 8 and self.detector_mm > 0):
            raise ValueError(f"bad geometry {self}: need sdd > odd > 0, size >= 8, detector_mm > 0")

    @property
    def pixel_mm(self) -> float:
        """Detector pixel size, mm."""
        return self.detector_mm / self.size

    @property
    def magnification(self) -> float:
        """Magnification of the isocentre plane."""
        return self.sdd / (self.sdd - self.odd)


@dataclass(frozen=True)
class Pose:
    """A patient pose relative to the PA beam (rotations about the isocentre, then a shift).

    Args:
        rotation_deg: rotations about the LPS x (left-right: tilt of the head toward or away from
            the detector), y (antero-posterior: in-plane roll) and z (head-feet: axial turn) axes,
            degrees, applied in that order. Default no rotation.
        translation_mm: shift of the patient in LPS mm; +y moves the patient toward the source
            (more magnification). Default none.
    """

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class AttenuationCurve:
    """HU -> linear attenuation coefficient, bilinear (air-water below 0 HU, water-bone above).

    ``mu = mu_water * (1 + HU / 1000)`` for -1000 <= HU <= 0 and
    ``mu = mu_water + (mu_bone - mu_water) * HU / hu_bone`` above.

    Args:
        mu_water: mu of water, 1/mm.
        mu_bone: mu at ``hu_bone``, 1/mm.
        hu_bone: HU of cortical bone. Default 1000.
    """

    mu_water: float
    mu_bone: float
    hu_bone: float = 1000.0

    def weights(self) -> tuple[float, float]:
        """Coefficients of the two HU channels of :func:`hu_channels` (see there)."""
        return self.mu_water, (self.mu_bone - self.mu_water) * 1000.0 / self.hu_bone


#: CT-like effective energy (~70 keV; NIST XCOM water 0.0192/mm, cortical bone 1.92 g/cm3 0.0573/mm)
CT_CURVE = AttenuationCurve(mu_water=0.0192, mu_bone=0.0573)
#: lower effective energy of a chest radiograph (~50 keV: water 0.0227/mm, cortical bone 0.0814/mm)
XRAY_CURVE = AttenuationCurve(mu_water=0.0227, mu_bone=0.0814)


@dataclass(frozen=True)
class XrayStyle:
    """How the "X-ray-like" stand-in is made from the same projection.

    Args:
        curve: attenuation curve (more bone contrast than the DRR's). Default :data:`XRAY_CURVE`.
        bone_gain: extra factor on the above-water part of the curve (bone boost). Default 1.5.
        blur_sigma_px: Gaussian detector blur, pixels. Default 1.0.
        photons: unattenuated quanta per pixel (Poisson noise on the transmitted intensity).
            Default 50000.
        read_noise: Gaussian noise added after scaling (fraction of the range). Default 0.005.
        gamma: contrast curve exponent applied to the scaled image. Default 1.4.
    """

    curve: AttenuationCurve = XRAY_CURVE
    bone_gain: float = 1.5
    blur_sigma_px: float = 1.0
    photons: float = 50000.0
    read_noise: float = 0.005
    gamma: float = 1.4


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


# ----------------------------------------------------------------------------------------------
# geometry and projection (pure functions on arrays)


def rotation_matrix(rotation_deg: Sequence[float]) -> np.ndarray:
    """3 x 3 rotation (LPS x, y, z) of rotations about x, then y, then z, degrees."""
    ax, ay, az = (math.radians(float(a)) for a in rotation_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_poses(n: int, key: str, *, seed: int = 0, max_rotation_deg: float = 5.0, max_shift_mm: float = 15.0,
               max_depth_mm: float = 50.0) -> list[Pose]:  # fmt: skip
    """``n`` poses for the case ``key``: pose 0 is the plain PA, the others uniform draws.

    Args:
        n: number of poses.
        key: case id (the draws depend on it and on ``seed`` only, so reruns agree).
        seed: seed. Default 0.
        max_rotation_deg: rotation bound about each axis. Default 5.
        max_shift_mm: shift bound across the beam (x, z). Default 15.
        max_depth_mm: shift bound along the beam (y). Default 50.
    """
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
    poses = [Pose()]
    for _ in range(1, n):
        rot = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
        shift = rng.uniform(-1, 1, 3) * np.array([max_shift_mm, max_depth_mm, max_shift_mm])
        poses.append(Pose(tuple(round(float(a), 3) for a in rot), tuple(round(float(s), 2) for s in shift)))
    return poses


def hu_channels(hu: np.ndarray) -> np.ndarray:
    """The two channels that make every :class:`AttenuationCurve` linear: ``(A, B)``.

    ``A = 1 + min(HU, 0) / 1000`` (clipped to [0, 1]: 0 for air, 1 for water and above) and
    ``B = max(HU, 0) / 1000``, so ``mu = w_a * A + w_b * B`` with ``(w_a, w_b) = curve.weights()``
    and one projection serves the DRR and the X-ray-like curves.

    Args:
        hu: HU array, any shape.

    Returns:
        float32 array of shape ``(2, *hu.shape)``.
    """
    h = np.asarray(hu, dtype=np.float32)
    out = np.empty((2,) + h.shape, dtype=np.float32)
    np.clip(h, -1000.0, 0.0, out=out[0])
    out[0] /= 1000.0
    out[0] += 1.0
    np.maximum(h, 0.0, out=out[1])
    out[1] /= 1000.0
    return out


def project_volume(
    volume: np.ndarray | torch.Tensor, spacing: Sequence[float], geometry: DrrGeometry = DrrGeometry(), pose: Pose = Pose(),
    *, iso_index: Sequence[float] | None = None, ray_step_mm: float | None = None, plane_chunk: int = 8,
) -> np.ndarray:  # fmt: skip
    """Cone-beam line integrals of every channel of a volume onto the PA detector.

    Each ray is sampled where it crosses each coronal plane (y = const) of the volume, bilinearly
    within the plane, and weighted by the plane spacing times its secant against the y axis (the
    Joseph projector along y; rays stay within a few degrees of it here). Samples beyond the
    detector plane are left out.

    Args:
        volume: ``(C, Z, Y, X)`` channels on an LPS grid with identity direction (z, y, x order).
        spacing: (z, y, x) voxel spacing, mm.
        geometry: detector and distances. Default :class:`DrrGeometry` ().
        pose: patient pose. Default the plain PA.
        iso_index: continuous (x, y, z) voxel index of the isocentre. Default the volume centre.
        ray_step_mm: average the coronal planes in groups of about this thickness (fewer samples
            per ray). Default None (every plane).
        plane_chunk: planes sampled at once (memory ~ ``plane_chunk * (C + 2) * size^2 * 4`` bytes).
            Default 8.

    Returns:
        float32 ``(C, H, W)`` with ``H = W = geometry.size``: the integral of each channel along
        each ray (channel units x mm); row 0 = head, column 0 = patient's right.
    """
    vol = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)
    if vol.ndim != 4:
        raise ValueError(f"volume must be (C, Z, Y, X), got shape {tuple(vol.shape)}")
    c, nz, ny, nx = vol.shape
    sp_xyz = np.asarray(spacing, dtype=float)[::-1].copy()
    iso = np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2]) if iso_index is None else np.asarray(iso_index, float)
    origin = -iso * sp_xyz  # p mm (patient frame, isocentre at 0) of voxel (0, 0, 0)
    k = max(1, int(round(ray_step_mm / sp_xyz[1]))) if ray_step_mm else 1
    if k > 1:  # average groups of k planes; the group sits at their mean position
        pad = (-ny) % k
        v = F.pad(vol, (0, 0, 0, pad)) if pad else vol
        vol = v.reshape(c, nz, (ny + pad) // k, k, nx).sum(3) / k
        origin[1] += (k - 1) * sp_xyz[1] / 2
        sp_xyz[1] *= k
        ny = vol.shape[2]
    g, size = geometry, geometry.size
    # camera in the detector-aligned frame q (= R p + t): source (0, +src_y, 0), detector y = -odd,
    # columns -> +x (patient's left), rows -> -z (feet)
    src_y = g.sdd - g.odd
    centres = (np.arange(size) + 0.5 - size / 2) * g.pixel_mm
    pix_q = np.stack(np.broadcast_arrays(centres[None, :], -g.odd, -centres[:, None]), -1)  # (H, W, 3)
    rot = rotation_matrix(pose.rotation_deg)
    shift = np.asarray(pose.translation_mm, dtype=float)
    src = rot.T @ (np.array([0.0, src_y, 0.0]) - shift)  # in p
    pix = (pix_q - shift) @ rot  # rot.T applied to each row vector
    ray = pix - src
    if np.any(ray[..., 1] >= -1e-6):
        raise ValueError(f"pose {pose} turns rays away from the beam axis; use smaller rotations")
    # per pixel: x, z in voxel units at plane y = y_j are  a + (y_j - src_y) * b
    inv_dy = 1.0 / ray[..., 1]
    bx, bz = ray[..., 0] * inv_dy / sp_xyz[0], ray[..., 2] * inv_dy / sp_xyz[2]
    ax, az = (src[0] - origin[0]) / sp_xyz[0], (src[2] - origin[2]) / sp_xyz[2]
    # the pixels whose rays can meet the volume: the box corners projected onto the detector
    box = np.array([[i, j, l] for i in (-0.5, nx - 0.5) for j in (-0.5, ny - 0.5) for l in (-0.5, nz - 0.5)]) * sp_xyz + origin
    cq = box @ rot.T + shift  # corners in q
    m = g.sdd / (src_y - cq[:, 1])
    if np.any(cq[:, 1] >= src_y):
        m = np.full(8, np.inf)
    cols = np.clip(np.floor(np.array([(cq[:, 0] * m).min(), (cq[:, 0] * m).max()]) / g.pixel_mm + size / 2 - 0.5), 0, size - 1)
    rows = np.clip(np.floor(np.array([(-cq[:, 2] * m).min(), (-cq[:, 2] * m).max()]) / g.pixel_mm + size / 2 - 0.5), 0, size - 1)
    r0, r1, c0, c1 = int(rows[0]), int(rows[1]) + 2, int(cols[0]), int(cols[1]) + 2
    out = torch.zeros((c, size, size), dtype=torch.float32)
    y_planes = origin[1] + np.arange(ny) * sp_xyz[1]
    js = np.nonzero(y_planes < src[1])[0]
    if len(js) and r1 > r0 and c1 > c0:
        sub = (slice(r0, r1), slice(c0, c1))
        t_slope = torch.as_tensor(inv_dy[sub], dtype=torch.float32)  # ray parameter per mm of (y_j - src_y)
        coef = [torch.as_tensor(v, dtype=torch.float32) for v in (ax, bx[sub], az, bz[sub])]
        out[:, r0:r1, c0:c1] = _sample_planes(vol, js, y_planes - src[1], coef, t_slope, plane_chunk)
    # path length per plane: the plane spacing times |ray| / |ray_y|
    weight = sp_xyz[1] * np.linalg.norm(ray, axis=-1) * np.abs(inv_dy)
    return (out * torch.as_tensor(weight, dtype=torch.float32)).numpy()


def _sample_planes(vol: torch.Tensor, js: np.ndarray, dy: np.ndarray, coef: list, t_slope: torch.Tensor, plane_chunk: int) -> torch.Tensor:
    """Sum over planes ``js`` of the plane sampled (bilinear, zero outside) where each ray crosses it.

    ``dy[j]`` is the plane's y minus the source's; a ray crosses plane j at voxel x index
    ``ax + dy[j] * bx`` and z index ``az + dy[j] * bz`` (per pixel), at ray parameter
    ``dy[j] * t_slope`` (> 1 means beyond the detector: not sampled). Returns (C, rows, cols).
    """
    c, nz, _, nx = vol.shape
    ax, bx, az, bz = coef
    planes = vol.permute(2, 0, 1, 3)  # (Y, C, Z, X) view
    # normalized grid_sample coordinates (align_corners=False): g = (2 * i + 1) / n - 1
    gx0, gx1 = (2 * ax + 1) / nx - 1, 2 * bx / nx
    gz0, gz1 = (2 * az + 1) / nz - 1, 2 * bz / nz
    n_rows, n_cols = bx.shape
    acc = torch.zeros((c, n_rows, n_cols), dtype=torch.float32)
    buffer = torch.empty((plane_chunk, n_rows, n_cols, 2), dtype=torch.float32)  # reused: no page faults
    for a in range(0, len(js), plane_chunk):
        sel = js[a : a + plane_chunk]
        d = torch.as_tensor(dy[sel], dtype=torch.float32)[:, None, None]
        grid = buffer[: len(sel)]
        torch.add(gx0, gx1[None] * d, out=grid[..., 0])
        torch.add(gz0, gz1[None] * d, out=grid[..., 1])
        if float(dy[sel].min()) * float(t_slope.min()) > 1.0:  # the largest ray parameter of the chunk
            beyond = (d * t_slope[None]) > 1.0  # behind the detector plane
            grid[..., 0].masked_fill_(beyond, 3.0)
        batch = planes[torch.as_tensor(sel, dtype=torch.long)]
        acc += F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False).sum(0)
    return acc


# ----------------------------------------------------------------------------------------------
# images from line integrals


def line_integral(channels: np.ndarray, curve: AttenuationCurve, bone_gain: float = 1.0) -> np.ndarray:
    """sum(mu) along each ray from the two projected HU channels of :func:`hu_channels`.

    Args:
        channels: ``(2, H, W)`` projected ``A`` and ``B`` (mm).
        curve: the attenuation curve.
        bone_gain: factor on the above-water part. Default 1.

    Returns:
        float32 ``(H, W)``, dimensionless (mu x mm).
    """
    wa, wb = curve.weights()
    return (wa * channels[0] + bone_gain * wb * channels[1]).astype(np.float32)


def scale_unit(image: np.ndarray, percentile: float = 99.5) -> tuple[np.ndarray, float]:
    """Scale to [0, 1] by dividing by a high percentile of the non-zero pixels (0 = no attenuation).

    Returns:
        The scaled float32 image and the divisor (1 when the image is all zero).
    """
    nz = image[image > 1e-6]
    top = float(np.percentile(nz, percentile)) if nz.size else 0.0
    top = top if top > 0 else 1.0
    return np.clip(image / top, 0.0, 1.0).astype(np.float32), top


def xray_like(channels: np.ndarray, style: XrayStyle = XrayStyle(), rng: np.random.Generator | None = None) -> np.ndarray:
    """The "X-ray-like" stand-in from the projected HU channels (a rendering of the CT, not a radiograph).

    Steps: line integral with ``style.curve`` and the bone boost; Gaussian detector blur of the
    transmitted intensity; Poisson quanta (``style.photons`` unattenuated per pixel); back to
    attenuation (-log), scaled to [0, 1]; Gaussian read noise; contrast curve ``x ** gamma``.

    Args:
        channels: ``(2, H, W)`` projected HU channels.
        style: how. Default :class:`XrayStyle` ().
        rng: noise generator. Default a fresh unseeded one.

    Returns:
        float32 ``(H, W)`` in [0, 1], higher = more attenuation.
    """
    from scipy.ndimage import gaussian_filter

    rng = rng if rng is not None else np.random.default_rng()
    att = line_integral(channels, style.curve, style.bone_gain).astype(np.float64)
    transmitted = np.exp(-att)
    if style.blur_sigma_px > 0:
        transmitted = gaussian_filter(transmitted, style.blur_sigma_px, mode="nearest")
    if style.photons > 0:
        counts = rng.poisson(transmitted * style.photons)
        transmitted = np.maximum(counts, 0.5) / style.photons
    img, _ = scale_unit(-np.log(np.minimum(transmitted, 1.0)))
    if style.read_noise > 0:
        img = img + rng.normal(0.0, style.read_noise, img.shape)
    return np.clip(np.clip(img, 0.0, 1.0) ** style.gamma, 0.0, 1.0).astype(np.float32)


def slab_bounds(field: np.ndarray, slabs: int) -> list[tuple[int, int]]:
    """``slabs`` consecutive (start, stop) ranges of equal depth along y (anterior -> posterior) that
    cover the y extent of ``field`` (Z, Y, X); the whole y axis when ``field`` is empty. [] for 0."""
    if slabs <= 0:
        return []
    ys = np.nonzero(field.any(axis=(0, 2)))[0]
    lo, hi = (int(ys.min()), int(ys.max()) + 1) if len(ys) else (0, field.shape[1])
    cuts = np.linspace(lo, hi, slabs + 1).round().astype(int)
    cuts[0], cuts[-1] = 0, field.shape[1]  # the first and last slab reach the volume's edges
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


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
        raise ValueError(f"image, nodule and lung arrays must be 3D of one shape, got {hu.shape}, {nodules.shape}, {lungs.shape}")
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
            raise ValueError("drr_region 'lungs': no lung field found in the CT (lung_mask is empty), the DRR would be blank")
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
            np.clip(line_integral(proj[first_slab + 2 * j : first_slab + 2 * j + 2], CT_CURVE) / scale, 0.0, 1.0).astype(np.float32)
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


# ----------------------------------------------------------------------------------------------
# the step: files in, files out


def _read(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared 3D volume as (array (Z, Y, X), spacing (z, y, x)); errors name the file."""
    if not path.exists():
        raise OutputError(f"{what} file {path} not found")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise OutputError(f"cannot read {what} file {path}: {str(exc).strip().splitlines()[-1]}") from exc
    if img.GetDimension() != 3:
        raise OutputError(f"{what} file {path} is {img.GetDimension()}D; the drr step needs the 3D volumes of a data_prep output")
    if not np.allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-3):
        raise OutputError(f"{what} file {path} is not in identity (LPS) direction as data_prep writes it")
    return sitk.GetArrayFromImage(img), np.array(img.GetSpacing()[::-1], dtype=float)


def _write_2d(array: np.ndarray, pixel_mm: float, path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((pixel_mm, pixel_mm))
    write_image(img, path)


def render_case(
    case_id: str, entry: dict, prepared: str, out: str, params: DrrParams, diameters: dict[int, float],
    export_dir: str | None = None, threads: int = 0,
) -> dict:  # fmt: skip
    """Render and write all poses of one case. Never raises: failures come back as ``status: failed``.

    Args:
        case_id: the prepared case id.
        entry: its prepared datalist entry (``image``, ``label``, ``lung``, ``fold``, ``patient_id``).
        prepared: the prepared folder.
        out: the output folder (sub-folders :data:`SUBDIRS` exist).
        params: step settings.
        diameters: ``diameter_mm`` per nodule label k of this case (from the prepared nodules.csv).
        export_dir: also write the seed prototype's PNG layout here. Default None.
        threads: torch threads (0 = leave as is).

    Returns:
        The case's manifest record (status, error, warnings, files, samples with nodule rows, seconds).
    """
    t0 = time.perf_counter()
    rec: dict = {"status": "failed", "error": None, "warnings": [], "patient_id": entry.get("patient_id"), "fold": entry.get("fold")}
    try:
        if threads:
            torch.set_num_threads(threads)
        root = Path(prepared)
        hu, spacing = _read(root / entry["image"], "image")
        nod, sp_n = _read(root / entry["label"], "nodule label")
        lung, sp_l = _read(root / entry["lung"], "lung label")
        if nod.shape != hu.shape or lung.shape != hu.shape or not (np.allclose(sp_n, spacing) and np.allclose(sp_l, spacing)):
            raise OutputError(
                f"{case_id}: image {hu.shape} at {tuple(spacing)} mm, nodule label {nod.shape}, lung label {lung.shape}: "
                "the three files must share one grid"
            )
        results = render_case_arrays(hu, nod, lung, spacing, params, key=case_id)
        files, samples = {}, []
        px = params.geometry.pixel_mm
        for k, res in enumerate(results):
            sample = f"{case_id}_p{k}"
            paths = {
                "label": f"labels/nodules/{sample}.nii.gz", "lung": f"labels/lungs/{sample}.nii.gz",
                "xray": f"images/xray/{sample}.nii.gz", "drr": f"images/drr/{sample}.nii.gz",
            }  # fmt: skip
            arrays = {"label": res["nodules"], "lung": res["lungs"], "xray": res["xray"]}
            for j, slab in enumerate(res["drr_slabs"]):
                paths[f"drr_slab{j}"] = f"images/drr_slab{j}/{sample}.nii.gz"
                arrays[f"drr_slab{j}"] = slab
            arrays["drr"] = res["drr"]  # the DRR last: it marks the sample finished
            for key, arr in arrays.items():
                _write_2d(arr, px, Path(out) / paths[key])
            if export_dir:
                seed_drr, seed_mask = Path(export_dir) / f"{sample}_drr.png", Path(export_dir) / f"{sample}_drr_mask.png"
                write_image(sitk.GetImageFromArray(np.round(res["drr"] * 255).astype(np.uint8)), seed_drr)
                write_image(sitk.GetImageFromArray(res["nodules"] * np.uint8(255)), seed_mask)
                paths.update(seed_drr=str(seed_drr.resolve()), seed_mask=str(seed_mask.resolve()))
            files.update({f"p{k}_{name}": p for name, p in paths.items()})
            rows = [
                {"sample": sample, "case_id": case_id, "pose": k, "label": lab, "diameter_mm": diameters.get(lab, ""), **st}
                for lab, st in sorted(res["nodule_stats"].items())
            ]
            visible = [float(diameters.get(r["label"]) or 0) for r in rows if r["projected_area_px"] > 0]
            samples.append({
                "sample": sample, "pose": k, "rotation_deg": list(res["pose"].rotation_deg),
                "translation_mm": list(res["pose"].translation_mm), "max_diameter_mm": max(visible, default=0.0),
                "drr_scale": round(res["drr_scale"], 4), "nodules": rows,
                **{n: paths[n] for n in ("xray", "drr", "label", "lung", *(f"drr_slab{j}" for j in range(len(res["drr_slabs"]))))},
            })  # fmt: skip
            hidden = [r["label"] for r in rows if r["projected_area_px"] == 0]
            if hidden:
                rec["warnings"].append(f"{sample}: nodule label(s) {hidden} project to no pixel (smaller than mask_min_mm or off the detector)")
            if not res["lungs"].any():
                rec["warnings"].append(f"{sample}: the projected lung field is empty")
        rec.update(status="ok", files=files, samples=samples, shape_zyx=list(hu.shape), spacing_zyx_mm=list(spacing))
    except OutputError as exc:
        rec["error"] = str(exc)
    except Exception as exc:  # unexpected: keep the traceback, go on with the other cases
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc(limit=6)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _load_prepared(prepared: Path) -> tuple[list[dict], dict, dict[tuple[str, int], float]]:
    """Datalist entries, the datalist itself and diameter per (case_id, label) of a prepared folder."""
    if not prepared.is_dir():
        raise PreparedFolderError(f"prepared folder {prepared} not found")
    dl_path = prepared / "datalist.json"
    if not dl_path.exists():
        raise PreparedFolderError(f"{dl_path} not found: is {prepared} the output of 'data_prep lidc' or 'data_prep luna16'?")
    if not (prepared / "images").is_dir():
        raise PreparedFolderError(f"{prepared}/images not found: the prepared folder holds no CT volumes")
    try:
        datalist = json.loads(dl_path.read_text())
        entries = list(datalist["training"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PreparedFolderError(f"{dl_path} is not a data_prep datalist (a JSON object with a 'training' list): {exc}") from exc
    for i, e in enumerate(entries):
        missing = [k for k in ("case_id", "patient_id", "image", "label", "lung") if not isinstance(e, dict) or k not in e]
        if missing:
            raise PreparedFolderError(f"{dl_path}: training entry {i} lacks {', '.join(missing)}")
    diameters: dict[tuple[str, int], float] = {}
    if (prepared / "nodules.csv").exists():
        with open(prepared / "nodules.csv", newline="") as f:
            for row in csv.DictReader(f):
                try:
                    lab = int(float(row.get("label") or 0))
                    if lab > 0:
                        diameters[(row["case_id"], lab)] = round(float(row["diameter_mm"]), 2)
                except (KeyError, ValueError):
                    continue
    return entries, datalist, diameters


def prepare_drr(
    prepared: str | Path, out: str | Path, params: DrrParams = DrrParams(), *, cases: Sequence[str] | None = None,
    workers: int = 1, progress: bool = True, export_dir: str | Path | None = None, scheduler: str | None = None,
) -> dict:  # fmt: skip
    """Run the ``drr`` step (``scheduler``: a Dask scheduler address to run the cases on, else local processes). See the module docstring for what is written.

    Args:
        prepared: a ``lidc`` or ``luna16`` output folder (images/, labels/, datalist.json).
        out: output folder (created; must differ from ``prepared``).
        params: step settings. Default :class:`DrrParams` ().
        cases: only these case ids. Default None (all of the datalist).
        workers: worker processes. Default 1.
        progress: show a progress bar. Default True.
        export_dir: also write ``<sample>_drr.png`` and ``<sample>_drr_mask.png`` (8-bit) here.

    Returns:
        The manifest as a dict (``summary`` counts ok and failed cases).

    Raises:
        PreparedFolderError: ``prepared`` is not a data_prep output folder, or a case id is unknown.
        OutputError: the output folder cannot be written or holds another run.
    """
    prepared, out = Path(prepared).absolute(), Path(out).absolute()  # absolute: Dask workers have their own cwd
    export_dir = Path(export_dir).absolute() if export_dir else None
    entries, src_datalist, diameters = _load_prepared(prepared)
    if out.resolve() == prepared.resolve():
        raise OutputError(f"--out {out} is the prepared folder itself; write the DRR set elsewhere")
    by_id = {e["case_id"]: e for e in entries}
    if cases:
        unknown = [c for c in cases if c not in by_id]
        if unknown:
            raise PreparedFolderError(f"case(s) {', '.join(unknown)} not in {prepared}/datalist.json")
        entries = [by_id[c] for c in cases]
    out = prepare_out_dir(out, SUBDIRS + tuple(f"images/drr_slab{j}" for j in range(params.drr_slabs)))
    if export_dir:
        prepare_out_dir(export_dir)
    manifest = Manifest(out / "manifest.json", "drr", params.manifest())
    manifest.data["inputs"] = {"prepared": str(prepared.resolve()), "cases": len(entries), "export_seed_layout": str(export_dir or "")}
    manifest.data["versions"] = package_versions(["lung-bundles-data-prep", "numpy", "scipy", "SimpleITK", "torch"])
    manifest.save()
    threads = max(1, torch.get_num_threads() // workers) if workers > 1 else 0
    todo = []
    for e in entries:
        cid = e["case_id"]
        done = manifest.finished(cid, out)
        if done and export_dir:  # also export finished cases that were rendered without it
            done = any(f.endswith("_drr.png") for f in manifest.data["cases"][cid]["files"].values())
        if not done:
            diam = {lab: d for (c, lab), d in diameters.items() if c == cid}
            todo.append((cid, (cid, e, str(prepared), str(out), params, diam, str(export_dir) if export_dir else None, threads)))
    run_cases(render_case, todo, manifest, workers=workers, progress=progress, desc="drr cases", scheduler=scheduler)
    _write_tables(out, manifest, src_datalist)
    return manifest.data


def _write_tables(out: Path, manifest: Manifest, src_datalist: dict) -> None:
    ok = {cid: rec for cid, rec in sorted(manifest.data["cases"].items()) if rec.get("status") == "ok"}
    rows = [row for rec in ok.values() for s in rec["samples"] for row in s["nodules"]]
    write_csv(rows, NODULE_COLUMNS, out / "nodules.csv")
    training = [
        {"xray": s["xray"], "drr": s["drr"], **{k: v for k, v in s.items() if k.startswith("drr_slab")}, "label": s["label"],
         "lung": s["lung"], "fold": rec.get("fold"), "case_id": cid, "patient_id": rec.get("patient_id"), "pose": s["pose"],
         "max_diameter_mm": s["max_diameter_mm"]}
        for cid, rec in ok.items() for s in rec["samples"]
    ]  # fmt: skip
    datalist = {
        "description": "DRR set by data_prep drr: drr = DRR of the CT, xray = X-ray-like rendering of the same CT "
        "(a stand-in, not a radiograph), drr_slab<k> (with --drr-slabs) = the DRR's region in depth slab k, anterior first, "
        "label = projected nodules, lung = projected lung field; folds from the prepared datalist",
        "n_folds": src_datalist.get("n_folds"),
        "fold_seed": src_datalist.get("fold_seed"),
        "numTraining": len(training),
        "training": training,
    }
    write_json(datalist, out / "datalist.json")
    manifest.save()

"""Cone-beam projection of CT volumes onto a chest-radiograph detector: geometry, poses, attenuation.

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

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DrrGeometry", "Pose", "AttenuationCurve", "XrayStyle", "CT_CURVE", "XRAY_CURVE", "make_poses", "rotation_matrix",
    "slab_bounds", "hu_channels", "project_volume", "line_integral", "scale_unit", "xray_like",
]  # fmt: skip


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
    volume: np.ndarray | torch.Tensor, spacing: Sequence[float], geometry: DrrGeometry = DrrGeometry(),
    pose: Pose = Pose(), *, iso_index: Sequence[float] | None = None, ray_step_mm: float | None = None,
    plane_chunk: int = 8,
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
    box = (
        np.array([[i, j, k] for i in (-0.5, nx - 0.5) for j in (-0.5, ny - 0.5) for k in (-0.5, nz - 0.5)]) * sp_xyz
        + origin
    )
    cq = box @ rot.T + shift  # corners in q
    m = g.sdd / (src_y - cq[:, 1])
    if np.any(cq[:, 1] >= src_y):
        m = np.full(8, np.inf)
    cols = np.clip(
        np.floor(np.array([(cq[:, 0] * m).min(), (cq[:, 0] * m).max()]) / g.pixel_mm + size / 2 - 0.5), 0, size - 1
    )
    rows = np.clip(
        np.floor(np.array([(-cq[:, 2] * m).min(), (-cq[:, 2] * m).max()]) / g.pixel_mm + size / 2 - 0.5), 0, size - 1
    )
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


def _sample_planes(
    vol: torch.Tensor, js: np.ndarray, dy: np.ndarray, coef: list, t_slope: torch.Tensor, plane_chunk: int
) -> torch.Tensor:
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


def xray_like(
    channels: np.ndarray, style: XrayStyle = XrayStyle(), rng: np.random.Generator | None = None
) -> np.ndarray:
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

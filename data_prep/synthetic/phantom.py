"""Render the synthetic chest CT phantom: HU slices plus lung, airway and nodule truth masks.

Pure numpy/scipy: geometry and nodule masks in, arrays out (no files, no pylidc). The shapes are in
:mod:`data_prep.synthetic.anatomy`, airways and vessels in :mod:`data_prep.synthetic.trees`, nodules
in :mod:`data_prep.synthetic.nodules`; :mod:`data_prep.synthetic.lidc_dicom` feeds in real LIDC-IDRI geometry
and nodule outlines and writes DICOM. Arrays are (z, y, x) = (slice, row, column); rows run
anterior -> posterior, columns patient right -> left, as in an axial DICOM image with orientation
[1, 0, 0, 0, 1, 0].

Speed: shapes are drawn slice by slice (in threads: numpy releases the GIL) with z-dependent
parameters and everything z-independent precomputed once; tubes are rasterized once as signed
distances in the bounding box of each segment; smooth textures are built on coarse grids and
upsampled per slice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data_prep.synthetic.anatomy import BODY_EXPONENT, CAVITY, MUSCLE_OUTER, RIB_OUTER, SPINE_V, ChestAnatomy, ellipse_q
from data_prep.synthetic.nodules import NoduleDraw, NoduleSpec, nodule_balls, paint_nodules, prepare_nodules
from data_prep.synthetic.trees import SD_SCALE, TubeField, airway_segments, rasterize_tubes, vessel_segments

__all__ = ["NoduleSpec", "render_phantom", "field_of_view", "HU", "HU_MIN", "HU_MAX"]

HU_MIN, HU_MAX = -1024, 3071
HU = {
    "air": -1000.0, "fat": -100.0, "mediastinal_fat": -90.0, "soft": 40.0, "muscle": 45.0,
    "liver": 55.0, "disc": 80.0, "csf": 15.0, "marrow": 280.0, "cortical": 850.0,
    "lung": -855.0, "table_shell": 250.0, "table_core": -850.0,
}  # fmt: skip
LUNG_TEXTURE = ((24, 12.0, 30.0), (96, 4.0, 15.0))  # (cells across the image, z step mm, HU) per level
LUNG_GRAVITY_HU = 40.0  # posterior (dependent) lung is denser
AIRWAY_WALL_MM = 1.2
# Trachea and main bronchi are extrapulmonary: a sheath of hilar/mediastinal soft tissue (vessels, nodes,
# connective tissue) of this thickness surrounds them, as in real chests, and is not lung field.
HILAR_SHEATH_MM = 6.0
RIB_PITCH_MM, RIB_HEIGHT_MM, RIB_SLOPE_MM_PER_RAD = 28.0, 10.0, 25.0
VERTEBRA_PITCH_MM, DISC_MM = 27.0, 6.0


# ---- smooth textures --------------------------------------------------------------------------
def _linear_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices i0 (n_out,) and weights w (n_out,) of linear interpolation of n_in samples over n_out."""
    pos = np.linspace(0, n_in - 1, n_out)
    i0 = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    return i0, (pos - i0).astype(np.float32)


@dataclass
class _SmoothTexture:
    """Sum of smooth random fields over the whole scan, sampled one slice at a time.

    Each level is a Gaussian-filtered white-noise grid (nzc, cells, cells); a slice is linear
    interpolation in z, then separable linear interpolation up to the image size (no BLAS: its
    threads would compete with the slice threads).
    """

    levels: list[tuple[np.ndarray, np.ndarray]]  # (grid (nzc, cells, cells), z of its planes (nzc,))
    shape: tuple[int, int]

    @classmethod
    def make(cls, rng, z_range, shape, levels: Sequence[tuple[int, float, float]]) -> _SmoothTexture:
        """Random texture over ``z_range``.

        Args:
            rng: random generator.
            z_range: (min, max) world z to cover (mm).
            shape: (rows, cols) of a slice.
            levels: (cells across the image, z step mm, amplitude HU) of each level.
        """
        out = []
        for cells, z_step, amplitude in levels:
            nzc = int(np.ceil((max(z_range) - min(z_range)) / z_step)) + 3
            grid = ndimage.gaussian_filter(rng.standard_normal((nzc, cells, cells)), 1.0, mode="wrap")
            grid = (amplitude * (grid - grid.mean()) / (grid.std() + 1e-9)).astype(np.float32)
            out.append((grid, min(z_range) - z_step + z_step * np.arange(nzc)))
        return cls(out, tuple(shape))

    @staticmethod
    def _upsample(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        (r0, wr), (c0, wc) = _linear_weights(shape[0], plane.shape[0]), _linear_weights(shape[1], plane.shape[1])
        rows = plane[r0] * (1 - wr)[:, None] + plane[r0 + 1] * wr[:, None]
        return rows[:, c0] * (1 - wc) + rows[:, c0 + 1] * wc

    def at(self, z: float) -> np.ndarray:
        """(rows, cols) float32 texture at world z."""
        total = np.zeros(self.shape, dtype=np.float32)
        for grid, z_grid in self.levels:
            f = float(np.clip(np.interp(z, z_grid, np.arange(len(z_grid))), 0, len(z_grid) - 1.001))
            k, w = int(f), f - int(f)
            total += self._upsample((1 - w) * grid[k] + w * grid[k + 1], self.shape)
        return total


# ---- one slice ----------------------------------------------------------------------------
def _pixel_uv(rows, cols, shape: tuple[int, int]):
    """Normalized ``(u, v)`` of pixel columns and rows (arrays): 0 at the image centre, 1 at half its width."""
    half = shape[1] / 2
    return (cols - (shape[1] - 1) / 2) / half, (rows - (shape[0] - 1) / 2) / half


def field_of_view(shape: tuple[int, int]) -> np.ndarray:
    """Boolean (rows, cols) circle of the reconstruction field of view: the largest centred disc."""
    u, v = _pixel_uv(np.arange(shape[0])[:, None], np.arange(shape[1])[None, :], shape)
    return u * u + v * v <= 1.0


@dataclass
class _Grid:
    """Normalized pixel coordinates of a slice and everything about them that does not depend on z.

    All arrays are (rows, cols) unless said otherwise.
    """

    u: np.ndarray
    v: np.ndarray
    static: dict  # ChestAnatomy.static_fields(u, v)
    paint: dict  # fixed structures: name -> (mask, HU map)
    band: np.ndarray  # flat indices of the pixels where ribs may be, (n,)
    band_theta: np.ndarray  # |angle| of those pixels around the body centre: 0 posterior, pi anterior
    fov: np.ndarray  # inside the circular reconstruction field of view

    @classmethod
    def make(cls, shape: tuple[int, int], anat: ChestAnatomy) -> _Grid:
        cols, rows = _pixel_uv(np.arange(shape[0], dtype=np.float32), np.arange(shape[1], dtype=np.float32), shape)
        v, u = np.meshgrid(rows, cols, indexing="ij")
        static = anat.static_fields(u, v)
        rho0 = anat.body_rho_p(u, v, 0.0, static) ** (1 / BODY_EXPONENT)  # the neck taper only grows rho
        band = np.flatnonzero((rho0 >= CAVITY * 0.94) & (rho0 < RIB_OUTER))
        theta = np.abs(np.arctan2(u.ravel()[band], v.ravel()[band] - anat.body_v)).astype(np.float32)
        return cls(u, v, static, _fixed_structures(u, v, anat, static), band, theta, field_of_view(shape))


def _fixed_structures(u, v, anat: ChestAnatomy, static: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Masks and HU of the structures whose cross-section does not change with z."""
    depth = v - (anat.body_v + anat.body_b + 0.05 - 0.06 * u * u)
    q_vert = static["vertebra_q"]
    canal = ellipse_q(u, v, 0.0, SPINE_V + 0.17, 0.055, 0.05)
    arch = (canal >= 1) & (canal < 2.6) & (v > SPINE_V + 0.12)
    spinous = (np.abs(u) < 0.025) & (v > SPINE_V + 0.2) & (v < SPINE_V + 0.28)
    transverse = ellipse_q(np.abs(u), v, 0.11, SPINE_V + 0.14, 0.075, 0.022) < 1
    q_sternum = ellipse_q(u, v, 0.0, anat.body_v - anat.body_b * (CAVITY + RIB_OUTER) / 2, 0.09, 0.035)

    def const(value):
        return np.full(u.shape, value, dtype=np.float32)

    return {
        "table": (
            (depth > 0) & (depth < 0.06) & (np.abs(u) < 0.8),
            np.where((depth < 0.012) | (depth > 0.048), HU["table_shell"], HU["table_core"]).astype(np.float32),
        ),
        "abdomen": (np.ones(u.shape, bool), np.where(u < 0.1, HU["liver"], HU["soft"]).astype(np.float32)),
        "vena_cava": (ellipse_q(u, v, -0.17, -0.10, 0.045, 0.045) < 1, const(HU["soft"])),
        "oesophagus": (ellipse_q(u, v, 0.03, SPINE_V - 0.15, 0.04, 0.035) < 1, const(HU["soft"])),
        "vertebral_body": (
            q_vert < 1,
            np.where(q_vert > 0.7, 0.8 * HU["cortical"], 0.9 * HU["marrow"]).astype(np.float32),
        ),
        "disc": (q_vert < 1, const(HU["disc"])),
        "posterior_arch": (arch | spinous | transverse, const(0.7 * HU["cortical"])),
        "canal": (canal < 1, const(HU["csf"])),
        "sternum": (q_sternum < 1, np.where(q_sternum > 0.45, HU["cortical"], HU["marrow"]).astype(np.float32)),
    }


def _paint(hu, g: _Grid, name: str, where=None) -> None:
    mask, values = g.paint[name]
    np.copyto(hu, values, where=mask if where is None else mask & where)


def _paint_body_wall(hu, g: _Grid, rho_p, z: float) -> None:
    """Table, subcutaneous fat, chest-wall muscle and ribs (in place)."""
    _paint(hu, g, "table")
    np.putmask(hu, rho_p < 1.0, HU["fat"])
    np.putmask(hu, rho_p < MUSCLE_OUTER**BODY_EXPONENT, HU["muscle"])
    rho = rho_p.ravel()[g.band] ** (1 / BODY_EXPONENT)
    phase = (z + RIB_SLOPE_MM_PER_RAD * g.band_theta) / RIB_PITCH_MM  # ribs descend anteriorly
    frac = (phase - np.floor(phase)) * (RIB_PITCH_MM / RIB_HEIGHT_MM)
    rib = (rho >= CAVITY) & (rho < RIB_OUTER) & (frac < 1.0) & (g.band_theta > 0.25) & (g.band_theta < 2.55)
    edge = np.maximum(np.abs(frac - 0.5) * 2, np.abs(rho - (CAVITY + RIB_OUTER) / 2) / ((RIB_OUTER - CAVITY) / 2))
    hu.ravel()[g.band[rib]] = np.where(edge[rib] > 0.6, HU["cortical"], HU["marrow"])


def _paint_mediastinum(hu, g: _Grid, anat: ChestAnatomy, rho_p, t: float) -> None:
    """Cavity fat, upper abdomen, heart, great vessels and oesophagus (in place)."""
    cavity = rho_p < CAVITY**BODY_EXPONENT
    np.putmask(hu, cavity, HU["mediastinal_fat"])
    _paint(hu, g, "abdomen", cavity & (t < g.static["dome"]))
    if anat.has_heart(t):
        np.putmask(hu, cavity & (anat.heart_q(g.u, g.v, t, g.static) < 1), HU["soft"])
    np.putmask(hu, anat.aorta(g.u, g.v, t, g.static), HU["soft"])
    if 0.45 < t < 0.85:
        _paint(hu, g, "vena_cava")
    _paint(hu, g, "oesophagus")


def _paint_bones(hu, g: _Grid, rho_p, z: float, t: float) -> None:
    """Paraspinal muscles, vertebra (body or disc, canal, arch, processes) and sternum (in place)."""
    np.putmask(hu, g.static["paraspinal"] & (rho_p < MUSCLE_OUTER**BODY_EXPONENT), HU["muscle"])
    _paint(hu, g, "disc" if (z % VERTEBRA_PITCH_MM) < DISC_MM else "vertebral_body")
    _paint(hu, g, "posterior_arch")
    _paint(hu, g, "canal")
    if 0.3 < t < 0.9:
        _paint(hu, g, "sternum")


def render_phantom(
    z_positions: Sequence[float],
    pixel_spacing: float,
    scan_z_range: tuple[float, float],
    nodules: Sequence[NoduleSpec] = (),
    slice_thickness: float | None = None,
    seed: int = 0,
    shape: tuple[int, int] = (512, 512),
    noise_sd: float = 18.0,
    progress: bool = False,
    body_fit: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render chest CT slices in HU with their truth masks.

    Anatomy: air (-1000) outside, a table below the patient, subcutaneous fat (-100), muscle (+45),
    ribs, sternum and spine (marrow ~+250, cortex up to +850), lungs (about -855 with a smooth
    texture, denser posteriorly) with branching vessels (+40) thinning towards the periphery,
    trachea and bronchi (lumen -1000, 1.2 mm wall), heart, aorta and mediastinal fat, upper
    abdomen below the diaphragm domes, and Gaussian noise. Positions follow ``scan_z_range``, so a
    run of a few slices looks like the same slices of the full scan: the same seed, geometry,
    slice thickness and slice z give identical pixels whatever the other slices are. The body is
    grown where needed until every nodule outline lies inside the pleural cavity (real nodule
    positions in the phantom's chest could otherwise land in its chest wall, where a solid nodule
    cannot be seen; :meth:`ChestAnatomy.widened_to_hold`). Each nodule
    is drawn at its mask position with the attenuation of its texture class, inside a ball of
    lung (nodule radius + 8 mm, clipped to the inside of the rib cage) so it is surrounded by
    parenchyma even where the generic lungs do not reach. Outside the circular field of view the
    HU is -1024.

    Args:
        z_positions: world z (mm) of the slices to render, (nz,).
        pixel_spacing: in-plane pixel size (mm), rows and columns alike.
        scan_z_range: (min, max) world z of the full scan: the anatomy is laid out over it.
        nodules: nodules to draw (see :class:`NoduleSpec`); their ``z_positions`` are matched to
            ``z_positions`` within 0.001 mm.
        slice_thickness: reconstructed slice thickness (mm); vessels crossing 80 % of it show in
            a slice. Default: the median spacing of ``z_positions``, at most 5 mm (1 mm for a
            single slice).
        seed: random seed (anatomy variation, vessel trees, textures, noise).
        shape: (rows, cols) of each slice.
        noise_sd: standard deviation of the Gaussian noise (HU).
        progress: show a tqdm progress bar over slices.
        body_fit: grow the body to hold the nodules (above). False draws the body of the seed
            alone, as data_prep did before 0.2 (nodules may then lie in the chest wall): only to
            regenerate a world made before.

    Returns:
        ``(hu, truth)``: ``hu`` int16 (z, y, x) in [-1024, 3071], in the order of ``z_positions``;
        ``truth`` maps ``"lungs"`` (lung field including intrapulmonary vessels, small airways and
        nodules, without trachea and main bronchi), ``"airways"`` (airway lumen) and
        ``"nodules"`` (label k of ``NoduleSpec.label``) to uint8 (z, y, x) arrays.
    """
    z_in = np.asarray(z_positions, dtype=np.float64)
    order = np.argsort(z_in, kind="stable")
    z, ps = z_in[order], float(pixel_spacing)
    if slice_thickness is None:
        slice_thickness = min(float(np.median(np.diff(z))), 5.0) if len(z) > 1 else 1.0
    slab = 0.4 * float(slice_thickness)
    anat = ChestAnatomy.sample(np.random.default_rng(seed), min(scan_z_range), max(scan_z_range), shape[1] / 2 * ps)
    if body_fit:
        anat = anat.widened_to_hold(*_nodule_uvt(nodules, anat, shape))
    central, peripheral = airway_segments(anat, np.random.default_rng([seed, 1]))
    grid = _Grid.make(shape, anat)
    scene = _Scene(
        anat=anat,
        grid=grid,
        z=z,
        ps=ps,
        seed=seed,
        noise_sd=noise_sd,
        vessels=rasterize_tubes(vessel_segments(anat, np.random.default_rng([seed, 2])), z, shape, ps, 0.0, slab),
        airways=rasterize_tubes(np.concatenate([central, peripheral]), z, shape, ps, AIRWAY_WALL_MM),
        central_airways=rasterize_tubes(central, z, shape, ps, HILAR_SHEATH_MM),
        texture=_SmoothTexture.make(np.random.default_rng([seed, 3]), scan_z_range, shape, LUNG_TEXTURE),
        gravity=(HU["lung"] + LUNG_GRAVITY_HU * grid.v).astype(np.float32),
        nodules=prepare_nodules(nodules, np.random.default_rng([seed, 4]), ps),
        hu=np.empty((len(z), *shape), dtype=np.int16),
        truth={k: np.zeros((len(z), *shape), dtype=np.uint8) for k in ("lungs", "airways", "nodules")},
    )
    with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 4))) as pool:  # numpy releases the GIL
        done = pool.map(scene.render_slice, range(len(z)))
        if progress:
            from tqdm.auto import tqdm

            done = tqdm(done, total=len(z), desc="render", unit="slice", leave=False)
        for _ in done:
            pass
    inverse = np.argsort(order, kind="stable")
    return scene.hu[inverse], {k: v[inverse] for k, v in scene.truth.items()}


def _nodule_uvt(nodules: Sequence[NoduleSpec], anat: ChestAnatomy, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Normalized (u, v, t) of every voxel of the nodule outlines, each (n,)."""
    u, v, t = [np.zeros(0)], [np.zeros(0)], [np.zeros(0)]
    for spec in nodules:
        kk, rr, cc = np.nonzero(np.asarray(spec.mask, dtype=bool))
        uu, vv = _pixel_uv(rr + spec.row0, cc + spec.col0, shape)
        u.append(uu)
        v.append(vv)
        t.append(anat.t_of(np.asarray(spec.z_positions, dtype=np.float64)[kk]))
    return np.concatenate(u), np.concatenate(v), np.concatenate(t)


@dataclass
class _Scene:
    """Everything one slice needs; ``render_slice(i)`` fills ``hu[i]`` and ``truth[...][i]``."""

    anat: ChestAnatomy
    grid: _Grid
    z: np.ndarray
    ps: float
    seed: int
    noise_sd: float
    vessels: TubeField
    airways: TubeField
    central_airways: TubeField
    texture: _SmoothTexture
    gravity: np.ndarray
    nodules: list[NoduleDraw]
    hu: np.ndarray
    truth: dict[str, np.ndarray]

    def render_slice(self, i: int) -> None:
        g, ps, zi = self.grid, self.ps, float(self.z[i])
        t = float(self.anat.t_of(zi))
        rho_p = self.anat.body_rho_p(g.u, g.v, t, g.static)
        hu = np.full(g.u.shape, HU["air"], dtype=np.float32)
        _paint_body_wall(hu, g, rho_p, zi)
        _paint_mediastinum(hu, g, self.anat, rho_p, t)
        _paint_bones(hu, g, rho_p, zi, t)
        lung = self.anat.lung_field(g.u, g.v, t, g.static, rho_p)
        if self.nodules:
            lung |= nodule_balls(self.nodules, zi, hu.shape, ps) & (rho_p < RIB_OUTER**BODY_EXPONENT)
        np.copyto(hu, self.gravity + self.texture.at(zi), where=lung)
        win = hu[self.vessels.window]
        win += self.vessels.coverage(i, ps) * lung[self.vessels.window] * (HU["soft"] - win)
        central = self.central_airways
        win = hu[central.window]
        win += central.coverage(i, ps, HILAR_SHEATH_MM) * (HU["soft"] - win)
        win = hu[self.airways.window]
        lumen, outer = self.airways.coverage(i, ps), self.airways.coverage(i, ps, AIRWAY_WALL_MM)
        win[...] = win * (1 - outer) + HU["soft"] * (outer - lumen) + HU["air"] * lumen
        self.truth["airways"][i][self.airways.window] = self.airways.sd[i] < 0
        paint_nodules(hu, self.truth["nodules"][i], self.nodules, zi)
        noise_rng = np.random.default_rng([self.seed, 5, int(round(zi * 1000)) + 2**40])
        hu += self.noise_sd * noise_rng.standard_normal(hu.shape, dtype=np.float32)
        np.putmask(hu, ~g.fov, HU_MIN)
        self.hu[i] = np.clip(np.rint(hu), HU_MIN, HU_MAX)
        lung[central.window] &= central.sd[i] > HILAR_SHEATH_MM * SD_SCALE
        self.truth["lungs"][i] = lung
        self.truth["nodules"][i][~g.fov] = 0

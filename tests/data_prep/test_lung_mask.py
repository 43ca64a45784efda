"""Tests for data_prep.ops.lung_mask: synthetic chests with known lungs, and real LIDC slices."""

from __future__ import annotations


import numpy as np
import pytest
from scipy import ndimage as ndi

from data_prep.ops.lung_mask import lung_mask, lung_mask_with_info

from tests.conftest import SAMPLE_ROOT as SAMPLE


def _tube(grid, start, end, radius):
    """Voxels within ``radius`` mm of the segment ``start``-``end`` (points (z, y, x) in mm)."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    axis = end - start
    rel = [g - s for g, s in zip(grid, start)]
    t = np.clip(sum(r * a for r, a in zip(rel, axis)) / float(axis @ axis), 0, 1)
    return sum((r - t * a) ** 2 for r, a in zip(rel, axis)) <= radius**2


def _ball(grid, centre, radius):
    """Voxels within ``radius`` mm of ``centre`` ((z, y, x) in mm)."""
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


# The phantom at 1 mm in-plane and 2.5 mm slices, so that the coarse grid averages 2x2 pixels.
PHANTOM_SHAPE, PHANTOM_SPACING = (64, 200, 250), (2.5, 1.0, 1.0)


def make_phantom(shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING, scale=0.6, seed=0):
    """A supine chest: body, two lungs with vessels and nodules, trachea and bronchi, oesophagus,
    air in a skin fold, a hollow table, bowel and stomach gas, circular field of view padded
    with -1024.

    Sizes are those of an adult chest times ``scale``, in mm, centred in the volume;
    ``make_phantom((400, 360, 360), (1.0, 1.0, 1.0), scale=1.0)`` is an adult at 1 mm.

    Returns:
        ``(hu, parts)``: int16 HU ``(z, y, x)`` and a dict of boolean ``(z, y, x)`` masks:
        ``lungs`` (truth: lung ellipsoids without airways), ``trachea``, ``bronchi``,
        ``vessels``, ``nodule``, ``juxta`` (juxtapleural nodule, inside the lung only),
        ``gas``, ``oesophagus``, ``skin_fold``, ``outside``, ``table_air``.
    """
    nz, ny, nx = shape
    sz, sy, sx = spacing
    z, y, x = np.ogrid[:nz, :ny, :nx]
    # mm, origin at the centre; z superior increasing, y anterior -> posterior, x right -> left.
    grid = ((z - nz / 2) * sz, (y - ny / 2) * sy, (x - nx / 2) * sx)
    gz, gy, gx = grid
    s = scale
    half_z = nz * sz / 2

    body = (gy / (110 * s)) ** 2 + (gx / (165 * s)) ** 2 <= 1
    body = np.broadcast_to(body, shape)
    lung_half_z = 0.42 * half_z
    lung_z = -0.05 * half_z
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):
        lungs |= (
            ((gx - side * 75 * s) / (55 * s)) ** 2 + ((gy + 5 * s) / (80 * s)) ** 2 + ((gz - lung_z) / lung_half_z) ** 2
        ) <= 1
    carina = (lung_z + 0.35 * lung_half_z, -20 * s, 0.0)
    trachea = _tube(grid, (half_z + 10, carina[1], 0), carina, 9 * s)
    bronchi = np.zeros(shape, bool)
    bronchial_wall = np.zeros(shape, bool)
    for side in (-1, 1):  # main bronchi, about 40 degrees down into the lungs, with a wall
        target = (lung_z - 0.55 * lung_half_z, carina[1] + 10 * s, side * 70 * s)
        bronchi |= _tube(grid, carina, target, 6 * s)
        bronchial_wall |= _tube(grid, carina, target, 8 * s)
    carina_z = carina[0]
    bronchi |= _ball(grid, carina, 9 * s) & (gz <= carina_z)
    airway = trachea | bronchi

    vessels = np.zeros(shape, bool)
    for side in (-1, 1):
        cx = side * 75 * s
        top, bottom = lung_z + 0.6 * lung_half_z, lung_z - 0.6 * lung_half_z
        vessels |= _tube(grid, (bottom, 0, cx), (top, 10 * s, cx + 10 * s), 3 * s)
        across = (lung_z, -50 * s, cx - 30 * s), (lung_z, 40 * s, cx + 25 * s)
        vessels |= _tube(grid, *across, 2.5 * s)
    vessels &= lungs
    nodule = _ball(grid, (lung_z - 0.3 * lung_half_z, 30 * s, -75 * s), 7 * s)
    # On the lateral pleura of the left lung (patient left = high x), half inside the lung.
    juxta_ball = _ball(grid, (lung_z, -5 * s, (75 + 55) * s), 9 * s)

    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[body] = 40.0
    hu[lungs] = -850.0
    hu[vessels] = 40.0
    hu[nodule] = 0.0
    hu[juxta_ball & body] = 30.0
    hu[bronchial_wall] = 40.0
    hu[airway & body] = -1000.0

    # Gas: bowel well below the lungs, stomach under the left lung base.
    gas = _ball(grid, (-0.85 * half_z, 20 * s, 30 * s), 22 * s)
    gas |= _ball(grid, (lung_z - lung_half_z - 14 * s, 10 * s, 60 * s), 12 * s)
    gas &= body & ~lungs
    hu[gas] = -1000.0

    # Oesophagus: a tube of air mixed with content, behind the trachea, not touching the lungs.
    ends = (half_z + 10, 8 * s, 6 * s), (lung_z - lung_half_z, 8 * s, 6 * s)
    oesophagus = _tube(grid, *ends, 8 * s)
    oesophagus &= body & ~lungs
    hu[oesophagus] = -900.0

    # Air trapped in a skin fold in the right lateral chest wall (partial volume, not gas-like).
    skin_fold = (((gz - lung_z) / (15 * s)) ** 2 + (gy / (12 * s)) ** 2 + ((gx + 150 * s) / (6 * s)) ** 2) <= 1
    hu[skin_fold] = -900.0

    # Table: a hollow slab under the back; its inside is enclosed air in every slice.
    table = (np.abs(gx) <= 90 * s) & (gy >= 116 * s) & (gy <= 136 * s)
    table_air = (np.abs(gx) <= 85 * s) & (gy >= 121 * s) & (gy <= 131 * s)
    table = np.broadcast_to(table & ~table_air, shape)
    hu[table] = 300.0
    table_air = np.broadcast_to(table_air, shape) & ~body

    rng = np.random.default_rng(seed)
    hu += rng.normal(0, 25, shape).astype(np.float32)
    fov = np.broadcast_to((gy**2 + gx**2) > (min(ny * sy, nx * sx) / 2) ** 2, shape)
    hu[fov] = -1024
    hu = np.clip(hu, -1024, 3071).astype(np.int16)

    truth = lungs & ~airway
    parts = {
        "lungs": truth,
        "trachea": trachea & ~lungs & body,
        "bronchi": bronchi & ~lungs & body,
        "vessels": vessels,
        "nodule": nodule,
        "juxta": juxta_ball & lungs,
        "gas": gas,
        "oesophagus": oesophagus,
        "skin_fold": skin_fold,
        "outside": ~body & ~table,
        "table_air": table_air,
    }
    return hu, parts


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def phantom():
    hu, parts = make_phantom()
    mask, info = lung_mask_with_info(hu, PHANTOM_SPACING)
    return hu, parts, mask, info


def test_phantom_dice(phantom):
    """The mask is uint8 (z, y, x) of 0/1 and matches the phantom's true lungs with Dice > 0.95."""
    hu, parts, mask, _ = phantom
    assert mask.dtype == np.uint8 and mask.shape == hu.shape
    assert set(np.unique(mask)) == {0, 1}
    assert _dice(mask.astype(bool), parts["lungs"]) > 0.95


def test_phantom_excludes_airways_outside_air_and_gas(phantom):
    """Trachea and main bronchi, air outside the body and in the table, oesophagus, air in a skin
    fold, bowel and stomach gas are not lung."""
    _, parts, mask, info = phantom
    mask = mask.astype(bool)
    assert info["airway_removed_ml"] > 0
    assert not (mask & parts["trachea"]).any()
    assert np.count_nonzero(mask & parts["bronchi"]) < 0.1 * np.count_nonzero(parts["bronchi"])
    for name in ("outside", "table_air", "gas", "oesophagus", "skin_fold"):
        assert parts[name].any() and not (mask & parts[name]).any(), name


def test_phantom_fills_vessels_and_nodules(phantom):
    """Vessels and an intrapulmonary nodule are filled in; most of a juxtapleural nodule is too."""
    _, parts, mask, _ = phantom
    mask = mask.astype(bool)
    assert mask[parts["vessels"]].mean() > 0.99
    assert mask[parts["nodule"]].all()
    assert mask[parts["juxta"]].mean() > 0.8


def test_juxtapleural_nodule_needs_the_closing(phantom):
    """Without the closing the juxtapleural nodule stays out (the closing is what takes it in),
    and the closing adds nothing between the lungs."""
    hu, parts, mask, _ = phantom
    open_mask, _ = lung_mask_with_info(hu, PHANTOM_SPACING, closing_radius_mm=0)
    assert open_mask[parts["juxta"]].mean() < 0.5
    between = np.zeros(hu.shape, bool)
    between[..., 115:135] = True  # 10 mm either side of the midline (x = 125)
    assert np.count_nonzero(mask.astype(bool) & between & ~parts["lungs"]) == 0


def test_mediastinum_enclosed_by_lungs_is_not_filled():
    """Where the lungs meet in front of and behind the mediastinum, enclosing it (and the
    trachea) in the slice, the mediastinum is not filled in as a hole."""
    shape, spacing = (24, 160, 200), (2.5, 1.0, 1.0)
    _, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    y, x = np.broadcast_to(y - 80.0, shape), np.broadcast_to(x - 100.0, shape)
    body = (y / 70) ** 2 + (x / 95) ** 2 <= 1
    lungs = (y / 50) ** 2 + ((np.abs(x) - 45) / 35) ** 2 <= 1
    lungs |= (np.abs(np.abs(y) - 28) <= 2) & (np.abs(x) <= 17)  # anterior and posterior junction
    mediastinum = body & ~lungs & (np.abs(y) < 26) & (np.abs(x) < 20)
    trachea = (y + 5) ** 2 + x**2 <= 6**2
    hu = np.where(body, 40.0, -1000.0)
    hu[lungs] = -850.0
    hu[trachea] = -1000.0
    hu += np.random.default_rng(0).normal(0, 20, shape)
    mask = lung_mask(np.clip(hu, -1024, 3071).astype(np.int16), spacing).astype(bool)
    assert _dice(mask, lungs) > 0.95
    assert not (mask & mediastinum).any()


def test_hilar_crevice_is_not_closed():
    """A narrow, deep crevice of tissue cut obliquely into a lung's medial side (the hilum), with
    lung medial to its far end, is not closed over."""
    shape, spacing = (24, 160, 200), (2.5, 1.0, 1.0)
    _, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    y, x = np.broadcast_to(y - 80.0, shape), np.broadcast_to(x - 100.0, shape)
    body = (y / 70) ** 2 + (x / 95) ** 2 <= 1
    lungs = (y / 50) ** 2 + ((np.abs(x) - 45) / 35) ** 2 <= 1
    # 8 mm wide, from the mediastinum at (y, x) = (-24, -8) to (4, -36) in the right lung.
    t = np.clip(((y + 24) - (x + 8)) / 2 / 28, 0, 1)
    crevice = (y + 24 - 28 * t) ** 2 + (x + 8 + 28 * t) ** 2 <= 4**2
    truth = lungs & ~crevice
    hu = np.where(body, 40.0, -1000.0)
    hu[truth] = -850.0
    hu += np.random.default_rng(0).normal(0, 20, shape)
    mask = lung_mask(np.clip(hu, -1024, 3071).astype(np.int16), spacing).astype(bool)
    assert _dice(mask, truth) > 0.95
    assert np.count_nonzero(mask & crevice & lungs) < 0.1 * np.count_nonzero(crevice & lungs)


def test_short_stack_below_trachea_top(phantom):
    """On 12 mid-chest slices (carina in, trachea top not) the trachea and main bronchi are still
    removed and the lungs found."""
    hu, parts, _, _ = phantom
    lungs_z = np.flatnonzero(parts["trachea"].any(axis=(1, 2)) & parts["lungs"].any(axis=(1, 2)))
    assert lungs_z.size, "phantom: trachea and lungs share no slice"
    stack = slice(max(lungs_z[0] - 6, 0), lungs_z[0] + 6)
    mask = lung_mask(hu[stack], PHANTOM_SPACING).astype(bool)
    assert _dice(mask, parts["lungs"][stack]) > 0.95
    assert not (mask & parts["trachea"][stack]).any()
    bronchi = parts["bronchi"][stack]
    assert np.count_nonzero(mask & bronchi) < 0.05 * np.count_nonzero(bronchi)


def test_emphysema_does_not_leak_airway_growing():
    """With dark, noisy (emphysema-like) parenchyma the airway search does not eat the lungs and
    still removes the trachea."""
    hu, parts = make_phantom(seed=1)
    parenchyma = parts["lungs"] & ~parts["vessels"] & ~parts["nodule"]
    rng = np.random.default_rng(2)
    hu[parenchyma] = np.clip(rng.normal(-950, 40, np.count_nonzero(parenchyma)), -1024, 0)
    mask = lung_mask(hu, PHANTOM_SPACING).astype(bool)
    assert _dice(mask, parts["lungs"]) > 0.95
    assert np.count_nonzero(mask & parts["trachea"]) < 0.01 * np.count_nonzero(parts["trachea"])


@pytest.mark.parametrize("where", ["below", "above"])
def test_slab_without_lungs_is_empty(phantom, where):
    """A slab below the lungs (bowel gas) or above them (trachea, oesophagus air) gives an
    all-zero mask."""
    hu, parts, _, _ = phantom
    lungs_z = np.flatnonzero(parts["lungs"].any(axis=(1, 2)))
    slab = slice(0, lungs_z[0] - 2) if where == "below" else slice(lungs_z[-1] + 3, None)
    other_air = parts["gas"] | parts["oesophagus"] | parts["trachea"]
    assert other_air[slab].any()
    mask, info = lung_mask_with_info(hu[slab], PHANTOM_SPACING)
    assert mask.shape == hu[slab].shape and not mask.any()
    assert info["warnings"]


def test_soft_tissue_only_returns_zeros():
    """A volume of soft tissue only returns an all-zero uint8 mask of the same shape."""
    mask = lung_mask(np.full((8, 40, 50), 40, dtype=np.int16), (1.0, 1.0, 1.0))
    assert mask.dtype == np.uint8 and mask.shape == (8, 40, 50) and not mask.any()


@pytest.mark.parametrize(
    "hu, spacing, message",
    [
        (np.zeros((40, 50)), (1.0, 1.0, 1.0), "3D"),
        (np.zeros((2, 4, 40, 50)), (1.0, 1.0, 1.0), "3D"),
        (np.zeros((4, 40, 50)), (1.0, 1.0), "3 values"),
        (np.zeros((4, 40, 50)), 1.0, "3 numbers"),
        (np.zeros((4, 40, 50)), (1.0, 0.0, 1.0), "positive"),
    ],
)
def test_bad_input_raises(hu, spacing, message):
    """A non-3D array or a spacing that is not three positive numbers raises ValueError."""
    with pytest.raises(ValueError, match=message):
        lung_mask(hu, spacing)


# Landmarks read off the real slices (slice index in the z-sorted series, row, column):
# airway lumens that must stay out, nodules that must be in.
AIRWAYS = {
    "LIDC-IDRI-0001": [(15, 259, 228), (0, 273, 219), (0, 287, 277)],  # trachea, main bronchi
    "LIDC-IDRI-0002": [(0, 262, 260), (6, 262, 260), (11, 262, 260)],  # trachea
    "LIDC-IDRI-0003": [(10, 310, 229), (10, 300, 273)],  # main bronchi, below the carina
}
NODULES = {
    "LIDC-IDRI-0001": [(8, 365, 315)],  # touching the posterior pleura
    "LIDC-IDRI-0002": [],
    "LIDC-IDRI-0003": [(5, 350, 367)],
}


def _load_series(patient: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    pydicom = pytest.importorskip("pydicom")
    slices = [pydicom.dcmread(f) for f in sorted((SAMPLE / patient).rglob("*.dcm"))]
    slices.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) for d in slices])
    hu += np.array([float(d.RescaleIntercept) for d in slices])[:, None, None]
    hu = np.clip(hu, -1024, 3071).astype(np.int16)
    dz = float(np.median(np.diff([float(d.ImagePositionPatient[2]) for d in slices])))
    dy, dx = (float(v) for v in slices[0].PixelSpacing)
    return hu, (dz, dy, dx)


def _internal_air_2d(hu: np.ndarray, threshold: float, min_area_px: float) -> np.ndarray:
    """Voxels below ``threshold`` in axial components of at least ``min_area_px`` that do not
    reach the slice border (the lungs, without small airway and oesophagus cross-sections)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndi.generate_binary_structure(2, 1)
    labels, n = ndi.label(hu < threshold, structure)
    big = np.bincount(labels.ravel(), minlength=n + 1) >= min_area_px
    for face in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        big[face] = False
    big[0] = False
    return big[labels]


@pytest.mark.parametrize("patient", sorted(AIRWAYS))
def test_real_lidc_slices(patient):
    """On real LIDC slices the mask is air-dark, covers the lungs, keeps airway lumens and the
    in-plane border out, and takes nodules in."""
    hu, spacing = _load_series(patient)
    mask = lung_mask(hu, spacing).astype(bool)
    assert hu[mask].mean() < -700
    lungs = _internal_air_2d(hu, -500, 1500 / (spacing[1] * spacing[2]))  # >= 15 cm2 per slice
    assert mask[lungs].mean() > 0.99
    border = np.ones(mask.shape[1:], bool)
    border[8:-8, 8:-8] = False  # 8 pixels along the in-plane edges
    assert not mask[:, border].any()
    for z, y, x in AIRWAYS[patient]:
        assert hu[z, y - 1 : y + 2, x - 1 : x + 2].mean() < -900, "landmark is not an airway lumen"
        assert not mask[z, y - 2 : y + 3, x - 2 : x + 3].any(), (z, y, x)
    for z, y, x in NODULES[patient]:
        assert hu[z, y, x] > -100 and mask[z, y, x], (z, y, x)


def test_real_lidc_resampled_matches_native():
    """The same real series at ~1 mm isotropic gives the same mask as at native spacing."""
    hu, spacing = _load_series("LIDC-IDRI-0001")
    native = lung_mask(hu, spacing)
    iso = lung_mask(ndi.zoom(hu.astype(np.float32), spacing, order=1), (1.0, 1.0, 1.0))
    back = ndi.zoom(native, np.array(iso.shape) / np.array(native.shape), order=0)
    assert back.shape == iso.shape
    assert _dice(back.astype(bool), iso.astype(bool)) > 0.95

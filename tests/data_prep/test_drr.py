"""Tests for the drr step: cone-beam geometry, attenuation, masks, poses, the X-ray-like stand-in, files, resume, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from data_prep.__main__ import main
from data_prep.ops.drr_projector import (
    CT_CURVE,
    DrrGeometry,
    Pose,
    hu_channels,
    line_integral,
    make_poses,
    project_volume,
    xray_like,
)
from data_prep.ops.drr_render import DrrParams, render_case_arrays

GEOM = DrrGeometry(sdd=1800.0, odd=180.0, size=128, detector_mm=240.0)
SP = 2.0  # mm, isotropic phantoms


def _phantom(n=64, centre_xyz=(40, 26, 44), radius_mm=8.0):
    """Water-filled body (HU 0) in air, lungs = the whole body, a dense (HU 1000) ball labelled 1."""
    z, y, x = np.mgrid[:n, :n, :n]
    hu = np.full((n, n, n), -1000, np.int16)
    hu[4:-4, 4:-4, 4:-4] = 0
    cx, cy, cz = centre_xyz
    ball = ((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) * SP**2 <= radius_mm**2
    hu[ball] = 1000
    lungs = np.zeros_like(hu, dtype=np.uint8)
    lungs[4:-4, 4:-4, 4:-4] = 1
    return hu, ball.astype(np.uint8), lungs


def _expected_pixel(p_xyz_mm, geom=GEOM):
    """Detector (row, col) of a point (LPS mm from the isocentre) by the PA cone-beam formula."""
    src_y = geom.sdd - geom.odd
    m = geom.sdd / (src_y - p_xyz_mm[1])
    col = p_xyz_mm[0] * m / geom.pixel_mm + geom.size / 2 - 0.5
    row = -p_xyz_mm[2] * m / geom.pixel_mm + geom.size / 2 - 0.5
    return row, col, m


def _params(**kw):
    return DrrParams(geometry=kw.pop("geometry", GEOM), **kw)


def test_projected_mask_centroid_follows_cone_beam_geometry():
    """The projected ball's centroid lands within 1 px of where the PA cone-beam geometry puts its centre (left -> right columns, head -> top rows)."""
    hu, ball, lungs = _phantom(centre_xyz=(44, 22, 46))
    res = render_case_arrays(hu, ball, lungs, (SP, SP, SP), _params(poses=1))[0]
    iso = (np.array([4, 4, 4]) + np.array([59, 59, 59])) / 2  # lung box centre, (x, y, z) index
    p = (np.array([44, 22, 46]) - iso) * SP
    row, col, _ = _expected_pixel(p)
    st = res["nodule_stats"][1]
    assert abs(st["centroid_row"] - row) < 1.0 and abs(st["centroid_col"] - col) < 1.0
    assert col > GEOM.size / 2 and row < GEOM.size / 2  # patient's left on the viewer's right, head up
    rr, cc = np.nonzero(res["nodules"])
    assert abs(rr.mean() - row) < 1.0 and abs(cc.mean() - col) < 1.0


def test_projected_area_scales_with_magnification():
    """Moving the patient 150 mm toward the source grows the ball's projected area by the squared magnification ratio."""
    hu, ball, lungs = _phantom(centre_xyz=(32, 32, 32), radius_mm=12.0)
    base = render_case_arrays(hu, ball, lungs, (SP, SP, SP), _params(poses=1))[0]["nodule_stats"][1][
        "projected_area_px"
    ]
    vol = ball[None].astype(np.float32)
    iso = np.array([31.5, 31.5, 31.5])
    near = project_volume(vol, (SP, SP, SP), GEOM, Pose(translation_mm=(0, 150, 0)), iso_index=iso)[0] >= 1.0
    p0 = np.array([0.5, 0.5, 0.5]) * SP
    _, _, m0 = _expected_pixel(p0)
    _, _, m1 = _expected_pixel(p0 + np.array([0, 150, 0]))
    assert near.sum() / base == pytest.approx((m1 / m0) ** 2, rel=0.06)
    assert near.sum() > base


def test_line_integral_is_mu_times_path_length():
    """The DRR's central ray through a 60 mm water slab gives mu_water x 60 mm (1 %), and twice the thickness twice the signal."""
    n = 64
    hu = np.full((n, n, n), -1000, np.int16)
    hu[:, 17:47, :] = 0  # 30 voxels = 60 mm along y (the beam)
    hu[:, 47:62, : n // 2] = 0  # the patient's right half has 30 mm more
    proj = project_volume(hu_channels(hu), (SP, SP, SP), GEOM, ray_step_mm=2.0)
    integral = line_integral(proj, CT_CURVE)
    c = GEOM.size // 2
    left_half, right_half = integral[c, c + 20], integral[c, c - 20]
    secant = lambda col: np.hypot((col + 0.5 - c) * GEOM.pixel_mm, GEOM.sdd) / GEOM.sdd  # noqa: E731
    assert left_half == pytest.approx(CT_CURVE.mu_water * 60 * secant(c + 20), rel=0.01)
    assert right_half == pytest.approx(CT_CURVE.mu_water * 90 * secant(c - 20), rel=0.01)
    assert right_half > left_half


def test_drr_brighter_where_dense_path_longer_and_in_unit_range():
    """The scaled DRR is in [0, 1], higher behind the ball (longer dense path) than beside it, and 0 where rays miss the body."""
    hu, ball, lungs = _phantom(centre_xyz=(32, 32, 32), radius_mm=12.0)
    res = render_case_arrays(hu, ball, lungs, (SP, SP, SP), _params(poses=1))[0]
    drr, mask = res["drr"], res["nodules"] > 0
    assert drr.dtype == np.float32 and drr.min() >= 0 and drr.max() <= 1
    body = res["lungs"] > 0
    assert drr[mask].mean() > drr[body & ~mask].mean() + 0.1
    assert drr[0, 0] == 0 and drr[-1, -1] == 0


def test_poses_differ_are_seeded_and_pose0_is_plain_pa():
    """Pose 0 is the unrotated PA; other poses move the image; poses depend only on case id and seed."""
    poses = make_poses(3, "case-a", seed=0)
    assert poses[0] == Pose() and poses[1] != poses[2]
    assert make_poses(3, "case-a", seed=0) == poses and make_poses(3, "case-b", seed=0)[1] != poses[1]
    hu, ball, lungs = _phantom(centre_xyz=(40, 30, 24))
    res = render_case_arrays(hu, ball, lungs, (SP, SP, SP), _params(poses=3), key="case-a")
    assert np.abs(res[1]["drr"] - res[0]["drr"]).mean() > 0.01
    assert res[1]["nodule_stats"][1]["centroid_col"] != res[0]["nodule_stats"][1]["centroid_col"]
    again = render_case_arrays(hu, ball, lungs, (SP, SP, SP), _params(poses=1), key="other")[0]
    np.testing.assert_array_equal(again["drr"], res[0]["drr"])


def test_rotated_pose_moves_ball_where_rotation_predicts():
    """A 10 degree axial turn moves the projected ball to the rotated position's projection (within 1 px)."""
    hu, ball, lungs = _phantom(centre_xyz=(32, 54, 32))
    vol = ball[None].astype(np.float32)
    iso = np.array([31.5, 31.5, 31.5])
    pose = Pose(rotation_deg=(0, 0, 10.0))
    img = project_volume(vol, (SP, SP, SP), GEOM, pose, iso_index=iso)[0] >= 1.0
    a = np.radians(10.0)
    p = (np.array([32, 54, 32]) - iso) * SP
    q = np.array([np.cos(a) * p[0] - np.sin(a) * p[1], np.sin(a) * p[0] + np.cos(a) * p[1], p[2]])
    row, col, _ = _expected_pixel(q)
    rr, cc = np.nonzero(img)
    assert abs(rr.mean() - row) < 1.0 and abs(cc.mean() - col) < 1.0
    assert abs(cc.mean() - _expected_pixel(p)[1]) > 2  # it did move


def test_xray_like_has_more_bone_contrast_and_noise():
    """The X-ray-like stand-in differs from the DRR: a higher bone-to-water contrast and noise in flat regions."""
    hu, ball, lungs = _phantom(centre_xyz=(32, 32, 32), radius_mm=12.0)
    res = render_case_arrays(hu, ball, lungs, (SP, SP, SP), _params(poses=1))[0]
    drr, xr, mask = res["drr"], res["xray"], res["nodules"] > 0
    flat = np.zeros_like(mask)
    flat[40:50, 40:50] = True  # beside the ball, water only
    assert not (flat & mask).any() and res["lungs"][flat].all()
    assert xr.min() >= 0 and xr.max() <= 1 and xr.dtype == np.float32
    assert xr[mask].mean() / xr[flat].mean() > drr[mask].mean() / drr[flat].mean()
    assert xr[flat].std() > 3 * drr[flat].std()
    seeded = [
        xray_like(np.stack([np.full((8, 8), 50.0), np.zeros((8, 8))]), rng=np.random.default_rng(1)) for _ in range(2)
    ]
    np.testing.assert_array_equal(*seeded)


# ------------------------------------------------------------------------------------------------
# the step on a tiny prepared folder


def _write(arr, path, spacing=(SP, SP, SP)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


@pytest.fixture()
def prepared(tmp_path):
    """A prepared folder of three tiny phantom cases (two patients) with datalist.json and nodules.csv."""
    root = tmp_path / "prepared"
    entries, rows = [], []
    for i, (cid, pid, fold) in enumerate((("C1", "P1", 0), ("C2", "P2", 1), ("C3", "P2", 1))):
        hu, ball, lungs = _phantom(n=40, centre_xyz=(14 + 6 * i, 20, 20), radius_mm=6.0)
        files = {
            "image": f"images/{cid}.nii.gz",
            "label": f"labels/nodules/{cid}.nii.gz",
            "lung": f"labels/lungs/{cid}.nii.gz",
        }
        for key, arr in (("image", hu), ("label", ball), ("lung", lungs)):
            _write(arr, root / files[key])
        entries.append({"case_id": cid, "patient_id": pid, **files, "fold": fold})
        rows.append({"case_id": cid, "label": 1, "diameter_mm": 12.0 + i})
    (root / "datalist.json").write_text(json.dumps({"n_folds": 2, "fold_seed": 0, "training": entries}))
    with open(root / "nodules.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "label", "diameter_mm"])
        w.writeheader()
        w.writerows(rows)
    return root


ARGS = ["--size", "64", "--detector-mm", "160", "--poses", "2", "--quiet"]


def test_step_writes_the_data_contract(prepared, tmp_path):
    """Images, labels, nodules.csv, datalist (folds copied) and the seed PNG layout are written as the contract says."""
    out, seed = tmp_path / "drr", tmp_path / "seed"
    assert main(["drr", "--prepared", str(prepared), "--out", str(out), "--export-seed-layout", str(seed), *ARGS]) == 0
    dl = json.loads((out / "datalist.json").read_text())
    assert len(dl["training"]) == 6
    e = dl["training"][0]
    assert set(e) == {"xray", "drr", "label", "lung", "fold", "case_id", "patient_id", "pose", "max_diameter_mm"}
    assert {(x["case_id"], x["fold"]) for x in dl["training"]} == {("C1", 0), ("C2", 1), ("C3", 1)}
    for key, dtype in (("drr", np.float32), ("xray", np.float32), ("label", np.uint8), ("lung", np.uint8)):
        img = sitk.ReadImage(str(out / e[key]))
        arr = sitk.GetArrayFromImage(img)
        assert arr.shape == (64, 64) and arr.dtype == dtype and img.GetSpacing() == pytest.approx((2.5, 2.5))
        assert arr.min() >= 0 and arr.max() <= 1
    with open(out / "nodules.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["sample"] == "C1_p0" and float(rows[0]["diameter_mm"]) == 12.0
    assert int(rows[0]["projected_area_px"]) > 0 and e["max_diameter_mm"] == 12.0
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(seed / "C1_p0_drr_mask.png")))
    assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255} and png.max() == 255


def test_bad_case_recorded_others_go_on_and_resume(prepared, tmp_path):
    """A corrupt image fails only its case (exit 1, error names the file); a rerun skips finished cases and redoes the fixed one."""
    out = tmp_path / "drr"
    good = (prepared / "images/C2.nii.gz").read_bytes()
    (prepared / "images/C2.nii.gz").write_bytes(b"not a nifti")
    assert main(["drr", "--prepared", str(prepared), "--out", str(out), *ARGS]) == 1
    man = json.loads((out / "manifest.json").read_text())
    assert man["cases"]["C2"]["status"] == "failed" and "C2.nii.gz" in man["cases"]["C2"]["error"]
    assert man["cases"]["C1"]["status"] == man["cases"]["C3"]["status"] == "ok"
    assert {e["case_id"] for e in json.loads((out / "datalist.json").read_text())["training"]} == {"C1", "C3"}
    done = out / "images/drr/C1_p0.nii.gz"
    stamp = done.stat().st_mtime_ns
    (prepared / "images/C2.nii.gz").write_bytes(good)
    assert main(["drr", "--prepared", str(prepared), "--out", str(out), *ARGS]) == 0
    assert done.stat().st_mtime_ns == stamp
    assert len(json.loads((out / "datalist.json").read_text())["training"]) == 6
    assert (
        main(["drr", "--prepared", str(prepared), "--out", str(out), *ARGS[:-3], "--poses", "3"]) == 2
    )  # other settings refused


def test_bad_inputs_get_clear_messages(prepared, tmp_path, capsys):
    """No datalist, no images folder, a 2D image or mismatched label grids: clear messages naming what is wrong."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["drr", "--prepared", str(empty), "--out", str(tmp_path / "o1"), *ARGS]) == 2
    assert "datalist.json not found" in capsys.readouterr().err
    (empty / "datalist.json").write_text(json.dumps({"training": []}))
    assert main(["drr", "--prepared", str(empty), "--out", str(tmp_path / "o2"), *ARGS]) == 2
    assert "no CT volumes" in capsys.readouterr().err
    _write(np.zeros((40, 40), np.int16), prepared / "images/C1.nii.gz", spacing=(SP, SP))
    _write(np.zeros((10, 40, 40), np.uint8), prepared / "labels/lungs/C3.nii.gz")
    assert main(["drr", "--prepared", str(prepared), "--out", str(tmp_path / "o3"), *ARGS]) == 1
    err = capsys.readouterr().err
    assert "C1.nii.gz is 2D" in err and "must share one grid" in err
    assert main(["drr", "--prepared", str(prepared), "--out", str(tmp_path / "o4"), "--cases", "NOPE", *ARGS]) == 2
    assert "NOPE" in capsys.readouterr().err


def test_truncated_input_is_refused_by_name(prepared, tmp_path, capsys):
    """A prepared .nii.gz cut short (which SimpleITK reads without error) fails its case naming the file, exit 1."""
    image = prepared / "images/C2.nii.gz"
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) * 3 // 4])
    out = tmp_path / "drr"
    assert main(["drr", "--prepared", str(prepared), "--out", str(out), *ARGS]) == 1
    man = json.loads((out / "manifest.json").read_text())
    assert man["cases"]["C2"]["status"] == "failed" and f"{image} is damaged" in man["cases"]["C2"]["error"]
    assert not (out / "images/drr/C2_p0.nii.gz").exists() and (out / "images/drr/C1_p0.nii.gz").exists()
    assert f"FAILED C2: {image} is damaged" in capsys.readouterr().err


@pytest.mark.parametrize("pose", [Pose(), Pose((3.0, -2.0, 4.0), (5.0, 20.0, -6.0))], ids=["pa", "rotated"])
def test_agrees_with_nanodrr_dense_rendering(pose):
    """Our projector and nanodrr (800 samples per ray, same geometry) give the same DRR within 1 % inside the body."""
    torch = pytest.importorskip("torch")
    from nanodrr.camera import make_k_inv
    from nanodrr.data import Subject
    from nanodrr.drr.renderer import render

    from data_prep.ops.drr_projector import rotation_matrix

    hu, _, _ = _phantom(n=48, centre_xyz=(30, 20, 26), radius_mm=10.0)
    hu[10:20, 30:40, 8:16] = 400  # an off-centre block
    iso = np.array([23.5, 23.5, 23.5])
    geom = DrrGeometry(sdd=1800.0, odd=180.0, size=64, detector_mm=160.0)
    ours = line_integral(project_volume(hu_channels(hu), (SP, SP, SP), geom, pose, iso_index=iso), CT_CURVE)
    v2w = np.diag([SP, SP, SP, 1.0])
    v2w[:3, 3] = -iso * SP
    subj = Subject(
        torch.as_tensor(hu.astype(np.float32))[None, None], torch.zeros((1, 1, *hu.shape)), torch.tensor(v2w, dtype=torch.float32),
        torch.tensor(np.linalg.inv(v2w), dtype=torch.float32), Subject._make_voxel_to_grid(torch.Size((1, 1, *hu.shape))),
        torch.zeros(3), max_label=0,
    )  # fmt: skip
    # camera (x = columns, y = rows, z = beam; source at its origin) -> our PA frame -> the volume's frame
    cam_to_q = np.array([[1, 0, 0, 0], [0, 0, -1, geom.sdd - geom.odd], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=float)
    r = rotation_matrix(pose.rotation_deg)
    q_to_p = np.eye(4)
    q_to_p[:3, :3], q_to_p[:3, 3] = r.T, -r.T @ np.asarray(pose.translation_mm)
    k_inv = make_k_inv(geom.sdd, geom.pixel_mm, geom.pixel_mm, 0.0, 0.0, geom.size, geom.size)
    rt_inv = torch.tensor(q_to_p @ cam_to_q, dtype=torch.float32)[None]
    ref = render(subj, k_inv, rt_inv, torch.tensor([geom.sdd]), geom.size, geom.size, 800)[0, 0].numpy()
    body = ref > 0.2 * ref.max()
    assert body.sum() > 500
    assert np.abs(ours - ref)[body].mean() / ref[body].mean() < 0.01


def _contrast(img, mask):
    """Mean inside ``mask`` minus the mean of a 3-8 px ring around it, over the ring's std."""
    ring = ndi.binary_dilation(mask, iterations=8) & ~ndi.binary_dilation(mask, iterations=3)
    return (img[mask].mean() - img[ring].mean()) / img[ring].std()


@pytest.fixture(scope="module")
def chest():
    """The lung-mask tests' supine chest phantom (vessels, nodules, airways, gas) and its lung field."""
    from data_prep.ops.lung_mask import lung_mask
    from tests.data_prep.test_lung_mask import PHANTOM_SPACING, make_phantom

    hu, parts = make_phantom()
    return hu, parts, lung_mask(hu, PHANTOM_SPACING), PHANTOM_SPACING


def test_lung_region_drr_keeps_the_lung_field_only_and_never_reads_the_labels(chest):
    """drr_region='lungs': zero where rays miss the lung field (the body DRR is not), the nodule stands out more than
    in the body DRR, and the DRR is the same whatever the nodule and lung labels say (no trace of the annotation)."""
    hu, parts, field, sp = chest
    nodule = parts["nodule"].astype(np.uint8)
    labelled_lungs = (parts["lungs"] | parts["nodule"]).astype(np.uint8)
    params = _params(poses=1, geometry=DrrGeometry(size=128, detector_mm=300.0), drr_region="lungs")
    lungs_res = render_case_arrays(hu, nodule, labelled_lungs, sp, params)[0]
    body_res = render_case_arrays(hu, nodule, labelled_lungs, sp, _params(poses=1, geometry=params.geometry))[0]
    # the projected CT lung field (the integral of the field along each ray)
    field_2d = render_case_arrays(hu, field, labelled_lungs, sp, _params(poses=1, geometry=params.geometry))[0][
        "nodules"
    ]
    outside = ~ndi.binary_dilation(field_2d > 0, iterations=2) & (
        body_res["drr"] > 0.05
    )  # 2 px: rays grazing the field
    assert outside.sum() > 1000
    assert np.abs(lungs_res["drr"][outside]).max() < 0.02 and body_res["drr"][outside].mean() > 0.2
    m = lungs_res["nodules"] > 0
    assert m.sum() > 5
    assert _contrast(lungs_res["drr"], m) > _contrast(body_res["drr"], m) + 0.5
    # other labels (a nodule label grown into the chest wall, lungs = everything): the same DRR
    grown = np.zeros_like(nodule)
    grown[20:40, 60:140, 20:60] = 1
    other = render_case_arrays(hu, grown, np.ones_like(nodule), sp, params)[0]
    assert np.array_equal(other["drr"], lungs_res["drr"])
    assert not np.array_equal(other["nodules"], lungs_res["nodules"])


def test_lung_region_drr_refuses_a_ct_without_lungs(prepared, tmp_path):
    """The water phantoms hold no air-filled lung: each case fails with a message saying so; a bad region is refused."""
    out = tmp_path / "drr"
    assert main(["drr", "--prepared", str(prepared), "--out", str(out), "--drr-region", "lungs", *ARGS]) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert {rec["status"] for rec in manifest["cases"].values()} == {"failed"}
    assert all("no lung field found in the CT" in rec["error"] for rec in manifest["cases"].values())
    assert manifest["parameters"]["drr_region"] == "lungs"
    with pytest.raises(ValueError, match="drr_region must be one of body, lungs"):
        DrrParams(drr_region="bones")


def test_depth_slabs_add_up_to_the_drr_and_lift_the_nodule_out_of_the_vessels(chest):
    """drr_slabs=3: three anterior-to-posterior slabs of the lung field that add up to the lung-field DRR (which they
    leave unchanged); the nodule stands out more in its own slab than in the whole DRR, where the other slabs' vessels overlap it."""
    from data_prep.ops.drr_projector import slab_bounds

    hu, parts, field, sp = chest
    nodule = parts["nodule"].astype(np.uint8)
    lungs = (parts["lungs"] | parts["nodule"]).astype(np.uint8)
    geometry = DrrGeometry(size=128, detector_mm=300.0)
    plain = render_case_arrays(hu, nodule, lungs, sp, _params(poses=1, geometry=geometry, drr_region="lungs"))[0]
    res = render_case_arrays(
        hu, nodule, lungs, sp, _params(poses=1, geometry=geometry, drr_region="lungs", drr_slabs=3)
    )[0]
    assert plain["drr_slabs"] == [] and len(res["drr_slabs"]) == 3
    assert np.array_equal(res["drr"], plain["drr"])
    total = np.sum(res["drr_slabs"], axis=0)
    unclipped = res["drr"] < 0.99
    assert np.abs(total - res["drr"])[unclipped].max() < 1e-4
    assert all(s.max() > 0.1 and s.dtype == np.float32 for s in res["drr_slabs"])
    bounds = slab_bounds(field, 3)
    ys = np.nonzero(field.any(axis=(0, 2)))[0]
    assert (
        bounds[0][0] == 0 and bounds[-1][1] == hu.shape[1] and [b for _, b in bounds[:-1]] == [a for a, _ in bounds[1:]]
    )
    inner = [b for _, b in bounds[:-1]]
    assert ys.min() < inner[0] < inner[1] < ys.max()  # equal thirds of the field's depth
    own = int(np.searchsorted(inner, np.nonzero(nodule.any(axis=(0, 2)))[0].mean(), side="right"))
    m = res["nodules"] > 0
    assert _contrast(res["drr_slabs"][own], m) > _contrast(res["drr"], m) + 0.3
    with pytest.raises(ValueError, match="drr_slabs must be 0"):
        DrrParams(drr_slabs=-1)


def test_step_writes_slab_files_and_datalist_keys(prepared, tmp_path):
    """--drr-slabs 2: images/drr_slab0/1 per sample, their keys in the datalist; merge makes them absolute like the others."""
    out = tmp_path / "drr"
    assert main(["drr", "--prepared", str(prepared), "--out", str(out), "--drr-slabs", "2", *ARGS]) == 0
    e = json.loads((out / "datalist.json").read_text())["training"][0]
    assert e["drr_slab0"] == "images/drr_slab0/C1_p0.nii.gz" and e["drr_slab1"] == "images/drr_slab1/C1_p0.nii.gz"
    drr = sitk.GetArrayFromImage(sitk.ReadImage(str(out / e["drr"])))
    slabs = [sitk.GetArrayFromImage(sitk.ReadImage(str(out / e[f"drr_slab{j}"]))) for j in range(2)]
    assert all(s.shape == (64, 64) and s.dtype == np.float32 for s in slabs)
    ok = drr < 0.99
    assert np.abs(slabs[0] + slabs[1] - drr)[ok].max() < 1e-4 and slabs[0].max() > 0 and slabs[1].max() > 0
    assert json.loads((out / "manifest.json").read_text())["parameters"]["drr_slabs"] == 2
    merged = tmp_path / "merged"
    assert main(["merge", "--inputs", str(out), "--out", str(merged)]) == 0
    m = json.loads((merged / "datalist.json").read_text())["training"][0]
    assert m["drr_slab1"] == str(out / "images/drr_slab1/C1_p0.nii.gz")

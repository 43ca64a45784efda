"""Tests for data_prep.io.dicom_index: series discovery under any layout, skipping what is not CT."""

from __future__ import annotations

import shutil

import pytest

from data_prep.io.dicom_index import index_dicom
from tests.conftest import SAMPLE_SERIES


def test_tcia_layout_of_real_sample(sample_root):
    """The real sample's three series are found with all their slices; the XML reads are skipped."""
    index = index_dicom(sample_root)
    assert set(index.series) == set(SAMPLE_SERIES.values())
    counts = {s.patient_id: len(s.files) for s in index.series.values()}
    assert counts == {"LIDC-IDRI-0001": 16, "LIDC-IDRI-0002": 12, "LIDC-IDRI-0003": 11}
    assert all(not p.endswith(".xml") for s in index.series.values() for p in s.files)


def test_nbia_and_flat_layouts_give_the_same_series(sample_root, tmp_path):
    """The newer NBIA folder names and a flat folder index to the same series and files per series."""
    reference = index_dicom(sample_root)
    nbia, flat = tmp_path / "nbia", tmp_path / "flat"
    for n, info in enumerate(reference.series.values()):
        series_dir = nbia / info.patient_id / "01-01-2000-NA-NA-30178" / f"300056{n}.000000-NA-03192"
        series_dir.mkdir(parents=True)
        flat.mkdir(exist_ok=True)
        for i, f in enumerate(sorted(info.files)):
            shutil.copy(f, series_dir / f"1-{i + 1:03d}.dcm")
            shutil.copy(f, flat / f"{n}-{i:03d}")  # no suffix at all
    for root in (nbia, flat):
        index = index_dicom(root, workers=2)
        assert {u: len(s.files) for u, s in index.series.items()} == {u: len(s.files) for u, s in reference.series.items()}


def test_skips_localizers_non_ct_corrupt_and_non_dicom(make_series, tmp_path):
    """Localizers, MR, SR-like objects, truncated and non-DICOM files are skipped, each with a reason."""
    ct = make_series("ct", n=3)
    make_series("scout", n=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    make_series("mr", n=2, modality="MR")
    make_series("sr", n=1, modality="SR")
    bad = tmp_path / "ct" / "broken.dcm"
    bad.write_bytes(ct[0].read_bytes()[:200])
    (tmp_path / "ct" / "069.xml").write_text("<LidcReadMessage/>")
    (tmp_path / "notes").write_text("hello")
    index = index_dicom(tmp_path)
    assert len(index.series) == 1
    (series,) = index.series.values()
    assert sorted(series.files) == sorted(str(f) for f in ct)
    reasons = dict(index.skipped)
    assert "localizer" in reasons[str(tmp_path / "scout" / "000.dcm")]
    assert "not CT" in reasons[str(tmp_path / "mr" / "000.dcm")]
    assert "not CT" in reasons[str(tmp_path / "sr" / "000.dcm")]
    assert str(bad) in reasons and str(tmp_path / "notes") in reasons
    assert str(tmp_path / "ct" / "069.xml") not in {p for s in index.series.values() for p in s.files}


def test_patient_filter_and_missing_root(sample_root, tmp_path):
    """Only the requested patients are returned; a missing root is a clear error."""
    index = index_dicom(sample_root, patients=["LIDC-IDRI-0003"])
    assert [s.patient_id for s in index.series.values()] == ["LIDC-IDRI-0003"]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        index_dicom(tmp_path / "nope")

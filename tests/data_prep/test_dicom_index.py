"""Tests for data_prep.io.dicom_index: series discovery under any layout, skipping what is not CT."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from data_prep.io.dicom_index import index_dicom
from tests.conftest import SAMPLE_SERIES, write_ct_slice
from tests.data_prep.conftest import make_unreadable, run_unprivileged


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
        assert {u: len(s.files) for u, s in index.series.items()} == {
            u: len(s.files) for u, s in reference.series.items()
        }


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


def _series(folder, n=4, uid="1.2.826.0.1.3680043.8.498.77", patient="TEST-0001"):
    return [write_ct_slice(folder / f"{i:03d}.dcm", np.full((16, 16), i, np.int16), float(i), series_uid=uid,
                           patient_id=patient, instance=i + 1) for i in range(n)]  # fmt: skip


def test_symlinked_patient_folder_is_indexed_once(open_tmp):
    """A patient folder that is a symbolic link is followed; a link back up the tree lists no file twice."""
    store, root = open_tmp / "store", open_tmp / "root"
    files = _series(store / "LIDC-IDRI-0001" / "study" / "series")
    root.mkdir()
    (root / "LIDC-IDRI-0001").symlink_to(store / "LIDC-IDRI-0001", target_is_directory=True)
    (root / "LIDC-IDRI-0001" / "study" / "loop").symlink_to(root, target_is_directory=True)
    index = index_dicom(root)
    (series,) = index.series.values()
    assert len(series.files) == len(files) and not index.folder_errors and not series.damaged


def test_unreadable_folder_and_slice_are_reported_not_dropped(open_tmp):
    """For an ordinary user: a folder that cannot be listed is reported, an unreadable slice damages its series."""
    ok = _series(open_tmp / "LIDC-IDRI-0001" / "s", uid="1.2.3.1", patient="LIDC-IDRI-0001")
    _series(open_tmp / "LIDC-IDRI-0002" / "s", uid="1.2.3.2", patient="LIDC-IDRI-0002")
    index_dicom(open_tmp)  # warm up lazy imports before the fork
    make_unreadable(open_tmp / "LIDC-IDRI-0002")
    make_unreadable(ok[2])
    index = run_unprivileged(lambda: index_dicom(open_tmp))
    assert index.folder_errors == [(str(open_tmp / "LIDC-IDRI-0002"), "cannot read folder (Permission denied)")]
    (series,) = index.series.values()
    assert series.damaged == ((str(ok[2]), "cannot be read (Permission denied)"),)
    assert str(ok[2]) not in series.files


@pytest.mark.parametrize("where", [1, 3])
@pytest.mark.parametrize("damage", ["header overwritten", "cut to 600 bytes", "cut in the pixels", "no Modality"])
def test_damaged_slice_damages_its_series_non_dicom_is_only_skipped(tmp_path, damage, where):
    """A corrupt slice (middle or top) is reported with its series; README, XML and other non-DICOM are skipped."""
    files = _series(tmp_path / "LIDC-IDRI-0001" / "series")
    bad = files[where]
    data = bytearray(bad.read_bytes())
    if damage == "header overwritten":
        data[100:400] = b"\xff" * 300
    elif damage == "no Modality":
        data[:] = data.replace(b"CT", b"\0\0", 1)
    keep = {"cut to 600 bytes": 600, "cut in the pixels": len(data) - 100}.get(damage, len(data))
    bad.write_bytes(bytes(data[:keep]))
    (tmp_path / "README").write_text("LIDC-IDRI download\n")
    (tmp_path / "LIDC-IDRI-0001" / "series" / "069.xml").write_text("<LidcReadMessage/>")
    (tmp_path / "LIDC-IDRI-0001" / "series" / "notes").write_text("scanned twice")
    index = index_dicom(tmp_path)
    (series,) = index.series.values()
    assert [p for p, _ in series.damaged] == [str(bad)], series.damaged
    assert sorted(series.files) == sorted(str(f) for f in files if f != bad)
    reasons = dict(index.skipped)
    notes = tmp_path / "LIDC-IDRI-0001" / "series" / "notes"
    assert reasons[str(tmp_path / "README")] == reasons[str(notes)] == "not a DICOM file"
    assert not index.damaged

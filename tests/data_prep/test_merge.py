"""Tests for data_prep.steps.merge: several prepared folders -> one datalist and nodules.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from data_prep.__main__ import main
from data_prep.io.writers import OutputError
from data_prep.steps.merge import EXTRA_FOLD, merge_prepared


def _prepared(folder: Path, cases: list[tuple[str, str, int]], nodules: dict[str, int]) -> Path:
    """A minimal prepared folder: datalist with relative paths, empty image files, nodules.csv."""
    (folder / "images").mkdir(parents=True)
    entries = []
    for case, patient, fold in cases:
        (folder / "images" / f"{case}.nii.gz").write_bytes(b"")
        entries.append(
            {
                "case_id": case,
                "patient_id": patient,
                "fold": fold,
                "image": f"images/{case}.nii.gz",
                "label": f"labels/{case}.nii.gz",
            }
        )
    (folder / "datalist.json").write_text(json.dumps({"training": entries}))
    with open(folder / "nodules.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "label", "diameter_mm"])
        for case, n in nodules.items():
            for k in range(1, n + 1):
                w.writerow([case, k, 5.0 + k])
    return folder


def test_merge_keeps_folds_marks_extras_training_only_and_drops_duplicate_and_excluded_patients(tmp_path):
    """Inputs keep their folds, extras get fold -1, a patient already merged or in the test set is left
    out with its nodule rows, and every path is absolute and points at the input's file."""
    base = _prepared(tmp_path / "base", [("c1", "P1", 0), ("c2", "P2", 1), ("c2b", "P2", 1)], {"c1": 1, "c2": 2})
    extra = _prepared(
        tmp_path / "extra", [("c3", "P3", 0), ("c1x", "P1", 2), ("c4", "P4", 3)], {"c3": 1, "c1x": 3, "c4": 1}
    )
    test = _prepared(tmp_path / "test", [("t4", "P4", 0)], {})
    summary = merge_prepared([base], tmp_path / "out", extra=[extra], exclude=[test])
    dl = json.loads((tmp_path / "out" / "datalist.json").read_text())["training"]
    folds = {e["case_id"]: e["fold"] for e in dl}
    assert folds == {"c1": 0, "c2": 1, "c2b": 1, "c3": EXTRA_FOLD}  # c1x: P1 already merged; c4: P4 in the test set
    assert all(Path(e["image"]).is_absolute() and Path(e["image"]).is_file() for e in dl)
    assert Path(next(e for e in dl if e["case_id"] == "c3")["image"]).parent.parent == (tmp_path / "extra").resolve()
    with open(tmp_path / "out" / "nodules.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case_id"] for r in rows) == ["c1", "c2", "c2", "c3"]
    assert summary == {"cases": 4, "patients": 3, "nodule_rows": 4, "excluded": 1, "duplicate_patient": 1}


def test_merge_refuses_bad_folders_with_their_names(tmp_path, capsys):
    """A folder without a datalist, a folder given twice, or an output that is also an input, is refused naming the folder (CLI exit 2)."""
    base = _prepared(tmp_path / "base", [("c1", "P1", 0)], {"c1": 1})
    with pytest.raises(OutputError, match="nowhere: no datalist.json"):
        merge_prepared([base, tmp_path / "nowhere"], tmp_path / "out")
    with pytest.raises(OutputError, match="also an input"):
        merge_prepared([base], base)
    with pytest.raises(OutputError, match="base is given more than once"):
        merge_prepared([base], tmp_path / "out", extra=[tmp_path / "base"])
    assert main(["merge", "--inputs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "nowhere: no datalist.json" in capsys.readouterr().err
    assert main(["merge", "--inputs", str(base), "--out", str(tmp_path / "out2")]) == 0
    assert json.loads((tmp_path / "out2" / "datalist.json").read_text())["numTraining"] == 1

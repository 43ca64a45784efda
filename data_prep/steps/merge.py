"""The ``merge`` step: several prepared folders -> one datalist (absolute paths) and one nodules.csv.

Typical uses: LUNA16 subsets or LIDC batches prepared separately, or a larger training world next
to a fixed validation fold. Nothing is copied; the merged ``datalist.json`` points at the files of
the input folders.

Rules:
- ``inputs`` keep their folds. ``extra`` folders are training-only: their cases get fold -1, which
  no ``val_fold`` of the bundles selects (any fold other than the validation fold trains).
- A patient is kept from the first folder it appears in (``inputs`` first, then ``extra``); its scans
  in later folders are left out, so no patient is on both sides of a split.
- Patients of the ``exclude`` folders (an independent test set, say) are left out everywhere.
- ``nodules.csv`` rows of the kept cases are concatenated (columns: the union, in first-seen order).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from data_prep.io.writers import OutputError, prepare_out_dir, write_csv, write_json

__all__ = ["merge_prepared", "EXTRA_FOLD"]

EXTRA_FOLD = -1


def _datalist(folder: Path) -> list[dict]:
    path = folder / "datalist.json"
    if not path.is_file():
        raise OutputError(f"{folder}: no datalist.json; pass folders written by a data_prep step (lidc, luna16, drr)")
    try:
        entries = json.loads(path.read_text()).get("training")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise OutputError(f"{path}: not a datalist ({exc})") from exc
    if not isinstance(entries, list):
        raise OutputError(f"{path}: no 'training' list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "patient_id" not in e or "case_id" not in e:
            raise OutputError(f"{path}: entry {i} has no patient_id / case_id")
    return entries


def _absolute(entry: dict, folder: Path) -> dict:
    out = dict(entry)
    for key, value in entry.items():
        if (
            (key in ("image", "label", "lung", "xray", "drr") or key.startswith("drr_slab"))
            and isinstance(value, str)
            and not Path(value).is_absolute()
        ):
            out[key] = str((folder / value).resolve())
    return out


def merge_prepared(
    inputs: Sequence[str | Path], out: str | Path, *, extra: Sequence[str | Path] = (),
    exclude: Sequence[str | Path] = (),
) -> dict:  # fmt: skip
    """Merge prepared folders (see the module docstring); returns a summary dict.

    Raises:
        OutputError: a folder without a readable datalist, a folder given twice, an output folder
            that is one of the inputs, or nothing left to merge.
    """
    out = Path(out)
    folders = [(Path(f), False) for f in inputs] + [(Path(f), True) for f in extra]
    if not folders:
        raise OutputError("merge: give at least one prepared folder")
    resolved = [f.resolve() for f, _ in folders]
    for (f, _), r in zip(folders, resolved):
        if r == out.resolve():
            raise OutputError(f"merge: the output folder {out} is also an input; write the merge elsewhere")
        if resolved.count(r) > 1:
            raise OutputError(f"merge: {f} is given more than once (its cases would be listed twice)")
    excluded = {str(e["patient_id"]) for f in exclude for e in _datalist(Path(f))}
    seen: dict[str, Path] = {}
    entries, kept_cases, dropped = [], {}, {"excluded": 0, "duplicate_patient": 0}
    for folder, is_extra in folders:
        mine = set()
        for e in _datalist(folder):
            pid = str(e["patient_id"])
            if pid in excluded:
                dropped["excluded"] += 1
                continue
            if pid in seen and seen[pid] != folder:
                dropped["duplicate_patient"] += 1
                continue
            seen[pid] = folder
            mine.add(str(e["case_id"]))
            item = _absolute(e, folder)
            if is_extra:
                item["fold"] = EXTRA_FOLD
            entries.append(item)
        kept_cases[folder] = mine
    if not entries:
        raise OutputError("merge: no case left (every patient excluded?)")
    rows, columns = [], []
    for folder, cases in kept_cases.items():
        path = folder / "nodules.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns += [c for c in reader.fieldnames or [] if c not in columns]
            rows += [r for r in reader if r.get("case_id") in cases]
    prepare_out_dir(out)
    if columns:
        write_csv(rows, columns, out / "nodules.csv")
    description = (f"merged by data_prep merge: {', '.join(str(f) for f in inputs)}"
                   + (f"; training-only (fold {EXTRA_FOLD}): {', '.join(str(f) for f in extra)}" if extra else "")
                   + (f"; patients of {', '.join(str(f) for f in exclude)} left out" if exclude else ""))  # fmt: skip
    write_json({"description": description, "numTraining": len(entries), "training": entries}, out / "datalist.json")
    return {"cases": len(entries), "patients": len(seen), "nodule_rows": len(rows), **dropped}

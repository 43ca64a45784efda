"""LUNA16's ``annotations.csv``: one row per nodule (seriesuid, world x, y, z mm and diameter mm), checked."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ANNOTATION_COLUMNS", "Annotation", "read_annotations"]

ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")


@dataclass(frozen=True)
class Annotation:
    """One row of ``annotations.csv``: ``row`` is its 1-based data row (file line ``line``)."""

    row: int
    line: int
    seriesuid: str
    x: float
    y: float
    z: float
    diameter_mm: float


def read_annotations(csv_path: str | Path) -> list[Annotation]:
    """Read and check LUNA16's ``annotations.csv`` (world x, y, z mm and diameter mm per nodule).

    Args:
        csv_path: the CSV file (extra columns are ignored).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: missing columns (named), an empty seriesuid, a non-numeric or non-finite
            value, or a diameter <= 0, naming the file, the row and the line.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"annotations CSV {path} not found")
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        found = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ANNOTATION_COLUMNS if c not in found]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(found) or 'none'}); "
                f"LUNA16's annotations.csv has {','.join(ANNOTATION_COLUMNS)}"
            )
        reader.fieldnames = found
        for n, rec in enumerate(reader, start=1):
            where = f"{path}: row {n} (line {reader.line_num})"
            uid = (rec.get("seriesuid") or "").strip()
            if not uid:
                raise ValueError(f"{where}: empty seriesuid")
            values = []
            for col in ANNOTATION_COLUMNS[1:]:
                text = (rec.get(col) or "").strip()
                try:
                    v = float(text)
                except ValueError:
                    raise ValueError(f"{where}: {col} = {text!r} is not a number") from None
                if not math.isfinite(v):
                    raise ValueError(f"{where}: {col} = {text!r} is not finite")
                values.append(v)
            if values[3] <= 0:
                raise ValueError(f"{where}: diameter_mm = {values[3]} must be positive")
            out.append(Annotation(n, reader.line_num, uid, *values))
    return out

"""Read what the bundles and steps wrote (CSV files, datalists) into report tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from showcase.report import Table

__all__ = ["csv_table", "read_rows", "held_out"]


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file (comma or tab separated, sniffed) as dicts."""
    text = Path(path).read_text()
    delimiter = "\t" if text.split("\n", 1)[0].count("\t") > text.split("\n", 1)[0].count(",") else ","
    return list(csv.DictReader(text.splitlines(), delimiter=delimiter))


def _number(value: str) -> object:
    try:
        return float(value) if any(c in value for c in ".enai") else int(value)
    except (TypeError, ValueError):
        return value


def csv_table(
    path: str | Path, caption: str, columns: list[str] | None = None, max_rows: int = 30, shorten: tuple[str, ...] = ()
) -> Table:
    """A report table from a CSV file; numeric cells stay numbers; ``shorten`` columns keep their file name only.

    Raises:
        FileNotFoundError: the file is missing (the stage that writes it did not run).
    """
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path} has no rows")
    cols = columns or list(rows[0].keys())
    body = []
    for r in rows[:max_rows]:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(Path(v).name.replace(".nii.gz", "") if c in shorten and v else _number(v))
        body.append(cells)
    return Table(caption + (f" (first {max_rows} of {len(rows)})" if len(rows) > max_rows else ""), cols, body)


def held_out(datalist: str | Path, fold: int = 0, key: str = "training") -> list[dict]:
    """The items of ``fold`` in a data_prep datalist (paths made absolute)."""
    root = Path(datalist).parent
    items = json.loads(Path(datalist).read_text())[key]
    out = []
    for it in items:
        if int(it.get("fold", -1)) == fold:
            out.append({k: str(root / v) if isinstance(v, str) and (root / v).exists() else v for k, v in it.items()})
    return out

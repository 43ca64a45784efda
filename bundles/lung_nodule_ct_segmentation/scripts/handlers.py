"""Ignite handlers: nodule evaluation (Dice per nodule, FROC/CPM, CSVs) and the inference tables (nodules, scans)."""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import MetaTensor
from monai.utils import min_version, optional_import

from .detection import FP_RATES, candidates, froc, local_dice, match_case, reference_nodules
from .inputs import input_id
from .transforms import NODULE_COLUMNS, NON_FINITE_KEY, source_name, to_numpy, voxel_spacing, voxel_to_world_lps

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
try:
    import fcntl
except ImportError:  # Windows: tables are written without a folder lock
    fcntl = None

__all__ = ["NoduleEvaluationHandler", "NoduleTableWriter", "TableError", "case_name", "read_table", "replace_rows"]

SCAN_COLUMNS = ("case_id", "input", "nodules", "non_finite_voxels")

logger = logging.getLogger(__name__)


def case_name(item: dict, key: str = "pred") -> str:
    """Case id of an output item: its datalist ``case_id``, else its input's name (:func:`scripts.inputs.input_id`)."""
    if item.get("case_id"):
        return str(item["case_id"])
    return input_id(source_name(item, key))


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r)) if rows else ["case_id"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


class NoduleEvaluationHandler:
    """Per-nodule Dice and LUNA16 detection over an evaluator's epoch; writes three CSVs.

    Each output item needs ``pred`` (post-processed 0/1 mask ``(1, H, W, D)``), ``prob``
    (probability ``(1, H, W, D)``) and ``label`` (instance label map ``(1, H, W, D)``, ``k`` =
    nodule ``k``) on one grid. Writes under ``output_dir``: ``metrics.csv`` (one row: scans, nodules,
    scan-level Dice, mean per-nodule Dice overall and for nodules >= ``large_mm``, sensitivities at
    1/8..8 FP per scan, CPM), ``nodule_metrics.csv`` (one row per reference nodule) and
    ``candidates.csv`` (one row per candidate), and puts the numbers in ``engine.state.metrics``.

    Args:
        output_dir: folder for the CSVs.
        candidate_threshold: probability above which components become detection candidates.
            Default 0.2.
        min_volume_mm3: candidates smaller than this are dropped. Default 5.0.
        large_mm: diameter (mm) from which nodules count as "large" for ``dice_ge_large``. Default 5.0.
        prefix: file-name prefix. Default "".
    """

    def __init__(
        self,
        output_dir: str,
        candidate_threshold: float = 0.2,
        min_volume_mm3: float = 5.0,
        large_mm: float = 5.0,
        prefix: str = "",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.candidate_threshold = float(candidate_threshold)
        self.min_volume_mm3 = float(min_volume_mm3)
        self.large_mm = float(large_mm)
        self.prefix = prefix
        self.reset()

    def reset(self) -> None:
        self.nodule_rows: list[dict] = []
        self.candidate_rows: list[dict] = []
        self.scan_dice: list[float] = []
        self.n_scans = 0

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine) -> None:
        for item in engine.state.output:
            self.add_case(item)

    def add_case(self, item: dict) -> None:
        """Score one scan (an output item as described in the class docstring)."""
        case = case_name(item, "label")
        spacing = voxel_spacing(item["pred"])
        pred = to_numpy(item["pred"])[0] > 0
        prob = to_numpy(item["prob"])[0].astype(np.float32)
        label = np.rint(to_numpy(item["label"])[0]).astype(np.int32)
        if pred.shape != label.shape:
            raise ValueError(f"{case}: prediction {pred.shape} and label {label.shape} are not on one grid")
        ref = label > 0
        denom = ref.sum() + pred.sum()
        self.scan_dice.append(float(2 * (ref & pred).sum() / denom) if denom else 1.0)
        nodules = reference_nodules(label, spacing)
        cands = candidates(prob, self.candidate_threshold, spacing, self.min_volume_mm3)
        match_case(nodules, cands, spacing)
        self.n_scans += 1
        for nod in nodules:
            margin = int(math.ceil(max(3.0, nod["diameter_mm"] / 2) / float(min(spacing))))
            x, y, z = voxel_to_world_lps(item["label"], nod["centre"])
            self.nodule_rows.append({
                "case_id": case, "label": nod["label"], "centre_x_mm": round(x, 2), "centre_y_mm": round(y, 2),
                "centre_z_mm": round(z, 2), "diameter_mm": round(nod["diameter_mm"], 2), "voxels": nod["voxels"],
                "dice": round(local_dice(label, pred, nod["label"], margin), 4), "detected": nod["score"] is not None,
                "score": None if nod["score"] is None else round(nod["score"], 4),
            })  # fmt: skip
        for c in cands:
            x, y, z = voxel_to_world_lps(item["label"], c["centre"])
            self.candidate_rows.append(
                {
                    "case_id": case,
                    "centre_x_mm": round(x, 2),
                    "centre_y_mm": round(y, 2),
                    "centre_z_mm": round(z, 2),
                    "volume_mm3": round(c["volume_mm3"], 1),
                    "score": round(c["score"], 4),
                    "max_probability": round(c["max_prob"], 4),
                    "hit_label": c["nodule"],
                }
            )

    def summary(self) -> dict:
        """The ``metrics.csv`` row of the scans added so far."""
        dices = [r["dice"] for r in self.nodule_rows]
        large = [r["dice"] for r in self.nodule_rows if r["diameter_mm"] >= self.large_mm]
        det = froc(
            [r["score"] for r in self.nodule_rows],
            [c["score"] for c in self.candidate_rows if c["hit_label"] == 0],
            self.n_scans,
            FP_RATES,
        )
        nan = float("nan")
        return {
            "scans": self.n_scans,
            "nodules": len(dices),
            f"nodules_ge_{self.large_mm:g}mm": len(large),
            "scan_dice": float(np.mean(self.scan_dice)) if self.scan_dice else nan,
            "nodule_dice": float(np.mean(dices)) if dices else nan,
            f"nodule_dice_ge_{self.large_mm:g}mm": float(np.mean(large)) if large else nan,
            "false_positives_per_scan": (
                sum(1 for c in self.candidate_rows if c["hit_label"] == 0) / max(self.n_scans, 1)
            ),
            **det,
        }

    def epoch_completed(self, engine) -> None:
        row = self.summary()
        _write_csv(self.output_dir / f"{self.prefix}metrics.csv", [row])
        _write_csv(self.output_dir / f"{self.prefix}nodule_metrics.csv", self.nodule_rows)
        _write_csv(self.output_dir / f"{self.prefix}candidates.csv", self.candidate_rows)
        engine.state.metrics.update({k: v for k, v in row.items() if isinstance(v, float)})
        logger.info(
            "nodule evaluation: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )


class TableError(SystemExit):
    """An output table that this bundle would not update (not one of its tables); one line naming the file.

    A ``SystemExit`` with a message (as ``scripts.inputs.InputsFailedError``): ``python -m monai.bundle
    run`` prints the line and exits with status 1, without a traceback.
    """


class _FolderLock:
    """An exclusive ``flock`` on a folder while a table in it is read and replaced (no lock file is left).

    Two runs writing into one ``--output_dir`` at once then add their rows one after the other instead of
    one replacing the other's. No-op where ``fcntl`` is missing (Windows).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd: int | None = None

    def __enter__(self) -> _FolderLock:
        if fcntl is not None:
            self.fd = os.open(self.folder, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def read_table(path: Path, key: str = "case_id") -> tuple[list[str], list[dict]]:
    """Header and rows of a CSV table of this bundle (empty if there is none).

    Raises:
        TableError: the file exists but is not such a table (no ``key`` column, or not text).
    """
    if not path.is_file():
        return [], []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TableError(
            f"{path}: cannot be read as a table ({type(exc).__name__}: {exc}); move it or choose another --output_dir"
        ) from None
    if key not in header:
        raise TableError(
            f"{path}: exists but is not a table of this bundle (no {key!r} column); "
            "move it or choose another --output_dir"
        )
    return header, rows


def replace_rows(path: Path, columns: Sequence[str], case: str, rows: list[dict], key: str = "case_id") -> None:
    """Put ``rows`` in the table at ``path`` in place of the rows of ``case``; the other rows stay.

    The header is ``columns`` followed by any other column the file has. The new table is written to a
    temporary file beside it and renamed over it (atomic: a killed run leaves the old table or the new
    one, never a part), under a lock on the folder (two runs into one folder keep each other's rows).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _FolderLock(path.parent):
        header, old = read_table(path, key)
        fields = list(dict.fromkeys([*columns, *header]))
        kept = [r for r in old if r.get(key) != case]
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run (only the lock holder writes one)
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", newline="") as f:  # mode from the umask, as any other output
                w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
                w.writeheader()
                w.writerows(kept)
                w.writerows(rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


class NoduleTableWriter:
    """Add each output item's nodules (``NoduleTabled``) to ``<output_dir>/nodules.csv``, the scan to ``scans.csv``.

    ``nodules.csv``: a row per nodule, ``case_id`` (the input's name) then ``NODULE_COLUMNS``; its header
    is complete even when no nodule was found. ``scans.csv``: a row per scan processed, ``case_id``,
    ``input`` (its path), ``nodules`` (how many, 0 included) and ``non_finite_voxels`` (NaN or infinite
    voxels read as air). Both tables keep the rows of earlier runs into the same folder: the rows of a
    case are replaced when an input of that name is processed again (as its mask is), never appended
    twice. Each scan's rows are written as soon as its mask is, atomically (:func:`replace_rows`).

    Args:
        output_dir: folder of the tables.
        filename: nodule table file name. Default "nodules.csv".
        table_key: item key holding the nodule rows. Default "nodules".
        scans_filename: scan table file name. Default "scans.csv".

    Raises:
        TableError: when made, if a table already in ``output_dir`` is not one of this bundle's.
    """

    def __init__(
        self, output_dir: str, filename: str = "nodules.csv", table_key: str = "nodules",
        scans_filename: str = "scans.csv",
    ) -> None:  # fmt: skip
        self.path = Path(output_dir) / filename
        self.scans_path = Path(output_dir) / scans_filename
        self.table_key = table_key
        self.rows: list[dict] = []
        for path in (self.path, self.scans_path):  # refuse before anything runs, not after the first scan
            read_table(path)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def iteration_completed(self, engine) -> None:
        for item in engine.state.output:
            case = case_name(item, "image")
            rows = [{"case_id": case, **r} for r in item.get(self.table_key, [])]
            self.rows.extend(rows)
            replace_rows(self.path, ("case_id", *NODULE_COLUMNS), case, rows)
            image = item.get("image")
            meta = image.meta if isinstance(image, MetaTensor) else {}
            scan = {
                "case_id": case, "input": source_name(item, "image"), "nodules": len(rows),
                "non_finite_voxels": int(meta.get(NON_FINITE_KEY, 0)),
            }  # fmt: skip
            replace_rows(self.scans_path, SCAN_COLUMNS, case, [scan])

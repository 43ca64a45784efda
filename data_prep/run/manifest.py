"""``manifest.json`` (what a step ran on, with which settings, one status record per case) and that record."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from data_prep.io.writers import OutputError, check_gzip, file_stamp, write_json

__all__ = ["Manifest", "CaseRecord"]


class Manifest:
    """``manifest.json``: inputs, parameters, versions and one status record per case.

    It is rewritten atomically after every case, so it always describes what is on disk.
    A folder holds the outputs of one step, one set of parameters and one set of inputs: a rerun with
    other parameters or other ``sources`` is refused (``OutputError``), never mixed in.

    Args:
        path: the manifest file.
        step: the data_prep step name.
        parameters: parameters that change outputs; a rerun with other values is refused.
        sources: where the inputs come from (``{"dicom_root": "/data/LIDC-IDRI"}``), compared with the
            same keys of the old manifest's ``inputs``; a rerun from other inputs is refused. The step
            writes them into ``data["inputs"]``. Default none.

    Raises:
        OutputError: ``path`` exists but is no readable manifest, or holds a run of another step,
            other parameters or other sources (the message names the folder and the difference).
    """

    def __init__(self, path: str | Path, step: str, parameters: dict, sources: dict | None = None):
        self.path = Path(path)
        self.data: dict = {
            "step": step,
            "parameters": parameters,
            "inputs": {},
            "versions": {},
            "cases": {},
            "errors": [],
        }
        self.redone: dict[str, str] = {}
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
                if not isinstance(old, dict) or not isinstance(old.get("cases", {}), dict):
                    raise ValueError("not a JSON object with a 'cases' object")
            except (OSError, ValueError) as exc:
                raise OutputError(f"{self.path} exists but is not a readable manifest ({exc}); move it away") from exc
            if old.get("step") != step or old.get("parameters") != parameters:
                raise OutputError(
                    f"{self.path.parent} holds a '{old.get('step')}' run with parameters {old.get('parameters')}; "
                    f"this run has {parameters}. Use another --out (outputs of different settings never mix)."
                )
            old_inputs = old.get("inputs") if isinstance(old.get("inputs"), dict) else {}
            for key, value in (sources or {}).items():
                if key in old_inputs and old_inputs[key] != value:
                    raise OutputError(
                        f"{self.path.parent} holds a '{step}' run of {key} {old_inputs[key]}; this run reads {value}. "
                        "Use another --out (outputs of different inputs never mix), or move the old folder away."
                    )
            self.data["cases"] = old.get("cases", {})

    def finished(self, case_id: str, root: Path) -> bool:
        """True when the case succeeded before and all its files are still there, unchanged.

        Files are checked against the size and SHA-256 recorded when they were written (``stamps``);
        records without stamps (older manifests) get their ``.gz`` files read through instead. A case
        whose files are missing or damaged is done again (the reason goes into its new record's warnings).
        """
        rec = self.data["cases"].get(case_id)
        if not (rec and rec.get("status") == "ok"):
            return False
        stamps = rec.get("stamps") or {}
        for rel in rec.get("files", {}).values():
            path = Path(root) / rel
            problem = None
            if not path.exists():
                problem = "missing"
            elif rel in stamps:
                if path.stat().st_size != stamps[rel].get("bytes"):
                    problem = f"{path.stat().st_size} bytes, {stamps[rel].get('bytes')} when written"
                elif file_stamp(path)["sha256"] != stamps[rel].get("sha256"):
                    problem = "content differs from when it was written (SHA-256)"
            elif rel.endswith(".gz"):
                try:
                    check_gzip(path)
                except OutputError as exc:
                    problem = str(exc)
            if problem:
                self.redone[case_id] = f"{rel}: {problem}"
                return False
        return True

    def record(self, case_id: str, rec: dict) -> None:
        """Store a case record and rewrite the manifest."""
        if case_id in self.redone:
            rec.setdefault("warnings", []).append(f"prepared again: {self.redone.pop(case_id)}")
        self.data["cases"][case_id] = rec
        self.save()

    def save(self) -> None:
        """Rewrite the manifest atomically with a fresh summary."""
        statuses = [c.get("status") for c in self.data["cases"].values()]
        self.data["summary"] = {
            "ok": statuses.count("ok"),
            "failed": statuses.count("failed"),
            "errors": len(self.data["errors"]),
        }
        write_json(self.data, self.path)


class CaseRecord:
    """The manifest record of one case, filled in by a ``with`` block that never raises.

    ``with CaseRecord(series_uid=uid) as rec:`` starts ``rec`` as ``{"status": "failed", "error": None,
    "warnings": [], **fields}``; the block fills it in and sets ``status`` to ``"ok"`` when the case is done.
    An exception raised in the block fails the case instead of the run: its message becomes ``error`` (for
    the ``expected`` types, whose messages are written for the user), or ``"<type>: <message>"`` with the
    ``traceback`` kept (anything else). ``seconds`` is the block's time either way. ``KeyboardInterrupt``
    and other non-``Exception`` errors propagate.

    Args:
        expected: exception types whose message alone is the error. Default none.
        fields: the record's first fields (ids of the case), after status, error and warnings.
    """

    def __init__(self, *, expected: tuple[type[Exception], ...] = (), **fields):
        self.expected = expected
        self.record: dict = {"status": "failed", "error": None, "warnings": [], **fields}
        self._t0 = time.perf_counter()

    def __enter__(self) -> dict:
        self._t0 = time.perf_counter()
        return self.record

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and not issubclass(exc_type, Exception):
            return False
        if isinstance(exc, self.expected):
            self.record["error"] = str(exc)
        elif exc is not None:  # unexpected: keep the traceback for the report
            self.record["error"] = f"{type(exc).__name__}: {exc}"
            self.record["traceback"] = "".join(traceback.format_exception(exc_type, exc, tb, limit=6))
        self.record["seconds"] = round(time.perf_counter() - self._t0, 2)
        return True

    @staticmethod
    def failed(error: str) -> dict:
        """The record of a case that failed outside its ``with`` block (its worker process died, say)."""
        return {"status": "failed", "error": error, "warnings": []}

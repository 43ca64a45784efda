"""``manifest.json`` (what a step ran on, with which settings, one status record per case) and that record."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from data_prep.io.writers import OutputError, write_json

__all__ = ["Manifest", "CaseRecord"]


class Manifest:
    """``manifest.json``: inputs, parameters, versions and one status record per case.

    It is rewritten atomically after every case, so it always describes what is on disk.
    Args:
        path: the manifest file.
        step: the data_prep step name.
        parameters: parameters that change outputs; a rerun with other values is refused.
    """

    def __init__(self, path: str | Path, step: str, parameters: dict):
        self.path = Path(path)
        self.data: dict = {"step": step, "parameters": parameters, "inputs": {}, "versions": {}, "cases": {}, "errors": []}
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                raise OutputError(f"{self.path} exists but is not a readable manifest ({exc}); move it away") from exc
            if old.get("step") != step or old.get("parameters") != parameters:
                raise OutputError(
                    f"{self.path.parent} holds a '{old.get('step')}' run with parameters {old.get('parameters')}; "
                    f"this run has {parameters}. Use another --out (outputs of different settings never mix)."
                )
            self.data["cases"] = old.get("cases", {})

    def finished(self, case_id: str, root: Path) -> bool:
        """True when the case succeeded before and all its files are still there."""
        rec = self.data["cases"].get(case_id)
        return bool(rec and rec.get("status") == "ok" and all((root / f).exists() for f in rec.get("files", {}).values()))

    def record(self, case_id: str, rec: dict) -> None:
        """Store a case record and rewrite the manifest."""
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

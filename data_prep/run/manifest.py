"""``manifest.json``: what a step ran on, with which settings, and one status record per case."""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.io.writers import OutputError, write_json

__all__ = ["Manifest"]


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

"""Tests for data_prep.run.manifest: the one per-case record every step writes into manifest.json."""

from __future__ import annotations

import pytest

from data_prep.io.writers import OutputError
from data_prep.run.manifest import CaseRecord


def test_finished_block_keeps_its_record_and_time():
    """A block that sets status ok returns its fields, with error None, warnings and seconds."""
    with CaseRecord(series_uid="1.2.3") as rec:
        rec["warnings"].append("thin")
        rec.update(status="ok", files={"image": "images/a.nii.gz"})
    assert rec == {"status": "ok", "error": None, "warnings": ["thin"], "series_uid": "1.2.3",
                   "files": {"image": "images/a.nii.gz"}, "seconds": rec["seconds"]}  # fmt: skip
    assert rec["seconds"] >= 0


def test_expected_error_is_recorded_by_its_message_only():
    """An expected exception fails the case with its own message and no traceback; nothing is raised."""
    with CaseRecord(expected=(OutputError,), patient_id="P1") as rec:
        raise OutputError("cannot write x.nii.gz: No space left on device")
    assert (rec["status"], rec["patient_id"]) == ("failed", "P1")
    assert rec["error"] == "cannot write x.nii.gz: No space left on device"
    assert "traceback" not in rec and "seconds" in rec


def test_unexpected_error_keeps_its_type_and_traceback():
    """Any other exception fails the case as '<type>: <message>' with the traceback kept for the report."""
    with CaseRecord(expected=(OutputError,)) as rec:
        {}["image"]
    assert rec["status"] == "failed" and rec["error"] == "KeyError: 'image'"
    assert rec["traceback"].startswith("Traceback") and "KeyError" in rec["traceback"]


def test_interrupt_is_not_swallowed():
    """Ctrl-C inside a case stops the run instead of being recorded as a failed case."""
    with pytest.raises(KeyboardInterrupt):
        with CaseRecord():
            raise KeyboardInterrupt


def test_failed_outside_the_block_has_the_same_shape():
    """A case whose worker died gets the record fields every step writes (status, error, warnings)."""
    assert CaseRecord.failed("worker process died; rerun to retry") == {
        "status": "failed", "error": "worker process died; rerun to retry", "warnings": []}  # fmt: skip

"""Tests for data_prep.run.cases, the local runner: file stamps of finished cases, worker processes tied to the driver."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_prep.run.cases import run_cases
from data_prep.run.manifest import Manifest

REPO = Path(__file__).resolve().parents[2]

DRIVER = """
import os, sys, time
from pathlib import Path
from data_prep.run.cases import run_cases
from data_prep.run.manifest import Manifest

def slow_case(case_id, out):
    beat = Path(out) / f"{case_id}.{os.getpid()}.beat"
    for _ in range(600):  # 30 s of writing, unless the process is stopped
        beat.write_text(str(time.time()))
        time.sleep(0.05)
    return {"status": "ok", "warnings": []}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    run_cases(slow_case, [(f"c{i}", (f"c{i}", str(out))) for i in range(4)], Manifest(out / "manifest.json", "t", {}),
              workers=2, progress=False)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie waits for a parent that does not reap it: it runs no more


def _write_case(case_id: str, out: str) -> dict:
    (Path(out) / f"{case_id}.txt").write_text(f"{case_id}\n")
    return {"status": "ok", "warnings": [], "files": {"text": f"{case_id}.txt"}}


def test_finished_case_files_are_stamped_and_checked(tmp_path):
    """Each file of a finished case gets its size and SHA-256; a changed file makes the case unfinished with the reason."""
    manifest = Manifest(tmp_path / "manifest.json", "t", {})
    run_cases(_write_case, [("a", ("a", str(tmp_path))), ("b", ("b", str(tmp_path)))], manifest, progress=False)
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["cases"]["a"]["stamps"] == {"a.txt": {"bytes": 2, "sha256": hashlib.sha256(b"a\n").hexdigest()}}
    (tmp_path / "b.txt").write_text("B\n")  # same size, other content
    again = Manifest(tmp_path / "manifest.json", "t", {})
    assert again.finished("a", tmp_path) and not again.finished("b", tmp_path)
    assert again.redone == {"b": "b.txt: content differs from when it was written (SHA-256)"}


def test_workers_die_with_a_killed_driver(tmp_path):
    """kill -9 of the driver stops its worker processes within seconds: nothing goes on writing into the output."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    out = tmp_path / "out"
    out.mkdir()
    driver = subprocess.Popen([sys.executable, str(script), str(out)], env={**os.environ, "PYTHONPATH": str(REPO)})
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = {int(p.name.split(".")[1]) for p in out.glob("*.beat")}
            time.sleep(0.1)
        assert len(workers) == 2, "the workers never started"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "worker processes outlived the killed driver"
        beats = {p: p.stat().st_mtime_ns for p in out.glob("*.beat")}
        time.sleep(0.5)
        assert beats == {p: p.stat().st_mtime_ns for p in out.glob("*.beat")}, "something still writes"
    finally:
        for pid in workers:  # only the workers this test started, by their ids
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()

"""Run named stages one after the other: time each, keep going when one fails, log everything.

A stage is a Python callable; stages that run a command use :func:`run_command`, which streams the
command's output to a log file and echoes the lines that show progress.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["StageResult", "StageFailed", "StageRunner", "run_command"]

# Output lines worth echoing while a command runs (the rest goes to its log file only).
PROGRESS_LINE = re.compile(r"(Epoch\[\d+\] Complete|Key metric|best|: \d+ case\(s\)|synth-|error|Error|ERROR|saved|->)")


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; the message names the command and its log."""


@dataclass
class StageResult:
    name: str
    status: str = "pending"  # pending | ok | failed | skipped
    seconds: float = 0.0
    error: str = ""
    log: str = ""
    needs: list[str] = field(default_factory=list)


def run_command(
    cmd: Sequence[str],
    log_file: Path,
    cwd: Path | None = None,
    env: dict | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Run ``cmd``, writing all of its output to ``log_file`` and echoing progress lines.

    Args:
        cmd: the command and its arguments.
        log_file: file that receives stdout and stderr (appended).
        cwd: working folder. Default None (this process's).
        env: extra environment variables. Default None.
        echo: where progress lines go. Default ``print``.

    Raises:
        StageFailed: the command exited non-zero (the message holds the last lines of its output).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(map(str, cmd))}\n")
        log.flush()
        proc = subprocess.Popen(
            [str(c) for c in cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-15:]
            if PROGRESS_LINE.search(line):
                echo("      " + line.rstrip()[-160:])
        code = proc.wait()
    if code != 0:
        raise StageFailed(f"`{' '.join(map(str, cmd))}` exited with {code} (log: {log_file}):\n" + "\n".join(tail))


class StageRunner:
    """Runs stages in order; a failed stage is recorded and the stages that need it are skipped.

    Args:
        out: folder for ``stages.json`` and ``logs/``.
        echo: where progress goes. Default ``print``.
    """

    def __init__(self, out: Path, echo: Callable[[str], None] = print):
        self.out = Path(out)
        self.echo = echo
        self.results: dict[str, StageResult] = {}
        self.started = time.perf_counter()

    def log_file(self, name: str) -> Path:
        return self.out / "logs" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"

    def run(self, name: str, func: Callable[[Path], object], needs: Sequence[str] = ()) -> StageResult:
        """Run ``func(log_file)`` as stage ``name`` unless a stage it needs did not succeed."""
        res = StageResult(name, needs=list(needs), log=str(self.log_file(name).relative_to(self.out)))
        self.results[name] = res
        n = len(self.results)
        missing = [d for d in needs if self.results.get(d) is None or self.results[d].status != "ok"]
        if missing:
            res.status, res.error = "skipped", f"needs {', '.join(missing)}, which did not succeed"
            self.echo(f"[{n:2d}] {name}: skipped ({res.error})")
            self._save()
            return res
        self.echo(f"[{n:2d}] {name} ...")
        t0 = time.perf_counter()
        try:
            func(self.log_file(name))
            res.status = "ok"
        except Exception as exc:  # noqa: BLE001 - a failed stage is reported, the others go on
            res.status = "failed"
            res.error = (
                f"{type(exc).__name__}: {exc}" if isinstance(exc, StageFailed) else traceback.format_exc(limit=3)
            )
        res.seconds = time.perf_counter() - t0
        total = time.perf_counter() - self.started
        self.echo(f"[{n:2d}] {name}: {res.status} in {res.seconds:.0f} s (total {total / 60:.1f} min)")
        if res.status == "failed":
            self.echo("      " + res.error.strip().splitlines()[-1][:300])
        self._save()
        return res

    def ok(self, name: str) -> bool:
        return name in self.results and self.results[name].status == "ok"

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"total_seconds": time.perf_counter() - self.started, "python": sys.version.split()[0],
                "stages": [asdict(r) for r in self.results.values()]}  # fmt: skip
        tmp = self.out / "stages.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.out / "stages.json")

"""Fixtures of the data_prep tests: folders any user can read, and code run without root's right to read anything."""

from __future__ import annotations

import os
import pickle
import select
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import pytest

NOBODY = 65534


@pytest.fixture
def open_tmp():
    """A fresh folder that every user may enter and read (pytest's tmp_path sits in a root-only folder)."""
    path = Path(tempfile.mkdtemp(prefix="dp-open-"))
    path.chmod(0o755)
    yield path

    def _unlock(func, p, _exc):  # restore modes the test took away, then retry
        os.chmod(os.path.dirname(p), stat.S_IRWXU)
        if os.path.isdir(p):
            os.chmod(p, stat.S_IRWXU)
        func(p)

    shutil.rmtree(path, onerror=_unlock)


def run_unprivileged(fn, timeout: float = 120.0):
    """``fn()`` run in a forked child as an ordinary user (``nobody`` when the tests run as root, else as is).

    Root reads files and folders whatever their mode, so a ``chmod 000`` only bites an ordinary user: this
    runs the real code under the kernel's real permission checks. ``fn``'s result comes back pickled; an
    exception in the child is raised here as ``RuntimeError``. Warm up lazy imports in the parent first.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            payload = pickle.dumps(("ok", fn()))
        except BaseException as exc:
            payload, code = pickle.dumps(("error", f"{type(exc).__name__}: {exc}")), 1
        with os.fdopen(w, "wb") as f:
            f.write(payload)
        os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while True:
            ready, _, _ = select.select([f], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"unprivileged child did not answer within {timeout} s")
            chunk = os.read(f.fileno(), 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    status, value = pickle.loads(b"".join(chunks))
    if status != "ok":
        raise RuntimeError(value)
    return value


def make_unreadable(path: Path) -> None:
    """Take every permission away from ``path`` (a file or folder); :func:`run_unprivileged` code cannot read it."""
    path.chmod(0)

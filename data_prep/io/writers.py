"""Atomic writes shared by every data_prep step (images, JSON, CSV) and the output folder's checks.

Every file is written to a temporary name in its final folder and renamed into place, so an
interrupted run, a full disk or a killed worker never leaves a half-written file under a final
name, and files of finished cases are never rewritten by a rerun.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

import SimpleITK as sitk

__all__ = ["OutputError", "prepare_out_dir", "write_image", "write_json", "write_csv", "package_versions"]


class OutputError(OSError):
    """The output folder or a file in it cannot be written; the message names the path."""


def prepare_out_dir(out: str | Path, subdirs: Iterable[str] = ()) -> Path:
    """Create ``out`` and its sub-folders, failing early and clearly when that is impossible."""
    out = Path(out)
    try:
        for sub in ("", *subdirs):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {out}: {exc.strerror or exc}") from exc
    return out


def _atomic(path: Path, write) -> None:
    path = Path(path)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name.split('.')[0]}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        if isinstance(exc, RuntimeError) and "write" in str(exc).lower():  # SimpleITK's IO errors
            raise OutputError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from exc
        raise


def _gzip_file(src: str, dst: str) -> None:
    try:  # ISA-L's gzip is ~4x faster than zlib at the same size; the files are plain gzip either way
        from isal import igzip as gz

        level = 2
    except ImportError:  # pragma: no cover - isal is a dependency, this keeps odd platforms working
        import gzip as gz

        level = 1
    with open(src, "rb") as fin, gz.open(dst, "wb", compresslevel=level) as fout:
        shutil.copyfileobj(fin, fout, length=16 << 20)


def write_image(image: sitk.Image, path: str | Path) -> None:
    """Write a SimpleITK image atomically (format from the suffix; ``.nii.gz`` is gzip-compressed)."""
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        _atomic(path, lambda tmp: sitk.WriteImage(image, tmp, True))
        return

    def _w(tmp):
        raw = tmp[: -len(".gz")]
        try:
            sitk.WriteImage(image, raw, False)
            _gzip_file(raw, tmp)
        finally:
            if os.path.exists(raw):
                os.unlink(raw)

    _atomic(path, _w)


def write_json(obj, path: str | Path) -> None:
    """Write JSON (indented, keys in insertion order) atomically."""

    def _w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _atomic(Path(path), _w)


def write_csv(rows: Sequence[dict], columns: Sequence[str], path: str | Path) -> None:
    """Write rows (dicts) as CSV with the given column order, atomically."""

    def _w(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    _atomic(Path(path), _w)


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the named distributions (``"absent"`` when missing), plus Python's."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out

"""Atomic writes shared by every data_prep step (images, JSON, CSV) and the output folder's checks.

Every file is written to a temporary name in its final folder (``.<name>.partial-XXXXXXXX<suffix>``)
and renamed into place, so an interrupted run, a full disk or a killed worker never leaves a
half-written file under a final name, and files of finished cases are never rewritten by a rerun.
Temporary files left by a killed run are removed by the next run into the folder
(:func:`prepare_out_dir`). Files are created like any normal write: their mode follows the umask.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import zlib
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

import SimpleITK as sitk

__all__ = [
    "OutputError", "check_out_dir", "prepare_out_dir", "remove_partial", "write_image", "write_json", "write_csv",
    "file_stamp", "check_gzip", "package_versions",
]  # fmt: skip

_PARTIAL = re.compile(r"^\..*\.partial-[0-9a-f]{8}(\.|$)")


class OutputError(OSError):
    """The output folder or a file in it cannot be written; the message names the path."""


def check_out_dir(out: str | Path) -> Path:
    """Fail early and clearly when ``out`` cannot become a writable folder; creates nothing.

    ``out`` must be a writable folder, or not exist below a writable folder (its nearest existing
    ancestor). Use it before long work whose result may be "nothing to do", so that such a run leaves
    no empty output tree behind; :func:`prepare_out_dir` creates the folder afterwards.
    """
    out = Path(out)
    probe = out
    while not probe.exists():
        if probe.is_symlink():
            raise OutputError(f"cannot write to output folder {out}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot write to output folder {out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to output folder {out}: {probe} is not writable")
    return out


def prepare_out_dir(out: str | Path, subdirs: Iterable[str] = ()) -> Path:
    """Create ``out`` and its sub-folders, failing early and clearly when that is impossible.

    Temporary files of an earlier, killed run (``.<name>.partial-XXXXXXXX...``) are removed: one run at a
    time writes into an output folder.
    """
    out = Path(out)
    try:
        for sub in ("", *subdirs):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = _create_temp(out / ".write-test")
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {out}: {exc.strerror or exc}") from exc
    remove_partial(out)
    return out


def remove_partial(folder: str | Path) -> int:
    """Remove the temporary files that killed runs left under ``folder``; how many were removed."""
    n = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if _PARTIAL.match(name):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    n += 1
                except FileNotFoundError:
                    pass
    return n


def _create_temp(path: Path) -> str:
    """Create an empty temporary file beside ``path`` (same suffix, so writers pick the format).

    ``os.open`` with mode 0o666, like any normal write, so the final file's mode follows the umask
    (``tempfile.mkstemp`` would make it 0600: unreadable for the group sharing an output folder).
    """
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    stem = path.name[: len(path.name) - len(suffix)]
    for _ in range(100):
        tmp = path.parent / f".{stem}.partial-{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")  # pragma: no cover


def _atomic(path: Path, write) -> None:
    path = Path(path)
    try:
        tmp = _create_temp(path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
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


def _gzip_file(src: str, dst: str, name: str) -> None:
    """gzip ``src`` into ``dst``; the header holds ``name`` and no time, so equal images give equal bytes."""
    try:  # ISA-L's gzip is ~4x faster than zlib at the same size; the files are plain gzip either way
        from isal.igzip import IGzipFile as GzipFile

        level = 2
    except ImportError:  # pragma: no cover - isal is a dependency, this keeps odd platforms working
        from gzip import GzipFile

        level = 1
    with open(src, "rb") as fin, open(dst, "wb") as raw:
        with GzipFile(filename=name, mode="wb", compresslevel=level, fileobj=raw, mtime=0) as fout:
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
            _gzip_file(raw, tmp, path.name[: -len(".gz")])
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


def file_stamp(path: str | Path) -> dict:
    """Size and SHA-256 of a file (``sha256sum`` prints the same digest): what a rerun checks it against."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def check_gzip(path: str | Path) -> None:
    """Read a gzip file to its end, checking its CRC and length; raise ``OutputError`` naming it if damaged.

    SimpleITK reads a truncated ``.nii.gz`` without complaint (the missing voxels become garbage),
    so a reader of data_prep outputs checks the stream first.
    """
    try:
        from isal import igzip as gz
    except ImportError:  # pragma: no cover - isal is a dependency
        import gzip as gz
    try:
        with gz.open(path, "rb") as f:
            while f.read(16 << 20):
                pass
    except FileNotFoundError as exc:
        raise OutputError(f"{path} not found") from exc
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise OutputError(f"{path} is damaged (truncated or corrupt gzip: {exc}); prepare it again") from exc


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the named distributions (``"absent"`` when missing), plus Python's."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out

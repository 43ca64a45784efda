"""Which files an inference run reads, and the name each output takes from its input.

The collection's bundles share this interface (each carries its own copy, since a bundle cannot import
another): ``--input_path`` is a file, a folder, or a list (an actual list, or a JSON/Python list string
as ``monai.bundle run`` passes it); :func:`expand_inputs` turns it into inputs and :func:`input_id`
names each one. This copy adds what radiographs need: PNG and DICOM files (``.dcm``/``.dicom``, or
DICOM found by content) count as image files, and a folder holding DICOM files of several series
(several X-rays) yields each file, where one series is one input.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "InputError",
    "dicom_files",
    "expand_inputs",
    "input_id",
    "is_dicom_file",
    "is_dicom_series",
    "parse_input_list",
]

# .nii.gz first: it is one extension. .raw/.zraw (MetaImage data files) are never inputs themselves.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".png", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
_NOT_DICOM_SUFFIXES = (
    *[s for s in IMAGE_SUFFIXES if s not in DICOM_SUFFIXES],
    ".raw",
    ".zraw",
    ".json",
    ".csv",
    ".txt",
    ".md",
)


class InputError(ValueError):
    """An input that the bundle refuses, with the input named and what is wrong."""


def parse_input_list(value: str | os.PathLike | Sequence | None) -> tuple[list[str], bool]:
    """The paths in ``value`` and whether it was a list.

    Args:
        value: a path, a list of paths, or a JSON/Python list string (``"['a.nii.gz','b.mha']"``).

    Raises:
        InputError: nothing given, or a list string that does not parse.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError("input_path: no input given (a file, a folder, or a list of them)")
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as e:
                raise InputError(f"input_path: {value!r} is neither a path nor a list of paths ({e})") from None
    if isinstance(value, (list, tuple)):
        if not value:
            raise InputError("input_path: the list of inputs is empty")
        return [str(v) for v in value], True
    return [str(value)], False


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file: a ``.dcm``/``.dicom`` name, or any other name with the DICOM preamble."""
    p = Path(path)
    if not p.is_file():
        return False
    low = p.name.lower()
    if low.endswith(DICOM_SUFFIXES):
        return True
    if low.endswith(_NOT_DICOM_SUFFIXES) or low.startswith("."):
        return False
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if is_dicom_file(p))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")
    )


def _series_uids(files: list[Path]) -> set[str]:
    import pydicom

    uids = set()
    for f in files:
        try:
            uid = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).get(
                "SeriesInstanceUID"
            )
            uids.add(str(uid) if uid else f"no series UID:{f}")  # a file without one is a series of its own
        except Exception:  # noqa: BLE001 - an unreadable file is refused by name when it is read
            uids.add(f"unreadable:{f}")
    return uids


def is_dicom_series(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is one DICOM input: it directly holds DICOM files of one series and no other image files."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    files = dicom_files(folder)
    if not files or any(not is_dicom_file(p) for p in _image_files(folder)):
        return False
    return len(files) == 1 or len(_series_uids(files)) == 1


def _expand_folder(folder: Path) -> list[str]:
    if is_dicom_series(folder):
        return [str(folder)]
    files = _image_files(folder)
    loose = dicom_files(folder)  # DICOM files without a DICOM suffix, and several X-rays of different series
    subfolders = [
        p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".") and is_dicom_series(p)
    ]
    return sorted({str(p) for p in [*files, *loose, *subfolders]})


def expand_inputs(input_path: str | os.PathLike | Sequence | None) -> list[str]:
    """The inputs that ``input_path`` names, in order.

    A file is itself. A folder that directly holds DICOM files of one series (and no other image files)
    is one input. Any other folder yields its image files (``IMAGE_SUFFIXES``, DICOM also by content;
    not ``.raw``/``.zraw``) and its immediate subfolders that are one DICOM series, sorted. In a list,
    each entry is expanded so; an entry that does not exist or holds nothing readable is kept as an
    input, so that it is refused by name when read while the others go on.

    Args:
        input_path: a file, a folder, a list of them, or a JSON/Python list string.

    Raises:
        InputError: nothing given; a single path that does not exist or a folder with nothing readable.
    """
    paths, is_list = parse_input_list(input_path)
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_file():
            out.append(p)
        elif path.is_dir():
            found = _expand_folder(path)
            if not found and not is_list:
                raise InputError(
                    f"{p}: folder holds no readable image (NIfTI, .mha/.mhd, .nrrd, PNG or DICOM) and no DICOM series "
                    "subfolder"
                )
            out.extend(found or [p])
        elif is_list:
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return out


def input_id(path: str | os.PathLike) -> str:
    """The name outputs take from an input: its file name less the extension (``.nii.gz`` is one), or its folder's name.

    A file without a known image extension (a DICOM file named by its UID) keeps its whole name.
    """
    name = Path(str(path).rstrip("/\\")).name
    if Path(path).is_dir():
        return name
    low = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name

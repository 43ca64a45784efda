"""Inference inputs: a file, a folder or a list of them; one output per input; a bad input refused by name.

The same interface in every bundle of the project (each carries its own copy):

* :func:`expand_inputs`: ``--input_path`` (a file, a folder, a list, or a list written as a string, as
  ``monai.bundle run`` may pass it) to the list of inputs. A folder that directly holds DICOM files (and
  no image file) is one input, a DICOM series; any other folder gives its image files (``.nii``,
  ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``; not ``.raw``/``.zraw``) and its immediate subfolders
  that are DICOM series, sorted by name.
* :func:`input_id`: the name outputs are given (the file name without its extension, ``.nii.gz``
  counting as one, or the DICOM folder's name).
* :class:`LoadScand`: MONAI's ``LoadImaged`` (NIfTI through its ``NibabelReader`` as before) plus
  :class:`SimpleITKReader` for MetaImage, NRRD and DICOM series folders. Why: MONAI picks a reader by
  the file name; its ``ITKReader`` (which reads those formats) needs the ``itk`` package and its
  ``NrrdReader`` ``pynrrd``, neither installed here, and ``PydicomReader`` accepts any name, so a
  ``.mha`` file went to pydicom and failed with "File is missing DICOM File Meta Information header".
  SimpleITK (a dependency of the project) wraps the same ITK image IO as ``ITKReader``.
* :class:`InputDataset`: loads and preprocesses the inputs one by one; an input that fails is logged as
  one line ``<input>: <problem>`` and skipped, and the others go on. :func:`raise_if_failed` (the
  config's ``finalize``) then ends the run (exit status 1) with one line naming the failed inputs.
"""

from __future__ import annotations

import ast
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader, IterableDataset
from monai.data.utils import orientation_ras_lps
from monai.transforms import LoadImaged, apply_transform
from monai.utils import ensure_tuple

__all__ = [
    "IMAGE_SUFFIXES",
    "InputDataset",
    "InputsFailedError",
    "LoadScand",
    "SimpleITKReader",
    "expand_inputs",
    "input_id",
    "output_name_formatter",
    "raise_if_failed",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
_SITK_SUFFIXES = (".mha", ".mhd", ".nrrd")


class InputsFailedError(SystemExit):
    """Some inputs of a run were refused (each was logged with its problem).

    A ``SystemExit`` with a message: ``python -m monai.bundle run`` prints the one line and exits with
    status 1, without a traceback (in Python, catch it as ``SystemExit`` or this class).
    """


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def _is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or any file with the DICOM preamble (``DICM`` at byte 128)."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _is_dicom_series(folder: Path) -> bool:
    """A folder that directly holds DICOM files and no image file."""
    files = [p for p in folder.iterdir() if p.is_file()]
    return not any(_is_image_file(p) for p in files) and any(_is_dicom_file(p) for p in files)


def _parse_list(input_path: Any) -> tuple[list[str], bool]:
    """``input_path`` as a list of strings, and whether it was given as a list."""
    if isinstance(input_path, (list, tuple)):
        return [str(p) for p in input_path], True
    text = str(input_path if input_path is not None else "").strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"input_path {text!r}: not a list of paths (e.g. \"['a.nii.gz','b.mha']\")") from None
        return [str(p) for p in ensure_tuple(value)], True
    return ([text] if text else []), False


def _expand_folder(folder: Path) -> list[str]:
    if _is_dicom_series(folder):
        return [str(folder)]
    found = [p for p in folder.iterdir() if _is_image_file(p) or (p.is_dir() and _is_dicom_series(p))]
    if not found:
        raise FileNotFoundError(
            f"{folder}: no image file ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series "
            "(a folder of DICOM files) in this folder"
        )
    return [str(p) for p in sorted(found, key=lambda p: p.name)]


def expand_inputs(input_path: Any) -> list[str]:
    """The inputs named by ``input_path``: a file, a folder, or a list of them (see the module docstring).

    Args:
        input_path: a path, a list of paths, or a list written as a string (``"['a.nii.gz','b.mha']"``).

    Returns:
        One path per input: image files and DICOM series folders. In a list, a missing path or a folder
        with nothing readable is kept, so that it is refused by name when it is read while the other
        inputs go on.

    Raises:
        FileNotFoundError: a single path that does not exist, or a single folder with nothing readable.
        ValueError: an empty ``input_path`` or a list string that cannot be parsed.
    """
    paths, is_list = _parse_list(input_path)
    if not paths:
        raise ValueError("input_path is empty; pass --input_path <scan file, folder, or list of them>")
    inputs: list[str] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            if not is_list:
                raise FileNotFoundError(f"{p}: no such file or folder")
            inputs.append(p)
        elif path.is_dir():
            try:
                inputs.extend(_expand_folder(path))
            except FileNotFoundError:
                if not is_list:
                    raise
                inputs.append(p)
        else:
            inputs.append(p)
    return inputs


def input_id(path: str | os.PathLike) -> str:
    """The name of an input: its file name without the extension (``.nii.gz`` is one), or its folder's name."""
    p = Path(str(path).rstrip("/\\") or str(path))
    if p.is_dir():
        return p.name
    name = p.name
    if name.lower().endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    return os.path.splitext(name)[0]


def input_problem(path: str) -> str | None:
    """Why ``path`` cannot be an input, before reading it (missing, not a series, a format not read); None if none."""
    p = Path(path).expanduser()
    if not p.exists():
        return "no such file or folder"
    if p.is_dir():
        return None if _is_dicom_series(p) else "folder holds no DICOM series (DICOM files) and is not a scan"
    if p.suffix.lower() == ".dcm" or _is_dicom_file(p):
        return "a single DICOM file; give the folder that holds its series"
    if not p.name.lower().endswith(IMAGE_SUFFIXES):
        return f"not a supported scan format (expected {', '.join(IMAGE_SUFFIXES)} or a DICOM series folder)"
    return None


class SimpleITKReader(ImageReader):
    """MONAI image reader over SimpleITK for MetaImage (``.mha``/``.mhd``), NRRD and DICOM series folders.

    Gives what MONAI's ``ITKReader`` gives (array in (x, y, z) order, ``affine`` in RAS world mm), so
    ``Orientationd``, ``Spacingd``, ``Invertd`` and ``SaveImaged`` treat every format alike. NIfTI is
    left to MONAI's ``NibabelReader`` (:meth:`verify_suffix` is False for it).

    Args:
        channel_dim: as MONAI's readers: None for single-channel images. Default None.
    """

    def __init__(self, channel_dim: int | None = None, **kwargs) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """True for ``.mha``, ``.mhd``, ``.nrrd`` files and folders (DICOM series)."""
        return all(Path(f).is_dir() or str(f).lower().endswith(_SITK_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs):
        """Read one image (or a list of images) as SimpleITK images; a failure names the path."""
        images = [self._read_one(str(name)) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    @staticmethod
    def _read_one(name: str):
        import SimpleITK as sitk

        try:
            if Path(name).is_dir():
                series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(name)
                if not series:
                    raise ValueError(f"{name}: no DICOM series in this folder")
                if len(series) > 1:
                    raise ValueError(f"{name}: holds {len(series)} DICOM series; give a folder with one series")
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(name, series[0]))
                return reader.Execute()
            return sitk.ReadImage(name)
        except RuntimeError as exc:  # ITK's message: "Exception thrown in ...\nITK ERROR: MetaImageIO(0x..): <why>"
            lines = [ln.split("ERROR:", 1)[1] for ln in str(exc).splitlines() if "ERROR:" in ln]
            detail = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", lines[0]).strip() if lines else type(exc).__name__
            raise ValueError(f"{name}: cannot be read as an image ({detail})") from None

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Array ``(x, y, z[, c])`` and metadata (``affine``/``original_affine`` in RAS, ``spatial_shape``...)."""
        import SimpleITK as sitk

        arrays, meta = [], {}
        for image in img if isinstance(img, (list, tuple)) else [img]:  # an sitk.Image is itself iterable
            arr = sitk.GetArrayFromImage(image)  # (z, y, x[, c])
            dims = image.GetDimension()
            arr = arr.transpose(*range(dims - 1, -1, -1), *range(dims, arr.ndim))
            sr = min(dims, 3)
            direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dims, dims)[:sr, :sr]
            spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
            affine = np.eye(sr + 1)
            affine[:sr, :sr] = direction @ np.diag(spacing[:sr])
            affine[:sr, -1] = np.asarray(image.GetOrigin(), dtype=np.float64)[:sr]
            affine = orientation_ras_lps(affine)
            header = {
                "spacing": spacing, "original_affine": affine, "affine": affine.copy(), "space": "RAS",
                "spatial_shape": np.asarray(image.GetSize()[:sr]),
                "original_channel_dim": (float("nan") if image.GetNumberOfComponentsPerPixel() == 1 else -1)
                if self.channel_dim is None else self.channel_dim,
            }  # fmt: skip
            arrays.append(arr)
            if not meta:
                meta = header
        return (np.stack(arrays, axis=0) if len(arrays) > 1 else arrays[0]), meta


class LoadScand(LoadImaged):
    """``LoadImaged`` that also reads MetaImage, NRRD and DICOM series folders (:class:`SimpleITKReader`).

    MONAI chooses the reader by file name as usual: NIfTI still goes to its ``NibabelReader``; the
    SimpleITK reader takes ``.mha``/``.mhd``/``.nrrd`` files and folders. Arguments are ``LoadImaged``'s
    (without ``reader``).
    """

    def __init__(self, keys, *args, **kwargs) -> None:
        super().__init__(keys, None, *args, **kwargs)
        self.register(SimpleITKReader())


def _one_line(exc: BaseException, name: str) -> str:
    """The innermost message of an exception, on one line, without a leading ``<name>: ``."""
    while exc.__cause__ is not None:  # MONAI wraps transform errors: "applying transform ..."
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    msg = lines[0] if lines else type(exc).__name__
    for prefix in {name, str(Path(name)), str(Path(name).expanduser())}:
        if msg.startswith(prefix + ": "):
            return msg[len(prefix) + 2 :]
    return msg


class InputDataset(IterableDataset):
    """Inference items ``{key: path}`` loaded and preprocessed one by one; a bad one is refused by name.

    An input that cannot be used (missing, a format not read, a folder without a series, an output name
    already taken by an earlier input, or any error of the transform: unreadable, not a 3D volume,
    slices too thick, ...) is logged as ``<input>: <problem>`` and skipped; the others go on.
    :attr:`failed` lists the refused inputs of the last pass. Use it with ``num_workers=0`` (the refused
    inputs are counted in this process).

    Args:
        data: items, e.g. ``[{"image": "a.nii.gz"}, ...]``.
        transform: the preprocessing.
        key: the item key holding the input path. Default "image".
    """

    def __init__(self, data: Sequence[dict], transform=None, key: str = "image") -> None:
        super().__init__(data=data, transform=transform)
        self.key = key
        self.failed: list[str] = []
        self.total = 0

    def __iter__(self) -> Iterator[dict]:
        self.failed, self.total, taken = [], 0, {}
        for item in self.data:
            name = str(item[self.key])
            self.total += 1
            problem = input_problem(name)
            out_name = input_id(name)
            if problem is None and out_name in taken:
                problem = f"its output name {out_name!r} is already that of {taken[out_name]}; rename one of them"
            out = None
            if problem is None:
                try:
                    out = apply_transform(self.transform, item) if self.transform is not None else item
                except Exception as exc:  # noqa: BLE001 - any failure of one input is reported and skipped
                    problem = _one_line(exc, name)
            if problem is not None:
                logger.error(f"{name}: {problem}")
                self.failed.append(name)
                continue
            taken[out_name] = name
            yield out


def raise_if_failed(dataset: InputDataset) -> None:
    """End a run whose inputs were not all used: raise one line naming the refused inputs (logged before)."""
    failed = list(getattr(dataset, "failed", []))
    if failed:
        raise InputsFailedError(f"{len(failed)} of {dataset.total} inputs failed (see the log): {', '.join(failed)}")


def output_name_formatter(metadict: dict, saver) -> dict:
    """``SaveImaged`` file name from the input's name (:func:`input_id`), e.g. ``<id>_nodules.nii.gz``.

    MONAI's default strips everything after the last dot of the input's name, which cuts a DICOM folder
    named by its series UID (``1.3.6...``) short; ``.nii.gz`` is added here for MONAI's folder layout to strip.
    """
    source = metadict.get("filename_or_obj", "") if metadict else ""
    subject = input_id(source) if source else str(getattr(saver, "_data_index", 0))
    return {"subject": subject + ".nii.gz", "idx": metadict.get("patch_index") if metadict else None}

"""The bundle's inference inputs: a file, a folder or a list of them; one output per input; bad items skipped by name.

``--input_path`` is a CT file (NIfTI ``.nii``/``.nii.gz``, MetaImage ``.mha``/``.mhd``, ``.nrrd``), a DICOM
series folder, a folder of such inputs, or a list of any of these (a real list, or the string of one, as
``python -m monai.bundle run --input_path "['a.nii.gz','b.mha']"`` passes it). Each input gives one output
named from :func:`input_id`. An input that cannot be used is logged as one line ``<input>: <problem>`` and
skipped; the others go on, and :meth:`FailedInputs.raise_if_any` ends the run with a one-line summary.

Reading stays MONAI's ``LoadImaged``: NIfTI with ``NibabelReader`` and DICOM series folders with
``PydicomReader`` (its default choices, so the shipped model's outputs on them are unchanged), plus
:class:`SimpleITKReader` for MetaImage and NRRD, which MONAI reads only through ``itk`` (not a dependency here).
"""

from __future__ import annotations

import ast
import gzip
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import Dataset
from monai.data.image_reader import ImageReader
from monai.data.utils import is_supported_format
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from .transforms import InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "FailedInputs",
    "InferenceDataset",
    "LoadCTd",
    "SimpleITKReader",
    "expand_inputs",
    "inference_list",
    "input_id",
    "is_dicom_series",
    "output_name_formatter",
    "read_problem",
]

logger = logging.getLogger("lung_field_ct_segmentation")

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
ITK_ONLY_SUFFIXES = (".mha", ".mhd", ".nrrd")


class InputPathError(ValueError):
    """An ``--input_path`` entry that names nothing usable (missing, or a folder without CT inputs)."""


def _parse(input_path) -> list[str]:
    """``input_path`` as a list of path strings: a list, a list written as a string, or one path."""
    if isinstance(input_path, (str, os.PathLike)):
        text = str(input_path).strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                value = ast.literal_eval(text)  # a literal only: nothing is executed
            except (ValueError, SyntaxError) as e:
                raise InputPathError(f"--input_path {text!r} is not a list of paths: {e}") from None
            return [str(p) for p in ensure_tuple(value)]
        return [text]
    return [str(p) for p in input_path]


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
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_series(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` directly holds DICOM files and no other image files (then it is one input)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    files = [p for p in folder.iterdir() if p.is_file()]
    return any(_is_dicom_file(p) for p in files) and not any(_is_image_file(p) for p in files)


def _expand_one(path: str) -> list[str]:
    p = Path(path)
    if not path or not p.exists():
        raise InputPathError(f"{path or repr(path)}: not found (give --input_path a CT file, a folder or a list)")
    if p.is_file() or is_dicom_series(p):
        return [str(p)]
    found = sorted([str(c) for c in p.iterdir() if _is_image_file(c) or is_dicom_series(c)])
    if not found:
        raise InputPathError(
            f"{path}: no CT input in this folder (no {', '.join(IMAGE_SUFFIXES)} file and no DICOM series folder in it)"
        )
    return found


def expand_inputs(input_path: str | os.PathLike | Sequence[str]) -> list[str]:
    """The inputs that ``input_path`` names, in order; raises :class:`InputPathError` naming a path that names none.

    Args:
        input_path: a file (itself), a folder that directly holds DICOM files and no other image files (one
            input: a DICOM series), any other folder (its image files ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``,
            ``.nrrd`` and its immediate subfolders that are DICOM series, sorted), or a list of these (a list or
            its string ``"['a.nii.gz', 'b.mha']"``).

    Returns:
        The input paths (files or DICOM series folders).
    """
    return [q for p in _parse(input_path) for q in _expand_one(p)]


def input_id(path: str | os.PathLike) -> str:
    """The name outputs are given: a file's name without its extension (``.nii.gz`` is one), a folder's name."""
    name = Path(str(path).rstrip("/\\")).name
    if os.path.isdir(path):
        return name
    if name.lower().endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    return os.path.splitext(name)[0]


def inference_list(input_path: str | os.PathLike | Sequence[str]) -> list[dict]:
    """``[{"image": path}, ...]`` for ``--input_path``; an entry that names no input, or whose output name is taken
    by an earlier input, becomes ``{"image": path, "error": "<path>: <problem>"}`` (refused, the others go on).
    """
    try:
        entries = _parse(input_path) or [""]
    except InputPathError as e:
        return [{"image": str(input_path), "error": str(e)}]
    items, used = [], {}
    for entry in entries:
        try:
            paths = _expand_one(entry)
        except InputPathError as e:
            items.append({"image": entry, "error": str(e)})
            continue
        for path in paths:
            key = input_id(path)
            if key in used:
                error = f"{path}: its output name {key!r} is already that of {used[key]}"
                items.append({"image": path, "error": error})
                continue
            used[key] = path
            items.append({"image": path})
    return items


def output_name_formatter(metadict: dict, saver) -> dict:
    """``SaveImaged`` name formatter: outputs are named ``<input_id>_<postfix>`` (see :func:`input_id`).

    Args:
        metadict: the prediction's metadata (``filename_or_obj``, optional ``patch_index``).
        saver: the ``SaveImage`` transform (its data index names an input without a file name).

    Returns:
        ``{"subject": ..., "idx": ...}`` for ``monai.data.FolderLayout.filename`` (which strips one suffix:
        a dummy one is added so that a name such as a DICOM UID folder ``1.3.6...`` is kept whole).
    """
    source = (metadict or {}).get("filename_or_obj")
    subject = input_id(source) if source else str(getattr(saver, "_data_index", 0))
    return {"subject": f"{subject}.id", "idx": (metadict or {}).get("patch_index")}


def _problem(err: BaseException, name: str) -> str:
    """One line for ``err``: the innermost cause's first line, without a leading ``<name>: ``."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for prefix in (f"{name}: ", f"{name.rstrip('/')}: "):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


class InferenceDataset(Dataset):
    """``monai.data.Dataset`` whose items never raise: a failing item becomes ``{"image": path, "error": line}``.

    Items of :func:`inference_list` that already carry an ``"error"`` are passed on without reading.
    :class:`FailedInputs` (the evaluator's ``iteration_update``) logs and skips them.
    """

    def _transform(self, index: int):
        item = self.data[index]
        if "error" in item:
            return {"image": str(item["image"]), "error": item["error"]}
        try:
            return super()._transform(index)
        except Exception as e:  # one bad input must not stop the others
            name = str(item.get("image"))
            return {"image": name, "error": f"{name}: {_problem(e, name)}"}


class FailedInputs:
    """The evaluator's ``iteration_update``: runs MONAI's own iteration, and logs and skips failed inputs.

    An item with ``"error"`` (from :class:`InferenceDataset`), or whose prediction or saving raises, is logged as
    one line ``<input>: <problem>`` and recorded; the other inputs go on. Call :meth:`raise_if_any` at the end.
    """

    def __init__(self) -> None:
        self.failed: list[str] = []

    def _fail(self, name: str, line: str) -> None:
        self.failed.append(name)
        logger.error(line)

    def __call__(self, engine, batch):
        errors = batch.get("error") if isinstance(batch, dict) else None
        if errors is not None:
            for name, line in zip(ensure_tuple(batch["image"]), ensure_tuple(errors)):
                self._fail(str(name), str(line))
            return None
        try:
            return engine._iteration(engine, batch)
        except Exception as e:  # e.g. a DICOM folder that reads but cannot be resampled or written
            names = [str(m.get("filename_or_obj", "?")) for m in _metas(batch)] or ["<input>"]
            for name in names:
                self._fail(name, f"{name}: {_problem(e, name)}")
            return None

    def raise_if_any(self) -> None:
        """Exit with a one-line summary (status 1) when any input failed; do nothing otherwise."""
        if self.failed:
            raise SystemExit(f"{len(self.failed)} input(s) failed and have no output: {', '.join(self.failed)}")


def _metas(batch) -> list[dict]:
    image = batch.get("image") if isinstance(batch, dict) else None
    meta = getattr(image, "meta", None)
    if not meta:
        return []
    names = ensure_tuple(meta.get("filename_or_obj", ()))
    return [{"filename_or_obj": n} for n in names]


class SimpleITKReader(ImageReader):
    """MONAI image reader for MetaImage (``.mha``, ``.mhd``) and NRRD files through SimpleITK.

    Gives what MONAI's ``ITKReader`` gives: the array as (x, y, z) and an affine in RAS (the file's LPS
    direction, spacing and origin, with x and y negated), so orientation, spacing and saving work as for
    NIfTI. One file per call (a single volume).
    """

    suffixes = ITK_ONLY_SUFFIXES

    def verify_suffix(self, filename) -> bool:
        """Whether every file name ends with ``.mha``, ``.mhd`` or ``.nrrd``."""
        return is_supported_format(filename, [s.lstrip(".") for s in self.suffixes])

    def read(self, data, **kwargs):
        """Read one file with ``SimpleITK.ReadImage``."""
        import SimpleITK as sitk

        files = ensure_tuple(data)
        if len(files) != 1:
            raise ValueError(f"SimpleITKReader reads one file at a time, got {len(files)}")
        try:
            return sitk.ReadImage(str(files[0]))
        except RuntimeError as e:  # SimpleITK's message: a C++ location, then "sitk::ERROR: <reason>"
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            reason = lines[-1].removeprefix("sitk::ERROR:").strip() if lines else type(e).__name__
            raise ValueError(f"{files[0]}: cannot be read as MetaImage/NRRD ({reason})") from None

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Array (x, y, z[, c]) and metadata (``affine`` in RAS, ``spacing``, ``spatial_shape``) of one image."""
        import SimpleITK as sitk

        ndim = img.GetDimension()
        arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c])
        multi = img.GetNumberOfComponentsPerPixel() > 1
        arr = np.transpose(arr, list(range(ndim))[::-1] + ([ndim] if multi else []))
        spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
        affine = np.eye(ndim + 1)
        affine[:ndim, :ndim] = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim) * spacing
        affine[:ndim, ndim] = img.GetOrigin()
        affine[: min(ndim, 2)] *= -1  # LPS -> RAS
        meta = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys() if not k.startswith("ITK_")}
        meta.update(
            {
                MetaKeys.ORIGINAL_AFFINE: affine,
                MetaKeys.AFFINE: affine.copy(),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.SPATIAL_SHAPE: np.asarray(arr.shape[:ndim]),
                MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if multi else float("nan"),
                "spacing": spacing,
            }
        )
        return arr, meta


def read_problem(path, err: BaseException) -> str:
    """One line ``<path>: cannot be read ...`` for an error raised while reading ``path``."""
    path = str(path)
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if text.startswith(f"{path}: "):  # already names the file (SimpleITKReader)
        return text
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return f"{path}: cannot be read: the file is empty (0 bytes)"
    if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)) or "truncat" in text.lower():
        return f"{path}: cannot be read: the file is truncated or corrupt ({text})"
    return f"{path}: cannot be read ({type(err).__name__}: {text})"


class _NamingLoader:
    """Wraps ``LoadImage``: an error while reading becomes an :class:`InputError` with one line naming the file."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name):
        if name == "loader" or name.startswith("__"):  # not set yet (unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __setattr__(self, name, value):
        # MONAI Label's BundleInferTask sets ``_loader.image_only = False``: it must reach the wrapped loader.
        if name == "loader":
            object.__setattr__(self, name, value)
        else:
            setattr(self.loader, name, value)

    def __call__(self, filename, reader=None):
        try:
            return self.loader(filename, reader)
        except Exception as e:  # nibabel's EOFError on a cut .nii.gz, pydicom's, SimpleITK's, ...
            raise InputError(read_problem(filename, e)) from None


class LoadCTd(LoadImaged):
    """``LoadImaged`` with MONAI's own choice of reader by file suffix, plus :class:`SimpleITKReader` for
    ``.mha``/``.mhd``/``.nrrd``; arguments as ``LoadImaged`` (``reader`` not given). A file that cannot be read
    (missing, empty, truncated, corrupt) raises :class:`InputError` with one line naming it.
    """

    def __init__(self, keys, *args, **kwargs) -> None:
        super().__init__(keys, *args, **kwargs)
        self.register(SimpleITKReader())
        self._loader = _NamingLoader(self._loader)

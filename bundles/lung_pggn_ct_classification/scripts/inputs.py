"""What inference takes: ``input_path`` as a file, a folder or a list; each input's id; a SimpleITK reader
for MONAI's ``LoadImage``; a dataset that refuses a bad item by name while the others go on; the errors that
end a ``monai.bundle run`` with one line instead of a traceback.

The same small interface is copied in each bundle of the project (a bundle cannot import another).
"""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import Dataset, ImageReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.data.utils import orientation_ras_lps
from monai.transforms import apply_transform
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = [
    "IMAGE_SUFFIXES", "InputError", "InputsFailedError", "exit_on_input_error", "expand_inputs", "input_id",
    "is_dicom_series", "SimpleITKReader", "CheckedDataset",
]  # fmt: skip

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


class InputError(ValueError):
    """An input (image, table, checkpoint) that cannot be used; the message names it and the problem in one line."""


class InputsFailedError(SystemExit):
    """The run cannot go on, or some of its inputs were refused (each was logged with its problem).

    A ``SystemExit`` with a message: ``python -m monai.bundle run`` prints the one line and exits with
    status 1, without a traceback (MONAI wraps other exceptions of config expressions in its own, over
    dozens of lines). In Python, catch it as ``SystemExit`` or this class.
    """


def exit_on_input_error(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, where an :class:`InputError` (a ``TableError`` or ``CheckpointError`` too) or a
    ``FileNotFoundError`` ends the run with its one-line message (:class:`InputsFailedError`).

    For the config expressions that read the inputs and the checkpoint (``data``, ``initialize``, ``rows``);
    the functions themselves raise ordinary exceptions for use from Python.
    """
    try:
        return fn(*args, **kwargs)
    except (InputError, FileNotFoundError) as exc:
        raise InputsFailedError(str(exc)) from exc


def _as_list(input_path) -> list[str]:
    """``input_path`` as a list of strings: a list/tuple, a JSON or Python list string, or one path."""
    if isinstance(input_path, (list, tuple)):
        return [str(p) for p in input_path]
    text = str(input_path).strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as exc:
                raise InputError(f"input_path {text!r} looks like a list but cannot be read as one ({exc})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"input_path {text!r}: a list must hold path strings")
        return value
    return [text]


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def _is_dicom_file(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def is_dicom_series(folder: str | Path) -> bool:
    """True when ``folder`` directly holds DICOM files and no other image files."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    files = [f for f in folder.iterdir() if f.is_file()]
    return any(_is_dicom_file(f) for f in files) and not any(_is_image_file(f) for f in files)


def expand_inputs(input_path) -> list[str]:
    """The inputs named by ``input_path``, one path per input.

    A file is itself; a folder that directly holds DICOM files (and no other image files) is one input
    (a DICOM series); any other folder yields its image files (``IMAGE_SUFFIXES``, not ``.raw``/``.zraw``)
    and its immediate subfolders that are DICOM series, sorted by name.

    Args:
        input_path: a path, a list of paths, or a JSON/Python list string (as ``monai.bundle run`` passes it).

    Raises:
        FileNotFoundError: a path does not exist.
        InputError: a folder holds nothing readable; a list string cannot be read.
    """
    out: list[str] = []
    for item in _as_list(input_path):
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"{item}: not found")
        if path.is_file() or is_dicom_series(path):
            out.append(str(path))
            continue
        found = sorted(p for p in path.iterdir() if _is_image_file(p) or is_dicom_series(p))
        if not found:
            raise InputError(f"{item}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series folder in it")
        out += [str(p) for p in found]
    return out


def input_id(path: str | Path) -> str:
    """The name outputs are named from: the file name without its extension (``.nii.gz`` counts as one),
    or the DICOM folder's name."""
    path = Path(path)
    if path.is_dir():
        return path.name
    name = path.name
    for suffix in (".nii.gz", *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class SimpleITKReader(ImageReader):
    """MONAI image reader backed by SimpleITK: NIfTI, MetaImage (``.mha``/``.mhd``), NRRD and DICOM series folders.

    It gives what MONAI's ``ITKReader`` gives (array (x, y, z), RAS ``affine``) for environments without
    the ``itk`` package; with ``itk`` installed, ``reader="ITKReader"`` can take its place.

    Args:
        affine_lps_to_ras: convert the affine from LPS (DICOM, ITK) to RAS (MONAI's convention). Default True.
    """

    def __init__(self, affine_lps_to_ras: bool = True, **kwargs):
        super().__init__()
        self.affine_lps_to_ras = affine_lps_to_ras
        self.kwargs = kwargs

    def verify_suffix(self, filename) -> bool:
        return all(Path(f).is_dir() or str(f).lower().endswith(IMAGE_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data, **kwargs):
        import SimpleITK as sitk

        images = []
        for name in ensure_tuple(data):
            name = str(name)
            try:
                if Path(name).is_dir():
                    reader = sitk.ImageSeriesReader()
                    series = reader.GetGDCMSeriesIDs(name)
                    if not series:
                        raise ValueError(f"{name}: no DICOM series in the folder")
                    images.append(sitk.ReadImage(reader.GetGDCMSeriesFileNames(name, series[0])))
                else:
                    images.append(sitk.ReadImage(name))
            except RuntimeError as exc:  # SimpleITK's messages span several lines; keep the last
                detail = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                raise ValueError(f"not readable as an image ({detail[-1] if detail else exc})") from None
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        import SimpleITK as sitk

        arrays, meta = [], {}
        for image in img if isinstance(img, (list, tuple)) else [img]:  # a SimpleITK image is itself iterable
            data = sitk.GetArrayFromImage(image)
            n = image.GetDimension()
            if image.GetNumberOfComponentsPerPixel() == 1:
                data = data.T
            else:
                data = np.moveaxis(data.T, 0, -1)
            spacing = np.asarray(image.GetSpacing(), dtype=float)
            affine = np.eye(n + 1)
            affine[:n, :n] = np.asarray(image.GetDirection(), dtype=float).reshape(n, n) @ np.diag(spacing)
            affine[:n, -1] = image.GetOrigin()
            if self.affine_lps_to_ras:
                affine = orientation_ras_lps(affine)
            header = {
                "spacing": spacing, MetaKeys.ORIGINAL_AFFINE: affine, MetaKeys.AFFINE: affine.copy(),
                MetaKeys.SPACE: SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS,
                MetaKeys.SPATIAL_SHAPE: np.asarray(image.GetSize()),
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if image.GetNumberOfComponentsPerPixel() == 1 else -1,
            }  # fmt: skip
            arrays.append(data)
            _copy_compatible_dict(header, meta)
        return _stack_images(arrays, meta), meta


def _one_line(exc: BaseException) -> str:
    """The innermost cause's message, first line (MONAI wraps transform errors in 'applying transform ...')."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class CheckedDataset(Dataset):
    """A dataset whose items are preprocessed once, up front; an item that fails is logged as one line
    ``<input>: <problem>`` and left out, the others go on.

    An item that holds ``"error"`` (a table row refused by :func:`scripts.table.read_table` at inference,
    named by its ``"input"``) is logged and left out the same way. ``failed`` maps each refused input to
    its problem; :meth:`raise_if_failed` (a config's ``finalize``) ends the run with a one-line summary
    when any was refused. The preprocessed items stay in memory (about 130 KB per 32^3 crop).

    Args:
        data: the items (dicts).
        transform: the preprocessing. Default None.
        name_key: the item key naming the input in messages (its path), else ``input`` or ``id``. Default ``"image"``.

    Raises:
        InputsFailedError: no item could be preprocessed (a ``SystemExit``: the run ends with one line).
    """

    def __init__(self, data: Sequence[dict], transform=None, name_key: str = "image"):
        self.failed: dict[str, str] = {}
        items = []
        for item in data:
            name = str(item.get("input") or item.get(name_key) or item.get("id"))
            if item.get("error"):
                if self.failed.get(name) != str(item["error"]):  # rows sharing an id: one line
                    self.failed[name] = str(item["error"])
                    logger.error("%s: %s", name, self.failed[name])
                continue
            try:
                items.append(apply_transform(transform, item) if transform is not None else item)
            except Exception as exc:  # one bad input must not stop the others
                problem = _one_line(exc)
                self.failed[name] = problem[len(name) + 2 :] if problem.startswith(f"{name}: ") else problem
                logger.error("%s: %s", name, self.failed[name])
        if not items:
            raise InputsFailedError(f"no input could be used: {self.summary()}")
        super().__init__(items, transform=None)

    def summary(self) -> str:
        return "; ".join(f"{name}: {problem}" for name, problem in self.failed.items())

    def raise_if_failed(self) -> None:
        """Raise :class:`InputsFailedError` (a ``SystemExit``, status 1) naming the refused inputs, if any."""
        if self.failed:
            names = ", ".join(self.failed)
            raise InputsFailedError(f"{len(self.failed)} input(s) refused (the others were written): {names}")

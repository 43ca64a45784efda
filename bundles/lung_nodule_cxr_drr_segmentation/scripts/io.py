"""Radiograph input and output: PNG (8/16-bit), DICOM (a file or a folder of one image; MONOCHROME1
inverted), 2D NIfTI, MetaImage (.mha/.mhd) and NRRD in; mask and attention map out as PNG and NIfTI.
Bad input is refused with the file named and the reason.

Arrays are (H, W) = (row, column) as on a film viewed in the standard orientation. 2D NIfTI files
follow the DRR data contract: written with SimpleITK from an (H, W) array, so nibabel reads them as
(W, H) and they are transposed here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .inputs import InputError, dicom_files, expand_inputs, input_id, is_dicom_file, is_dicom_series, parse_input_list

logger = logging.getLogger(__name__)

__all__ = [
    "CheckPaird",
    "InferenceInputs",
    "InputError",
    "LoadRadiographd",
    "SavePredictiond",
    "pair_inputs",
    "read_datalist",
    "read_radiograph",
]


def _read_png(path: str) -> tuple[np.ndarray, dict]:
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
        if mode in ("P", "PA"):
            im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
            mode = im.mode
        arr = np.asarray(im)
    if arr.ndim == 3:  # RGB / RGBA / LA
        colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        if colour.shape[-1] == 3:
            spread = np.abs(colour.astype(np.int32) - colour[..., :1].astype(np.int32)).max()
            if spread > 2:
                raise InputError(
                    f"{path}: colour image (mode {mode}, channels differ by up to {spread} levels); "
                    "give a grayscale radiograph (annotations or colour maps burnt into the pixels are not read)"
                )
        arr = colour[..., 0]
    info = {
        "format": "png",
        "bits": 16 if arr.dtype == np.uint16 or mode.startswith("I;16") or mode == "I" else 8,
        "spacing": (1.0, 1.0),
    }
    return arr.astype(np.float32), info


def _read_dicom(path: str) -> tuple[np.ndarray, dict]:
    import pydicom

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise InputError(f"{path}: DICOM file without pixel data")
    arr = ds.pixel_array
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if (
            arr.ndim == 3
            and arr.shape[-1] == 3
            and np.abs(arr.astype(np.int32) - arr[..., :1].astype(np.int32)).max() <= 2
        ):
            arr = arr[..., 0]
        else:
            raise InputError(
                f"{path}: colour DICOM (PhotometricInterpretation {photometric}); give a grayscale radiograph"
            )
    if arr.ndim != 2:
        raise InputError(f"{path}: DICOM pixel data of shape {arr.shape}; expected one 2D image")
    arr = arr.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
        getattr(ds, "RescaleIntercept", 0) or 0
    )
    if photometric == "MONOCHROME1":  # low values are white: invert so that bone is bright as in MONOCHROME2
        arr = arr.max() + arr.min() - arr
    ps = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None) or (1.0, 1.0)
    return arr, {"format": "dicom", "photometric": photometric, "spacing": (float(ps[0]), float(ps[1]))}


def _read_nifti(path: str) -> tuple[np.ndarray, dict]:
    import nibabel as nib

    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = np.squeeze(data)
    if data.ndim != 2:
        raise InputError(f"{path}: NIfTI of shape {img.shape}; expected a 2D image (H, W)")
    zooms = img.header.get_zooms()
    return data.T.copy(), {"format": "nifti", "spacing": (float(zooms[1]), float(zooms[0])), "affine": img.affine}


def _read_itk(path: str) -> tuple[np.ndarray, dict]:
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(
            f"{path}: {img.GetNumberOfComponentsPerPixel()} components per pixel (colour or vector image); "
            "give a grayscale radiograph"
        )
    arr = np.squeeze(sitk.GetArrayFromImage(img)).astype(
        np.float32
    )  # (H, W) for a 2D image, as the DRR contract writes it
    if arr.ndim != 2:
        raise InputError(f"{path}: image of size {img.GetSize()}; expected a 2D image (H, W)")
    sx, sy = img.GetSpacing()[:2]
    return arr, {"format": Path(path).suffix.lower().lstrip("."), "spacing": (float(sy), float(sx))}


def _read_dicom_folder(path: str) -> tuple[np.ndarray, dict]:
    files = dicom_files(path)
    if not files:
        raise InputError(f"{path}: folder holds no DICOM file; give an image file or a folder holding one DICOM image")
    if len(files) > 1:
        raise InputError(
            f"{path}: DICOM folder of {len(files)} images; "
            "an X-ray or a DRR is one 2D image (give its file, or one folder each)"
        )
    return _read_dicom(str(files[0]))


def read_radiograph(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a 2D grayscale image as float32 (H, W) and a dict of facts (format, spacing in mm (row, col)).

    PNG: 8- or 16-bit gray, or RGB(A) whose channels are equal (stored gray); real colour is refused.
    DICOM: a file (``.dcm``/``.dicom``, or any name with the DICOM preamble) or a folder holding one;
    rescale slope/intercept applied; MONOCHROME1 inverted (bright = attenuating).
    NIfTI (.nii, .nii.gz): 2D, as written by SimpleITK from an (H, W) array.
    MetaImage (.mha, .mhd) and NRRD (.nrrd): 2D, read with SimpleITK (same layout).

    Args:
        path: the file, or a DICOM folder.

    Raises:
        InputError: missing or unreadable file, unknown extension, colour, not 2D, constant image.
    """
    path = str(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    low = path.lower()
    try:
        if os.path.isdir(path):
            arr, info = _read_dicom_folder(path)
        elif low.endswith(".png"):
            arr, info = _read_png(path)
        elif low.endswith((".nii", ".nii.gz")):
            arr, info = _read_nifti(path)
        elif low.endswith((".mha", ".mhd", ".nrrd")):
            arr, info = _read_itk(path)
        elif is_dicom_file(path):
            arr, info = _read_dicom(path)
        else:
            raise InputError(
                f"{path}: unknown image type; give PNG, DICOM, NIfTI (.nii/.nii.gz), MetaImage (.mha/.mhd) or NRRD"
            )
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise InputError(f"{path}: image of shape {arr.shape}; expected a 2D image of at least 8 x 8 pixels")
    if not np.isfinite(arr).all():
        raise InputError(f"{path}: image holds NaN or infinite values")
    info["path"] = path
    info["shape"] = tuple(int(s) for s in arr.shape)
    return arr, info


class LoadRadiographd(MapTransform):
    """Load radiographs (or 2D masks) into (1, H, W) float32 tensors; keep ``<key>_path`` and ``<key>_shape``.

    Args:
        keys: keys holding file paths.
        binary: treat as a mask: values > 0 become 1 (PNG masks may be 0/255). Default False.
        require_contrast: refuse constant images (an empty render, a blank file). Default True.
        allow_missing_keys: skip absent keys. Default False.
    """

    def __init__(
        self,
        keys: KeysCollection,
        binary: bool = False,
        require_contrast: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.binary = binary
        self.require_contrast = require_contrast

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        missing = [] if self.allow_missing_keys else [k for k in self.keys if k not in d]
        if missing:  # e.g. drr_slab_keys set for a DRR set rendered without --drr-slabs
            raise InputError(
                f"{d.get('xray', d.get('drr', 'a datalist entry'))}: no {', '.join(map(str, missing))} in its "
                "datalist entry"
            )
        for key in self.key_iterator(d):
            arr, info = read_radiograph(d[key])
            if self.binary:
                arr = (arr > 0).astype(np.float32)
            elif self.require_contrast and float(arr.max() - arr.min()) <= 0:
                raise InputError(f"{info['path']}: constant image (all pixels {arr.flat[0]}); nothing to segment")
            d[key] = torch.from_numpy(arr)[None]
            d[f"{key}_path"] = info["path"]
            d[f"{key}_shape"] = torch.tensor(info["shape"])
            d[f"{key}_spacing"] = torch.tensor(info["spacing"], dtype=torch.float64)
        return d


class CheckPaird(MapTransform):
    """Refuse an X-ray / DRR / mask set whose fields of view cannot match.

    Images of different sizes are accepted when their aspect ratios agree within ``aspect_tolerance``
    (all are resized to the network grid later, which resamples the DRR onto the X-ray's field);
    otherwise the pair is refused, since a cropped or rotated DRR cannot guide the X-ray. A mask must
    have the X-ray's size exactly.

    Args:
        keys: image keys, the reference (the X-ray) first.
        label_key: mask key, or None. Default None.
        aspect_tolerance: allowed relative difference of height / width. Default 0.02.
    """

    def __init__(self, keys: KeysCollection, label_key: str | None = None, aspect_tolerance: float = 0.02) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.label_key = label_key
        self.aspect_tolerance = aspect_tolerance

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        keys = [k for k in self.keys if k in d]
        ref = keys[0]
        ref_shape = tuple(d[ref].shape[-2:])
        ref_aspect = ref_shape[0] / ref_shape[1]
        for k in keys[1:]:
            shape = tuple(d[k].shape[-2:])
            if abs(shape[0] / shape[1] - ref_aspect) > self.aspect_tolerance * ref_aspect:
                raise InputError(
                    f"{d.get(f'{k}_path', k)}: size {shape[0]} x {shape[1]} has another aspect ratio than "
                    f"{d.get(f'{ref}_path', ref)} ({ref_shape[0]} x {ref_shape[1]}); "
                    f"the {k} must cover the same field as the {ref}"
                )
        lk = self.label_key
        if lk is not None and lk in d and tuple(d[lk].shape[-2:]) != ref_shape:
            raise InputError(
                f"{d.get(f'{lk}_path', lk)}: mask size {tuple(d[lk].shape[-2:])} differs from "
                f"{d.get(f'{ref}_path', ref)} {ref_shape}"
            )
        return d


def read_datalist(
    path: str | os.PathLike,
    folds: Sequence[int] | int | None = None,
    exclude_folds: Sequence[int] | int | None = None,
    key: str = "training",
) -> list[dict]:
    """Read a DRR-set ``datalist.json``: paths made absolute (relative to its folder), folds selected.

    ``max_diameter_mm`` missing or null (a pair without a nodule) becomes 0.0; other keys are kept.

    Args:
        path: the datalist file.
        folds: keep only these folds. Default None (all).
        exclude_folds: drop these folds. Default None.
        key: the list to read. Default "training".
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{path}: datalist not found (dataset_dir must be the output folder of `python -m data_prep drr`)"
        )
    try:
        items = json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not text
        raise InputError(f"{path}: not a datalist ({type(e).__name__}: {e})") from None
    items = items.get(key) if isinstance(items, dict) else None
    if not isinstance(items, list) or not all(isinstance(d, dict) and "xray" in d and "drr" in d for d in items):
        raise InputError(f"{path}: not a datalist (no {key!r} list of entries with 'xray' and 'drr')")
    as_set = lambda f: None if f is None else {int(f)} if isinstance(f, (int, float, str)) else {int(x) for x in f}  # noqa: E731
    keep, drop = as_set(folds), as_set(exclude_folds)
    out = []
    for item in items:
        fold = int(item.get("fold", 0))
        if (keep is not None and fold not in keep) or (drop is not None and fold in drop):
            continue
        d = dict(item)
        for k in [k for k in d if k in ("xray", "drr", "label", "lung") or k.startswith("drr_slab")]:
            if isinstance(d[k], str) and not os.path.isabs(d[k]):
                d[k] = str(path.parent / d[k])
        dia = d.get("max_diameter_mm")
        d["max_diameter_mm"] = 0.0 if dia is None or (isinstance(dia, float) and math.isnan(dia)) else float(dia)
        d.pop("lung", None)
        d = {k: v for k, v in d.items() if v is not None}
        out.append(d)
    return out


def _candidates(folder: str, cache: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    """The inputs of ``folder`` by their :func:`input_id` (read once per folder)."""
    if folder not in cache:
        by_id: dict[str, list[str]] = {}
        try:
            found = expand_inputs(folder) if os.path.isdir(folder) and not is_dicom_series(folder) else []
        except InputError:  # a folder with nothing readable: no partner in it
            found = []
        for p in found:
            by_id.setdefault(input_id(p), []).append(p)
        cache[folder] = by_id
    return cache[folder]


def _partner(xray: str, key: str, where: str | None, cache: dict) -> str:
    """The ``key`` image (the DRR, or a DRR slab) that goes with the X-ray input ``xray``.

    ``where`` None: the DRR set layout that ``data_prep drr`` writes, ``<set>/images/xray/<id>.nii.gz``
    beside ``<set>/images/<key>/<id>.nii.gz``: the input of the same name in the folder ``<key>``
    next to the X-ray's folder. ``where`` a folder: the input of the same name in it. ``where`` a file
    (or a DICOM folder): that file.
    """
    sid = input_id(xray)
    if where is not None and (os.path.isfile(where) or is_dicom_series(where) or not os.path.exists(where)):
        return where
    folder = where if where is not None else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(xray))), key)
    found = _candidates(folder, cache).get(sid, [])
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise InputError(
            f"{xray}: {len(found)} {key} images named {sid} in {folder} ({', '.join(Path(f).name for f in found)}); "
            "keep one"
        )
    how = "" if where is not None else " (beside the X-ray's folder, as data_prep drr writes them; or give --drr_path)"
    raise InputError(f"{xray}: no {key} named {sid} in {folder}{how}")


def _as_paths(value: str | os.PathLike | Sequence | None) -> list[str] | None:
    return None if value is None else parse_input_list(value)[0]


def pair_inputs(
    input_path: str | os.PathLike | Sequence | None, drr_path: str | os.PathLike | Sequence | None = None,
    datalist: str | None = None, folds: Sequence[int] | int | None = None,
    drr_slabs: Sequence[str] | None = None, slab_keys: Sequence[str] = (),
) -> tuple[list[dict], dict[str, str]]:  # fmt: skip
    """The X-ray / DRR pairs to segment, and the inputs refused while pairing (input -> problem).

    The X-rays are :func:`expand_inputs` of ``input_path``; each one's DRR is found so:

    - ``drr_path`` None: in the DRR set layout of ``data_prep drr``: for ``<set>/images/xray/<id>.<ext>``
      the input named ``<id>`` in ``<set>/images/drr/`` (the folder ``drr`` next to the X-ray's folder);
    - ``drr_path`` a folder of DRRs: the one named like the X-ray (same :func:`input_id`);
    - ``drr_path`` a file (or a DICOM folder): the DRR of the one X-ray;
    - ``drr_path`` a list: the DRRs in the order of the X-rays.

    DRR slabs (``slab_keys``) are found the same way, from ``drr_slabs`` (one entry per slab key: a
    file or a folder) or, when None, from the folders named by the keys next to the X-ray's folder.
    Or every pair of the given folds of a DRR set's ``datalist.json``.

    Args:
        input_path: X-ray file, folder or list (see :func:`expand_inputs`); None with ``datalist``.
        drr_path: the DRRs (see above). Default None.
        datalist: a DRR-set ``datalist.json``, used when ``input_path`` is None. Default None.
        folds: folds of ``datalist`` to take. Default None (all).
        drr_slabs: with a network trained on DRR slabs: one file or folder per slab key. Default None.
        slab_keys: the DRR slab keys the network takes (``drr_slab_keys``). Default none.

    Raises:
        InputError: what concerns the whole run (no input, a datalist without the slabs, as many DRRs
            or slabs as X-rays not given).
    """
    slab_keys = list(slab_keys or [])
    if input_path is None and datalist:
        items = []
        for d in read_datalist(datalist, folds=folds):
            missing = [k for k in slab_keys if k not in d]
            if missing:
                raise InputError(
                    f"{datalist}: the pair {d['xray']} has no {', '.join(missing)} (render the set with `data_prep "
                    "drr --drr-slabs`)"
                )
            items.append({k: d[k] for k in ["xray", "drr", *slab_keys]})
        return items, {}
    if input_path is None:
        raise InputError(
            "give --input_path (X-ray file, folder or list; --xray_path is its older name) or --input_datalist"
        )
    slabs = _as_paths(drr_slabs)
    if slabs is not None and len(slabs) != len(slab_keys):
        raise InputError(
            f"the network takes {len(slab_keys)} DRR slab(s) ({', '.join(slab_keys) or 'none'}); "
            f"--drr_slab_paths gave {len(slabs)}"
        )
    xrays = expand_inputs(input_path)
    drrs = _as_paths(drr_path)
    if drrs is not None and len(drrs) != 1 and len(drrs) != len(xrays):
        raise InputError(
            f"--drr_path gives {len(drrs)} DRRs for {len(xrays)} X-rays; "
            "give one per X-ray, or a folder of DRRs named like them"
        )
    if (
        drrs is not None
        and len(drrs) == 1
        and len(xrays) > 1
        and not (os.path.isdir(drrs[0]) and not is_dicom_series(drrs[0]))
    ):
        raise InputError(
            f"--drr_path {drrs[0]} is one DRR for {len(xrays)} X-rays; "
            "give a folder of DRRs named like the X-rays, or a list"
        )
    items, failed, cache, taken = [], {}, {}, {}
    for i, xray in enumerate(xrays):
        try:
            sid = input_id(xray)
            if sid in taken:
                raise InputError(f"{xray}: its outputs would be named {sid}, as those of {taken[sid]}; rename one")
            if not os.path.exists(xray):
                raise InputError(f"{xray}: no such file or folder")
            where = None if drrs is None else drrs[i] if len(drrs) == len(xrays) else drrs[0]
            item = {"xray": xray, "drr": _partner(xray, "drr", where, cache)}
            for j, key in enumerate(slab_keys):
                item[key] = _partner(xray, key, None if slabs is None else slabs[j], cache)
            taken[sid] = xray
            items.append(item)
        except InputError as e:
            failed[xray] = str(e).removeprefix(f"{xray}: ")
    return items, failed


class InferenceInputs:
    """The pairs an inference run segments: paired (:func:`pair_inputs`), then each pair read and checked once.

    A pair that cannot be used (no DRR found, unreadable, not 2D, (almost) constant, fields that do not match) is
    logged as one line ``<input>: <problem>`` and left out; the others go on. :meth:`raise_if_failed`,
    run when inference ends, then fails the run naming the inputs left out.

    Args:
        input_path, drr_path, datalist, folds, drr_slabs, slab_keys: as :func:`pair_inputs`.
        percentiles: the X-ray's and the DRR's intensity scaling percentiles (``intensity_percentiles``):
            an image where they are equal (almost constant) is refused. Default (0.5, 99.5).

    Raises:
        InputError: as :func:`pair_inputs`; and when no pair is left.
    """

    def __init__(
        self,
        input_path: str | os.PathLike | Sequence | None = None,
        drr_path: str | os.PathLike | Sequence | None = None,
        datalist: str | None = None, folds: Sequence[int] | int | None = None,
        drr_slabs: Sequence[str] | None = None, slab_keys: Sequence[str] = (),
        percentiles: Sequence[float] = (0.5, 99.5),
    ) -> None:  # fmt: skip
        pairs, self.failed = pair_inputs(input_path, drr_path, datalist, folds, drr_slabs, slab_keys)
        keys = ["xray", "drr", *list(slab_keys or [])]
        load, check = LoadRadiographd(keys), CheckPaird(keys)
        self.items = []
        for item in pairs:
            try:
                d = check(load(item))
                for key in ("xray", "drr"):  # the intensity scaling needs two different percentiles
                    lo, hi = np.percentile(d[key].numpy(), [float(p) for p in percentiles])
                    if hi <= lo:
                        raise InputError(
                            f"{d[key + '_path']}: almost constant image (its {percentiles[0]:g}th and "
                            f"{percentiles[1]:g}th percentiles are both {lo:g}); nothing to segment"
                        )
                self.items.append(item)
            except InputError as e:
                self.failed[item["xray"]] = str(e).removeprefix(f"{item['xray']}: ")
        for name, problem in self.failed.items():
            logger.error(f"{name}: {problem}")
        if not self.items:
            raise InputError(f"none of the {len(self.failed)} inputs can be segmented: {', '.join(self.failed)}")

    def raise_if_failed(self) -> None:
        """Fail (after the others were written) when an input was left out, naming each."""
        if self.failed:
            raise InputError(
                f"{len(self.failed)} of {len(self.failed) + len(self.items)} inputs were not segmented: "
                f"{', '.join(self.failed)}"
            )


def _resize_to(x: torch.Tensor, shape: Sequence[int], mode: str) -> np.ndarray:
    x = torch.as_tensor(x, dtype=torch.float32).detach().cpu()[None]  # the network's output may be on a GPU
    kw = {} if mode == "nearest" else {"align_corners": False}
    return torch.nn.functional.interpolate(x, size=tuple(int(s) for s in shape), mode=mode, **kw)[0, 0].numpy()


def _check_output_dir(path: str) -> None:
    """Refuse, before anything runs, an output folder that is a file or cannot be written (created when written)."""
    found = Path(os.path.abspath(path))
    while not found.exists() and found != found.parent:
        found = found.parent
    what = "output_dir" if str(found) == os.path.abspath(path) else f"its parent {found}"
    if not found.is_dir():
        raise InputError(f"{path}: cannot write the outputs there ({what} is a file, not a folder)")
    if not os.access(found, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write the outputs there ({what} is not writable)")


class SavePredictiond(MapTransform):
    """Write the mask and the attention map at the X-ray's original size as PNG and/or NIfTI.

    Expects ``pred`` (1, h, w) probabilities and ``attention`` (1, h, w) probabilities on the network
    grid, and ``xray_path`` / ``xray_shape`` / ``xray_spacing`` from ``LoadRadiographd``. Writes
    ``<output_dir>/<name>_mask.{png,nii.gz}`` (0/255 PNG, 0/1 uint8 NIfTI) and
    ``<name>_attention.{png,nii.gz}`` (0..255 PNG, float32 NIfTI), ``<name>`` = the X-ray input's
    :func:`~scripts.inputs.input_id` (its file name without extension, or its DICOM folder's name).
    NIfTI files use the DRR contract's layout (SimpleITK-compatible, spacing in mm).

    Args:
        keys: the prediction key. Default "pred".
        attention_key: the attention key. Default "attention".
        output_dir: folder to write into (created).
        formats: any of "png", "nifti". Default ("png", "nifti").
        threshold: probability threshold of the mask. Default 0.5.

    Raises:
        InputError: ``output_dir`` (or its nearest existing parent) is a file or not writable.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        attention_key: str = "attention",
        output_dir: str = "./pred",
        formats: Sequence[str] = ("png", "nifti"),
        threshold: float = 0.5,
    ) -> None:
        super().__init__(keys)
        self.attention_key = attention_key
        self.output_dir = str(output_dir)
        self.formats = tuple(formats)
        self.threshold = threshold
        _check_output_dir(self.output_dir)

    @staticmethod
    def _nifti(arr: np.ndarray, spacing: Sequence[float], path: str) -> None:
        import nibabel as nib

        # SimpleITK writes an (H, W) array as size (W, H) with LPS identity direction -> RAS affine diag(-sx, -sy, 1)
        affine = np.diag([-float(spacing[1]), -float(spacing[0]), 1.0, 1.0])
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.T), affine), path)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from PIL import Image

        d = dict(data)
        os.makedirs(self.output_dir, exist_ok=True)
        shape = [int(s) for s in torch.as_tensor(d["xray_shape"]).tolist()]
        spacing = [float(s) for s in torch.as_tensor(d.get("xray_spacing", (1.0, 1.0))).tolist()]
        name = input_id(str(d["xray_path"]))
        for key in self.key_iterator(d):
            prob = _resize_to(torch.as_tensor(d[key])[0:1], shape, "bilinear")
            att = _resize_to(torch.as_tensor(d[self.attention_key])[0:1], shape, "bilinear")
            mask = (prob >= self.threshold).astype(np.uint8)
            base = os.path.join(self.output_dir, name)
            if "png" in self.formats:
                Image.fromarray(mask * 255).save(base + "_mask.png")
                Image.fromarray(np.clip(att * 255 + 0.5, 0, 255).astype(np.uint8)).save(base + "_attention.png")
            if "nifti" in self.formats:
                self._nifti(mask, spacing, base + "_mask.nii.gz")
                self._nifti(att.astype(np.float32), spacing, base + "_attention.nii.gz")
            d[f"{key}_file"] = base + "_mask." + ("png" if "png" in self.formats else "nii.gz")
        return d

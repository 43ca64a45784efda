"""Radiograph input and output: PNG (8/16-bit), DICOM (MONOCHROME1 inverted) and 2D NIfTI in; mask
and attention map out as PNG and NIfTI. Bad input is refused with the file named and the reason.

Arrays are (H, W) = (row, column) as on a film viewed in the standard orientation. 2D NIfTI files
follow the DRR data contract: written with SimpleITK from an (H, W) array, so nibabel reads them as
(W, H) and they are transposed here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = [
    "CheckPaird",
    "InputError",
    "LoadRadiographd",
    "SavePredictiond",
    "inference_items",
    "read_datalist",
    "read_radiograph",
]


class InputError(ValueError):
    """An input file that the bundle refuses, with the file named and what is wrong."""


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
    info = {"format": "png", "bits": 16 if arr.dtype == np.uint16 or mode.startswith("I;16") or mode == "I" else 8, "spacing": (1.0, 1.0)}
    return arr.astype(np.float32), info


def _read_dicom(path: str) -> tuple[np.ndarray, dict]:
    import pydicom

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise InputError(f"{path}: DICOM file without pixel data")
    arr = ds.pixel_array
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim == 3 and arr.shape[-1] == 3 and np.abs(arr.astype(np.int32) - arr[..., :1].astype(np.int32)).max() <= 2:
            arr = arr[..., 0]
        else:
            raise InputError(f"{path}: colour DICOM (PhotometricInterpretation {photometric}); give a grayscale radiograph")
    if arr.ndim != 2:
        raise InputError(f"{path}: DICOM pixel data of shape {arr.shape}; expected one 2D image")
    arr = arr.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
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


def read_radiograph(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a 2D grayscale image as float32 (H, W) and a dict of facts (format, spacing in mm (row, col)).

    PNG: 8- or 16-bit gray, or RGB(A) whose channels are equal (stored gray); real colour is refused.
    DICOM: rescale slope/intercept applied; MONOCHROME1 inverted (bright = attenuating).
    NIfTI (.nii, .nii.gz): 2D, as written by SimpleITK from an (H, W) array.

    Args:
        path: the file.

    Raises:
        InputError: missing or unreadable file, unknown extension, colour, not 2D, constant image.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    low = path.lower()
    try:
        if low.endswith(".png"):
            arr, info = _read_png(path)
        elif low.endswith((".dcm", ".dicom")):
            arr, info = _read_dicom(path)
        elif low.endswith((".nii", ".nii.gz")):
            arr, info = _read_nifti(path)
        else:
            raise InputError(f"{path}: unknown image type; give PNG, DICOM (.dcm) or NIfTI (.nii/.nii.gz)")
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

    def __init__(self, keys: KeysCollection, binary: bool = False, require_contrast: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.binary = binary
        self.require_contrast = require_contrast

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        missing = [] if self.allow_missing_keys else [k for k in self.keys if k not in d]
        if missing:  # e.g. drr_slab_keys set for a DRR set rendered without --drr-slabs
            raise InputError(f"{d.get('xray', d.get('drr', 'a datalist entry'))}: no {', '.join(map(str, missing))} in its datalist entry")
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
                    f"{d.get(f'{ref}_path', ref)} ({ref_shape[0]} x {ref_shape[1]}); the {k} must cover the same field as the {ref}"
                )
        lk = self.label_key
        if lk is not None and lk in d and tuple(d[lk].shape[-2:]) != ref_shape:
            raise InputError(f"{d.get(f'{lk}_path', lk)}: mask size {tuple(d[lk].shape[-2:])} differs from {d.get(f'{ref}_path', ref)} {ref_shape}")
        return d


def read_datalist(path: str | os.PathLike, folds: Sequence[int] | int | None = None, exclude_folds: Sequence[int] | int | None = None, key: str = "training") -> list[dict]:
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
        raise InputError(f"{path}: datalist not found (dataset_dir must be the output folder of `python -m data_prep drr`)")
    items = json.loads(path.read_text())[key]
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


def inference_items(
    xray: str | None, drr: str | None, datalist: str | None = None, folds: Sequence[int] | int | None = None,
    drr_slabs: Sequence[str] | None = None, slab_keys: Sequence[str] = (),
) -> list[dict]:  # fmt: skip
    """The pairs to segment: one (``xray``, ``drr``) pair, or the pairs of a datalist's folds.

    Args:
        xray: X-ray file (PNG, DICOM or NIfTI), or None when ``datalist`` is given.
        drr: DRR file of the same patient, or None when ``datalist`` is given.
        datalist: a DRR-set ``datalist.json``. Default None.
        folds: folds of ``datalist`` to take. Default None (all).
        drr_slabs: with one pair and a network trained on DRR slabs: the slab files, in the order of
            ``slab_keys``. Default None.
        slab_keys: the DRR slab keys the network takes (``drr_slab_keys``). Default none.
    """
    slab_keys = list(slab_keys or [])
    if datalist:
        items = []
        for d in read_datalist(datalist, folds=folds):
            missing = [k for k in slab_keys if k not in d]
            if missing:
                raise InputError(f"{datalist}: the pair {d['xray']} has no {', '.join(missing)} (render the set with `data_prep drr --drr-slabs`)")
            items.append({k: d[k] for k in ["xray", "drr", *slab_keys]})
        return items
    if not xray or not drr:
        raise InputError("give both --xray_path and --drr_path (or --input_datalist)")
    slabs = list(drr_slabs or [])
    if len(slabs) != len(slab_keys):
        raise InputError(f"the network takes {len(slab_keys)} DRR slab(s) ({', '.join(slab_keys) or 'none'}); --drr_slab_paths gave {len(slabs)}")
    return [{"xray": str(xray), "drr": str(drr), **{k: str(p) for k, p in zip(slab_keys, slabs)}}]


def _resize_to(x: torch.Tensor, shape: Sequence[int], mode: str) -> np.ndarray:
    x = torch.as_tensor(x, dtype=torch.float32).detach().cpu()[None]  # the network's output may be on a GPU
    kw = {} if mode == "nearest" else {"align_corners": False}
    return torch.nn.functional.interpolate(x, size=tuple(int(s) for s in shape), mode=mode, **kw)[0, 0].numpy()


class SavePredictiond(MapTransform):
    """Write the mask and the attention map at the X-ray's original size as PNG and/or NIfTI.

    Expects ``pred`` (1, h, w) probabilities and ``attention`` (1, h, w) probabilities on the network
    grid, and ``xray_path`` / ``xray_shape`` / ``xray_spacing`` from ``LoadRadiographd``. Writes
    ``<output_dir>/<name>_mask.{png,nii.gz}`` (0/255 PNG, 0/1 uint8 NIfTI) and
    ``<name>_attention.{png,nii.gz}`` (0..255 PNG, float32 NIfTI), ``<name>`` = the X-ray file name
    without extension. NIfTI files use the DRR contract's layout (SimpleITK-compatible, spacing in mm).

    Args:
        keys: the prediction key. Default "pred".
        attention_key: the attention key. Default "attention".
        output_dir: folder to write into (created).
        formats: any of "png", "nifti". Default ("png", "nifti").
        threshold: probability threshold of the mask. Default 0.5.
    """

    def __init__(self, keys: KeysCollection = "pred", attention_key: str = "attention", output_dir: str = "./pred", formats: Sequence[str] = ("png", "nifti"), threshold: float = 0.5) -> None:
        super().__init__(keys)
        self.attention_key = attention_key
        self.output_dir = str(output_dir)
        self.formats = tuple(formats)
        self.threshold = threshold

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
        name = Path(str(d["xray_path"])).name
        for ext in (".nii.gz", ".nii", ".png", ".dcm", ".dicom"):
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
                break
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

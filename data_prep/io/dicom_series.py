"""Read one axial CT series into an HU-normalized volume, checking its slice geometry.

Rules (also in the README):

* HU = stored * RescaleSlope + RescaleIntercept; stored values equal to PixelPaddingValue
  (or inside its PixelPaddingRangeLimit range), and anything below -1024 HU (out-of-field
  -2000/-3024 fills), become air, -1024; values are clipped to [-1024, 3071].
* Slices are sorted by their position along the slice normal (ImagePositionPatient projected
  on the cross product of ImageOrientationPatient), not by file name or InstanceNumber.
* Duplicated positions: identical pixels are dropped silently; otherwise the slice with the
  lower InstanceNumber is kept (pylidc's rule, so the reads line up) and a warning is recorded.
* Uneven spacing is kept: positions are carried along and resampling interpolates at the real
  positions. A gap larger than ``max_gap_factor`` times the median spacing (missing slices) is
  an error for the case; smaller irregularities are recorded as warnings.
* Only axial series with ImageOrientationPatient (1,0,0,0,1,0) are accepted (all of LIDC-IDRI);
  gantry tilt, other orientations, mixed image sizes or pixel spacings are errors for the case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pydicom

__all__ = ["CTVolume", "SeriesError", "load_ct_series", "HU_MIN", "HU_MAX"]

HU_MIN = -1024
HU_MAX = 3071
_AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


class SeriesError(ValueError):
    """A series that cannot be turned into a volume; the message names the file and problem."""


@dataclass
class CTVolume:
    """An axial CT volume in canonical LPS orientation (identity direction).

    Args:
        hu: int16 HU, shape (z, y, x): z increasing toward superior, y toward posterior,
            x toward patient left.
        z_positions: world z (mm) of each slice, increasing, shape (z,).
        origin_xy: world (x, y) mm of voxel (y=0, x=0).
        pixel_spacing: (row spacing = y, column spacing = x) in mm.
        files: the file of each slice, in array order.
        warnings: non-fatal irregularities found while reading.
    """

    hu: np.ndarray
    z_positions: np.ndarray
    origin_xy: tuple[float, float]
    pixel_spacing: tuple[float, float]
    files: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def slice_spacing(self) -> float:
        """Median distance between slices (mm); 0 for a single slice."""
        return float(np.median(np.diff(self.z_positions))) if len(self.z_positions) > 1 else 0.0


def _float_list(ds, tag: str, n: int, path: str) -> np.ndarray:
    value = ds.get(tag)
    if value is None or len(value) != n:
        raise SeriesError(f"{path}: {tag} is missing or malformed ({value!r})")
    return np.asarray([float(v) for v in value])


_UNCOMPRESSED_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _stored_pixels(ds) -> np.ndarray:
    """The stored values of one frame; uncompressed 16-bit data is viewed directly (no copy)."""
    tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    bits_stored = int(ds.get("BitsStored", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    plain = (
        tsyntax in _UNCOMPRESSED_LE
        and int(ds.get("BitsAllocated", 0) or 0) == 16
        and int(ds.get("SamplesPerPixel", 1) or 1) == 1
    )
    rows, cols = int(ds.Rows), int(ds.Columns)
    if plain and (bits_stored == 16 or not signed) and len(ds.PixelData) == 2 * rows * cols:
        stored = np.frombuffer(ds.PixelData, dtype="<i2" if signed else "<u2").reshape(rows, cols)
        return stored if bits_stored == 16 else stored & np.uint16((1 << bits_stored) - 1)
    return ds.pixel_array  # compressed, odd bit depths, multi-frame: let pydicom decode


def _to_hu(ds, path: str) -> np.ndarray:
    try:
        stored = _stored_pixels(ds)
    except Exception as exc:
        raise SeriesError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    if stored.ndim != 2:
        raise SeriesError(f"{path}: expected one 2D frame, found pixel array of shape {stored.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 1 and intercept == int(intercept):  # the usual case: exact integer arithmetic, no floats
        hu = stored.astype(np.int32)
        hu += int(intercept)
    else:
        hu = stored.astype(np.float32) * slope + intercept
    pad = ds.get("PixelPaddingValue")
    if pad is not None:
        limit = ds.get("PixelPaddingRangeLimit")
        lo, hi = sorted((int(pad), int(pad if limit is None else limit)))
        hu[(stored >= lo) & (stored <= hi)] = HU_MIN
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu.astype(np.int16)


def load_ct_series(files: Sequence[str], *, max_gap_factor: float = 2.1, min_slices: int = 2) -> CTVolume:
    """Read, validate and stack the slices of one axial CT series.

    Args:
        files: the series' DICOM files, any order.
        max_gap_factor: a step between slices larger than this times the median step is an
            error (missing slices). Default 2.1, so one missing slice (a step of 2x) is
            interpolated over with a warning and two are an error.
        min_slices: fewer slices than this is an error. Default 2.

    Returns:
        A :class:`CTVolume`.

    Raises:
        SeriesError: naming the file and the problem.
    """
    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise SeriesError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from exc
        if str(ds.get("Modality", "")).upper() != "CT":
            raise SeriesError(f"{path}: not a CT image (Modality {ds.get('Modality')!r})")
        iop = _float_list(ds, "ImageOrientationPatient", 6, path)
        if not np.allclose(iop, _AXIAL, atol=1e-3):
            raise SeriesError(
                f"{path}: ImageOrientationPatient {iop.round(4).tolist()} is not axial (1,0,0,0,1,0); "
                "tilted or reformatted series are not supported"
            )
        ipp = _float_list(ds, "ImagePositionPatient", 3, path)
        spacing = tuple(_float_list(ds, "PixelSpacing", 2, path))
        shape = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
        headers.append((ipp, spacing, shape, int(ds.get("InstanceNumber", 0) or 0), path, ds))
    if len(headers) < min_slices:
        raise SeriesError(f"series of {files[0] if files else '?'}: only {len(headers)} slice(s), need {min_slices}")

    ref_ipp, ref_spacing, ref_shape, _, ref_path, _ = headers[0]
    for ipp, spacing, shape, _, path, _ in headers[1:]:
        if shape != ref_shape:
            raise SeriesError(f"{path}: image size {shape} differs from {ref_shape} in {ref_path}")
        if not np.allclose(spacing, ref_spacing, atol=1e-4):
            raise SeriesError(f"{path}: PixelSpacing {spacing} differs from {ref_spacing} in {ref_path}")
        if not np.allclose(ipp[:2], ref_ipp[:2], atol=0.05):
            raise SeriesError(
                f"{path}: in-plane ImagePositionPatient {ipp[:2].tolist()} differs from {ref_ipp[:2].tolist()} "
                f"in {ref_path} (gantry tilt is not supported)"
            )

    warnings: list[str] = []
    headers.sort(key=lambda h: (h[0][2], h[3]))  # by z, then lower InstanceNumber first
    kept = [headers[0]]
    hu_cache: dict[str, np.ndarray] = {}
    for h in headers[1:]:
        prev = kept[-1]
        if abs(h[0][2] - prev[0][2]) < 1e-3:
            a = hu_cache.setdefault(prev[4], _to_hu(prev[5], prev[4]))
            b = _to_hu(h[5], h[4])
            if not np.array_equal(a, b):
                warnings.append(
                    f"duplicate position z={h[0][2]:.3f}: kept {prev[4]} (InstanceNumber {prev[3]}), "
                    f"dropped {h[4]} (InstanceNumber {h[3]}) with different pixels"
                )
            continue
        kept.append(h)
    if len(kept) < min_slices:
        raise SeriesError(f"{kept[0][4]}: only {len(kept)} distinct slice position(s), need {min_slices}")

    z = np.array([h[0][2] for h in kept])
    steps = np.diff(z)
    median = float(np.median(steps))
    worst = int(np.argmax(steps))
    if steps[worst] > max_gap_factor * median:
        raise SeriesError(
            f"{kept[worst + 1][4]}: gap of {steps[worst]:.2f} mm between z={z[worst]:.2f} and z={z[worst + 1]:.2f} "
            f"(median spacing {median:.2f} mm): slices are missing"
        )
    if np.any(np.abs(steps - median) > 0.01 * median + 1e-3):
        warnings.append(
            f"uneven slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm (median {median:.3f}); "
            "resampling interpolates at the real positions"
        )

    hu = np.empty((len(kept),) + ref_shape, dtype=np.int16)
    for i, (_, _, _, _, path, ds) in enumerate(kept):
        hu[i] = hu_cache[path] if path in hu_cache else _to_hu(ds, path)
    return CTVolume(
        hu=hu,
        z_positions=z,
        origin_xy=(float(ref_ipp[0]), float(ref_ipp[1])),
        pixel_spacing=(float(ref_spacing[0]), float(ref_spacing[1])),
        files=[h[4] for h in kept],
        warnings=warnings,
    )

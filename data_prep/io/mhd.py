"""Read and write MetaImage CT volumes (``.mhd`` + ``.raw``/``.zraw``) safely, as LUNA16 ships them.

The header is parsed and checked here before SimpleITK touches the pixels, so a broken file fails
with a message that names it and the problem instead of an ITK stack trace:

* required keys: ``NDims = 3``, ``DimSize`` (x y z), ``ElementType``, ``ElementSpacing`` (x y z,
  mm) and ``Offset`` (or ``Position``/``Origin``: world x y z of the first voxel), then
  ``ElementDataFile`` (a file beside the header, or ``LOCAL``). ITK would silently default a
  missing spacing to 1 mm and a missing origin to 0, which misplaces every world annotation, so
  both are required here. Keys are case-sensitive, as in ITK's MetaIO.
* uncompressed data: the data file must hold exactly ``prod(DimSize) * element size`` bytes
  (plus ``HeaderSize``), checked before reading. ``CompressedData = True`` (``.zraw``, zlib): the
  stream is decompressed once to check that it is intact and holds exactly the header's number of
  bytes (ITK only prints "Uncompress failed" and returns an image of garbage), then SimpleITK reads it.
* ``TransformMatrix`` (direction): a signed permutation (axis flips or swaps) is reoriented to
  identity LPS with ``sitk.DICOMOrient(img, "LPS")``, so voxel values keep their world positions;
  an oblique matrix is rejected.
* HU: LUNA16 stores HU directly (``MET_SHORT``). Out-of-field padding (-3024, -2048, -2000) and
  anything below -1024 becomes -1024 (air); values are clipped to [-1024, 3071]; floats are
  rounded. (MetaImage has no PixelPaddingValue: a padding value inside the HU range cannot be told
  apart from tissue.)

Arrays are ``(z, y, x)`` (SimpleITK/numpy order); header vectors and the ``*_xyz`` fields are
``(x, y, z)``; world coordinates are LPS mm.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from data_prep.io.dicom_series import HU_MAX, HU_MIN, CTVolume, SeriesError

__all__ = ["MhdError", "MhdHeader", "MhdImage", "read_mhd_header", "read_mhd", "write_mhd", "ELEMENT_BYTES"]

#: MetaImage element types accepted, with their size in bytes.
ELEMENT_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip
_MAX_HEADER_BYTES = 1 << 16
_ORIGIN_KEYS = ("Offset", "Position", "Origin")
_DIRECTION_KEYS = ("TransformMatrix", "Rotation", "Orientation")


class MhdError(SeriesError):
    """A MetaImage file that cannot be read as a CT volume; the message names the file and problem."""


@dataclass(frozen=True)
class MhdHeader:
    """The checked header of a MetaImage file.

    Args:
        path: the ``.mhd`` file.
        fields: every ``key = value`` of the header, as text.
        size_xyz: DimSize, (x, y, z) voxels.
        spacing_xyz: ElementSpacing, (x, y, z) mm.
        origin_xyz: world (x, y, z) mm of the first voxel, as stored (before reorientation).
        direction: the 3x3 direction matrix as written in ``TransformMatrix`` (row by row of the
            text; MetaImage stores it column-major, i.e. transposed relative to ITK; the checks
            here do not depend on it), identity when absent.
        element_type: e.g. ``MET_SHORT``.
        data_file: the pixel data file (the header itself for ``LOCAL``).
        compressed: ``CompressedData = True``.
    """

    path: Path
    fields: dict[str, str]
    size_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]
    element_type: str
    data_file: Path
    compressed: bool

    @property
    def n_bytes(self) -> int:
        """Bytes of uncompressed pixel data."""
        return int(np.prod(self.size_xyz)) * ELEMENT_BYTES[self.element_type]


@dataclass
class MhdImage:
    """A MetaImage CT volume in canonical LPS orientation (identity direction), HU-normalized.

    Args:
        hu: int16 HU, shape (z, y, x): z toward superior, y toward posterior, x toward patient left.
        origin_xyz: world (x, y, z) mm of voxel (z=0, y=0, x=0).
        spacing_xyz: (x, y, z) voxel spacing, mm.
        header: the file's checked header (geometry as stored, before reorientation).
        reoriented: True when the stored direction was not identity and the volume was reoriented.
        warnings: non-fatal irregularities.
    """

    hu: np.ndarray
    origin_xyz: tuple[float, float, float]
    spacing_xyz: tuple[float, float, float]
    header: MhdHeader
    reoriented: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def z_positions(self) -> np.ndarray:
        """World z (mm) of each slice, increasing, shape (z,)."""
        return self.origin_xyz[2] + np.arange(self.hu.shape[0]) * self.spacing_xyz[2]

    def to_ct_volume(self) -> CTVolume:
        """The volume as a :class:`data_prep.io.dicom_series.CTVolume` (shares ``hu``, no copy)."""
        return CTVolume(
            hu=self.hu,
            z_positions=self.z_positions,
            origin_xy=(self.origin_xyz[0], self.origin_xyz[1]),
            pixel_spacing=(self.spacing_xyz[1], self.spacing_xyz[0]),  # (row = y, column = x)
            files=[str(self.header.path)],
            warnings=list(self.warnings),
        )


def _numbers(fields: dict, key: str, n: int, path: Path, kind=float) -> tuple:
    text = fields.get(key)
    if text is None:
        raise MhdError(f"{path}: header has no {key}")
    try:
        values = tuple(kind(v) for v in text.split())
    except ValueError:
        raise MhdError(f"{path}: {key} = {text!r} is not {n} numbers") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise MhdError(f"{path}: {key} = {text!r} is not {n} finite numbers")
    return values


def _parse_fields(path: Path) -> tuple[dict[str, str], int]:
    """``key = value`` pairs up to and including ElementDataFile, and the header's length in bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(_MAX_HEADER_BYTES)
    except OSError as exc:
        raise MhdError(f"{path}: cannot read the header ({exc.strerror or exc})") from exc
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        end = len(head) if end < 0 else end + 1
        line = head[pos:end].decode("latin-1").strip()
        pos = end
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise MhdError(f"{path}: header line {line[:60]!r} is not 'key = value' (not a MetaImage header?)")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, pos
    raise MhdError(f"{path}: header has no ElementDataFile line (truncated header, or not a MetaImage file)")


def read_mhd_header(path: str | Path) -> MhdHeader:
    """Parse and check a MetaImage header and the size of its data file (no pixels are read).

    Args:
        path: the ``.mhd`` file.

    Returns:
        The :class:`MhdHeader`.

    Raises:
        MhdError: naming the file and the problem (missing or malformed key, unsupported type or
            layout, oblique direction, missing data file, data file of the wrong size).
    """
    path = Path(path)
    fields, header_len = _parse_fields(path)
    if fields.get("ObjectType", "Image") != "Image":
        raise MhdError(f"{path}: ObjectType is {fields['ObjectType']!r}, not Image")
    (ndims,) = _numbers(fields, "NDims", 1, path, int)
    if ndims != 3:
        raise MhdError(f"{path}: NDims = {ndims}; a CT volume needs 3")
    size = _numbers(fields, "DimSize", 3, path, int)
    if min(size) < 1:
        raise MhdError(f"{path}: DimSize = {fields['DimSize']!r} has an empty axis")
    spacing = _numbers(fields, "ElementSpacing", 3, path)
    if min(spacing) <= 0:
        raise MhdError(f"{path}: ElementSpacing = {fields['ElementSpacing']!r} must be positive")
    origin_key = next((k for k in _ORIGIN_KEYS if k in fields), None)
    if origin_key is None:
        raise MhdError(
            f"{path}: header has no Offset (world position of the first voxel); world annotations cannot be placed"
        )
    origin = _numbers(fields, origin_key, 3, path)
    dir_key = next((k for k in _DIRECTION_KEYS if k in fields), None)
    direction = _numbers(fields, dir_key, 9, path) if dir_key else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    m = np.asarray(direction).reshape(3, 3)
    if not np.allclose(np.abs(m).round(), np.abs(m), atol=1e-3) or not np.allclose(
        np.abs(m).round() @ np.abs(m).round().T, np.eye(3)
    ):
        raise MhdError(
            f"{path}: {dir_key} = {fields[dir_key]!r} is oblique (not a permutation of the axes with flips); "
            "oblique volumes are not supported"
        )
    etype = fields.get("ElementType")
    if etype is None:
        raise MhdError(f"{path}: header has no ElementType")
    if etype not in ELEMENT_BYTES:
        raise MhdError(f"{path}: ElementType {etype!r} is not supported (one of {', '.join(ELEMENT_BYTES)})")
    if int(fields.get("ElementNumberOfChannels", "1") or 1) != 1:
        raise MhdError(f"{path}: ElementNumberOfChannels = {fields['ElementNumberOfChannels']}; CT needs one channel")
    if fields.get("BinaryData", "True").lower() != "true":
        raise MhdError(f"{path}: BinaryData = {fields['BinaryData']}; ASCII pixel data is not supported")
    compressed = fields.get("CompressedData", "False").lower() == "true"
    name = fields["ElementDataFile"]
    if name.upper() == "LIST" or "%" in name or not name:
        raise MhdError(f"{path}: ElementDataFile = {name!r}: only a single data file (or LOCAL) is supported")
    local = name.upper() == "LOCAL"
    data_file = path if local else path.parent / name
    try:
        file_bytes = data_file.stat().st_size
    except OSError as exc:
        raise MhdError(f"{path}: pixel data file {data_file} is missing or unreadable ({exc.strerror or exc})") from exc
    header = MhdHeader(path, fields, size, spacing, origin, direction, etype, data_file, compressed)
    skip = header_len if local else 0
    header_size = int(fields.get("HeaderSize", "0") or 0)
    if compressed:
        expected = fields.get("CompressedDataSize")
        if expected is not None and int(expected) != file_bytes - skip:
            raise MhdError(
                f"{data_file}: holds {file_bytes - skip} bytes of compressed data, header {path.name} says "
                f"CompressedDataSize = {expected} (truncated or wrong file)"
            )
    elif header_size == -1 or local:
        if file_bytes - skip < header.n_bytes:
            raise MhdError(
                f"{data_file}: holds {file_bytes - skip} bytes, {path.name} needs {_need(header)} (truncated?)"
            )
    elif file_bytes != header.n_bytes + header_size:
        raise MhdError(
            f"{data_file}: holds {file_bytes} bytes, header {path.name} needs {_need(header)}"
            + (f" + HeaderSize {header_size}" if header_size else "")
            + (
                " (truncated)"
                if file_bytes < header.n_bytes + header_size
                else " (wrong file or wrong DimSize/ElementType)"
            )
        )
    return header


def _need(h: MhdHeader) -> str:
    x, y, z = h.size_xyz
    return f"DimSize {x} x {y} x {z} x {ELEMENT_BYTES[h.element_type]} bytes ({h.element_type}) = {h.n_bytes} bytes"


def _check_compressed(header: MhdHeader, chunk: int = 1 << 22) -> None:
    """Decompress a .zraw (zlib, possibly several concatenated streams) and count its bytes."""
    total, d, started = 0, zlib.decompressobj(), False
    try:
        with open(header.data_file, "rb") as f:
            if header.data_file == header.path:  # LOCAL: the data follows the header
                f.seek(_parse_fields(header.path)[1])
            while buf := f.read(chunk):
                while buf:
                    total += len(d.decompress(buf, chunk * 8))
                    started = True
                    if d.eof:  # the end of one stream; anything after it starts the next
                        buf, d, started = d.unused_data, zlib.decompressobj(), False
                    else:
                        buf = d.unconsumed_tail
    except zlib.error as exc:
        raise MhdError(f"{header.path}: compressed data in {header.data_file.name} is corrupt (zlib: {exc})") from exc
    except OSError as exc:
        raise MhdError(f"{header.path}: cannot read {header.data_file} ({exc.strerror or exc})") from exc
    if started or total != header.n_bytes:
        raise MhdError(
            f"{header.path}: {header.data_file.name} decompresses to {total} bytes"
            f"{' and ends inside a stream' if started else ''}; the header needs {_need(header)} "
            "(truncated or wrong file)"
        )


def read_mhd(path: str | Path) -> MhdImage:
    """Read a MetaImage CT volume: checked header, LPS reorientation, HU normalization.

    Args:
        path: the ``.mhd`` file.

    Returns:
        An :class:`MhdImage` with int16 HU in (z, y, x) and identity direction.

    Raises:
        MhdError: naming the file and the problem (see the module docstring).
    """
    header = read_mhd_header(path)
    if header.compressed:
        _check_compressed(header)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("MetaImageIO")
    reader.SetFileName(str(header.path))
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        detail = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        raise MhdError(
            f"{header.path}: SimpleITK cannot read the pixel data in {header.data_file.name}"
            f"{' (corrupt compressed stream?)' if header.compressed else ''}: {detail[-1] if detail else exc}"
        ) from exc
    reoriented = not np.allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    if reoriented:
        img = sitk.DICOMOrient(img, "LPS")
        if not np.allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-3):  # pragma: no cover - guarded above
            raise MhdError(f"{header.path}: direction {img.GetDirection()} could not be reoriented to LPS")
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(arr)
    if arr.dtype == np.int16:
        hu = np.clip(arr, HU_MIN, HU_MAX, out=arr)
    else:
        hu = np.clip(arr, HU_MIN, HU_MAX).astype(np.int16)
    warnings = []
    if hu.size and int(hu.min()) >= 0:
        warnings.append(f"{header.path.name}: no value below 0: the volume may not be stored as HU")
    return MhdImage(
        hu=hu,
        origin_xyz=tuple(float(v) for v in img.GetOrigin()),
        spacing_xyz=tuple(float(v) for v in img.GetSpacing()),
        header=header,
        reoriented=reoriented,
        warnings=warnings,
    )


def write_mhd(
    array: np.ndarray, path: str | Path, spacing_xyz, origin_xyz, *, direction=None, compress: bool = False
) -> Path:  # fmt: skip
    """Write a (z, y, x) array as ``.mhd`` + ``.raw`` (or ``.zraw``), both atomically.

    The pair is written into a temporary folder beside ``path``, then the data file and the
    header are renamed into place (data first), so no header ever points at a partial file.

    Args:
        array: voxels, shape (z, y, x), any SimpleITK pixel type (LUNA16: int16 HU).
        path: the ``.mhd`` file to write.
        spacing_xyz: (x, y, z) spacing, mm.
        origin_xyz: world (x, y, z) mm of voxel (0, 0, 0).
        direction: 9 numbers, ITK's row-major direction matrix. Default identity.
        compress: write zlib-compressed ``.zraw`` (``CompressedData = True``). Default False.

    Returns:
        The header path.
    """
    path = Path(path)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(v) for v in spacing_xyz))
    img.SetOrigin(tuple(float(v) for v in origin_xyz))
    if direction is not None:
        img.SetDirection(tuple(float(v) for v in direction))
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}."))
    try:
        sitk.WriteImage(img, str(tmp / path.name), compress)
        data = tmp / (path.stem + (".zraw" if compress else ".raw"))
        os.replace(data, path.parent / data.name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path

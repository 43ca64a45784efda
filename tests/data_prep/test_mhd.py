"""Tests for data_prep.io.mhd: MetaImage reading with HU rules, reorientation and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_prep.io.mhd import MhdError, read_mhd, read_mhd_header, write_mhd

SPACING = (0.7, 0.8, 2.5)  # (x, y, z)
ORIGIN = (-150.0, -120.0, -300.0)


def _volume(shape=(6, 10, 12), seed=0) -> np.ndarray:
    """A (z, y, x) int16 volume of distinct HU-like values."""
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def _write(tmp_path: Path, arr, name="scan", **kw) -> Path:
    return write_mhd(arr, tmp_path / f"{name}.mhd", SPACING, ORIGIN, **kw)


def _edit_header(path: Path, drop: str | None = None, set_: tuple[str, str] | None = None) -> None:
    lines = path.read_text().splitlines()
    if drop:
        lines = [ln for ln in lines if not ln.startswith(f"{drop} =")]
    if set_:
        lines = [f"{set_[0]} = {set_[1]}" if ln.startswith(f"{set_[0]} =") else ln for ln in lines]
    path.write_text("\n".join(lines) + "\n")


def test_hu_rules_padding_and_clipping(tmp_path):
    """LUNA16 padding (-3024, -2048, -2000) and anything below -1024 become -1024; values above 3071 are clipped."""
    arr = _volume()
    arr[0, 0, :5] = [-3024, -2048, -2000, -1500, 4000]
    img = read_mhd(_write(tmp_path, arr))
    assert img.hu.dtype == np.int16 and img.hu.shape == arr.shape
    assert img.hu[0, 0, :5].tolist() == [-1024, -1024, -1024, -1024, 3071]
    assert np.array_equal(img.hu[1:], arr[1:])
    assert img.origin_xyz == ORIGIN and np.allclose(img.spacing_xyz, SPACING) and not img.reoriented
    vol = img.to_ct_volume()
    assert np.allclose(vol.z_positions, ORIGIN[2] + 2.5 * np.arange(6)) and vol.pixel_spacing == pytest.approx(
        (0.8, 0.7)
    )


def test_float_volume_is_rounded_to_int16(tmp_path):
    """A MET_FLOAT volume is rounded to the nearest integer HU."""
    arr = np.full((3, 4, 5), 10.6, dtype=np.float32)
    arr[0, 0, 0] = -5000.0
    hu = read_mhd(_write(tmp_path, arr)).hu
    assert hu.dtype == np.int16 and hu[1, 1, 1] == 11 and hu[0, 0, 0] == -1024


@pytest.mark.parametrize(
    "direction",
    [
        (-1, 0, 0, 0, 1, 0, 0, 0, 1),
        (1, 0, 0, 0, -1, 0, 0, 0, -1),
        (0, 1, 0, 1, 0, 0, 0, 0, 1),
        (0, 0, 1, 1, 0, 0, 0, -1, 0),
    ],
    ids=["flip-x", "flip-yz", "swap-xy", "permute-flip"],
)
def test_signed_permutation_is_reoriented_to_lps(tmp_path, direction):
    """Flipped or swapped axes are reoriented to identity; every value stays at its world position."""
    arr = _volume()
    path = _write(tmp_path, arr, direction=direction)
    img = read_mhd(path)
    assert img.reoriented
    src = sitk.ReadImage(str(path))
    for idx in [(0, 0, 0), (11, 9, 5), (3, 7, 2)]:  # (x, y, z) index in the stored image
        world = np.array(src.TransformIndexToPhysicalPoint(idx))
        k = np.rint((world - np.array(img.origin_xyz)) / np.array(img.spacing_xyz)).astype(int)  # (x, y, z) in ours
        assert img.hu[k[2], k[1], k[0]] == arr[idx[2], idx[1], idx[0]]
    assert np.allclose(sorted(img.spacing_xyz), sorted(SPACING))


def test_oblique_direction_is_rejected(tmp_path):
    """A rotated (oblique) TransformMatrix fails with a message naming the file and 'oblique'."""
    c, s = np.cos(0.3), np.sin(0.3)
    path = _write(tmp_path, _volume(), direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    with pytest.raises(MhdError, match="oblique") as err:
        read_mhd(path)
    assert str(path) in str(err.value)


def test_zraw_reads_like_raw(tmp_path):
    """A compressed .zraw (CompressedData = True) reads to the same HU as the .raw."""
    arr = _volume(shape=(5, 40, 40))
    raw, zraw = _write(tmp_path, arr, "a"), _write(tmp_path, arr, "b", compress=True)
    assert (tmp_path / "b.zraw").exists() and "CompressedData = True" in zraw.read_text()
    assert read_mhd_header(zraw).compressed
    assert np.array_equal(read_mhd(raw).hu, read_mhd(zraw).hu)


def test_missing_and_wrong_size_raw_are_named(tmp_path):
    """A missing raw file and a raw file of the wrong size fail before reading, naming the file and the sizes."""
    path = _write(tmp_path, _volume())
    raw = tmp_path / "scan.raw"
    data = raw.read_bytes()
    raw.write_bytes(data[:-100])
    with pytest.raises(
        MhdError, match=r"holds 1340 bytes.*DimSize 12 x 10 x 6 x 2 bytes \(MET_SHORT\) = 1440 bytes \(truncated\)"
    ):
        read_mhd(path)
    raw.write_bytes(data + b"\0" * 8)
    with pytest.raises(MhdError, match="wrong file"):
        read_mhd(path)
    raw.unlink()
    with pytest.raises(MhdError, match="scan.raw is missing"):
        read_mhd(path)


def test_corrupt_or_truncated_zraw_is_named(tmp_path):
    """A damaged or cut compressed stream fails with the header's path (ITK itself would return garbage)."""
    path = _write(tmp_path, _volume(shape=(4, 30, 30)), compress=True)
    zraw = tmp_path / "scan.zraw"
    good = zraw.read_bytes()
    data = bytearray(good)
    data[10:40] = b"\xff" * 30
    zraw.write_bytes(bytes(data))
    with pytest.raises(MhdError, match="scan.zraw is corrupt") as err:
        read_mhd(path)
    assert str(path) in str(err.value)
    zraw.write_bytes(good[: len(good) // 2])
    with pytest.raises(MhdError, match="holds .* bytes of compressed data.*CompressedDataSize"):
        read_mhd(path)
    _edit_header(path, drop="CompressedDataSize")
    with pytest.raises(MhdError, match="ends inside a stream"):
        read_mhd(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"drop": "DimSize"}, "no DimSize"),
        ({"drop": "ElementType"}, "no ElementType"),
        ({"drop": "ElementDataFile"}, "no ElementDataFile"),
        ({"drop": "ElementSpacing"}, "no ElementSpacing"),
        ({"drop": "Offset"}, "no Offset"),
        ({"set_": ("NDims", "2")}, "NDims = 2"),
        ({"set_": ("DimSize", "12 10")}, "DimSize = '12 10' is not 3"),
        ({"set_": ("ElementSpacing", "0.7 x 2.5")}, "ElementSpacing = '0.7 x 2.5' is not 3 numbers"),
        ({"set_": ("ElementType", "MET_LONG_LONG_ARRAY")}, "ElementType 'MET_LONG_LONG_ARRAY' is not supported"),
    ],
)
def test_corrupt_header_is_named(tmp_path, edit, message):
    """A header missing or garbling a required key fails with the file and the key in the message."""
    path = _write(tmp_path, _volume())
    _edit_header(path, **edit)
    with pytest.raises(MhdError, match=message) as err:
        read_mhd(path)
    assert str(path) in str(err.value)


def test_not_a_header_is_named(tmp_path):
    """A binary file given as .mhd fails clearly (MhdError is a SeriesError, so a step records it per case)."""
    from data_prep.io.dicom_series import SeriesError

    path = tmp_path / "junk.mhd"
    path.write_bytes(b"\x00\x01\x02 binary")
    with pytest.raises(SeriesError, match="junk.mhd.*not 'key = value'"):
        read_mhd(path)

"""Tests for data_prep.io.dicom_series: HU conversion, slice order and geometry checks."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.io.dicom_series import HU_MIN, SeriesError, load_ct_series


def test_hu_applies_slope_intercept_and_padding(make_series):
    """Stored values become HU via slope/intercept; padding and below-air values become -1024."""
    files = make_series(n=3, value=1000, slope=2.0, intercept=-1000.0, padding=-2000)
    import pydicom

    ds = pydicom.dcmread(files[0])
    arr = ds.pixel_array.copy()
    arr[0, :4] = -2000  # padding value
    arr[1, :4] = -1500  # -4000 HU: out of field
    arr[2, :4] = 3000  # 5000 HU: above the clip
    ds.PixelData = arr.astype(np.int16).tobytes()
    ds.save_as(files[0])
    vol = load_ct_series([str(f) for f in files])
    assert vol.hu.dtype == np.int16
    assert vol.hu[0, 5, 5] == 1000 * 2 - 1000
    assert (vol.hu[0, 0, :4] == HU_MIN).all() and (vol.hu[0, 1, :4] == HU_MIN).all()
    assert (vol.hu[0, 2, :4] == 3071).all()
    assert vol.hu[2, 5, 5] == (1000 + 2) * 2 - 1000


def test_slices_sorted_by_position_not_file_order(make_series):
    """Slices come out ordered by ImagePositionPatient z, whatever the file or instance order."""
    files = make_series(n=4, zs=[3.0, 0.0, 2.0, 1.0])
    vol = load_ct_series([str(f) for f in reversed(files)])
    assert np.allclose(vol.z_positions, [0, 1, 2, 3])
    # file i holds value i (+ intercept); z=0 is file 1, z=1 is file 3, ...
    assert [int(vol.hu[k, 0, 0]) + 1024 for k in range(4)] == [1, 3, 2, 0]
    assert vol.slice_spacing == pytest.approx(1.0)


def test_duplicate_positions_keep_lower_instance_number(make_series):
    """Two slices at one position: identical ones merge silently, different ones keep the lower InstanceNumber and warn."""
    files = make_series(n=4, zs=[0, 1, 1, 2])
    vol = load_ct_series([str(f) for f in files])
    assert len(vol.z_positions) == 3
    assert int(vol.hu[1, 0, 0]) + 1024 == 1  # instance 2 kept over instance 3
    assert any("duplicate position" in w for w in vol.warnings)


def test_one_missing_slice_is_interpolated_two_are_an_error(make_series):
    """A single missing slice is tolerated with a warning; a bigger gap names the file after it."""
    vol = load_ct_series([str(f) for f in make_series("a", zs=[0, 1, 2, 4, 5])])
    assert any("uneven" in w for w in vol.warnings)
    files = make_series("b", zs=[0, 1, 2, 5, 6])
    with pytest.raises(SeriesError, match=r"gap of 3\.00 mm.*missing") as err:
        load_ct_series([str(f) for f in files])
    assert str(files[3]) in str(err.value)


def test_non_axial_and_mixed_geometry_are_errors(make_series):
    """Tilted orientation, mixed pixel spacing and non-CT files are rejected with the file named."""
    files = make_series("tilt", n=3, orientation=(1, 0, 0, 0, 0.9, 0.43589))
    with pytest.raises(SeriesError, match="not axial"):
        load_ct_series([str(f) for f in files])
    a = make_series("mix1", n=2, series_uid="1.2.3.4")
    b = make_series("mix2", zs=[5], series_uid="1.2.3.4", pixel_spacing=0.5)
    with pytest.raises(SeriesError, match="PixelSpacing") as err:
        load_ct_series([str(f) for f in a + b])
    assert str(b[0]) in str(err.value)
    mr = make_series("mr", n=2, modality="MR")
    with pytest.raises(SeriesError, match="not a CT"):
        load_ct_series([str(f) for f in mr])


def test_truncated_file_is_named(make_series):
    """A truncated DICOM file gives an error that names it instead of a pydicom traceback."""
    files = make_series(n=3)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(SeriesError) as err:
        load_ct_series([str(f) for f in files])
    assert str(files[1]) in str(err.value)


def test_real_sample_geometry(sample_root):
    """The real 0001 run loads as 16 slices 2.5 mm apart with its DICOM pixel spacing and air at -1024."""
    files = sorted(str(p) for p in (sample_root / "LIDC-IDRI-0001").rglob("*.dcm"))
    vol = load_ct_series(files)
    assert vol.hu.shape == (16, 512, 512)
    assert np.allclose(np.diff(vol.z_positions), 2.5)
    assert vol.pixel_spacing == pytest.approx((0.703125, 0.703125))
    assert vol.hu.min() == HU_MIN
    assert not vol.warnings

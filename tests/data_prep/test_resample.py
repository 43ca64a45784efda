"""Tests for data_prep.ops.resample: grids and trilinear resampling at real slice positions."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.ops.resample import Grid, grid_to_sitk, resample_stack, target_grid


def _linear_field(z, ny, nx, ps, origin_xy):
    """A field linear in world x, y, z: exactly reproduced by (tri)linear interpolation."""
    y = origin_xy[1] + np.arange(ny) * ps[0]
    x = origin_xy[0] + np.arange(nx) * ps[1]
    return (2.0 * z[:, None, None] + 0.5 * y[None, :, None] - 0.25 * x[None, None, :]).astype(np.float32)


def test_target_grid_covers_stack_from_first_voxel():
    """The grid starts at the first voxel centre and holds every whole step inside the stack."""
    z = np.array([-10.0, -7.5, -5.0, -2.5])
    grid = target_grid(z, (-100.0, -50.0), (0.7, 0.7), 512, 512, (1.0, 1.0, 1.0))
    assert grid.origin == (-100.0, -50.0, -10.0)
    assert grid.shape == (8, 358, 358)  # 7.5 mm -> 8 planes; 511 * 0.7 = 357.7 mm -> 358
    with pytest.raises(ValueError, match="positive"):
        target_grid(z, (0, 0), (1, 1), 4, 4, (0, 1, 1))


@pytest.mark.parametrize("z", [[0.0, 1.0, 3.5, 4.0, 6.5], [0.0, 1.25, 2.5, 3.75, 5.0, 6.25]], ids=["uneven", "even"])
def test_linear_field_is_reproduced(z):
    """Resampling a field linear in world coordinates is exact, on even slices and between uneven ones."""
    z = np.array(z)
    ps, origin = (0.8, 0.6), (-5.0, 3.0)
    stack = _linear_field(z, 20, 30, ps, origin)
    grid = target_grid(z, origin, ps, 20, 30, (0.5, 1.0, 1.0))
    out = resample_stack(stack, z, origin, ps, grid)
    zt = grid.origin[2] + np.arange(grid.shape[0]) * grid.spacing[0]
    expected = _linear_field(zt, grid.shape[1], grid.shape[2], grid.spacing[1:], grid.origin[:2])
    assert out.shape == grid.shape
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_outside_the_stack_gets_fill_and_sub_grid_maps_back():
    """Voxels outside the stack get the fill value; a sub-grid's slices address the same world box."""
    z = np.array([0.0, 1.0, 2.0])
    stack = np.ones((3, 10, 10), dtype=np.float32)
    grid = Grid((-2.0, -2.0, -1.0), (1.0, 1.0, 1.0), (5, 14, 14))
    out = resample_stack(stack, z, (0.0, 0.0), (1.0, 1.0), grid, fill=-7)
    assert out[0].max() == -7 and out[4].max() == -7  # z = -1 and z = 3 lie outside
    assert out[1, 2, 2] == 1 and out[1, 0, 0] == -7
    sub, sl = grid.sub_grid((0.0, 0.0, 0.0), (9.0, 9.0, 2.0))
    assert sub.shape == (3, 10, 10) and sub.origin == (0.0, 0.0, 0.0)
    assert (out[sl] == 1).all()
    assert grid.sub_grid((100, 100, 100), (200, 200, 200)) is None


def test_grid_to_sitk_geometry():
    """The SimpleITK image carries the grid's origin and (x, y, z) spacing with identity direction."""
    grid = Grid((1.0, 2.0, 3.0), (2.5, 0.5, 0.75), (2, 3, 4))
    img = grid_to_sitk(np.zeros(grid.shape, np.int16), grid)
    assert img.GetSize() == (4, 3, 2)
    assert img.GetSpacing() == (0.75, 0.5, 2.5)
    assert img.GetOrigin() == (1.0, 2.0, 3.0)
    assert img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="does not match"):
        grid_to_sitk(np.zeros((1, 1, 1)), grid)


@pytest.mark.parametrize("z", [[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.5, 3.0]], ids=["even", "uneven"])
def test_int16_output_is_the_rounded_float_result(z):
    """round_to_int16 gives the float result rounded to the nearest integer, on both code paths."""
    z = np.array(z)
    rng = np.random.default_rng(0)
    stack = rng.integers(-1024, 2000, size=(4, 12, 12)).astype(np.int16)
    grid = target_grid(z, (0.0, 0.0), (0.7, 0.7), 12, 12, (0.5, 1.0, 1.0))
    as_float = resample_stack(stack, z, (0.0, 0.0), (0.7, 0.7), grid, fill=-1024)
    as_int = resample_stack(stack, z, (0.0, 0.0), (0.7, 0.7), grid, fill=-1024, round_to_int16=True)
    assert as_int.dtype == np.int16
    assert np.abs(as_int - as_float).max() <= 0.5 + 1e-3

"""Tiles of whole slices: MONAI's sliding-window geometry, the Gaussian blend, regions."""

import numpy as np
import pytest

from prosona_jax import tiling


@pytest.mark.parametrize("size, tile, overlap, want", [
    (512, 128, 0.25, [0, 96, 192, 288, 384]),  # step int(128 * 0.75) = 96
    (512, 128, 0.0, [0, 128, 256, 384]),
    (100, 32, 0.5, [0, 16, 32, 48, 64, 68]),  # the last tile moved back to end on the border
    (50, 32, 0.25, [0, 18]),
    (130, 128, 0.25, [0, 2]),
    (128, 128, 0.25, [0]),  # a side equal to the tile: one tile
])
def test_tile_starts_follow_monai(size, tile, overlap, want):
  assert tiling.scan_starts(size, tile, overlap) == want


def test_gaussian_importance_is_monai_gaussian_with_its_floor():
  w = tiling.gaussian_importance(128, 0.125)
  assert w.shape == (128, 128) and w.dtype == np.float32
  np.testing.assert_allclose(w, w.T)
  np.testing.assert_allclose(w, w[::-1, ::-1])
  centre = (128 - 1) / 2.0  # Between pixels 63 and 64.
  sigma = 0.125 * 128
  d = np.arange(128) - centre
  np.testing.assert_allclose(w[63], np.maximum(np.exp(-d ** 2 / (2 * sigma ** 2))
                                               * np.exp(-0.25 / (2 * sigma ** 2)), 1e-3),
                             rtol=1e-5)
  assert w.min() == pytest.approx(1e-3)  # The far corners, floored.
  assert w.max() == pytest.approx(np.exp(-0.5 / (2 * sigma ** 2)), rel=1e-6)


@pytest.mark.parametrize("shape", [(512, 512), (70, 45), (30, 50), (32, 32), (20, 9)])
def test_blending_a_model_that_returns_its_tile_rebuilds_the_slice(shape):
  """A 'model' whose output is its input: the blend must give the slice back everywhere."""
  rng = np.random.default_rng(sum(shape))
  x = rng.random(shape + (2,), np.float32)
  layout = tiling.sliding_window(shape, 32)
  tiles = layout.tiles(x)
  assert tiles.shape == (layout.num_tiles, 32, 32, 2)
  out = layout.blend(np.moveaxis(tiles, -1, 1))  # (T, 2, 32, 32) outputs.
  assert out.shape == (2,) + shape
  np.testing.assert_allclose(out, np.moveaxis(x, -1, 0), atol=1e-6)
  if max(shape) > 32:
    assert layout.describe()["blend"] == "gaussian"


def test_blend_weighs_tiles_by_the_gaussian():
  """Two tiles that disagree: each pixel leans to the tile whose centre is nearer."""
  layout = tiling.sliding_window((32, 50), 32)  # Tiles at columns 0 and 18.
  out = layout.blend(np.stack([np.zeros((1, 32, 32)), np.ones((1, 32, 32))]))[0]
  assert out[:, :18].max() == 0.0 and out[:, 32:].min() == 1.0  # One tile only.
  overlap = out[16, 18:32]
  assert np.all(np.diff(overlap) > 0)  # From the left tile's value to the right one's.
  w = tiling.gaussian_importance(32)
  np.testing.assert_allclose(out[16, 20], w[16, 2] / (w[16, 20] + w[16, 2]), rtol=1e-5)


def test_region_is_centred_on_the_point_inside_the_slice_and_zero_elsewhere():
  x = np.random.default_rng(0).random((512, 512, 1), np.float32)
  layout = tiling.region((512, 512), 128, (380, 120))
  assert layout.info["box"] == [[316, 444], [56, 184]]
  out = layout.blend(np.moveaxis(layout.tiles(x), -1, 1))[0]
  np.testing.assert_array_equal(out[316:444, 56:184], x[316:444, 56:184, 0])
  out[316:444, 56:184] = 0
  assert not out.any()
  # Near a border the region moves inside the slice; the point stays in it.
  assert tiling.region((512, 512), 128, (500, 3)).info["box"] == [[384, 512], [0, 128]]
  # A slice smaller than the tile: padded, then the padding cut off.
  small = tiling.region((30, 50), 32, (2, 40))
  assert small.info["box"] == [[0, 30], [18, 50]]
  with pytest.raises(ValueError, match="outside"):
    tiling.region((512, 512), 128, (512, 0))

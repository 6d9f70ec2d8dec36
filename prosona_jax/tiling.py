"""Whole images through a model of one fixed size: sliding windows, one region, padding.

A model sees s x s slices (its `data.image_size`). A `Layout` says where the tiles of an
(h, w) slice go and how their outputs are put back together:

- `sliding_window`: overlapping tiles over the whole slice, blended with a Gaussian
  importance map (the default for slices larger than the model);
- `region`: the one tile around a given point; pixels outside it are not predicted and
  get probability 0 (LIDC models are trained on crops centred on a nodule);
- a side shorter than s is zero-padded (centred) to s first, and the padding is cut off
  the outputs; a slice of exactly s x s is one tile, used as it is.

The geometry follows MONAI's `sliding_window_inference` (`monai.inferers.utils`,
`monai.data.utils`), so its figures carry over:

- tile size (`roi_size`) = the model's size; `overlap` (default 0.25) sets the step,
  `int(s * (1 - overlap))` pixels (at least 1; a side equal to s gets one tile);
- along each axis the tiles start at 0, step, 2 step, ... up to the first one that
  reaches the end, which is moved back to end on the border;
- `mode="gaussian"`: a tile's pixels weigh `exp(-d^2 / (2 sigma^2))` per axis, d the
  distance to the tile's centre, `sigma = sigma_scale * s` (default 0.125), floored at
  max(its smallest value, 1e-3) so that every covered pixel keeps a weight;
- output = sum over tiles of weight * tile output / sum of the weights.

What is blended is up to the caller; `predictor` blends probabilities (see there). This
module is numpy only: the model runs on batches of tiles, and the blend is a cheap
host-side weighted sum, so no compiled program depends on an image's size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

DEFAULT_OVERLAP = 0.25
DEFAULT_SIGMA_SCALE = 0.125
_MIN_WEIGHT = 1e-3  # MONAI's floor of the importance map.


def scan_starts(size: int, tile: int, overlap: float) -> list[int]:
  """Start offsets of the tiles along one axis of length `size` >= `tile` (MONAI's)."""
  if size < tile:
    raise ValueError(f"scan_starts: axis of {size} < tile {tile}; pad it first.")
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
  step = tile if size == tile else max(int(tile * (1.0 - overlap)), 1)
  starts, i = [], 0
  while True:
    start = i * step
    starts.append(min(start, size - tile))
    if start + tile >= size:
      return starts
    i += 1


def gaussian_importance(tile: int, sigma_scale: float = DEFAULT_SIGMA_SCALE) -> np.ndarray:
  """(tile, tile) float32 Gaussian weights, 1 at the centre (MONAI's `gaussian` mode)."""
  if sigma_scale <= 0:
    raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}.")
  x = np.arange(tile, dtype=np.float64) - (tile - 1) / 2.0
  g = np.exp(-x ** 2 / (2.0 * (sigma_scale * tile) ** 2))
  w = np.outer(g, g)
  return np.maximum(w, max(w.min(), _MIN_WEIGHT)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the tiles of one (h, w) slice go, and how their outputs are blended.

  Attributes:
    shape: (h, w) of the slice.
    tile: the model's size s.
    pad: ((top, bottom), (left, right)): zeros that bring a side shorter than s to s.
    starts: (T, 2) int, each tile's top-left corner in the padded slice.
    weight: (s, s) float32 weight of a tile's pixels in the blend.
    mode: `sliding_window` or `region`.
    info: what the manifest records about this layout (`describe`).
  """
  shape: tuple[int, int]
  tile: int
  pad: tuple[tuple[int, int], tuple[int, int]]
  starts: np.ndarray
  weight: np.ndarray
  mode: str
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def num_tiles(self) -> int:
    return int(len(self.starts))

  @property
  def padded_shape(self) -> tuple[int, int]:
    return tuple(n + a + b for n, (a, b) in zip(self.shape, self.pad))

  def pad_slice(self, x_hwC: np.ndarray) -> np.ndarray:
    """The slice with the layout's zero padding: (H, W, C)."""
    if not any(a or b for a, b in self.pad):
      return x_hwC
    return np.pad(x_hwC, list(self.pad) + [(0, 0)] * (x_hwC.ndim - 2))

  def cut(self, padded_HWC: np.ndarray, t: int) -> np.ndarray:
    """Tile t (s, s, C) of a padded slice."""
    y, x = self.starts[t]
    return padded_HWC[y:y + self.tile, x:x + self.tile]

  def tiles(self, x_hwC: np.ndarray) -> np.ndarray:
    """All tiles of a slice: (T, s, s, C)."""
    padded = self.pad_slice(x_hwC)
    return np.stack([self.cut(padded, t) for t in range(self.num_tiles)])

  def canvas(self, channels: int) -> "Canvas":
    """An empty blend of `channels` output maps per tile."""
    return Canvas(self, channels)

  def blend(self, out_TPss: np.ndarray) -> np.ndarray:
    """All tiles' outputs (T, P, s, s) -> (P, h, w) (see the module docstring)."""
    canvas = self.canvas(out_TPss.shape[1])
    for t, out in enumerate(out_TPss):
      canvas.add(t, out)
    return canvas.result()

  def coverage(self) -> np.ndarray:
    """(H, W) sum of the tile weights over the padded slice (0 where no tile reaches)."""
    total = np.zeros(self.padded_shape, np.float32)
    s = self.tile
    for y, x in self.starts:
      total[y:y + s, x:x + s] += self.weight
    return total

  def describe(self) -> dict:
    """The layout as manifest fields (JSON types)."""
    return {"mode": self.mode, "tile": self.tile, "tiles": self.num_tiles,
            "padding": [list(p) for p in self.pad], **self.info}


class Canvas:
  """The running weighted sum of one slice's tile outputs."""

  def __init__(self, layout: Layout, channels: int):
    self.layout = layout
    self.sum_PHW = np.zeros((channels,) + layout.padded_shape, np.float32)

  def add(self, t: int, out_Pss: np.ndarray) -> None:
    s, (y, x) = self.layout.tile, self.layout.starts[t]
    self.sum_PHW[:, y:y + s, x:x + s] += self.layout.weight * np.asarray(out_Pss, np.float32)

  def result(self) -> np.ndarray:
    """(P, h, w): the weighted mean where tiles reached, 0 elsewhere; padding cut off."""
    lay = self.layout
    if lay.num_tiles == 1 and np.all(lay.weight == 1.0):
      out = self.sum_PHW  # One unweighted tile: its output as it is.
    else:
      total = lay.coverage()
      out = np.where(total > 0, self.sum_PHW / np.where(total > 0, total, 1.0), 0.0)
    (top, _), (left, _) = lay.pad
    h, w = lay.shape
    return out[:, top:top + h, left:left + w].astype(np.float32)


def _padding(shape: Sequence[int], tile: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # Centred, as the folder reader pads training slices (and MONAI pads its inputs).
  return tuple(((tile - n) // 2, tile - n - (tile - n) // 2) if n < tile else (0, 0)
               for n in shape)


def sliding_window(shape: Sequence[int], tile: int, overlap: float = DEFAULT_OVERLAP,
                   sigma_scale: float = DEFAULT_SIGMA_SCALE) -> Layout:
  """Overlapping tiles over the whole (h, w) slice, Gaussian-blended.

  A slice no larger than the tile is one tile (padded if smaller), used unweighted.
  """
  shape = (int(shape[0]), int(shape[1]))
  pad = _padding(shape, tile)
  padded = [n + a + b for n, (a, b) in zip(shape, pad)]
  ys, xs = (scan_starts(n, tile, overlap) for n in padded)
  starts = np.array([(y, x) for y in ys for x in xs], np.int64)
  one = len(starts) == 1
  weight = np.ones((tile, tile), np.float32) if one else gaussian_importance(tile, sigma_scale)
  info: dict[str, Any] = {"overlap": float(overlap)}
  if not one:
    info.update(blend="gaussian", sigma_scale=float(sigma_scale))
  return Layout(shape, tile, pad, starts, weight, "sliding_window", info)


def region(shape: Sequence[int], tile: int, centre: Sequence[int]) -> Layout:
  """The one tile around `centre` (row, column) of an (h, w) slice.

  The tile is centred on the point where the slice allows, else moved inside the slice
  (the point stays in it); outside the tile nothing is predicted (probability 0).
  """
  shape = (int(shape[0]), int(shape[1]))
  for c, n in zip(centre, shape):
    if not 0 <= int(c) < n:
      raise ValueError(f"the point {tuple(int(v) for v in centre)} is outside the "
                       f"{shape[0]}x{shape[1]} slice.")
  pad = _padding(shape, tile)
  start, box = [], []
  for c, n, (before, after) in zip(centre, shape, pad):
    first = min(max(int(c) + before - tile // 2, 0), n + before + after - tile)
    start.append(first)
    box.append([max(first - before, 0), min(first - before + tile, n)])  # In the slice.
  return Layout(shape, tile, pad, np.array([start], np.int64), np.ones((tile, tile), np.float32),
                "region", {"centre": [int(c) for c in centre], "box": box,
                           "outside_box": "not predicted: probability 0"})

"""The built-in synthetic multi-rater set: known rater styles, no download.

Each image is a textured background (smooth sinusoids shared by a patient,
finer ones per image) with one lesion, sometimes two. A lesion is an irregular
blob: a solid core of contrast `c` (0.12 to 0.6 above the background) inside a
faint surrounding zone of about a third of that contrast, reaching `f` = 1.6
to 2.1 core radii. Gaussian noise goes on top.

In normalised radius `d` (1 on the core boundary), rater k of R draws
everything within `t_k` core radii, `t` interpolated at s = k / (R - 1) through
the anchors 0.8 (s=0: a slightly eroded core), 1.15 (s=1/3: the core plus a
thin rim), (1 + f) / 2 (s=2/3: halfway into the faint zone) and f + 0.3 (s=1:
the whole faint zone plus a generous margin). Rater 1 also misses lesions
fainter than 0.25. Each rater's boundary gets small smooth noise (about 3% of
the radius) per lesion. Mean areas therefore grow strictly with the rater
index, with wide gaps, so a model conditioned on a rater's description can be
checked against a known rule (the names are `RATER_NAMES`, the texts
`RATER_STYLES`, matching the synthetic prompt bank of `prosona_jax.prompt_bank`).

Item i depends only on (seed, i, num_patients, image size, raters): the set is
generated eagerly at construction from per-item seeds, so a larger set starts
with the same images.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from prosona_jax.data.errors import DataError
from prosona_jax.data.npz import ArraySource, compact_masks

_CORE_T, _RIM_T, _MARGIN = 0.8, 1.15, 0.3  # Anchors of the rater rule (module doc).
_MISS_CONTRAST = 0.25  # Rater 1 does not see lesions fainter than this.
_BOUNDARY_NOISE = 0.03  # Std of each rater's radial boundary harmonics.

# The one list of the four styles' names, conservative to inclusive (configs/demo.py's
# `data.rater_names`, inspect_data's card and legend). Each names its rule, and none reuses
# a word that the synthetic prompt bank uses for another rater ("tight" describes the core
# only there, "generous" the widest margin).
RATER_NAMES: Tuple[str, ...] = ("conservative", "thin-rim", "halfway", "inclusive")
_RULES = (
    "solid core only, misses faint lesions",
    "the core plus a thin rim",
    "the core and halfway into the faint zone",
    "the core plus the whole faint zone, with a generous margin",
)
RATER_STYLES: Tuple[str, ...] = tuple(f"{n}: {r}" for n, r in zip(RATER_NAMES, _RULES))
_ANCHORS = (0.0, 1 / 3, 2 / 3, 1.0)  # Rater positions s of the four styles.


def _positions(num_raters: int) -> np.ndarray:
  return np.linspace(0.0, 1.0, num_raters) if num_raters > 1 else np.array([1 / 3])


def _nearest(texts: Tuple[str, ...], num_raters: int) -> Tuple[str, ...]:
  """Each rater's text of the nearest of the four styles, marked when raters share one."""
  nearest = [int(np.argmin(np.abs(np.array(_ANCHORS) - s))) for s in _positions(num_raters)]
  out = []
  for k, a in enumerate(nearest):
    text = texts[a]
    if nearest.count(a) > 1:
      text += f" (rater {k + 1} of {num_raters})"
    out.append(text)
  return tuple(out)


def rater_styles(num_raters: int = 4) -> Tuple[str, ...]:
  """One short description per rater, conservative to inclusive.

  With R != 4 raters, each gets the text of the nearest of the four styles,
  marked with its position when several raters share a text.
  """
  return _nearest(RATER_STYLES, num_raters)


def rater_names(num_raters: int = 4) -> Tuple[str, ...]:
  """One short name per rater (RATER_NAMES for 4 raters; see `rater_styles`)."""
  return _nearest(RATER_NAMES, num_raters)


def rater_thresholds(num_raters: int, halo: float) -> np.ndarray:
  """Normalised boundary radius of each rater for a lesion whose zone reaches `halo`."""
  return np.interp(_positions(num_raters), _ANCHORS,
                   (_CORE_T, _RIM_T, (1.0 + halo) / 2, halo + _MARGIN))


def _sinusoids(rng: np.random.Generator, grid: np.ndarray, count: int,
               cycles: Tuple[float, float], amplitude: float,
               phase_shift: np.ndarray | float = 0.0) -> np.ndarray:
  """Sum of `count` plane waves with `cycles` per image width (size-independent).

  Separable: sin(a u + b v + p) = sin(a u) cos(b v + p) + cos(a u) sin(b v + p),
  so the (H, W) sum is two small matrix products instead of count * H * W sines.
  """
  angle = rng.uniform(0, 2 * np.pi, count)
  freq = 2 * np.pi * rng.uniform(*cycles, count)
  phase = rng.uniform(0, 2 * np.pi, count) + phase_shift
  a_u = (freq * np.cos(angle))[:, None] * grid  # (count, W)
  b_v = (freq * np.sin(angle))[:, None] * grid + phase[:, None]  # (count, H)
  return amplitude * (np.cos(b_v).T @ np.sin(a_u) + np.sin(b_v).T @ np.cos(a_u))


def _harmonics(dx: np.ndarray, dy: np.ndarray, rho: np.ndarray, order: int) -> np.ndarray:
  """cos(m theta) and sin(m theta), m = 1..order, stacked (2 * order, H, W).

  Angle-addition recurrences from the unit vector avoid arctan2 and cosines.
  """
  c1, s1 = dx / rho, dy / rho
  out, c, s = [], c1, s1
  for _ in range(order):
    out += [c, s]
    c, s = c * c1 - s * s1, s * c1 + c * s1
  return np.stack(out)


def _fourier(rng: np.random.Generator, std_or_range, modes: np.ndarray, rows: int,
             uniform: bool) -> np.ndarray:
  """Coefficients of a*cos(m theta + p) in the (cos, sin) basis of `_harmonics`."""
  shape = (rows, len(modes))
  a = rng.uniform(-std_or_range, std_or_range, shape) if uniform else rng.normal(
      0, std_or_range, shape)
  p = rng.uniform(0, 2 * np.pi, shape)
  coef = np.zeros((rows, 2 * int(modes.max())), np.float32)
  coef[:, 2 * (modes - 1)] = a * np.cos(p)
  coef[:, 2 * (modes - 1) + 1] = -a * np.sin(p)
  return coef


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def generate_item(seed: int, index: int, num_patients: int, image_size: int,
                  num_raters: int) -> Tuple[np.ndarray, np.ndarray]:
  """Generates image `index`: float32 (H, W) in [0, 1] and uint8 (R, H, W) masks.

  Raters are in style order (conservative first), not re-ordered by area.
  """
  patient = index % num_patients
  prng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, patient)))
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))
  grid = ((np.arange(image_size) + 0.5) / image_size).astype(np.float32)

  # Patient anatomy: the same coarse texture for a patient's images, slightly shifted.
  image = prng.uniform(0.15, 0.3) + _sinusoids(
      prng, grid, 5, (0.5, 3.0), 0.035, phase_shift=rng.normal(0, 0.3, 5))
  image = image + _sinusoids(rng, grid, 6, (4.0, 10.0), 0.01)
  masks = np.zeros((num_raters, image_size, image_size), bool)
  lesion = np.zeros_like(image, dtype=np.float32)
  num_lesions = 1 + int(rng.random() < 0.3)
  for j in range(num_lesions):
    cx, cy = rng.uniform(0.25, 0.75, 2)
    r0 = rng.uniform(0.05, 0.11) * (0.7 if j else 1.0)
    shape_coef = _fourier(rng, 0.12, np.arange(2, 5), 1, uniform=True)[0]
    halo, contrast = rng.uniform(1.6, 2.1), rng.uniform(0.12, 0.6)
    ratio = rng.uniform(0.25, 0.4)
    dx, dy = grid[None, :] - np.float32(cx), grid[:, None] - np.float32(cy)
    rho = np.maximum(np.hypot(dx, dy), 1e-6)
    harm = _harmonics(dx, dy, rho, 4)  # (8, H, W)
    d = rho / (r0 * (1.0 + np.tensordot(shape_coef, harm, 1)))  # Core boundary at 1.
    edge = max(0.8 / (r0 * image_size), 0.04)  # Blurred over about a pixel.
    blob = (contrast * (1 - ratio) * _sigmoid((1.0 - d) / edge)
            + contrast * ratio * _sigmoid((halo - d) / (1.5 * edge)))
    lesion = np.maximum(lesion, blob)
    # Each rater: its own radius rule plus small smooth boundary noise.
    t = rater_thresholds(num_raters, halo).astype(np.float32)
    wobble = _fourier(rng, _BOUNDARY_NOISE, np.arange(1, 4), num_raters, uniform=False)
    radius = t[:, None, None] * (1.0 + np.tensordot(wobble, harm[:6], 1))
    drawn = d[None] <= radius
    if contrast < _MISS_CONTRAST and num_raters > 1:
      drawn[0] = False
    masks |= drawn
  noise = rng.normal(0, rng.uniform(0.02, 0.04), image.shape)
  image = np.clip(image + lesion + noise, 0.0, 1.0)
  return image.astype(np.float32), masks.astype(np.uint8)


class SyntheticSource(ArraySource):
  """The synthetic multi-rater set as a random-access source.

  Keys are `synth<patient>_slice<index>`; image i belongs to patient
  `i % num_patients`, whose images share a background texture.
  """

  def __init__(self, num_images: int = 256, num_patients: int = 64, seed: int = 0,
               image_size: int = 128, num_raters: int = 4, in_channels: int = 1,
               order_raters_by_area: bool = False):
    """Generates the set.

    Args:
      num_images: Images in the set.
      num_patients: Patients the images are grouped into (round robin).
      seed: Generation seed: same seed, same set.
      image_size: H = W.
      num_raters: R, styled from conservative (first) to inclusive (last).
      in_channels: C; the grey image is repeated over channels.
      order_raters_by_area: Re-order masks per image by area (off: style order).
    """
    for name, value, low in (("num_images", num_images, 1), ("num_patients", num_patients, 1),
                             ("image_size", image_size, 8), ("num_raters", num_raters, 1),
                             ("in_channels", in_channels, 1)):
      if int(value) < low:
        raise DataError(f"synthetic: {name}={value}; expected an integer >= {low}")
    images = np.empty((num_images, image_size, image_size, in_channels), np.float32)
    masks = np.empty((num_images, num_raters, image_size, image_size), np.uint8)
    for i in range(num_images):
      image, masks[i] = generate_item(seed, i, num_patients, image_size, num_raters)
      images[i] = image[:, :, None]
    packed, areas = compact_masks(masks, order_raters_by_area)
    patients = [f"synth{i % num_patients:04d}" for i in range(num_images)]
    super().__init__(
        image_chunks=[images], packed_mask_chunks=[packed], areas=areas,
        keys=[f"{p}_slice{i:05d}" for i, p in enumerate(patients)],
        patient_ids=patients, width=image_size,
        order_raters_by_area=order_raters_by_area, format_name="synthetic")
    self.seed, self.num_patients = seed, num_patients
    self.styles: Tuple[str, ...] = rater_styles(num_raters)
    self.rater_names: Tuple[str, ...] = rater_names(num_raters)

  def describe(self) -> str:
    return super().describe() + f", seed {self.seed}"

  def __repr__(self) -> str:
    return (f"SyntheticSource(num_images={len(self)}, num_patients={self.num_patients}, "
            f"seed={self.seed}, image_size={self.image_shape[0]}, "
            f"num_raters={self.num_raters}, in_channels={self.image_shape[2]}, "
            f"order_raters_by_area={self.order_raters_by_area})")


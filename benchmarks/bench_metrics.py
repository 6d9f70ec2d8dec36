r"""Times `prosona_jax.metrics.score` on a LIDC-sized test set.

The D-Persona LIDC set has 1,609 images of 128 x 128 with 4 raters; Stage-1 scoring uses 10
prior samples per image. The masks here are random blobs (a quarter of them empty, as on
LIDC) and the predictions random probabilities, so every code path (empty masks, ties,
rectangular Hungarian) runs; the metric values themselves mean nothing.

  python benchmarks/bench_metrics.py [--num_images 1609] [--num_samples 10] [--repeats 1]
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
import numpy as np

# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prosona_jax import metrics  # noqa: E402  pylint: disable=g-import-not-at-top

_NUM_IMAGES = flags.DEFINE_integer("num_images", 1609, "Images N.")
_NUM_RATERS = flags.DEFINE_integer("num_raters", 4, "Raters R.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 10, "Predictions per image S.")
_SIZE = flags.DEFINE_integer("size", 128, "Image side H = W.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs per convention (best is shown).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random data.")


def make_data(num_images: int, num_raters: int, num_samples: int, size: int,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Random disc masks (about a quarter empty) and float32 probability maps."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  centre = rng.uniform(0.3 * size, 0.7 * size, (num_images, num_raters, 2))
  radius = rng.uniform(0.0, 0.15 * size, (num_images, num_raters))
  radius[rng.random((num_images, num_raters)) < 0.25] = -1.0  # Empty masks.
  labels = np.empty((num_images, num_raters, size, size), np.uint8)
  for r in range(num_raters):
    dist2 = ((yy[None] - centre[:, r, 0, None, None]) ** 2
             + (xx[None] - centre[:, r, 1, None, None]) ** 2)
    labels[:, r] = dist2 <= radius[:, r, None, None] ** 2
  preds = rng.random((num_images, num_samples, size, size), dtype=np.float32)
  return labels, preds


def main(argv):
  del argv
  n, r, s, size = _NUM_IMAGES.value, _NUM_RATERS.value, _NUM_SAMPLES.value, _SIZE.value
  t0 = time.perf_counter()
  labels, preds = make_data(n, r, s, size, _SEED.value)
  print(f"data: labels {labels.shape} {labels.dtype}, preds {preds.shape} {preds.dtype} "
        f"({preds.nbytes / 2**30:.2f} GiB), made in {time.perf_counter() - t0:.1f} s")
  total = 0.0
  for convention in metrics.CONVENTIONS:
    times = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      result = metrics.score(labels, preds, convention=convention)
      times.append(time.perf_counter() - t0)
    total += min(times)
    m = result["mean"]
    print(f"score(convention={convention!r}): {min(times):.2f} s wall "
          f"(GED {m['ged']:.4f}, Dice Soft {m['dice_soft']:.4f}, "
          f"Dice Match {m['dice_match']:.4f})")
  print(f"both conventions: {total:.2f} s wall for {n} images x {r} raters x {s} samples "
        f"of {size}x{size}")


if __name__ == "__main__":
  app.run(main)

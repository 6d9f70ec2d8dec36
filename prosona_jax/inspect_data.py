r"""Prints a short card about a dataset, and optionally a JSON summary and a figure.

  python -m prosona_jax.inspect_data /data/lidc_attributes.pkl --json card.json
  python -m prosona_jax.inspect_data synthetic --image_size=64 --png examples.png
  python -m prosona_jax.inspect_data /data/prostate --format=folder \
      --rater_names=site1,site2,site3,site4

The card gives the number of images, raters and patients, how the patients
were found (`given`, `derived_from_keys` or `one_per_image`, flagged when
every image is its own patient), the image count of each patient-grouped fold
(K=4, seed 1337 by default), every rater's mean foreground area after ordering
and the number of empty masks. `--json` writes exactly `num_images`,
`num_raters`, `num_patients`, `patient_grouping`, `fold_sizes`,
`rater_mean_area` and `num_empty_masks`.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from prosona_jax.data import sources
from prosona_jax.data.errors import DataError
from prosona_jax.data.npz import ONE_PER_IMAGE, ArraySource


def define_flags() -> None:
  """Defines the CLI flags (only when run as a program, so importing adds no flags)."""
  flags.DEFINE_enum("format", "auto", ("auto",) + sources.FORMATS,
                    "Dataset format; auto detects it from the path.")
  flags.DEFINE_string("json", None, "Write the summary as JSON to this file.")
  flags.DEFINE_string("png", None, "Draw a few examples with every rater's mask.")
  flags.DEFINE_integer("num_examples", 4, "Examples drawn by --png.")
  flags.DEFINE_boolean(
      "order_raters_by_area", None,
      "Re-order masks per image by area (default: True for LIDC pickles, else False).")
  flags.DEFINE_integer("num_folds", 4, "K of the patient-grouped folds.")
  flags.DEFINE_integer("split_seed", 1337, "Seed of the fold assignment.")
  # The synthetic set.
  flags.DEFINE_integer("num_images", 256, "Synthetic: images.")
  flags.DEFINE_integer("num_patients", 64, "Synthetic: patients.")
  flags.DEFINE_integer("seed", 0, "Synthetic: generation seed.")
  flags.DEFINE_integer("image_size", 128, "Synthetic and folder: H = W.")
  flags.DEFINE_integer("num_raters", 4, "Synthetic: raters.")
  # Multi-rater folders.
  flags.DEFINE_list("rater_names", ["rater1", "rater2", "rater3", "rater4"],
                    "Folder: mask file stems, in rater order.")
  flags.DEFINE_string("image_name", "image", "Folder: image file stem.")
  flags.DEFINE_integer("axis", 2, "Folder: slicing axis of 3-D volumes.")
  flags.DEFINE_enum("resize", "crop_or_pad", ("crop_or_pad", "resample"),
                    "Folder: how slices are brought to image_size.")


def summarize(source: ArraySource, *, num_folds: int = 4, seed: int = 1337) -> Dict[str, Any]:
  """The JSON summary of a source (areas come from the source, no image decoding).

  Args:
    source: Any source of `prosona_jax.data.sources`.
    num_folds: K of the patient-grouped folds.
    seed: Seed of the fold assignment.

  Returns:
    A dict with exactly the keys `num_images`, `num_raters`, `num_patients`,
    `patient_grouping`, `fold_sizes`, `rater_mean_area` and `num_empty_masks`.
  """
  from prosona_jax.data.splits import fold_indices  # pylint: disable=g-import-not-at-top
  areas = source.mask_areas()
  folds = fold_indices(source.patient_ids, num_folds=num_folds, seed=seed, level="patient")
  return {
      "num_images": len(source),
      "num_raters": source.num_raters,
      "num_patients": len(set(source.patient_ids)),
      "patient_grouping": source.patient_grouping,
      "fold_sizes": [int(len(f)) for f in folds],
      "rater_mean_area": [round(float(a), 3) for a in areas.mean(axis=0)],
      "num_empty_masks": int((areas == 0).sum()),
  }


def card(source: ArraySource, summary: Dict[str, Any]) -> str:
  """The human-readable card printed by the CLI."""
  h, w, c = source.image_shape
  order = "ascending area per image" if source.order_raters_by_area else "identity"
  areas = ", ".join(f"{a:.1f}" for a in summary["rater_mean_area"])
  total = summary["num_images"] * summary["num_raters"]
  grouping = summary["patient_grouping"]
  if grouping == ONE_PER_IMAGE:
    grouping += " (every image is its own patient; pass patient_ids)"
  lines = [
      source.describe(),
      f"  images:          {summary['num_images']} ({h}x{w}, {c} channel(s))",
      f"  raters:          {summary['num_raters']} (order: {order})",
      f"  patients:        {summary['num_patients']} ({grouping})",
      f"  images per fold: {summary['fold_sizes']}",
      f"  mean area/rater: [{areas}] pixels",
      f"  empty masks:     {summary['num_empty_masks']} of {total}",
  ]
  styles = getattr(source, "styles", None)
  if styles:
    lines += [f"  rater {k + 1}: {s}" for k, s in enumerate(styles)]
  return "\n".join(lines)


def draw_examples(source: ArraySource, path: str, num_examples: int = 4,
                  rater_names: Optional[Sequence[str]] = None) -> List[int]:
  """Draws images with each rater's mask contour (Agg backend) to `path`.

  Prefers images on which some rater drew something, evenly spread over the set.

  Returns:
    The indices drawn.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  drawn = np.flatnonzero(source.mask_areas().sum(axis=1) > 0)
  pool = drawn if len(drawn) >= num_examples else np.arange(len(source))
  picks = [int(pool[i]) for i in np.linspace(0, len(pool) - 1, min(num_examples, len(pool))
                                             ).round().astype(int)]
  names = list(rater_names or [f"rater{k + 1}" for k in range(source.num_raters)])
  colors = plt.get_cmap("viridis")(np.linspace(0, 1, source.num_raters))
  fig, axes = plt.subplots(1, len(picks), figsize=(3 * len(picks), 3.3), squeeze=False)
  for ax, index in zip(axes[0], picks):
    item = source[index]
    image = item["image"]
    ax.imshow(image[..., 0] if image.shape[-1] != 3 else image, cmap="gray")
    for r in range(source.num_raters):
      if item["masks"][r].any():
        ax.contour(item["masks"][r], levels=[0.5], colors=[colors[r]], linewidths=1)
    ax.set_title(item["key"], fontsize=8)
    ax.axis("off")
  handles = [plt.Line2D([], [], color=colors[r], label=names[r])
             for r in range(source.num_raters)]
  fig.legend(handles=handles, loc="lower center", ncol=source.num_raters, fontsize=8)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return picks


def open_from_flags(path: str) -> ArraySource:
  """Opens `path` with the format and options given on the command line."""
  f = flags.FLAGS
  fmt = f.format
  if fmt == "auto":
    fmt = sources.detect_format(path)
  options: Dict[str, Any] = {}
  if fmt == "synthetic":
    options = dict(num_images=f.num_images, num_patients=f.num_patients, seed=f.seed,
                   image_size=f.image_size, num_raters=f.num_raters)
  elif fmt == "folder":
    options = dict(rater_names=tuple(f.rater_names), image_name=f.image_name,
                   axis=f.axis, image_size=f.image_size, resize=f.resize)
  return sources.open_source(path, fmt, order_raters_by_area=f.order_raters_by_area,
                             **options)


def main(argv: Sequence[str]) -> int:
  """absl entry point: prints the card, writes --json and --png; returns the exit status."""
  if len(argv) > 2:
    raise app.UsageError(f"expected one PATH, got {list(argv[1:])}")
  f = flags.FLAGS
  path = argv[1] if len(argv) == 2 else ""
  logging.info("Opening %r", path or "synthetic")
  try:
    source = open_from_flags(path)
    summary = summarize(source, num_folds=f.num_folds, seed=f.split_seed)
  except DataError as e:  # Bad input is the user's to fix: no traceback.
    print(f"inspect_data: error: {e}", file=sys.stderr)
    return 1
  print(card(source, summary))
  if f.json:
    with open(f.json, "w") as out:
      json.dump(summary, out, indent=1)
  if f.png:
    names = f.rater_names if source.format_name == "folder" else None
    picks = draw_examples(source, f.png, f.num_examples, names)
    print(f"  examples:        {f.png} (images {picks})")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)

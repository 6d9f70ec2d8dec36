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

import json
from typing import Any, Dict, Sequence

from absl import flags
from absl import logging

from prosona_jax import cli
from prosona_jax.data import sources

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


def open_from_flags(path: str):
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
  """Prints the card, writes --json and --png; returns the exit status."""
  from prosona_jax.data import inspect  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  path = argv[1] if len(argv) == 2 else ""
  logging.info("Opening %r", path or "synthetic")
  source = open_from_flags(path)  # A DataError ends in one line and exit status 2.
  summary = inspect.summarize(source, num_folds=f.num_folds, seed=f.split_seed)
  print(inspect.card(source, summary))
  if f.json:
    with open(f.json, "w") as out:
      json.dump(summary, out, indent=1)
  if f.png:
    names = f.rater_names if source.format_name == "folder" else None
    picks = inspect.draw_examples(source, f.png, f.num_examples, names)
    print(f"  examples:        {f.png} (images {picks})")
  return 0


if __name__ == "__main__":
  cli.run(main, name="inspect_data", positional=1, progress=True)

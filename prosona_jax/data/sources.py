"""Opening any supported dataset as a Grain random-access source.

`open_source(path)` detects the format; `source_from_config(config.data)`
builds the source a run asks for and checks it against the config. Every
source yields dicts with `image` float32 (H, W, C), `masks` uint8 (R, H, W),
`key` and `patient_id` (docs/DESIGN.md, "Records").
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Optional

from prosona_jax.data.errors import DataError, PathLike, data_error
from prosona_jax.data.folder import load_folder
from prosona_jax.data.lidc import VARIANTS as LIDC_FORMATS
from prosona_jax.data.lidc import detect_lidc_variant, load_lidc_pickle
from prosona_jax.data.npz import ArraySource, load_npz
from prosona_jax.data.synthetic import SyntheticSource

FORMATS = ("synthetic", "lidc_attributes", "lidc_crops", "npz", "folder")
_SYNTHETIC_PATHS = ("", "synthetic")


def detect_format(path: PathLike) -> str:
  """Guesses the format of `path`.

  `""` or `"synthetic"` is the synthetic set, a directory is a multi-rater
  folder, `.npz` (or a zip) is arrays, and `.pkl` / `.pickle` (or a binary
  pickle) is one of the LIDC pickles, told apart by its first record: `alpha`
  or a uint8 image means `lidc_attributes`, else `lidc_crops`.

  Raises:
    DataError: The path does not exist or its format is not recognised.
  """
  if os.fspath(path) in _SYNTHETIC_PATHS:
    return "synthetic"
  p = pathlib.Path(path)
  if not p.exists():
    raise data_error(p, "no such file or folder")
  if p.is_dir():
    return "folder"
  name = p.name.lower()
  if name.endswith(".npz"):
    return "npz"
  if name.endswith((".pkl", ".pickle")):
    return detect_lidc_variant(p)
  with open(p, "rb") as f:
    head = f.read(2)
  if head == b"PK":  # .npz files are zip archives.
    return "npz"
  if head[:1] == b"\x80":  # Binary pickles (protocol >= 2) open with PROTO.
    return detect_lidc_variant(p)
  raise data_error(p, f"unknown format; expected one of {FORMATS} (a .pkl/.pickle, "
                   ".npz or a folder)")


def open_source(path: PathLike, format: str = "auto", *,  # pylint: disable=redefined-builtin
                order_raters_by_area: Optional[bool] = None,
                **options: Any) -> ArraySource:
  """Opens a dataset as a random-access source.

  Args:
    path: File or folder (`""` or `"synthetic"` for the synthetic set).
    format: `auto` or one of `FORMATS`.
    order_raters_by_area: Re-order masks per image by ascending area; `None`
      picks the format's default (True for the LIDC pickles, else False).
    **options: Passed to the reader: `SyntheticSource` (num_images,
      num_patients, seed, image_size, num_raters, in_channels), `load_folder`
      (rater_names, image_name, axis, image_size, skip_empty_slices, resize,
      normalize), `load_lidc_pickle` (progress_every, pickle_limits) or
      `load_npz` (limits).

  Returns:
    The source.

  Raises:
    DataError: Unknown format, missing path or bad content.
  """
  fmt = detect_format(path) if format == "auto" else format
  if fmt not in FORMATS:
    raise data_error(path, f"unknown format {format!r}; expected auto or one of {FORMATS}")
  order = fmt in LIDC_FORMATS if order_raters_by_area is None else order_raters_by_area
  if fmt == "synthetic":
    return SyntheticSource(order_raters_by_area=order, **options)
  if fmt in LIDC_FORMATS:
    return load_lidc_pickle(path, fmt, order_raters_by_area=order, **options)
  if fmt == "npz":
    return load_npz(path, order_raters_by_area=order, **options)
  return load_folder(path, order_raters_by_area=order, **options)


def source_from_config(data_cfg: Any) -> ArraySource:
  """Builds the source described by `config.data` (see config_defaults.py).

  Raises:
    DataError: As `open_source`, or the data disagree with the config's
      `num_raters`, `image_size` or `in_channels`.
  """
  fmt, path = data_cfg.format, data_cfg.path
  if fmt == "auto":
    fmt = detect_format(path)
  options = {}
  if fmt == "synthetic":
    syn = data_cfg.synthetic
    options = dict(num_images=syn.num_images, num_patients=syn.num_patients,
                   seed=syn.seed, image_size=data_cfg.image_size,
                   num_raters=data_cfg.num_raters, in_channels=data_cfg.in_channels)
  elif fmt == "folder":
    fol = data_cfg.folder
    options = dict(rater_names=tuple(data_cfg.rater_names), image_name=fol.image_name,
                   axis=fol.axis, image_size=data_cfg.image_size,
                   skip_empty_slices=fol.skip_empty_slices,
                   resize=fol.get("resize", "crop_or_pad"),
                   normalize=fol.get("normalize", "robust"))
  source = open_source(path, fmt, order_raters_by_area=data_cfg.order_raters_by_area,
                       **options)
  where = path or fmt
  if source.num_raters != data_cfg.num_raters:
    raise data_error(where, f"{source.num_raters} raters per image, but the config has "
                     f"data.num_raters={data_cfg.num_raters}")
  want = (data_cfg.image_size, data_cfg.image_size, data_cfg.in_channels)
  if tuple(source.image_shape) != want:
    raise data_error(where, f"images are {source.image_shape} (H, W, C), but the config "
                     f"has data.image_size={data_cfg.image_size}, "
                     f"data.in_channels={data_cfg.in_channels}")
  return source


__all__ = ["ArraySource", "DataError", "FORMATS", "SyntheticSource", "detect_format",
           "open_source", "source_from_config"]

"""Readers of the two LIDC-IDRI pickles of the multi-rater literature.

- `lidc_attributes`: the D-Persona / MedicalMatting `lidc_attributes.pkl`
  (image uint8 0..255, four masks, a soft `alpha` matte that is ignored).
- `lidc_crops`: the Probabilistic U-Net `data_lidc.pickle` (image float64 in
  [0, 1], four uint8 masks, `series_uid` a `pydicom.uid.UID`).

Both are unpickled through the allow-list of `safe_pickle` and streamed: each
batch of records is converted to float32 images and bit-packed masks and the
decoded originals are dropped, so the 3.4 GB crop pickle never sits in memory
twice. The patient (scan) id is the key's part before the first `_`
(`patient_grouping` `derived_from_keys`; `one_per_image`, with a warning, when
that gives every image its own patient).
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

from absl import logging
import numpy as np

from prosona_jax.data import safe_pickle
from prosona_jax.data.errors import PathLike, data_error
from prosona_jax.data.limits import ReadLimits
from prosona_jax.data.npz import ArraySource, check_image, check_masks, compact_masks
from prosona_jax.data.npz import patients_from_keys

VARIANTS = ("lidc_attributes", "lidc_crops")
_CHUNK = 256  # Records stacked per array chunk: bounds the transient unpacked copies.


def detect_lidc_variant(path: PathLike, pickle_limits: Optional[ReadLimits] = None) -> str:
  """Tells the two LIDC pickles apart from the first record's fields.

  A record with `alpha`, or with a uint8 image, is `lidc_attributes`; a float
  image without `alpha` is `lidc_crops`. Only the first record is decoded.

  Raises:
    DataError: Not a readable (allowed) pickle of records with an `image`.
  """
  record = safe_pickle.peek_first_record(path, pickle_limits)
  image = record.get("image")
  if "alpha" in record or (isinstance(image, np.ndarray) and image.dtype == np.uint8):
    return "lidc_attributes"
  return "lidc_crops"


class _RecordConverter:
  """Checks records one by one and accumulates compact chunks."""

  def __init__(self, path: PathLike, variant: str, order_raters_by_area: bool,
               progress_every: int):
    self.path, self.variant = path, variant
    self.order = order_raters_by_area
    self.progress_every = progress_every
    self.keys: List[str] = []
    self.image_chunks: List[np.ndarray] = []
    self.mask_chunks: List[np.ndarray] = []
    self.area_chunks: List[np.ndarray] = []
    self._images: List[np.ndarray] = []
    self._masks: List[np.ndarray] = []
    self._shape: Optional[Tuple[int, int]] = None
    self._raters: Optional[int] = None

  def _image(self, key: str, image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 2:
      raise data_error(self.path, f"field 'image': expected a 2-D array, got "
                       f"{getattr(image, 'shape', type(image).__name__)}", key)
    if self.variant == "lidc_attributes":
      if image.dtype != np.uint8:
        raise data_error(self.path, "field 'image': expected uint8 in 0..255 "
                         f"(lidc_attributes), got dtype {image.dtype}", key)
      return image.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(image.dtype, np.floating):
      raise data_error(self.path, "field 'image': expected float in [0, 1] "
                       f"(lidc_crops), got dtype {image.dtype}", key)
    check_image(self.path, key, image)
    return image.astype(np.float32)

  def _mask_stack(self, key: str, masks: Any, shape: Tuple[int, int]) -> np.ndarray:
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
      stack = masks
    elif isinstance(masks, (list, tuple)) and masks:
      parts = [np.asarray(m) for m in masks]
      for r, m in enumerate(parts):
        if m.shape != shape:
          raise data_error(self.path, f"mask {r} has shape {m.shape}; expected the "
                           f"image's {shape}", key)
      stack = np.stack(parts)
    else:
      raise data_error(self.path, "field 'masks': expected a non-empty list of "
                       f"arrays, got {type(masks).__name__}", key)
    if stack.shape[1:] != shape:
      raise data_error(self.path, f"masks have shape {stack.shape[1:]}; expected the "
                       f"image's {shape}", key)
    if self.variant == "lidc_attributes" and stack.dtype != np.bool_:
      # D-Persona thresholds these masks at 0.5; values outside [0, 1] are errors.
      if not np.issubdtype(stack.dtype, np.number):
        raise data_error(self.path, f"masks must be numeric, got {stack.dtype}", key)
      s = stack.astype(np.float64)
      if not (np.isfinite(s).all() and s.min() >= 0 and s.max() <= 1):
        raise data_error(self.path, "masks must be in [0, 1] (thresholded at 0.5); "
                         f"found range [{np.nanmin(s)}, {np.nanmax(s)}]", key)
      return (s > 0.5).astype(np.uint8)
    return check_masks(self.path, key, stack)

  def __call__(self, key: Any, record: Any) -> None:
    if isinstance(key, bytes):
      key = key.decode("latin1")
    if not isinstance(key, str):  # The reader already refuses these; a bounded message.
      raise data_error(self.path, f"keys must be strings, got {type(key).__name__}")
    if not isinstance(record, dict):
      raise data_error(self.path, f"expected a record dict, got {type(record).__name__}",
                       key)
    for field in ("image", "masks"):
      if field not in record:
        raise data_error(self.path, f"missing field {field!r}; the record has "
                         f"{sorted(map(str, record))}, expected image, masks, series_uid",
                         key)
    image = self._image(key, record["image"])
    if self._shape is None:
      self._shape = image.shape
    elif image.shape != self._shape:
      raise data_error(self.path, f"image shape {image.shape} differs from the first "
                       f"record's {self._shape}", key)
    masks = self._mask_stack(key, record["masks"], image.shape)
    if self._raters is None:
      self._raters = len(masks)
    elif len(masks) != self._raters:
      raise data_error(self.path, f"{len(masks)} masks; the first record has "
                       f"{self._raters} (every record needs the same rater count)", key)
    self.keys.append(key)
    self._images.append(image[:, :, None])
    self._masks.append(masks)
    record.clear()  # Drop the float64 original now, not at the end of the batch.
    if len(self._images) == _CHUNK:
      self.flush()
    if self.progress_every and len(self.keys) % self.progress_every == 0:
      logging.info("%s: read %d records", os.fspath(self.path), len(self.keys))

  def flush(self) -> None:
    if not self._images:
      return
    packed, areas = compact_masks(np.stack(self._masks), self.order)
    self.image_chunks.append(np.stack(self._images))
    self.mask_chunks.append(packed)
    self.area_chunks.append(areas)
    self._images, self._masks = [], []


def load_lidc_pickle(path: PathLike, variant: str = "auto", *,
                     order_raters_by_area: bool = True,
                     progress_every: int = 2000,
                     pickle_limits: Optional[ReadLimits] = None) -> ArraySource:
  """Reads either LIDC pickle into an `ArraySource`.

  Args:
    path: The `.pkl` / `.pickle` file.
    variant: `lidc_attributes`, `lidc_crops` or `auto` (from the first record).
    order_raters_by_area: Re-order the masks of each image by ascending area
      (D-Persona's LIDC convention; stable for ties).
    progress_every: Log a count of records read every this many (0: never).
    pickle_limits: Memory and nesting limits of the reader (default
      `limits.PICKLE_LIMITS`: 8x the file's size, at least 256 MiB).

  Raises:
    DataError: Forbidden globals or opcodes, limits exceeded, missing fields,
      inconsistent shapes or rater counts, masks outside {0, 1} ([0, 1] for
      `lidc_attributes`), NaN pixels.
  """
  if not os.path.isfile(path):
    raise data_error(path, "no such file; expected a LIDC pickle")
  if variant == "auto":
    variant = detect_lidc_variant(path, pickle_limits)
  if variant not in VARIANTS:
    raise data_error(path, f"unknown LIDC variant {variant!r}; expected one of {VARIANTS}")
  converter = _RecordConverter(path, variant, order_raters_by_area, progress_every)
  safe_pickle.stream_dict_records(path, converter, pickle_limits)
  converter.flush()
  if not converter.keys:
    raise data_error(path, "the pickle holds no records")
  logging.info("%s: read %d records (%s)", os.fspath(path), len(converter.keys), variant)
  patients, grouping = patients_from_keys(converter.keys)
  return ArraySource(
      image_chunks=converter.image_chunks, packed_mask_chunks=converter.mask_chunks,
      areas=np.concatenate(converter.area_chunks), keys=converter.keys,
      patient_ids=patients, width=converter.image_chunks[0].shape[2],
      order_raters_by_area=order_raters_by_area, format_name=variant, path=path,
      patient_grouping=grouping)


def load_lidc_attributes(path: PathLike, **options: Any) -> ArraySource:
  """Reads the D-Persona / MedicalMatting `lidc_attributes.pkl` (see `load_lidc_pickle`)."""
  return load_lidc_pickle(path, "lidc_attributes", **options)


def load_lidc_crops(path: PathLike, **options: Any) -> ArraySource:
  """Reads the Probabilistic U-Net `data_lidc.pickle` (see `load_lidc_pickle`)."""
  return load_lidc_pickle(path, "lidc_crops", **options)


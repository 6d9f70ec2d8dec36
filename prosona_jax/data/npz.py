"""The in-memory record source every reader builds, and the `.npz` reader.

`ArraySource` keeps images as float32 chunks and masks bit-packed (8x smaller
than uint8: the 60,384 masks of the full LIDC crop set take 124 MB), ordered
once at construction, so items are cheap to decode and the source pickles as
plain numpy arrays for Grain worker processes.

Patient-grouped folds are only as good as the patient ids, so every source
records how it got them in `patient_grouping` (`PATIENT_GROUPINGS`) and warns
when nothing groups its images.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from prosona_jax.data.errors import DataError, PathLike, data_error
from prosona_jax.data.limits import NPZ_LIMITS, ReadLimits

# How a source's patient ids came about (see `ArraySource.patient_grouping`).
GIVEN = "given"  # Named by the data: npz patient_ids/series_uid, folder cases, synthetic.
DERIVED_FROM_KEYS = "derived_from_keys"  # The key's part before the first `_`.
ONE_PER_IMAGE = "one_per_image"  # Nothing groups the images: each is its own patient.
PATIENT_GROUPINGS = (GIVEN, DERIVED_FROM_KEYS, ONE_PER_IMAGE)


def _first_bad(bad: np.ndarray, keys: Optional[Sequence[str]]) -> str:
  """' (first in image i, key k)' for a stacked (N, ...) boolean array."""
  i = int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))
  return f" (first in image {i}" + (f", key {keys[i]!r})" if keys is not None else ")")


def check_masks(path: PathLike, key: str, masks: np.ndarray,
                keys: Optional[Sequence[str]] = None) -> np.ndarray:
  """Checks (R, H, W) or stacked (N, R, H, W) masks are in {0, 1}; returns uint8.

  Args:
    path: The file, for the message.
    key: The record key or array name, for the message.
    masks: The masks.
    keys: For stacked masks, the image keys, to name the first bad image.
  """
  if masks.dtype == np.bool_:
    return masks.astype(np.uint8)
  if not (np.issubdtype(masks.dtype, np.number)):
    raise data_error(path, f"masks must be numeric, got dtype {masks.dtype}", key)
  bad = (masks != 0) & (masks != 1)
  if bad.any():
    values = np.unique(masks[bad])[:5]
    where = _first_bad(bad, keys) if masks.ndim == 4 else ""
    raise data_error(path, f"masks must be in {{0, 1}}; found values "
                     f"{values.tolist()}{where}", key)
  return masks.astype(np.uint8)


def check_image(path: PathLike, key: str, image: np.ndarray,
                keys: Optional[Sequence[str]] = None) -> None:
  """Checks an image (or (N, H, W, C) stack, naming the first bad of `keys`) is finite float."""
  if not np.issubdtype(image.dtype, np.floating):
    raise data_error(path, f"images must be float (normalised intensities), got dtype "
                     f"{image.dtype}", key)
  bad = ~np.isfinite(image)
  if bad.any():
    where = _first_bad(bad, keys) if image.ndim == 4 else ""
    raise data_error(path, f"{int(bad.sum())} NaN or infinite pixels{where}; expected "
                     "finite values", key)


def compact_masks(masks: np.ndarray, order_by_area: bool) -> Tuple[np.ndarray, np.ndarray]:
  """Orders and bit-packs checked uint8 masks.

  Args:
    masks: uint8 (N, R, H, W) in {0, 1}.
    order_by_area: Re-order the raters of each image by ascending foreground
      area, stable so that ties keep their stored order (docs/method.md).

  Returns:
    `(packed, areas)`: uint8 (N, R, H, ceil(W / 8)) and int32 (N, R) areas in
    the returned rater order.
  """
  areas = masks.sum(axis=(2, 3), dtype=np.int64).astype(np.int32)
  if order_by_area:
    order = np.argsort(areas, axis=1, kind="stable")
    masks = np.take_along_axis(masks, order[:, :, None, None], axis=1)
    areas = np.take_along_axis(areas, order, axis=1)
  return np.packbits(masks, axis=-1), areas


class ArraySource:
  """A random-access source of multi-rater records held in numpy arrays.

  Items are dicts: `image` float32 (H, W, C), `masks` uint8 (R, H, W) in {0, 1},
  `key` str, `patient_id` str (see docs/DESIGN.md).

  Attributes:
    patient_grouping: How `patient_ids` came about: `given` (named by the data),
      `derived_from_keys` (the key's part before the first `_`) or
      `one_per_image` (nothing groups the images, so every image is its own
      patient and folds may split a real patient's images).
  """

  def __init__(self, *, image_chunks: Sequence[np.ndarray],
               packed_mask_chunks: Sequence[np.ndarray], areas: np.ndarray,
               keys: Sequence[str], patient_ids: Sequence[str], width: int,
               order_raters_by_area: bool, format_name: str, path: PathLike = "",
               patient_grouping: str = GIVEN):
    """Builds a source from already checked, ordered and packed chunks.

    Readers call `ArraySource.from_arrays` (or build chunks with
    `compact_masks` when streaming); this constructor only checks consistency.
    Ids `derived_from_keys` that give every image its own patient become
    `one_per_image`; `one_per_image` with more than one image logs a warning.
    """
    self._images = [np.asarray(c, np.float32) for c in image_chunks]
    self._masks = list(packed_mask_chunks)
    self._offsets = np.cumsum([0] + [len(c) for c in self._images])
    self._width = int(width)
    self._areas = np.asarray(areas, np.int32)
    self.keys: List[str] = [str(k) for k in keys]
    self.patient_ids: List[str] = [str(p) for p in patient_ids]
    self.order_raters_by_area = bool(order_raters_by_area)
    self.format_name = format_name
    self.path = os.fspath(path)
    n = int(self._offsets[-1])
    if n == 0:
      raise data_error(path, "no images found; expected at least one record")
    if not (len(self.keys) == len(self.patient_ids) == len(self._areas) == n):
      raise data_error(path, f"{n} images but {len(self.keys)} keys and "
                       f"{len(self.patient_ids)} patient ids")
    if len(set(self.keys)) != n:
      seen = set()
      dup = next(k for k in self.keys if k in seen or seen.add(k))
      raise data_error(path, "keys must be unique; found a duplicate", dup)
    if patient_grouping not in PATIENT_GROUPINGS:
      raise ValueError(f"patient_grouping={patient_grouping!r}; expected one of "
                       f"{PATIENT_GROUPINGS}")
    if patient_grouping == DERIVED_FROM_KEYS and n > 1 and len(set(self.patient_ids)) == n:
      patient_grouping = ONE_PER_IMAGE
    self.patient_grouping = patient_grouping
    if patient_grouping == ONE_PER_IMAGE and n > 1:
      # Image-level folds put slices of one scan in train and test alike.
      logging.warning("%s: every image is its own patient; pass patient_ids (or keys "
                      "'<patient>_<slice>') so that folds keep a patient's images "
                      "together", self.path or format_name)

  @classmethod
  def from_arrays(cls, images: np.ndarray, masks: np.ndarray, keys: Sequence[str],
                  patient_ids: Sequence[str], *, order_raters_by_area: bool,
                  format_name: str, path: PathLike = "",
                  patient_grouping: str = GIVEN) -> "ArraySource":
    """Checks and wraps float images (N, H, W, C) and masks (N, R, H, W)."""
    if images.ndim != 4 or masks.ndim != 4:
      raise data_error(path, f"expected images (N, H, W, C) and masks (N, R, H, W), got "
                       f"{images.shape} and {masks.shape}")
    if images.shape[0] != masks.shape[0] or images.shape[1:3] != masks.shape[2:]:
      raise data_error(path, f"images {images.shape} and masks {masks.shape} disagree: "
                       "expected the same N and H, W", "masks")
    keys = [str(k) for k in keys]
    if len(keys) != images.shape[0]:
      raise data_error(path, f"{len(keys)} keys for {images.shape[0]} images", "keys")
    check_image(path, "images", images, keys)
    masks = check_masks(path, "masks", masks, keys)
    packed, areas = compact_masks(masks, order_raters_by_area)
    return cls(image_chunks=[images.astype(np.float32, copy=False)],
               packed_mask_chunks=[packed], areas=areas, keys=keys,
               patient_ids=patient_ids, width=masks.shape[-1],
               order_raters_by_area=order_raters_by_area, format_name=format_name,
               path=path, patient_grouping=patient_grouping)

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, index: int) -> Dict[str, Any]:
    n = len(self)
    index = int(index)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range for {n} images")
    chunk = int(np.searchsorted(self._offsets, index, side="right")) - 1
    j = index - int(self._offsets[chunk])
    masks = np.unpackbits(self._masks[chunk][j], axis=-1, count=self._width)
    return {"image": self._images[chunk][j].copy(), "masks": masks,
            "key": self.keys[index], "patient_id": self.patient_ids[index]}

  @property
  def num_raters(self) -> int:
    return int(self._areas.shape[1])

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(int(s) for s in self._images[0].shape[1:])

  def mask_areas(self) -> np.ndarray:
    """int32 (N, R) foreground pixels of each mask, in item rater order."""
    return self._areas.copy()

  def describe(self) -> str:
    """One line: format, path, size, raters and patients."""
    h, w, c = self.image_shape
    order = "ordered by area" if self.order_raters_by_area else "identity order"
    where = f" {self.path}" if self.path else ""
    return (f"{self.format_name}{where}: {len(self)} images {h}x{w}x{c}, "
            f"{self.num_raters} raters ({order}), {len(set(self.patient_ids))} patients")

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(format={self.format_name!r}, path={self.path!r}, "
            f"num_images={len(self)}, image_shape={self.image_shape}, "
            f"num_raters={self.num_raters}, "
            f"order_raters_by_area={self.order_raters_by_area})")


def patient_from_key(key: str) -> str:
  """The patient (scan) id of a `<scan-id>_slice<N>` key: the part before `_`."""
  return key.split("_", 1)[0]


def patients_from_keys(keys: Sequence[str]) -> Tuple[List[str], str]:
  """Patient ids from `<patient>_...` keys, and the `patient_grouping` they give.

  Keys without any `_` name no patient: each image is then its own.
  """
  if not any("_" in k for k in keys):
    return [str(k) for k in keys], ONE_PER_IMAGE
  return [patient_from_key(k) for k in keys], DERIVED_FROM_KEYS


def _read_npy_header(fp: Any) -> Tuple[Tuple[int, ...], np.dtype]:
  version = np.lib.format.read_magic(fp)
  if version == (1, 0):
    shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
  elif version == (2, 0):
    shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
  else:  # 3.0 only adds utf-8 field names, i.e. structured arrays.
    raise ValueError(f".npy format {version[0]}.{version[1]}; expected 1.0 or 2.0")
  return shape, dtype


def check_npz_members(path: PathLike, names: Optional[Sequence[str]] = None,
                      limits: Optional[ReadLimits] = None) -> Dict[str, Tuple[Any, np.dtype]]:
  """Reads only the headers of an `.npz`'s arrays and refuses what must not load.

  Object arrays are refused (loading them would unpickle), and so are headers
  declaring more data than their member holds or than the budget allows
  (`limits.NPZ_LIMITS`: 64x the file's size, at least 256 MiB), before anything
  is allocated.

  Args:
    path: The `.npz` file.
    names: The arrays to check (default: all); absent names are skipped.
    limits: The memory budget.

  Returns:
    `name -> (shape, dtype)` of the checked arrays.

  Raises:
    DataError: Not a zip archive, an unreadable header, an object array, or a
      size beyond the member or the budget.
  """
  limits = limits or NPZ_LIMITS
  file_size = os.path.getsize(path)
  budget, total, headers = limits.budget(file_size), 0, {}
  if not zipfile.is_zipfile(path):
    raise data_error(path, "not a .npz (zip) archive; expected arrays saved by np.savez")
  try:
    with zipfile.ZipFile(path) as zf:
      members = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
      for name in (members if names is None else [n for n in names if n in members]):
        info = members[name]
        with zf.open(info) as fp:
          try:
            shape, dtype = _read_npy_header(fp)
          except ValueError as e:
            raise data_error(path, f"unreadable .npy header ({e})", name) from e
          header_len = fp.tell()
        if dtype.hasobject:
          raise data_error(path, f"object array (dtype {dtype}) refused: loading it would "
                           "unpickle code; expected numbers or strings", name)
        count = 1
        for s in shape:
          count *= int(s)
        nbytes = count * dtype.itemsize  # Python ints: no overflow.
        if nbytes > budget:
          raise data_error(path, f"the header declares shape {tuple(shape)} {dtype} = "
                           f"{nbytes:,} bytes, over the limit of "
                           f"{limits.describe(file_size)}", name)
        if info.file_size != header_len + nbytes:
          raise data_error(path, f"the header declares {nbytes:,} bytes of data but the "
                           f"member holds {info.file_size - header_len:,} (truncated or "
                           "corrupt)", name)
        total += nbytes
        if total > budget:
          raise data_error(path, f"the arrays add up to {total:,} bytes, over the limit of "
                           f"{limits.describe(file_size)}", name)
        headers[name] = (tuple(shape), dtype)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise data_error(path, f"not a readable .npz ({e})") from e
  return headers


def _string_array(path: PathLike, z: Any, name: str, n: int) -> Optional[List[str]]:
  if name not in z.files:
    return None
  arr = z[name]
  if arr.shape != (n,) or arr.dtype.kind not in "USi":
    raise data_error(path, f"expected ({n},) strings (or ints), got {arr.dtype} "
                     f"{arr.shape}", name)
  return [a.decode() if isinstance(a, bytes) else str(a) for a in arr.tolist()]


def load_npz(path: PathLike, *, order_raters_by_area: bool = False,
             limits: Optional[ReadLimits] = None) -> ArraySource:
  """Reads `images` (N, H, W[, C]) float, `masks` (N, R, H, W) in {0, 1}.

  Optional `keys` (N,) name the images; `patient_ids` (or else `series_uid`)
  (N,) group them into patients; without either the patient is the key's part
  before the first `_`. Without keys, or with keys that have no `_`, each image
  is its own patient: the source's `patient_grouping` is then `one_per_image`
  and a warning is logged.

  Args:
    path: The `.npz`.
    order_raters_by_area: Re-order each image's masks by ascending area.
    limits: The memory budget (default `limits.NPZ_LIMITS`).

  Raises:
    DataError: A missing or malformed array, an object array, a size beyond the
      file or the budget, or values out of range.
  """
  if not os.path.exists(path):
    raise data_error(path, "no such file; expected a .npz with 'images' and 'masks'")
  # Headers first: nothing is allocated for a header that lies about its size.
  check_npz_members(path, ("images", "masks", "keys", "patient_ids", "series_uid"), limits)
  try:
    # allow_pickle=False: object arrays would unpickle arbitrary code.
    z = np.load(path, allow_pickle=False)
  except Exception as e:
    raise data_error(path, f"not a readable .npz ({e!r})") from e
  with z:
    for name in ("images", "masks"):
      if name not in z.files:
        raise data_error(path, f"missing array; found {sorted(z.files)}", name)
    try:
      images, masks = z["images"], z["masks"]
      if images.ndim == 3:
        images = images[..., None]
      if images.ndim != 4:
        raise data_error(path, f"expected (N, H, W) or (N, H, W, C), got {images.shape}",
                         "images")
      if masks.ndim != 4:
        raise data_error(path, f"expected (N, R, H, W), got {masks.shape}", "masks")
      n = images.shape[0]
      keys = _string_array(path, z, "keys", n)
      patients = _string_array(path, z, "patient_ids", n)
      if patients is None:
        patients = _string_array(path, z, "series_uid", n)
    except DataError:
      raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      raise data_error(path, f"unreadable array ({e})") from e
  grouping = GIVEN
  if keys is None:
    keys = [f"image{i:05d}" for i in range(n)]
    if patients is None:
      patients, grouping = list(keys), ONE_PER_IMAGE
  elif patients is None:
    patients, grouping = patients_from_keys(keys)
  return ArraySource.from_arrays(images, masks, keys, patients,
                                 order_raters_by_area=order_raters_by_area,
                                 format_name="npz", path=path, patient_grouping=grouping)

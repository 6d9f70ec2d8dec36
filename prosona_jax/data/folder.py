"""Multi-rater folders: NIfTI volumes or PNG slices, one folder per case.

Layouts (rater names and the image stem come from the dataset config):

    <root>/<case>/<image_name>.nii.gz   + <root>/<case>/<rater>.nii.gz   (or .nii)
    <root>/<case>/<image_name>.png      + <root>/<case>/<rater>.png      (one slice)
    <root>/<case>/slice<N>/<image_name>.png + .../slice<N>/<rater>.png  (PNG slices)

NIfTI volumes may be 2-D or 3-D (trailing singleton axes are dropped); 3-D
volumes are cut into 2-D slices along `axis`. Voxel spacing is ignored. The
patient is the case folder's name and keys are `<case>_slice<N>`, N being the
index along `axis` (or the `slice<N>` folder's number).

Intensities are normalised per volume (all slices of a case together):
`robust` maps the 0.5th..99.5th percentiles to [0, 1] and clips, `minmax` maps
min..max, `none` keeps raw values. Each slice is then brought to
`image_size` x `image_size`: `crop_or_pad` (default) centre-crops or zero-pads
without interpolation; `resample` scales isotropically (linear for images,
nearest for masks, so masks stay binary) until the longer side fits, then pads.
Masks must be in {0, 1}; PNG masks may also use {0, 255} (white = foreground).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from prosona_jax.data.errors import PathLike, data_error
from prosona_jax.data.npz import ArraySource, check_image, check_masks

_NIFTI = (".nii.gz", ".nii")
_SLICE_DIR = re.compile(r"^slice(\d+)$")


def _find(folder: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
  hits = [folder / (stem + ext) for ext in _NIFTI + (".png",)
          if (folder / (stem + ext)).is_file()]
  if len(hits) > 1:
    raise data_error(folder, f"both {hits[0].name} and {hits[1].name}; expected one file "
                     f"per stem", stem)
  return hits[0] if hits else None


def _read_nifti(path: pathlib.Path, mask: bool) -> np.ndarray:
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  try:
    img = nib.load(os.fspath(path))
    data = np.asanyarray(img.dataobj) if mask else img.get_fdata(dtype=np.float32)
  except Exception as e:
    raise data_error(path, f"not a readable NIfTI file ({e!r})") from e
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim not in (2, 3):
    raise data_error(path, f"expected a 2-D or 3-D volume, got shape {data.shape}")
  return data


def _read_png(path: pathlib.Path, mask: bool) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      mode = im.mode
      data = np.asarray(im)
  except Exception as e:
    raise data_error(path, f"not a readable PNG ({e!r})") from e
  ok = ("1", "L", "P", "I", "I;16") if mask else ("L", "I", "I;16", "F", "RGB")
  if mode not in ok:
    raise data_error(path, f"PNG mode {mode!r}; expected one of {ok}")
  if mask:
    values = np.unique(data)
    if data.dtype != np.bool_ and set(values.tolist()) <= {0, 255} and 255 in values:
      data = data // 255  # The documented {0, 255} PNG mask convention.
    return data
  return data.astype(np.float32) if data.ndim == 3 else data.astype(np.float32)[..., None]


def _normalise(volume: np.ndarray, how: str, path: pathlib.Path, key: str) -> np.ndarray:
  check_image(path, key, volume)
  if how == "none":
    return volume
  lo, hi = ((np.percentile(volume, 0.5), np.percentile(volume, 99.5)) if how == "robust"
            else (volume.min(), volume.max()))
  if hi <= lo:  # A constant volume: nothing to stretch.
    return np.zeros_like(volume)
  return np.clip((volume - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _fit(x: np.ndarray, size: int, resize: str, spatial: Tuple[int, int],
         order: int) -> np.ndarray:
  """Brings the `spatial` axes of `x` to size x size (see the module docstring).

  Args:
    x: An image (H, W, C) or masks (R, H, W).
    size: The output H = W.
    resize: `crop_or_pad` or `resample`.
    spatial: The H and W axes of `x`.
    order: Spline order when resampling: 1 for images, 0 (nearest) for masks.
  """
  if resize == "resample":
    from scipy import ndimage  # pylint: disable=g-import-not-at-top
    scale = size / max(x.shape[spatial[0]], x.shape[spatial[1]])
    zoom = [1.0] * x.ndim
    zoom[spatial[0]] = zoom[spatial[1]] = scale
    x = ndimage.zoom(x, zoom, order=order, mode="nearest", grid_mode=True)
  for ax in spatial:
    n = x.shape[ax]
    if n > size:
      start = (n - size) // 2
      x = np.take(x, np.arange(start, start + size), axis=ax)
    elif n < size:
      pad = [(0, 0)] * x.ndim
      pad[ax] = ((size - n) // 2, size - n - (size - n) // 2)
      x = np.pad(x, pad)
  return x


def _read_case(case: pathlib.Path, rater_names: Sequence[str], image_name: str,
               axis: int) -> Tuple[np.ndarray, np.ndarray, List[int]]:
  """Returns images (N, H, W, C) raw, masks (N, R, H, W) uint8 and slice numbers."""
  image_path = _find(case, image_name)
  if image_path is not None:
    nifti = not image_path.name.endswith(".png")
    folders = [(case, None)]
  else:
    subdirs = sorted((p for p in case.iterdir() if p.is_dir()
                      and not p.name.startswith(".")), key=lambda p: p.name)
    folders = []
    for sub in subdirs:
      m = _SLICE_DIR.match(sub.name)
      if m is None:
        raise data_error(sub, "unexpected subfolder; expected slice<N> folders or "
                         f"{image_name}.nii.gz / .nii / .png in the case folder")
      folders.append((sub, int(m.group(1))))
    if not folders:
      raise data_error(case, f"no {image_name}.nii.gz, .nii or .png and no slice<N> "
                       "subfolders; expected one of the documented layouts")
    folders.sort(key=lambda f: f[1])
    nifti = False
  images, masks, numbers = [], [], []
  for folder, number in folders:
    ipath = _find(folder, image_name)
    if ipath is None:
      raise data_error(folder, f"missing the image file {image_name}.png", image_name)
    image = _read_nifti(ipath, False) if nifti else _read_png(ipath, False)
    raters = []
    for rater in rater_names:
      mpath = _find(folder, rater)
      if mpath is None or mpath.name.endswith(".png") == nifti:
        kind = ".nii.gz or .nii" if nifti else ".png"
        raise data_error(folder, f"missing the mask of rater {rater!r}: expected "
                         f"{rater}{kind} next to {ipath.name}", rater)
      m = _read_nifti(mpath, True) if nifti else _read_png(mpath, True)
      ishape = image.shape if nifti else image.shape[:2]
      if m.shape != ishape:
        raise data_error(mpath, f"mask shape {m.shape} differs from the image's {ishape}",
                         rater)
      raters.append(check_masks(mpath, rater, m))
    if nifti:
      if image.ndim == 2:
        image, raters = image[None], [r[None] for r in raters]
      else:
        ax = axis % 3
        image = np.moveaxis(image, ax, 0)
        raters = [np.moveaxis(r, ax, 0) for r in raters]
      images.append(image[..., None])
      masks.append(np.stack(raters, axis=1))
      numbers.extend(range(image.shape[0]))
    else:
      images.append(image[None])
      masks.append(np.stack(raters)[None])
      numbers.append(number or 0)
  try:
    return np.concatenate(images), np.concatenate(masks), numbers
  except ValueError as e:
    raise data_error(case, f"slices of different sizes or channels ({e})") from e


def load_folder(root: PathLike, *,
                rater_names: Sequence[str] = ("rater1", "rater2", "rater3", "rater4"),
                image_name: str = "image", axis: int = 2, image_size: int = 128,
                skip_empty_slices: bool = False, resize: str = "crop_or_pad",
                normalize: str = "robust", order_raters_by_area: bool = False
                ) -> ArraySource:
  """Reads a multi-rater folder (layouts in the module docstring).

  Args:
    root: The folder holding one subfolder per case.
    rater_names: Mask file stems, in rater order (default: the config's).
    image_name: Image file stem.
    axis: Slicing axis of 3-D volumes.
    image_size: Output H = W.
    skip_empty_slices: Keep only slices on which some rater drew something.
    resize: `crop_or_pad` or `resample`.
    normalize: `robust`, `minmax` or `none` (per volume).
    order_raters_by_area: Re-order masks per slice by ascending area.

  Raises:
    DataError: Missing files, mismatched shapes, masks outside {0, 1}, NaNs.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise data_error(root, "no such folder; expected <root>/<case>/ folders")
  if resize not in ("crop_or_pad", "resample"):
    raise data_error(root, f"unknown resize {resize!r}; expected crop_or_pad or resample")
  if normalize not in ("robust", "minmax", "none"):
    raise data_error(root, f"unknown normalize {normalize!r}; expected robust, minmax, none")
  if not rater_names:
    raise data_error(root, "no rater names given; expected the mask file stems")
  cases = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not cases:
    raise data_error(root, "no case folders; expected <root>/<case>/ subfolders")
  images, masks, keys, patients = [], [], [], []
  for case in cases:
    vol, msk, numbers = _read_case(case, rater_names, image_name, axis)
    vol = _normalise(vol.astype(np.float32), normalize, case, image_name)
    for i, n in enumerate(numbers):
      if skip_empty_slices and not msk[i].any():
        continue
      images.append(_fit(vol[i], image_size, resize, (0, 1), order=1))
      masks.append(_fit(msk[i], image_size, resize, (1, 2), order=0))
      keys.append(f"{case.name}_slice{n}")
      patients.append(case.name)
  if not images:
    raise data_error(root, "no slices left (all empty and skip_empty_slices is set)")
  channels = {im.shape[-1] for im in images}
  if len(channels) > 1:
    raise data_error(root, f"images with {sorted(channels)} channels; expected the same "
                     "number in every case")
  return ArraySource.from_arrays(
      np.stack(images), np.stack(masks), keys, patients,
      order_raters_by_area=order_raters_by_area, format_name="folder", path=root)

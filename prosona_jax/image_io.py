"""Images in and masks out for `predict`: formats, intensity normalisation and geometry.

Inputs (by extension, else by content):
- `.npy`: (H, W), (H, W, C) with C the model's channels, (N, H, W) slices, or (N, H, W, C).
- `.png`: grey (L, I, I;16, F, 1, P) or colour (RGB, RGBA; averaged to grey for a
  one-channel model).
- `.nii` / `.nii.gz`: 2-D, or 3-D cut into slices along `axis` (the training data's
  `data.folder.axis`); masks are written back with the input's affine and header.
- DICOM: one file per image, after the modality LUT (e.g. CT Hounsfield units);
  multi-frame files are stacks of slices.

Intensities are normalised like the training data: `robust` (0.5..99.5 percentiles to
[0, 1], per volume, `data/folder.py`'s own function), `minmax`, `none`, or `unit` (LIDC
and synthetic sets are in [0, 1]: uint8 is divided by 255, values in [0, 1] are kept and
anything else falls back to `robust`). Slices larger than the model go through it in
overlapping tiles (`tiling.py`, chosen in `predictor`), or are brought to the model's size
by `resample` or `crop_or_pad` (`data/folder.py`'s function), and outputs are brought back
to the input's geometry by the exact inverse. `write_overlay` draws the masks on the image
(Pillow only, so that `predict` does not import matplotlib).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import numpy as np

from prosona_jax.data import folder as folder_lib
from prosona_jax.inference import InferenceError

NORMALIZE = ("auto", "robust", "minmax", "unit", "none")
# How slices reach the model's size (`predictor`): `sliding_window` tiles the whole slice
# (`tiling.py`); `resample` and `crop_or_pad` are `to_model`'s.
RESIZE = ("auto", "sliding_window", "resample", "crop_or_pad")


@dataclasses.dataclass
class Volume:
  """One input: its slices and what is needed to write outputs in its geometry.

  Attributes:
    path: the file (or dataset key).
    kind: npy | png | nifti | dicom | key.
    slices: (N, h, w, C) float32 intensities (normalised by `normalize`).
    shape: the input array's shape without channels: (h, w), or 3-D with the slicing
      axis `axis`.
    axis: slicing axis within `shape` for stacks; None for one 2-D image.
    raw_dtype: dtype of the stored intensities (uint8 tells 0..255 images apart).
    header: the nibabel image of a NIfTI input (affine and header for the outputs).
    name: output file stem (default: the file name without its extensions).
  """
  path: str
  kind: str
  slices: np.ndarray
  shape: tuple[int, ...]
  axis: int | None = None
  raw_dtype: Any = np.float32
  header: Any = None
  name: str | None = None  # Output file stem; default the input's name less extensions.

  @property
  def stem(self) -> str:
    if self.name:
      return self.name
    name = os.path.basename(self.path)
    for ext in (".nii.gz", ".nii", ".npy", ".png", ".dcm", ".dicom"):
      if name.lower().endswith(ext):
        return name[:-len(ext)]
    return name

  def to_input_layout(self, x_NPhw: np.ndarray) -> np.ndarray:
    """(N, P, h, w) per-slice outputs -> (P,) + `shape`."""
    x = np.moveaxis(x_NPhw, 1, 0)  # (P, N, h, w)
    if self.axis is None:
      return x[:, 0]
    return np.moveaxis(x, 1, 1 + self.axis)


def _err(path, what: str) -> InferenceError:
  return InferenceError(f"{os.fspath(path)}: {what}")


def _kind(path: pathlib.Path) -> str:
  name = path.name.lower()
  for ext, kind in ((".npy", "npy"), (".png", "png"), (".nii.gz", "nifti"),
                    (".nii", "nifti"), (".dcm", "dicom"), (".dicom", "dicom")):
    if name.endswith(ext):
      return kind
  with open(path, "rb") as f:
    head = f.read(132)
  if head[128:132] == b"DICM":
    return "dicom"
  if head.startswith(b"\x93NUMPY"):
    return "npy"
  if head.startswith(b"\x89PNG"):
    return "png"
  raise _err(path, "not a supported image file; expected .npy, .png, .nii/.nii.gz or "
             "a DICOM file")


def _as_stack(path, data: np.ndarray, channels: int) -> tuple[np.ndarray, int | None]:
  """(N, h, w, C) slices and the stack axis of an npy/PNG/DICOM array (module docstring)."""
  if data.ndim == 2:
    return data[None, ..., None], None
  if data.ndim == 3 and data.shape[-1] == channels:
    return data[None], None
  if data.ndim == 3:
    return data[..., None], 0
  if data.ndim == 4 and data.shape[-1] == channels:
    return data, 0
  raise _err(path, f"array of shape {data.shape}: expected (H, W), (H, W, {channels}), "
             f"(N, H, W) or (N, H, W, {channels})")


def _read_png(path) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("P", "LA", "1"):
        im = im.convert("L")
      if im.mode == "RGBA":
        im = im.convert("RGB")
      if im.mode not in ("L", "I", "I;16", "F", "RGB"):
        raise _err(path, f"PNG mode {im.mode!r} is not supported")
      return np.asarray(im)
  except InferenceError:
    raise
  except Exception as e:
    raise _err(path, f"not a readable PNG ({e})") from e


def _read_dicom(path) -> np.ndarray:
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom import pixels  # pylint: disable=g-import-not-at-top
  try:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
  except Exception as e:
    raise _err(path, f"not a readable DICOM image ({e})") from e
  if int(getattr(ds, "SamplesPerPixel", 1)) == 1:
    arr = pixels.apply_modality_lut(arr, ds)
  return np.asarray(arr)


def read_input(path: str, *, channels: int, axis: int = 2) -> Volume:
  """Reads one image file into a `Volume` (intensities not yet normalised)."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise _err(path, "no such file")
  kind = _kind(p)
  header = None
  if kind == "npy":
    try:
      data = np.load(p, allow_pickle=False)
    except Exception as e:
      raise _err(path, f"not a readable .npy array ({e})") from e
  elif kind == "png":
    data = _read_png(p)
  elif kind == "dicom":
    data = _read_dicom(p)
  else:
    import nibabel as nib  # pylint: disable=g-import-not-at-top
    try:
      header = nib.load(os.fspath(p))
      data = np.asanyarray(header.dataobj)
    except Exception as e:
      raise _err(path, f"not a readable NIfTI file ({e})") from e
    while data.ndim > 2 and data.shape[-1] == 1:
      data = data[..., 0]
    if data.ndim not in (2, 3):
      raise _err(path, f"NIfTI of shape {header.shape}: expected a 2-D image or a 3-D "
                 "volume (4-D series are not supported)")
  if data.dtype.kind not in "biuf" or data.size == 0:
    raise _err(path, f"array of dtype {data.dtype} and shape {data.shape}: expected numbers")
  raw_dtype = data.dtype
  if kind in ("png", "dicom") and data.ndim == 3 and data.shape[-1] in (3, 4) and channels == 1:
    data = data[..., :3].astype(np.float32).mean(-1)  # Colour image for a grey model.
  if kind == "nifti":
    if data.ndim == 2:
      stack, ax = data[None, ..., None], None
    else:
      ax = axis % 3
      stack = np.moveaxis(data, ax, 0)[..., None]
  else:
    stack, ax = _as_stack(path, data, channels)
  if stack.shape[-1] == 1 and channels > 1:
    stack = np.repeat(stack, channels, axis=-1)  # As the synthetic set repeats grey.
  if stack.shape[-1] != channels:
    raise _err(path, f"{stack.shape[-1]} channels, the model takes {channels}")
  shape = tuple(data.shape[:2] if ax is None else data.shape[:3])
  return Volume(path=os.fspath(path), kind=kind, slices=stack.astype(np.float32),
                shape=shape, axis=ax, raw_dtype=raw_dtype, header=header)


def resolve_normalize(how: str, data_format: str, folder_normalize: str) -> str:
  """`auto` -> the training data's normalisation."""
  if how not in NORMALIZE:
    raise InferenceError(f"--normalize={how!r}: expected one of {NORMALIZE}")
  if how != "auto":
    return how
  return folder_normalize if data_format in ("folder", "auto") else "unit"


def normalize(vol: Volume, how: str) -> str:
  """Normalises `vol.slices` in place, per volume; returns what was applied."""
  x = vol.slices
  if how == "unit":
    if vol.raw_dtype == np.uint8:
      vol.slices = x / 255.0
      return "unit (uint8 / 255)"
    if x.min() >= 0.0 and x.max() <= 1.0:
      return "unit (already in [0, 1])"
    how = "robust"
  # The folder reader's own function, so inference normalises exactly as training did.
  normalise = folder_lib._normalise  # pylint: disable=protected-access
  vol.slices = normalise(x, how, pathlib.Path(vol.path), vol.stem)
  return how


def to_model(slices: np.ndarray, size: int, resize: str) -> np.ndarray:
  """(N, h, w, C) -> (N, size, size, C), as the folder reader sizes training slices."""
  fit = folder_lib._fit  # pylint: disable=protected-access
  return np.stack([fit(s, size, resize, (0, 1), order=1) for s in slices]).astype(np.float32)


def from_model(x: np.ndarray, hw: tuple[int, int], size: int, resize: str) -> np.ndarray:
  """(..., size, size) model outputs -> (..., h, w): the inverse of `to_model`'s geometry.

  Cropped margins of the input get probability 0; padding is cut off; a resampled
  output is cut to the resampled extent and zoomed back (linear).
  """
  lead = x.shape[:-2]
  if resize == "resample":
    scale = size / max(hw)
    inner = tuple(int(round(n * scale)) for n in hw)
  else:
    inner = tuple(hw)
  out = x
  for i, (n, keep) in enumerate(zip(hw, inner)):
    ax = len(lead) + i
    if keep > size:  # The input was centre-cropped: zero margins back.
      pad = [(0, 0)] * out.ndim
      before = (keep - size) // 2
      pad[ax] = (before, keep - size - before)
      out = np.pad(out, pad)
    elif keep < size:  # The input was padded: cut the padding off.
      before = (size - keep) // 2
      out = np.take(out, np.arange(before, before + keep), axis=ax)
  if resize == "resample" and tuple(inner) != tuple(hw):
    from scipy import ndimage  # pylint: disable=g-import-not-at-top
    zoom = [1.0] * len(lead) + [n / k for n, k in zip(hw, inner)]
    out = ndimage.zoom(out, zoom, order=1, mode="nearest", grid_mode=True)
  return np.clip(out, 0.0, 1.0).astype(np.float32)


def write_mask(vol: Volume, mask: np.ndarray, out_dir: str, label: str) -> str:
  """Writes one binary mask (vol.shape) in the input's format; returns the path."""
  base = os.path.join(out_dir, f"{vol.stem}_{label}")
  mask = mask.astype(np.uint8)
  if vol.kind == "nifti":
    img = vol.header
    data = mask.reshape(img.shape)  # Restores trailing singleton axes of the input.
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    out = type(img)(data, img.affine, header)
    out.header.set_slope_inter(1.0, 0.0)
    path = base + ".nii.gz"
    import nibabel as nib  # pylint: disable=g-import-not-at-top
    nib.save(out, path)
    return path
  if vol.kind in ("png", "dicom", "key") and mask.ndim == 2:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    path = base + ".png"
    Image.fromarray(mask * 255, mode="L").save(path)
    return path
  path = base + ".npy"  # npy inputs, and multi-frame DICOM stacks.
  np.save(path, mask)
  return path


def write_overlay(image_hwC: np.ndarray, probs_Phw: np.ndarray, titles: list[str], path: str,
                  threshold: float, subtitle: str | None = None, panel: int = 192) -> str:
  """A PNG row: the image, then each mask (probability > threshold) in red on it.

  Args:
    image_hwC: the (normalised) slice.
    probs_Phw: one probability map per panel.
    titles: one title per map (a prompt or sample name); the pixel count is added.
    path: the PNG to write.
    threshold: mask threshold.
    subtitle: a title for the image panel (which image, which slice of a volume).
    panel: the longer side of each panel in pixels.
  """
  import textwrap  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  img = np.asarray(image_hwC, np.float32)
  img = img.mean(-1) if img.ndim == 3 else img
  lo, hi = float(img.min()), float(img.max())
  grey = np.uint8(np.round(255 * (img - lo) / (hi - lo))) if hi > lo else np.zeros(img.shape,
                                                                                    np.uint8)
  h, w = img.shape
  scale = panel / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  base = np.asarray(Image.fromarray(grey).resize(size, Image.BILINEAR).convert("RGB"),
                    np.float32)
  font = ImageFont.load_default()
  line, gap = 12, 6
  head = 4 * line + gap
  cols = 1 + len(probs_Phw)
  out = Image.new("RGB", (gap + cols * (size[0] + gap), head + size[1] + gap), "white")
  draw = ImageDraw.Draw(out)
  red = np.array([255.0, 51.0, 51.0], np.float32)
  for j in range(cols):
    x0 = gap + j * (size[0] + gap)
    rgb = base
    if j:
      m = np.asarray(probs_Phw[j - 1]) > threshold
      shown = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)
                         ) > 127
      rgb = np.where(shown[..., None], 0.55 * base + 0.45 * red, base)
      text = textwrap.fill(titles[j - 1], 26, max_lines=3, placeholder="...")
      text += f"\n{int(m.sum())} px"
    else:
      text = textwrap.fill(subtitle or "", 26, max_lines=4, placeholder="...")
    out.paste(Image.fromarray(np.uint8(np.clip(np.round(rgb), 0, 255))), (x0, head))
    draw.multiline_text((x0, 2), text, fill="black", font=font, spacing=1)
  out.save(path)
  return path

"""The local web app behind `python -m prosona_jax.serve`: ask for a style, see its mask.

Two layers:
- `Service`: the model, its caches and every operation of the page (load an image, masks
  for prompts, the slider between two prompts, Stage-1 samples, downloads). It imports no
  web framework, so notebooks and tests can use it in-process.
- `create_app(service)`: a Starlette app that serves the page (`static/serve.html`) and
  the same operations as an HTTP JSON API (README, "Reviewing in the browser"). Starlette
  and uvicorn are the optional `serve` extra; `require_extra` says how to install it.

Caching (why a prompt change is cheap): the image part of the model (backbone features,
prior and its K samples: `Predictor.encode`) runs once per image slice and is kept in an
LRU of `Encoded` per (image, slice). A new prompt or a slider move runs only the
projector and Fcomb on it (`Predictor.decode_prompts`), one prompt at a time so that one
compiled program serves any number of prompts. Prompt texts are embedded once (an LRU of
embeddings: bank phrasings from the bank's cache, other text through the text encoder),
and each slice keeps its last probability maps, so going back to a prompt or a slider
position costs nothing.

Whole images: the same `predictor.plan` as `predict` (sliding window over slices larger
than the model, zero-padding of smaller ones, or `--resize`), so a mask here equals the
one `predict` writes for the same input, seed and prompt.

Safety: the client never names a server file. Uploads are written to a private temporary
folder under a name chosen here, read, and deleted at once; their declared size is checked
before decoding (`MAX_VOXELS`); test-fold cases are chosen by key among the listed ones.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import io
import ipaddress
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import tempfile
import threading
import time
import zipfile
from typing import Any, Callable, Sequence

import numpy as np

from prosona_jax import image_io
from prosona_jax import inference
from prosona_jax import model_loader
from prosona_jax import predictor as predictor_lib
from prosona_jax import tiling
from prosona_jax.errors import UserError

EXTRA_HINT = ("the web app needs the optional `serve` extra (starlette, uvicorn): "
              "pip install 'prosona_jax[serve]', or bash scripts/setup.sh --serve")
# Inputs larger than this many values (voxels x channels) are refused before decoding: a
# small compressed file (PNG, .nii.gz) can declare a huge array.
MAX_VOXELS = 1 << 27
UPLOAD_EXTENSIONS = (".nii.gz", ".nii", ".npy", ".png", ".dcm", ".dicom")
MAX_PROMPTS = 16
MAX_PROMPT_CHARS = 500
MAX_SAMPLES = 64
# Palette colours of mask PNGs (index 1 of a 2-colour PNG; index 0 is transparent).
PROMPT_COLOUR = (255, 51, 51)
RATER_COLOUR = (40, 200, 90)
SAMPLE_COLOUR = (60, 140, 255)
_LOG = logging.getLogger(__name__)


class ServeError(UserError, ValueError):
  """A request the app cannot answer (unknown image, bad field, unreadable upload)."""


def require_extra() -> None:
  """Raises a `UserError` (one line: how to install) when the `serve` extra is missing."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  for name in ("starlette", "uvicorn"):
    if importlib.util.find_spec(name) is None:
      raise UserError(f"{EXTRA_HINT} (no module named {name!r})")


def is_loopback(host: str) -> bool:
  """Whether `host` is reachable from this machine only."""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    return False


# ---------------------------------------------------------------- small helpers
class _LRU:
  """A dict that keeps its `size` most recently used entries."""

  def __init__(self, size: int, on_evict: Callable[[Any, Any], None] | None = None):
    self.size, self.on_evict = max(int(size), 1), on_evict
    self.data: collections.OrderedDict = collections.OrderedDict()

  def get(self, key):
    if key in self.data:
      self.data.move_to_end(key)
      return self.data[key]
    return None

  def put(self, key, value) -> None:
    self.data[key] = value
    self.data.move_to_end(key)
    while len(self.data) > self.size:
      old_key, old = self.data.popitem(last=False)
      if self.on_evict is not None:
        self.on_evict(old_key, old)

  def __contains__(self, key) -> bool:
    return key in self.data


def _b64(data: bytes) -> str:
  return base64.b64encode(data).decode("ascii")


def mask_png(mask_hw: np.ndarray, colour: Sequence[int] = PROMPT_COLOUR,
             alpha: int = 140) -> bytes:
  """A 2-colour palette PNG: pixel values are the mask (0/1), and index 1 is drawn in
  `colour` over a transparent index 0, so the same file is the mask (read it with
  Pillow: `np.asarray(Image.open(f))`) and the page's overlay."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  m = np.ascontiguousarray(np.asarray(mask_hw, bool).astype(np.uint8))
  im = Image.frombytes("P", (m.shape[1], m.shape[0]), m.tobytes())
  im.putpalette([0, 0, 0, *colour])
  buf = io.BytesIO()
  im.save(buf, "PNG", transparency=bytes([0, alpha]))
  return buf.getvalue()


def grey_png(image_hwC: np.ndarray, lo: float, hi: float) -> bytes:
  """The slice as an 8-bit grey PNG, intensities [lo, hi] -> [0, 255]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = np.asarray(image_hwC, np.float32)
  img = img.mean(-1) if img.ndim == 3 else img
  scale = 255.0 / (hi - lo) if hi > lo else 0.0
  grey = np.uint8(np.clip(np.round((img - lo) * scale), 0, 255))
  buf = io.BytesIO()
  Image.fromarray(grey).save(buf, "PNG")
  return buf.getvalue()


def dice(a: np.ndarray, b: np.ndarray) -> float:
  """Dice of two binary masks; 1 when both are empty (nothing to disagree on)."""
  total = int(a.sum()) + int(b.sum())
  return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _safe_name(name: str, limit: int = 80) -> str:
  """A file name's last part with only [A-Za-z0-9._-] (display and download stems)."""
  base = re.split(r"[\\/]", str(name or ""))[-1]
  return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:limit] or "image"


def _upload_extension(filename: str) -> str:
  lower = str(filename or "").lower()
  return next((ext for ext in UPLOAD_EXTENSIONS if lower.endswith(ext)), "")


def _declared_values(path: str) -> int | None:
  """Values (voxels x channels) the file declares, read from its header only; None if
  the header cannot be read (the reader then reports what is wrong)."""
  try:
    kind = image_io._kind(pathlib.Path(path))  # pylint: disable=protected-access
    if kind == "png":
      from PIL import Image  # pylint: disable=g-import-not-at-top
      with Image.open(path) as im:
        return im.width * im.height * len(im.getbands())
    if kind == "npy":
      fmt = np.lib.format
      with open(path, "rb") as f:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape = read(f)[0]
      return int(np.prod(shape, dtype=np.int64))
    if kind == "nifti":
      import nibabel as nib  # pylint: disable=g-import-not-at-top
      return int(np.prod(nib.load(path).shape, dtype=np.int64))
    import pydicom  # pylint: disable=g-import-not-at-top
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "NumberOfFrames", 1) or 1)
            * int(getattr(ds, "SamplesPerPixel", 1)))
  except Exception:  # pylint: disable=broad-except
    return None


# ---------------------------------------------------------------- images and slices
@dataclasses.dataclass
class _Image:
  """A loaded image: its volume (normalised), geometry and, for cases, rater masks."""
  id: str
  vol: image_io.Volume
  plan: predictor_lib.Plan
  display: str
  lo: float
  hi: float
  raters: np.ndarray | None = None  # (R, h, w) bool, test-fold cases only.
  rater_labels: list[str] | None = None

  @property
  def num_slices(self) -> int:
    return int(self.vol.slices.shape[0])


@dataclasses.dataclass
class _Slice:
  """One slice's cached image part and its last probability maps."""
  encoded: predictor_lib.Encoded
  maps: _LRU


class Service:
  """A model behind the page and the JSON API (module docstring: caching and safety).

  Every public method takes and returns plain Python/JSON values (masks as base64 PNGs,
  see `mask_png`) and raises `ServeError` (or another `UserError`) for a bad request.
  Calls are serialised by one lock: one model, one user at a time.
  """

  def __init__(self, model: model_loader.LoadedModel, *, run_config=None,
               fold: int | None = None, text_encoder: str = "", batch_size: int = 8,
               seed: int = 0, threshold: float = 0.5, normalize: str = "auto",
               resize: str = "auto", overlap: float = tiling.DEFAULT_OVERLAP,
               axis: int | None = None, num_samples: int = 12, max_images: int = 8,
               max_slices: int = 32, max_upload_bytes: int = 64 << 20):
    if not model.has_split:
      raise ServeError(f"{model.origin}: an export of format version 1 has no `encode`; "
                       "re-export it with this prosona_jax to serve it")
    if not 0.0 < threshold < 1.0:
      raise ServeError(f"--threshold={threshold}: expected a value in (0, 1)")
    if not 1 <= num_samples <= MAX_SAMPLES:
      raise ServeError(f"--samples={num_samples}: expected 1 to {MAX_SAMPLES}")
    self.model, self.seed, self.threshold = model, int(seed), float(threshold)
    self.num_samples, self.max_upload_bytes = int(num_samples), int(max_upload_bytes)
    self.predictor = predictor_lib.Predictor(model, batch_size)
    data = model.meta["data"]
    self.channels = int(data["in_channels"])
    self.axis = axis if axis is not None else int(data.get("folder", {}).get("axis", 2))
    self.normalize = image_io.resolve_normalize(normalize, data.get("format", ""),
                                                data.get("folder", {}).get("normalize",
                                                                           "robust"))
    self.resize = predictor_lib.resolve_resize(resize, model.meta)
    self.overlap = float(overlap)
    if not 0.0 <= self.overlap < 1.0:
      raise ServeError(f"--overlap={overlap}: expected a value in [0, 1)")
    self.embedder = model_loader.PromptEmbedder(model, text_encoder)
    self._lock = threading.RLock()
    self._embeddings = _LRU(512)
    self._slices = _LRU(max_slices)
    self._images = _LRU(max_images, on_evict=self._forget_image)
    self._tmp = tempfile.mkdtemp(prefix="prosona_serve_")
    self.free_text, self.free_text_note = self._probe_text_encoder()
    self._cases = self._open_cases(run_config, fold) if run_config is not None else None

  # ------------------------------------------------------------ set-up
  def _probe_text_encoder(self) -> tuple[bool, str]:
    """Loads the text encoder now (not at the first prompt) and says whether free text
    works; a bank-only model lists its phrasings instead."""
    if not self.model.has_projector:
      return False, "a Stage-1 model: no prompts (Stage-1 samples only)"
    try:
      self._embedding("a free-text prompt, to load the text encoder")
    except UserError as e:
      reason = self.embedder._error or str(e)  # pylint: disable=protected-access
      return False, f"bank phrasings only: {reason}"
    text = self.model.meta.get("text", {})
    return True, f"free text through the {text.get('kind', '')} text encoder " + (
        f"{text.get('model')!r}" if text.get("model") else "(the kind's default)")

  def _open_cases(self, run_config, fold: int | None) -> dict:
    """The run's test fold: keys (listed by the page), the source, labels of raters."""
    from prosona_jax import figures  # pylint: disable=g-import-not-at-top
    from prosona_jax.data import sources  # pylint: disable=g-import-not-at-top
    from prosona_jax.data import splits  # pylint: disable=g-import-not-at-top
    d = run_config.data
    fold = max(int(d.fold), 0) if fold is None else int(fold)
    source = sources.source_from_config(d)
    split = splits.make_split(source.patient_ids, fold=fold, num_folds=int(d.num_folds),
                              seed=int(d.split_seed), level=str(d.split_level),
                              val_fraction=float(d.val_fraction))
    keys = [str(source.keys[i]) for i in split.test]
    labels = figures.rater_labels(list(d.rater_names), bool(d.order_raters_by_area),
                                  int(source.num_raters))
    return {"fold": fold, "keys": keys, "index": {k: int(i) for k, i in zip(keys, split.test)},
            "source": source, "labels": labels, "describe": source.describe()}

  def close(self) -> None:
    shutil.rmtree(self._tmp, ignore_errors=True)

  # ------------------------------------------------------------ what the page lists
  def info(self) -> dict:
    """The model, its prompts (bank phrasings with their raters) and the app's limits."""
    meta, bank = self.model.meta, self.model.bank
    data = meta["data"]
    bank_rows, defaults = [], []
    if bank is not None:
      names = self._rater_names(int(data.get("num_raters", 0)) or
                                int(max(bank.rater) + 1))
      bank_rows = [{"prompt": p, "rater": int(r), "rater_label": names[int(r)]
                    if 0 <= int(r) < len(names) else f"rater {int(r) + 1}",
                    "heldout": bool(h)}
                   for p, r, h in zip(bank.prompts, bank.rater, bank.heldout)]
      defaults = model_loader.canonical_prompts(bank)
    return {
        "model": self.model.origin, "image_size": self.model.image_size,
        "in_channels": self.channels, "prompts": self.model.has_projector,
        "free_text": self.free_text, "free_text_note": self.free_text_note,
        "bank": bank_rows, "default_prompts": defaults, "threshold": self.threshold,
        "num_samples": self.num_samples, "max_upload_bytes": self.max_upload_bytes,
        "resize": self.resize, "normalize": self.normalize,
        "cases": None if self._cases is None else {
            "fold": self._cases["fold"], "count": len(self._cases["keys"]),
            "source": self._cases["describe"]},
        "upload_extensions": list(UPLOAD_EXTENSIONS),
    }

  def _rater_names(self, num: int) -> list[str]:
    data = self.model.meta["data"]
    names = list(data.get("rater_names") or [])
    if bool(data.get("order_raters_by_area")) or len(names) != num:
      from prosona_jax import figures  # pylint: disable=g-import-not-at-top
      return figures.rater_labels(names or None, bool(data.get("order_raters_by_area")), num)
    return names

  def cases(self) -> dict:
    """Keys of the run's test fold (empty for an export: it carries no data)."""
    if self._cases is None:
      return {"fold": None, "keys": []}
    return {"fold": self._cases["fold"], "keys": list(self._cases["keys"])}

  # ------------------------------------------------------------ loading images
  def add_upload(self, filename: str, data: bytes) -> dict:
    """Reads an uploaded file (format from its name's extension, else its content)."""
    display = _safe_name(filename)
    if len(data) > self.max_upload_bytes:
      raise ServeError(f"{display}: {len(data)} bytes, over the upload limit of "
                       f"{self.max_upload_bytes} bytes (--max_upload_mb)")
    if not data:
      raise ServeError(f"{display}: empty upload")
    image_id = hashlib.sha256(display.encode() + b"\0" + data).hexdigest()[:16]
    with self._lock:
      if image_id in self._images:
        return self._describe(self._images.get(image_id))
      folder = tempfile.mkdtemp(dir=self._tmp)
      path = os.path.join(folder, "upload" + _upload_extension(filename))
      try:
        with open(path, "wb") as f:
          f.write(data)
        declared = _declared_values(path)
        if declared is not None and declared > MAX_VOXELS:
          raise ServeError(f"{display}: declares {declared} values, over the limit of "
                           f"{MAX_VOXELS}")
        try:
          vol = image_io.read_input(path, channels=self.channels, axis=self.axis)
        except UserError as e:  # Name the upload, not the private temporary file.
          raise ServeError(str(e).replace(path, display)) from None
        except Exception as e:  # pylint: disable=broad-except
          # A reader's own failure on hostile bytes is still the upload's fault.
          raise ServeError(f"{display}: not a readable image ({type(e).__name__})") from None
      finally:
        shutil.rmtree(folder, ignore_errors=True)  # Everything needed is in memory now.
      vol.path, vol.name = display, None  # Output stems from the upload's own name.
      try:
        image_io.normalize(vol, self.normalize)
      except UserError as e:
        raise ServeError(str(e)) from None
      return self._register(image_id, vol, display)

  def add_case(self, key: str) -> dict:
    """Loads a test-fold case of the run by key, with its raters' masks."""
    if self._cases is None:
      raise ServeError("no test-fold cases: start the app with --workdir=RUN to list them")
    key = str(key)
    if key not in self._cases["index"]:
      import difflib  # pylint: disable=g-import-not-at-top
      close = difflib.get_close_matches(key, self._cases["keys"], n=3)
      raise ServeError(f"case {key!r} is not in test fold {self._cases['fold']} "
                       f"(closest: {close})")
    image_id = hashlib.sha256(b"case\0" + key.encode()).hexdigest()[:16]
    with self._lock:
      if image_id in self._images:
        return self._describe(self._images.get(image_id))
      record = self._cases["source"][self._cases["index"][key]]
      image = np.asarray(record["image"], np.float32)
      vol = image_io.Volume(path=key, kind="key", slices=image[None], shape=image.shape[:2],
                            name=_safe_name(key))
      masks = np.asarray(record["masks"]) > 0
      return self._register(image_id, vol, key, raters=masks,
                            labels=list(self._cases["labels"]))

  def _register(self, image_id: str, vol: image_io.Volume, display: str,
                raters=None, labels=None) -> dict:
    try:
      plan = predictor_lib.plan(vol, self.model.image_size, self.resize, overlap=self.overlap)
    except UserError as e:
      raise ServeError(str(e)) from None
    lo, hi = (float(v) for v in np.percentile(vol.slices, [0.5, 99.5]))
    image = _Image(id=image_id, vol=vol, plan=plan, display=display, lo=lo, hi=hi,
                   raters=raters, rater_labels=labels)
    self._images.put(image_id, image)
    return self._describe(image)

  def _forget_image(self, image_id: str, _image) -> None:
    for key in [k for k in self._slices.data if k[0] == image_id]:
      del self._slices.data[key]

  def _describe(self, image: _Image) -> dict:
    vol = image.vol
    h, w = vol.slices.shape[1:3]
    out = {"image_id": image.id, "name": image.display, "kind": vol.kind,
           "shape": [int(n) for n in vol.shape], "axis": vol.axis,
           "slices": image.num_slices, "slice": image.num_slices // 2,
           "height": int(h), "width": int(w), "plan": image.plan.message,
           "mask_format": self._mask_format(vol), "raters": None}
    if image.raters is not None:
      out["raters"] = [{"label": label, "area": int(m.sum()), "mask_png": _b64(
          mask_png(m, RATER_COLOUR))} for label, m in zip(image.rater_labels, image.raters)]
    return out

  @staticmethod
  def _mask_format(vol: image_io.Volume) -> str:
    if vol.kind == "nifti":
      return ".nii.gz"
    return ".png" if vol.kind in ("png", "dicom", "key") and len(vol.shape) == 2 else ".npy"

  def image(self, image_id: str) -> dict:
    """What `add_upload` / `add_case` returned for this image."""
    with self._lock:
      return self._describe(self._image(image_id))

  def slice_png(self, image_id: str, index: int) -> bytes:
    """One slice of the image as a grey PNG (the page's background)."""
    with self._lock:
      image = self._image(image_id)
      s = self._slice_index(image, index)
      return grey_png(image.vol.slices[s], image.lo, image.hi)

  def _image(self, image_id: str) -> _Image:
    image = self._images.get(str(image_id))
    if image is None:
      raise ServeError(f"no image {image_id!r} (unknown, or dropped from the cache of the "
                       f"last {self._images.size} images): load it again")
    return image

  @staticmethod
  def _slice_index(image: _Image, index) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
      raise ServeError(f"slice {index!r}: expected an integer")
    if not 0 <= int(index) < image.num_slices:
      raise ServeError(f"slice {index}: the image has {image.num_slices} slice(s), "
                       f"0 to {image.num_slices - 1}")
    return int(index)

  # ------------------------------------------------------------ the model
  def _embedding(self, text: str) -> tuple[np.ndarray, str]:
    text = self._check_prompt(text)
    hit = self._embeddings.get(text)
    if hit is None:
      emb, how = self.embedder([text])
      hit = (emb[0], how[0])
      self._embeddings.put(text, hit)
    return hit

  @staticmethod
  def _check_prompt(text) -> str:
    if not isinstance(text, str) or not text.strip():
      raise ServeError(f"prompt {text!r}: expected non-empty text")
    if len(text) > MAX_PROMPT_CHARS:
      raise ServeError(f"a prompt of {len(text)} characters; at most {MAX_PROMPT_CHARS}")
    return text.strip()

  def _model_input(self, image: _Image, which: Sequence[int]) -> np.ndarray:
    x = image.vol.slices[list(which)]
    if image.plan.mode in ("resample", "crop_or_pad"):
      x = image_io.to_model(x, self.model.image_size, image.plan.mode)
    return x

  def _to_image(self, image: _Image, probs: np.ndarray) -> np.ndarray:
    """(..., model or slice size) -> (..., h, w) of the slice."""
    if image.plan.mode in ("resample", "crop_or_pad"):
      hw = image.vol.slices.shape[1:3]
      return image_io.from_model(probs, hw, self.model.image_size, image.plan.mode)
    return probs

  def _slice(self, image: _Image, s: int) -> _Slice:
    entry = self._slices.get((image.id, s))
    if entry is None:
      # Slice s draws from the key `predict` gives slice s of the same input.
      keys = inference.image_keys(self.seed, np.array([s]))
      encoded = self.predictor.encode(self._model_input(image, [s]), keys, image.plan.layout)
      entry = _Slice(encoded=encoded, maps=_LRU(128))
      self._slices.put((image.id, s), entry)
    return entry

  def _prompt_map(self, image: _Image, s: int, key, emb_E: np.ndarray) -> np.ndarray:
    entry = self._slice(image, s)
    probs = entry.maps.get(key)
    if probs is None:
      # One prompt per call: one compiled decode whatever the number of prompts.
      out = self.predictor.decode_prompts(entry.encoded, emb_E[None].astype(np.float32))
      probs = self._to_image(image, out[0])[0]
      entry.maps.put(key, probs)
    return probs

  def _mask_entry(self, image: _Image, probs: np.ndarray, threshold: float,
                  colour=PROMPT_COLOUR, return_probs: bool = False) -> dict:
    mask = probs > threshold
    area = int(mask.sum())
    out = {"area": area, "area_fraction": area / mask.size, "mask_png": _b64(
        mask_png(mask, colour))}
    if image.raters is not None and image.raters.shape[1:] == mask.shape:
      scores = [dice(mask, r) for r in image.raters]
      out["rater_dice"] = [{"label": l, "dice": round(d, 4)}
                           for l, d in zip(image.rater_labels, scores)]
      best = int(np.argmax(scores))
      out["best_rater"] = {"label": image.rater_labels[best], "dice": round(scores[best], 4)}
    if return_probs:
      buf = io.BytesIO()
      np.save(buf, probs.astype(np.float32))
      out["probs_npy"] = _b64(buf.getvalue())
    return out

  def _threshold(self, threshold) -> float:
    if threshold is None:
      return self.threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
        0.0 < float(threshold) < 1.0):
      raise ServeError(f"threshold {threshold!r}: expected a number in (0, 1)")
    return float(threshold)

  def predict(self, image_id: str, prompts: Sequence[str], slice_index: int = 0,
              threshold: float | None = None, return_probs: bool = False) -> dict:
    """Each prompt's mask on one slice: area, overlay PNG, best-matching rater."""
    start = time.perf_counter()
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
      raise ServeError("prompts: expected a list of 1 to 16 texts")
    if len(prompts) > MAX_PROMPTS:
      raise ServeError(f"{len(prompts)} prompts: at most {MAX_PROMPTS} at a time")
    thr = self._threshold(threshold)
    with self._lock:
      image = self._image(image_id)
      s = self._slice_index(image, slice_index)
      masks = []
      for text in prompts:
        emb, how = self._embedding(text)
        probs = self._prompt_map(image, s, ("prompt", text.strip()), emb)
        masks.append({"prompt": text.strip(), "embedding": how,
                      **self._mask_entry(image, probs, thr, return_probs=return_probs)})
      return {"image_id": image.id, "slice": s, "threshold": thr, "masks": masks,
              "elapsed_ms": round(1e3 * (time.perf_counter() - start), 2)}

  def interpolate(self, image_id: str, prompts: Sequence[str], alpha: float,
                  slice_index: int = 0, threshold: float | None = None,
                  return_probs: bool = False) -> dict:
    """The mask at `alpha` between two prompts' text embeddings ((1-a) e0 + a e1), as
    `predict --interpolate` draws the paper's Fig. 4."""
    start = time.perf_counter()
    if not isinstance(prompts, (list, tuple)) or len(prompts) != 2:
      raise ServeError("prompts: expected exactly two texts")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
        0.0 <= float(alpha) <= 1.0):
      raise ServeError(f"alpha {alpha!r}: expected a number in [0, 1]")
    alpha, thr = float(alpha), self._threshold(threshold)
    with self._lock:
      image = self._image(image_id)
      s = self._slice_index(image, slice_index)
      (e0, _), (e1, _) = self._embedding(prompts[0]), self._embedding(prompts[1])
      emb = ((1.0 - alpha) * e0 + alpha * e1).astype(np.float32)
      key = ("mix", prompts[0].strip(), prompts[1].strip(), round(alpha, 6))
      probs = self._prompt_map(image, s, key, emb)
      return {"image_id": image.id, "slice": s, "threshold": thr, "alpha": alpha,
              "prompts": [p.strip() for p in prompts],
              **self._mask_entry(image, probs, thr, return_probs=return_probs),
              "elapsed_ms": round(1e3 * (time.perf_counter() - start), 2)}

  def samples(self, image_id: str, num: int | None = None, slice_index: int = 0,
              threshold: float | None = None) -> dict:
    """`num` Stage-1 prior samples of one slice, sorted by area (smallest first)."""
    start = time.perf_counter()
    num = self.num_samples if num is None else num
    if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= MAX_SAMPLES:
      raise ServeError(f"num {num!r}: expected 1 to {MAX_SAMPLES} samples")
    thr = self._threshold(threshold)
    with self._lock:
      image = self._image(image_id)
      s = self._slice_index(image, slice_index)
      entry = self._slice(image, s)
      probs = entry.maps.get(("samples", num))
      if probs is None:
        probs = self._to_image(image, self.predictor.decode_samples(entry.encoded, num)[0])
        entry.maps.put(("samples", num), probs)
      areas = (probs > thr).reshape(num, -1).sum(1)
      order = np.argsort(areas, kind="stable")
      return {"image_id": image.id, "slice": s, "threshold": thr,
              "samples": [{"sample": int(j), **self._mask_entry(image, probs[j], thr,
                                                                SAMPLE_COLOUR)}
                          for j in order],
              "elapsed_ms": round(1e3 * (time.perf_counter() - start), 2)}

  def download(self, image_id: str, prompts: Sequence[str], what: str = "masks",
               threshold: float | None = None) -> tuple[str, str, bytes]:
    """The prompts' masks over the whole input, as files.

    Args:
      image_id: a loaded image.
      prompts: the prompts whose masks are wanted.
      what: `masks`: a zip of one mask per prompt in the input's format (NIfTI with its
        affine and header, PNG for 2-D PNG/DICOM/cases, else .npy) and `prompts.json`;
        `probs`: one .npy of float32 probabilities, (P,) + the input's shape.
      threshold: of the masks.

    Returns:
      (file name, media type, contents).
    """
    if what not in ("masks", "probs"):
      raise ServeError(f"what={what!r}: expected 'masks' or 'probs'")
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not (
        1 <= len(prompts) <= MAX_PROMPTS):
      raise ServeError("prompts: expected a list of 1 to 16 texts")
    thr = self._threshold(threshold)
    with self._lock:
      image = self._image(image_id)
      vol = image.vol
      embs = [self._embedding(p) for p in prompts]
      if image.num_slices == 1:
        probs = np.stack([self._prompt_map(image, 0, ("prompt", p.strip()), e)
                          for p, (e, _) in zip(prompts, embs)])[None]
      else:  # Every slice, without keeping their features (a volume's would be large).
        n = image.num_slices
        keys = inference.image_keys(self.seed, np.arange(n))
        probs = self.predictor.prompts(self._model_input(image, range(n)), keys,
                                       np.stack([e for e, _ in embs]), image.plan.layout)
        probs = self._to_image(image, probs)
      full = vol.to_input_layout(probs)  # (P,) + the input's shape.
      if what == "probs":
        buf = io.BytesIO()
        np.save(buf, full.astype(np.float32))
        return f"{vol.stem}_probs.npy", "application/octet-stream", buf.getvalue()
      folder = tempfile.mkdtemp(dir=self._tmp)
      try:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
          listing = []
          for j, (p, (_, how)) in enumerate(zip(prompts, embs)):
            path = image_io.write_mask(vol, full[j] > thr, folder, f"prompt{j}")
            zf.write(path, os.path.basename(path))
            listing.append({"file": os.path.basename(path), "prompt": p.strip(),
                            "embedding": how, "area": int((full[j] > thr).sum())})
          zf.writestr("prompts.json", json.dumps(
              {"input": image.display, "model": self.model.origin, "seed": self.seed,
               "threshold": thr, "geometry": image.plan.record, "masks": listing},
              indent=1))
      finally:
        shutil.rmtree(folder, ignore_errors=True)
      return f"{vol.stem}_masks.zip", "application/zip", buf.getvalue()

  def warm_up(self) -> None:
    """Compiles the image part and one prompt's decode for a model-sized slice, so that
    the first request is answered at once."""
    size = self.model.image_size
    vol = image_io.Volume(path="warm-up", kind="npy",
                          slices=np.zeros((1, size, size, self.channels), np.float32),
                          shape=(size, size))
    with self._lock:
      image = self._register("warm-up", vol, "warm-up")
      try:
        if self.model.has_projector:
          text = (model_loader.canonical_prompts(self.model.bank) or ["x"])[0]
          self.predict(image["image_id"], [text])
        self.samples(image["image_id"])
      finally:
        self._images.data.pop("warm-up", None)
        self._forget_image("warm-up", None)


# ---------------------------------------------------------------- the HTTP app
def page_html() -> str:
  """The page (`prosona_jax/static/serve.html`): one file, no external resources."""
  import importlib.resources  # pylint: disable=g-import-not-at-top
  return (importlib.resources.files("prosona_jax") / "static" / "serve.html").read_text(
      encoding="utf-8")


# Content types a cross-site page may send without a CORS preflight; bodies of these are
# refused, so that another site open in the same browser cannot drive this app.
_SIMPLE_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")


def create_app(service: Service, *, allowed_hosts: Sequence[str] | None = None):
  """The Starlette app: the page at `/`, the JSON API under `/api/` (README).

  Args:
    service: the model behind it.
    allowed_hosts: values of the Host header to answer (defends a localhost app against
      DNS rebinding); None: any.
  """
  # The extra is imported here only: the service above works without it.
  # pylint: disable=g-import-not-at-top
  from starlette.applications import Starlette
  from starlette.concurrency import run_in_threadpool
  from starlette.exceptions import HTTPException
  from starlette.middleware import Middleware
  from starlette.middleware.trustedhost import TrustedHostMiddleware
  from starlette.requests import Request
  from starlette.responses import HTMLResponse, JSONResponse, Response
  from starlette.routing import Route
  # pylint: enable=g-import-not-at-top

  limit = service.max_upload_bytes
  page = page_html()
  headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
             "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                                        "connect-src 'self'; frame-ancestors 'none'"}

  def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status,
                        headers={"Cache-Control": "no-store"})

  def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()

  async def body_json(request: Request) -> dict:
    if content_type(request) != "application/json":
      raise HTTPException(415, "send a JSON object with Content-Type: application/json")
    raw = await read_body(request)
    try:
      body = json.loads(raw)
    except ValueError:
      raise ServeError("the request body is not JSON") from None
    if not isinstance(body, dict):
      raise ServeError("expected a JSON object")
    return body

  async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
      raise HTTPException(413, f"{declared} bytes: over the upload limit of {limit} bytes "
                          "(--max_upload_mb)")
    chunks, size = [], 0
    async for chunk in request.stream():  # Counted as it comes: a chunked body too.
      size += len(chunk)
      if size > limit:
        raise HTTPException(413, f"over the upload limit of {limit} bytes (--max_upload_mb)")
      chunks.append(chunk)
    return b"".join(chunks)

  def field(body: dict, name: str, kind: type, default: Any = dataclasses.MISSING) -> Any:
    """body[name], of JSON type `kind` (a float may be written as an integer)."""
    if body.get(name) is None:
      if default is dataclasses.MISSING:
        raise ServeError(f"field {name!r} is missing")
      return default
    value = body[name]
    kinds = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kinds):
      raise ServeError(f"field {name!r}: expected {kind.__name__}, got {value!r}"[:200])
    return value

  async def index(_request):
    return HTMLResponse(page, headers=headers)

  async def info(_request):
    return JSONResponse(await run_in_threadpool(service.info))

  async def cases(_request):
    return JSONResponse(await run_in_threadpool(service.cases))

  async def upload(request: Request):
    if content_type(request) in _SIMPLE_TYPES or not content_type(request):
      raise HTTPException(415, "send the file as the request body with Content-Type: "
                          "application/octet-stream")
    data = await read_body(request)
    name = request.query_params.get("filename", "upload")
    return JSONResponse(await run_in_threadpool(service.add_upload, name, data))

  async def case(request: Request):
    body = await body_json(request)
    return JSONResponse(await run_in_threadpool(service.add_case, field(body, "key", str)))

  async def image(request: Request):
    return JSONResponse(await run_in_threadpool(service.image, request.path_params["image_id"]))

  async def slice_png(request: Request):
    data = await run_in_threadpool(service.slice_png, request.path_params["image_id"],
                                   request.path_params["index"])
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

  async def predict(request: Request):
    b = await body_json(request)
    return JSONResponse(await run_in_threadpool(
        service.predict, field(b, "image_id", str), field(b, "prompts", list),
        field(b, "slice", int, 0), field(b, "threshold", float, None),
        field(b, "return_probs", bool, False)))

  async def interpolate(request: Request):
    b = await body_json(request)
    return JSONResponse(await run_in_threadpool(
        service.interpolate, field(b, "image_id", str), field(b, "prompts", list),
        field(b, "alpha", float), field(b, "slice", int, 0),
        field(b, "threshold", float, None), field(b, "return_probs", bool, False)))

  async def samples(request: Request):
    b = await body_json(request)
    return JSONResponse(await run_in_threadpool(
        service.samples, field(b, "image_id", str), field(b, "num", int, None),
        field(b, "slice", int, 0), field(b, "threshold", float, None)))

  async def download(request: Request):
    b = await body_json(request)
    name, media, data = await run_in_threadpool(
        service.download, field(b, "image_id", str), field(b, "prompts", list),
        field(b, "what", str, "masks"), field(b, "threshold", float, None))
    return Response(data, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})

  async def user_error(_request, exc):
    return error(400, str(exc))

  async def http_error(_request, exc):
    return error(exc.status_code, exc.detail)

  async def server_error(_request, exc):
    # A bug, not the request's fault: logged with its traceback; the app keeps serving.
    _LOG.error("internal error", exc_info=exc)
    return error(500, f"internal error ({type(exc).__name__}); see the server's log")

  routes = [
      Route("/", index), Route("/api/info", info), Route("/api/cases", cases),
      Route("/api/images", upload, methods=["POST"]),
      Route("/api/case", case, methods=["POST"]),
      Route("/api/images/{image_id:str}", image),
      Route("/api/images/{image_id:str}/slices/{index:int}.png", slice_png),
      Route("/api/predict", predict, methods=["POST"]),
      Route("/api/interpolate", interpolate, methods=["POST"]),
      Route("/api/samples", samples, methods=["POST"]),
      Route("/api/download", download, methods=["POST"]),
  ]
  middleware = []
  if allowed_hosts:
    middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
  return Starlette(routes=routes, middleware=middleware, exception_handlers={
      UserError: user_error, HTTPException: http_error, Exception: server_error})


def bind(host: str, port: int) -> socket.socket:
  """A listening socket on (host, port); port 0 takes a free one (`sock.getsockname()`)."""
  family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host.strip("[]"), port))
  except OSError as e:
    sock.close()
    raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
  sock.listen(64)
  sock.set_inheritable(True)
  return sock


def address(sock: socket.socket) -> str:
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(service: Service, sock: socket.socket, *, allowed_hosts=None,
          log_level: str = "warning") -> None:
  """Runs the app on `sock` until interrupted (Ctrl-C / SIGTERM)."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  app = create_app(service, allowed_hosts=allowed_hosts)
  config = uvicorn.Config(app, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=2)
  try:
    uvicorn.Server(config).run(sockets=[sock])
  finally:
    service.close()

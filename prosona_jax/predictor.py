"""Segments new images with a trained model: one mask per prompt, or Stage-1 samples.

The library behind `python -m prosona_jax.predict` (see its `--help`): `run(Options(...))`
predicts every input and writes the masks, probability maps, overlays and
`predictions.json`. A model is an export folder (run through its serialized functions
only) or a training run's checkpoints (`model_loader`).

Whole images: a slice larger than the model goes through it in overlapping tiles of the
model's size, blended with Gaussian weights (`tiling.py`, MONAI's conventions); `--roi`
predicts the one tile around a point (the rest gets probability 0); `resample` rescales
the slice to the model's size and back. Slices smaller than the model are zero-padded
and the padding is cut off the outputs. `Predictor` runs any of these on batches of
tiles; `plan` chooses one for an input.

What is blended are probabilities: a tile's prompt mask (or sample) is a probability map,
and the blend is a weighted mixture of the tiles' maps, which stays in [0, 1] and lets no
single over-confident tile dominate a region that others see better (blending logits
would be a product of the tiles' opinions instead). Each tile draws its own K prior
samples from its own key (`inference.tile_keys`): a whole-slice prompt mask is a blend of
per-tile prompt latents, and a whole-slice "sample j" a blend of per-tile sample j's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import numpy as np

from prosona_jax import image_io
from prosona_jax import inference
from prosona_jax import model_loader
from prosona_jax import tiling
from prosona_jax.inference import InferenceError


@dataclasses.dataclass
class Options:
  """What to predict (the command-line flags, for use from Python)."""
  out: str
  model: str | None = None
  workdir: str | None = None
  config: object = None
  fold: int | None = None
  stage2_dir: str | None = None
  cell: int | None = None
  inputs: Sequence[str] = ()
  keys: Sequence[str] = ()
  prompts: Sequence[str] = ()
  samples: int = 0
  interpolate: Sequence[str] = ()
  interpolate_steps: int = 7
  seed: int = 0
  batch_size: int = 8
  threshold: float = 0.5
  axis: int | None = None
  normalize: str = "auto"
  resize: str = "auto"
  roi: Sequence[int | str] | None = None
  overlap: float = tiling.DEFAULT_OVERLAP
  sigma_scale: float = tiling.DEFAULT_SIGMA_SCALE
  text_encoder: str = ""


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return (1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))).astype(np.float32)


def _chunk(n: int, batch: int) -> int:
  """Tiles per model call: `batch`, or the next power of two for fewer tiles.

  Each call size is one compiled program; powers of two bound their number (at most
  log2(batch) + 1 whatever the inputs) for at most twice the work of a short call.
  """
  if n >= batch:
    return batch
  return min(batch, 1 << max(n - 1, 0).bit_length())


class Predictor:
  """Applies a `LoadedModel` to whole slices: tiles, the model on batches of tiles, blend.

  Per batch of tiles the image part (backbone features, the prior and its K samples:
  `encode`) runs once, and only the projector, prompt latents and Fcomb
  (`decode_prompts`) run for all P prompts at once, or Fcomb (`decode_latents`) for all
  N samples. Exports of format version 1 have no split functions; their tiles go through
  `prompt_probs` (which also runs the backbone once for all prompts) and `prior` +
  `decode`, with the same results.
  """

  def __init__(self, model: model_loader.LoadedModel, batch_size: int):
    if batch_size < 1:
      raise InferenceError(f"--batch_size={batch_size}: expected at least 1")
    self.model, self.batch = model, batch_size
    self._draw = None

  # ------------------------------------------------------------ one batch of tiles
  def prompt_tiles(self, tiles_bssC: np.ndarray, keys_b2: np.ndarray,
                   emb_PE: np.ndarray):
    """(b, P, s, s) probabilities of every prompt on model-sized tiles (a device array)."""
    fns = self.model.fns
    if not self.model.has_projector:
      raise InferenceError(f"{self.model.origin}: this model has no Stage-2 projector "
                           "(a Stage-1 model), so it takes no prompts; use --samples=N")
    if not self.model.has_split:
      return fns["prompt_probs"](tiles_bssC, emb_PE, keys_b2)
    feats, _, _, z_bKD = fns["encode"](tiles_bssC, keys_b2)
    return fns["decode_prompts"](feats, z_bKD, emb_PE)

  def sample_tiles(self, tiles_bssC: np.ndarray, keys_b2: np.ndarray, num: int):
    """(b, num, s, s) logits of `num` prior samples per tile (a device array)."""
    fns, draw = self.model.fns, self._draw_fn()
    if not self.model.has_split:
      mu, log_sigma = fns["prior"](tiles_bssC)
      return fns["decode"](tiles_bssC, draw(mu, log_sigma, keys_b2, num))
    feats, mu, log_sigma, _ = fns["encode"](tiles_bssC, keys_b2)
    return fns["decode_latents"](feats, draw(mu, log_sigma, keys_b2, num))

  # ------------------------------------------------------------ whole slices
  def prompts(self, x_NhwC: np.ndarray, keys_N2: np.ndarray, emb_PE: np.ndarray,
              layout: tiling.Layout | None = None,
              slices: Sequence[int] | None = None) -> np.ndarray:
    """(N, P, h, w) probabilities of every prompt for every slice (see `run_tiles`)."""
    return self.run_tiles(x_NhwC, keys_N2, len(emb_PE),
                          lambda t, k: self.prompt_tiles(t, k, emb_PE), layout, slices)

  def samples(self, x_NhwC: np.ndarray, keys_N2: np.ndarray, num: int,
              layout: tiling.Layout | None = None,
              slices: Sequence[int] | None = None) -> np.ndarray:
    """(N, num, h, w) probabilities of `num` prior samples per slice (see `run_tiles`)."""
    return self.run_tiles(x_NhwC, keys_N2, num,
                          lambda t, k: _sigmoid(self.sample_tiles(t, k, num)), layout,
                          slices)

  def run_tiles(self, x_NhwC: np.ndarray, keys_N2: np.ndarray, channels: int,
                tile_fn: Callable, layout: tiling.Layout | None = None,
                slices: Sequence[int] | None = None) -> np.ndarray:
    """Runs `tile_fn(tiles (b, s, s, C), keys (b, 2)) -> (b, channels, s, s)` over slices.

    Args:
      x_NhwC: the slices (normalised).
      keys_N2: one key per slice; its tiles draw from `inference.tile_keys`.
      channels: outputs per tile (prompts or samples).
      tile_fn: the model on a batch of tiles.
      layout: where the tiles of an (h, w) slice go; default the sliding window.
      slices: which slices to predict (default all); the others get probability 0.

    Returns:
      (N, channels, h, w) float32, each slice blended from its tiles (`tiling.Canvas`).
    """
    tiles = _Tiles(x_NhwC, keys_N2, self.model.image_size, self.batch, layout, slices)
    blend = _Blend(tiles, channels)
    for jobs, tiles_bssC, keys_b2 in tiles.batches():
      blend.add(jobs, tile_fn(tiles_bssC, keys_b2))
    return blend.result()

  # ------------------------------------------------------------ encode once, decode often
  def encode(self, x_NhwC: np.ndarray, keys_N2: np.ndarray,
             layout: tiling.Layout | None = None,
             slices: Sequence[int] | None = None) -> "Encoded":
    """Runs the image part of every tile once and keeps it (on the device).

    For interactive use (a prompt at a time on the same image): `decode_prompts` and
    `decode_samples` then run only the projector and Fcomb. Keeps (tiles, s, s, F)
    features: fine for a slice, large for a whole CT volume (use `prompts` there).
    """
    if not self.model.has_split:
      raise InferenceError(f"{self.model.origin}: an export of format version 1 has no "
                           "`encode`; re-export it with this prosona_jax")
    tiles = _Tiles(x_NhwC, keys_N2, self.model.image_size, self.batch, layout, slices)
    parts = [(jobs, self.model.fns["encode"](tiles_bssC, keys_b2), keys_b2)
             for jobs, tiles_bssC, keys_b2 in tiles.batches()]
    return Encoded(tiles, parts)

  def decode_prompts(self, encoded: "Encoded", emb_PE: np.ndarray) -> np.ndarray:
    """(N, P, h, w) probabilities of every prompt, from `encode`'s features."""
    if not self.model.has_projector:
      raise InferenceError(f"{self.model.origin}: this model has no Stage-2 projector "
                           "(a Stage-1 model), so it takes no prompts; use --samples=N")
    blend = _Blend(encoded.tiles, len(emb_PE))
    for jobs, (feats, _, _, z_bKD), _ in encoded.parts:
      blend.add(jobs, self.model.fns["decode_prompts"](feats, z_bKD, emb_PE))
    return blend.result()

  def decode_samples(self, encoded: "Encoded", num: int) -> np.ndarray:
    """(N, num, h, w) probabilities of `num` prior samples, from `encode`'s features.

    The same samples as `samples` draws (each tile's from its own key).
    """
    blend = _Blend(encoded.tiles, num)
    for jobs, (feats, mu, log_sigma, _), keys_b2 in encoded.parts:
      z = self._draw_fn()(mu, log_sigma, keys_b2, num)
      blend.add(jobs, _sigmoid(self.model.fns["decode_latents"](feats, z)))
    return blend.result()

  def _draw_fn(self):
    import jax  # pylint: disable=g-import-not-at-top
    if self._draw is None:  # One compiled draw per (b, num), not one per eager op.
      self._draw = jax.jit(inference.prior_samples, static_argnums=3)
    return self._draw


class _Tiles:
  """The tiles of some slices, in batches of a fixed size (see `_chunk`)."""

  def __init__(self, x_NhwC: np.ndarray, keys_N2: np.ndarray, size: int, batch: int,
               layout: tiling.Layout | None, slices: Sequence[int] | None):
    n_slices, h, w = x_NhwC.shape[:3]
    if layout is None:
      layout = tiling.sliding_window((h, w), size)
    if layout.tile != size or tuple(layout.shape) != (h, w):
      raise ValueError(f"layout of {layout.shape} slices in {layout.tile}-px tiles for "
                       f"{(h, w)} slices and a {size}-px model")
    self.x, self.layout, self.shape = x_NhwC, layout, (n_slices, h, w)
    which = list(range(n_slices)) if slices is None else [int(n) for n in slices]
    t = layout.num_tiles
    self.keys = inference.tile_keys(np.asarray(keys_N2)[which], t) if which else None
    # (index in `which`, slice, tile), slice by slice.
    self.jobs = [(i, n, k) for i, n in enumerate(which) for k in range(t)]
    self.step = _chunk(len(self.jobs), batch)

  def batches(self):
    """Yields (jobs, tiles (b, s, s, C) float32, keys (b, 2)); b is always `step`."""
    padded = {}
    for start in range(0, len(self.jobs), self.step):
      jobs = self.jobs[start:start + self.step]
      tiles = []
      for _, n, t in jobs:
        if n not in padded:
          padded.clear()  # Slice by slice: only the current one is kept.
          padded[n] = self.layout.pad_slice(self.x[n])
        tiles.append(self.layout.cut(padded[n], t))
      keys = [self.keys[i, t] for i, _, t in jobs]
      # A short last batch repeats its first tile; the copies' outputs are dropped.
      tiles += tiles[:1] * (self.step - len(jobs))
      keys += keys[:1] * (self.step - len(jobs))
      yield jobs, np.stack(tiles).astype(np.float32), np.stack(keys)


class _Blend:
  """Tile outputs blended into whole slices as they come (`tiling.Canvas` per slice)."""

  def __init__(self, tiles: _Tiles, channels: int):
    n_slices, h, w = tiles.shape
    self.layout, self.channels = tiles.layout, channels
    self.out = np.zeros((n_slices, channels, h, w), np.float32)
    self.canvases, self.pending = {}, None

  def add(self, jobs, result) -> None:
    # Dispatch is asynchronous: blend the previous batch while this one runs.
    if self.pending is not None:
      self._finish(*self.pending)
    self.pending = (jobs, result)

  def _finish(self, jobs, result) -> None:
    result = np.asarray(result)
    last = self.layout.num_tiles - 1
    for (_, n, t), tile_out in zip(jobs, result):
      canvas = self.canvases.setdefault(n, self.layout.canvas(self.channels))
      canvas.add(t, tile_out)
      if t == last:
        self.out[n] = canvas.result()
        del self.canvases[n]

  def result(self) -> np.ndarray:
    if self.pending is not None:
      self._finish(*self.pending)
      self.pending = None
    return self.out


@dataclasses.dataclass
class Encoded:
  """The image part of whole slices (`Predictor.encode`), for `decode_*` later.

  Attributes:
    tiles: the slices' tiles and layout.
    parts: per batch of tiles, (jobs, encode's (features, mu, log_sigma, z), keys).
  """
  tiles: _Tiles
  parts: list


# ---------------------------------------------------------------- geometry of an input
@dataclasses.dataclass
class Plan:
  """How one input's slices reach the model and come back.

  Attributes:
    mode: `sliding_window`, `roi`, `resample` or `crop_or_pad`.
    layout: tiles of the slices the model is given (model-sized for `resample` and
      `crop_or_pad`, which `image_io.to_model` makes).
    slices: which slices are predicted (None: all).
    message: one line for the user.
    record: what predictions.json records.
  """
  mode: str
  layout: tiling.Layout
  slices: list[int] | None
  message: str
  record: dict


def _roi_point(roi: Sequence, vol: image_io.Volume) -> tuple[tuple[int, int], list[int] | None]:
  """The in-plane (row, column) of `--roi` and the slices it selects (None: all)."""
  try:
    point = [int(str(v).strip()) for v in roi]
  except ValueError:
    raise InferenceError(f"--roi={','.join(str(v) for v in roi)}: expected integer "
                         "pixel coordinates, e.g. --roi=380,120") from None
  dims = len(vol.shape)
  if len(point) not in (2, dims):
    want = "2 numbers (row,column)" + (f" or {dims} (one per axis of the volume, in "
                                        "the file's order)" if dims == 3 else "")
    raise InferenceError(f"--roi={','.join(map(str, point))}: {vol.path} has shape "
                         f"{tuple(vol.shape)}; expected {want}")
  for c, n in zip(point if len(point) == dims else [], vol.shape):
    if not 0 <= c < n:
      raise InferenceError(f"--roi={','.join(map(str, point))}: outside {vol.path}, of "
                           f"shape {tuple(vol.shape)}")
  if len(point) == 2 or vol.axis is None:
    return (point[0], point[1]), None
  in_plane = [c for i, c in enumerate(point) if i != vol.axis]
  return (in_plane[0], in_plane[1]), [point[vol.axis]]


def plan(vol: image_io.Volume, size: int, mode: str, *, roi: Sequence | None = None,
         overlap: float = tiling.DEFAULT_OVERLAP,
         sigma_scale: float = tiling.DEFAULT_SIGMA_SCALE) -> Plan:
  """Chooses how `vol`'s slices go through a `size`-px model (module docstring).

  Args:
    vol: the input.
    size: the model's image size.
    mode: `sliding_window`, `resample` or `crop_or_pad` (`auto` resolved by the caller);
      ignored when `roi` is given.
    roi: a point (row, column), or one coordinate per axis of a volume.
    overlap: of the sliding window's tiles, in [0, 1).
    sigma_scale: of the Gaussian blend.
  """
  h, w = vol.slices.shape[1:3]
  name = f"{os.path.basename(vol.path)} ({h}x{w}{' slices' if vol.axis is not None else ''})"
  if roi:
    centre, slices = _roi_point(roi, vol)
    try:
      layout = tiling.region((h, w), size, centre)
    except ValueError as e:
      raise InferenceError(f"--roi: {e}") from None
    (y0, y1), (x0, x1) = layout.info["box"]
    where = "" if slices is None else f" of slice {slices[0]} along axis {vol.axis}"
    rest = "the rest" + (" and the other slices" if slices is not None else "")
    return Plan("roi", layout, slices,
                f"{name}: one {size}x{size} region around {centre}{where}: rows {y0}-{y1}, "
                f"columns {x0}-{x1}; {rest} not predicted (probability 0)",
                {"resize": "roi", "geometry": {**layout.describe(), "slices": slices}})
  if mode in ("resample", "crop_or_pad"):
    layout = tiling.sliding_window((size, size), size)
    what = ("rescaled to the model's size and back" if mode == "resample" else
            "centre-cropped / padded to the model's size" +
            ("; outside the centre crop probability 0" if max(h, w) > size else ""))
    return Plan(mode, layout, None, f"{name}: {what} ({size}x{size}, --resize={mode})",
                {"resize": mode, "geometry": {"mode": mode, "tile": size}})
  if mode != "sliding_window":
    raise InferenceError(f"--resize={mode!r}: expected one of {image_io.RESIZE}")
  try:
    layout = tiling.sliding_window((h, w), size, overlap, sigma_scale)
  except ValueError as e:
    raise InferenceError(f"--overlap={overlap}: {e}") from None
  padded = layout.padded_shape
  pad = (f"zero-padded to {padded[0]}x{padded[1]} (the padding is cut off the outputs), "
         if padded != (h, w) else "")
  if layout.num_tiles == 1:
    what = f"{pad}the model's {size}x{size} as it is" if pad else "the model's size"
    record = layout.describe()
  else:
    what = (f"{pad}sliding window of {layout.num_tiles} tiles of {size}x{size} (overlap "
            f"{overlap:g}, Gaussian blend, sigma {sigma_scale:g} x {size})")
    record = {**layout.describe(),
              "prior_samples": "per tile: tile t draws its own from fold_in(the slice's key, t)"}
  return Plan("sliding_window", layout, None, f"{name}: {what}",
              {"resize": "sliding_window", "geometry": record})


def resolve_resize(how: str, meta: dict) -> str:
  """`auto` -> `resample` for models trained on resampled folder slices, else the
  sliding window (which pads smaller slices and runs model-sized ones as they are)."""
  if how not in image_io.RESIZE:
    raise InferenceError(f"--resize={how!r}: expected one of {image_io.RESIZE}")
  if how != "auto":
    return how
  data = meta["data"]
  trained = data.get("folder", {}).get("resize", "crop_or_pad")
  if data.get("format", "") in ("folder", "auto") and trained == "resample":
    return "resample"
  return "sliding_window"


def _pick_slice(probs_NPhw: np.ndarray, threshold: float) -> int:
  """The slice where the outputs differ most (else the largest foreground)."""
  area = (probs_NPhw > threshold).reshape(probs_NPhw.shape[0], probs_NPhw.shape[1], -1).sum(-1)
  score = area.max(1) - area.min(1) + 1e-3 * area.sum(1)
  return int(np.argmax(score))


def _read_volumes(opts: Options, model: model_loader.LoadedModel, run_config) -> list:
  data = model.meta["data"]
  axis = opts.axis if opts.axis is not None else int(data.get("folder", {}).get("axis", 2))
  vols = [image_io.read_input(p, channels=int(data["in_channels"]), axis=axis)
          for p in opts.inputs]
  if opts.keys:
    if run_config is None:
      raise InferenceError("--key reads the training run's dataset: use it with --workdir")
    from prosona_jax.data import sources  # pylint: disable=g-import-not-at-top
    import difflib  # pylint: disable=g-import-not-at-top
    source = sources.source_from_config(run_config.data)
    index = {k: i for i, k in enumerate(source.keys)}
    for key in opts.keys:
      if key not in index:
        close = difflib.get_close_matches(key, list(index), n=3)
        raise InferenceError(f"--key={key!r}: not in the dataset "
                             f"({source.describe()}); closest: {close}")
      image = np.asarray(source[index[key]]["image"], np.float32)
      vols.append(image_io.Volume(path=key, kind="key", slices=image[None],
                                  shape=image.shape[:2]))
  if not vols:
    raise InferenceError("nothing to predict: give --input=PATH or --key=KEY")
  return vols


def _what_to_predict(opts: Options, model: model_loader.LoadedModel,
                     embedder: model_loader.PromptEmbedder):
  """(file labels, figure titles, manifest entries, prompt embeddings or None)."""
  if opts.samples > 0:
    labels = [f"sample{j}" for j in range(opts.samples)]
    return labels, [f"sample {j}" for j in range(opts.samples)], [
        {"label": l} for l in labels], None
  if not model.has_projector:
    raise InferenceError(f"{model.origin}: this model has no Stage-2 projector (a "
                         "Stage-1 model), so it takes no prompts; use --samples=N")
  prompts = list(opts.prompts) or model_loader.canonical_prompts(model.bank)
  emb, how = embedder(prompts)
  labels = [f"prompt{j}" for j in range(len(prompts))]
  return labels, prompts, [{"label": l, "prompt": p, "embedding": h}
                           for l, p, h in zip(labels, prompts, how)], emb


def _predict_volume(opts: Options, predictor: Predictor, vol: image_io.Volume,
                    geometry: Plan, labels, titles, emb, strip) -> dict:
  """Predicts one input and writes its files; returns its manifest fields."""
  size = predictor.model.image_size
  hw = vol.slices.shape[1:3]
  resized = geometry.mode in ("resample", "crop_or_pad")
  x = image_io.to_model(vol.slices, size, geometry.mode) if resized else vol.slices
  keys = inference.image_keys(opts.seed, np.arange(len(x)))

  def predict(emb_PE):
    if emb_PE is None:
      out = predictor.samples(x, keys, opts.samples, geometry.layout, geometry.slices)
    else:
      out = predictor.prompts(x, keys, emb_PE, geometry.layout, geometry.slices)
    return image_io.from_model(out, hw, size, geometry.mode) if resized else out

  probs = predict(emb)  # (N, P, h, w)
  full = vol.to_input_layout(probs)
  files = [os.path.join(opts.out, f"{vol.stem}_probs.npy")]
  np.save(files[0], full.astype(np.float32))
  for j, label in enumerate(labels):
    files.append(image_io.write_mask(vol, full[j] > opts.threshold, opts.out, label))
  s = _pick_slice(probs, opts.threshold) if geometry.slices is None else geometry.slices[0]
  files.append(os.path.join(opts.out, f"{vol.stem}_overlay.png"))
  where = (None if vol.axis is None
           else f"slice {s} of {len(vol.slices)} (from 0) along axis {vol.axis}")
  image_io.write_overlay(vol.slices[s], probs[s], titles, files[-1], opts.threshold,
                         subtitle=where)
  out = {"files": files}
  if strip is not None:
    from prosona_jax import figures  # pylint: disable=g-import-not-at-top
    alphas, path_emb = strip
    probs = predict(path_emb)
    s = _pick_slice(probs, opts.threshold) if geometry.slices is None else geometry.slices[0]
    base = os.path.join(opts.out, f"{vol.stem}_interpolation")
    figures.interpolation_strip(vol.slices[s], probs[s], alphas, opts.interpolate[0],
                                opts.interpolate[1], base + ".png")
    np.save(base + ".npy", probs[s])
    files += [base + ".png", base + ".npy"]
    out["interpolation_slice"] = s
  return out


def check_options(opts: Options) -> None:
  """Refuses settings that cannot predict, before any model is loaded."""
  threshold = opts.threshold
  # Masks are `probs > threshold`: NaN (compares false) and 1 or more give empty masks,
  # a negative value full ones. 0 is kept: "any support at all".
  if not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
    raise InferenceError(f"--threshold={threshold}: expected a probability in [0, 1)")
  for flag, value, low in (("batch_size", opts.batch_size, 1), ("samples", opts.samples, 0),
                           ("interpolate_steps", opts.interpolate_steps, 2)):
    if value < low:
      raise InferenceError(f"--{flag}={value}: expected an integer >= {low}")
  check_out_dir(opts.out, "--out")


def check_out_dir(out: str, flag: str) -> None:
  """Refuses an output folder path that names an existing file."""
  if out and os.path.exists(out) and not os.path.isdir(out):
    raise InferenceError(f"{flag}={out}: an existing file, not a folder; name a folder "
                         "(it is created if missing)")


def run(opts: Options, report: Callable[[str], None] | None = None) -> dict:
  """Predicts every input and writes the outputs; returns the manifest.

  Args:
    opts: what to predict.
    report: called with one line per input saying how it reaches the model (the CLI
      prints them); None: silent.
  """
  check_options(opts)
  if bool(opts.model) == bool(opts.workdir):
    raise InferenceError("give exactly one of --model=EXPORT_DIR and --workdir=RUN_DIR")
  if opts.samples > 0 and opts.prompts:
    raise InferenceError("--samples draws Stage-1 hypotheses without prompts; give either "
                         "--samples or --prompt")
  if opts.interpolate and len(opts.interpolate) != 2:
    raise InferenceError(f"--interpolate takes exactly two prompts, got {len(opts.interpolate)}")
  if opts.roi and opts.resize not in ("auto", "sliding_window"):
    raise InferenceError(f"--roi predicts one model-sized region as it is; it does not "
                         f"combine with --resize={opts.resize}")
  run_config = None
  if opts.model:
    model = model_loader.load_export(opts.model)
  else:
    model, run_config = model_loader.load_workdir(
        opts.workdir, fold=opts.fold, config=opts.config, stage2_dir=opts.stage2_dir,
        cell=opts.cell)
  data = model.meta["data"]
  size = model.image_size
  folder_cfg = data.get("folder", {})
  norm = image_io.resolve_normalize(opts.normalize, data.get("format", ""),
                                    folder_cfg.get("normalize", "robust"))
  resize = resolve_resize(opts.resize, model.meta)
  vols = _read_volumes(opts, model, run_config)
  geometries = [plan(vol, size, resize, roi=opts.roi, overlap=opts.overlap,
                     sigma_scale=opts.sigma_scale) for vol in vols]
  stems = set()
  for i, vol in enumerate(vols):  # Two inputs named alike must not overwrite each other.
    if vol.stem in stems:
      vol.name = f"{vol.stem}_{i}"
    stems.add(vol.stem)
  embedder = model_loader.PromptEmbedder(model, opts.text_encoder)
  labels, titles, outputs, emb = _what_to_predict(opts, model, embedder)
  strip = None
  if opts.interpolate:
    ends, _ = embedder(list(opts.interpolate))
    alphas = np.linspace(0.0, 1.0, opts.interpolate_steps)
    strip = (alphas, ((1 - alphas[:, None]) * ends[0][None] + alphas[:, None] * ends[1][None]
                      ).astype(np.float32))
  os.makedirs(opts.out, exist_ok=True)
  predictor = Predictor(model, opts.batch_size)
  manifest = {"model": model.origin, "mode": "samples" if opts.samples > 0 else "prompts",
              "seed": opts.seed, "threshold": opts.threshold, "outputs": outputs,
              "inputs": []}
  for vol, geometry in zip(vols, geometries):
    if report is not None:
      report(geometry.message)
    applied = "none (dataset record)" if vol.kind == "key" else image_io.normalize(vol, norm)
    entry = {"input": vol.path, "kind": vol.kind, "shape": list(vol.shape),
             "normalize": applied, **geometry.record}
    entry.update(_predict_volume(opts, predictor, vol, geometry, labels, titles, emb, strip))
    manifest["inputs"].append(entry)
  with open(os.path.join(opts.out, "predictions.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest

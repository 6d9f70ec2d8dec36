"""Segments new images with a trained model: one mask per prompt, or Stage-1 samples.

The library behind `python -m prosona_jax.predict` (see its `--help`): `run(Options(...))`
predicts every input and writes the masks, probability maps, overlays and
`predictions.json`. A model is an export folder (run through its serialized functions
only) or a training run's checkpoints (`model_loader`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from typing import Sequence

import numpy as np

from prosona_jax import image_io
from prosona_jax import inference
from prosona_jax import model_loader
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
  text_encoder: str = ""


def _batched(fn, x: np.ndarray, keys: np.ndarray, batch: int, *args) -> list[np.ndarray]:
  """Runs `fn(x_chunk, keys_chunk, *args)` over chunks; a short last one is padded.

  At most two batch sizes per input shape are compiled; results do not depend on the
  chunking because every image draws from its own key.
  """
  n, outs = len(x), []
  size = n if n <= batch else batch
  for start in range(0, n, size):
    xb, kb = x[start:start + size], keys[start:start + size]
    pad = size - len(xb)
    if pad:
      xb = np.concatenate([xb, np.repeat(xb[:1], pad, 0)])
      kb = np.concatenate([kb, np.repeat(kb[:1], pad, 0)])
    out = fn(xb, kb, *args)
    outs.append(tuple(np.asarray(o)[:size - pad] for o in (out if isinstance(out, tuple)
                                                           else (out,))))
  return [np.concatenate(parts) for parts in zip(*outs)]


class Predictor:
  """Applies a `LoadedModel` to preprocessed slices (model size, normalised)."""

  def __init__(self, model: model_loader.LoadedModel, batch_size: int):
    self.model, self.batch = model, batch_size

  def prompts(self, x: np.ndarray, keys: np.ndarray, emb: np.ndarray) -> np.ndarray:
    if not self.model.has_projector:
      raise InferenceError(f"{self.model.origin}: this model has no Stage-2 projector "
                           "(a Stage-1 model), so it takes no prompts; use --samples=N")
    fn = self.model.fns["prompt_probs"]
    return _batched(lambda xb, kb: fn(xb, emb, kb), x, keys, self.batch)[0]

  def samples(self, x: np.ndarray, keys: np.ndarray, num: int) -> np.ndarray:
    prior, decode = self.model.fns["prior"], self.model.fns["decode"]

    def run(xb, kb):
      mu, log_sigma = prior(xb)
      z = inference.prior_samples(mu, log_sigma, kb, num)
      return 1.0 / (1.0 + np.exp(-np.asarray(decode(xb, z), np.float64)))

    return _batched(run, x, keys, self.batch)[0].astype(np.float32)


def _overlay(image_hwc: np.ndarray, probs_Phw: np.ndarray, titles: list[str], path: str,
             threshold: float, subtitle: str | None = None) -> None:
  # Importing figures selects matplotlib's Agg backend.
  from prosona_jax import figures  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cols = 1 + len(probs_Phw)
  fig, axes = plt.subplots(1, cols, figsize=(1.7 * cols, 2.0), squeeze=False)
  img = image_hwc.mean(-1)
  for j, ax in enumerate(axes[0]):
    ax.imshow(img, cmap="gray")
    ax.set_axis_off()
    if j:
      m = probs_Phw[j - 1] > threshold
      rgba = np.zeros(m.shape + (4,), np.float32)
      rgba[m] = (1.0, 0.2, 0.2, 0.45)
      ax.imshow(rgba)
      title = textwrap.fill(titles[j - 1], 20, max_lines=3, placeholder="...")
      ax.set_title(f"{title}\n{int(m.sum())} px", fontsize=6)
  if subtitle:  # Which image (and which slice of a volume) the panels show.
    axes[0, 0].set_title(textwrap.fill(subtitle, 24), fontsize=6)
  figures.save(fig, path, dpi=100)


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


def _predict_volume(opts: Options, predictor: Predictor, vol: image_io.Volume, size: int,
                    resize: str, labels, titles, emb, strip) -> dict:
  """Predicts one input and writes its files; returns its manifest fields."""
  hw = vol.slices.shape[1:3]
  x = vol.slices if vol.kind == "key" else image_io.to_model(vol.slices, size, resize)
  keys = inference.image_keys(opts.seed, np.arange(len(x)))
  probs = (predictor.samples(x, keys, opts.samples) if opts.samples > 0
           else predictor.prompts(x, keys, emb))
  probs = image_io.from_model(probs, hw, size, resize)  # (N, P, h, w)
  full = vol.to_input_layout(probs)
  files = [os.path.join(opts.out, f"{vol.stem}_probs.npy")]
  np.save(files[0], full.astype(np.float32))
  for j, label in enumerate(labels):
    files.append(image_io.write_mask(vol, full[j] > opts.threshold, opts.out, label))
  s = _pick_slice(probs, opts.threshold)
  files.append(os.path.join(opts.out, f"{vol.stem}_overlay.png"))
  where = (None if vol.axis is None
           else f"slice {s} of {len(vol.slices)} (from 0) along axis {vol.axis}")
  _overlay(vol.slices[s], probs[s], titles, files[-1], opts.threshold, subtitle=where)
  out = {"files": files}
  if strip is not None:
    from prosona_jax import figures  # pylint: disable=g-import-not-at-top
    alphas, path_emb = strip
    probs = image_io.from_model(predictor.prompts(x, keys, path_emb), hw, size, resize)
    s = _pick_slice(probs, opts.threshold)
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


def run(opts: Options) -> dict:
  """Predicts every input and writes the outputs; returns the manifest."""
  check_options(opts)
  if bool(opts.model) == bool(opts.workdir):
    raise InferenceError("give exactly one of --model=EXPORT_DIR and --workdir=RUN_DIR")
  if opts.samples > 0 and opts.prompts:
    raise InferenceError("--samples draws Stage-1 hypotheses without prompts; give either "
                         "--samples or --prompt")
  if opts.interpolate and len(opts.interpolate) != 2:
    raise InferenceError(f"--interpolate takes exactly two prompts, got {len(opts.interpolate)}")
  run_config = None
  if opts.model:
    model = model_loader.load_export(opts.model)
  else:
    model, run_config = model_loader.load_workdir(
        opts.workdir, fold=opts.fold, config=opts.config, stage2_dir=opts.stage2_dir,
        cell=opts.cell)
  data = model.meta["data"]
  size = int(data["image_size"])
  folder_cfg = data.get("folder", {})
  norm = image_io.resolve_normalize(opts.normalize, data.get("format", ""),
                                    folder_cfg.get("normalize", "robust"))
  resize = folder_cfg.get("resize", "crop_or_pad") if opts.resize == "auto" else opts.resize
  if resize not in image_io.RESIZE[1:]:
    raise InferenceError(f"--resize={opts.resize!r}: expected one of {image_io.RESIZE}")
  vols = _read_volumes(opts, model, run_config)
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
  for vol in vols:
    applied = "none (dataset record)" if vol.kind == "key" else image_io.normalize(vol, norm)
    entry = {"input": vol.path, "kind": vol.kind, "shape": list(vol.shape),
             "normalize": applied, "resize": resize}
    entry.update(_predict_volume(opts, predictor, vol, size, resize, labels, titles, emb,
                                 strip))
    manifest["inputs"].append(entry)
  with open(os.path.join(opts.out, "predictions.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest

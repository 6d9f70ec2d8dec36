"""The two ways `predict` gets a model: a training run, or an export folder.

Both give a `LoadedModel`: the export's metadata (config.json's schema), the prompt bank
and the inference functions (`inference.py`) with the weights already bound: the split
`encode`, `decode_prompts` (Stage 2), `decode_latents`, and `prompt_probs` (Stage 2),
`prior`, `decode`. An export of format version 1 has only the last three; it is still
read. An export folder is run only through its serialized functions: nothing here
builds the Flax model for it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import os
from typing import Any, Callable

import jax
from jax import export as jax_export
import numpy as np

from prosona_jax import inference
from prosona_jax.inference import InferenceError


@dataclasses.dataclass
class LoadedModel:
  """A model ready for inference (`fns` values take arrays, the weights bound)."""
  meta: dict
  bank: Any
  fns: collections.abc.MutableMapping[str, Callable]
  origin: str

  @property
  def has_projector(self) -> bool:
    return "prompt_probs" in self.fns

  @property
  def has_split(self) -> bool:
    """Whether the split functions (`encode`, `decode_*`) are there (not in version 1)."""
    return "encode" in self.fns

  @property
  def image_size(self) -> int:
    return int(self.meta["data"]["image_size"])


def _bind(fn: Callable, weights: dict) -> Callable:
  jitted = jax.jit(fn)
  return lambda *args: jitted(weights, *args)


class _ExportedFunctions(collections.abc.MutableMapping):
  """An export's functions, each deserialized (and bound to the weights) on first use.

  `predict` needs two of the six; deserializing StableHLO is a noticeable part of a
  short command's start-up. A missing file is reported at load, a bad one at first use.
  """

  def __init__(self, model_dir: str, meta: dict, weights: dict):
    self._dir, self._meta, self._weights = model_dir, meta, weights
    self._specs = dict(meta["functions"])
    self._loaded: dict[str, Callable] = {}
    self._cache: dict[str, jax_export.Exported] = {}
    for name, spec in self._specs.items():
      fpath = os.path.join(model_dir, spec["file"])
      if not os.path.isfile(fpath):
        raise InferenceError(f"{fpath}: missing (config.json lists the {name} function)")

  def __getitem__(self, name: str) -> Callable:
    if name not in self._loaded:
      if name not in self._specs:
        raise KeyError(name)
      self._loaded[name] = _bind(self._exported(name).call, self._weights)
    return self._loaded[name]

  def _exported(self, name: str) -> jax_export.Exported:
    if name in self._cache:
      return self._cache[name]
    fpath = os.path.join(self._dir, self._specs[name]["file"])
    try:
      with open(fpath, "rb") as f:
        exp = jax_export.deserialize(bytearray(f.read()))
    except Exception as e:
      raise InferenceError(f"{fpath}: cannot deserialize the {name} function ({e}); it "
                           f"was written with jax {self._meta.get('jax_version', '?')}, "
                           f"this is jax {jax.__version__}") from e
    platform = jax_export.default_export_platform()  # 'cuda', not 'gpu'.
    if platform not in exp.platforms:
      raise InferenceError(f"{fpath}: exported for {', '.join(exp.platforms)}, but JAX "
                           f"runs on {platform} here; re-export with --platforms={platform}")
    self._cache[name] = exp
    return exp

  def check_weights(self, wpath: str) -> None:
    """Refuses weights that do not fit the functions, reading only one of them.

    Every function takes the whole weights dict, so one signature tells; a folder whose
    params.safetensors belongs to another model fails here, in one line, not deep inside
    the first call. `encode` (else `prior`) is read: predict needs it anyway.
    """
    name = next((n for n in ("encode", "prior") if n in self._specs), next(iter(self._specs)))
    fpath = os.path.join(self._dir, self._specs[name]["file"])
    check_weights(self._weights, self._exported(name), wpath, fpath)

  def __setitem__(self, name: str, fn: Callable) -> None:
    self._specs.setdefault(name, None)
    self._loaded[name] = fn

  def __delitem__(self, name: str) -> None:
    del self._specs[name]
    self._loaded.pop(name, None)

  def __iter__(self):
    return iter(self._specs)

  def __len__(self) -> int:
    return len(self._specs)


def _read_meta(model_dir: str) -> dict:
  from prosona_jax import exporter  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "config.json")
  if not os.path.isdir(model_dir):
    raise InferenceError(f"{model_dir}: no such model folder")
  if not os.path.isfile(path):
    raise InferenceError(f"{path}: not found; {model_dir} is not a prosona_jax export "
                         "(write one with `python -m prosona_jax.export`)")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise InferenceError(f"{path}: not readable JSON ({e})") from e
  if not isinstance(meta, dict) or meta.get("format") != exporter.FORMAT:
    got = meta.get("format") if isinstance(meta, dict) else None
    raise InferenceError(f"{path}: field 'format' is {got!r}, expected {exporter.FORMAT!r}: "
                         "not a prosona_jax export")
  if meta.get("format_version") not in exporter.READABLE_VERSIONS:
    readable = " and ".join(str(v) for v in exporter.READABLE_VERSIONS)
    raise InferenceError(
        f"{path}: field 'format_version' is {meta.get('format_version')!r}, but this "
        f"prosona_jax reads versions {readable} (the folder was written by "
        f"prosona_jax {meta.get('prosona_jax_version', '?')}); re-export it with this "
        "version or use the matching prosona_jax.")
  for field in ("data", "model", "functions"):
    if field not in meta:
      raise InferenceError(f"{path}: field {field!r} is missing")
  return meta


def check_weights(weights: dict, exp: jax_export.Exported, wpath: str, fpath: str) -> None:
  """Refuses weights that are not the ones `exp` was exported with (names, shapes, dtypes).

  Otherwise a params.safetensors of another model fails deep inside the call.
  """
  (args, _) = jax.tree_util.tree_unflatten(exp.in_tree, exp.in_avals)
  expected = args[0]  # Every function takes the whole weights dict first.
  for name in sorted(set(expected) | set(weights)):
    want, got = expected.get(name), weights.get(name)
    if want is None or got is None or tuple(want.shape) != tuple(got.shape) \
        or want.dtype != got.dtype:
      describe = lambda a: "absent" if a is None else f"{a.dtype}{list(a.shape)}"
      raise InferenceError(
          f"{wpath}: tensor {name!r} is {describe(got)}, but {os.path.basename(fpath)} "
          f"expects {describe(want)}: these weights belong to another model (re-export "
          "the folder from its run)")


def load_export(model_dir: str) -> LoadedModel:
  """Loads an export folder through its serialized functions only."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from prosona_jax import prompt_bank  # pylint: disable=g-import-not-at-top

  meta = _read_meta(model_dir)
  wpath = os.path.join(model_dir, "params.safetensors")
  try:
    weights = jax.device_put(load_file(wpath))
  except Exception as e:  # Missing, truncated or not safetensors.
    raise InferenceError(f"{wpath}: cannot read the weights ({e})") from e
  fns = _ExportedFunctions(model_dir, meta, weights)
  fns.check_weights(wpath)
  bank = None
  if meta.get("prompt_bank"):
    bpath = os.path.join(model_dir, meta["prompt_bank"])
    if not os.path.isfile(bpath):
      raise InferenceError(f"{bpath}: missing (config.json field 'prompt_bank' names it)")
    bank = prompt_bank.PromptBank.load(bpath)
  return LoadedModel(meta=meta, bank=bank, fns=fns, origin=os.path.abspath(model_dir))


def load_workdir(workdir: str, *, fold: int | None = None, config=None,
                 stage2_dir: str | None = None, cell: int | None = None
                 ) -> tuple[LoadedModel, Any]:
  """Loads a training run's fold in-framework; returns the model and the run's config."""
  from prosona_jax import exporter  # pylint: disable=g-import-not-at-top
  run = inference.load_run(workdir, fold=fold, config=config, stage2_dir=stage2_dir,
                           cell=cell)
  has_projector = run.bank is not None
  meta = exporter.export_metadata(run.config, bank=run.bank, has_projector=has_projector,
                                source=run.source,
                                platforms=(jax_export.default_export_platform(),))
  weights = jax.device_put(run.weights)
  fns = inference.make_functions(run.config)
  if not has_projector:
    for name in inference.PROJECTOR_FUNCTIONS:
      del fns[name]
  fns = {name: _bind(fn, weights) for name, fn in fns.items()}
  return LoadedModel(meta=meta, bank=run.bank, fns=fns,
                     origin=os.path.abspath(workdir)), run.config


def canonical_prompts(bank) -> list[str]:
  """Each rater's first training phrasing, in rater order (the default prompts)."""
  return [bank.prompts[i] for i in bank.canonical_indices()]


class PromptEmbedder:
  """Bank phrasings from the cached embeddings; other text through the text encoder."""

  def __init__(self, model: LoadedModel, text_encoder: str = ""):
    self.model, self.choice = model, text_encoder
    self._encoder, self._error = None, None

  def _encoder_or_error(self, prompt: str):
    if self._encoder is None and self._error is None:
      text = self.model.meta.get("text", {})
      if self.choice == "none":
        self._error = "the text encoder is disabled (--text_encoder=none)"
      else:
        from prosona_jax.models import text_encoder as te  # pylint: disable=g-import-not-at-top
        kind, name = text.get("kind", "clip"), self.choice or text.get("model", "")
        try:
          self._encoder = te.load_text_encoder(kind, name,
                                               max_length=int(text.get("max_length", 32)))
        except (te.TextEncoderError, OSError, ValueError) as e:
          self._error = f"the text encoder {kind!r} ({name or 'default'}) is not available: {e}"
    if self._encoder is None:
      bank = self.model.bank
      import difflib  # pylint: disable=g-import-not-at-top
      close = difflib.get_close_matches(prompt, bank.prompts, n=3) if bank else []
      raise InferenceError(
          f"prompt {prompt!r} is not in the model's prompt bank (closest: {close}) and "
          f"{self._error}. Use a bank phrasing (--list_prompts shows them).")
    return self._encoder

  def __call__(self, prompts: list[str]) -> tuple[np.ndarray, list[str]]:
    """(P, E) embeddings and, per prompt, 'bank' or 'text encoder'."""
    bank = self.model.bank
    rows, how = [], []
    for p in prompts:
      if bank is not None and p in bank.prompts:
        rows.append(bank.lookup(p))
        how.append("bank")
        continue
      enc = self._encoder_or_error(p)
      e = enc.encode([p])[0]
      if bank is not None and e.shape[0] != bank.embeddings.shape[1]:
        raise InferenceError(f"the text encoder {enc.name!r} gives {e.shape[0]}-d "
                             f"embeddings, the model's bank has "
                             f"{bank.embeddings.shape[1]}-d ({bank.encoder_name!r})")
      rows.append(e)
      how.append("text encoder")
    return np.stack(rows).astype(np.float32), how

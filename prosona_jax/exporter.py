"""Writes a trained fold as a self-contained model folder (`python -m prosona_jax.export`).

The folder holds `params.safetensors` (every model tensor but the text encoder's),
`config.json` (what inference needs, with a format version), `prompt_bank.npz`
(phrasings with cached embeddings), a README.md, and the inference functions serialized
with `jax.export` (StableHLO, symbolic batch size), which run without this package's model
code: `python -m prosona_jax.predict --model=DIR` uses only them.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

import jax
from jax import export as jax_export
import jax.numpy as jnp
import ml_collections
import numpy as np

from prosona_jax import inference

FORMAT = "prosona_jax.export"
# Version 2 added the split functions `encode`, `decode_prompts` and `decode_latents`
# (whole-image inference runs the backbone once per tile, the rest per prompt). Version 1
# folders (`prompt_probs`, `prior`, `decode` only) are still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FUNCTION_FILES = {name: f"{name}.jaxexport" for name in (
    "encode", "decode_prompts", "decode_latents", "prompt_probs", "prior", "decode")}
DEFAULT_PLATFORMS = ("cpu", "cuda")


def signatures(meta: dict) -> dict[str, dict[str, Any]]:
  """Human-readable inputs and outputs of each function (written to config.json)."""
  s, c, d = meta["data"]["image_size"], meta["data"]["in_channels"], meta["model"]["latent_dim"]
  f, k = meta["model"]["feature_channels"], meta["num_prior_samples"]
  e = meta.get("embedding_dim")
  w = "weights: dict {name: float32 array}, the whole of params.safetensors"
  images = f"images: float32[b,{s},{s},{c}]"
  keys = "keys: uint32[b,2] (raw threefry key data, one key per image)"
  feats = f"features: float32[b,{s},{s},{f}]"
  sigs = {
      "encode": {"inputs": [w, images, keys],
                 "outputs": [feats, f"mu: float32[b,{d}]", f"log_sigma: float32[b,{d}]",
                             f"z: float32[b,{k},{d}] (prior samples)"]},
      "decode_latents": {"inputs": [w, feats, f"z: float32[b,n,{d}]"],
                         "outputs": [f"logits: float32[b,n,{s},{s}]"]},
      "prior": {"inputs": [w, images],
                "outputs": [f"mu: float32[b,{d}]", f"log_sigma: float32[b,{d}]"]},
      "decode": {"inputs": [w, images, f"z: float32[b,n,{d}]"],
                 "outputs": [f"logits: float32[b,n,{s},{s}]"]},
  }
  if meta.get("stage2"):
    sigs["decode_prompts"] = {
        "inputs": [w, feats, f"z: float32[b,k,{d}] (encode's prior samples)",
                   f"embeddings: float32[p,{e}]"],
        "outputs": [f"probs: float32[b,p,{s},{s}]"]}
    sigs["prompt_probs"] = {
        "inputs": [w, images, f"embeddings: float32[p,{e}]", keys],
        "outputs": [f"probs: float32[b,p,{s},{s}]"]}
  return {name: sigs[name] for name in FUNCTION_FILES if name in sigs}


def export_metadata(config: ml_collections.ConfigDict, *, bank=None,
                    has_projector: bool, source: dict | None = None,
                    platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
  """The content of an export's config.json."""
  from prosona_jax import __version__  # pylint: disable=g-import-not-at-top
  d = config.data
  meta = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "prosona_jax_version": __version__, "jax_version": jax.__version__,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "source": source or {},
      "model": config.model.to_dict(),
      "data": {"image_size": int(d.image_size), "in_channels": int(d.in_channels),
               "num_raters": int(d.num_raters), "rater_names": list(d.rater_names),
               "order_raters_by_area": bool(d.order_raters_by_area),
               "format": str(d.format),
               "folder": {k: d.folder[k] for k in ("axis", "resize", "normalize")
                          if k in d.folder}},
      "text": {k: config.text[k] for k in ("kind", "model", "max_length")},
      "stage2": None, "prompt_bank": None, "embedding_dim": None,
      "num_prior_samples": int(config.stage2.eval_num_samples),  # K of `encode`.
      "platforms": list(platforms),
  }
  if has_projector:
    s2 = config.stage2
    meta["stage2"] = {"eval_num_samples": int(s2.eval_num_samples),
                      "scale_scores": bool(s2.scale_scores),
                      "projector_hidden": int(s2.projector_hidden)}
  if bank is not None:
    meta["prompt_bank"] = "prompt_bank.npz"
    meta["embedding_dim"] = int(bank.embeddings.shape[1])
    meta["encoder_name"] = bank.encoder_name
  meta["functions"] = {name: {"file": FUNCTION_FILES[name], **sig}
                       for name, sig in signatures(meta).items()}
  return meta


def export_functions(config: ml_collections.ConfigDict, weights: dict[str, np.ndarray], *,
                     embedding_dim: int | None,
                     platforms: Sequence[str] = DEFAULT_PLATFORMS
                     ) -> dict[str, jax_export.Exported]:
  """Lowers the inference functions with symbolic sizes `b` (and `p`, `n`, `k`)."""
  fns = inference.make_functions(config)
  s, c = int(config.data.image_size), int(config.data.in_channels)
  d = int(config.model.latent_dim)
  w_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
  b, p, n, k = jax_export.symbolic_shape("b, p, n, k")
  images = jax.ShapeDtypeStruct((b, s, s, c), jnp.float32)
  keys = jax.ShapeDtypeStruct((b, 2), jnp.uint32)
  # The feature map's shape as the backbone gives it (channels and dtype).
  f1 = jax.eval_shape(fns["encode"], w_spec, jax.ShapeDtypeStruct((1, s, s, c), jnp.float32),
                      jax.ShapeDtypeStruct((1, 2), jnp.uint32))[0]
  feats = jax.ShapeDtypeStruct((b,) + f1.shape[1:], f1.dtype)
  specs = {"encode": (w_spec, images, keys),
           "decode_latents": (w_spec, feats, jax.ShapeDtypeStruct((b, n, d), jnp.float32)),
           "prior": (w_spec, images),
           "decode": (w_spec, images, jax.ShapeDtypeStruct((b, n, d), jnp.float32))}
  if embedding_dim is not None:
    emb = jax.ShapeDtypeStruct((p, embedding_dim), jnp.float32)
    specs["decode_prompts"] = (w_spec, feats, jax.ShapeDtypeStruct((b, k, d), jnp.float32),
                               emb)
    specs["prompt_probs"] = (w_spec, images, emb, keys)
  return {name: jax_export.export(jax.jit(fns[name]), platforms=tuple(platforms))(*spec)
          for name, spec in specs.items()}


def readme(meta: dict) -> str:
  """The README.md of an export folder."""
  lines = [
      "# ProSona model export", "",
      f"Format `{meta['format']}` version {meta['format_version']}, written by prosona_jax "
      f"{meta['prosona_jax_version']} with jax {meta['jax_version']} "
      f"({meta['created']}). Platforms: {', '.join(meta['platforms'])}.", "",
      "## Files",
      "- `params.safetensors`: every model tensor except the text encoder's, flat names "
      "joined by `/`: `params/...` and `batch_stats/...` (Stage 1: backbone, prior, "
      "posterior, Fcomb) and `projector/params/...` (Stage 2).",
      "- `config.json`: model and data settings, Stage-2 settings, the text encoder "
      "that embedded the bank, and the function signatures.",
  ]
  if meta.get("prompt_bank"):
    lines.append("- `prompt_bank.npz`: the prompt bank (`prompts`, `rater`, `heldout`) "
                 f"with its cached embeddings (`embeddings`, d={meta['embedding_dim']}, "
                 f"from `{meta.get('encoder_name', '')}`).")
  lines += ["- `*.jaxexport`: functions serialized with `jax.export` (StableHLO); `b`, "
            "`p`, `n` and `k` are symbolic sizes.", "", "## Functions"]
  for name, fn in meta["functions"].items():
    lines.append(f"- `{fn['file']}`: ({'; '.join(fn['inputs'])}) -> "
                 f"({'; '.join(fn['outputs'])})")
  s2 = meta.get("stage2")
  size = meta["data"]["image_size"]
  lines += [
      "", "Images are NHWC float32, intensity-normalised as at training (data format "
      f"`{meta['data']['format']}`; see `predict --help`), {size}x{size}.", "",
      "`encode` runs the image part once: the backbone's features, the prior's mu and "
      f"log-sigma, and K={meta['num_prior_samples']} prior samples "
      "`z = mu + exp(log_sigma) * eps`, `eps ~ N(0, 1)` drawn from the image's key "
      "(`jax.random.key_data(jax.random.key(seed))`, or any two uint32). "
      "`decode_latents` turns features and any latents into mask logits (apply a "
      "sigmoid for probabilities; prior samples are Stage-1 hypotheses).",
  ]
  if s2:
    lines.append(
        "`decode_prompts` weights encode's samples by the softmax of their scores against "
        "each projected prompt embedding and decodes the prompt latents: mask "
        "probabilities for every prompt, without running the backbone again. Bank prompts "
        "take their row of `prompt_bank.npz`'s `embeddings`; free text needs the text "
        f"encoder `{meta['text']['kind']}` / "
        f"`{meta['text']['model'] or 'its default weights'}`.")
  lines += [
      "", "`prompt_probs`, `prior` and `decode` are the same computations unsplit "
      "(`prompt_probs` = `decode_prompts` after `encode`), kept for users of format "
      "version 1.", "",
      "Images larger than the model go through it in tiles: `python -m "
      "prosona_jax.predict` runs overlapping tiles with Gaussian-weighted blending "
      "(MONAI's `sliding_window_inference` conventions), one region (`--roi`) or a "
      "rescaled image (`--resize=resample`).",
      "", "## Use", "```python",
      "import jax, numpy as np",
      "from safetensors.numpy import load_file",
      "weights = load_file('params.safetensors')",
      "def load(name):",
      "  with open(f'{name}.jaxexport', 'rb') as f:",
      "    return jax.export.deserialize(bytearray(f.read()))",
      "keys = np.stack([jax.random.key_data(jax.random.key(i)) for i in range(len(images))])",
      "features, mu, log_sigma, z = load('encode').call(weights, images, keys)",
  ]
  if s2:
    lines.append("probs = load('decode_prompts').call(weights, features, z, embeddings)")
  lines += [
      "logits = load('decode_latents').call(weights, features, z)",
      "```", "",
      "Or: `python -m prosona_jax.predict --model=THIS_FOLDER --input=scan.nii.gz "
      "--prompt=\"...\" --out=out/`.", ""]
  return "\n".join(lines)


def write_export(out_dir: str, config: ml_collections.ConfigDict,
                 weights: dict[str, np.ndarray], *, bank=None, source: dict | None = None,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
  """Writes an export folder; `bank` None means a Stage-1 model (no projector)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  has_projector = any(k.startswith("projector/") for k in weights)
  if has_projector and (bank is None or bank.embeddings is None):
    raise inference.InferenceError("Exporting a projector needs the embedded prompt bank.")
  weights = {k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()}
  meta = export_metadata(config, bank=bank if has_projector else None,
                         has_projector=has_projector, source=source, platforms=platforms)
  exported = export_functions(config, weights, embedding_dim=meta["embedding_dim"],
                              platforms=platforms)
  os.makedirs(out_dir, exist_ok=True)
  wpath = os.path.join(out_dir, "params.safetensors")
  save_file(weights, wpath, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
  os.chmod(wpath, 0o644)  # safetensors writes 0600; a model folder is meant to be shared.
  for name, exp in exported.items():
    with open(os.path.join(out_dir, FUNCTION_FILES[name]), "wb") as f:
      f.write(exp.serialize())
  if has_projector:
    bank.save(os.path.join(out_dir, "prompt_bank.npz"))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(meta, f, indent=1)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(readme(meta))
  return meta


def export_run(workdir: str, out_dir: str, *, fold: int | None = None,
               config: ml_collections.ConfigDict | None = None,
               stage2_dir: str | None = None, cell: int | None = None,
               platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
  """Exports one fold of a training run (Stage 1 only when it has no Stage 2)."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise inference.InferenceError(f"--out={out_dir}: an existing file, not a folder")
  run = inference.load_run(workdir, fold=fold, config=config, stage2_dir=stage2_dir,
                           cell=cell)
  return write_export(out_dir, run.config, run.weights, bank=run.bank, source=run.source,
                      platforms=platforms)

"""Inference functions of a trained model, shared by `export`, `predict` and `convert`.

Every function here takes the model's tensors as one flat dict `{name: array}`, the names
being `/`-joined paths: `params/...` and `batch_stats/...` (Stage 1), `projector/params/...`
(Stage 2). That dict is exactly what `params.safetensors` of an export holds, so the
serialized functions take the file's contents as they are.

The split functions: what depends on the image runs once, what depends on a prompt or a
latent runs per prompt or latent, on the features already computed:

- `encode(weights, images, keys)`: (b, H, W, C), (b, 2) uint32 -> (features (b, H, W, F),
  mu (b, D), log_sigma (b, D), z (b, K, D)): the backbone, the prior and its K =
  `stage2.eval_num_samples` samples; image i draws them from key i (raw threefry key
  data), so a result does not depend on what else is in the batch.
- `decode_prompts(weights, features, z, embeddings)`: z (b, k, D) prior samples,
  embeddings (p, E) -> (b, p, H, W) mask probabilities (projector, similarity-weighted
  prompt latent, Fcomb). Stage-2 models only.
- `decode_latents(weights, features, z)`: z (b, n, D) -> (b, n, H, W) mask logits (Fcomb).

And their compositions, kept for exports of format version 1 and their users:

- `prompt_probs(weights, images, embeddings, keys)` = `decode_prompts` after `encode`.
- `prior(weights, images)` -> (mu, log_sigma), each (b, D).
- `decode(weights, images, z)` = `decode_latents` on the image's features.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prosona_jax.errors import UserError

Weights = Mapping[str, Any]


class InferenceError(UserError, ValueError):
  """A model folder, run or input that cannot be used; the message names what and where."""


# ---------------------------------------------------------------- weight trees
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dicts of arrays -> {'a/b/c': array} (host float32 numpy)."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, name))
    else:
      out[name] = np.asarray(jax.device_get(value))
  return out


def unflatten(flat: Weights) -> dict[str, Any]:
  """{'a/b/c': array} -> nested dicts (the inverse of `flatten`)."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def model_weights(params: Any, batch_stats: Any, projector: Any | None = None
                  ) -> dict[str, np.ndarray]:
  """The flat weights dict of a Stage-1 model (+ the projector's variables, if any)."""
  tree = {"params": params}
  if batch_stats:
    tree["batch_stats"] = batch_stats
  if projector is not None:
    tree["projector"] = projector
  return flatten(tree)


def split_weights(weights: Weights) -> tuple[dict, dict | None]:
  """(Stage-1 variables {'params', 'batch_stats'}, projector variables or None)."""
  tree = unflatten(weights)
  # safetensors cannot hold an empty dict: the plain U-Net has no batch_stats entries.
  frozen = {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}
  return frozen, tree.get("projector")


# ---------------------------------------------------------------- functions
def prior_samples(mu_BD: jax.Array, log_sigma_BD: jax.Array, keys_B2: jax.Array,
                  num: int) -> jax.Array:
  """(B, num, D) reparameterised prior samples, image i's noise from its own key."""
  from prosona_jax.models import prompt as prompt_lib  # pylint: disable=g-import-not-at-top
  draw = lambda k: jax.random.normal(jax.random.wrap_key_data(k), (num, mu_BD.shape[-1]),
                                     mu_BD.dtype)
  return prompt_lib.prior_samples_BKD(mu_BD, log_sigma_BD, jax.vmap(draw)(keys_B2))


def make_functions(config: ml_collections.ConfigDict) -> dict[str, Callable]:
  """The pure inference functions of the model the config describes (module docstring)."""
  # Imported here: a loaded export runs without building the Flax model.
  from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top
  from prosona_jax.models import prompt as prompt_lib  # pylint: disable=g-import-not-at-top

  model = prob_unet.build_from_config(config)
  projector = prompt_lib.build_projector(config)
  num_samples = int(config.stage2.eval_num_samples)
  scale_scores = bool(config.stage2.scale_scores)

  def encode(weights, images, keys_B2):
    frozen, _ = split_weights(weights)
    feats = model.apply(frozen, images, False, method="features")
    mu, log_sigma = model.apply(frozen, images, method="prior_dist")
    return feats, mu, log_sigma, prior_samples(mu, log_sigma, keys_B2, num_samples)

  def decode_prompts(weights, feats, z_BKD, emb_PE):
    frozen, proj = split_weights(weights)
    if proj is None:
      raise InferenceError("decode_prompts needs the Stage-2 projector's weights "
                           "(projector/...), which this model does not have.")
    logits, _, _ = prompt_lib.prompt_logits(model, frozen, projector, proj,
                                            prompt_lib.Shared(feats, z_BKD), emb_PE,
                                            scale_scores=scale_scores)
    return jax.nn.sigmoid(logits)

  def decode_latents(weights, feats, z_BND):
    frozen, _ = split_weights(weights)
    return prompt_lib.decode_prompts(model, frozen, feats, z_BND)

  def prompt_probs(weights, images, emb_PE, keys_B2):
    feats, _, _, z_BKD = encode(weights, images, keys_B2)
    return decode_prompts(weights, feats, z_BKD, emb_PE)

  def prior(weights, images):
    frozen, _ = split_weights(weights)
    return model.apply(frozen, images, method="prior_dist")

  def decode(weights, images, z_BND):
    frozen, _ = split_weights(weights)
    feats = model.apply(frozen, images, False, method="features")
    return decode_latents(weights, feats, z_BND)

  return {"encode": encode, "decode_prompts": decode_prompts,
          "decode_latents": decode_latents, "prompt_probs": prompt_probs, "prior": prior,
          "decode": decode}


# Functions that need the Stage-2 projector (absent from a Stage-1 model).
PROJECTOR_FUNCTIONS = ("decode_prompts", "prompt_probs")


@jax.jit
def _fold_in_grid(keys_N2: jax.Array, indices_T: jax.Array) -> jax.Array:
  """(N, T, 2): `fold_in(key n, index t)`; one compiled program, not one per eager op."""
  def one(key_2, i):
    return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key_2), i))
  return jax.vmap(lambda k: jax.vmap(lambda i: one(k, i))(indices_T))(keys_N2)


def image_keys(seed: int, indices: np.ndarray) -> np.ndarray:
  """(n, 2) uint32 raw threefry keys: `fold_in(key(seed), index)` for each index."""
  base = jax.random.key_data(jax.random.key(int(seed)))
  return np.asarray(_fold_in_grid(base[None], jnp.asarray(indices, jnp.uint32))[0], np.uint32)


def tile_keys(image_keys_N2: np.ndarray, num_tiles: int) -> np.ndarray:
  """(N, T, 2) keys of the T tiles of each image: `fold_in(image key, t)`.

  A single tile draws from the image's own key, so an image of the model's size gets
  exactly the samples that `prompt_probs` draws for it.
  """
  keys = np.asarray(image_keys_N2, np.uint32)
  if num_tiles == 1:
    return keys[:, None]
  return np.asarray(_fold_in_grid(keys, jnp.arange(num_tiles, dtype=jnp.uint32)), np.uint32)


# ---------------------------------------------------------------- runs on disk
def load_config(workdir: str, override: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """The config a run saved (`WORKDIR/config.json`), or `override` when given."""
  if override is not None:
    return override
  from prosona_jax import config_lib  # pylint: disable=g-import-not-at-top
  from prosona_jax import layout  # pylint: disable=g-import-not-at-top
  path = layout.config_path(workdir)
  if not os.path.isdir(workdir):
    raise InferenceError(f"{workdir}: no such run directory")
  if not os.path.isfile(path):
    raise InferenceError(
        f"{path}: not found. Runs trained before the config was saved need "
        "--config=configs/NAME.py (with the same overrides as at training).")
  try:
    with open(path) as f:
      loaded = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise InferenceError(f"{path}: not readable JSON ({e})") from e
  if isinstance(loaded, dict):
    loaded.pop("data_info", None)  # What the run recorded about its data, not a setting.
  # Fields added since the run was made take their defaults.
  from prosona_jax import config_defaults  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(
      _with_defaults(config_lib.migrate(loaded), config_defaults.base_config().to_dict()))


def _with_defaults(loaded: dict, defaults: dict) -> dict:
  """`loaded` with every field of `defaults` it lacks (recursively)."""
  out = dict(loaded)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = _with_defaults(out[key], value)
  return out


@dataclasses.dataclass
class RunModel:
  """What a trained fold holds: its config, flat weights and prompt bank (None: Stage 1)."""
  config: ml_collections.ConfigDict
  weights: dict[str, np.ndarray]
  bank: Any
  source: dict


def _grid_cell(projector: dict, config, cell: int | None, where: str) -> tuple[dict, dict]:
  """One cell's projector from a grid checkpoint (leaves stacked over cells), or as is."""
  if np.ndim(projector["params"]["out"]["bias"]) == 1:
    return projector, {}
  from prosona_jax import config_lib  # pylint: disable=g-import-not-at-top
  cells = config_lib.grid_cells(config)
  n = int(np.shape(projector["params"]["out"]["bias"])[0])
  listing = ", ".join(f"{i}: alpha={a:g} beta={b:g}" for i, (a, b) in enumerate(cells[:n]))
  if cell is None or not 0 <= cell < n:
    raise InferenceError(f"{where}: a grid checkpoint of {n} cells; choose one with "
                         f"--cell=INDEX ({listing})")
  info = {"cell": int(cell)}
  if len(cells) == n:
    info.update(alpha=cells[cell][0], beta=cells[cell][1])
  return jax.tree.map(lambda x: np.asarray(x)[cell], projector), info


def load_run(workdir: str, *, fold: int | None = None,
             config: ml_collections.ConfigDict | None = None,
             stage2_dir: str | None = None, cell: int | None = None,
             require_stage2: bool = False) -> RunModel:
  """Reads one fold of a training run: Stage-1 state, projector and cached prompt bank.

  Args:
    workdir: the run's work directory.
    fold: which fold's checkpoints; default the config's `data.fold` (0 when it is -1).
    config: overrides `WORKDIR/config.json`.
    stage2_dir: a Stage-2 directory (`checkpoints/` + `prompt_bank.npz`): default
      `WORKDIR/fold<k>/stage2`; the grid's `WORKDIR/fold<k>/grid` needs `cell`. (A grid
      cell run as its own job is a work directory of its own.)
    cell: which cell of a grid checkpoint (index in `grid_alpha` x `grid_beta` order).
    require_stage2: raise when there is no Stage-2 checkpoint (else Stage 1 only).
  """
  from prosona_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from prosona_jax import layout  # pylint: disable=g-import-not-at-top
  from prosona_jax import prompt_bank  # pylint: disable=g-import-not-at-top
  from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top

  config = load_config(workdir, config)
  if fold is None:
    fold = max(int(config.data.fold), 0)
  s1_dir = layout.stage2_init_dir(config, workdir, fold)
  if checkpointing.latest_step_dir(s1_dir) is None:
    raise InferenceError(f"{s1_dir}: no Stage-1 checkpoint (is {workdir} a trained run? "
                         "--fold picks another fold)")
  abstract = jax.eval_shape(lambda r: prob_unet.init_from_config(config, r),
                            jax.random.key(0))
  fields = ("params", "batch_stats") if abstract["batch_stats"] else ("params",)
  frozen, _ = checkpointing.load_params(s1_dir, abstract, fields=fields)
  frozen = jax.device_get(frozen)
  projector, bank = None, None
  s2_dir = stage2_dir or layout.stage_dir(workdir, fold, "stage2")
  ckpt_dir = os.path.join(s2_dir, "checkpoints")
  if os.path.isdir(ckpt_dir):
    if checkpointing.step_dirs(ckpt_dir):
      # Shapes from the checkpoint: only the params matter, whatever optimizer made them.
      # Verified, falling back to an older step when the newest is damaged.
      restored, _ = checkpointing.load_params(ckpt_dir, None, fields=("params",))
      projector = jax.device_get(restored["params"])
    if projector is not None:
      projector, cell_info = _grid_cell(projector, config, cell, ckpt_dir)
    bank_path = os.path.join(s2_dir, "prompt_bank.npz")
    if projector is not None:
      if not os.path.isfile(bank_path):
        raise InferenceError(f"{bank_path}: missing; the Stage-2 run writes it beside "
                             "its checkpoints.")
      bank = prompt_bank.PromptBank.load(bank_path)
  if projector is None and require_stage2:
    raise InferenceError(f"{ckpt_dir}: no Stage-2 checkpoint; train Stage 2 or pass "
                         "--stage2_dir=DIR.")
  return RunModel(config=config,
                  weights=model_weights(frozen["params"], frozen.get("batch_stats", {}),
                                        projector),
                  bank=bank,
                  source={"workdir": os.path.abspath(workdir), "fold": int(fold),
                          "stage1_checkpoints": os.path.abspath(s1_dir),
                          "stage2_dir": os.path.abspath(s2_dir) if projector else None,
                          **(cell_info if projector is not None else {})})

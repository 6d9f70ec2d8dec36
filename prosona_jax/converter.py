r"""Imports PyTorch weights: D-Persona Stage-1 checkpoints and torchvision ResNet-34.

  python -m prosona_jax.convert --checkpoint=DPersona1_LIDC_0_best.pth \
      --config=configs/lidc.py --out=models/dpersona_fold0
  python -m prosona_jax.convert --checkpoint=resnet34-b627a593.pth --out=resnet34.safetensors

A D-Persona checkpoint (`torch.save({'model': net.state_dict()})`, smp 0.3.3) becomes an
export folder like `prosona_jax.export` writes, with the Stage-1 functions only (`prior`,
`decode`: `predict --samples=N` works; D-Persona's per-rater heads are not ProSona's
projector and are skipped). Its tensor names:
- backbone `unet.seg_encoder.*` (torchvision ResNet-34 names) and
  `unet.seg_decoder.blocks.<i>.conv<k>.{0: conv, 1: BatchNorm}.*` (smp's U-Net), or with
  `original_backbone=True` the Probabilistic U-Net's `unet.contracting_path.<i>.layers.<j>`
  and `unet.upsampling_path.<i>.conv_block.layers.<j>`;
- `prior.` / `posterior.` + `encoder.layers.<j>` (3x3 convs between ReLUs and pools) and
  `conv_layer` (1x1 conv to mean and log-sigma);
- `fcomb.layers.<j>` (1x1 convs) and `fcomb.last_layer`.
The architecture (filters, latent size, posterior input, in_channels) is read from the
tensors; the config supplies the rest (image size, raters, normalisation). torch is needed
only to read `.pth` files; `.safetensors` and `.npz` state dicts convert without it.
A torchvision ResNet-34 state dict becomes a `.safetensors` for
`config.model.pretrained_encoder` (see `models/pretrained.py`).
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Mapping

from flax import traverse_util
import jax
import ml_collections
import numpy as np

from prosona_jax import inference
from prosona_jax.inference import InferenceError
from prosona_jax.models import pretrained

State = Mapping[str, np.ndarray]


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """A state dict as numpy from `.pth`/`.pt` (torch), `.safetensors` or `.npz`.

  Raises:
    InferenceError: A missing file, or one that is not a readable state dict of
      that kind (truncated, garbage, object arrays), naming the file.
  """
  if not os.path.isfile(path):
    raise InferenceError(f"{path}: no such checkpoint file")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      state = dict(load_file(path))
    except Exception as e:  # safetensors raises its own error type for bad headers.
      raise InferenceError(f"{path}: not a readable .safetensors file "
                           f"({_one_line(e)})") from e
  elif path.endswith(".npz"):
    from prosona_jax.data.npz import check_npz_members  # pylint: disable=g-import-not-at-top
    from prosona_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
    try:
      check_npz_members(path)  # Object arrays and lying headers, before allocating.
      with np.load(path, allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    except DataError as e:
      raise InferenceError(str(e)) from e
    except Exception as e:  # Corrupt members: zlib, zipfile and numpy errors.
      raise InferenceError(f"{path}: not a readable .npz state dict ({_one_line(e)})") from e
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise InferenceError(f"{path}: reading PyTorch checkpoints needs torch (pip install "
                           "torch); or save the state dict as .safetensors") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise InferenceError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    for wrapper in ("model", "state_dict", "net"):  # D-Persona saves {'model': ...}.
      if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
    if not isinstance(obj, dict):
      raise InferenceError(f"{path}: holds a {type(obj).__name__}; expected a state dict "
                           "(name -> tensor)")
    state = {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}
  # nn.DataParallel prefixes every name with `module.`.
  return {k.removeprefix("module."): np.asarray(v) for k, v in state.items()}


def _one_line(error: Exception, limit: int = 300) -> str:
  """An error's message on one line (library errors can span many), cut at `limit`."""
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit] + "..."


def _conv_indices(state: State, prefix: str) -> list[int]:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.weight$")
  return sorted(int(m.group(1)) for k in state if (m := pat.match(k)) and state[k].ndim == 4)


def _need(state: State, name: str, source: str) -> np.ndarray:
  if name not in state:
    raise InferenceError(f"{source}: tensor {name!r} is missing (not a D-Persona Stage-1 "
                         "checkpoint of the expected architecture?)")
  return np.asarray(state[name], np.float32)


def _levels(indices: list[int], prefix: str, source: str) -> list[list[int]]:
  """Groups the conv indices of a `Sequential` into levels.

  Within a level convs are 2 apart (Conv2d, ReLU); a pool between levels makes it 3.
  """
  if not indices:
    raise InferenceError(f"{source}: no tensors {prefix}<j>.weight")
  levels = [[indices[0]]]
  for prev, i in zip(indices, indices[1:]):
    if i - prev != 2:
      levels.append([])
    levels[-1].append(i)
  return levels


def infer_config(state: State, config: ml_collections.ConfigDict, source: str = "checkpoint"
                 ) -> ml_collections.ConfigDict:
  """The config with its model fields (and in_channels) set from the tensors."""
  config = copy.deepcopy(config)
  m, d = config.model, config.data
  if "unet.seg_encoder.conv1.weight" in state:
    m.backbone = "resnet34"
  elif "unet.contracting_path.0.layers.0.weight" in state:
    m.backbone = "unet"
    m.unet_filters = tuple(int(_need(state, f"unet.contracting_path.{i}.layers."
                                     f"{0 if i == 0 else 1}.weight", source).shape[0])
                           for i in range(_count(state, "unet.contracting_path.")))
  else:
    prefixes = sorted({k.split(".")[0] for k in state})
    raise InferenceError(f"{source}: no D-Persona backbone (unet.seg_encoder.* or "
                         f"unet.contracting_path.*); top-level names: {prefixes[:10]}")
  levels = _levels(_conv_indices(state, "prior.encoder.layers."), "prior.encoder.layers.",
                   source)
  m.convs_per_block = len(levels[0])
  m.gaussian_filters = tuple(int(state[f"prior.encoder.layers.{lv[0]}.weight"].shape[0])
                             for lv in levels)
  d.in_channels = int(state["prior.encoder.layers.0.weight"].shape[1])
  m.latent_dim = int(_need(state, "prior.conv_layer.weight", source).shape[0]) // 2
  fcomb = _conv_indices(state, "fcomb.layers.")
  m.fcomb_layers = len(fcomb)
  m.feature_channels = int(_need(state, "fcomb.layers.0.weight", source).shape[1]) - m.latent_dim
  extra = int(_need(state, "posterior.encoder.layers.0.weight", source).shape[1]) - d.in_channels
  if extra == 1:
    m.posterior_input = "one_random"
  elif extra == d.num_raters:
    m.posterior_input = "all"
  else:
    raise InferenceError(f"{source}: the posterior takes {extra} mask channels; the "
                         f"config has data.num_raters={d.num_raters} (expected 1 or that)")
  m.pretrained_encoder = ""
  return config


def _count(state: State, prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  return len({int(m.group(1)) for k in state if (m := pat.match(k))})


def _conv(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO.


def _dense(w: np.ndarray) -> np.ndarray:
  return w.reshape(w.shape[0], w.shape[1]).T  # A 1x1 conv (O, I, 1, 1) -> (I, O).


def _name_map(config: ml_collections.ConfigDict) -> list[tuple[str, str, Any]]:
  """(flax flat name, torch name, transform) for every tensor outside the ResNet encoder."""
  m, pairs = config.model, []
  for net in ("prior", "posterior"):
    idx = 0
    for i in range(len(m.gaussian_filters)):
      idx += i > 0  # The AvgPool2d of each level after the first.
      for k in range(m.convs_per_block):
        ours, theirs = f"params/{net}/level{i}_conv{k}", f"{net}.encoder.layers.{idx}"
        pairs.append((f"{ours}/kernel", f"{theirs}.weight", _conv))
        pairs.append((f"{ours}/bias", f"{theirs}.bias", None))
        idx += 2  # Conv2d, ReLU.
    pairs.append((f"params/{net}/mu_log_sigma/kernel", f"{net}.conv_layer.weight", _dense))
    pairs.append((f"params/{net}/mu_log_sigma/bias", f"{net}.conv_layer.bias", None))
  for i in range(m.fcomb_layers):
    pairs.append((f"params/fcomb/hidden_{i}/kernel", f"fcomb.layers.{2 * i}.weight", _dense))
    pairs.append((f"params/fcomb/hidden_{i}/bias", f"fcomb.layers.{2 * i}.bias", None))
  pairs.append(("params/fcomb/last/kernel", "fcomb.last_layer.weight", _dense))
  pairs.append(("params/fcomb/last/bias", "fcomb.last_layer.bias", None))
  if m.backbone == "resnet34":
    for i in range(5):
      for k in (1, 2):
        ours, theirs = f"backbone/decoder/block{i}", f"unet.seg_decoder.blocks.{i}.conv{k}"
        pairs.append((f"params/{ours}/conv{k}/kernel", f"{theirs}.0.weight", _conv))
        for a, b, col in (("scale", "weight", "params"), ("bias", "bias", "params"),
                          ("mean", "running_mean", "batch_stats"),
                          ("var", "running_var", "batch_stats")):
          pairs.append((f"{col}/{ours}/bn{k}/{a}", f"{theirs}.1.{b}", None))
  else:
    n = len(m.unet_filters)
    for i in range(n):
      base = 0 if i == 0 else 1  # Levels after the first start with a pool.
      for k in range(m.convs_per_block):
        t = f"unet.contracting_path.{i}.layers.{base + 2 * k}"
        pairs.append((f"params/backbone/down{i}_conv{k}/kernel", f"{t}.weight", _conv))
        pairs.append((f"params/backbone/down{i}_conv{k}/bias", f"{t}.bias", None))
    for j, i in enumerate(range(n - 2, -1, -1)):
      for k in range(m.convs_per_block):
        t = f"unet.upsampling_path.{j}.conv_block.layers.{2 * k}"
        pairs.append((f"params/backbone/up{i}_conv{k}/kernel", f"{t}.weight", _conv))
        pairs.append((f"params/backbone/up{i}_conv{k}/bias", f"{t}.bias", None))
  return pairs


def convert_state_dict(state: State, config: ml_collections.ConfigDict, *,
                       source: str = "checkpoint"
                       ) -> tuple[ml_collections.ConfigDict, dict[str, np.ndarray], list[str]]:
  """Maps a D-Persona Stage-1 state dict onto this package's model.

  Returns:
    (config with the checkpoint's architecture, flat weights as `inference.model_weights`
    names them, names of tensors not used: D-Persona's heads, BatchNorm counters).

  Raises:
    InferenceError: naming the tensor that is missing or has the wrong shape.
  """
  from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top
  config = infer_config(state, config, source)
  shapes = jax.eval_shape(lambda r: prob_unet.init_from_config(config, r), jax.random.key(0))
  # Leaves stay jax.ShapeDtypeStruct: shapes and float32 dtypes, no memory.
  target_shapes = traverse_util.flatten_dict(dict(shapes), sep="/")
  out, used = {}, set()
  if config.model.backbone == "resnet34":
    enc = {k[len("unet.seg_encoder."):]: v for k, v in state.items()
           if k.startswith("unet.seg_encoder.")}
    tree = inference.unflatten(target_shapes)
    enc_p, enc_s = pretrained.load_encoder_weights(
        enc, tree["params"]["backbone"]["encoder"], tree["batch_stats"]["backbone"]["encoder"],
        source=f"{source} (unet.seg_encoder.*)")
    out.update(inference.flatten({"params": {"backbone": {"encoder": enc_p}},
                                  "batch_stats": {"backbone": {"encoder": enc_s}}}))
    used.update(f"unet.seg_encoder.{k}" for k in enc if not k.startswith("fc."))
  for ours, theirs, fn in _name_map(config):
    value = _need(state, theirs, source)
    value = fn(value) if fn else value
    if ours not in target_shapes or value.shape != target_shapes[ours].shape:
      want = target_shapes[ours].shape if ours in target_shapes else "no such parameter"
      raise InferenceError(f"{source}: tensor {theirs!r} has shape "
                           f"{tuple(state[theirs].shape)} ({value.shape} converted); the "
                           f"model's {ours} expects {want}")
    out[ours] = value
    used.add(theirs)
  missing = sorted(set(target_shapes) - set(out))
  if missing:
    raise InferenceError(f"{source}: no tensor for {missing[:5]} ({len(missing)} in all)")
  unused = sorted(k for k in state if k not in used)
  return config, {k: np.asarray(out[k], np.float32) for k in target_shapes}, unused


def is_torchvision_resnet(state: State) -> bool:
  return "layer1.0.conv1.weight" in state and "conv1.weight" in state


def convert(checkpoint: str, out: str, config: ml_collections.ConfigDict | None = None,
            platforms=None) -> dict:
  """Converts a checkpoint file (see the module docstring); returns a summary."""
  from prosona_jax import exporter  # pylint: disable=g-import-not-at-top
  state = read_checkpoint(checkpoint)
  if is_torchvision_resnet(state):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()
               if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out)
    return {"kind": "torchvision_resnet", "tensors": len(tensors), "out": out}
  if config is None:
    raise InferenceError("--config is required to convert a D-Persona checkpoint (it gives "
                         "the image size, raters and normalisation)")
  config, weights, unused = convert_state_dict(state, config, source=checkpoint)
  exporter.write_export(out, config, weights, source={
      "converted_from": os.path.abspath(checkpoint), "unused_tensors": unused},
                      platforms=platforms or exporter.DEFAULT_PLATFORMS)
  return {"kind": "dpersona", "tensors": len(weights), "unused": unused, "out": out}

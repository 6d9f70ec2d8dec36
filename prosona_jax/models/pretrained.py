"""ImageNet ResNet-34 weights for the backbone's encoder, read from a local file.

D-Persona starts its encoder from torchvision's ImageNet ResNet-34 (through smp). This
module maps a torchvision state dict (`conv1.weight`, `bn1.running_mean`,
`layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`, ...) onto `ResNet34Encoder`'s
params and batch_stats. `.safetensors` files are read with numpy; `.pth` files need
torch, imported only then. Nothing is downloaded: pass a file.
"""

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from prosona_jax.models import backbone as backbone_lib
from prosona_jax.errors import UserError


class PretrainedWeightsError(UserError, ValueError):
  """A weights file lacks a tensor, or a tensor has the wrong shape."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torchvision-style state dict from `.safetensors` or `.pth`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Pretrained encoder weights not found: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  if path.endswith((".pth", ".pt")):
    try:
      import torch  # Optional: only `.pth` files need it.
    except ImportError as e:
      raise ImportError(f"Reading {path} needs torch; convert it to .safetensors "
                        "or install torch.") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:
      state = state["state_dict"]
    return {k: v.detach().float().numpy() for k, v in state.items()
            if hasattr(v, "detach")}
  raise ValueError(f"Unsupported weights file {path}: expected .safetensors or .pth.")


def adapt_first_conv(weight_OIHW: np.ndarray, in_channels: int) -> np.ndarray:
  """Adapts conv1's RGB kernels to `in_channels` the way smp does.

  One channel: the RGB kernels summed (a grey image then gives the response of the
  equivalent grey RGB image). Other counts: RGB kernels cycled over the channels and
  scaled by 3 / in_channels.
  """
  if in_channels == weight_OIHW.shape[1]:
    return weight_OIHW
  if in_channels == 1:
    return weight_OIHW.sum(axis=1, keepdims=True)
  idx = np.arange(in_channels) % weight_OIHW.shape[1]
  return weight_OIHW[:, idx] * (weight_OIHW.shape[1] / in_channels)


def _torch_name_pairs() -> list[tuple[tuple[str, ...], str, str]]:
  """(flax module path, torch prefix, kind) for every conv and BN of the encoder."""
  pairs = [(("conv1",), "conv1", "conv"), (("bn1",), "bn1", "bn")]
  for i, blocks in enumerate(backbone_lib.RESNET34_LAYERS):
    for j in range(blocks):
      block, prefix = f"layer{i + 1}_{j}", f"layer{i + 1}.{j}"
      for k in (1, 2):
        pairs.append(((block, f"conv{k}"), f"{prefix}.conv{k}", "conv"))
        pairs.append(((block, f"bn{k}"), f"{prefix}.bn{k}", "bn"))
      if i > 0 and j == 0:
        pairs.append(((block, "downsample_conv"), f"{prefix}.downsample.0", "conv"))
        pairs.append(((block, "downsample_bn"), f"{prefix}.downsample.1", "bn"))
  return pairs


def _get(state: Mapping[str, np.ndarray], name: str, path: str) -> np.ndarray:
  if name not in state:
    raise PretrainedWeightsError(f"{path}: tensor {name!r} is missing.")
  return np.asarray(state[name], np.float32)


def _check(value: np.ndarray, expected: Any, name: str, path: str) -> np.ndarray:
  if tuple(value.shape) != tuple(expected.shape):
    raise PretrainedWeightsError(
        f"{path}: tensor {name!r} has shape {tuple(value.shape)} after conversion, "
        f"the encoder expects {tuple(expected.shape)}.")
  return jnp.asarray(value, getattr(expected, "dtype", jnp.float32))


def load_encoder_weights(state: Mapping[str, np.ndarray], enc_params: Mapping[str, Any],
                         enc_stats: Mapping[str, Any], *,
                         source: str = "<state dict>") -> tuple[dict, dict]:
  """Returns (params, batch_stats) of `ResNet34Encoder` filled from `state`.

  Args:
    state: torchvision ResNet-34 state dict as numpy arrays (fc.* and
      num_batches_tracked are ignored).
    enc_params: the encoder's current params (give the shapes, incl. input channels).
    enc_stats: the encoder's current batch_stats.
    source: file name used in error messages.

  Raises:
    PretrainedWeightsError: naming the tensor that is missing or mismatched.
  """
  params = {k: dict(v) for k, v in enc_params.items()}
  stats = {k: dict(v) for k, v in enc_stats.items()}
  for flax_path, prefix, kind in _torch_name_pairs():
    p_node, s_node = params, stats
    for part in flax_path[:-1]:  # Copy the path down so the caller's trees stay intact.
      p_node[part] = dict(p_node[part])
      s_node[part] = dict(s_node[part])
      p_node, s_node = p_node[part], s_node[part]
    leaf = flax_path[-1]
    if kind == "conv":
      name = f"{prefix}.weight"
      w = _get(state, name, source)
      if w.ndim != 4:
        raise PretrainedWeightsError(f"{source}: tensor {name!r} has shape {w.shape}, "
                                     "expected a 4-D OIHW conv kernel.")
      if prefix == "conv1":
        w = adapt_first_conv(w, p_node[leaf]["kernel"].shape[2])
      kernel = np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO.
      p_node[leaf] = {"kernel": _check(kernel, p_node[leaf]["kernel"], name, source)}
    else:
      bn_p, bn_s = dict(p_node[leaf]), dict(s_node[leaf])
      for ours, theirs, node in (("scale", "weight", bn_p), ("bias", "bias", bn_p),
                                 ("mean", "running_mean", bn_s),
                                 ("var", "running_var", bn_s)):
        name = f"{prefix}.{theirs}"
        node[ours] = _check(_get(state, name, source), node[ours], name, source)
      p_node[leaf], s_node[leaf] = bn_p, bn_s
  return params, stats


def load_resnet34_encoder(path: str, params: Mapping[str, Any],
                          batch_stats: Mapping[str, Any], *,
                          in_channels: int | None = None) -> tuple[dict, dict]:
  """Fills `ProbUNet` params/batch_stats' `backbone/encoder` from a weights file.

  Args:
    path: `.safetensors` (or `.pth`, with torch) torchvision ResNet-34 weights.
    params: ProbUNet params with a ResNet-34 backbone (host or device arrays).
    batch_stats: ProbUNet batch_stats.
    in_channels: image channels C, checked against the model's first conv if given.

  Returns:
    New (params, batch_stats); every other part is unchanged.
  """
  if "encoder" not in params.get("backbone", {}):
    raise ValueError("Pretrained weights apply to the resnet34 backbone only.")
  model_channels = params["backbone"]["encoder"]["conv1"]["kernel"].shape[2]
  if in_channels is not None and in_channels != model_channels:
    raise ValueError(f"in_channels={in_channels} but the model's first conv takes "
                     f"{model_channels} channels.")
  enc_p, enc_s = load_encoder_weights(
      read_state_dict(path), params["backbone"]["encoder"],
      batch_stats["backbone"]["encoder"], source=path)
  new_params, new_stats = dict(params), dict(batch_stats)
  new_params["backbone"] = {**params["backbone"], "encoder": enc_p}
  new_stats["backbone"] = {**batch_stats["backbone"], "encoder": enc_s}
  return new_params, new_stats

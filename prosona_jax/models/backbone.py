"""Backbones that turn an image into a full-resolution feature map (NHWC).

Two options, chosen by `config.model.backbone`:
- `ResNetUNet`: D-Persona's backbone, the `segmentation_models_pytorch` U-Net with a
  ResNet-34 encoder and decoder channels (256, 128, 64, 32, 16), without its head.
- `PlainUNet`: the Probabilistic U-Net's own U-Net (no normalisation).

Padding is explicit wherever PyTorch pads symmetrically, so that torchvision ImageNet
weights (see `pretrained.py`) compute exactly what they compute in PyTorch; Flax's
'SAME' would pad strided convolutions asymmetrically.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torchvision initialises ResNet convs with kaiming_normal_(mode="fan_out") and smp
# initialises its decoder with kaiming_uniform_(mode="fan_in"); both use the ReLU gain.
_ENCODER_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_DECODER_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
# The Probabilistic U-Net port: kaiming_normal_(fan_in) weights, biases from a normal
# truncated at two standard deviations and then scaled (std 0.001, not renormalised).
KAIMING_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
RESNET34_LAYERS = (3, 4, 6, 3)
RESNET34_WIDTHS = (64, 128, 256, 512)
DECODER_CHANNELS = (256, 128, 64, 32, 16)


def tiny_truncated_normal(stddev: float = 1e-3):
  """Normal truncated to [-2, 2] then scaled by `stddev`, as the PyTorch port does."""

  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

  return init


def batch_norm(train: bool, name: str, dtype: Any) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5).

  Flax keeps the biased batch variance in its running average where PyTorch keeps the
  unbiased one; with >= 128 values per channel the difference is below 1%.
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


def avg_pool_ceil(x_BHWC: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2, PyTorch's `ceil_mode=True`.

  An odd edge gets a window of its own that averages only the pixels that exist, which
  is what PyTorch does with padding 0 in ceil mode.
  """
  pad_h, pad_w = x_BHWC.shape[1] % 2, x_BHWC.shape[2] % 2
  return nn.avg_pool(
      x_BHWC, (2, 2), strides=(2, 2), padding=((0, pad_h), (0, pad_w)),
      count_include_pad=False)


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) linear-interpolation weights with `align_corners=True`."""
  m = np.zeros((n_out, n_in), np.float32)
  if n_in == 1:
    m[:, 0] = 1.0
    return m
  pos = np.arange(n_out) * (n_in - 1) / max(n_out - 1, 1)
  lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
  frac = pos - lo
  m[np.arange(n_out), lo] = 1.0 - frac
  m[np.arange(n_out), lo + 1] = frac
  return m


def upsample_bilinear_align_corners(x_BHWC: jax.Array) -> jax.Array:
  """2x bilinear upsampling with `align_corners=True` (PyTorch's `interpolate`).

  `jax.image.resize` uses half-pixel centres (align_corners=False), which moves every
  pixel of the Probabilistic U-Net's upsampled map, hence the explicit matrices.
  """
  _, h, w, _ = x_BHWC.shape
  mh = jnp.asarray(_align_corners_matrix(h, 2 * h), x_BHWC.dtype)
  mw = jnp.asarray(_align_corners_matrix(w, 2 * w), x_BHWC.dtype)
  x = jnp.einsum("ph,bhwc->bpwc", mh, x_BHWC)
  return jnp.einsum("qw,bpwc->bpqc", mw, x)


def _stem_pool(x_BHWC: jax.Array) -> jax.Array:
  return jax.lax.reduce_window(x_BHWC, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


@jax.custom_vjp
def max_pool_3x3_s2(x_BHWC: jax.Array) -> jax.Array:
  """ResNet's stem pooling: 3x3 max, stride 2, padding 1 (`nn.max_pool`'s values).

  The gradient is `nn.max_pool`'s, computed differently. XLA's CPU backend turns the
  gradient of a max-pool (select-and-scatter) into an arg-max search that carries four
  index arrays through a reduce-window, then a scatter; here each of the nine window
  offsets compares its strided slice of the input with the output and adds the
  gradient where they are equal, placed back with a strided pad. Ties go to the first
  maximum in row-major window order, as select-and-scatter gives them, and the
  contributions to a pixel are added in the order a row-major scatter adds them.
  """
  return _stem_pool(x_BHWC)


def _max_pool_fwd(x_BHWC):
  y = _stem_pool(x_BHWC)
  return y, (x_BHWC, y)


def _max_pool_bwd(res, g_BHWC):
  x, y = res
  _, h, w, _ = x.shape
  ho, wo = y.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  claimed = jnp.zeros(y.shape, bool)
  parts = []
  for di in range(3):
    for dj in range(3):
      # Input pixels (2i + di, 2j + dj) of the padded image, one per output (i, j).
      xs = jax.lax.slice(xp, (0, di, dj, 0),
                         (xp.shape[0], di + 2 * ho - 1, dj + 2 * wo - 1, xp.shape[3]),
                         (1, 2, 2, 1))
      hit = (xs == y) & ~claimed
      claimed = claimed | hit
      pad = ((0, 0, 0), (di, h + 2 - di - (2 * ho - 1), 1),
             (dj, w + 2 - dj - (2 * wo - 1), 1), (0, 0, 0))
      parts.append(jax.lax.pad(jnp.where(hit, g_BHWC, 0).astype(g_BHWC.dtype),
                               jnp.zeros((), g_BHWC.dtype), pad))
  # Later windows first: a pixel shared by several windows then sums their gradients
  # in the order of the windows (row-major), as a scatter does.
  dxp = parts[-1]
  for part in parts[-2::-1]:
    dxp = dxp + part
  return (dxp[:, 1:h + 1, 1:w + 1, :],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


def upsample_nearest(x_BHWC: jax.Array) -> jax.Array:
  """2x nearest-neighbour upsampling."""
  return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)


class BasicBlock(nn.Module):
  """torchvision's ResNet BasicBlock; a 1x1 conv + BN shortcut when the shape changes."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, p, name: nn.Conv(
        f, (k, k), strides=(s, s), padding=((p, p), (p, p)), use_bias=False,
        kernel_init=_ENCODER_INIT, dtype=self.dtype, name=name)
    y = conv(self.features, 3, self.strides, 1, "conv1")(x)
    y = nn.relu(batch_norm(train, "bn1", self.dtype)(y))
    y = conv(self.features, 3, 1, 1, "conv2")(y)
    y = batch_norm(train, "bn2", self.dtype)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, 0, "downsample_conv")(x)
      x = batch_norm(train, "downsample_bn", self.dtype)(x)
    return nn.relu(x + y)


class ResNet34Encoder(nn.Module):
  """ResNet-34 without pooling head; returns the features at strides 2, 4, 8, 16, 32.

  Submodule names mirror torchvision's (`conv1`, `bn1`, `layer{i}_{j}`) so that
  `pretrained.py` can map a torchvision state dict onto them by name.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, train: bool) -> list[jax.Array]:
    x = nn.Conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                kernel_init=_ENCODER_INIT, dtype=self.dtype, name="conv1")(x_BHWC)
    x = nn.relu(batch_norm(train, "bn1", self.dtype)(x))
    skips = [x]  # stride 2: smp's first decoder skip is the stem's ReLU output.
    x = max_pool_3x3_s2(x)
    for i, (blocks, width) in enumerate(zip(RESNET34_LAYERS, RESNET34_WIDTHS)):
      for j in range(blocks):
        strides = 2 if (i > 0 and j == 0) else 1
        x = BasicBlock(width, strides, self.dtype, name=f"layer{i + 1}_{j}")(x, train)
      skips.append(x)
    return skips


class DecoderBlock(nn.Module):
  """smp's U-Net decoder block: nearest 2x up, concat skip, two conv-BN-ReLU."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None, train: bool) -> jax.Array:
    x = upsample_nearest(x)
    if skip is not None:
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    for k in (1, 2):
      x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=_DECODER_INIT, dtype=self.dtype, name=f"conv{k}")(x)
      x = nn.relu(batch_norm(train, f"bn{k}", self.dtype)(x))
    return x


class UNetDecoder(nn.Module):
  """smp's `UnetDecoder` without centre block or attention.

  The deepest feature (stride 32) is the head; the blocks take the skips at strides 16,
  8, 4 and 2 in turn and the fifth block, back at full resolution, has no skip.
  """
  channels: Sequence[int] = DECODER_CHANNELS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, skips: Sequence[jax.Array], train: bool) -> jax.Array:
    x, rest = skips[-1], list(skips[:-1])[::-1]
    for i, ch in enumerate(self.channels):
      skip = rest[i] if i < len(rest) else None
      x = DecoderBlock(ch, self.dtype, name=f"block{i}")(x, skip, train)
    return x


class ResNetUNet(nn.Module):
  """D-Persona's ResNet-34 U-Net without its segmentation head.

  Attributes:
    feature_channels: channels of the output map (the last decoder block's width).
    dtype: computation dtype (parameters stay float32).
  """
  feature_channels: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
    """Maps (B, H, W, C) images to (B, H, W, feature_channels) features."""
    h, w = x_BHWC.shape[1:3]
    if h % 32 or w % 32:
      # smp pads or crops mismatched skips; sizes divisible by 32 never need it.
      raise ValueError(f"ResNetUNet needs H and W divisible by 32, got {h}x{w}.")
    skips = ResNet34Encoder(self.dtype, name="encoder")(x_BHWC, train)
    channels = tuple(DECODER_CHANNELS[:-1]) + (self.feature_channels,)
    return UNetDecoder(channels, self.dtype, name="decoder")(skips, train)


class PlainUNet(nn.Module):
  """The Probabilistic U-Net's U-Net (Kohl et al.; the PyTorch port D-Persona ships).

  Each level: (2x2 average pooling, ceil mode, except at the first level) then
  `convs_per_block` 3x3 conv + ReLU. Up path: bilinear 2x (align corners), concat with
  the skip, `convs_per_block` 3x3 conv + ReLU. When `filters[0]` differs from
  `feature_channels`, a final 1x1 conv (no activation) projects to `feature_channels`
  so that Fcomb always sees the same width. `batch_norm` (not in the original) puts
  BatchNorm after each conv: without it, Adam's first steps can grow the activations of
  this unnormalised net coherently until the Dice loss saturates on an empty mask.

  Attributes:
    filters: channels per level, shallow to deep.
    feature_channels: channels of the output map.
    convs_per_block: 3x3 convs per level.
    dtype: computation dtype.
  """
  filters: Sequence[int] = (32, 64, 128, 192)
  feature_channels: int = 16
  convs_per_block: int = 3
  batch_norm: bool = False
  dtype: Any = jnp.float32

  def _block(self, x: jax.Array, features: int, prefix: str, train: bool) -> jax.Array:
    for k in range(self.convs_per_block):
      x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=KAIMING_NORMAL,
                  use_bias=not self.batch_norm, bias_init=tiny_truncated_normal(),
                  dtype=self.dtype, name=f"{prefix}_conv{k}")(x)
      if self.batch_norm:
        x = batch_norm(train, f"{prefix}_bn{k}", self.dtype)(x)
      x = nn.relu(x)
    return x

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
    """Maps (B, H, W, C) images to (B, H, W, feature_channels).

    `train` matters only with `batch_norm` (batch statistics, running averages updated).
    """
    factor = 2 ** (len(self.filters) - 1)
    h, w = x_BHWC.shape[1:3]
    if h % factor or w % factor:
      raise ValueError(f"PlainUNet needs H and W divisible by {factor}, got {h}x{w}.")
    x, skips = x_BHWC, []
    for i, f in enumerate(self.filters):
      if i > 0:
        skips.append(x)
        x = avg_pool_ceil(x)
      x = self._block(x, f, f"down{i}", train)
    for i in range(len(self.filters) - 2, -1, -1):
      x = upsample_bilinear_align_corners(x)
      x = jnp.concatenate([x, skips[i]], axis=-1)
      x = self._block(x, self.filters[i], f"up{i}", train)
    if self.filters[0] != self.feature_channels:
      x = nn.Conv(self.feature_channels, (1, 1), kernel_init=KAIMING_NORMAL,
                  bias_init=tiny_truncated_normal(), dtype=self.dtype, name="project")(x)
    return x


def build_backbone(kind: str, *, feature_channels: int = 16,
                   unet_filters: Sequence[int] = (32, 64, 128, 192),
                   convs_per_block: int = 3, unet_batch_norm: bool = False,
                   dtype: Any = jnp.float32) -> nn.Module:
  """Returns the backbone named by `config.model.backbone` ("resnet34" or "unet")."""
  if kind == "resnet34":
    return ResNetUNet(feature_channels=feature_channels, dtype=dtype)
  if kind == "unet":
    return PlainUNet(filters=tuple(unet_filters), feature_channels=feature_channels,
                     convs_per_block=convs_per_block, batch_norm=unet_batch_norm, dtype=dtype)
  raise ValueError(f"Unknown backbone {kind!r}: expected 'resnet34' or 'unet'.")

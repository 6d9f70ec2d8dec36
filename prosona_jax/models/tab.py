"""TAB (Liao et al., MICCAI 2023): the transformer-based annotator-bias baseline.

Building blocks only (model, loss, predictions, optimiser with frozen parts); the
training entry point wires them in. Follows the official code (Merrical/TAB,
`models/TAB/*`, `trainer/train_riga_tab.py`) as specified in
`shared/specs/BASELINES.md` section 4, with the presumed LIDC adaptation: Q = 1 + R
queries (one consensus query, then one per rater rank), C = 1 class, rank 7, the grey
image repeated to 3 channels.

Variable collections:
- `params`: every tensor PyTorch holds as an `nn.Parameter`, the frozen stem and
  layer1 convs included (so `total` counts like the reference). The optimiser
  (`make_optimizer`) gives those no state and no update (`trainable_mask`).
- `buffers`: the encoder's FrozenBatchNorm2d scale, bias, mean and variance (ImageNet
  values once loaded, `load_pretrained_encoder`); never updated.
- `batch_stats`: running averages of the mask head's trainable BatchNorms.

Precision: the reference casts the Gaussian to float64. Here everything is float32:
sampling `z = mean + W eps_rank + sqrt(d) * eps_diag` needs no factorisation (PyTorch's
`LowRankMultivariateNormal` builds a Cholesky of the capacitance matrix
`I + W^T D^-1 W` in its constructor, ill-conditioned with d down to 1e-5, which is what
float64 protects there; sampling never uses it). `test_tab.py` checks the loss against
a float64 numpy computation with the same noise.
"""

import math
from typing import Any, Mapping, NamedTuple, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prosona_jax.models import backbone as backbone_lib
from prosona_jax.models import pretrained

DEFAULTS: dict[str, Any] = {
    "lr": 5e-5,  # Adam learning rate (TAB's run.sh; the LIDC protocol uses 1e-4).
    "schedule": "poly",  # poly: lr * (1 - epoch / E)^power (TAB) | cosine (LIDC protocol).
    "power": 0.9,  # Exponent of the poly schedule.
    "weight_decay": 0.0,  # PyTorch-Adam L2 (added to the gradient); run.sh sets 0.
    "lam": 1.0,  # lambda: weight of the rater-query BCE (README 1.0; argparse 1.25).
    "rank": 7,  # Rank of the low-rank covariance factor W.
    "hidden_dim": 256,  # d of the transformer.
    "num_heads": 8,  # Attention heads (transformer and attention map).
    "dim_feedforward": 512,  # Width of the transformer's FFN.
    "dropout": 0.1,  # Transformer dropout (attention weights, FFN, residuals).
    "enc_layers": 1,  # Transformer encoder layers.
    "dec_layers": 1,  # Transformer decoder layers.
    "mask_dim": 32,  # Channels of the mask head's full-resolution output.
    "num_queries": 0,  # Q = 1 consensus + R rater queries; 0 means 1 + num_raters.
    "repeat_grey": True,  # Repeat a 1-channel image to 3 channels (torchvision RGB stem).
    "freeze_stem_layer1": True,  # Stem conv and layer1 frozen (requires_grad False in TAB).
}
# The D-Persona LIDC protocol's optimiser (Adam 1e-4, per-epoch cosine), as a preset.
LIDC_PROTOCOL: dict[str, Any] = {**DEFAULTS, "lr": 1e-4, "schedule": "cosine"}
SCHEDULES = ("poly", "cosine")
DIAG_EPSILON = 1e-5  # Added to |diagonal head| so the covariance stays positive definite.

# torchvision initialises ResNet convs with kaiming_normal_(mode="fan_out").
_ENCODER_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv2d/Linear weight init, kaiming_uniform_(a=sqrt(5)):
# U(+-1/sqrt(fan_in)).
_TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# ConvTranspose2d's weight is (in, out, k, k) in PyTorch, whose fan_in is then
# out * k * k: Flax's (k, k, in, out) kernel calls that fan_out.
_TORCH_TRANSPOSED_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")
# The mask head's Conv2d: kaiming_uniform_(a=1), zero bias: U(+-sqrt(3 / fan_in)).
_MASK_HEAD_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
_XAVIER = nn.initializers.xavier_uniform()
# nn.MultiheadAttention's packed in_proj_weight (3d, d) gets one xavier_uniform_:
# U(+-sqrt(6 / 4d)). Flax initialises q, k and v separately on a (d, d) kernel, whose
# fan_avg is d; scale 0.5 gives the same bound.
_QKV_INIT = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


def _torch_bias_init(fan_in: int):
  """PyTorch's default bias init: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# ------------------------------------------------------------------ encoder


class FrozenBatchNorm(nn.Module):
  """DETR's FrozenBatchNorm2d: fixed statistics and affine, all in `buffers`.

  y = x * s + (b - mean * s) with s = w / sqrt(var + 1e-5), the reference's formula.
  Initialised as the identity (torchvision's init); ImageNet values come from
  `load_pretrained_encoder`.
  """
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    c = x_BHWC.shape[-1]
    buf = lambda name, init: self.variable("buffers", name, init, (c,), jnp.float32).value
    scale, bias = buf("scale", jnp.ones), buf("bias", jnp.zeros)
    mean, var = buf("mean", jnp.zeros), buf("var", jnp.ones)
    s = scale * jax.lax.rsqrt(var + self.epsilon)
    return x_BHWC * s + (bias - mean * s)


def _conv(features: int, k: int, s: int, p: int, name: str) -> nn.Conv:
  # Explicit symmetric padding: Flax's 'SAME' pads strided convs asymmetrically.
  return nn.Conv(features, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                 use_bias=False, kernel_init=_ENCODER_INIT, name=name)


class FrozenBNBasicBlock(nn.Module):
  """torchvision's BasicBlock with FrozenBatchNorm; 1x1 conv + BN shortcut on change."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = _conv(self.features, 3, self.strides, 1, "conv1")(x)
    y = nn.relu(FrozenBatchNorm(name="bn1")(y))
    y = _conv(self.features, 3, 1, 1, "conv2")(y)
    y = FrozenBatchNorm(name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.strides, 0, "downsample_conv")(x)
      x = FrozenBatchNorm(name="downsample_bn")(x)
    return nn.relu(x + y)


class FrozenBNResNet34(nn.Module):
  """torchvision ResNet-34 with FrozenBatchNorm, returning TAB's five feature maps.

  Module names are `backbone.ResNet34Encoder`'s (torchvision's), so `pretrained.py`
  maps ImageNet weights onto it. Returns [conv1 output (before its BN, stride 2),
  layer1 (4), layer2 (8), layer3 (16), layer4 (32)], as the reference's
  IntermediateLayerGetter with `return_layers = {conv1, layer1, ..., layer4}`.

  Attributes:
    freeze_stem_layer1: stop gradients at the stem and layer1 outputs, as their
      `requires_grad=False` does: nothing before them trains, so the backward pass
      through them is skipped. The optimiser mask is what keeps them fixed.
  """
  freeze_stem_layer1: bool = True

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> list[jax.Array]:
    conv1 = _conv(64, 7, 2, 3, "conv1")(x_BHWC)
    x = nn.relu(FrozenBatchNorm(name="bn1")(conv1))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    feats = [conv1]
    for i, (blocks, width) in enumerate(zip(backbone_lib.RESNET34_LAYERS,
                                            backbone_lib.RESNET34_WIDTHS)):
      for j in range(blocks):
        strides = 2 if (i > 0 and j == 0) else 1
        x = FrozenBNBasicBlock(width, strides, name=f"layer{i + 1}_{j}")(x)
      if i == 0 and self.freeze_stem_layer1:
        x = jax.lax.stop_gradient(x)
        feats[0] = jax.lax.stop_gradient(conv1)
      feats.append(x)
    return feats


# ------------------------------------------------------------------ transformer


def sine_position_encoding(h: int, w: int, num_pos_feats: int = 128,
                           temperature: float = 10000.0) -> np.ndarray:
  """DETR's PositionEmbeddingSine (normalize=True, no padding): (h, w, 2 * num_pos_feats).

  Channels: num_pos_feats for y, then num_pos_feats for x, each interleaved
  [sin(p / t_0), cos(p / t_1), sin(p / t_2), ...] with t_i = T^(2 floor(i / 2) / F)
  and p = (index + 1) / (size + 1e-6) * 2 pi.
  """
  eps, scale = 1e-6, 2.0 * math.pi
  y = np.arange(1, h + 1, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)
  x = np.ones((h, 1), np.float32) * np.arange(1, w + 1, dtype=np.float32)[None, :]
  y = y / (np.float32(h) + eps) * np.float32(scale)
  x = x / (np.float32(w) + eps) * np.float32(scale)
  dim_t = np.arange(num_pos_feats, dtype=np.float32)
  dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / num_pos_feats)

  def embed(p_HW: np.ndarray) -> np.ndarray:
    p = p_HW[..., None] / dim_t
    return np.stack([np.sin(p[..., 0::2]), np.cos(p[..., 1::2])], axis=-1).reshape(
        h, w, num_pos_feats)

  return np.concatenate([embed(y), embed(x)], axis=-1).astype(np.float32)


def _attention(num_heads: int, dropout: float, name: str) -> nn.MultiHeadDotProductAttention:
  """Flax's attention as PyTorch's nn.MultiheadAttention computes it.

  Same parameters (q, k, v and out projections with biases: 4 d^2 + 4 d), same head
  split (head h takes features h*d_h:(h+1)*d_h of each projection), scale d_h^-0.5,
  softmax per head over keys, dropout on the attention weights: per element
  (`broadcast_dropout=False`; Flax's default shares one mask across the batch).
  Projection biases start at zero as in PyTorch.
  """
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, dropout_rate=dropout, broadcast_dropout=False,
      kernel_init=_QKV_INIT, out_kernel_init=_XAVIER, bias_init=nn.initializers.zeros,
      out_bias_init=nn.initializers.zeros, name=name)


class _FeedForward(nn.Module):
  """linear2(dropout(relu(linear1(x)))), xavier weights, PyTorch-default biases."""
  hidden_dim: int
  dim_feedforward: int
  dropout: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Dense(self.dim_feedforward, kernel_init=_XAVIER,
                 bias_init=_torch_bias_init(self.hidden_dim), name="linear1")(x)
    x = nn.Dropout(self.dropout)(nn.relu(x), deterministic=not train)
    return nn.Dense(self.hidden_dim, kernel_init=_XAVIER,
                    bias_init=_torch_bias_init(self.dim_feedforward), name="linear2")(x)


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, name=name)  # PyTorch's eps (Flax's default is 1e-6).


class EncoderLayer(nn.Module):
  """DETR's post-norm TransformerEncoderLayer; positions added to queries and keys."""
  hidden_dim: int
  num_heads: int
  dim_feedforward: int
  dropout: float

  @nn.compact
  def __call__(self, src_BLD: jax.Array, pos_LD: jax.Array, train: bool) -> jax.Array:
    drop = lambda x: nn.Dropout(self.dropout)(x, deterministic=not train)
    qk = src_BLD + pos_LD
    src2 = _attention(self.num_heads, self.dropout, "self_attn")(
        qk, qk, src_BLD, deterministic=not train)
    src = _layer_norm("norm1")(src_BLD + drop(src2))
    src2 = _FeedForward(self.hidden_dim, self.dim_feedforward, self.dropout, name="ffn")(
        src, train)
    return _layer_norm("norm2")(src + drop(src2))


class DecoderLayer(nn.Module):
  """DETR's post-norm TransformerDecoderLayer (self-attention, cross-attention, FFN)."""
  hidden_dim: int
  num_heads: int
  dim_feedforward: int
  dropout: float

  @nn.compact
  def __call__(self, tgt_BQD: jax.Array, memory_BLD: jax.Array, pos_LD: jax.Array,
               query_pos_QD: jax.Array, train: bool) -> jax.Array:
    drop = lambda x: nn.Dropout(self.dropout)(x, deterministic=not train)
    qk = tgt_BQD + query_pos_QD
    tgt2 = _attention(self.num_heads, self.dropout, "self_attn")(
        qk, qk, tgt_BQD, deterministic=not train)
    tgt = _layer_norm("norm1")(tgt_BQD + drop(tgt2))
    tgt2 = _attention(self.num_heads, self.dropout, "cross_attn")(
        tgt + query_pos_QD, memory_BLD + pos_LD, memory_BLD, deterministic=not train)
    tgt = _layer_norm("norm2")(tgt + drop(tgt2))
    tgt2 = _FeedForward(self.hidden_dim, self.dim_feedforward, self.dropout, name="ffn")(
        tgt, train)
    return _layer_norm("norm3")(tgt + drop(tgt2))


class Transformer(nn.Module):
  """DETR's transformer: post-norm encoder (no final norm) and decoder (final LayerNorm).

  The decoder starts from zeros with the query embeddings as `query_pos`. Returns the
  normed output of the last decoder layer, (B, Q, d) (the reference's `hs[-1]`), and
  the encoder's `memory` (B, L, d).
  """
  hidden_dim: int = 256
  num_heads: int = 8
  dim_feedforward: int = 512
  dropout: float = 0.1
  enc_layers: int = 1
  dec_layers: int = 1

  @nn.compact
  def __call__(self, src_BLD: jax.Array, pos_LD: jax.Array, query_QD: jax.Array,
               train: bool) -> tuple[jax.Array, jax.Array]:
    dims = (self.hidden_dim, self.num_heads, self.dim_feedforward, self.dropout)
    memory = src_BLD
    for i in range(self.enc_layers):
      memory = EncoderLayer(*dims, name=f"encoder_{i}")(memory, pos_LD, train)
    tgt = jnp.zeros((src_BLD.shape[0],) + query_QD.shape, src_BLD.dtype)
    for i in range(self.dec_layers):
      tgt = DecoderLayer(*dims, name=f"decoder_{i}")(tgt, memory, pos_LD, query_QD, train)
    return _layer_norm("decoder_norm")(tgt), memory


# ------------------------------------------------------------------ mask head


def joint_softmax_attention_map(q_BQD: jax.Array, k_BHWD: jax.Array, num_heads: int
                                ) -> jax.Array:
  """Attention maps (B, Q, M, h, w), M heads, of projected queries over projected keys.

  Scale d_h^-0.5 on the query, as DETR's MHAttentionMap. The softmax runs jointly over
  heads x positions (the reference flattens (heads, h, w) before it), so the maps of
  one query sum to 1 over all heads together, not per head.
  """
  b, q, d = q_BQD.shape
  _, h, w, _ = k_BHWD.shape
  dh = d // num_heads
  qh = q_BQD.reshape(b, q, num_heads, dh) * (dh ** -0.5)
  kh = k_BHWD.reshape(b, h, w, num_heads, dh)
  logits_BQMHW = jnp.einsum("bqmc,bhwmc->bqmhw", qh, kh,
                            precision=jax.lax.Precision.HIGHEST)
  # One softmax over the flattened (M, h, w), as the reference's `flatten(2)`.
  weights = jax.nn.softmax(logits_BQMHW.reshape(b, q, num_heads * h * w), axis=-1)
  return weights.reshape(b, q, num_heads, h, w)


class AttentionMap(nn.Module):
  """DETR's MHAttentionMap: q and k projections (xavier, zero bias), no value, dropout 0."""
  hidden_dim: int = 256
  num_heads: int = 8

  @nn.compact
  def __call__(self, hs_BQD: jax.Array, memory_BHWD: jax.Array) -> jax.Array:
    dense = lambda name: nn.Dense(self.hidden_dim, kernel_init=_XAVIER,
                                  bias_init=nn.initializers.zeros, name=name)
    return joint_softmax_attention_map(dense("q_linear")(hs_BQD),
                                       dense("k_linear")(memory_BHWD), self.num_heads)


class UpBlock(nn.Module):
  """TAB's UnetBlock: [tr_conv 2x2/2 (path), x_conv 1x1 (skip)] -> concat -> ReLU -> BN.

  The skip arrives per image (B, ...) and is shared by the image's Q queries: its 1x1
  conv is applied once and then repeated, the same values as the reference's
  repeat-then-convolve.
  """
  features: int = 256

  @nn.compact
  def __call__(self, path_NHWC: jax.Array, skip_BHWC: jax.Array, train: bool) -> jax.Array:
    half = self.features // 2
    up = nn.ConvTranspose(half, (2, 2), strides=(2, 2), padding="VALID",
                          kernel_init=_TORCH_TRANSPOSED_INIT,
                          bias_init=_torch_bias_init(half * 4), name="tr_conv")(path_NHWC)
    skip = nn.Conv(half, (1, 1), kernel_init=_MASK_HEAD_INIT,
                   bias_init=nn.initializers.zeros, name="x_conv")(skip_BHWC)
    skip = jnp.repeat(skip, path_NHWC.shape[0] // skip_BHWC.shape[0], axis=0)
    x = nn.relu(jnp.concatenate([up, skip], axis=-1))
    return backbone_lib.batch_norm(train, "bn", jnp.float32)(x)


class MaskHead(nn.Module):
  """TAB's MaskHeadSmallConv_UNet: four UpBlocks then a 2x2/2 transposed conv.

  Input per query: ReLU(concat[src (d), attention maps (heads)]); skips layer3, layer2,
  layer1 and the stem conv; output (B*Q, H, W, mask_dim). Rows are image-major
  (b * Q + q), as the reference's `_expand`.
  """
  mask_dim: int = 32

  @nn.compact
  def __call__(self, src_BHWD: jax.Array, attn_BQMHW: jax.Array,
               skips: Sequence[jax.Array], train: bool) -> jax.Array:
    b, q, m, h, w = attn_BQMHW.shape
    attn_NHWM = jnp.moveaxis(attn_BQMHW, 2, -1).reshape(b * q, h, w, m)  # N = B*Q rows.
    x = nn.relu(jnp.concatenate([jnp.repeat(src_BHWD, q, axis=0), attn_NHWM], axis=-1))
    for i, skip in enumerate(skips):
      x = UpBlock(256, name=f"up{i + 1}")(x, skip, train)
    return nn.ConvTranspose(self.mask_dim, (2, 2), strides=(2, 2), padding="VALID",
                            kernel_init=_TORCH_TRANSPOSED_INIT,
                            bias_init=_torch_bias_init(self.mask_dim * 4), name="up5")(x)


# ------------------------------------------------------------------ distribution


class LowRankGaussian(NamedTuple):
  """N(mean, W W^T + diag(d)) over the C*H*W logits of each query (float32).

  Attributes:
    mean: (B, Q, N), N = C*H*W in (C, H, W) row-major order.
    factor: (B, Q, N, K), W.
    diag: (B, Q, N), d > 0.
  """
  mean: jax.Array
  factor: jax.Array
  diag: jax.Array


def heads_to_gaussian(mean_NHWC: jax.Array, diag_NHWC: jax.Array,
                      factor_NHWF: jax.Array, batch: int, rank: int) -> LowRankGaussian:
  """The reference's `.view`s of the head maps (N = B*Q rows, image-major) into Gaussians.

  The factor map (F = C*K channels) is read as PyTorch does: each row's NCHW tensor
  (C*K, H, W) flattened row-major and viewed as (C*H*W, K). Row n of W is therefore
  entries n*K..n*K+K-1 of that flat array, i.e. (mostly) K consecutive pixels of one
  of the C*K channel maps, not the K channels at pixel n: the factor mixes spatial
  positions. Kept to match the reference.
  """
  n = mean_NHWC.shape[0]
  q = n // batch
  mean = jnp.transpose(mean_NHWC, (0, 3, 1, 2)).reshape(batch, q, -1)
  diag = jnp.transpose(diag_NHWC, (0, 3, 1, 2)).reshape(batch, q, -1)
  factor = jnp.transpose(factor_NHWF, (0, 3, 1, 2)).reshape(batch, q, -1, rank)
  return LowRankGaussian(mean, factor, diag)


def sample_low_rank(mean_BN: jax.Array, factor_BNK: jax.Array, diag_BN: jax.Array,
                    eps_BK: jax.Array, eps_BN: jax.Array) -> jax.Array:
  """z = mean + W eps_rank + sqrt(d) eps_diag (PyTorch's LowRankMultivariateNormal.rsample).

  Leading batch axes are broadcast; eps_BK is one rank-noise vector per sample, shared
  by all N logits, as in PyTorch. HIGHEST keeps GPUs from rounding W to TF32.
  """
  low_rank = jnp.einsum("...nk,...k->...n", factor_BNK, eps_BK,
                        precision=jax.lax.Precision.HIGHEST)
  return mean_BN + low_rank + jnp.sqrt(diag_BN) * eps_BN


# ------------------------------------------------------------------ model


class TAB(nn.Module):
  """TAB: ResNet-34 (frozen BN) -> DETR transformer -> per-query mask head -> Gaussians.

  Query 0 is the consensus, queries 1..R the rater ranks.

  Attributes:
    num_queries: Q = 1 + R.
    num_classes: C (LIDC 1; RIGA 2).
    rank: K of the covariance factor.
    hidden_dim, num_heads, dim_feedforward, dropout, enc_layers, dec_layers: the
      transformer's.
    mask_dim: channels of the mask head's output.
    repeat_grey: repeat 1-channel images to 3 channels before the RGB stem.
    freeze_stem_layer1: see `FrozenBNResNet34`.
  """
  num_queries: int = 5
  num_classes: int = 1
  rank: int = 7
  hidden_dim: int = 256
  num_heads: int = 8
  dim_feedforward: int = 512
  dropout: float = 0.1
  enc_layers: int = 1
  dec_layers: int = 1
  mask_dim: int = 32
  repeat_grey: bool = True
  freeze_stem_layer1: bool = True

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, train: bool = False) -> LowRankGaussian:
    """Returns the Q Gaussians of each image; `train` enables dropout and BN batch stats."""
    b, h, w, c = x_BHWC.shape
    if h % 32 or w % 32:
      raise ValueError(f"TAB needs H and W divisible by 32, got {h}x{w}.")
    x = x_BHWC.astype(jnp.float32)
    if self.repeat_grey and c == 1:
      x = jnp.repeat(x, 3, axis=-1)
    conv1, layer1, layer2, layer3, layer4 = FrozenBNResNet34(
        self.freeze_stem_layer1, name="backbone")(x)
    d = self.hidden_dim
    src = nn.Conv(d, (1, 1), kernel_init=_TORCH_DEFAULT_INIT,
                  bias_init=_torch_bias_init(layer4.shape[-1]), name="input_proj")(layer4)
    hh, ww = src.shape[1:3]
    pos_LD = jnp.asarray(sine_position_encoding(hh, ww, d // 2)).reshape(hh * ww, d)
    # nn.Embedding's weight: N(0, 1).
    query_QD = self.param("query_embed", nn.initializers.normal(1.0),
                          (self.num_queries, d), jnp.float32)
    hs_BQD, memory_BLD = Transformer(
        d, self.num_heads, self.dim_feedforward, self.dropout, self.enc_layers,
        self.dec_layers, name="transformer")(src.reshape(b, hh * ww, d), pos_LD, query_QD,
                                             train)
    attn_BQMHW = AttentionMap(d, self.num_heads, name="attention_map")(
        hs_BQD, memory_BLD.reshape(b, hh, ww, d))
    seg_NHWC = MaskHead(self.mask_dim, name="mask_head")(
        src, attn_BQMHW, [layer3, layer2, layer1, conv1], train)  # N = B*Q rows.
    seg_NHWC = nn.relu(backbone_lib.batch_norm(train, "bnout", jnp.float32)(seg_NHWC))
    head = lambda f, name: nn.Conv(f, (1, 1), kernel_init=_TORCH_DEFAULT_INIT,
                                   bias_init=_torch_bias_init(self.mask_dim), name=name)
    mean = head(self.num_classes, "mean_head")(seg_NHWC)
    diag = jnp.abs(head(self.num_classes, "diag_head")(seg_NHWC)) + DIAG_EPSILON
    factor = head(self.num_classes * self.rank, "factor_head")(seg_NHWC)
    return heads_to_gaussian(mean, diag, factor, b, self.rank)


def _config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
  cfg = dict(cfg or {})
  unknown = set(cfg) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"Unknown TAB config fields: {sorted(unknown)}.")
  return {**DEFAULTS, **cfg}


def build_tab(cfg: Mapping[str, Any] | None, num_raters: int, num_classes: int = 1) -> TAB:
  """Builds TAB from a config (fields of `DEFAULTS`, missing ones defaulted)."""
  c = _config(cfg)
  num_queries = int(c["num_queries"]) or 1 + int(num_raters)
  if num_queries != 1 + num_raters:
    raise ValueError(f"num_queries={num_queries} but TAB needs 1 + num_raters = "
                     f"{1 + num_raters}.")
  return TAB(num_queries=num_queries, num_classes=int(num_classes), rank=int(c["rank"]),
             hidden_dim=int(c["hidden_dim"]), num_heads=int(c["num_heads"]),
             dim_feedforward=int(c["dim_feedforward"]), dropout=float(c["dropout"]),
             enc_layers=int(c["enc_layers"]), dec_layers=int(c["dec_layers"]),
             mask_dim=int(c["mask_dim"]), repeat_grey=bool(c["repeat_grey"]),
             freeze_stem_layer1=bool(c["freeze_stem_layer1"]))


def init_variables(model: TAB, rng: jax.Array, image_size: int, in_channels: int
                   ) -> dict[str, Any]:
  """{'params', 'buffers', 'batch_stats'}; the encoder starts from torchvision's init."""
  x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
  # One compiled init: eager init compiles an RNG kernel per parameter shape instead.
  return dict(jax.jit(lambda key: model.init(key, x, train=False))(rng))


def load_pretrained_encoder(state_or_path: str | Mapping[str, np.ndarray],
                            variables: Mapping[str, Any]) -> dict[str, Any]:
  """Fills the encoder's convs (`params`) and FrozenBatchNorms (`buffers`) from ImageNet.

  Takes a torchvision ResNet-34 state dict or a `.safetensors`/`.pth` file. With a
  1-channel stem (repeat_grey off) the RGB kernels are summed, which gives exactly the
  3-channel stem's output on the repeated grey image.
  """
  source = state_or_path if isinstance(state_or_path, str) else "<state dict>"
  state = (pretrained.read_state_dict(state_or_path) if isinstance(state_or_path, str)
           else state_or_path)
  flat_p = traverse_util.flatten_dict(dict(variables["params"]["backbone"]))
  flat_b = traverse_util.flatten_dict(dict(variables["buffers"]["backbone"]))
  affine = lambda key: key[-1] in ("scale", "bias")
  # pretrained.py expects Flax BatchNorm's split: scale/bias in params, mean/var apart.
  merged_p = {**flat_p, **{k: v for k, v in flat_b.items() if affine(k)}}
  stats = {k: v for k, v in flat_b.items() if not affine(k)}
  new_p, new_s = pretrained.load_encoder_weights(
      state, traverse_util.unflatten_dict(merged_p), traverse_util.unflatten_dict(stats),
      source=source)
  new_p, new_s = traverse_util.flatten_dict(new_p), traverse_util.flatten_dict(new_s)
  out = {k: dict(v) for k, v in variables.items()}
  out["params"]["backbone"] = traverse_util.unflatten_dict({k: new_p[k] for k in flat_p})
  out["buffers"]["backbone"] = traverse_util.unflatten_dict(
      {k: (new_p[k] if affine(k) else new_s[k]) for k in flat_b})
  return out


# ------------------------------------------------------------------ loss, predictions


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean BCE-with-logits, PyTorch's stable form max(x, 0) - x t + log(1 + e^-|x|)."""
  per = (jnp.maximum(logits, 0.0) - logits * targets
         + jnp.log1p(jnp.exp(-jnp.abs(logits))))
  return jnp.mean(per)


class TabNoise(NamedTuple):
  """Standard-normal noise of one step: R consensus samples and one per rater query."""
  consensus_rank: jax.Array  # (B, R, K)
  consensus_diag: jax.Array  # (B, R, N)
  rater_rank: jax.Array  # (B, R, K)
  rater_diag: jax.Array  # (B, R, N)


def draw_noise(rng: jax.Array, gauss: LowRankGaussian) -> TabNoise:
  """Noise for `loss_from_gaussian`: R = Q - 1 draws of each kind per image."""
  b, q, n, k = gauss.factor.shape
  keys = jax.random.split(rng, 4)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)
  return TabNoise(normal(keys[0], (b, q - 1, k)), normal(keys[1], (b, q - 1, n)),
                  normal(keys[2], (b, q - 1, k)), normal(keys[3], (b, q - 1, n)))


def loss_from_gaussian(gauss: LowRankGaussian, masks_BRN: jax.Array, noise: TabNoise,
                       lam: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum_r [BCE(consensus sample r, a_r) + lam * BCE(rater r's sample, a_r)].

  Every rater every step; each BCE is mean-reduced over B x N; the consensus query is
  sampled R times independently (once per rater term), as the reference does.

  Returns:
    (loss, {'loss_consensus': sum of the consensus terms, 'loss_raters': sum of the
    rater terms (unweighted)}).
  """
  r = masks_BRN.shape[1]
  if gauss.mean.shape[1] != r + 1:
    raise ValueError(f"{r} rater masks for {gauss.mean.shape[1]} queries (need Q = R + 1).")
  masks = masks_BRN.astype(jnp.float32)
  z_cons_BRN = sample_low_rank(gauss.mean[:, :1], gauss.factor[:, :1], gauss.diag[:, :1],
                               noise.consensus_rank, noise.consensus_diag)
  z_rater_BRN = sample_low_rank(gauss.mean[:, 1:], gauss.factor[:, 1:], gauss.diag[:, 1:],
                                noise.rater_rank, noise.rater_diag)
  per_rater = jax.vmap(bce_with_logits, in_axes=(1, 1))
  loss_cons = jnp.sum(per_rater(z_cons_BRN, masks))
  loss_raters = jnp.sum(per_rater(z_rater_BRN, masks))
  return loss_cons + lam * loss_raters, {"loss_consensus": loss_cons,
                                         "loss_raters": loss_raters}


def loss_fn(params: Any, collections: Mapping[str, Any], *, model: TAB,
            batch: Mapping[str, jax.Array], rng: jax.Array, train: bool = True,
            lam: float = 1.0) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict]]:
  """TAB's training loss on one batch.

  Args:
    params: the `params` collection (differentiate with respect to this).
    collections: the other collections, {'buffers', 'batch_stats'}.
    model: the TAB module.
    batch: {'image': (B, H, W, C) float32 (C = 1 is repeated to 3 in the model),
      'masks': (B, R, H, W) {0, 1}, raters in area-rank order}.
    rng: PRNG key of the step (dropout and the Gaussian samples).
    train: dropout on and the mask head's BatchNorms on batch statistics (updated).
    lam: weight of the rater-query terms.

  Returns:
    (loss, (aux, new_collections)): aux holds 'loss', 'loss_consensus', 'loss_raters';
    new_collections has the updated `batch_stats` when `train`, else is `collections`.
  """
  rng_dropout, rng_noise = jax.random.split(rng)
  variables = {"params": params, **collections}
  image = batch["image"].astype(jnp.float32)
  if train:
    gauss, updates = model.apply(variables, image, True, mutable=["batch_stats"],
                                 rngs={"dropout": rng_dropout})
    new_collections = {**collections, "batch_stats": updates["batch_stats"]}
  else:
    gauss = model.apply(variables, image, False)
    new_collections = dict(collections)
  masks = batch["masks"]
  masks_BRN = masks.reshape(masks.shape[:2] + (-1,))
  loss, aux = loss_from_gaussian(gauss, masks_BRN, draw_noise(rng_noise, gauss), lam)
  return loss, ({"loss": loss, **aux}, new_collections)


def predict_fn(variables: Mapping[str, Any], image_BHWC: jax.Array, *, model: TAB
               ) -> jax.Array:
  """Per-rater probabilities sigmoid(mean of rater query r): (B, R, H, W) in rank order.

  (B, R, C, H, W) when C > 1. The consensus query is not a prediction. Eval mode:
  no dropout, running BatchNorm statistics; deterministic.
  """
  b, h, w = image_BHWC.shape[:3]
  gauss = model.apply(variables, image_BHWC.astype(jnp.float32), False)
  probs = jax.nn.sigmoid(gauss.mean[:, 1:])
  probs = probs.reshape(b, model.num_queries - 1, model.num_classes, h, w)
  return probs[:, :, 0] if model.num_classes == 1 else probs


# ------------------------------------------------------------------ optimiser


def _is_frozen(path: tuple[str, ...], freeze_stem_layer1: bool = True) -> bool:
  return (freeze_stem_layer1 and len(path) > 1 and path[0] == "backbone"
          and (path[1] == "conv1" or path[1].startswith("layer1_")))


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(p, "key", str(p)) for p in path)


def trainable_mask(params: Any, freeze_stem_layer1: bool = True) -> Any:
  """Tree like `params`: False for the stem conv and layer1's convs, True elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not _is_frozen(_path_names(p), freeze_stem_layer1), params)


def make_schedule(cfg: Mapping[str, Any] | None, steps_per_epoch: int, total_epochs: int):
  """Learning rate per optimiser step, constant within an epoch (both are stepped per epoch).

  poly (TAB's `adjust_learning_rate`): lr * (1 - epoch / E)^power.
  cosine (D-Persona's CosineAnnealingLR, T_max = E, eta_min 0): lr (1 + cos(pi e / E)) / 2.
  """
  c = _config(cfg)
  lr, power, epochs = float(c["lr"]), float(c["power"]), int(total_epochs)
  if c["schedule"] not in SCHEDULES:
    raise ValueError(f"schedule={c['schedule']!r}: expected one of {SCHEDULES}.")

  def schedule(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs)
    if c["schedule"] == "poly":
      return lr * (1.0 - epoch / epochs) ** power
    return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))

  return schedule


def make_optimizer(cfg: Mapping[str, Any] | None, steps_per_epoch: int, total_epochs: int
                   ) -> optax.GradientTransformation:
  """Adam (PyTorch's defaults) on the trainable parameters; nothing on the frozen ones.

  `optax.multi_transform` routes the frozen stem and layer1 convs to `set_to_zero`:
  their updates are exact zeros and Adam keeps no moments for them (their subtree is
  masked out of its state). Weight decay, if set, is PyTorch Adam's L2 on the gradient.
  """
  c = _config(cfg)
  adam = optax.adam(make_schedule(c, steps_per_epoch, total_epochs))
  if float(c["weight_decay"]):
    adam = optax.chain(optax.add_decayed_weights(float(c["weight_decay"])), adam)
  labels = lambda params: jax.tree_util.tree_map(
      lambda t: "trainable" if t else "frozen",
      trainable_mask(params, bool(c["freeze_stem_layer1"])))
  return optax.multi_transform({"trainable": adam, "frozen": optax.set_to_zero()}, labels)


def _count(tree: Any) -> int:
  # Leaves may be arrays or jax.ShapeDtypeStruct (from jax.eval_shape).
  return int(sum(np.prod(leaf.shape, dtype=np.int64)
                 for leaf in jax.tree_util.tree_leaves(tree)))


def count_params(variables: Mapping[str, Any], freeze_stem_layer1: bool = True
                 ) -> dict[str, int]:
  """Parameter counts as the reference's `nn.Parameter` sums (buffers not counted).

  Keys: total, trainable, encoder_convs, encoder_convs_trainable, tab_part (all but the
  encoder) and its parts transformer, queries, input_proj, attention_map, mask_head
  (its up-block BatchNorms included), bn_out, mean_head, diag_head, factor_head;
  buffers (FrozenBatchNorm tensors) and batch_stats, for information.
  """
  params = variables["params"]
  mask = trainable_mask(params, freeze_stem_layer1)
  trainable = sum(np.prod(leaf.shape, dtype=np.int64) for leaf, t in zip(
      jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask)) if t)
  enc_mask = mask["backbone"]
  enc_trainable = sum(np.prod(leaf.shape, dtype=np.int64) for leaf, t in zip(
      jax.tree_util.tree_leaves(params["backbone"]), jax.tree_util.tree_leaves(enc_mask))
                      if t)
  counts = {
      "total": _count(params), "trainable": int(trainable),
      "encoder_convs": _count(params["backbone"]),
      "encoder_convs_trainable": int(enc_trainable),
      "transformer": _count(params["transformer"]),
      "queries": _count(params["query_embed"]),
      "input_proj": _count(params["input_proj"]),
      "attention_map": _count(params["attention_map"]),
      "mask_head": _count(params["mask_head"]),
      "bn_out": _count(params["bnout"]),
      "mean_head": _count(params["mean_head"]),
      "diag_head": _count(params["diag_head"]),
      "factor_head": _count(params["factor_head"]),
      "buffers": _count(variables.get("buffers", {})),
      "batch_stats": _count(variables.get("batch_stats", {})),
  }
  counts["tab_part"] = counts["total"] - counts["encoder_convs"]
  return counts

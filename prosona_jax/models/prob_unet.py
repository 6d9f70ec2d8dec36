"""Stage 1: the Probabilistic U-Net with D-Persona's backbone.

`ProbUNet` holds four parts, named so that `params` splits per component:
`backbone` (image -> 16-channel features), `prior` p(z|x), `posterior` q(z|x, a) and
`fcomb` (features + tiled z -> mask logits). The training loss lives in `losses.py`.
"""

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prosona_jax import parallel
from prosona_jax.models import backbone as backbone_lib

POSTERIOR_INPUTS = ("one_random", "all")


class AxisAlignedGaussian(nn.Module):
  """Conv encoder -> spatial mean -> 1x1 conv to the mean and log-sigma of N(mu, sigma^2).

  Attributes:
    latent_dim: D.
    filters: channels per level; levels after the first start with 2x2 ceil-mode
      average pooling.
    convs_per_block: 3x3 conv + ReLU per level.
  """
  latent_dim: int = 6
  filters: Sequence[int] = (16, 32, 64, 128, 256)
  convs_per_block: int = 3

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (mu_BD, log_sigma_BD)."""
    x = x_BHWC
    for i, f in enumerate(self.filters):
      if i > 0:
        x = backbone_lib.avg_pool_ceil(x)
      for k in range(self.convs_per_block):
        x = nn.Conv(f, (3, 3), padding=((1, 1), (1, 1)),
                    kernel_init=backbone_lib.KAIMING_NORMAL,
                    bias_init=backbone_lib.tiny_truncated_normal(),
                    name=f"level{i}_conv{k}")(x)
        x = nn.relu(x)
    x_BC = jnp.mean(x, axis=(1, 2))
    # A 1x1 conv on a 1x1 map is a dense layer; N(0, 1) biases as in the reference, so
    # that prior and posterior start from different random means.
    out_B2D = nn.Dense(2 * self.latent_dim, kernel_init=backbone_lib.KAIMING_NORMAL,
                       bias_init=nn.initializers.normal(1.0), name="mu_log_sigma")(x_BC)
    return out_B2D[:, :self.latent_dim], out_B2D[:, self.latent_dim:]


class _FeaturesAndLatentDense(nn.Module):
  """Fcomb's first 1x1 conv, on concat([features, z]) without building the concatenation.

  The parameters are those of `nn.Dense(width)` applied to the concatenation (kernel
  (F + D, width), bias (width,)); the output `features @ kernel[:F] + (z @ kernel[F:] +
  bias)` is the same sum, grouped so that the feature term does not depend on z: decoding
  K latents (`jax.vmap` over z) computes it once instead of K times, and z is never
  tiled over H x W. The initialisers default to Fcomb's (orthogonal, tiny truncated
  normal); Pionono's head (`pionono.py`) uses the same layer with its own.
  """
  width: int
  kernel_init: Callable = nn.initializers.orthogonal()
  bias_init: Callable = backbone_lib.tiny_truncated_normal()

  @nn.compact
  def __call__(self, features_BHWF: jax.Array, z: jax.Array) -> jax.Array:
    """z: (B, D) per image, or (B, H, W, D) per pixel."""
    f = features_BHWF.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        (f + z.shape[-1], self.width), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.width,), jnp.float32)
    z_part = z @ kernel[f:] + bias
    if z.ndim == 2:
      z_part = z_part[:, None, None, :]
    return features_BHWF @ kernel[:f] + z_part


# Public name: Pionono's head (`pionono.py`) is built from the same layer.
FeaturesAndLatentDense = _FeaturesAndLatentDense


class Fcomb(nn.Module):
  """Tiles z over H x W, concatenates it after the features and applies 1x1 convs.

  `hidden_layers` 1x1 conv + ReLU of width `width`, then a 1x1 conv to one logit map
  (`last`, kept apart because the weight regulariser skips it). Orthogonal weights.
  The first conv never materialises the tiled concatenation (`_FeaturesAndLatentDense`).
  """
  hidden_layers: int = 3
  width: int = 16

  @nn.compact
  def __call__(self, features_BHWF: jax.Array, z: jax.Array) -> jax.Array:
    """Returns logits (B, H, W); z is (B, D), or (B, H, W, D) for one latent per pixel."""
    if z.ndim not in (2, 4):
      raise ValueError(f"z must be (B, D) or (B, H, W, D), got {z.shape}.")
    # Fcomb is ~1% of the work: float32 even under a bfloat16 backbone keeps z exact.
    features = features_BHWF.astype(jnp.float32)
    z = z.astype(jnp.float32)
    dense = lambda f, name: nn.Dense(f, kernel_init=nn.initializers.orthogonal(),
                                     bias_init=backbone_lib.tiny_truncated_normal(),
                                     name=name)
    x = features
    for i in range(self.hidden_layers):
      if i == 0:
        x = _FeaturesAndLatentDense(self.width, name="hidden_0")(features, z)
      else:
        x = dense(self.width, f"hidden_{i}")(x)
      x = nn.relu(x)
    if self.hidden_layers == 0:  # No hidden layer: `last` sees the concatenation.
      return _FeaturesAndLatentDense(1, name="last")(features, z)[..., 0]
    return dense(1, "last")(x)[..., 0]


class ProbUNet(nn.Module):
  """Backbone, prior, posterior and Fcomb; each method applies only what it needs.

  Attributes:
    backbone_kind: "resnet34" or "unet".
    feature_channels: channels of the backbone's feature map.
    unet_filters: filters of the plain U-Net backbone.
    latent_dim: D.
    gaussian_filters: filters of the prior and posterior encoders.
    convs_per_block: 3x3 convs per prior/posterior (and plain U-Net) level.
    fcomb_layers: hidden 1x1 conv layers of Fcomb.
    posterior_input: "one_random" (image + one mask) or "all" (image + all R masks).
    num_raters: R; sets the posterior's input width when `posterior_input == "all"`.
    dtype: backbone computation dtype.
  """
  backbone_kind: str = "resnet34"
  feature_channels: int = 16
  unet_filters: Sequence[int] = (32, 64, 128, 192)
  unet_batch_norm: bool = False
  latent_dim: int = 6
  gaussian_filters: Sequence[int] = (16, 32, 64, 128, 256)
  convs_per_block: int = 3
  fcomb_layers: int = 3
  posterior_input: str = "one_random"
  num_raters: int = 4
  dtype: Any = jnp.float32

  def setup(self):
    if self.posterior_input not in POSTERIOR_INPUTS:
      raise ValueError(f"posterior_input must be one of {POSTERIOR_INPUTS}, "
                       f"got {self.posterior_input!r}.")
    self.backbone = backbone_lib.build_backbone(
        self.backbone_kind, feature_channels=self.feature_channels,
        unet_filters=self.unet_filters, convs_per_block=self.convs_per_block,
        unet_batch_norm=self.unet_batch_norm,
        dtype=self.dtype)
    gaussian = dict(latent_dim=self.latent_dim, filters=tuple(self.gaussian_filters),
                    convs_per_block=self.convs_per_block)
    self.prior = AxisAlignedGaussian(**gaussian)
    self.posterior = AxisAlignedGaussian(**gaussian)
    self.fcomb = Fcomb(hidden_layers=self.fcomb_layers, width=self.feature_channels)

  @property
  def num_posterior_masks(self) -> int:
    """Mask channels appended to the image at the posterior's input."""
    return 1 if self.posterior_input == "one_random" else self.num_raters

  def features(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
    """Backbone features (B, H, W, feature_channels); run once per image."""
    return self.backbone(x_BHWC, train=train)

  def prior_dist(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mu_BD, log_sigma_BD) of p(z | x)."""
    return self.prior(x_BHWC)

  def posterior_dist(self, x_BHWC: jax.Array,
                     masks_BHWM: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mu_BD, log_sigma_BD) of q(z | x, masks); masks (B, H, W, M), M = 1 or R."""
    if masks_BHWM.shape[-1] != self.num_posterior_masks:
      raise ValueError(f"posterior_input={self.posterior_input!r} expects "
                       f"{self.num_posterior_masks} mask channels, got {masks_BHWM.shape}.")
    x = jnp.concatenate([x_BHWC, masks_BHWM.astype(x_BHWC.dtype)], axis=-1)
    return self.posterior(x)

  def decode(self, features_BHWF: jax.Array, z_BD: jax.Array) -> jax.Array:
    """Logits (B, H, W) of the mask for latent z_BD; applies Fcomb only.

    z may also be (B, H, W, D), one latent per pixel (see `decode_extremes`).
    """
    return self.fcomb(features_BHWF, z_BD)

  def posterior_condition(self, masks_BRHW: jax.Array, rater: jax.Array | int = 0
                          ) -> jax.Array:
    """The posterior's mask input (B, H, W, M) from batch-layout masks (B, R, H, W).

    `one_random`: mask `rater` only; `all`: every mask, channels last.
    """
    if self.posterior_input == "one_random":
      return jnp.take(masks_BRHW, rater, axis=1)[..., None]
    return jnp.moveaxis(masks_BRHW, 1, -1)

  def __call__(self, x_BHWC: jax.Array, masks_BRHW: jax.Array,
               train: bool = False) -> jax.Array:
    """Posterior-mean decode of mask 0; touches every part, which is what `init` needs.

    Args:
      x_BHWC: images.
      masks_BRHW: rater masks in the batch layout (B, R, H, W).
      train: BatchNorm mode.
    """
    features = self.features(x_BHWC, train)
    self.prior_dist(x_BHWC)
    mu, _ = self.posterior_dist(x_BHWC, self.posterior_condition(masks_BRHW))
    return self.decode(features, mu)


def build_model(model_cfg: Mapping[str, Any], num_raters: int,
                in_channels: int | None = None, dtype: Any = jnp.float32) -> ProbUNet:
  """Builds `ProbUNet` from `config.model` and the number of raters R.

  `in_channels` is accepted for symmetry with the data config; Flax takes the input
  width from the arrays given to `init`, so it changes nothing here.
  """
  del in_channels
  return ProbUNet(
      backbone_kind=model_cfg["backbone"],
      feature_channels=int(model_cfg["feature_channels"]),
      unet_filters=tuple(model_cfg["unet_filters"]),
      unet_batch_norm=bool(model_cfg.get("unet_batch_norm", False)),
      latent_dim=int(model_cfg["latent_dim"]),
      gaussian_filters=tuple(model_cfg["gaussian_filters"]),
      convs_per_block=int(model_cfg["convs_per_block"]),
      fcomb_layers=int(model_cfg["fcomb_layers"]),
      posterior_input=model_cfg["posterior_input"],
      num_raters=int(num_raters),
      dtype=dtype)


def init_inputs(model: ProbUNet, *, image_size: int, in_channels: int,
                batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
  """Dummy image (B, H, W, C) and masks (B, R, H, W) for `model.init`."""
  x = jnp.zeros((batch_size, image_size, image_size, in_channels), jnp.float32)
  m = jnp.zeros((batch_size, model.num_raters, image_size, image_size), jnp.float32)
  return x, m


def init_variables(model: ProbUNet, rng: jax.Array, *, image_size: int,
                   in_channels: int) -> dict[str, Any]:
  """Initialises {'params', 'batch_stats'} (batch_stats is {} for the plain U-Net).

  The one initialisation of a Stage-1 model: training, restoring (through
  `jax.eval_shape`) and conversion all start here. Callers jit it (eagerly, Flax
  compiles one RNG kernel per parameter shape).
  """
  x, m = init_inputs(model, image_size=image_size, in_channels=in_channels)
  variables = dict(model.init({"params": rng}, x, m, train=False))
  variables.setdefault("batch_stats", {})
  return variables


def init_from_config(config: Any, rng: jax.Array) -> dict[str, Any]:
  """`init_variables` of the model `config` describes (`build_from_config`)."""
  return init_variables(build_from_config(config), rng, image_size=int(config.data.image_size),
                        in_channels=int(config.data.in_channels))


def build_from_config(config: Any) -> ProbUNet:
  """The Stage-1 model of a whole config (`config.model` and the data's rater count)."""
  return build_model(config.model, num_raters=int(config.data.num_raters),
                     in_channels=int(config.data.in_channels))


def gaussian_sample(mu: jax.Array, log_sigma: jax.Array, eps: jax.Array) -> jax.Array:
  """The reparameterised sample `mu + exp(log_sigma) * eps` (broadcasting).

  Gradients reach mu and sigma (PyTorch's `rsample`). Every latent sample of the
  package, prior or posterior, in training, evaluation and export, is drawn here; the
  callers only choose the noise's shape and key.
  """
  return mu + jnp.exp(log_sigma) * eps


def decode_samples(model: ProbUNet, params: Any, features_BHWF: jax.Array,
                   z_KBD: jax.Array, per_pass: int | None = None) -> jax.Array:
  """Decodes K latents per image with Fcomb only: logits (K, B, H, W).

  The backbone features are computed once by the caller; `jax.vmap` over K runs only
  Fcomb, which is ~1% of the backbone's work per sample, and inside Fcomb only the
  parts that depend on z (the feature term of its first conv is computed once).
  `per_pass` (None: all K at once) decodes that many latents at a time
  (`parallel.map_in_passes`), which keeps a big batch's activations in cache on CPU.
  """
  decode = lambda z_BD: model.apply({"params": params}, features_BHWF, z_BD,
                                    method="decode")
  k = z_KBD.shape[0]
  return parallel.map_in_passes(decode, z_KBD, per_pass or k, k)


def decode_extremes(model: ProbUNet, params: Any, features_BHWF: jax.Array,
                    z_KBD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Element-wise max and min over K of `decode_samples`: (max_BHW, min_BHW).

  The values are exactly `max`/`min` over axis 0 of `decode_samples`. The gradient is
  that of `jnp.max`/`jnp.min` too, which reaches only the winning sample of each pixel,
  but it is computed by decoding that sample's latent once more, per pixel, instead of
  back-propagating through all K maps: 2 decodes per pixel in the backward pass instead
  of K (Fcomb's backward pass dominated the bound loss's cost). Only rounding differs.

  Ties: `jnp.max` splits a tied pixel's gradient evenly between the tied samples; here
  the first of them takes it all. Distinct latents tie only where every unit of Fcomb's
  last hidden layer is zero (the logit is then the bias for all of them), and there
  both rules give the same gradient: the whole of it to `last/bias`, nothing upstream.
  """
  k = z_KBD.shape[0]
  # One latent at a time on CPU: the K decodes' hidden activations (K x B x H x W x 16)
  # then stay in cache instead of streaming through memory.
  per_pass = parallel.items_per_pass(0, k, "num_bound_samples")
  logits_KBHW = jax.lax.stop_gradient(
      decode_samples(model, params, features_BHWF, z_KBD, per_pass))
  out = []
  for reduce, arg in ((jnp.max, jnp.argmax), (jnp.min, jnp.argmin)):
    # Exact selection (1 * z + 0 * others) whose gradient goes back to z_KBD.
    onehot_BHWK = jax.nn.one_hot(arg(logits_KBHW, axis=0), k, dtype=z_KBD.dtype)
    z_BHWD = jnp.einsum("bhwk,kbd->bhwd", onehot_BHWK, z_KBD)
    winner_BHW = model.apply({"params": params}, features_BHWF, z_BHWD, method="decode")
    # The value of the full reduction, the gradient of the re-decoded winner.
    out.append(reduce(logits_KBHW, axis=0)
               + (winner_BHW - jax.lax.stop_gradient(winner_BHW)))
  return out[0], out[1]


def _count(tree: Any) -> int:
  # Leaves may be arrays or jax.ShapeDtypeStruct (from jax.eval_shape).
  return int(sum(np.prod(leaf.shape, dtype=np.int64)
                 for leaf in jax.tree_util.tree_leaves(tree)))


def count_params(params: Mapping[str, Any]) -> dict[str, int]:
  """Parameters per component: backbone, prior, posterior, fcomb, total.

  For the ResNet backbone, also `encoder` and `decoder`. BatchNorm running statistics
  live in `batch_stats` and are not counted.
  """
  counts = {k: _count(params[k]) for k in ("backbone", "prior", "posterior", "fcomb")}
  counts["total"] = _count(params)
  if "encoder" in params["backbone"]:
    counts["encoder"] = _count(params["backbone"]["encoder"])
    counts["decoder"] = _count(params["backbone"]["decoder"])
  return counts

"""Baseline `pionono` (Schmidt et al. 2023), as D-Persona's repository runs it.

Headless U-Net features F (B, H, W, 16); per rater r a Gaussian q_r = N(mu_r, L_r L_r^T)
in R^8, L_r the lower triangle (diagonal included) of a full 8 x 8 parameter; a fixed
prior p = N(0, 4 I) (sigma 2), the same for every rater. Init: mu_r ~ N(0, 8^2) per
coordinate, L_r = 2 I. Head: z tiled over H x W and concatenated after F (24 ch), then
1x1 conv 24 -> 16, ReLU, 1x1 16 -> 16, ReLU, 1x1 16 -> 1 (Xavier-uniform weights, zero
biases). Trainable: backbone 24,429,952 + head 689 + latent 288 (mu 32, full L 256, of
which 176 are used) = 24,430,929. The prior's 288 numbers of the reference (mean and
scale_tril buffers with requires_grad False) are the constants `prior_sigma` here, not
parameters.

Loss (BASELINES.md s3): per image with rater r(b), `train_samples` reparameterised
z ~ q_{r(b)}, the mean of their logit maps (logits, not probabilities), GDL (one channel
+ background) vs a_{r(b)}; + kl_weight * mean_b KL(q_{r(b)} || p) in closed form; +
reg_weight * the sum of the unsquared L2 norms of the first two head convs' weights and
biases. Optimiser groups: backbone and head 1e-4, latent parameters 0.02.
Predictions: for r = 0..R-1, `test_samples` z ~ q_r, mean of logits, sigmoid.

Precision: the reference keeps the latent parameters in float64. JAX's float64 is a
global switch (`jax_enable_x64`) that would change every other computation of a run, so
the latent parameters and the KL are float32 here. The KL is computed from triangular
solves and log|diag L| (no matrix inverse or determinant of L L^T); against a float64
NumPy evaluation it agrees to a relative 2e-6 (3e-7 measured) for means of the initial
spread N(0, 8^2) and diagonals in [0.1, 5] (tests/test_baselines.py); the KL enters the
loss with weight 5e-4.
"""

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from prosona_jax import losses
from prosona_jax.models import baseline_common as common
from prosona_jax.models import prob_unet

DEFAULTS = dict(
    **common.BACKBONE_DEFAULTS,
    latent_dim=8,  # Dimension of each rater's latent Gaussian.
    prior_sigma=2.0,  # Fixed prior N(0, prior_sigma^2 I); also L's initial diagonal.
    posterior_init_sigma=8.0,  # The rater means start at N(0, posterior_init_sigma^2).
    train_samples=5,  # Reparameterised samples per image in the loss (logits averaged).
    test_samples=20,  # Samples per rater at prediction time (logits averaged).
    kl_weight=5e-4,  # Weight of mean_b KL(q_{r(b)} || p).
    reg_weight=1e-5,  # Weight of the head's weight-norm regulariser.
    rater_draw="image",  # image: a random rater per image (as run) | batch: one per batch.
    lr=1e-4,  # Adam learning rate of backbone and head.
    latent_lr=0.02,  # Adam learning rate of the latent parameters (mu, L).
    dice_epsilon=1e-6,  # Clamp of the generalised Dice loss.
)

XAVIER = nn.initializers.xavier_uniform()
REGULARISED = ("hidden_0", "hidden_1")  # The reference's `head.layers`: the first two convs.


class RaterLatents(nn.Module):
  """Per-rater mean (R, D) and full (R, D, D) scale parameter, float32 (module doc)."""
  num_raters: int
  latent_dim: int = 8
  init_sigma: float = 2.0
  mean_init_sigma: float = 8.0

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    """Returns mu (R, D) and the lower-triangular scale L (R, D, D)."""
    r, d = self.num_raters, self.latent_dim
    mu_RD = self.param("mu", nn.initializers.normal(self.mean_init_sigma), (r, d),
                       jnp.float32)
    full_RDD = self.param(
        "scale_tril", lambda key, shape, dtype=jnp.float32: self.init_sigma
        * jnp.broadcast_to(jnp.eye(d, dtype=dtype), shape), (r, d, d), jnp.float32)
    # Only the lower triangle is used (torch.tril in the reference); the upper entries
    # are parameters that never get a gradient.
    return mu_RD, jnp.tril(full_RDD)


class PiononoHead(nn.Module):
  """Tiles z, concatenates it after the features, three 1x1 convs -> logits (B, H, W)."""
  width: int = 16

  @nn.compact
  def __call__(self, features_BHWF: jax.Array, z_BD: jax.Array) -> jax.Array:
    # The concat + first 1x1 conv without materialising the tiled z (prob_unet).
    x = prob_unet.FeaturesAndLatentDense(
        self.width, kernel_init=XAVIER, bias_init=nn.initializers.zeros,
        name="hidden_0")(features_BHWF.astype(jnp.float32), z_BD.astype(jnp.float32))
    x = nn.relu(x)
    x = nn.relu(nn.Dense(self.width, kernel_init=XAVIER, name="hidden_1")(x))
    return nn.Dense(1, kernel_init=XAVIER, name="last")(x)[..., 0]


class PiononoUNet(nn.Module):
  """Backbone, rater latents and head.

  Attributes:
    num_raters: R.
    latent_dim: D (8).
    prior_sigma: the fixed prior's standard deviation and L's initial diagonal.
    posterior_init_sigma: standard deviation of the initial rater means.
    backbone_kind, feature_channels, unet_filters, convs_per_block, unet_batch_norm:
      see `unet_head.UNetWithHead`.
    dtype: backbone computation dtype.
  """
  num_raters: int = 4
  latent_dim: int = 8
  prior_sigma: float = 2.0
  posterior_init_sigma: float = 8.0
  backbone_kind: str = "resnet34"
  feature_channels: int = 16
  unet_filters: Sequence[int] = (32, 64, 128, 192)
  convs_per_block: int = 3
  unet_batch_norm: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.backbone = common.build_backbone(dict(
        backbone=self.backbone_kind, feature_channels=self.feature_channels,
        unet_filters=self.unet_filters, convs_per_block=self.convs_per_block,
        unet_batch_norm=self.unet_batch_norm), self.dtype)
    self.latent = RaterLatents(self.num_raters, self.latent_dim, self.prior_sigma,
                               self.posterior_init_sigma)
    self.head = PiononoHead(self.feature_channels)

  def features(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
    """Backbone features (B, H, W, F); computed once per image."""
    return self.backbone(x_BHWC, train=train)

  def posteriors(self) -> tuple[jax.Array, jax.Array]:
    """mu (R, D) and lower-triangular L (R, D, D) of every rater's q_r."""
    return self.latent()

  def decode(self, features_BHWF: jax.Array, z_BD: jax.Array) -> jax.Array:
    """Logits (B, H, W) for one latent per image; the head only."""
    return self.head(features_BHWF, z_BD)

  def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
    """Decodes rater 0's mean; touches every part, which is what `init` needs."""
    mu_RD, _ = self.posteriors()
    features = self.features(x_BHWC, train)
    return self.decode(features, jnp.broadcast_to(mu_RD[0], (x_BHWC.shape[0],
                                                             self.latent_dim)))


def build_pionono(section: Mapping[str, Any] | None = None, *, num_raters: int = 4,
                  dtype: Any = jnp.float32) -> PiononoUNet:
  """Builds `PiononoUNet` from a config section (see DEFAULTS)."""
  cfg = common.resolve_config(section, DEFAULTS)
  return PiononoUNet(
      num_raters=int(num_raters), latent_dim=int(cfg["latent_dim"]),
      prior_sigma=float(cfg["prior_sigma"]),
      posterior_init_sigma=float(cfg["posterior_init_sigma"]),
      backbone_kind=cfg["backbone"], feature_channels=int(cfg["feature_channels"]),
      unet_filters=tuple(cfg["unet_filters"]), convs_per_block=int(cfg["convs_per_block"]),
      unet_batch_norm=bool(cfg["unet_batch_norm"]), dtype=dtype)


def method_name(model: PiononoUNet) -> str:
  del model
  return "pionono"


def init_variables(model: PiononoUNet, rng: jax.Array, image_size: int, in_channels: int,
                   num_raters: int = 4) -> dict[str, Any]:
  """{'params': {backbone, latent, head}, 'batch_stats'}; the prior is not a variable."""
  if num_raters != model.num_raters:
    raise ValueError(f"model built for {model.num_raters} raters, got {num_raters}.")
  x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
  variables = dict(jax.jit(lambda key: model.init(key, x, False))(rng))
  variables.setdefault("batch_stats", {})
  return variables


def kl_mvn_tril(mu_q_BD: jax.Array, tril_q_BDD: jax.Array, mu_p_BD: jax.Array,
                tril_p_BDD: jax.Array) -> jax.Array:
  """KL(N(mu_q, L_q L_q^T) || N(mu_p, L_p L_p^T)) per row, (B,), closed form.

  0.5 * (||L_p^-1 L_q||_F^2 + ||L_p^-1 (mu_p - mu_q)||^2 - D)
  + sum log|diag L_p| - sum log|diag L_q|  (what torch's `kl_divergence` computes for
  two MultivariateNormals given by `scale_tril`). |diag| keeps the value that of
  N(mu, L L^T) if a diagonal entry changes sign, where PyTorch would reject the scale.
  """
  solve = lambda b: jax.scipy.linalg.solve_triangular(tril_p_BDD, b, lower=True)
  m_BDD = solve(tril_q_BDD)
  diff_BD1 = solve((mu_p_BD - mu_q_BD)[..., None])
  log_det = lambda t: jnp.sum(jnp.log(jnp.abs(jnp.diagonal(t, axis1=-2, axis2=-1))), -1)
  d = mu_q_BD.shape[-1]
  return (0.5 * (jnp.sum(jnp.square(m_BDD), axis=(-2, -1))
                 + jnp.sum(jnp.square(diff_BD1), axis=(-2, -1)) - d)
          + log_det(tril_p_BDD) - log_det(tril_q_BDD))


def prior(model: PiononoUNet, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """The fixed prior N(0, prior_sigma^2 I) as (mu (B, D), L (B, D, D)) constants."""
  d = model.latent_dim
  return (jnp.zeros((batch_size, d), jnp.float32),
          jnp.broadcast_to(model.prior_sigma * jnp.eye(d, dtype=jnp.float32),
                           (batch_size, d, d)))


def sample_latents(rng: jax.Array, mu_BD: jax.Array, tril_BDD: jax.Array,
                   num: int) -> jax.Array:
  """`num` reparameterised samples per row: z = mu + L eps, (num, B, D)."""
  eps_SBD = jax.random.normal(rng, (num,) + mu_BD.shape, mu_BD.dtype)
  return mu_BD + jnp.einsum("bij,sbj->sbi", tril_BDD, eps_SBD)


def mean_logits(model: PiononoUNet, params: Any, features_BHWF: jax.Array,
                z_SBD: jax.Array) -> jax.Array:
  """Mean over S of the head's logit maps, (B, H, W): logits are averaged, not probs."""
  decode = lambda z_BD: model.apply({"params": params}, features_BHWF, z_BD, method="decode")
  return jnp.mean(jax.vmap(decode)(z_SBD), axis=0)


def head_weight_norm(params: Mapping[str, Any]) -> jax.Array:
  """Sum of the unsquared L2 norms of hidden_0 and hidden_1's kernels and biases."""
  return sum(losses.l2_norm(leaf)
             for name in REGULARISED
             for leaf in jax.tree_util.tree_leaves(params["head"][name]))


def loss_fn(params: Any, batch_stats: Any, *, model: PiononoUNet,
            batch: Mapping[str, jax.Array], rng: jax.Array, train: bool = True,
            train_samples: int = 5, kl_weight: float = 5e-4, reg_weight: float = 1e-5,
            rater_draw: str = "image", dice_epsilon: float = 1e-6
            ) -> tuple[jax.Array, tuple[dict, Any]]:
  """GDL(mean_s logits(z_s), a_r) + kl_weight * mean_b KL + reg_weight * ||head||.

  Args:
    params: PiononoUNet params.
    batch_stats: backbone BatchNorm statistics.
    model: the model.
    batch: {'image': (B, H, W, C), 'masks': (B, R, H, W) sorted by area per image}.
    rng: draws the raters and the latent samples.
    train: BatchNorm in training mode (batch statistics, running averages updated).
    train_samples: samples per image whose logits are averaged.
    kl_weight: weight of the KL term.
    reg_weight: weight of `head_weight_norm`.
    rater_draw: "image" or "batch" (`baseline_common.draw_raters`).
    dice_epsilon: see `losses.dice_loss`.

  Returns:
    (loss, (aux, new_batch_stats)); aux: loss, seg, kl, reg, raters (B,).
  """
  masks_BRHW = batch["masks"].astype(jnp.float32)
  b, r = masks_BRHW.shape[:2]
  if r != model.num_raters:
    raise ValueError(f"batch has {r} raters, the model {model.num_raters}.")
  rng_rater, rng_z = jax.random.split(rng)
  rater_B = common.draw_raters(rng_rater, b, r, rater_draw)
  features, new_stats = common.apply_with_stats(
      model, params, batch_stats, batch["image"].astype(jnp.float32), train=train,
      method="features")
  mu_RD, tril_RDD = model.apply({"params": params}, method="posteriors")
  mu_BD, tril_BDD = mu_RD[rater_B], tril_RDD[rater_B]
  z_SBD = sample_latents(rng_z, mu_BD, tril_BDD, train_samples)
  seg = losses.dice_loss(mean_logits(model, params, features, z_SBD),
                         common.take_per_image(masks_BRHW, rater_B), epsilon=dice_epsilon)
  kl = jnp.mean(kl_mvn_tril(mu_BD, tril_BDD, *prior(model, b)))
  reg = head_weight_norm(params)
  loss = seg + kl_weight * kl + reg_weight * reg
  aux = {"loss": loss, "seg": seg, "kl": kl, "reg": reg, "raters": rater_B}
  return loss, (aux, new_stats)


def predict_fn(variables: Mapping[str, Any], image_BHWC: jax.Array, rng: jax.Array, *,
               model: PiononoUNet, test_samples: int = 20) -> jax.Array:
  """(B, R, H, W): for rater r, sigmoid of the mean of `test_samples` logit maps.

  Every image draws its own samples (the reference samples per image).
  """
  params = variables["params"]
  features = model.apply({"params": params, "batch_stats": variables.get("batch_stats", {})},
                         image_BHWC.astype(jnp.float32), False, method="features")
  mu_RD, tril_RDD = model.apply({"params": params}, method="posteriors")
  b = image_BHWC.shape[0]
  probs = []
  for r, key in enumerate(jax.random.split(rng, model.num_raters)):
    mu_BD = jnp.broadcast_to(mu_RD[r], (b, model.latent_dim))
    tril_BDD = jnp.broadcast_to(tril_RDD[r], (b,) + tril_RDD.shape[1:])
    z_SBD = sample_latents(key, mu_BD, tril_BDD, test_samples)
    probs.append(jax.nn.sigmoid(mean_logits(model, params, features, z_SBD)))
  return jnp.stack(probs, axis=1)


def prediction_raters(model: PiononoUNet) -> tuple[int, ...]:
  """Prediction r stands for rater r."""
  return tuple(range(model.num_raters))


def param_labels(params: Mapping[str, Any]) -> dict[str, Any]:
  """'latent' for mu and L, 'backbone' for backbone and head."""
  def group(key: str, tree: Any) -> Any:
    name = "latent" if key == "latent" else "backbone"
    return jax.tree_util.tree_map(lambda _: name, tree)

  return {k: group(k, v) for k, v in params.items()}


def make_optimizer(*, lr: float = DEFAULTS["lr"], latent_lr: float = DEFAULTS["latent_lr"],
                   schedule: Callable[[jax.Array], jax.Array] | None = None
                   ) -> optax.GradientTransformation:
  """Adam: backbone and head at `lr`, latent at `latent_lr`, both times `schedule`."""
  return common.build_optimizer(param_labels, {"backbone": lr, "latent": latent_lr},
                                schedule)

"""Baseline `dpersona`: D-Persona's Stage 2, per-rater projection heads (BASELINES.md s5).

Four heads on the FROZEN Stage-1 model (`prob_unet.ProbUNet`). Head r on the 16-channel
features F: 3x3 conv 16 -> 32, ReLU, Dropout2d(0.1), 3x3 32 -> 32, ReLU, avgpool 2;
3x3 32 -> 16, ReLU, Dropout2d, 3x3 16 -> 16, ReLU, avgpool 2; 3x3 16 -> 6, ReLU,
Dropout2d, 3x3 6 -> 6, ReLU. Every conv pads 3 on each side (not SAME: the maps grow,
128 -> 132 -> 136 -> 68 -> 72 -> 76 -> 38 -> 42 -> 46). The global average is the query
q_r in R^6, >= 0 (ReLU). Kaiming-normal (fan-in) weights, truncated-normal biases (std
1e-3). 22,032 params per head, 88,128 for four, stacked on a leading R axis under the
params key `heads`.

Selection: one bank z_1..z_N per forward, drawn without gradient from the image's prior
N(mu(x), diag sigma^2(x)) and shared by the heads; w_r = softmax_n(<q_r, z_n>) (no
scale, no temperature); z_r = sum_n w_rn z_n; logits_r = Fcomb(F, z_r). N = 100 in
training and validation, 500 at test. Loss: GDL over the R channels (foreground only,
batch-pooled), prediction r vs area-sorted mask r.

Frozen parts: the reference keeps `requires_grad` on the Stage-1 model (backprop runs
through U-Net and Fcomb) but optimises only the heads. Here only the heads are
differentiated (the Stage-1 parameters are a `frozen_params` argument under
`stop_gradient`): the heads' gradients are the same, without the backward pass through
the U-Net. BatchNorm drift (`bn_drift`, off by default): the reference's `net.train()`
puts the Stage-1 U-Net's BatchNorm in training mode, so its forward uses batch
statistics and its running statistics are updated every step (and used at test). With
`bn_drift=True` (and `train=True`) `loss_fn` does the same and returns the updated
batch_stats; otherwise BatchNorm runs on the stored statistics and they come back
unchanged.

Variables: {'params': {'heads': ...}, 'batch_stats': Stage-1 batch_stats,
'frozen_params': Stage-1 params}, the last two in `ProbUNet`'s layout so that a Stage-1
checkpoint plugs in unchanged.
"""

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from prosona_jax import losses
from prosona_jax.models import backbone as backbone_lib
from prosona_jax.models import baseline_common as common
from prosona_jax.models import prob_unet
from prosona_jax.models import prompt as prompt_lib

DEFAULTS = dict(
    filters=(32, 16),  # Widths of the heads' first levels; the last level is latent_dim.
    padding=3,  # Padding of every head conv (the reference's `padding=int(3)`).
    dropout=0.1,  # Dropout2d rate (whole feature maps), active in training only.
    train_samples=100,  # N: prior bank per forward in training (and validation).
    test_samples=500,  # N at test.
    bn_drift=False,  # Stage-1 BatchNorm in training mode in the loss, stats updated (as run).
    lr=1e-4,  # Adam learning rate of the heads.
    dice_epsilon=1e-6,  # Clamp of the generalised Dice loss.
)


class ProjectionHead(nn.Module):
  """One rater's head: features (B, H, W, F) -> query (B, latent_dim), >= 0.

  Attributes:
    filters: widths of the levels before the last; the last level has `latent_dim`.
    latent_dim: D.
    padding: padding of every 3x3 conv.
    dropout: Dropout2d rate after each level's first conv.
  """
  filters: Sequence[int] = (32, 16)
  latent_dim: int = 6
  padding: int = 3
  dropout: float = 0.1

  @nn.compact
  def __call__(self, features_BHWF: jax.Array, train: bool = False) -> jax.Array:
    p = self.padding
    conv = lambda width, name: nn.Conv(
        width, (3, 3), padding=((p, p), (p, p)), kernel_init=backbone_lib.KAIMING_NORMAL,
        bias_init=backbone_lib.tiny_truncated_normal(), name=name)
    x = features_BHWF.astype(jnp.float32)
    for i, width in enumerate(tuple(self.filters) + (self.latent_dim,)):
      if i > 0:
        # PyTorch's AvgPool2d(2, 2) (floor mode): an odd last row/column is dropped.
        x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      x = nn.relu(conv(width, f"level{i}_conv0")(x))
      # Dropout2d: one Bernoulli per image and channel, broadcast over H and W.
      x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train,
                     name=f"level{i}_dropout")(x)
      x = nn.relu(conv(width, f"level{i}_conv1")(x))
    return jnp.mean(x, axis=(1, 2))


class ProjectionHeads(nn.Module):
  """R independent heads (parameters stacked on a leading R axis): queries (B, R, D)."""
  num_heads: int = 4
  filters: Sequence[int] = (32, 16)
  latent_dim: int = 6
  padding: int = 3
  dropout: float = 0.1

  @nn.compact
  def __call__(self, features_BHWF: jax.Array, train: bool = False) -> jax.Array:
    # Not nn.vmap: vmapped convs are grouped convolutions, slow on CPU (`PerRater`).
    heads = common.PerRater(
        ProjectionHead, self.num_heads,
        (("filters", tuple(self.filters)), ("latent_dim", self.latent_dim),
         ("padding", self.padding), ("dropout", self.dropout)), name="per_rater")
    return jnp.moveaxis(heads(features_BHWF, train=train), 0, 1)


@dataclasses.dataclass(frozen=True)
class DPersonaStage2:
  """The frozen Stage-1 model and the trainable heads."""
  stage1: prob_unet.ProbUNet
  heads: ProjectionHeads


def build_dpersona_heads(section: Mapping[str, Any] | None = None, *,
                         stage1: prob_unet.ProbUNet) -> DPersonaStage2:
  """Heads for `stage1` (one per rater, query width = its latent_dim)."""
  cfg = common.resolve_config(section, DEFAULTS)
  heads = ProjectionHeads(num_heads=stage1.num_raters, filters=tuple(cfg["filters"]),
                          latent_dim=stage1.latent_dim, padding=int(cfg["padding"]),
                          dropout=float(cfg["dropout"]))
  return DPersonaStage2(stage1=stage1, heads=heads)


def method_name(model: DPersonaStage2) -> str:
  del model
  return "dpersona"


def init_variables(model: DPersonaStage2, rng: jax.Array, image_size: int,
                   in_channels: int, num_raters: int = 4,
                   stage1_variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """{'params': {'heads'}, 'batch_stats', 'frozen_params'}.

  `stage1_variables` ({'params', 'batch_stats'} of a trained ProbUNet) supplies the frozen
  part; without it the Stage-1 model is initialised from `rng` (tests, demos).
  """
  if num_raters != model.heads.num_heads:
    raise ValueError(f"model built for {model.heads.num_heads} raters, got {num_raters}.")
  rng_heads, rng_stage1 = jax.random.split(rng)
  if stage1_variables is None:
    stage1_variables = prob_unet.init_variables(model.stage1, rng_stage1,
                                                image_size=image_size,
                                                in_channels=in_channels)
  f = jnp.zeros((1, image_size, image_size, model.stage1.feature_channels), jnp.float32)
  heads = jax.jit(lambda key: model.heads.init(key, f, False))(rng_heads)["params"]
  return {"params": {"heads": heads},
          "batch_stats": stage1_variables.get("batch_stats", {}),
          "frozen_params": stage1_variables["params"]}


def prior_bank(model: DPersonaStage2, frozen_params: Any, image_BHWC: jax.Array,
               rng: jax.Array, num_samples: int) -> jax.Array:
  """N samples per image from the frozen prior, (B, N, D), no gradient (`dist.sample`)."""
  mu_BD, log_sigma_BD = model.stage1.apply({"params": frozen_params}, image_BHWC,
                                           method="prior_dist")
  eps_BND = jax.random.normal(rng, (mu_BD.shape[0], num_samples, mu_BD.shape[1]))
  return jax.lax.stop_gradient(mu_BD[:, None] + jnp.exp(log_sigma_BD)[:, None] * eps_BND)


def select_latents(queries_BRD: jax.Array, bank_BND: jax.Array) -> jax.Array:
  """z_r = sum_n softmax_n(<q_r, z_n>) z_n, unscaled: (B, R, D)."""
  z_BRD, _, _ = prompt_lib.prompt_latent(queries_BRD, bank_BND, scale_scores=False)
  return z_BRD


def _forward(params: Any, batch_stats: Any, model: DPersonaStage2, frozen_params: Any,
             image_BHWC: jax.Array, rng: jax.Array, *, num_samples: int, train: bool,
             bn_drift: bool) -> tuple[jax.Array, Any]:
  """Logits (B, R, H, W) of every head and the Stage-1 batch_stats after the forward."""
  frozen_params = jax.lax.stop_gradient(frozen_params)
  rng_bank, rng_dropout = jax.random.split(rng)
  features, new_stats = common.apply_with_stats(
      model.stage1, frozen_params, batch_stats, image_BHWC, train=train and bn_drift,
      method="features")
  features = jax.lax.stop_gradient(features)
  bank_BND = prior_bank(model, frozen_params, image_BHWC, rng_bank, num_samples)
  queries_BRD = model.heads.apply({"params": params["heads"]}, features, train,
                                  rngs={"dropout": rng_dropout})
  z_BRD = select_latents(queries_BRD, bank_BND)
  logits_RBHW = prob_unet.decode_samples(model.stage1, frozen_params, features,
                                         jnp.swapaxes(z_BRD, 0, 1))
  return jnp.swapaxes(logits_RBHW, 0, 1), jax.lax.stop_gradient(new_stats)


def loss_fn(params: Any, batch_stats: Any, *, model: DPersonaStage2,
            batch: Mapping[str, jax.Array], rng: jax.Array, frozen_params: Any,
            train: bool = True, bn_drift: bool = False, train_samples: int = 100,
            dice_epsilon: float = 1e-6) -> tuple[jax.Array, tuple[dict, Any]]:
  """GDL over the R channels (foreground only): logits_r vs sorted mask r.

  Args:
    params: {'heads': ...}, the only trainable tree.
    batch_stats: the Stage-1 model's BatchNorm statistics.
    model: `DPersonaStage2`.
    batch: {'image': (B, H, W, C), 'masks': (B, R, H, W) sorted by area per image}.
    rng: draws the prior bank and the dropout masks.
    frozen_params: the Stage-1 params (no gradient flows into them).
    train: heads' Dropout2d active (and, with `bn_drift`, BatchNorm in training mode).
    bn_drift: reproduce the reference's BatchNorm drift (module doc).
    train_samples: N, the size of the prior bank (100 in training and validation).
    dice_epsilon: see `losses.dice_loss`.

  Returns:
    (loss, (aux, new_batch_stats)); new_batch_stats differ from `batch_stats` only with
    `train and bn_drift`.
  """
  masks_BRHW = batch["masks"].astype(jnp.float32)
  if masks_BRHW.shape[1] != model.heads.num_heads:
    raise ValueError(f"batch has {masks_BRHW.shape[1]} raters, the model "
                     f"{model.heads.num_heads} heads.")
  logits_BRHW, new_stats = _forward(
      params, batch_stats, model, frozen_params, batch["image"].astype(jnp.float32), rng,
      num_samples=train_samples, train=train, bn_drift=bn_drift)
  loss = losses.dice_loss(logits_BRHW, masks_BRHW, channel_axis=1, epsilon=dice_epsilon)
  return loss, ({"loss": loss, "seg": loss}, new_stats)


def predict_fn(variables: Mapping[str, Any], image_BHWC: jax.Array, rng: jax.Array, *,
               model: DPersonaStage2, test_samples: int = 500) -> jax.Array:
  """(B, R, H, W) probabilities in head order; BatchNorm on the stored statistics.

  `test_samples`: N, the prior bank (500 at test; the reference validates with 100).
  """
  logits_BRHW, _ = _forward(variables["params"], variables.get("batch_stats", {}), model,
                            variables["frozen_params"], image_BHWC.astype(jnp.float32), rng,
                            num_samples=test_samples, train=False, bn_drift=False)
  return jax.nn.sigmoid(logits_BRHW)


def prediction_raters(model: DPersonaStage2) -> tuple[int, ...]:
  """Head r stands for rater rank r."""
  return tuple(range(model.heads.num_heads))


def param_labels(params: Mapping[str, Any]) -> Any:
  """One optimiser group, 'heads' (the only trainable parameters)."""
  return jax.tree_util.tree_map(lambda _: "heads", params)


def make_optimizer(*, lr: float = DEFAULTS["lr"],
                   schedule: Callable[[jax.Array], jax.Array] | None = None
                   ) -> optax.GradientTransformation:
  """Adam on the heads at `lr` times `schedule(step)`."""
  return common.build_optimizer(param_labels, {"heads": lr}, schedule)

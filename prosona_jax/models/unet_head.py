"""Baseline `unet`: one U-Net per rater rank (Table 1 rows "U-Net (A1)".."(A4)").

D-Persona's backbone (`backbone.ResNetUNet`, 24,429,952 params) plus smp's segmentation
head, a 3x3 conv 16 -> 1 (pad 1, 145 params): 24,430,097 params for 1-channel input.
Trained with the generalised Dice loss (one channel plus background, `losses.dice_loss`)
on the mask of rater rank `rater` only; predicts N = 1 map per image (BASELINES.md s1).

`num_models > 1` stacks independent U-Nets along a leading parameter axis (model m is
trained on rater m) and runs them with `jax.vmap`, so that the four rows train in one
run on the same batches. Their loss is the sum of the per-model losses: the models share
no parameter, so each gets exactly the gradient it would get alone, and Adam (element-
wise) updates each exactly as in a separate run.
"""

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from prosona_jax import losses
from prosona_jax.models import baseline_common as common

SCORE_AGAINST = ("all", "own")

DEFAULTS = dict(
    **common.BACKBONE_DEFAULTS,
    rater=0,  # Rater rank a (0..R-1) the single model trains on: row "U-Net (A{a+1})".
    num_models=1,  # >1: that many independent U-Nets, model m trained on rater m.
    score_against="all",  # all: the one prediction vs every rater (presumed) | own: vs its rater.
    lr=1e-4,  # Adam learning rate (one group).
    dice_epsilon=1e-6,  # Clamp of the generalised Dice loss.
)

# smp's `initialize_head`: Xavier-uniform weights, zero bias.
HEAD_KERNEL_INIT = nn.initializers.xavier_uniform()


def seg_head(num_classes: int, name: str = "head", dtype: Any = jnp.float32) -> nn.Conv:
  """smp's segmentation head: 3x3 conv 16 -> num_classes, padding 1, no activation."""
  return nn.Conv(num_classes, (3, 3), padding=((1, 1), (1, 1)), kernel_init=HEAD_KERNEL_INIT,
                 bias_init=nn.initializers.zeros, dtype=dtype, name=name)


class UNetWithHead(nn.Module):
  """Backbone + segmentation head -> logits (B, H, W, num_classes).

  Attributes:
    backbone_kind: "resnet34" (the spec) or "unet" (tiny tests).
    feature_channels: channels of the backbone's feature map.
    unet_filters: plain U-Net filters.
    convs_per_block: plain U-Net convs per level.
    unet_batch_norm: plain U-Net BatchNorm.
    num_classes: output channels of the head.
    rater: rater rank the model trains on (single model).
    num_models: independent models stacked on a leading parameter axis (see module doc).
    dtype: backbone computation dtype.
  """
  backbone_kind: str = "resnet34"
  feature_channels: int = 16
  unet_filters: Sequence[int] = (32, 64, 128, 192)
  convs_per_block: int = 3
  unet_batch_norm: bool = False
  num_classes: int = 1
  rater: int = 0
  num_models: int = 1
  dtype: Any = jnp.float32

  def setup(self):
    self.backbone = common.build_backbone(dict(
        backbone=self.backbone_kind, feature_channels=self.feature_channels,
        unet_filters=self.unet_filters, convs_per_block=self.convs_per_block,
        unet_batch_norm=self.unet_batch_norm), self.dtype)
    self.head = seg_head(self.num_classes, "head", self.dtype)

  def features(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
    """Backbone features (B, H, W, F)."""
    return self.backbone(x_BHWC, train=train)

  def __call__(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
    """Logits (B, H, W, num_classes), float32."""
    return self.head(self.features(x_BHWC, train)).astype(jnp.float32)


def build_unet(section: Mapping[str, Any] | None = None, *, num_raters: int = 4,
               dtype: Any = jnp.float32) -> UNetWithHead:
  """Builds the model from a config section (see DEFAULTS); R only bounds `rater`."""
  cfg = common.resolve_config(section, DEFAULTS)
  num_models, rater = int(cfg["num_models"]), int(cfg["rater"])
  if not 0 <= rater < num_raters:
    raise ValueError(f"rater must be in 0..{num_raters - 1}, got {rater}.")
  if not 1 <= num_models <= num_raters:
    raise ValueError(f"num_models must be in 1..{num_raters}, got {num_models}.")
  if cfg["score_against"] not in SCORE_AGAINST:
    raise ValueError(f"score_against must be one of {SCORE_AGAINST}.")
  return UNetWithHead(
      backbone_kind=cfg["backbone"], feature_channels=int(cfg["feature_channels"]),
      unet_filters=tuple(cfg["unet_filters"]), convs_per_block=int(cfg["convs_per_block"]),
      unet_batch_norm=bool(cfg["unet_batch_norm"]), rater=rater, num_models=num_models,
      dtype=dtype)


def method_name(model: UNetWithHead) -> str:
  """"unet_a{rater + 1}" for one model (the table's "U-Net (A1)".."(A4)"), "unet" for a stack."""
  return "unet" if model.num_models > 1 else f"unet_a{model.rater + 1}"


def model_raters(model: UNetWithHead) -> tuple[int, ...]:
  """The rater each model trains on: (rater,) for one model, (0, .., M-1) for a stack."""
  return (model.rater,) if model.num_models == 1 else tuple(range(model.num_models))


def init_variables(model: UNetWithHead, rng: jax.Array, image_size: int,
                   in_channels: int, num_raters: int = 4) -> dict[str, Any]:
  """{'params', 'batch_stats'}; with `num_models > 1` every leaf has a leading M axis."""
  del num_raters  # The head is rater-independent; the rater lives in the model.
  x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)

  def init_one(key):
    variables = dict(model.init(key, x, False))
    variables.setdefault("batch_stats", {})
    return variables

  if model.num_models == 1:
    return jax.jit(init_one)(rng)
  return jax.jit(jax.vmap(init_one))(jax.random.split(rng, model.num_models))


def _logits(model: UNetWithHead, params: Any, batch_stats: Any, image_BHWC: jax.Array,
            train: bool) -> tuple[jax.Array, Any]:
  """Logits (M, B, H, W) of every model (M = 1 unstacked) and the new batch_stats."""
  apply = lambda p, s: common.apply_with_stats(model, p, s, image_BHWC, train=train)
  if model.num_models == 1:
    logits_BHWC, stats = apply(params, batch_stats)
    return logits_BHWC[None, ..., 0], stats
  logits_MBHWC, stats = jax.vmap(apply)(params, batch_stats)
  return logits_MBHWC[..., 0], stats


def loss_fn(params: Any, batch_stats: Any, *, model: UNetWithHead,
            batch: Mapping[str, jax.Array], rng: jax.Array | None = None, train: bool = True,
            dice_epsilon: float = 1e-6) -> tuple[jax.Array, tuple[dict, Any]]:
  """GDL (one channel + background) of each model vs its rater's mask; sum over models.

  Args:
    params: model params (leading M axis when stacked).
    batch_stats: BatchNorm statistics, same layout.
    model: the U-Net.
    batch: {'image': (B, H, W, C), 'masks': (B, R, H, W) sorted by area per image}.
    rng: unused (the rater is fixed, nothing is sampled); kept for the common signature.
    train: BatchNorm in training mode (batch statistics, running averages updated).
    dice_epsilon: see `losses.dice_loss`.

  Returns:
    (loss, (aux, new_batch_stats)); aux has the loss and, when stacked, `loss_m{m}`.
  """
  del rng
  logits_MBHW, new_stats = _logits(model, params, batch_stats,
                                   batch["image"].astype(jnp.float32), train)
  masks_BRHW = batch["masks"].astype(jnp.float32)
  targets_MBHW = jnp.stack([masks_BRHW[:, r] for r in model_raters(model)])
  per_model_M = jax.vmap(lambda lg, t: losses.dice_loss(lg, t, epsilon=dice_epsilon))(
      logits_MBHW, targets_MBHW)
  loss = jnp.sum(per_model_M)
  aux = {"loss": loss, "seg": loss}
  if model.num_models > 1:
    aux.update({f"loss_m{m}": per_model_M[m] for m in range(model.num_models)})
  return loss, (aux, new_stats)


def predict_fn(variables: Mapping[str, Any], image_BHWC: jax.Array,
               rng: jax.Array | None = None, *, model: UNetWithHead) -> jax.Array:
  """Foreground probabilities (B, M, H, W): N = 1 per model (M = 1 unstacked).

  With a stack, slice [:, m:m + 1] is model m's single prediction (its own table row).
  """
  del rng
  logits_MBHW, _ = _logits(model, variables["params"], variables.get("batch_stats", {}),
                           image_BHWC.astype(jnp.float32), False)
  return jnp.moveaxis(jax.nn.sigmoid(logits_MBHW), 0, 1)


def prediction_raters(model: UNetWithHead, score_against: str = "all"
                      ) -> tuple[int | None, ...]:
  """Rater of each model's single prediction: None = scored against all raters.

  "all" (default, presumed for the published rows): `(None,)` per model; "own": the
  rater the model trained on. Index m of the result is model m's prediction.
  """
  if score_against not in SCORE_AGAINST:
    raise ValueError(f"score_against must be one of {SCORE_AGAINST}, got {score_against!r}.")
  raters = model_raters(model)
  return (None,) * len(raters) if score_against == "all" else raters


def param_labels(params: Any) -> Any:
  """One optimiser group: every parameter is 'backbone' (backbone and head)."""
  return jax.tree_util.tree_map(lambda _: "backbone", params)


def make_optimizer(*, lr: float = DEFAULTS["lr"],
                   schedule: Callable[[jax.Array], jax.Array] | None = None
                   ) -> optax.GradientTransformation:
  """Adam at `lr` times `schedule(step)` (see `baseline_common.build_optimizer`)."""
  return common.build_optimizer(param_labels, {"backbone": lr}, schedule)

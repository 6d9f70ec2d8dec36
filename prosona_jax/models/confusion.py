"""Baselines `cm_global` (Tanno et al. 2019) and `cm_pixel` (Zhang et al. 2020).

As D-Persona's repository runs them (BASELINES.md s2): the U-Net with head gives logits y
with C = 1 channel; each rater r has a confusion-matrix field M_r, positive by softplus:
- global: one learnable C x C matrix per rater, initialised to the identity (before the
  softplus), the same at every pixel: 4 params for C = 1, R = 4;
- pixel: a head on the 16-channel decoder features, 4 x [3x3 conv 16 -> 16 without bias,
  InstanceNorm (affine), PReLU (1 param)], then a 1x1 conv 16 -> C^2 with bias: 9,365
  params per rater.
Each column of M_r is normalised to sum 1 (M~_r) and the noisy prediction is
p~_r = M~_r y per pixel. Loss: GDL(p~_{r(b)}, a_{r(b)}) -/+ alpha * T with
T = (1 / BHW) sum_{b,h,w} tr(M~_{r(b)}); as run, `min_trace=False`, so the trace is
subtracted. Optimiser groups: backbone and segmentation head 1e-4, CM heads 1e-2.
Totals for 1-channel input and R = 4: 24,430,101 (global), 24,467,557 (pixel).

With C = 1 (`num_classes=1`, the default, as run) the model is degenerate: M~ = M / M = 1
exactly, so p~ = y, T = 1, the loss is GDL(y) - 1, the CM parameters get (numerically)
no gradient and the R predictions are identical. That is reproduced exactly, for the
table. `num_classes=2` is the meaningful variant, a different baseline (method name
"cm_global_2class" / "cm_pixel_2class"): y = softmax over (background, foreground)
logits, p~_r = M~_r y is a proper noisy-label distribution, and the loss is the same
generalised Dice (background + foreground channels) on those probabilities. The trace
sign stays an option (`min_trace`; Tanno et al. minimise it, D-Persona's run maximises it).
"""

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from prosona_jax import losses
from prosona_jax.models import baseline_common as common
from prosona_jax.models import unet_head

LEVELS = ("global", "pixel")

DEFAULTS = dict(
    **common.BACKBONE_DEFAULTS,
    level="global",  # global (Tanno 2019, one matrix per rater) | pixel (Zhang 2020, a head).
    num_classes=1,  # 1: as D-Persona runs it (degenerate no-op) | 2: softmax two-class variant.
    alpha=1.0,  # Weight of the trace term.
    min_trace=False,  # False: trace subtracted (as run) | True: added (Tanno's minimisation).
    rater_draw="image",  # image: a random rater per image (as run) | batch: one per batch.
    lr=1e-4,  # Adam learning rate of the backbone and segmentation head.
    cm_lr=1e-2,  # Adam learning rate of the confusion-matrix parameters.
    dice_epsilon=1e-6,  # Clamp of the generalised Dice loss.
)

# PyTorch's default Conv2d initialisation (kaiming_uniform_ with a = sqrt(5)), which the
# reference's CM heads keep: weights U(+-sqrt(1 / fan_in)), biases U(+-1 / sqrt(fan_in)).
TORCH_CONV_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int) -> Callable:
  """PyTorch's default conv bias: uniform in +-1 / sqrt(fan_in)."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class GlobalCM(nn.Module):
  """R learnable C x C matrices, identity at initialisation; softplus -> positive.

  Returns (R, 1, 1, 1, C, C): broadcast over batch and pixels, like the reference's
  `repeat` over B, H, W.
  """
  num_raters: int
  num_classes: int

  @nn.compact
  def __call__(self, features_BHWF: jax.Array) -> jax.Array:
    del features_BHWF  # Global matrices do not look at the image.
    c = self.num_classes
    eye = lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(jnp.eye(c, dtype=dtype), shape)
    w_RCC = self.param("matrices", eye, (self.num_raters, c, c), jnp.float32)
    return jax.nn.softplus(w_RCC)[:, None, None, None]


class PixelCMHead(nn.Module):
  """One rater's confusion-matrix field (B, H, W, C, C), positive by softplus.

  Entry [i, j] is output channel i * C + j of the last conv (PyTorch's row-major `view`).
  """
  num_classes: int
  width: int = 16
  num_blocks: int = 4

  @nn.compact
  def __call__(self, features_BHWF: jax.Array) -> jax.Array:
    x = features_BHWF.astype(jnp.float32)
    for i in range(self.num_blocks):
      x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=TORCH_CONV_KERNEL_INIT, name=f"conv{i}")(x)
      # PyTorch's InstanceNorm2d: per image and channel over H x W, biased variance,
      # eps 1e-5, no running statistics (so no train/eval difference).
      x = nn.InstanceNorm(epsilon=1e-5, name=f"norm{i}")(x)
      x = nn.PReLU(negative_slope_init=0.25, name=f"prelu{i}")(x)
    c = self.num_classes
    x = nn.Conv(c * c, (1, 1), kernel_init=TORCH_CONV_KERNEL_INIT,
                bias_init=torch_conv_bias_init(self.width), name="last")(x)
    return jax.nn.softplus(x).reshape(x.shape[:-1] + (c, c))


class ConfusionUNet(nn.Module):
  """U-Net with head (logits y) and R confusion-matrix fields.

  Attributes:
    level: "global" or "pixel".
    num_classes: C (1 as run; 2 for the softmax variant).
    num_raters: R.
    backbone_kind, feature_channels, unet_filters, convs_per_block, unet_batch_norm:
      see `unet_head.UNetWithHead`.
    dtype: backbone computation dtype.
  """
  level: str = "global"
  num_classes: int = 1
  num_raters: int = 4
  backbone_kind: str = "resnet34"
  feature_channels: int = 16
  unet_filters: Sequence[int] = (32, 64, 128, 192)
  convs_per_block: int = 3
  unet_batch_norm: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    if self.level not in LEVELS:
      raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}.")
    self.backbone = common.build_backbone(dict(
        backbone=self.backbone_kind, feature_channels=self.feature_channels,
        unet_filters=self.unet_filters, convs_per_block=self.convs_per_block,
        unet_batch_norm=self.unet_batch_norm), self.dtype)
    self.head = unet_head.seg_head(self.num_classes, "head", self.dtype)
    if self.level == "global":
      self.cm_heads = GlobalCM(self.num_raters, self.num_classes)
    else:
      # One head per rater, parameters stacked on a leading R axis (not nn.vmap: see
      # `PerRater`, vmapped convs are grouped convolutions, slow on CPU).
      self.cm_heads = common.PerRater(
          PixelCMHead, self.num_raters,
          (("num_classes", self.num_classes), ("width", self.feature_channels)))

  def __call__(self, x_BHWC: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns logits y (B, H, W, C) and the positive, unnormalised matrices.

    The matrices are (R, B, H, W, C, C) for "pixel" and (R, 1, 1, 1, C, C) for "global".
    """
    features = self.backbone(x_BHWC, train=train)
    logits = self.head(features).astype(jnp.float32)
    return logits, self.cm_heads(features)


def method_name(model: ConfusionUNet) -> str:
  """"cm_global" / "cm_pixel" as run; "_2class" appended for the softmax variant."""
  return f"cm_{model.level}" + ("" if model.num_classes == 1 else f"_{model.num_classes}class")


def build_confusion(section: Mapping[str, Any] | None = None, *, num_raters: int = 4,
                    dtype: Any = jnp.float32) -> ConfusionUNet:
  """Builds `ConfusionUNet` from a config section (see DEFAULTS)."""
  cfg = common.resolve_config(section, DEFAULTS)
  if cfg["level"] not in LEVELS:
    raise ValueError(f"level must be one of {LEVELS}, got {cfg['level']!r}.")
  if int(cfg["num_classes"]) not in (1, 2):
    raise ValueError(f"num_classes must be 1 (as run) or 2, got {cfg['num_classes']}.")
  return ConfusionUNet(
      level=cfg["level"], num_classes=int(cfg["num_classes"]), num_raters=int(num_raters),
      backbone_kind=cfg["backbone"], feature_channels=int(cfg["feature_channels"]),
      unet_filters=tuple(cfg["unet_filters"]), convs_per_block=int(cfg["convs_per_block"]),
      unet_batch_norm=bool(cfg["unet_batch_norm"]), dtype=dtype)


def build_cm_global(section: Mapping[str, Any] | None = None, **kwargs) -> ConfusionUNet:
  """`build_confusion` with level "global"."""
  return build_confusion({**dict(section or {}), "level": "global"}, **kwargs)


def build_cm_pixel(section: Mapping[str, Any] | None = None, **kwargs) -> ConfusionUNet:
  """`build_confusion` with level "pixel"."""
  return build_confusion({**dict(section or {}), "level": "pixel"}, **kwargs)


def init_variables(model: ConfusionUNet, rng: jax.Array, image_size: int, in_channels: int,
                   num_raters: int = 4) -> dict[str, Any]:
  """{'params': {backbone, head, cm_heads}, 'batch_stats'}."""
  if num_raters != model.num_raters:
    raise ValueError(f"model built for {model.num_raters} raters, got {num_raters}.")
  x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
  variables = dict(jax.jit(lambda key: model.init(key, x, False))(rng))
  variables.setdefault("batch_stats", {})
  return variables


def normalise_columns(cm_CC: jax.Array) -> jax.Array:
  """M / (column sums): every column sums to 1 (the reference's `cm.sum(1)`)."""
  return cm_CC / jnp.sum(cm_CC, axis=-2, keepdims=True)


def noisy_prediction(model: ConfusionUNet, logits_BHWC: jax.Array,
                     cm_norm_BHWCC: jax.Array) -> jax.Array:
  """p~ = M~ y per pixel, (B, H, W, C).

  C = 1: y is the logits (as run: the matrix multiplies logits, the loss applies the
  sigmoid). C = 2: y is the softmax over the two classes, so p~ is a distribution.
  """
  y = logits_BHWC if model.num_classes == 1 else jax.nn.softmax(logits_BHWC, axis=-1)
  return jnp.einsum("...ij,...j->...i", cm_norm_BHWCC, y)


def _rater_matrices(model: ConfusionUNet, cm_R: jax.Array, rater_B: jax.Array) -> jax.Array:
  """Each image's rater's matrices: (R, B|1, H|1, W|1, C, C) -> (B, H|1, W|1, C, C)."""
  if model.level == "global":  # The same matrix for every image of a rater.
    return cm_R[rater_B, 0]
  return common.take_per_image(jnp.moveaxis(cm_R, 0, 1), rater_B)


def _dice(model: ConfusionUNet, noisy_BHWC: jax.Array, target_BHW: jax.Array,
          epsilon: float) -> jax.Array:
  if model.num_classes == 1:  # Logits: the sigmoid GDL with its background channel.
    return losses.dice_loss(noisy_BHWC[..., 0], target_BHW, epsilon=epsilon)
  target_BHW2 = jnp.stack([1.0 - target_BHW, target_BHW], axis=-1)
  return losses.dice_loss_probs(noisy_BHWC, target_BHW2, channel_axis=-1, epsilon=epsilon)


def loss_fn(params: Any, batch_stats: Any, *, model: ConfusionUNet,
            batch: Mapping[str, jax.Array], rng: jax.Array, train: bool = True,
            alpha: float = 1.0, min_trace: bool = False, rater_draw: str = "image",
            dice_epsilon: float = 1e-6) -> tuple[jax.Array, tuple[dict, Any]]:
  """GDL(p~_{r(b)}, a_{r(b)}) - alpha * T (`+` with `min_trace`).

  Args:
    params: ConfusionUNet params.
    batch_stats: backbone BatchNorm statistics.
    model: the model.
    batch: {'image': (B, H, W, C), 'masks': (B, R, H, W) sorted by area per image}.
    rng: draws the rater per image (or per batch, `rater_draw`).
    train: BatchNorm in training mode (batch statistics, running averages updated).
    alpha: weight of the trace term.
    min_trace: add the trace (Tanno's minimisation) instead of subtracting it (as run).
    rater_draw: "image" or "batch" (`baseline_common.draw_raters`).
    dice_epsilon: see `losses.dice_loss`.

  Returns:
    (loss, (aux, new_batch_stats)); aux: loss, seg (the GDL), trace T, raters (B,).
  """
  masks_BRHW = batch["masks"].astype(jnp.float32)
  b, r = masks_BRHW.shape[:2]
  if r != model.num_raters:
    raise ValueError(f"batch has {r} raters, the model {model.num_raters}.")
  rater_B = common.draw_raters(rng, b, r, rater_draw)
  (logits_BHWC, cm_R), new_stats = common.apply_with_stats(
      model, params, batch_stats, batch["image"].astype(jnp.float32), train=train)
  cm_norm = normalise_columns(_rater_matrices(model, cm_R, rater_B))
  noisy_BHWC = noisy_prediction(model, logits_BHWC, cm_norm)
  seg = _dice(model, noisy_BHWC, common.take_per_image(masks_BRHW, rater_B), dice_epsilon)
  # (1 / BHW) sum_{b,h,w} tr(M~): a global matrix is the same at every pixel, so the
  # pixel mean of its trace is the trace itself.
  trace = jnp.mean(jnp.broadcast_to(jnp.trace(cm_norm, axis1=-2, axis2=-1),
                                    logits_BHWC.shape[:3]))
  loss = seg + (alpha if min_trace else -alpha) * trace
  aux = {"loss": loss, "seg": seg, "trace": trace, "raters": rater_B}
  return loss, (aux, new_stats)


def predict_fn(variables: Mapping[str, Any], image_BHWC: jax.Array,
               rng: jax.Array | None = None, *, model: ConfusionUNet) -> jax.Array:
  """Foreground probabilities (B, R, H, W): prediction r is the noisy prediction of rater r.

  C = 1: sigmoid(p~_r) (identical for every r, as run); C = 2: p~_r's foreground entry.
  """
  del rng
  logits_BHWC, cm_R = model.apply(
      {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})},
      image_BHWC.astype(jnp.float32), False)
  b = logits_BHWC.shape[0]
  probs = []
  for r in range(model.num_raters):
    cm_norm = normalise_columns(_rater_matrices(model, cm_R, jnp.full((b,), r)))
    noisy_BHWC = noisy_prediction(model, logits_BHWC, cm_norm)
    probs.append(jax.nn.sigmoid(noisy_BHWC[..., 0]) if model.num_classes == 1
                 else noisy_BHWC[..., 1])
  return jnp.stack(probs, axis=1)


def prediction_raters(model: ConfusionUNet) -> tuple[int, ...]:
  """Prediction r stands for rater r."""
  return tuple(range(model.num_raters))


def param_labels(params: Mapping[str, Any]) -> dict[str, Any]:
  """'cm' for the confusion-matrix parameters, 'backbone' for backbone and head."""
  def group(key: str, tree: Any) -> Any:
    name = "cm" if key == "cm_heads" else "backbone"
    return jax.tree_util.tree_map(lambda _: name, tree)

  return {k: group(k, v) for k, v in params.items()}


def make_optimizer(*, lr: float = DEFAULTS["lr"], cm_lr: float = DEFAULTS["cm_lr"],
                   schedule: Callable[[jax.Array], jax.Array] | None = None
                   ) -> optax.GradientTransformation:
  """Adam: backbone and head at `lr`, CM parameters at `cm_lr`, both times `schedule`."""
  return common.build_optimizer(param_labels, {"backbone": lr, "cm": cm_lr}, schedule)

"""Pieces shared by the Table-1 baselines (BASELINES.md): config, raters, optimiser.

Every baseline module (`unet_head`, `confusion`, `pionono`, `dpersona_heads`) exposes the
same functions: `build_<name>`, `init_variables`, `loss_fn`, `predict_fn`,
`prediction_raters`, `param_labels` and `make_optimizer`. What they share lives here.
"""

import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prosona_jax.models import backbone as backbone_lib

RATER_DRAWS = ("image", "batch")

# Backbone fields every baseline with its own U-Net reads from its config section.
BACKBONE_DEFAULTS = dict(
    backbone="resnet34",  # resnet34 (D-Persona's U-Net) | unet (plain U-Net, tiny tests).
    feature_channels=16,  # Channels of the full-resolution feature map.
    unet_filters=(32, 64, 128, 192),  # Filters of the plain U-Net backbone.
    convs_per_block=3,  # 3x3 convs per plain U-Net level.
    unet_batch_norm=False,  # BatchNorm in the plain U-Net.
)


def resolve_config(section: Mapping[str, Any] | None, defaults: Mapping[str, Any]
                   ) -> dict[str, Any]:
  """`defaults` overridden by `section` (a dict or an ml_collections ConfigDict).

  A key of `section` that is not in `defaults` is an error: a misspelt option would
  otherwise be ignored silently.
  """
  out = dict(defaults)
  if section is None:
    return out
  items = section.items() if hasattr(section, "items") else dict(section).items()
  for key, value in items:
    if key not in defaults:
      raise ValueError(f"Unknown baseline option {key!r}; known: {sorted(defaults)}.")
    out[key] = value
  return out


def kwargs_for(fn: Callable, section: Mapping[str, Any] | None,
               defaults: Mapping[str, Any]) -> dict[str, Any]:
  """The resolved config fields that are keyword parameters of `fn`.

  E.g. `functools.partial(pionono.loss_fn, model=model, **kwargs_for(pionono.loss_fn,
  section, pionono.DEFAULTS))`: config names and keyword names are the same throughout.
  """
  cfg = resolve_config(section, defaults)
  names = inspect.signature(fn).parameters
  return {k: v for k, v in cfg.items() if k in names}


def build_backbone(cfg: Mapping[str, Any], dtype: Any = jnp.float32) -> nn.Module:
  """The backbone named by `cfg['backbone']` with the BACKBONE_DEFAULTS fields."""
  return backbone_lib.build_backbone(
      cfg["backbone"], feature_channels=int(cfg["feature_channels"]),
      unet_filters=tuple(cfg["unet_filters"]), convs_per_block=int(cfg["convs_per_block"]),
      unet_batch_norm=bool(cfg["unet_batch_norm"]), dtype=dtype)


class PerRater(nn.Module):
  """`num` independent copies of a module, parameters stacked on a leading axis.

  What `nn.vmap(head_cls, variable_axes={"params": 0}, in_axes=None)` computes, as a
  fully unrolled `nn.scan`: vmapping convolutions over their kernels makes XLA emit
  grouped convolutions, which XLA:CPU runs 10-40x slower than the same convolutions one
  after the other (measured: four CM-Pixel heads at 64 x 64, batch 8, forward and
  backward: vmap 21-29 s, unrolled scan 1.4 s, a Python loop 1.1-1.5 s). Outputs are
  stacked on axis 0; each copy draws its own `params` and `dropout` randomness.

  Attributes:
    head_cls: the module class of one copy (named `head` inside).
    num: number of copies.
    head_kwargs: its constructor arguments, as (name, value) pairs.
  """
  head_cls: Any
  num: int
  head_kwargs: tuple = ()

  @nn.compact
  def __call__(self, *args, **static):
    """Applies every copy to the same `args`; `static` keywords (e.g. `train`) too."""
    def body(module, carry, *xs):
      return carry, module(*xs, **static)

    scan = nn.scan(body, variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                   length=self.num, unroll=self.num)
    _, ys = scan(self.head_cls(**dict(self.head_kwargs), name="head"), None, *args)
    return ys


def draw_raters(rng: jax.Array, batch_size: int, num_raters: int,
                rater_draw: str = "image") -> jax.Array:
  """Rater index per image, (B,) int32, uniform over 0..R-1.

  "image": one independent draw per image (D-Persona's `train.py` for the baselines);
  "batch": one draw for the whole batch (D-Persona's Stage 1 protocol).
  """
  if rater_draw == "image":
    return jax.random.randint(rng, (batch_size,), 0, num_raters)
  if rater_draw == "batch":
    return jnp.full((batch_size,), jax.random.randint(rng, (), 0, num_raters))
  raise ValueError(f"rater_draw must be one of {RATER_DRAWS}, got {rater_draw!r}.")


def take_per_image(x_BR: jax.Array, rater_B: jax.Array) -> jax.Array:
  """x[b, rater_B[b]] for every b: (B, R, ...) -> (B, ...)."""
  idx = rater_B.reshape((-1,) + (1,) * (x_BR.ndim - 1))
  return jnp.take_along_axis(x_BR, idx, axis=1)[:, 0]


def apply_with_stats(module: nn.Module, params: Any, batch_stats: Any, *args,
                     train: bool, method: Any = None) -> tuple[Any, Any]:
  """Applies `module` with BatchNorm in training (updated stats returned) or eval mode.

  `train` is passed as the last positional argument. Returns (output, new_batch_stats);
  in eval mode the statistics come back unchanged.
  """
  variables = {"params": params, "batch_stats": batch_stats}
  if train:
    out, updates = module.apply(variables, *args, True, method=method,
                                mutable=["batch_stats"])
    return out, updates.get("batch_stats", batch_stats)
  return module.apply(variables, *args, False, method=method), batch_stats


def count(tree: Any) -> int:
  """Number of scalars in a tree of arrays or `jax.ShapeDtypeStruct`s."""
  return int(sum(np.prod(leaf.shape, dtype=np.int64)
                 for leaf in jax.tree_util.tree_leaves(tree)))


def cosine_per_epoch(epochs: int, steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """D-Persona's CosineAnnealingLR (T_max = epochs, eta_min 0) as a multiplier of each lr.

  PyTorch steps it once per epoch, so the factor is constant within an epoch; with
  eta_min = 0 it scales every parameter group by the same factor.
  """
  def factor(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs)
    return 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  return factor


def build_optimizer(labels: Any, group_lrs: Mapping[str, float],
                    schedule: Callable[[jax.Array], jax.Array] | None = None
                    ) -> optax.GradientTransformation:
  """Adam per optimiser group (PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, no decay).

  Args:
    labels: pytree of group names matching the params, or a function params -> that
      pytree (e.g. a baseline's `param_labels`); see `optax.multi_transform`.
    group_lrs: learning rate of every group named in `labels`.
    schedule: step -> multiplier applied to every group's rate (None: constant 1), as
      PyTorch's schedulers scale each group's own initial rate.
  """
  schedule = schedule or (lambda step: jnp.ones((), jnp.float32))

  def adam(lr: float) -> optax.GradientTransformation:
    # Adam is element-wise, so one Adam per group is one Adam with per-group rates.
    return optax.adam(lambda step: lr * schedule(step))

  return optax.multi_transform({g: adam(float(lr)) for g, lr in group_lrs.items()}, labels)

"""Optimizers and learning-rate schedules of the stages and methods.

Every stage's config section names its `lr`, `epochs` and `schedule`; the schedules are
stepped per epoch, as the reference code steps PyTorch's schedulers once per epoch, so
the rate is constant within an epoch.
"""

from typing import Callable

import jax.numpy as jnp
import optax

from prosona_jax.errors import ConfigError

SCHEDULES = ("constant", "cosine")


def schedule(stage_cfg, steps_per_epoch: int, lr: float | None = None
             ) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """The learning rate at a step: constant (ProSona) or cosine over epochs (D-Persona).

  D-Persona steps PyTorch's CosineAnnealingLR once per epoch (T_max = epochs,
  eta_min = 0); we reproduce that rather than a per-step cosine.
  """
  lr = float(stage_cfg.lr if lr is None else lr)
  epochs = int(stage_cfg.epochs)
  kind = stage_cfg.schedule
  if kind == "constant":
    return lambda step: jnp.asarray(lr, jnp.float32)
  if kind == "cosine":
    def cosine(step):
      epoch = jnp.minimum(step // steps_per_epoch, epochs)
      return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
    return cosine
  raise ConfigError(f"schedule={kind!r}: expected one of {SCHEDULES}")


def adam(stage_cfg, steps_per_epoch: int
         ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """Adam with the stage's schedule, and the rate at a step as a float (for logging)."""
  fn = schedule(stage_cfg, steps_per_epoch)
  return optax.adam(fn), lambda step: float(fn(step))

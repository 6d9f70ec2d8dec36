"""The Table-1 baselines with a U-Net of their own, as Methods: unet, cm_*, pionono.

Each wraps one building block of `models/` (`unet_head`, `confusion`, `pionono`; every
one has `DEFAULTS`, `build_*`, `init_variables`, `loss_fn`, `predict_fn`,
`prediction_raters` and `make_optimizer`) in the shared protocol: one loop
(`trainer.fit` through `run.train_stage`), checkpoints, resume, NaN stop, model
selection and the evaluator.

Options come from the method's config section (`config.unet`, `config.cm_global`, ...;
the fields of the module's `DEFAULTS`) and the backbone from the shared `config.model`
(`backbone`, `feature_channels`, `unet_filters`, `convs_per_block`, `unet_batch_norm`),
so a baseline runs on the same backbone as ProSona's Stage 1: the ResNet-34 U-Net of
the spec, or the plain U-Net of the CPU demo. `model.pretrained_encoder` starts the
ResNet-34 encoder from ImageNet weights as it does for Stage 1.

The learning rates of a module's optimiser groups are the section's (`lr`, `cm_lr`,
`latent_lr`); `schedule=cosine` scales every group by D-Persona's per-epoch cosine, as
PyTorch's scheduler scales each group's own rate.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prosona_jax import metrics
from prosona_jax import parallel
from prosona_jax import trainer
from prosona_jax.errors import ConfigError
from prosona_jax.methods import base
from prosona_jax.models import baseline_common as common
from prosona_jax.models import confusion
from prosona_jax.models import pionono
from prosona_jax.models import unet_head

BACKBONE_FIELDS = tuple(common.BACKBONE_DEFAULTS)


def module_options(config, section: str, defaults: dict) -> dict[str, Any]:
  """A module's options: its DEFAULTS, the section's fields of the same name, and the
  backbone fields from `config.model`."""
  cfg = config[section]
  out = {k: cfg[k] for k in defaults if k in cfg and k not in BACKBONE_FIELDS}
  out.update({k: config.model[k] for k in BACKBONE_FIELDS if k in defaults})
  return common.resolve_config(out, defaults)


def scalar_metrics(aux: dict) -> dict:
  """The logged metrics: scalars only (e.g. not the per-image rater draws)."""
  return {k: v for k, v in aux.items() if jnp.ndim(v) == 0}


def lr_factor(stage_cfg, steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """Multiplier of every group's rate: 1, or D-Persona's per-epoch cosine."""
  if stage_cfg.schedule == "cosine":
    return common.cosine_per_epoch(int(stage_cfg.epochs), steps_per_epoch)
  if stage_cfg.schedule == "constant":
    return lambda step: jnp.ones((), jnp.float32)
  raise ConfigError(f"schedule={stage_cfg.schedule!r}: expected constant or cosine.")


def trainable_count(params: Any, tx: optax.GradientTransformation) -> int:
  """Parameters the optimizer updates: those it keeps Adam moments for (half of them).

  Counted on shapes only (`jax.eval_shape`): a frozen part routed to `set_to_zero`
  (TAB's stem) has no moments, so this checks the optimizer rather than restating it.
  """
  state = jax.eval_shape(tx.init, params)
  moments = sum(int(np.prod(leaf.shape, dtype=np.int64))
                for leaf in jax.tree_util.tree_leaves(state) if len(leaf.shape) > 0)
  return moments // 2


def make_step(loss_fn: Callable, tx: optax.GradientTransformation, base_rng: jax.Array
              ) -> Callable[[trainer.TrainState, dict], tuple[trainer.TrainState, dict]]:
  """The un-jitted `(state, batch) -> (state, metrics)` of a `loss_fn(params,
  batch_stats, *, batch, rng) -> (loss, (aux, batch_stats))` (benchmarks lower it)."""
  def step(state: trainer.TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch=batch, rng=rng)
    return trainer.apply_update(state, grads, loss, tx, batch_stats), scalar_metrics(aux)
  return step


def jit_step(step: Callable, mesh) -> base.TrainStep:
  """The compiled step: batch sharded over `data`, state replicated and donated."""
  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl),
                 donate_argnums=(0,))


class Baseline(base.Method):
  """A baseline on a building block of `models/` (see the module doc)."""

  module: ClassVar[Any]  # The models/ module.
  builder: ClassVar[Callable]  # Its `build_*`.

  def __init__(self, fold: base.Fold, **kwargs):
    super().__init__(fold, **kwargs)
    self.options = self.module_options(self.config)
    self.model = self.build(self.config)

  # ---------------------------------------------------------------- model
  @classmethod
  def module_options(cls, config) -> dict[str, Any]:
    return module_options(config, cls.section, cls.module.DEFAULTS)

  @classmethod
  def build(cls, config):
    return cls.builder(cls.module_options(config), num_raters=int(config.data.num_raters))

  @classmethod
  def init_variables(cls, model, config, rng: jax.Array) -> dict:
    return cls.module.init_variables(model, rng, int(config.data.image_size),
                                     int(config.data.in_channels),
                                     int(config.data.num_raters))

  @classmethod
  def build_optimizer(cls, config, steps_per_epoch: int
                      ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    stage_cfg = config[cls.section]
    factor = lr_factor(stage_cfg, steps_per_epoch)
    options = {**cls.module_options(config), "lr": float(stage_cfg.lr)}
    tx = cls.module.make_optimizer(schedule=factor,
                                   **common.kwargs_for(cls.module.make_optimizer, options,
                                                       cls.module.DEFAULTS))
    return tx, lambda step: float(stage_cfg.lr * factor(step))

  @classmethod
  def param_counts(cls, config) -> dict[str, int]:
    model = cls.build(config)
    shapes = jax.eval_shape(lambda r: cls.init_variables(model, config, r),
                            jax.random.key(0))
    params = shapes["params"]
    counts = {k: common.count(v) for k, v in params.items()}
    counts["total"] = common.count(params)
    counts["trainable"] = trainable_count(params, cls.build_optimizer(config, 1)[0])
    return counts

  # ---------------------------------------------------------------- training
  def make_optimizer(self):
    return self.build_optimizer(self.config, self.steps_per_epoch)

  def init_state(self, tx):
    def init(rng):
      variables = self.init_variables(self.model, self.config, rng)
      return trainer.TrainState.create(variables["params"], tx, variables["batch_stats"])

    state = jax.jit(init, out_shardings=parallel.replicated(self.mesh))(self.init_rng)
    path = self.config.model.pretrained_encoder
    if path:
      from prosona_jax.models import pretrained  # pylint: disable=g-import-not-at-top
      params, batch_stats = pretrained.load_resnet34_encoder(
          path, jax.device_get(state.params), jax.device_get(state.batch_stats),
          in_channels=self.config.data.in_channels)
      state = parallel.replicate(trainer.TrainState.create(params, tx, batch_stats), self.mesh)
    return state

  @classmethod
  def make_loss_fn(cls, model, config) -> Callable:
    """`loss_fn(params, batch_stats, *, batch, rng)` of the module with the options."""
    return functools.partial(
        cls.module.loss_fn, model=model, train=True,
        **common.kwargs_for(cls.module.loss_fn, cls.module_options(config),
                            cls.module.DEFAULTS))

  def make_train_step(self, tx):
    return jit_step(make_step(self.make_loss_fn(self.model, self.config), tx,
                              self.step_rng), self.mesh)

  # ---------------------------------------------------------------- evaluation
  def make_predict_fn(self):
    predict = functools.partial(
        self.module.predict_fn, model=self.model,
        **common.kwargs_for(self.module.predict_fn, self.options, self.module.DEFAULTS))

    def fn(params, batch_stats, image, rng):
      return predict({"params": params, "batch_stats": batch_stats}, image, rng)

    repl, data = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
    jitted = jax.jit(fn, in_shardings=(repl, repl, data, repl), out_shardings=repl)
    return lambda state, image, rng: jitted(state.params, state.batch_stats, image, rng)

  @property
  def prediction_raters(self):
    return tuple(self.module.prediction_raters(self.model))

  def result_fields(self) -> dict:
    return {"num_predictions": len(self.prediction_raters)}


# -------------------------------------------------------------------- unet


class UNet(Baseline):
  """One U-Net trained on the masks of one rater rank (`config.rater`): row "U-Net (A{r+1})".

  With `config.rater=-1` the method has one stage per rater (`unet_a1`..`unet_a4`), the
  four rows in one run, trained one after the other.
  """

  name = "unet"
  section = "unet"
  module = unet_head
  builder = staticmethod(unet_head.build_unet)
  rater: ClassVar[int] = 0

  @classmethod
  def module_options(cls, config) -> dict[str, Any]:
    return {**super().module_options(config), "rater": cls.rater, "num_models": 1}

  @property
  def prediction_raters(self):
    return tuple(unet_head.prediction_raters(self.model, self.options["score_against"]))

  def score(self, labels, probs):
    """Against every rater (default) or its own only; plus its Dice with every rater."""
    convention = self.config.eval.convention
    own = self.options["score_against"] == "own"
    result = metrics.score(labels[:, self.rater:self.rater + 1] if own else labels, probs,
                           convention=convention)
    result["mean"]["prediction_rater_dice"] = base.prediction_rater_dice(labels, probs,
                                                                         convention)
    return result

  def result_fields(self) -> dict:
    return {**super().result_fields(), "rater": self.rater,
            "score_against": self.options["score_against"]}


def unet_stage(rater: int) -> type[UNet]:
  """The U-Net stage of one rater rank (a class: stages are classes)."""
  return type(f"UNetA{rater + 1}", (UNet,), {"name": f"unet_a{rater + 1}", "rater": rater})


def unet_stages(config) -> tuple[type[UNet], ...]:
  """`config.rater` = r: the stage of rater r; -1: every rater's, in rank order."""
  num_raters, rater = int(config.data.num_raters), int(config.rater)
  if rater == -1:
    return tuple(unet_stage(r) for r in range(num_raters))
  if not 0 <= rater < num_raters:
    raise ConfigError(f"config.rater={rater}: expected 0..{num_raters - 1}, or -1 for "
                      "every rater.")
  return (unet_stage(rater),)


# -------------------------------------------------------------------- confusion matrices


class _Confusion(Baseline):
  """Confusion-matrix baselines: as run (C = 1, degenerate) or `num_classes=2`."""

  module = confusion

  @classmethod
  def stage_name(cls, config) -> str:
    # The two-class variant is a different baseline: its files and rows say so.
    c = int(config[cls.section].num_classes)
    return cls.name if c == 1 else f"{cls.name}_{c}class"

  @property
  def method_name(self) -> str:
    return self.name


class CMGlobal(_Confusion):
  """CM-Global (Tanno et al. 2019): one confusion matrix per rater."""
  name = "cm_global"
  section = "cm_global"
  builder = staticmethod(confusion.build_cm_global)


class CMPixel(_Confusion):
  """CM-Pixel (Zhang et al. 2020): a confusion-matrix head per rater."""
  name = "cm_pixel"
  section = "cm_pixel"
  builder = staticmethod(confusion.build_cm_pixel)


# -------------------------------------------------------------------- pionono


class Pionono(Baseline):
  """Pionono (Schmidt et al. 2023): per-rater Gaussians in an 8-d latent, fixed prior."""
  name = "pionono"
  section = "pionono"
  module = pionono
  builder = staticmethod(pionono.build_pionono)

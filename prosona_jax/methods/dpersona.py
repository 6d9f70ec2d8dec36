"""Baseline `dpersona`: D-Persona's Stage 2 (per-rater projection heads) as a Method.

The method's stages are ProSona's Stage 1 (`prosona_stage1.Stage1`, the same frozen
latent space ProSona's Stage 2 uses) and this stage, so the table compares the two
Stage-2 designs on one Stage 1. The heads (`models/dpersona_heads.py`) are the only
trainable tree; the Stage-1 parameters are read params-only (`prosona_stage2.load_frozen`,
from `dpersona.init_from`, default this run's Stage 1, its selected state when model
selection kept one) and passed into every step as an argument.

The Stage-1 BatchNorm statistics live in the state's `batch_stats`: unchanged by
default, updated every step with `dpersona.bn_drift=True` (the reference's `net.train()`),
and then checkpointed and used at test, as the reference does. Validation (and model
selection, by Dice Match) draws a prior bank of `train_samples` (100), the test
`test_samples` (500).
"""

from __future__ import annotations

import functools
import os

from absl import logging
import jax

from prosona_jax import layout
from prosona_jax import parallel
from prosona_jax import trainer
from prosona_jax.methods import base
from prosona_jax.methods import baselines
from prosona_jax.methods import prosona_stage2
from prosona_jax.models import baseline_common as common
from prosona_jax.models import dpersona_heads
from prosona_jax.models import prob_unet


def init_dir(config, workdir: str, fold: int) -> str:
  """The Stage-1 checkpoints the heads sit on: `dpersona.init_from` (`{fold}` expanded)
  or this run's own Stage 1."""
  if config.dpersona.init_from:
    return config.dpersona.init_from.format(fold=fold)
  return layout.checkpoint_dir(workdir, fold, "stage1")


def options(config) -> dict:
  return {k: config.dpersona[k] for k in dpersona_heads.DEFAULTS}


def build(config) -> dpersona_heads.DPersonaStage2:
  return dpersona_heads.build_dpersona_heads(options(config),
                                             stage1=prob_unet.build_from_config(config))


def make_step(model: dpersona_heads.DPersonaStage2, config, tx, base_rng):
  """The un-jitted `(state, batch, frozen_params) -> (state, metrics)`."""
  loss = functools.partial(
      dpersona_heads.loss_fn, model=model, train=True,
      **common.kwargs_for(dpersona_heads.loss_fn, options(config), dpersona_heads.DEFAULTS))

  def step(state, batch, frozen_params):
    return baselines.make_step(functools.partial(loss, frozen_params=frozen_params), tx,
                               base_rng)(state, batch)
  return step


class DPersonaStage(base.Method):
  """Four projection heads choosing latents from a prior bank of the frozen Stage 1."""

  name = "dpersona"
  section = "dpersona"
  select_metric = "dice_match"

  def __init__(self, fold: base.Fold, **kwargs):
    super().__init__(fold, **kwargs)
    self.options = options(self.config)
    self.model = build(self.config)
    self.init_dir = init_dir(self.config, fold.workdir, fold.fold)
    self.frozen = prosona_stage2.load_frozen(self.config, self.init_dir, self.mesh)
    logging.info("%s/fold%d: heads on the Stage-1 model of %s.", self.name, fold.fold,
                 self.init_dir)

  @classmethod
  def param_counts(cls, config) -> dict[str, int]:
    """The heads (88,128 for four raters): what this stage adds to the Stage-1 model."""
    model = build(config)
    size, c = int(config.data.image_size), model.stage1.feature_channels
    shapes = jax.eval_shape(lambda r: model.heads.init(
        r, jax.numpy.zeros((1, size, size, c)), False), jax.random.key(0))
    params = {"heads": shapes["params"]}
    heads = common.count(params)
    trainable = baselines.trainable_count(
        params, dpersona_heads.make_optimizer(lr=float(config.dpersona.lr)))
    return {"heads": heads, "total": heads, "trainable": trainable}

  # ---------------------------------------------------------------- training
  def make_optimizer(self):
    factor = baselines.lr_factor(self.cfg, self.steps_per_epoch)
    tx = dpersona_heads.make_optimizer(lr=float(self.cfg.lr), schedule=factor)
    return tx, lambda step: float(self.cfg.lr * factor(step))

  def init_state(self, tx):
    variables = dpersona_heads.init_variables(
        self.model, self.init_rng, int(self.config.data.image_size),
        int(self.config.data.in_channels), int(self.config.data.num_raters),
        stage1_variables=jax.device_get(self.frozen))
    return parallel.replicate(trainer.TrainState.create(
        variables["params"], tx, variables["batch_stats"]), self.mesh)

  def make_train_step(self, tx):
    step = make_step(self.model, self.config, tx, self.step_rng)
    repl, data = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
    jitted = jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                     donate_argnums=(0,))
    return lambda state, batch: jitted(state, batch, self.frozen["params"])

  # ---------------------------------------------------------------- evaluation
  def _predict_fn(self, num_samples: int):
    model = self.model

    def fn(params, batch_stats, frozen_params, image, rng):
      return dpersona_heads.predict_fn(
          {"params": params, "batch_stats": batch_stats, "frozen_params": frozen_params},
          image, rng, model=model, test_samples=num_samples)

    repl, data = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
    jitted = jax.jit(fn, in_shardings=(repl, repl, repl, data, repl), out_shardings=repl)
    return lambda state, image, rng: jitted(state.params, state.batch_stats,
                                            self.frozen["params"], image, rng)

  def make_predict_fn(self):
    return self._predict_fn(int(self.cfg.test_samples))

  def make_validation_predict_fn(self):
    return self._predict_fn(int(self.cfg.train_samples))

  @property
  def prediction_raters(self):
    return tuple(dpersona_heads.prediction_raters(self.model))

  def result_fields(self) -> dict:
    return {"num_predictions": len(self.prediction_raters),
            "num_samples": int(self.cfg.test_samples), "bn_drift": bool(self.cfg.bn_drift),
            "init_from": os.fspath(self.init_dir)}

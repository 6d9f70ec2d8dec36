"""Baseline `tab` (Liao et al., MICCAI 2023) as a Method: `models/tab.py` in the protocol.

The encoder is torchvision's ResNet-34 with every BatchNorm frozen (statistics and
affine in the `buffers` collection, ImageNet values with `model.pretrained_encoder`) and
its stem and layer1 convs frozen: they are parameters (counted, as in the reference)
that the optimizer routes to `set_to_zero`, so they get no update and no Adam moments.
The train state keeps the two non-parameter collections together in its `batch_stats`
field, `{"buffers": ..., "batch_stats": ...}`, so checkpoints and resume need nothing
new; only the mask head's BatchNorm statistics change in training.

Optimiser: TAB's own (Adam 5e-5, no weight decay, poly decay lr (1 - epoch / E)^0.9;
the defaults) or the LIDC protocol's (`--config.tab.lr=1e-4 --config.tab.schedule=cosine`).
Predictions: the N = R rater queries' means (sigmoid), in rank order; the consensus
query is not a prediction. H and W must be multiples of 32.
"""

from __future__ import annotations

import functools

import jax

from prosona_jax import parallel
from prosona_jax import trainer
from prosona_jax.errors import ConfigError
from prosona_jax.methods import base
from prosona_jax.methods import baselines
from prosona_jax.models import tab as tab_lib


def options(config) -> dict:
  """The model and optimiser fields of `config.tab` (the fields of `tab.DEFAULTS`)."""
  return {k: config.tab[k] for k in tab_lib.DEFAULTS}


def build(config) -> tab_lib.TAB:
  size = int(config.data.image_size)
  if size % 32:
    raise ConfigError(f"method tab needs data.image_size divisible by 32, got {size}.")
  return tab_lib.build_tab(options(config), num_raters=int(config.data.num_raters))


def init_variables(model: tab_lib.TAB, config, rng: jax.Array) -> dict:
  return tab_lib.init_variables(model, rng, int(config.data.image_size),
                                int(config.data.in_channels))


def build_optimizer(config, steps_per_epoch: int):
  """(optimizer, lr at a step): TAB's Adam with the frozen convs masked out."""
  opts, epochs = options(config), int(config.tab.epochs)
  schedule = tab_lib.make_schedule(opts, steps_per_epoch, epochs)
  return (tab_lib.make_optimizer(opts, steps_per_epoch, epochs),
          lambda step: float(schedule(step)))


def loss_fn(model: tab_lib.TAB, config):
  """`loss_fn(params, collections, *, batch, rng)` in training mode."""
  return functools.partial(tab_lib.loss_fn, model=model, train=True,
                           lam=float(config.tab.lam))


class TAB(base.Method):
  """TAB: ResNet-34 + DETR transformer + low-rank Gaussian heads, Q = 1 + R queries."""

  name = "tab"
  section = "tab"

  def __init__(self, fold: base.Fold, **kwargs):
    super().__init__(fold, **kwargs)
    self.model = build(self.config)

  @classmethod
  def param_counts(cls, config) -> dict[str, int]:
    model = build(config)
    shapes = jax.eval_shape(lambda r: init_variables(model, config, r), jax.random.key(0))
    counts = tab_lib.count_params(shapes, bool(config.tab.freeze_stem_layer1))
    # What the optimizer really updates (the leaves it keeps Adam moments for) must be
    # what the mask says; report the optimizer's count.
    updated = baselines.trainable_count(shapes["params"], build_optimizer(config, 1)[0])
    if updated != counts["trainable"]:
      raise RuntimeError(f"TAB's optimizer updates {updated} parameters, its mask says "
                         f"{counts['trainable']}.")
    return {k: v for k, v in counts.items() if k not in ("buffers", "batch_stats")}

  def make_optimizer(self):
    return build_optimizer(self.config, self.steps_per_epoch)

  def init_state(self, tx):
    def variables_of(rng):
      return init_variables(self.model, self.config, rng)

    def create(variables):
      collections = {"buffers": variables["buffers"],
                     "batch_stats": variables.get("batch_stats", {})}
      return trainer.TrainState.create(variables["params"], tx, collections)

    repl = parallel.replicated(self.mesh)
    path = self.config.model.pretrained_encoder
    if not path:
      return jax.jit(lambda r: create(variables_of(r)), out_shardings=repl)(self.init_rng)
    variables = tab_lib.load_pretrained_encoder(
        path, jax.device_get(jax.jit(variables_of)(self.init_rng)))
    return parallel.replicate(create(variables), self.mesh)

  def make_train_step(self, tx):
    return baselines.jit_step(
        baselines.make_step(loss_fn(self.model, self.config), tx, self.step_rng), self.mesh)

  def make_predict_fn(self):
    model = self.model

    def fn(params, collections, image):
      return tab_lib.predict_fn({"params": params, **collections}, image, model=model)

    repl, data = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
    jitted = jax.jit(fn, in_shardings=(repl, repl, data), out_shardings=repl)
    # Deterministic: the rater means, no sample.
    return lambda state, image, rng: jitted(state.params, state.batch_stats, image)

  @property
  def prediction_raters(self):
    return tuple(range(int(self.config.data.num_raters)))

  def result_fields(self) -> dict:
    return {"num_predictions": len(self.prediction_raters)}

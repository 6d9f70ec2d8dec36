"""ProSona's Stage 1: the Probabilistic U-Net latent space of annotation styles.

The model is `models.prob_unet.ProbUNet`, the loss `losses.stage1_loss`. Its predictions
for scoring are `eval.num_samples` masks decoded from prior samples (the backbone runs
once per image; only Fcomb runs per sample).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from prosona_jax import figures
from prosona_jax import losses
from prosona_jax import parallel
from prosona_jax import trainer
from prosona_jax.errors import ConfigError
from prosona_jax.errors import UserError
from prosona_jax.methods import base
from prosona_jax.models import prob_unet


def make_sampler(model: prob_unet.ProbUNet, mesh, num_samples: int):
  """Compiled `(params, batch_stats, image_BHWC, rng) -> probs_BNHW` from the prior.

  The backbone runs once per image; only Fcomb runs per sample: all N at once on
  accelerators, one at a time on CPU, where N x B full-size decodes at once outgrow the
  caches (`prob_unet.decode_samples`).
  """
  def sample(params, batch_stats, image, rng):
    variables = {"params": params, "batch_stats": batch_stats}
    feats = model.apply(variables, image, train=False, method=model.features)
    mu_BD, log_sigma_BD = model.apply(variables, image, method=model.prior_dist)
    eps_NBD = jax.random.normal(rng, (num_samples,) + mu_BD.shape, mu_BD.dtype)
    z_NBD = prob_unet.gaussian_sample(mu_BD, log_sigma_BD, eps_NBD)
    per_pass = parallel.items_per_pass(0, num_samples, "num_samples")
    logits_NBHW = prob_unet.decode_samples(model, params, feats, z_NBD, per_pass)
    return jax.nn.sigmoid(jnp.swapaxes(logits_NBHW, 0, 1))

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(sample, in_shardings=(repl, repl, data, repl), out_shardings=repl)


def loss_options(config) -> dict:
  """Keyword options of `losses.stage1_loss` from `config.stage1` and `config.model`."""
  s1 = config.stage1
  return dict(posterior_input=config.model.posterior_input,
              num_bound_samples=s1.num_bound_samples, bound_weight=s1.bound_weight,
              kl_weight=s1.kl_weight, reg_weight=s1.reg_weight, seg_latent=s1.seg_latent,
              bound_form=s1.bound_form, reg_include_biases=s1.reg_include_biases,
              dice_epsilon=s1.dice_epsilon)


def init_state(model: prob_unet.ProbUNet, config, tx, mesh, rng: jax.Array
               ) -> trainer.TrainState:
  """A fresh Stage-1 state, initialised directly replicated on the mesh."""
  def init(rng):
    variables = prob_unet.init_variables(model, rng, image_size=config.data.image_size,
                                         in_channels=config.data.in_channels)
    return trainer.TrainState.create(variables["params"], tx, variables["batch_stats"])

  state = jax.jit(init, out_shardings=parallel.replicated(mesh))(rng)
  if config.model.pretrained_encoder:
    from prosona_jax.models import pretrained  # pylint: disable=g-import-not-at-top
    params, batch_stats = pretrained.load_resnet34_encoder(
        config.model.pretrained_encoder, jax.device_get(state.params),
        jax.device_get(state.batch_stats), in_channels=config.data.in_channels)
    state = parallel.replicate(trainer.TrainState.create(params, tx, batch_stats), mesh)
  return state


def check_pretrained_encoder(config) -> None:
  """Refuses a `model.pretrained_encoder` that Stage 1 could not read, before training.

  Reads only what is cheap: that the file opens, its suffix, a safetensors header with
  `conv1.weight`, and that torch is importable for `.pth` files.
  """
  path = config.model.pretrained_encoder
  if not path:
    return
  flag = "--config.model.pretrained_encoder"
  if config.model.backbone != "resnet34":
    raise ConfigError(f"{flag}={path}: ImageNet weights apply to the resnet34 backbone only "
                      f"(config.model.backbone is {config.model.backbone!r}).")
  if not os.path.isfile(path):
    raise UserError(f"{flag}={path}: no such file (a torchvision ResNet-34 state dict, "
                    ".safetensors or .pth; `python -m prosona_jax.convert` makes one).")
  try:
    with open(path, "rb") as f:
      f.read(1)
  except OSError as e:
    raise UserError(f"{flag}={path}: cannot be read ({e.strerror or e}).") from e
  if path.endswith(".safetensors"):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    try:
      with safe_open(path, "np") as f:
        keys = set(f.keys())
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"{flag}={path}: not a readable safetensors file ({e}).") from e
    if "conv1.weight" not in keys:
      raise UserError(f"{flag}={path}: holds no tensor 'conv1.weight'; expected a "
                      "torchvision ResNet-34 state dict.")
  elif path.endswith((".pth", ".pt")):
    if importlib.util.find_spec("torch") is None:
      raise UserError(f"{flag}={path}: reading .pth files needs torch; install it or "
                      "convert the file to .safetensors.")
  else:
    raise UserError(f"{flag}={path}: expected a .safetensors or .pth file.")


def make_train_step(model: prob_unet.ProbUNet, tx, config, mesh, base_rng: jax.Array
                    ) -> base.TrainStep:
  """The compiled step: batch sharded over `data`, state replicated and donated."""
  loss_fn = functools.partial(losses.stage1_loss, model=model, train=True,
                              **loss_options(config))

  def step(state: trainer.TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch=batch, rng=rng)
    new_state = trainer.apply_update(state, grads, loss, tx, batch_stats)
    return new_state, {"loss": loss, **aux}

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl),
                 donate_argnums=(0,))


class Stage1(base.Method):
  """The Probabilistic U-Net (backbone, prior, posterior, Fcomb), trained from scratch
  (or from ImageNet encoder weights, `model.pretrained_encoder`)."""

  name = "stage1"
  section = "stage1"
  log_val_images = True
  # No selection unless asked (`eval.select_on`): earlier runs and the demo keep their
  # numbers; with selection, the baselines' metric.
  default_select_on = "last"

  @classmethod
  def param_counts(cls, config) -> dict[str, int]:
    """backbone, prior, posterior, fcomb, total (+ encoder, decoder); all trained."""
    shapes = jax.eval_shape(lambda r: prob_unet.init_from_config(config, r),
                            jax.random.key(0))
    counts = prob_unet.count_params(shapes["params"])
    return {**counts, "trainable": counts["total"]}

  def __init__(self, fold: base.Fold, **kwargs):
    super().__init__(fold, **kwargs)
    self.model = prob_unet.build_from_config(self.config)

  @classmethod
  def preflight(cls, config, workdir, *, run_stages=(), dir_name=None) -> None:
    del workdir, run_stages, dir_name
    check_pretrained_encoder(config)

  def init_state(self, tx):
    return init_state(self.model, self.config, tx, self.mesh, self.init_rng)

  def make_train_step(self, tx):
    return make_train_step(self.model, tx, self.config, self.mesh, self.step_rng)

  def make_predict_fn(self):
    sample = make_sampler(self.model, self.mesh, self.config.eval.num_samples)
    return lambda state, image, rng: sample(state.params, state.batch_stats, image, rng)

  @property
  def prediction_raters(self):
    return (None,) * int(self.config.eval.num_samples)

  def result_fields(self) -> dict:
    return {"num_samples": int(self.config.eval.num_samples)}

  def figures(self, state, test: base.TestOutput, eval_dir: str) -> None:
    if jax.process_index() != 0:
      return
    fold, n = self.fold, self.config.eval.num_images_logged
    images = np.stack([fold.source[int(i)]["image"] for i in fold.split.test[:n]])
    figures.samples_panel(images, test.labels, test.probs, test.keys,
                          os.path.join(eval_dir, f"stage1_samples_fold{fold.fold}.png"),
                          rater_names=self.config.data.rater_names,
                          order_raters_by_area=self.config.data.order_raters_by_area)

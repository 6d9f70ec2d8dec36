"""Stage 1: the Probabilistic U-Net latent space of annotation styles.

Builds the state, the compiled data-parallel train step and the prior sampler used for
validation and test scoring. The loop itself is `trainer.fit`.
"""

import functools
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from prosona_jax import losses
from prosona_jax import parallel
from prosona_jax import trainer
from prosona_jax.models import prob_unet


def make_optimizer(stage_cfg: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """Adam with the stage's schedule: constant (paper) or cosine over epochs (D-Persona).

  D-Persona steps PyTorch's CosineAnnealingLR once per epoch, so the rate is constant
  within an epoch; we reproduce that rather than a per-step cosine.
  """
  lr, epochs = float(stage_cfg.lr), int(stage_cfg.epochs)
  if stage_cfg.schedule == "constant":
    schedule = lambda step: jnp.asarray(lr, jnp.float32)
  elif stage_cfg.schedule == "cosine":
    def schedule(step):
      epoch = jnp.minimum(step // steps_per_epoch, epochs)
      return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  else:
    raise ValueError(f"schedule={stage_cfg.schedule!r}: expected 'constant' or 'cosine'")
  return optax.adam(schedule), lambda step: float(schedule(step))


def example_inputs(config: ml_collections.ConfigDict, batch: int = 1):
  s, c, r = config.data.image_size, config.data.in_channels, config.data.num_raters
  return jnp.zeros((batch, s, s, c), jnp.float32), jnp.zeros((batch, r, s, s), jnp.float32)


def build_model(config: ml_collections.ConfigDict):
  return prob_unet.build_model(config.model, num_raters=config.data.num_raters,
                               in_channels=config.data.in_channels)


def init_state(model, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               mesh, rng: jax.Array) -> trainer.TrainState:
  """Initialises parameters directly replicated on the mesh (no host round trip)."""
  image, masks = example_inputs(config)

  def init(rng):
    variables = model.init({"params": rng, "sample": rng}, image, masks, train=False)
    return trainer.TrainState.create(variables["params"], tx, variables.get("batch_stats", {}))

  state = jax.jit(init, out_shardings=parallel.replicated(mesh))(rng)
  if config.model.pretrained_encoder:
    from prosona_jax.models import pretrained  # pylint: disable=g-import-not-at-top
    params, batch_stats = pretrained.load_resnet34_encoder(
        config.model.pretrained_encoder, jax.device_get(state.params),
        jax.device_get(state.batch_stats), in_channels=config.data.in_channels)
    state = parallel.replicate(trainer.TrainState.create(params, tx, batch_stats), mesh)
  return state


def make_train_step(model, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    mesh, base_rng: jax.Array):
  """The compiled step: batch sharded over `data`, state replicated and donated."""
  s1 = config.stage1
  loss_fn = functools.partial(
      losses.stage1_loss, model=model, posterior_input=config.model.posterior_input,
      num_bound_samples=s1.num_bound_samples, bound_weight=s1.bound_weight,
      kl_weight=s1.kl_weight, reg_weight=s1.reg_weight, train=True,
      seg_latent=s1.seg_latent, bound_form=s1.bound_form,
      reg_include_biases=s1.reg_include_biases, dice_epsilon=s1.dice_epsilon)

  def step(state: trainer.TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch=batch, rng=rng)
    new_state = trainer.apply_update(state, grads, loss, tx, batch_stats)
    return new_state, {"loss": loss, **aux}

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def make_sampler(model, mesh, num_samples: int):
  """Compiled `(params, batch_stats, image_BHWC, rng) -> probs_BNHW` from the prior.

  The backbone runs once per image; only Fcomb runs per sample (vmapped over N).
  """
  def sample(params, batch_stats, image, rng):
    variables = {"params": params, "batch_stats": batch_stats}
    feats = model.apply(variables, image, train=False, method=model.features)
    mu_BD, log_sigma_BD = model.apply(variables, image, method=model.prior_dist)
    eps_NBD = jax.random.normal(rng, (num_samples,) + mu_BD.shape, mu_BD.dtype)
    z_NBD = mu_BD + jnp.exp(log_sigma_BD) * eps_NBD
    decode = lambda z: model.apply(variables, feats, z, method=model.decode)
    logits_NBHW = jax.vmap(decode)(z_NBD)
    return jax.nn.sigmoid(jnp.swapaxes(logits_NBHW, 0, 1))

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(sample, in_shardings=(repl, repl, data, repl), out_shardings=repl)


def local_slice(batch: dict, n: int) -> dict:
  """This process's share of an eval batch that every process iterates identically."""
  p, count = jax.process_index(), jax.process_count()
  per = n // count
  return {k: v[p * per:(p + 1) * per] for k, v in batch.items()
          if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


def predict(sample_fn, state: trainer.TrainState, batches: Iterator[dict], mesh,
            rng: jax.Array, *, max_images: int | None = None) -> tuple[np.ndarray, np.ndarray, list]:
  """Runs the sampler over eval batches; returns labels (N,R,H,W), probs (N,S,H,W), keys."""
  labels, preds, keys = [], [], []
  for i, batch in enumerate(batches):
    n = batch["image"].shape[0]
    local = parallel.to_global(local_slice(batch, n), mesh)
    probs = np.asarray(sample_fn(state.params, state.batch_stats, local["image"],
                                 jax.random.fold_in(rng, i)))
    valid = np.asarray(batch["valid"], bool)
    labels.append(np.asarray(batch["masks"])[valid])
    preds.append(probs[valid].astype(np.float32))
    keys.extend(k for k, v in zip(batch["key"], valid) if v)
    if max_images is not None and len(keys) >= max_images:
      break
  return np.concatenate(labels), np.concatenate(preds), keys


def total_steps(stage_cfg, n_per_epoch: int) -> int:
  if stage_cfg.max_steps > 0:
    return int(stage_cfg.max_steps)
  return int(stage_cfg.epochs) * n_per_epoch


def round_up(n: int, multiple: int) -> int:
  return int(math.ceil(n / multiple) * multiple)

"""Stage 2: prompt-guided personalization on a frozen Stage-1 model.

The frozen parts (backbone, prior, Fcomb and BatchNorm statistics) are one params tree,
`frozen = {"params": ..., "batch_stats": ...}`, passed into every step as an argument and
never seen by the optimizer. The only trainable tree is the projector's.

A step splits into a shared forward (backbone features and K prior samples, computed once
per batch, no gradients) and `cell_loss`, the part that depends on the projector and on
(alpha, beta). The ablation grid vmaps `cell_loss` over cells on the same shared forward.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from prosona_jax import contrastive
from prosona_jax import losses
from prosona_jax import parallel
from prosona_jax import trainer
from prosona_jax.models import prob_unet
from prosona_jax.models import prompt as prompt_lib


class Shared(NamedTuple):
  """What every prompt (and every grid cell) of a batch reuses."""
  features_BHWF: jax.Array
  z_BKD: jax.Array
  seg_prompts_S: jax.Array | None = None  # Prompts decoded for L_seg (None: all of them).


def choose_phrasings(rng: jax.Array, rater_P: jax.Array, num_raters: int,
                     per_rater: int) -> jax.Array:
  """Indices of `per_rater` random phrasings of every rater (with replacement), rater-major.

  Decoding every phrasing of every rater each step costs P Fcomb passes per image and
  grid cell; a few per rater give the same expected L_seg at a fraction of the work, while
  L_text and L_sim still see every phrasing (they need no decoding).
  """
  def pick(r):
    logits_P = jnp.where(rater_P == r, 0.0, -jnp.inf)
    return jax.random.categorical(jax.random.fold_in(rng, r), logits_P, shape=(per_rater,))
  return jnp.concatenate([pick(r) for r in range(num_raters)])


def build_projector(config: ml_collections.ConfigDict) -> prompt_lib.Projector:
  return prompt_lib.Projector(latent_dim=config.model.latent_dim,
                              hidden=config.stage2.projector_hidden)


def init_projector(projector, embed_dim: int, rng: jax.Array):
  return projector.init(rng, jnp.zeros((1, embed_dim), jnp.float32))


def shared_forward(model, frozen, image_BHWC: jax.Array, rng: jax.Array, num_samples: int,
                   seg_prompts_S: jax.Array | None = None) -> Shared:
  """Backbone features (BatchNorm in eval mode) and K reparameterised prior samples."""
  frozen = jax.lax.stop_gradient(frozen)
  feats = model.apply(frozen, image_BHWC, False, method="features")
  mu_BD, log_sigma_BD = model.apply(frozen, image_BHWC, method="prior_dist")
  eps_BKD = jax.random.normal(rng, (mu_BD.shape[0], num_samples, mu_BD.shape[1]), mu_BD.dtype)
  z_BKD = mu_BD[:, None] + jnp.exp(log_sigma_BD)[:, None] * eps_BKD
  return Shared(feats, z_BKD, seg_prompts_S)


def decode_prompts(model, frozen, features_BHWF: jax.Array, z_prompt_BPD: jax.Array,
                   prompts_per_pass: int | None = None):
  """Fcomb logits (B, P, H, W) of per-image prompt latents; the backbone is not re-run.

  `prompts_per_pass` (None: all): see `prob_unet.decode_samples`'s `per_pass`.
  """
  logits_PBHW = prob_unet.decode_samples(model, frozen["params"], features_BHWF,
                                         jnp.swapaxes(z_prompt_BPD, 0, 1), prompts_per_pass)
  return jnp.swapaxes(logits_PBHW, 0, 1)


def prompt_logits(model, frozen, projector, proj_params, shared: Shared, emb_PE: jax.Array,
                  *, scale_scores: bool, prompts_per_pass: int | None = None):
  """Logits (B, P, H, W) of every prompt for every image, with z_proj and the scores."""
  z_proj_PD = projector.apply(proj_params, emb_PE)
  z_prompt_BPD, _, scores_BPK = prompt_lib.prompt_latent(
      z_proj_PD, shared.z_BKD, scale_scores=scale_scores)
  logits = decode_prompts(model, frozen, shared.features_BHWF, z_prompt_BPD, prompts_per_pass)
  return logits, z_proj_PD, scores_BPK


def cell_loss(proj_params, alpha, beta, *, model, frozen, projector, shared: Shared,
              masks_BRHW: jax.Array, emb_PE: jax.Array, rater_P: jax.Array,
              positive_PP: jax.Array, tau: float, scale_scores: bool, dice_epsilon: float):
  """L_stage2 = L_seg + alpha L_text + beta L_sim for one projector (one grid cell).

  L_text and L_sim use every prompt; L_seg decodes `shared.seg_prompts_S` (all if None).
  """
  z_proj_PD = projector.apply(proj_params, emb_PE)
  z_prompt_BPD, _, scores_BPK = prompt_lib.prompt_latent(
      z_proj_PD, shared.z_BKD, scale_scores=scale_scores)
  seg_S = shared.seg_prompts_S
  if seg_S is None:
    seg_S = jnp.arange(emb_PE.shape[0])
  logits_BSHW = decode_prompts(model, frozen, shared.features_BHWF,
                               jnp.take(z_prompt_BPD, seg_S, axis=1))
  targets_BSHW = jnp.take(masks_BRHW.astype(jnp.float32), rater_P[seg_S], axis=1)
  # One Dice loss per prompt, pooled over the batch as in Stage 1; mean over prompts.
  seg = jnp.mean(jax.vmap(
      lambda lg, t: losses.dice_loss(lg, t, epsilon=dice_epsilon), in_axes=(1, 1))(
          logits_BSHW, targets_BSHW))
  text = contrastive.text_loss(z_proj_PD, positive_PP, tau=tau)
  sim = contrastive.sim_loss(scores_BPK, positive_PP, tau=tau)
  loss = seg + alpha * text + beta * sim
  return loss, {"loss": loss, "seg": seg, "text": text, "sim": sim}


def make_optimizer(stage_cfg, steps_per_epoch: int):
  from prosona_jax import stage1  # pylint: disable=g-import-not-at-top
  return stage1.make_optimizer(stage_cfg, steps_per_epoch)


class StepConstants(NamedTuple):
  """Arrays every Stage-2 step reads: the frozen model and the training prompt bank."""
  frozen: Any
  emb_PE: jax.Array
  rater_P: jax.Array
  positive_PP: jax.Array


def seg_prompts(rng: jax.Array, const: StepConstants, config) -> jax.Array | None:
  """The training prompts this step decodes for L_seg (config.stage2.seg_phrasings_per_rater)."""
  per_rater = config.stage2.seg_phrasings_per_rater
  if per_rater <= 0:
    return None
  return choose_phrasings(jax.random.fold_in(rng, 7), const.rater_P, config.data.num_raters,
                          per_rater)


def make_train_step(model, projector, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh, base_rng: jax.Array):
  """Compiled `(state, batch, constants) -> (state, metrics)`, state donated."""
  s2 = config.stage2
  kw = dict(model=model, projector=projector, tau=s2.tau, scale_scores=s2.scale_scores,
            dice_epsilon=config.stage1.dice_epsilon)

  def step(state: trainer.TrainState, batch, const: StepConstants):
    rng = jax.random.fold_in(base_rng, state.step)
    shared = shared_forward(model, const.frozen, batch["image"], rng, s2.num_samples,
                            seg_prompts(rng, const, config))
    grad_fn = jax.value_and_grad(cell_loss, has_aux=True)
    (loss, aux), grads = grad_fn(
        state.params, s2.alpha, s2.beta, frozen=const.frozen, shared=shared,
        masks_BRHW=batch["masks"], emb_PE=const.emb_PE, rater_P=const.rater_P,
        positive_PP=const.positive_PP, **kw)
    return trainer.apply_update(state, grads, loss, tx), aux

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def _prompt_probs(model, projector, frozen, proj_params, shared: Shared, emb_PE, *,
                  scale_scores: bool, prompts_per_pass: int):
  """Probabilities (B, P, H, W) of every prompt, prompts decoded in passes
  (`prompts_per_pass`, 0: auto, `parallel.items_per_pass`)."""
  per_pass = parallel.items_per_pass(prompts_per_pass, emb_PE.shape[0], "prompts_per_pass")
  logits, _, _ = prompt_logits(model, frozen, projector, proj_params, shared, emb_PE,
                               scale_scores=scale_scores, prompts_per_pass=per_pass)
  return jax.nn.sigmoid(logits)


def make_predictor(model, projector, mesh, *, num_samples: int, scale_scores: bool,
                   prompts_per_pass: int = 0):
  """Compiled `(frozen, proj_params, image, emb_PE, rng) -> probs (B, P, H, W)`.

  `prompts_per_pass`: prompts decoded together (0: auto; on CPU one at a time measured
  1.7x faster than all 28 of the demo's bank at once).
  """
  def predict(frozen, proj_params, image, emb_PE, rng):
    shared = shared_forward(model, frozen, image, rng, num_samples)
    return _prompt_probs(model, projector, frozen, proj_params, shared, emb_PE,
                         scale_scores=scale_scores, prompts_per_pass=prompts_per_pass)

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(predict, in_shardings=(repl, repl, data, repl, repl), out_shardings=repl)


def make_shared_fn(model, mesh, *, num_samples: int):
  """Compiled `(frozen, image, rng) -> Shared`: the part of `make_predictor`'s work that
  does not depend on the projector, to reuse across several projectors (grid cells)."""
  def fn(frozen, image, rng):
    return shared_forward(model, frozen, image, rng, num_samples)

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(fn, in_shardings=(repl, data, repl), out_shardings=data)


def make_prompt_decoder(model, projector, mesh, *, scale_scores: bool,
                        prompts_per_pass: int = 0):
  """Compiled `(frozen, proj_params, shared, emb_PE) -> probs (B, P, H, W)`: the rest of
  `make_predictor` after `make_shared_fn`; the two together compute what it computes."""
  def fn(frozen, proj_params, shared, emb_PE):
    return _prompt_probs(model, projector, frozen, proj_params, shared, emb_PE,
                         scale_scores=scale_scores, prompts_per_pass=prompts_per_pass)

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(fn, in_shardings=(repl, repl, data, repl), out_shardings=repl)


def _eval_inputs(batches, mesh):
  """Per eval batch: (global image array, valid mask, valid labels, valid keys)."""
  from prosona_jax import stage1  # pylint: disable=g-import-not-at-top
  for batch in batches:
    local = parallel.to_global(stage1.local_slice(batch, batch["image"].shape[0]), mesh)
    valid = np.asarray(batch["valid"], bool)
    yield (local["image"], valid, np.asarray(batch["masks"])[valid],
           [k for k, v in zip(batch["key"], valid) if v])


class SharedEval(NamedTuple):
  """The projector-independent half of scoring a split, computed once for many projectors."""
  labels: np.ndarray  # (N, R, H, W) of the valid images.
  keys: list
  batches: list  # (Shared of the whole padded batch, valid mask) per eval batch.


def shared_eval(shared_fn, frozen, batches, mesh, rng) -> SharedEval:
  """Backbone features and prior samples of every eval batch, with the same keys as
  `predict_batches` uses, so `predict_shared` reproduces its probabilities."""
  labels, keys, out = [], [], []
  for i, (image, valid, batch_labels, batch_keys) in enumerate(_eval_inputs(batches, mesh)):
    out.append((shared_fn(frozen, image, jax.random.fold_in(rng, i)), valid))
    labels.append(batch_labels)
    keys.extend(batch_keys)
  return SharedEval(np.concatenate(labels), keys, out)


def predict_shared(decode_fn, frozen, proj_params, cached: SharedEval, emb_PE) -> np.ndarray:
  """Probabilities (N, P, H, W) of one projector on a `shared_eval` result."""
  return np.concatenate([np.asarray(decode_fn(frozen, proj_params, shared, emb_PE))[valid]
                         for shared, valid in cached.batches])


def predict_batches(predict_fn, frozen, proj_params, batches, emb_PE, mesh, rng):
  """Runs the predictor over eval batches: labels (N,R,H,W), probs (N,P,H,W), keys."""
  labels, preds, keys = [], [], []
  for i, (image, valid, batch_labels, batch_keys) in enumerate(_eval_inputs(batches, mesh)):
    probs = np.asarray(predict_fn(frozen, proj_params, image, emb_PE,
                                  jax.random.fold_in(rng, i)))
    labels.append(batch_labels)
    preds.append(probs[valid])
    keys.extend(batch_keys)
  return np.concatenate(labels), np.concatenate(preds), keys


def frozen_from_state(state: trainer.TrainState) -> dict:
  """The frozen tree of a Stage-1 state (the posterior is kept: export reads it)."""
  return {"params": state.params, "batch_stats": state.batch_stats}

"""Stage 2: the projector and the similarity-weighted prompt latent.

A frozen text embedding `e` (d) is projected to `z_proj` (D) by a two-layer MLP. K samples
`z_1..z_K` of the image's (frozen) prior are scored against it,
`s_k = <z_proj, z_k> / sqrt(D)`, and the prompt latent is their softmax-weighted mean
`z_prompt = sum_k softmax(s)_k z_k`, which Fcomb decodes with the backbone features.
Because `z_prompt` is a convex combination of prior samples, a prompt can only choose among
hypotheses the prior already gives for that image.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from prosona_jax.models import prob_unet

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu, "gelu": nn.gelu,
}


class Projector(nn.Module):
  """Two-layer MLP from text-embedding space R^d to the latent space R^D.

  Attributes:
    latent_dim: D.
    hidden: width of the hidden layer (config.stage2.projector_hidden).
    activation: "relu" or "gelu".
  """
  latent_dim: int
  hidden: int = 256
  activation: str = "relu"

  @nn.compact
  def __call__(self, e_PE: jax.Array) -> jax.Array:
    """(..., d) text embeddings -> (..., D) z_proj."""
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, "
                       f"got {self.activation!r}.")
    h = nn.Dense(self.hidden, name="hidden")(e_PE.astype(jnp.float32))
    h = _ACTIVATIONS[self.activation](h)
    return nn.Dense(self.latent_dim, name="out")(h)


def build_projector(config: Any) -> Projector:
  """The projector of a config (`model.latent_dim`, `stage2.projector_hidden`)."""
  return Projector(latent_dim=int(config.model.latent_dim),
                   hidden=int(config.stage2.projector_hidden))


def _one_prompt(z_proj_D: jax.Array, z_samples_KD: jax.Array,
                scale: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One prompt against one image's K samples: (z_prompt (D,), weights (K,), scores (K,))."""
  scores_K = (z_samples_KD @ z_proj_D) * scale
  weights_K = jax.nn.softmax(scores_K)
  return weights_K @ z_samples_KD, weights_K, scores_K


def prompt_latent(z_proj: jax.Array, z_samples_BKD: jax.Array, *,
                  scale_scores: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Similarity-weighted latent of every prompt for every image.

  Args:
    z_proj: (P, D) projected prompts shared by the batch, or (B, P, D) per image
      (a different prompt set for each image, e.g. one per image's chosen rater).
    z_samples_BKD: (B, K, D) prior samples of each image.
    scale_scores: divide the scores by sqrt(D) (ProSona); False gives D-Persona's plain
      dot product (config.stage2.scale_scores).

  Returns:
    z_prompt (B, P, D), weights (B, P, K) (softmax over K, rows sum to 1),
    scores (B, P, K) (the pre-softmax logits; `contrastive.sim_loss` takes these).
  """
  if z_samples_BKD.ndim != 3:
    raise ValueError(f"z_samples must be (B, K, D), got {z_samples_BKD.shape}.")
  if z_proj.ndim not in (2, 3) or z_proj.shape[-1] != z_samples_BKD.shape[-1]:
    raise ValueError(f"z_proj must be (P, D) or (B, P, D) with D = "
                     f"{z_samples_BKD.shape[-1]}, got {z_proj.shape}.")
  d = z_samples_BKD.shape[-1]
  scale = jnp.asarray(d ** -0.5 if scale_scores else 1.0, z_samples_BKD.dtype)
  over_prompts = jax.vmap(_one_prompt, in_axes=(0, None, None))  # P prompts, one image.
  over_images = jax.vmap(over_prompts, in_axes=(0 if z_proj.ndim == 3 else None, 0, None))
  return over_images(z_proj, z_samples_BKD, scale)


def interpolate(a: jax.Array, b: jax.Array, n: int) -> jax.Array:
  """n points on the segment from a to b (both included): (n, *a.shape).

  Works on text embeddings (then project each point) or directly on z_proj; the paper's
  Fig. 4 moves the mask from one style to another this way.
  """
  if n < 2:
    raise ValueError(f"interpolate needs n >= 2 points, got {n}.")
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"interpolate: shapes differ, {a.shape} vs {b.shape}.")
  t = jnp.linspace(0.0, 1.0, n, dtype=jnp.result_type(a.dtype, jnp.float32))
  t = t.reshape((n,) + (1,) * a.ndim)
  return (1.0 - t) * a[None] + t * b[None]


# ---------------------------------------------------------------- on a frozen Stage 1
class Shared(NamedTuple):
  """What every prompt (and every grid cell) of a batch reuses."""
  features_BHWF: jax.Array
  z_BKD: jax.Array
  seg_prompts_S: jax.Array | None = None  # Prompts decoded for L_seg (None: all of them).


def prior_samples_BKD(mu_BD: jax.Array, log_sigma_BD: jax.Array, eps_BKD: jax.Array
                      ) -> jax.Array:
  """K prior samples per image, (B, K, D), from noise eps (B, K, D)."""
  return prob_unet.gaussian_sample(mu_BD[:, None], log_sigma_BD[:, None], eps_BKD)


def shared_forward(model: prob_unet.ProbUNet, frozen: Any, image_BHWC: jax.Array,
                   rng: jax.Array, num_samples: int,
                   seg_prompts_S: jax.Array | None = None) -> Shared:
  """Backbone features (BatchNorm in eval mode) and K reparameterised prior samples.

  `frozen` is the Stage-1 model's `{"params", "batch_stats"}`; no gradient reaches it.
  """
  frozen = jax.lax.stop_gradient(frozen)
  feats = model.apply(frozen, image_BHWC, False, method="features")
  mu_BD, log_sigma_BD = model.apply(frozen, image_BHWC, method="prior_dist")
  eps_BKD = jax.random.normal(rng, (mu_BD.shape[0], num_samples, mu_BD.shape[1]), mu_BD.dtype)
  return Shared(feats, prior_samples_BKD(mu_BD, log_sigma_BD, eps_BKD), seg_prompts_S)


def decode_prompts(model: prob_unet.ProbUNet, frozen: Any, features_BHWF: jax.Array,
                   z_prompt_BPD: jax.Array, prompts_per_pass: int | None = None) -> jax.Array:
  """Fcomb logits (B, P, H, W) of per-image prompt latents; the backbone is not re-run.

  `prompts_per_pass` (None: all): see `prob_unet.decode_samples`'s `per_pass`.
  """
  logits_PBHW = prob_unet.decode_samples(model, frozen["params"], features_BHWF,
                                         jnp.swapaxes(z_prompt_BPD, 0, 1), prompts_per_pass)
  return jnp.swapaxes(logits_PBHW, 0, 1)


def prompt_logits(model: prob_unet.ProbUNet, frozen: Any, projector: Projector,
                  proj_params: Any, shared: Shared, emb_PE: jax.Array, *,
                  scale_scores: bool, prompts_per_pass: int | None = None):
  """Logits (B, P, H, W) of every prompt for every image, with z_proj and the scores."""
  z_proj_PD = projector.apply(proj_params, emb_PE)
  z_prompt_BPD, _, scores_BPK = prompt_latent(z_proj_PD, shared.z_BKD,
                                              scale_scores=scale_scores)
  logits = decode_prompts(model, frozen, shared.features_BHWF, z_prompt_BPD, prompts_per_pass)
  return logits, z_proj_PD, scores_BPK

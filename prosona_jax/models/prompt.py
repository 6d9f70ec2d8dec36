"""Stage 2: the projector and the similarity-weighted prompt latent.

A frozen text embedding `e` (d) is projected to `z_proj` (D) by a two-layer MLP. K samples
`z_1..z_K` of the image's (frozen) prior are scored against it,
`s_k = <z_proj, z_k> / sqrt(D)`, and the prompt latent is their softmax-weighted mean
`z_prompt = sum_k softmax(s)_k z_k`, which Fcomb decodes with the backbone features.
Because `z_prompt` is a convex combination of prior samples, a prompt can only choose among
hypotheses the prior already gives for that image.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

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

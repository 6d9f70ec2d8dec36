"""The multi-level contrastive losses of Stage 2 (ProSona Sec. 2.3).

For the P prompts in play and M_ij = 1 when prompts i and j describe the same rater:
  L_text = CE((E E^T) / tau, M),   E (P, D): L2-normalised projected prompts z_proj;
  L_sim  = CE((R R^T) / tau, M),   R (P, K): L2-normalised similarity profiles, each
                                   prompt's scores against the same K prior samples.
CE is the row-wise softmax cross-entropy against the row-normalised mask (the supervised
contrastive form): row i's target spreads its mass evenly over i's positives.

Diagonal: the paper's formula keeps i == i in both the logits and the mask (M_ii = 1), and
that is the default here. With normalised rows the self-logit is the largest possible
(1 / tau), so the loss has a floor above zero and each row also rewards its own term; the
gradient still pulls same-rater prompts together and pushes other raters apart.
`include_diagonal=False` gives SupCon's form (Khosla et al. 2020): self-pairs are removed
from the softmax and the targets, and rows without another positive are left out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: jax.Array, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis` (an all-zero row stays zero, without NaNs)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def supcon_ce(logits_PP: jax.Array, positive_PP: jax.Array, *,
              include_diagonal: bool = True) -> jax.Array:
  """Row-wise softmax cross-entropy against the row-normalised positive mask.

  Args:
    logits_PP: (P, P) pairwise logits (similarities / tau).
    positive_PP: (P, P) {0, 1} mask, 1 where i and j describe the same rater.
    include_diagonal: keep the self-pairs (the paper's formula; see the module docstring).

  Returns:
    Scalar: the mean over rows that have at least one positive.
  """
  logits = logits_PP.astype(jnp.float32)
  pos = positive_PP.astype(jnp.float32)
  if logits.ndim != 2 or logits.shape[0] != logits.shape[1] or pos.shape != logits.shape:
    raise ValueError(f"supcon_ce: logits {logits.shape} and positive {pos.shape} "
                     "must both be (P, P).")
  if not include_diagonal:
    eye = jnp.eye(logits.shape[0], dtype=bool)
    # Finite, so no inf * 0 can appear in the forward or backward pass.
    logits = jnp.where(eye, -1e9, logits)
    pos = jnp.where(eye, 0.0, pos)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  num_pos = pos.sum(-1)
  target = pos / jnp.maximum(num_pos, 1.0)[:, None]
  row_loss = -jnp.sum(target * log_p, axis=-1)
  valid = (num_pos > 0).astype(jnp.float32)
  return jnp.sum(row_loss * valid) / jnp.maximum(valid.sum(), 1.0)


def _pairwise_loss(x_BPF: jax.Array, positive: jax.Array, tau: float,
                   include_diagonal: bool) -> jax.Array:
  """Mean over B of CE((x x^T)/tau, M) with rows of x L2-normalised."""
  x = l2_normalize(x_BPF.astype(jnp.float32))
  logits_BPP = jnp.einsum("bpf,bqf->bpq", x, x) / tau
  pos = jnp.broadcast_to(positive, logits_BPP.shape)
  losses = jax.vmap(lambda lg, m: supcon_ce(lg, m, include_diagonal=include_diagonal))(
      logits_BPP, pos)
  return losses.mean()


def text_loss(z_proj_PD: jax.Array, positive_PP: jax.Array, *, tau: float,
              include_diagonal: bool = True) -> jax.Array:
  """L_text: prompts of one rater should project close together, others apart.

  Args:
    z_proj_PD: (P, D) projector outputs (normalised here).
    positive_PP: (P, P) same-rater mask (`PromptBank.positive_mask`).
    tau: temperature (config.stage2.tau).
    include_diagonal: see `supcon_ce`.
  """
  if z_proj_PD.ndim != 2:
    raise ValueError(f"text_loss: z_proj must be (P, D), got {z_proj_PD.shape}.")
  return _pairwise_loss(z_proj_PD[None], positive_PP, tau, include_diagonal)


def sim_loss(scores: jax.Array, positive: jax.Array, *, tau: float,
             include_diagonal: bool = True) -> jax.Array:
  """L_sim: prompts of one rater should pick the same prior samples, others different ones.

  Rows are L2-normalised over K, so whether the scores were divided by sqrt(D) does not
  matter. The profiles only compare prompts scored against the *same* K samples, so with
  per-image samples the loss is computed per image and averaged over the batch.

  Args:
    scores: (P, K) scores of P prompts against K shared samples, or (B, P, K) per image
      (`prompt_latent`'s third output); the loss is then the mean over the B images.
    positive: (P, P) same-rater mask, or (B, P, P) when the prompt set differs per image.
    tau: temperature (config.stage2.tau).
    include_diagonal: see `supcon_ce`.
  """
  if scores.ndim == 2:
    scores = scores[None]
  if scores.ndim != 3:
    raise ValueError(f"sim_loss: scores must be (P, K) or (B, P, K), got {scores.shape}.")
  return _pairwise_loss(scores, positive, tau, include_diagonal)


def loss_floor(positive_PP, *, include_diagonal: bool = True) -> float:
  """The lowest value `text_loss` and `sim_loss` can reach: mean over rows of ln(positives).

  Row i's target spreads its mass evenly over its n_i positives, so its cross-entropy is
  at least the target's entropy, ln(n_i), reached when the softmax puts 1/n_i on each
  positive and nothing elsewhere (the negatives' exp(-2 / tau) is negligible at tau =
  0.07). With 5 phrasings per rater and the diagonal kept, that is ln 5 = 1.609: a loss
  sitting there has reached its optimum, it has not stalled.

  Args:
    positive_PP: (P, P) same-rater mask (`PromptBank.positive_mask`), numpy or jax.
    include_diagonal: as in `supcon_ce` (without it, self-pairs are not positives).
  """
  pos = np.asarray(positive_PP, np.float64)
  if not include_diagonal:
    pos = pos * (1.0 - np.eye(pos.shape[0]))
  n = pos.sum(-1)
  n = n[n > 0]
  return float(np.log(n).mean()) if n.size else 0.0

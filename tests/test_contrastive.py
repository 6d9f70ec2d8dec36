"""L_text and L_sim against hand computations; gradients reach only the projector."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prosona_jax import contrastive
from prosona_jax.models import prompt

RATER = np.array([0, 0, 1, 1, 1, 2])  # Rater 2 has a single phrasing.
M = (RATER[:, None] == RATER[None, :]).astype(np.float32)


def _ce_by_hand(x, tau, include_diagonal):
  """CE((x x^T)/tau, M) with explicit loops, x rows normalised."""
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  p = len(x)
  losses = []
  for i in range(p):
    cols = [j for j in range(p) if include_diagonal or j != i]
    logits = {j: float(x[i] @ x[j]) / tau for j in cols}
    log_z = np.log(sum(np.exp(v) for v in logits.values()))
    pos = [j for j in cols if RATER[j] == RATER[i]]
    if pos:  # SupCon's form drops rows without another positive.
      losses.append(-np.mean([logits[j] - log_z for j in pos]))
  return np.mean(losses)


@pytest.mark.parametrize("include_diagonal", [True, False])
def test_text_loss_by_hand(include_diagonal):
  z = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
  got = contrastive.text_loss(jnp.asarray(z), jnp.asarray(M), tau=0.5,
                              include_diagonal=include_diagonal)
  np.testing.assert_allclose(float(got), _ce_by_hand(z, 0.5, include_diagonal), rtol=1e-5)


@pytest.mark.parametrize("include_diagonal", [True, False])
def test_sim_loss_by_hand_and_batch_mean(include_diagonal):
  scores = np.random.default_rng(1).normal(size=(3, 6, 10)).astype(np.float32)
  got = contrastive.sim_loss(jnp.asarray(scores), jnp.asarray(M), tau=0.1,
                             include_diagonal=include_diagonal)
  want = np.mean([_ce_by_hand(s, 0.1, include_diagonal) for s in scores])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  one = contrastive.sim_loss(jnp.asarray(scores[0]), jnp.asarray(M), tau=0.1,
                             include_diagonal=include_diagonal)
  np.testing.assert_allclose(float(one), _ce_by_hand(scores[0], 0.1, include_diagonal),
                             rtol=1e-5)
  # Profiles are normalised: dividing the scores by sqrt(D) changes nothing.
  scaled = contrastive.sim_loss(jnp.asarray(scores) / np.sqrt(6.0), jnp.asarray(M), tau=0.1,
                                include_diagonal=include_diagonal)
  np.testing.assert_allclose(float(scaled), float(got), rtol=1e-5)


def test_supcon_ce_small_case_and_ordering():
  # Two prompts per rater, identical within a rater: the clustered layout scores lower.
  logits = jnp.array([[2.0, 2.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0],
                      [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
  pos = jnp.asarray(np.kron(np.eye(2), np.ones((2, 2))))
  want = -(2.0 - np.log(2 * np.exp(2.0) + 2.0))  # Every row alike.
  np.testing.assert_allclose(float(contrastive.supcon_ce(logits, pos)), want, rtol=1e-6)
  swapped = contrastive.supcon_ce(logits, jnp.asarray(np.kron(np.ones((2, 2)), np.eye(2))))
  assert float(swapped) > want
  with pytest.raises(ValueError):
    contrastive.supcon_ce(logits, pos[:3])


def test_gradients_reach_only_the_projector():
  e = jax.random.normal(jax.random.PRNGKey(0), (6, 16))  # Frozen text embeddings.
  proj = prompt.Projector(latent_dim=6, hidden=8)
  params = {"projector": proj.init(jax.random.PRNGKey(1), e),
            "prior_shift": jnp.ones((6,))}  # Stands in for a frozen Stage-1 part.
  base = jax.random.normal(jax.random.PRNGKey(2), (2, 10, 6))

  def text(p):
    return contrastive.text_loss(proj.apply(p["projector"], e), jnp.asarray(M), tau=0.07)

  def sim(p):
    z_proj = proj.apply(p["projector"], e)
    _, _, scores = prompt.prompt_latent(z_proj, base + p["prior_shift"])
    return contrastive.sim_loss(scores, jnp.asarray(M), tau=0.07)

  g_text = jax.jit(jax.grad(text))(params)
  assert all(float(jnp.abs(g).max()) > 0
             for g in jax.tree_util.tree_leaves(g_text["projector"]))
  assert float(jnp.abs(g_text["prior_shift"]).max()) == 0.0
  g_sim = jax.jit(jax.grad(sim))(params)
  leaves = jax.tree_util.tree_leaves(g_sim["projector"])
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_l2_normalize_zero_row_has_no_nan():
  x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
  np.testing.assert_allclose(contrastive.l2_normalize(x), [[0, 0], [0.6, 0.8]], rtol=1e-6)
  g = jax.grad(lambda v: contrastive.l2_normalize(v).sum())(x)
  assert bool(jnp.isfinite(g).all())

"""Projector, prompt latent, interpolation and prompt banks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prosona_jax import config_defaults
from prosona_jax import prompt_bank as pb
from prosona_jax.models import prompt


def test_projector_shapes_and_param_count():
  proj = prompt.Projector(latent_dim=6, hidden=16)
  e = jnp.ones((5, 32))
  params = proj.init(jax.random.PRNGKey(0), e)
  assert proj.apply(params, e).shape == (5, 6)
  assert proj.apply(params, jnp.ones((2, 5, 32))).shape == (2, 5, 6)
  count = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert count == (32 * 16 + 16) + (16 * 6 + 6)
  gelu = prompt.Projector(latent_dim=6, hidden=16, activation="gelu")
  assert gelu.apply(params, e).shape == (5, 6)  # Same params tree, other activation.


def _loop_reference(z_proj, z_samples, scale_scores):
  b, k, d = z_samples.shape
  per_image = z_proj if z_proj.ndim == 3 else np.broadcast_to(z_proj, (b,) + z_proj.shape)
  p = per_image.shape[1]
  out, w_all, s_all = np.zeros((b, p, d)), np.zeros((b, p, k)), np.zeros((b, p, k))
  for i in range(b):
    for j in range(p):
      s = np.array([per_image[i, j] @ z_samples[i, n] for n in range(k)])
      s = s / np.sqrt(d) if scale_scores else s
      w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
      out[i, j] = sum(w[n] * z_samples[i, n] for n in range(k))
      w_all[i, j], s_all[i, j] = w, s
  return out, w_all, s_all


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("scale_scores", [True, False])
def test_prompt_latent_equals_loop(per_image, scale_scores):
  rng = np.random.default_rng(0)
  b, p, k, d = 3, 4, 10, 6
  z_samples = rng.normal(size=(b, k, d)).astype(np.float32)
  z_proj = rng.normal(size=(b, p, d) if per_image else (p, d)).astype(np.float32) * 2
  z, w, s = prompt.prompt_latent(jnp.asarray(z_proj), jnp.asarray(z_samples),
                                 scale_scores=scale_scores)
  assert z.shape == (b, p, d) and w.shape == s.shape == (b, p, k)
  ref = _loop_reference(z_proj, z_samples, scale_scores)
  for got, want in zip((z, w, s), ref):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)


def test_prompt_latent_rejects_bad_shapes():
  with pytest.raises(ValueError):
    prompt.prompt_latent(jnp.ones((4, 5)), jnp.ones((2, 10, 6)))
  with pytest.raises(ValueError):
    prompt.prompt_latent(jnp.ones((4, 6)), jnp.ones((10, 6)))


def test_interpolate():
  a, b = jnp.zeros((3,)), jnp.array([2.0, 4.0, -2.0])
  path = prompt.interpolate(a, b, 5)
  assert path.shape == (5, 3)
  np.testing.assert_allclose(path[0], a)
  np.testing.assert_allclose(path[-1], b)
  np.testing.assert_allclose(path[2], (a + b) / 2)
  assert prompt.interpolate(jnp.ones((2, 6)), jnp.zeros((2, 6)), 3).shape == (3, 2, 6)


# ---------------------------------------------------------------- prompt banks
class _FakeEncoder:
  name = "fake"

  def encode(self, prompts):
    return np.stack([[len(p), p.count(" "), 1.0] for p in prompts]).astype(np.float32)


def _bank():
  return pb.PromptBank.from_phrasings(
      (("a", "b"), ("c",), ("d", "e", "f")), (("g",), ("h",), ("i",)))


def test_bank_layout_views_and_mask():
  bank = _bank()
  assert len(bank) == 9 and bank.num_raters == 3
  np.testing.assert_array_equal(bank.rater, [0, 0, 1, 2, 2, 2, 0, 1, 2])
  np.testing.assert_array_equal(bank.heldout, [0, 0, 0, 0, 0, 0, 1, 1, 1])
  train = bank.train_view()
  assert train.prompts == ["a", "b", "c", "d", "e", "f"]
  assert bank.for_rater(2).prompts == ["d", "e", "f", "i"]
  m = train.positive_mask()
  want = np.zeros((6, 6), np.float32)
  for group in ([0, 1], [2], [3, 4, 5]):
    want[np.ix_(group, group)] = 1
  np.testing.assert_array_equal(m, want)
  assert bank.to_phrasings()["train"] == (("a", "b"), ("c",), ("d", "e", "f"))


def test_bank_embed_save_load_lookup(tmp_path):
  bank = pb.PromptBank.from_phrasings(pb.LIDC_PROMPTS["train"], pb.LIDC_PROMPTS["heldout"])
  assert bank.num_raters == 4 and bank.heldout.sum() == 8
  with pytest.raises(ValueError, match="not embedded"):
    bank.lookup(bank.prompts[0])
  emb = bank.embed(_FakeEncoder())
  assert emb.embeddings.shape == (len(bank), 3) and emb.encoder_name == "fake"
  path = tmp_path / "bank.npz"
  emb.save(path)
  back = pb.PromptBank.load(path)
  assert back.prompts == emb.prompts and back.encoder_name == "fake"
  np.testing.assert_array_equal(back.rater, emb.rater)
  np.testing.assert_array_equal(back.heldout, emb.heldout)
  np.testing.assert_array_equal(back.embeddings, emb.embeddings)
  p = "include subtle regions"
  np.testing.assert_array_equal(back.lookup(p), _FakeEncoder().encode([p])[0])
  with pytest.raises(KeyError, match="closest"):
    back.lookup("include subtle region")
  pb.PromptBank.load(_save_unembedded(bank, tmp_path))  # No embeddings is fine too.


def _save_unembedded(bank, tmp_path):
  path = tmp_path / "plain.npz"
  bank.save(path)
  assert pb.PromptBank.load(path).embeddings is None
  return path


def test_bank_from_config():
  cfg = config_defaults.base_config()
  with pytest.raises(ValueError, match="empty"):
    pb.PromptBank.from_config(cfg.text.prompts)
  bank = pb.PromptBank.from_config(cfg.text.prompts, default="synthetic")
  assert bank.prompts[0] == pb.SYNTHETIC_PROMPTS["train"][0][0]
  cfg.text.prompts.train = (("tight",), ("loose", "wide"))
  cfg.text.prompts.heldout = (("narrow",), ("broad",))
  bank = pb.PromptBank.from_config(cfg.text.prompts)
  assert bank.prompts == ["tight", "loose", "wide", "narrow", "broad"]
  with pytest.raises(ValueError, match="tuple of phrasings"):
    pb.PromptBank.from_phrasings(("tight", "loose"))


def test_default_banks_are_well_formed():
  for name, bank in pb.DEFAULT_PROMPTS.items():
    assert len(bank["train"]) == len(bank["heldout"]) == 4, name
    assert all(len(g) >= 5 for g in bank["train"]) and all(len(g) >= 2 for g in bank["heldout"])
    pb.PromptBank.from_phrasings(bank["train"], bank["heldout"])  # No duplicates.

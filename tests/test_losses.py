"""Stage-1 losses: hand-computed Dice, KL, bound loss, regulariser, the full loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prosona_jax import losses
from prosona_jax.config_defaults import base_config
from prosona_jax.models import prob_unet as pu

LOSS_OPTS = dict(num_bound_samples=3, bound_weight=0.5, kl_weight=1.0, reg_weight=1e-5)


def test_dice_hand_computed():
  # p = 0.5 everywhere. fg: I = 0.5, D = 2 + 1 -> 1/3; bg: I = 1.5, D = 2 + 3 -> 3/5.
  t = jnp.array([[1.0, 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(losses.dice_loss(jnp.zeros((2, 2)), t),
                             1 - (1 / 3 + 3 / 5) / 2, rtol=1e-6)
  # Empty target: fg Dice 0; bg: I = 2, D = 2 + 4 -> 2/3.
  np.testing.assert_allclose(losses.dice_loss(jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 2))),
                             1 - (0 + 2 / 3) / 2, rtol=1e-6)
  # Two channels: no background channel; channel 2 is p = 0.5 vs all ones: 2*2/(2+4).
  logits = jnp.stack([jnp.full((1, 2, 2), 30.0), jnp.zeros((1, 2, 2))], axis=1)
  targets = jnp.ones_like(logits)
  np.testing.assert_allclose(
      losses.dice_loss(logits, targets, channel_axis=1), 1 - (1 + 2 / 3) / 2, rtol=1e-5)
  # Pooled over the batch: one sum for all images, not a mean of per-image Dice.
  a = losses.dice_loss(jnp.array([[5.0], [-5.0]]), jnp.array([[1.0], [1.0]]))
  per_image = (losses.dice_loss(jnp.array([5.0]), jnp.array([1.0]))
               + losses.dice_loss(jnp.array([-5.0]), jnp.array([1.0]))) / 2
  assert abs(float(a) - float(per_image)) > 1e-3


def _dpersona_gdl(probs_NC: np.ndarray, target_NC: np.ndarray, eps: float = 1e-6):
  """D-Persona's GeneralizedDiceLoss written out literally (channels first)."""
  p, t = probs_NC.T.astype(np.float64), target_NC.T.astype(np.float64)
  if p.shape[0] == 1:
    p, t = np.concatenate([p, 1 - p]), np.concatenate([t, 1 - t])
  w = 1 / np.maximum(t.sum(-1) ** 2, eps)
  dice = 2 * (p * t).sum(-1) * w / np.maximum((p + t).sum(-1) * w, eps)
  return 1 - dice.mean()


@pytest.mark.parametrize("channels", [1, 2])
def test_dice_matches_dpersona_weighted_form(channels):
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, channels, 8, 8)).astype(np.float32)
  targets = (rng.random((3, channels, 8, 8)) > 0.7).astype(np.float32)
  targets[:, -1] = 0  # An empty channel exercises the clamps.
  ours = losses.dice_loss(jnp.asarray(logits), jnp.asarray(targets), channel_axis=1)
  probs = 1 / (1 + np.exp(-logits))
  flat = lambda a: np.moveaxis(a, 1, -1).reshape(-1, channels)
  np.testing.assert_allclose(ours, _dpersona_gdl(flat(probs), flat(targets)), rtol=1e-5)


def test_kl_closed_form_and_monte_carlo():
  rng = np.random.default_rng(1)
  mu_q, mu_p = rng.standard_normal((2, 2, 3)).astype(np.float32)
  ls_q, ls_p = (0.3 * rng.standard_normal((2, 2, 3))).astype(np.float32)
  kl = losses.kl_diag_gaussians(mu_q, ls_q, mu_p, ls_p)
  assert abs(float(losses.kl_diag_gaussians(mu_q, ls_q, mu_q, ls_q))) < 1e-6
  z = mu_q + np.exp(ls_q) * rng.standard_normal((200_000, 2, 3))
  log_n = lambda z, mu, ls: -0.5 * ((z - mu) / np.exp(ls)) ** 2 - ls
  mc = np.mean(np.sum(log_n(z, mu_q, ls_q) - log_n(z, mu_p, ls_p), -1))
  np.testing.assert_allclose(kl, mc, rtol=2e-2)


def test_bound_loss_forms():
  logits_KBHW = jnp.array([[[[4.0, -4.0]]], [[[-4.0, -4.0]]]])  # K=2, B=1, H=1, W=2.
  masks_BRHW = jnp.array([[[[1.0, 0.0]], [[0.0, 0.0]]]])  # union [1, 0], inter [0, 0].
  max_l, min_l = jnp.array([[[4.0, -4.0]]]), jnp.array([[[-4.0, -4.0]]])
  union, inter = jnp.array([[[1.0, 0.0]]]), jnp.zeros((1, 1, 2))
  np.testing.assert_allclose(
      losses.bound_loss(logits_KBHW, masks_BRHW, form="sum"),
      losses.dice_loss(max_l, union) + losses.dice_loss(min_l, inter), rtol=1e-6)
  sig = jax.nn.sigmoid
  dice_max = 2 * sig(4.0) / (sig(4.0) + sig(-4.0) + 1)
  dice_min = 0.0  # Empty intersection, foreground only.
  np.testing.assert_allclose(losses.bound_loss(logits_KBHW, masks_BRHW, form="dpersona"),
                             1 - (dice_max + dice_min) / 2, rtol=1e-5)


def test_weight_norm():
  params = {
      "backbone": {"k": jnp.ones(3)},
      "prior": {"c": {"kernel": jnp.full((2, 2), 1.0), "bias": jnp.array([3.0, 4.0])}},
      "posterior": {"c": {"kernel": jnp.array([[0.0, 0.0]]), "bias": jnp.zeros(2)}},
      "fcomb": {"hidden_0": {"kernel": jnp.array([6.0, 8.0]), "bias": jnp.ones(1)},
                "last": {"kernel": jnp.full((4,), 100.0), "bias": jnp.ones(1)}},
  }
  np.testing.assert_allclose(losses.weight_norm(params), 2 + 5 + 10 + 1)
  np.testing.assert_allclose(losses.weight_norm(params, include_biases=False), 2 + 10)
  grads = jax.grad(losses.weight_norm)(params)  # Finite where a tensor is all zeros.
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


# ------------------------------------------------------------------ full loss


def _fast_variables(model, *, image_size, in_channels, seed=0):
  """He-scaled random variables from shapes (no compiled init; see test_models)."""
  x, m = pu.init_inputs(model, image_size=image_size, in_channels=in_channels)
  shapes = jax.eval_shape(lambda rng: model.init(rng, x, m), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      std = np.sqrt(2.0 / np.prod(s.shape[:-1]))
      return jnp.asarray(std * rng.standard_normal(s.shape), jnp.float32)
    if name == "bias":
      return jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32)
    return jnp.ones(s.shape) if name in ("scale", "var") else jnp.zeros(s.shape)

  variables = jax.tree_util.tree_map_with_path(fill, dict(shapes))
  variables.setdefault("batch_stats", {})
  return variables


def _batch(b=2, size=32, c=1, r=4, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((b, size, size, c)).astype(np.float32)
  yy, xx = np.mgrid[:size, :size]
  radii = np.arange(1, r + 1) * size / 12  # Nested discs of growing radius.
  dist = np.hypot(yy - size / 2, xx - size / 2)
  masks = (dist[None, None] < radii[None, :, None, None]).astype(np.uint8)
  return {"image": jnp.asarray(image), "masks": jnp.asarray(np.repeat(masks, b, 0))}


def _tiny_model(**overrides):
  cfg = base_config().model.to_dict()
  cfg.update(backbone="unet", unet_filters=(8, 16), gaussian_filters=(4, 8))
  cfg.update(overrides)
  return pu.build_model(cfg, num_raters=4)


@pytest.fixture(scope="module")
def tiny():
  model = _tiny_model()
  return model, _fast_variables(model, image_size=32, in_channels=1)


@pytest.mark.parametrize("form", losses.BOUND_FORMS)
def test_decode_extremes_matches_full_reduction(tiny, form):
  """Values exactly those of max/min over all K decodes; gradients equal up to rounding."""
  model, variables = tiny
  params = variables["params"]
  rng = np.random.default_rng(2)
  feats = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
  z_KBD = jnp.asarray(rng.standard_normal((5, 2, 6)), jnp.float32)
  masks = _batch(size=8)["masks"]

  def full(p, f, z):
    return losses.bound_loss(pu.decode_samples(model, p, f, z), masks, form=form)

  def fast(p, f, z):
    max_l, min_l = pu.decode_extremes(model, p, f, z)
    return losses.bound_loss_from_extremes(max_l, min_l, masks, form=form)

  logits = pu.decode_samples(model, params, feats, z_KBD)
  max_l, min_l = jax.jit(functools.partial(pu.decode_extremes, model))(params, feats, z_KBD)
  np.testing.assert_array_equal(max_l, jnp.max(logits, 0))
  np.testing.assert_array_equal(min_l, jnp.min(logits, 0))
  want = jax.jit(jax.value_and_grad(full, argnums=(0, 1, 2)))(params, feats, z_KBD)
  got = jax.jit(jax.value_and_grad(fast, argnums=(0, 1, 2)))(params, feats, z_KBD)
  np.testing.assert_array_equal(got[0], want[0])
  for g, w in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(w))))
  # One latent per pixel: a per-image latent tiled over H x W decodes the same.
  z_BHWD = jnp.broadcast_to(z_KBD[0][:, None, None, :], (2, 8, 8, 6))
  np.testing.assert_allclose(model.apply(variables, feats, z_BHWD, method="decode"),
                             logits[0], rtol=1e-6, atol=1e-6)


def test_stage1_loss_gradient_finite(tiny):
  model, variables = tiny
  batch = _batch()
  loss_fn = functools.partial(losses.stage1_loss, model=model,
                              posterior_input="one_random", **LOSS_OPTS)

  @jax.jit
  def step(params, rng):
    return jax.value_and_grad(
        lambda p: loss_fn(p, variables["batch_stats"], batch=batch, rng=rng),
        has_aux=True)(params)

  (loss, (aux, _)), grads = step(variables["params"], jax.random.key(0))
  assert np.isfinite(float(loss))
  expected = aux["seg"] + aux["kl"] + 0.5 * aux["bound"] + 1e-5 * aux["reg"]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert 0 <= int(aux["rater"]) < 4
  for name in ("backbone", "prior", "posterior", "fcomb"):
    leaves = jax.tree_util.tree_leaves(grads[name])
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.any(g != 0) for g in leaves), name


def test_stage1_loss_options(tiny):
  model, variables = tiny
  batch = _batch()
  call = lambda m, v, **kw: jax.jit(functools.partial(
      losses.stage1_loss, model=m, **LOSS_OPTS, **kw))(
          v["params"], v["batch_stats"], batch=batch, rng=jax.random.key(3))
  loss, (aux, _) = call(model, variables, posterior_input="one_random",
                        seg_latent="prior", bound_form="dpersona")
  assert np.isfinite(float(loss)) and 0 <= float(aux["bound"]) <= 1
  with pytest.raises(ValueError, match="posterior_input"):
    call(model, variables, posterior_input="all")
  model_all = _tiny_model(posterior_input="all")
  v_all = _fast_variables(model_all, image_size=32, in_channels=1)
  loss, _ = call(model_all, v_all, posterior_input="all")
  assert np.isfinite(float(loss))


def test_stage1_loss_updates_batch_norm_in_train_mode():
  model = pu.build_model(dict(base_config().model.to_dict(), gaussian_filters=(4,)), 4)
  variables = _fast_variables(model, image_size=32, in_channels=1)
  batch = _batch()
  call = jax.jit(functools.partial(losses.stage1_loss, model=model,
                                   posterior_input="one_random", **LOSS_OPTS),
                 static_argnames="train")
  args = (variables["params"], variables["batch_stats"])
  loss, (_, stats) = call(*args, batch=batch, rng=jax.random.key(0), train=True)
  assert np.isfinite(float(loss))
  old = variables["batch_stats"]["backbone"]["encoder"]["bn1"]
  new = stats["backbone"]["encoder"]["bn1"]
  # momentum 0.9: the running mean moves a tenth of the way to the batch mean.
  assert np.all(np.asarray(new["mean"]) != np.asarray(old["mean"]))
  assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(args[1])
  _, (_, same) = call(*args, batch=batch, rng=jax.random.key(0), train=False)
  for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(args[1])):
    np.testing.assert_array_equal(a, b)

"""Table-1 baselines: exact counts, the CM degeneracy, Pionono's KL and sampling, D-Persona's
heads, and one jitted loss + gradient step per method on a tiny backbone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prosona_jax import losses
from prosona_jax.config_defaults import base_config
from prosona_jax.models import baseline_common as common
from prosona_jax.models import confusion
from prosona_jax.models import dpersona_heads
from prosona_jax.models import pionono
from prosona_jax.models import prob_unet
from prosona_jax.models import unet_head

# A tiny plain U-Net: the spec's ResNet-34 is used only under jax.eval_shape (counts).
TINY = dict(backbone="unet", unet_filters=(8, 16), convs_per_block=1)
SIZE = 16


def _key(seed: int) -> jax.Array:
  # The "rbg" generator compiles in a fraction of threefry's time on CPU; the models take
  # any key type, and production keeps JAX's default.
  return jax.random.key(seed, impl="rbg")


def _abstract(init, model, **kwargs):
  """Variables of `init` at the spec's 1 x 128 x 128 x 1 input, 4 raters, shapes only."""
  return jax.eval_shape(lambda k: init(model, k, 128, 1, 4, **kwargs), _key(0))


def _variables(init, model, seed: int = 0, **kwargs) -> dict:
  """Random variables of `init`'s shapes (SIZE x SIZE input), without compiling `init`."""
  shapes = jax.eval_shape(lambda k: init(model, k, SIZE, 1, 4, **kwargs), _key(0))
  return _fill(shapes, seed)


def _fill(shapes, seed: int = 0):
  """Random arrays for a tree of shapes.

  A compiled `init` spends seconds per model on CPU generating random numbers; the
  initialisers themselves are checked in `test_initialisers` on the small modules
  whose init is specific. Kernels are He-scaled, biases small, and the few named
  parameters get the values their initialisers give.
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name, shape = jax.tree_util.keystr(path[-1:]).strip("[]'"), s.shape
    if name == "kernel":
      fan_in = np.prod(shape[-4:-1]) if len(shape) >= 4 else shape[-2]
      value = np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)
    elif name in ("scale", "var"):
      value = np.ones(shape)
    elif name == "negative_slope":
      value = np.full(shape, 0.25)
    elif name == "matrices" or name == "scale_tril":
      value = np.broadcast_to(np.eye(shape[-1]) * (2.0 if name == "scale_tril" else 1.0),
                              shape)
    elif name == "mu":
      value = 8.0 * rng.standard_normal(shape)
    elif name == "mean":
      value = np.zeros(shape)
    else:  # Biases.
      value = 0.01 * rng.standard_normal(shape)
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _batch(b: int = 3, size: int = SIZE, seed: int = 0) -> dict:
  """Random images; rater r's mask is a disc of radius 2 + r (ascending area)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((b, 4, size, size), np.float32)
  for i in range(b):
    cy, cx = rng.integers(5, size - 5, 2)
    for r in range(4):
      masks[i, r] = (yy - cy) ** 2 + (xx - cx) ** 2 < (2 + r) ** 2
  return {"image": jnp.asarray(rng.standard_normal((b, size, size, 1)), jnp.float32),
          "masks": jnp.asarray(masks)}


def _norms(tree) -> dict:
  return {jax.tree_util.keystr(p): float(jnp.linalg.norm(x))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _loss_and_grad(loss_fn, variables, **kwargs):
  """One jitted loss + gradient w.r.t. params."""
  fn = jax.jit(jax.value_and_grad(functools.partial(loss_fn, **kwargs), has_aux=True))
  (loss, (aux, stats)), grads = fn(variables["params"], variables["batch_stats"])
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  return loss, aux, stats, grads


# ------------------------------------------------------------------ common


def test_rater_draws_and_config():
  rng = _key(3)
  per_image = common.draw_raters(rng, 64, 4, "image")
  assert per_image.shape == (64,) and len(set(np.asarray(per_image))) == 4
  per_batch = common.draw_raters(rng, 64, 4, "batch")
  assert len(set(np.asarray(per_batch))) == 1
  with pytest.raises(ValueError, match="rater_draw"):
    common.draw_raters(rng, 4, 4, "pixel")
  x_BR = jnp.arange(12).reshape(3, 4)
  np.testing.assert_array_equal(common.take_per_image(x_BR, jnp.array([3, 0, 2])), [3, 4, 10])
  with pytest.raises(ValueError, match="Unknown baseline option"):
    confusion.build_confusion({"cm_learning_rate": 1.0})
  # Config fields and keyword names agree, so each function's options come from the config.
  assert common.kwargs_for(pionono.loss_fn, {"kl_weight": 0.1}, pionono.DEFAULTS) == dict(
      train_samples=5, kl_weight=0.1, reg_weight=1e-5, rater_draw="image", dice_epsilon=1e-6)
  assert common.kwargs_for(pionono.make_optimizer, None, pionono.DEFAULTS) == dict(
      lr=1e-4, latent_lr=0.02)
  assert common.kwargs_for(confusion.loss_fn, None, confusion.DEFAULTS) == dict(
      alpha=1.0, min_trace=False, rater_draw="image", dice_epsilon=1e-6)
  assert common.kwargs_for(dpersona_heads.predict_fn, None, dpersona_heads.DEFAULTS) == dict(
      test_samples=500)
  assert common.kwargs_for(dpersona_heads.loss_fn, None, dpersona_heads.DEFAULTS) == dict(
      bn_drift=False, train_samples=100, dice_epsilon=1e-6)


def test_optimizer_groups_and_schedule():
  # Adam's first step moves every parameter by lr * schedule (gradient sign), so the
  # update of each group shows its rate.
  params = {"backbone": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)},
            "cm_heads": {"matrices": jnp.ones((4, 1, 1))}}
  tx = confusion.make_optimizer(lr=1e-4, cm_lr=1e-2, schedule=lambda step: 0.5)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["backbone"]["w"], -0.5e-4, rtol=1e-4)
  np.testing.assert_allclose(updates["head"]["w"], -0.5e-4, rtol=1e-4)
  np.testing.assert_allclose(updates["cm_heads"]["matrices"], -0.5e-2, rtol=1e-4)
  labels = pionono.param_labels({"backbone": 1, "head": 2, "latent": {"mu": 3}})
  assert labels == {"backbone": "backbone", "head": "backbone", "latent": {"mu": "latent"}}
  cosine = common.cosine_per_epoch(epochs=4, steps_per_epoch=10)
  assert [float(cosine(s)) for s in (0, 9, 10, 20, 40, 99)] == pytest.approx(
      [1.0, 1.0, 0.5 + 0.5 * np.cos(np.pi / 4), 0.5, 0.0, 0.0])


# ------------------------------------------------------------------ initialisers


def test_initialisers():
  """The initialisers specific to the baselines, on the small modules that hold them."""
  key, f = _key(0), jnp.zeros((1, 4, 4, 16))
  inits = jax.jit(lambda k: dict(
      latent=pionono.RaterLatents(4, 8, 2.0, 8.0).init(k),
      head=pionono.PiononoHead(16).init(k, f, jnp.zeros((1, 8))),
      global_cm=confusion.GlobalCM(4, 2).init(k, f),
      pixel_cm=confusion.PixelCMHead(2).init(k, f),
      seg_head=unet_head.seg_head(1).init(k, f),
      projection=dpersona_heads.ProjectionHead().init(k, f, False)))(key)
  latent = inits["latent"]["params"]
  np.testing.assert_array_equal(latent["scale_tril"], np.broadcast_to(2 * np.eye(8), (4, 8, 8)))
  assert 5.0 < float(jnp.std(latent["mu"])) < 11.0  # N(0, 8^2), 32 draws.
  head = inits["head"]["params"]
  assert head["hidden_0"]["kernel"].shape == (24, 16)
  for name, (fan_in, fan_out) in (("hidden_0", (24, 16)), ("hidden_1", (16, 16)),
                                  ("last", (16, 1))):  # Xavier uniform, zero bias.
    assert np.all(head[name]["bias"] == 0)
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(head[name]["kernel"]).max() <= bound
    assert np.abs(head[name]["kernel"]).max() > 0.5 * bound
  np.testing.assert_array_equal(inits["global_cm"]["params"]["matrices"],
                                np.broadcast_to(np.eye(2), (4, 2, 2)))
  pixel = inits["pixel_cm"]["params"]
  assert float(pixel["prelu0"]["negative_slope"]) == 0.25
  assert np.all(pixel["norm3"]["scale"] == 1) and np.all(pixel["norm3"]["bias"] == 0)
  assert np.abs(pixel["last"]["bias"]).max() <= 0.25  # PyTorch: U(+-1 / sqrt(16)).
  assert np.abs(pixel["conv0"]["kernel"]).max() <= 1 / 12  # U(+-1 / sqrt(144)).
  seg = inits["seg_head"]["params"]
  assert np.all(seg["bias"] == 0) and np.abs(seg["kernel"]).max() <= np.sqrt(6 / (144 + 9))
  proj = inits["projection"]["params"]
  assert np.abs(proj["level0_conv1"]["bias"]).max() <= 2e-3  # Truncated normal, std 1e-3.
  assert 0.6 < float(jnp.std(proj["level0_conv1"]["kernel"])) / np.sqrt(2 / 288) < 1.4


# ------------------------------------------------------------------ counts


def test_param_counts_exact():
  unet = _abstract(unet_head.init_variables, unet_head.build_unet())
  assert common.count(unet["params"]) == 24_430_097
  assert common.count(unet["params"]["head"]) == 145
  stack = _abstract(unet_head.init_variables, unet_head.build_unet({"num_models": 4}))
  assert common.count(stack["params"]) == 4 * 24_430_097

  cm_global = _abstract(confusion.init_variables, confusion.build_cm_global())
  assert common.count(cm_global["params"]) == 24_430_101
  assert common.count(cm_global["params"]["cm_heads"]) == 4
  cm_pixel = _abstract(confusion.init_variables, confusion.build_cm_pixel())
  assert common.count(cm_pixel["params"]) == 24_467_557
  assert common.count(cm_pixel["params"]["cm_heads"]) == 4 * 9_365

  pio = _abstract(pionono.init_variables, pionono.build_pionono())
  assert common.count(pio["params"]) == 24_430_929  # Trainable; the prior is no variable.
  assert {k: common.count(v) for k, v in pio["params"].items()} == {
      "backbone": 24_429_952, "head": 689, "latent": 288}
  assert set(pio) == {"params", "batch_stats"}

  stage1 = prob_unet.build_model(base_config().model.to_dict(), num_raters=4)
  dp = _abstract(dpersona_heads.init_variables,
                 dpersona_heads.build_dpersona_heads(stage1=stage1))
  assert list(dp["params"]) == ["heads"]
  assert common.count(dp["params"]) == 88_128
  leaves = jax.tree_util.tree_leaves(dp["params"]["heads"])
  assert all(leaf.shape[0] == 4 for leaf in leaves)
  assert sum(np.prod(leaf.shape[1:]) for leaf in leaves) == 22_032
  assert common.count(dp["frozen_params"]["backbone"]) == 24_429_952


# ------------------------------------------------------------------ unet


def test_unet_loss_step_and_predictions():
  model = unet_head.build_unet({**TINY, "rater": 2})
  variables = _variables(unet_head.init_variables, model)
  batch = _batch()
  loss, aux, _, grads = _loss_and_grad(unet_head.loss_fn, variables, model=model, batch=batch,
                                       rng=_key(1))
  logits = model.apply(variables, batch["image"])[..., 0]
  np.testing.assert_allclose(loss, losses.dice_loss(logits, batch["masks"][:, 2]), rtol=1e-6)
  assert all(n > 0 for n in _norms(grads).values())
  probs = unet_head.predict_fn(variables, batch["image"], model=model)
  assert probs.shape == (3, 1, SIZE, SIZE)
  np.testing.assert_allclose(probs[:, 0], jax.nn.sigmoid(logits), rtol=1e-6)
  assert unet_head.prediction_raters(model) == (None,)
  assert unet_head.prediction_raters(model, "own") == (2,)
  assert unet_head.method_name(model) == "unet_a3"


def test_unet_stack_trains_each_model_on_its_rater():
  model = unet_head.build_unet({**TINY, "unet_batch_norm": True, "num_models": 2})
  variables = _variables(unet_head.init_variables, model)
  batch = _batch()
  loss, aux, stats, grads = _loss_and_grad(unet_head.loss_fn, variables, model=model,
                                           batch=batch)
  # Model m alone, on rater m, gives the same loss and gradient as inside the stack.
  single = unet_head.build_unet({**TINY, "unet_batch_norm": True, "rater": 1})
  model1 = jax.tree_util.tree_map(lambda x: x[1], variables)
  loss1, _, stats1, grads1 = _loss_and_grad(unet_head.loss_fn, model1, model=single,
                                            batch=batch)
  np.testing.assert_allclose(aux["loss_m1"], loss1, rtol=1e-6)
  np.testing.assert_allclose(loss, aux["loss_m0"] + aux["loss_m1"], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads1)):
    np.testing.assert_allclose(a[1], b, rtol=1e-4, atol=1e-7)
  for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(stats1)):
    np.testing.assert_allclose(a[1], b, rtol=1e-5, atol=1e-7)
  assert unet_head.predict_fn(variables, batch["image"], model=model).shape == (3, 2, SIZE,
                                                                                SIZE)
  assert unet_head.prediction_raters(model, "own") == (0, 1)


# ------------------------------------------------------------------ confusion matrices


@pytest.mark.parametrize("level", ["global", "pixel"])
def test_cm_as_run_is_degenerate(level):
  model = confusion.build_confusion({**TINY, "level": level})
  assert confusion.method_name(model) == f"cm_{level}"
  variables = _variables(confusion.init_variables, model)
  batch = _batch()
  loss, aux, _, grads = _loss_and_grad(confusion.loss_fn, variables, model=model, batch=batch,
                                       rng=_key(1))
  logits, _ = model.apply(variables, batch["image"])
  target = common.take_per_image(batch["masks"], aux["raters"])
  gdl = losses.dice_loss(logits[..., 0], target)
  assert float(aux["trace"]) == 1.0
  # Loss = GDL - 1: the Dice term is the plain U-Net's GDL bit for bit, and the sum
  # within the last bit of float32 (XLA fuses the final additions).
  np.testing.assert_array_max_ulp(loss, np.float32(aux["seg"]) - np.float32(1.0), maxulp=1)
  np.testing.assert_array_equal(aux["seg"], jax.jit(losses.dice_loss)(logits[..., 0], target))
  np.testing.assert_allclose(aux["seg"], gdl, rtol=1e-6)
  cm_grad = max(_norms(grads["cm_heads"]).values())
  assert cm_grad < 1e-6 < min(_norms(grads["backbone"]).values())
  probs = confusion.predict_fn(variables, batch["image"], model=model)
  assert probs.shape == (3, 4, SIZE, SIZE)
  for r in range(4):
    np.testing.assert_array_equal(probs[:, r], probs[:, 0])
  np.testing.assert_allclose(probs[:, 0], jax.nn.sigmoid(logits[..., 0]), rtol=1e-6)
  assert confusion.prediction_raters(model) == (0, 1, 2, 3)


def test_cm_noisy_prediction_by_hand():
  model = confusion.build_confusion({**TINY, "num_classes": 2})
  m_CC = confusion.normalise_columns(jnp.array([[3.0, 1.0], [1.0, 1.0]]))
  np.testing.assert_allclose(m_CC, [[0.75, 0.5], [0.25, 0.5]])
  logits = jnp.log(jnp.array([0.2, 0.8]))  # softmax -> (0.2, 0.8).
  np.testing.assert_allclose(confusion.noisy_prediction(model, logits, m_CC), [0.55, 0.45],
                             rtol=1e-6)


@pytest.mark.parametrize("level", ["global", "pixel"])
def test_cm_two_class_variant_is_not_degenerate(level):
  model = confusion.build_confusion({**TINY, "level": level, "num_classes": 2})
  assert confusion.method_name(model) == f"cm_{level}_2class"
  variables = _variables(confusion.init_variables, model)
  # Different matrices per rater (the pixel heads differ already by initialisation).
  if level == "global":
    perturb = jnp.array([[[2.0, -1.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 2.0]],
                         [[1.0, 0.0], [0.0, 1.0]], [[3.0, 2.0], [-2.0, 0.5]]])
    variables["params"]["cm_heads"]["matrices"] = perturb
  batch = _batch()
  loss, aux, _, grads = _loss_and_grad(confusion.loss_fn, variables, model=model, batch=batch,
                                       rng=_key(1))
  assert 0.0 < float(aux["trace"]) < 2.0 and float(aux["trace"]) != 1.0
  assert min(_norms(grads["cm_heads"]).values()) > 1e-6
  probs = confusion.predict_fn(variables, batch["image"], model=model)
  assert probs.shape == (3, 4, SIZE, SIZE)
  assert np.all((probs >= 0) & (probs <= 1))
  for r in range(1, 4):
    assert float(jnp.max(jnp.abs(probs[:, r] - probs[:, 0]))) > 1e-3


# ------------------------------------------------------------------ Pionono


def _np_kl(mu_q, l_q, mu_p, l_p):
  """KL of full-covariance Gaussians in float64 from inverse and determinants."""
  mu_q, l_q, mu_p, l_p = (np.asarray(a, np.float64) for a in (mu_q, l_q, mu_p, l_p))
  s_q, s_p = l_q @ l_q.T, l_p @ l_p.T
  s_p_inv = np.linalg.inv(s_p)
  d = mu_p - mu_q
  return 0.5 * (np.trace(s_p_inv @ s_q) + d @ s_p_inv @ d - len(mu_q)
                + np.log(np.linalg.det(s_p)) - np.log(np.linalg.det(s_q)))


def test_pionono_kl_matches_float64():
  rng = np.random.default_rng(0)
  b, d = 16, 8
  mu_q = 8.0 * rng.standard_normal((b, d))  # The initial spread of the rater means.
  l_q = np.tril(0.5 * rng.standard_normal((b, d, d)), -1)
  l_q += np.einsum("bi,ij->bij", rng.uniform(0.1, 5.0, (b, d)), np.eye(d))
  model = pionono.build_pionono(TINY)
  mu_p, l_p = pionono.prior(model, b)
  kl = pionono.kl_mvn_tril(jnp.asarray(mu_q, jnp.float32), jnp.asarray(l_q, jnp.float32),
                           mu_p, l_p)
  assert kl.dtype == jnp.float32
  expected = [_np_kl(mu_q[i], l_q[i], np.zeros(d), 2.0 * np.eye(d)) for i in range(b)]
  np.testing.assert_allclose(kl, expected, rtol=2e-6)  # The tolerance pionono.py states.
  # A full-covariance prior too, and the initial posterior (mu = 0, L = 2I) has KL 0.
  l_p2 = l_q[::-1].copy()
  kl2 = pionono.kl_mvn_tril(jnp.asarray(mu_q, jnp.float32), jnp.asarray(l_q, jnp.float32),
                            jnp.asarray(mu_q[::-1], jnp.float32), jnp.asarray(l_p2, jnp.float32))
  np.testing.assert_allclose(
      kl2, [_np_kl(mu_q[i], l_q[i], mu_q[::-1][i], l_p2[i]) for i in range(b)], rtol=1e-4)
  np.testing.assert_allclose(pionono.kl_mvn_tril(*pionono.prior(model, 2), *pionono.prior(
      model, 2)), 0.0, atol=1e-6)


def _linear_head(params):
  """Head weights that output the latent's first coordinate (when >= 0) as the logit."""
  params = jax.tree_util.tree_map(jnp.zeros_like, params)
  head = params["head"]
  head["hidden_0"]["kernel"] = head["hidden_0"]["kernel"].at[16, 0].set(1.0)  # z_0 -> unit 0.
  head["hidden_1"]["kernel"] = head["hidden_1"]["kernel"].at[0, 0].set(1.0)
  head["last"]["kernel"] = head["last"]["kernel"].at[0, 0].set(1.0)
  return params


def test_pionono_averages_logits_not_probabilities():
  model = pionono.build_pionono(TINY)
  variables = _variables(pionono.init_variables, model)
  params = _linear_head(variables["params"])
  features = model.apply(variables, _batch()["image"], method="features")
  z_SBD = jnp.zeros((2, 3, 8)).at[0, :, 0].set(4.0)  # Logits 4 and 0 at every pixel.
  mean = pionono.mean_logits(model, params, features, z_SBD)
  np.testing.assert_allclose(mean, 2.0)  # Probabilities would give sigmoid^-1(0.741) = 1.05.
  # The loss's Dice uses that mean, of the samples drawn for each image's rater.
  batch, rng = _batch(), _key(5)
  _, aux, _, grads = _loss_and_grad(pionono.loss_fn, variables, model=model, batch=batch,
                                    rng=rng)
  rng_rater, rng_z = jax.random.split(rng)
  rater_B = common.draw_raters(rng_rater, 3, 4, "image")
  np.testing.assert_array_equal(aux["raters"], rater_B)
  mu_RD, tril_RDD = model.apply(variables, method="posteriors")
  z_SBD = pionono.sample_latents(rng_z, mu_RD[rater_B], tril_RDD[rater_B], 5)
  feats = model.apply(variables, batch["image"], method="features")
  logits_SBHW = jax.vmap(lambda z: model.apply(variables, feats, z, method="decode"))(z_SBD)
  target = common.take_per_image(batch["masks"], rater_B)
  np.testing.assert_allclose(aux["seg"], losses.dice_loss(logits_SBHW.mean(0), target),
                             rtol=1e-5)
  by_probs = losses.dice_loss_probs(jax.nn.sigmoid(logits_SBHW).mean(0), target)
  assert abs(float(by_probs) - float(aux["seg"])) > 1e-5
  np.testing.assert_allclose(aux["kl"], jnp.mean(pionono.kl_mvn_tril(
      mu_RD[rater_B], tril_RDD[rater_B], *pionono.prior(model, 3))), rtol=1e-6)
  norms = [float(jnp.linalg.norm(x)) for n in ("hidden_0", "hidden_1")
           for x in jax.tree_util.tree_leaves(variables["params"]["head"][n])]
  np.testing.assert_allclose(aux["reg"], sum(norms), rtol=1e-6)
  # Every group learns; the upper triangle of L is unused.
  g = _norms(grads)
  assert all(v > 0 for k, v in g.items() if "scale_tril" not in k)
  assert np.all(np.triu(grads["latent"]["scale_tril"], 1) == 0)
  assert np.any(grads["latent"]["scale_tril"] != 0)


def test_pionono_predictions_in_rater_order():
  model = pionono.build_pionono(TINY)
  variables = _variables(pionono.init_variables, model)
  params = _linear_head(variables["params"])
  params["latent"]["mu"] = jnp.zeros((4, 8)).at[:, 0].set(jnp.array([3.0, 1.0, 2.0, 0.5]))
  params["latent"]["scale_tril"] = 1e-4 * jnp.broadcast_to(jnp.eye(8), (4, 8, 8))
  probs = pionono.predict_fn({**variables, "params": params}, _batch()["image"],
                             _key(0), model=model)
  assert probs.shape == (3, 4, SIZE, SIZE)
  np.testing.assert_allclose(probs, jax.nn.sigmoid(jnp.array([3.0, 1.0, 2.0, 0.5]))[
      None, :, None, None] * jnp.ones_like(probs), rtol=1e-3)
  assert pionono.prediction_raters(model) == (0, 1, 2, 3)


# ------------------------------------------------------------------ D-Persona heads


def _stage2(**stage1_overrides):
  cfg = base_config().model.to_dict()
  cfg.update(backbone="unet", unet_filters=(8, 16), gaussian_filters=(4, 8),
             convs_per_block=1, **stage1_overrides)
  stage1 = prob_unet.build_model(cfg, num_raters=4)
  model = dpersona_heads.build_dpersona_heads(stage1=stage1)
  return model, _variables(dpersona_heads.init_variables, model)


def test_dpersona_head_spatial_sizes_and_queries():
  head = dpersona_heads.ProjectionHead()
  f = jnp.zeros((1, 128, 128, 16))
  _, state = jax.eval_shape(lambda: head.init_with_output(
      _key(0), f, False, capture_intermediates=True))
  sizes = [state["intermediates"][f"level{i}_conv{k}"]["__call__"][0].shape[1]
           for i in range(3) for k in range(2)]
  # Each conv grows the map by 4 (3x3, pad 3); the pools halve it: 136 -> 68, 76 -> 38.
  assert sizes == [132, 136, 72, 76, 42, 46]
  model, variables = _stage2()
  features = 3.0 * jax.random.normal(_key(1), (2, SIZE, SIZE, 16))
  q_BRD = model.heads.apply({"params": variables["params"]["heads"]}, features, False)
  assert q_BRD.shape == (2, 4, 6)
  assert float(q_BRD.min()) >= 0.0 and float(q_BRD.max()) > 0.0
  assert not np.allclose(q_BRD[:, 0], q_BRD[:, 1])  # Four different heads.


def test_dpersona_softmax_is_unscaled():
  q_BRD = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
  bank_BND = jnp.array([[[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]]])
  z = dpersona_heads.select_latents(q_BRD, bank_BND)
  w0 = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()  # <q_0, z_n> = 0, 1, 2.
  w1 = np.exp([0.0, 2.0, -2.0]) / np.exp([0.0, 2.0, -2.0]).sum()
  np.testing.assert_allclose(z[0], [w0 @ np.asarray(bank_BND[0]), w1 @ np.asarray(bank_BND[0])],
                             rtol=1e-6)


def test_dpersona_dropout2d_only_in_training():
  head = dpersona_heads.ProjectionHead()
  f = jax.random.normal(_key(0), (2, SIZE, SIZE, 16))
  params = _fill(jax.eval_shape(lambda k: head.init(k, f, False), _key(1)))
  np.testing.assert_array_equal(head.apply(params, f, False), head.apply(params, f, False))
  out_a = head.apply(params, f, True, rngs={"dropout": _key(2)})
  out_b = head.apply(params, f, True, rngs={"dropout": _key(3)})
  assert not np.allclose(out_a, out_b)
  _, state = head.apply(params, f, True, rngs={"dropout": _key(2)},
                        capture_intermediates=True)
  pre = jax.nn.relu(state["intermediates"]["level0_conv0"]["__call__"][0])
  post = state["intermediates"]["level0_dropout"]["__call__"][0]
  # Whole feature maps are dropped or kept (scaled by 1 / 0.9): one choice per (b, c).
  dropped = np.all(np.asarray(post) == 0, axis=(1, 2)) & np.any(np.asarray(pre) > 0, axis=(1, 2))
  assert 0 < dropped.sum() < dropped.size
  kept = np.where(dropped[:, None, None, :], 0.0, np.asarray(pre) / 0.9)
  np.testing.assert_allclose(post, kept, rtol=1e-5)


@pytest.mark.parametrize("bn_drift", [False, True])
def test_dpersona_loss_step_and_bn_drift(bn_drift):
  model, variables = _stage2(unet_batch_norm=True)
  batch = _batch()
  loss, _, stats, grads = _loss_and_grad(
      dpersona_heads.loss_fn, variables, model=model, batch=batch, rng=_key(1),
      frozen_params=variables["frozen_params"], bn_drift=bn_drift, train_samples=7)
  assert list(grads) == ["heads"]
  per_head = jax.tree_util.tree_map(lambda g: jnp.linalg.norm(g.reshape(4, -1), axis=1),
                                    grads["heads"])
  assert np.all(sum(jax.tree_util.tree_leaves(per_head)) > 0)  # Every head learns.
  old, new = (jax.tree_util.tree_leaves(s) for s in (variables["batch_stats"], stats))
  changed = any(not np.array_equal(a, b) for a, b in zip(old, new))
  assert changed == bn_drift
  # Evaluation mode never drifts, whatever the option.
  _, (_, eval_stats) = dpersona_heads.loss_fn(
      variables["params"], variables["batch_stats"], model=model, batch=batch,
      rng=_key(1), frozen_params=variables["frozen_params"], train=False,
      bn_drift=True, train_samples=7)
  assert all(np.array_equal(a, b) for a, b in zip(old, jax.tree_util.tree_leaves(eval_stats)))
  # The loss is the 4-channel foreground GDL of the heads' decodes.
  probs = dpersona_heads.predict_fn(variables, batch["image"], _key(2),
                                    model=model, test_samples=9)
  assert probs.shape == (3, 4, SIZE, SIZE)
  assert dpersona_heads.prediction_raters(model) == (0, 1, 2, 3)
  assert 0.0 < float(loss) < 1.0

"""Stage-1 models: exact parameter counts, shapes, layers, pretrained loading."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from prosona_jax.config_defaults import base_config
from prosona_jax.models import backbone as backbone_lib
from prosona_jax.models import pretrained
from prosona_jax.models import prob_unet as pu


def _model(**overrides) -> pu.ProbUNet:
  cfg = base_config().model.to_dict()
  cfg.update(overrides)
  return pu.build_model(cfg, num_raters=4)


def _abstract_variables(model, image_size=128, in_channels=1):
  x, m = pu.init_inputs(model, image_size=image_size, in_channels=in_channels)
  return jax.eval_shape(lambda rng: model.init(rng, x, m), jax.random.key(0))


@pytest.mark.parametrize("posterior_input,posterior_count",
                         [("one_random", 1_967_868), ("all", 1_968_300)])
def test_resnet_param_counts_exact(posterior_input, posterior_count):
  variables = _abstract_variables(_model(posterior_input=posterior_input))
  counts = pu.count_params(variables["params"])
  assert counts == {
      "backbone": 24_429_952, "encoder": 21_278_400, "decoder": 3_151_552,
      "prior": 1_967_724, "posterior": posterior_count, "fcomb": 929,
      "total": 24_429_952 + 1_967_724 + posterior_count + 929}


def test_resnet_shapes():
  model = _model()
  x = jnp.zeros((2, 64, 64, 1))
  variables = _abstract_variables(model, image_size=64)
  feats = jax.eval_shape(lambda v: model.apply(v, x, method="features"), variables)
  assert feats.shape == (2, 64, 64, 16)
  enc = backbone_lib.ResNet34Encoder()
  skips = jax.eval_shape(lambda: enc.init_with_output(jax.random.key(0), x, False)[0])
  assert [s.shape for s in skips] == [(2, 32, 32, 64), (2, 16, 16, 64), (2, 8, 8, 128),
                                      (2, 4, 4, 256), (2, 2, 2, 512)]
  stats = variables["batch_stats"]["backbone"]
  assert stats["encoder"]["layer2_0"]["downsample_bn"]["mean"].shape == (128,)
  assert stats["decoder"]["block4"]["bn2"]["var"].shape == (16,)


def random_variables(model, *, image_size, in_channels, seed=0):
  """He-scaled random variables from shapes alone: no compiled init, so tests stay fast.

  `model.init` compiles one threefry kernel per parameter, which takes seconds on CPU;
  the real initialisers are checked once in `test_initialisers`.
  """
  x, m = pu.init_inputs(model, image_size=image_size, in_channels=in_channels)
  shapes = jax.eval_shape(lambda rng: model.init(rng, x, m), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name in ("kernel",):
      std = np.sqrt(2.0 / np.prod(s.shape[:-1]))
      return jnp.asarray(std * rng.standard_normal(s.shape), jnp.float32)
    return jnp.ones(s.shape) if name in ("scale", "var") else jnp.zeros(s.shape)

  variables = jax.tree_util.tree_map_with_path(fill, dict(shapes))
  variables.setdefault("batch_stats", {})
  return variables


def test_plain_unet_shapes_and_methods():
  model = _model(backbone="unet", unet_filters=(8, 16, 32), gaussian_filters=(4, 8))
  variables = random_variables(model, image_size=32, in_channels=2)
  assert variables["batch_stats"] == {}
  assert "project" in variables["params"]["backbone"]  # 8 filters -> 16 features.
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 2))
  feats = model.apply(variables, x, method="features")
  assert feats.shape == (3, 32, 32, 16)
  mu, log_sigma = model.apply(variables, x, method="prior_dist")
  assert mu.shape == log_sigma.shape == (3, 6)
  mu_q, _ = model.apply(variables, x, jnp.ones((3, 32, 32, 1)), method=model.posterior_dist)
  assert mu_q.shape == (3, 6)
  with pytest.raises(ValueError, match="mask channels"):
    model.apply(variables, x, jnp.ones((3, 32, 32, 4)), method="posterior_dist")
  masks_BRHW = jax.random.bernoulli(jax.random.key(3), 0.5, (3, 4, 32, 32))
  np.testing.assert_array_equal(model.posterior_condition(masks_BRHW, 2)[..., 0],
                                masks_BRHW[:, 2])
  assert _model(posterior_input="all").posterior_condition(masks_BRHW).shape == (
      3, 32, 32, 4)
  logits = model.apply(variables, feats, mu, method="decode")
  assert logits.shape == (3, 32, 32)
  # K latents decoded by vmap over Fcomb equal a loop of single decodes.
  z_KBD = jax.random.normal(jax.random.key(2), (4, 3, 6))
  batched = pu.decode_samples(model, variables["params"], feats, z_KBD)
  looped = jnp.stack([model.apply(variables, feats, z, method="decode") for z in z_KBD])
  np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5)


def test_initialisers():
  model = _model(backbone="unet", unet_filters=(16,), gaussian_filters=(4,),
                 convs_per_block=1)
  params = pu.init_variables(model, jax.random.key(0), image_size=8,
                             in_channels=1)["params"]
  for name in ("hidden_0", "hidden_1", "hidden_2"):  # Orthogonal columns.
    k = params["fcomb"][name]["kernel"]
    np.testing.assert_allclose(k.T @ k, np.eye(k.shape[1]), atol=1e-5)
  assert params["fcomb"]["hidden_0"]["kernel"].shape == (22, 16)
  biases = params["prior"]["level0_conv0"]["bias"]
  assert np.all(np.abs(biases) <= 2e-3) and np.any(biases != 0)  # Tiny truncated normal.
  kernel = params["backbone"]["down0_conv0"]["kernel"]  # Kaiming normal, fan_in = 9.
  assert 0.2 < np.std(kernel) < 0.75
  assert np.std(params["prior"]["mu_log_sigma"]["bias"]) > 0.1  # N(0, 1).


def test_avg_pool_ceil_mode():
  x = jnp.arange(25.0).reshape(1, 5, 5, 1)
  y = backbone_lib.avg_pool_ceil(x)[0, ..., 0]
  assert y.shape == (3, 3)
  assert y[0, 0] == (0 + 1 + 5 + 6) / 4
  assert y[0, 2] == (4 + 9) / 2  # Edge window averages only pixels that exist.
  assert y[2, 2] == 24


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (3, 17, 9, 2)])
def test_stem_max_pool_matches_flax_exactly(shape):
  """Values and gradient bit for bit, ties included (ReLU zeros tie all the time)."""
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.standard_normal((shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2,
                                       shape[3])), jnp.float32)
  ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  for x in (np.maximum(rng.integers(-3, 4, shape), 0) * 0.5, rng.standard_normal(shape)):
    x = jnp.asarray(x, jnp.float32)
    want, want_vjp = jax.vjp(ref, x)
    got, got_vjp = jax.vjp(backbone_lib.max_pool_3x3_s2, x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jax.jit(got_vjp)(g)[0], jax.jit(want_vjp)(g)[0])


def test_bilinear_align_corners():
  x = jnp.array([0.0, 3.0, 6.0]).reshape(1, 3, 1, 1) * jnp.ones((1, 1, 2, 1))
  y = backbone_lib.upsample_bilinear_align_corners(x)[0, :, 0, 0]
  np.testing.assert_allclose(y, np.linspace(0.0, 6.0, 6), atol=1e-6)


# ------------------------------------------------------------------ pretrained


@pytest.fixture(scope="module")
def encoder_shapes():
  """Shapes of ResNet34Encoder's variables for 1-channel input."""
  enc = backbone_lib.ResNet34Encoder()
  x = jnp.zeros((1, 32, 32, 1))
  v = jax.eval_shape(lambda rng: enc.init(rng, x, False), jax.random.key(0))
  zeros = lambda tree: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)
  return zeros(v["params"]), zeros(v["batch_stats"])


def _torchvision_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Random tensors under torchvision ResNet-34 names and OIHW layouts."""
  r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  state = {"conv1.weight": r(64, 3, 7, 7), "fc.weight": r(1000, 512), "fc.bias": r(1000)}

  def bn(prefix, c):
    for name in ("weight", "bias", "running_mean", "running_var"):
      state[f"{prefix}.{name}"] = r(c)
    state[f"{prefix}.num_batches_tracked"] = np.array(5, np.int64)

  bn("bn1", 64)
  c_in = 64
  for i, (blocks, c) in enumerate(zip(backbone_lib.RESNET34_LAYERS,
                                      backbone_lib.RESNET34_WIDTHS)):
    for j in range(blocks):
      p = f"layer{i + 1}.{j}"
      state[f"{p}.conv1.weight"] = r(c, c_in if j == 0 else c, 3, 3)
      state[f"{p}.conv2.weight"] = r(c, c, 3, 3)
      bn(f"{p}.bn1", c)
      bn(f"{p}.bn2", c)
      if i > 0 and j == 0:
        state[f"{p}.downsample.0.weight"] = r(c, c_in, 1, 1)
        bn(f"{p}.downsample.1", c)
    c_in = c
  return state


def test_pretrained_maps_torchvision_file(tmp_path, encoder_shapes):
  state = _torchvision_state(np.random.default_rng(0))
  path = str(tmp_path / "resnet34.safetensors")
  save_file(state, path)
  enc_p, enc_s = encoder_shapes
  params = {"backbone": {"encoder": enc_p, "decoder": {"x": np.ones(3)}}}
  stats = {"backbone": {"encoder": enc_s, "decoder": {}}}
  new_p, new_s = pretrained.load_resnet34_encoder(path, params, stats, in_channels=1)
  enc, st = new_p["backbone"]["encoder"], new_s["backbone"]["encoder"]
  # 1-channel input: the RGB kernels summed, OIHW -> HWIO.
  np.testing.assert_allclose(
      enc["conv1"]["kernel"],
      state["conv1.weight"].sum(1, keepdims=True).transpose(2, 3, 1, 0), rtol=1e-6)
  np.testing.assert_array_equal(enc["layer3_5"]["conv2"]["kernel"],
                                state["layer3.5.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(enc["layer2_0"]["downsample_conv"]["kernel"][0, 0],
                                state["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(enc["layer4_0"]["downsample_bn"]["scale"],
                                state["layer4.0.downsample.1.weight"])
  np.testing.assert_array_equal(st["bn1"]["var"], state["bn1.running_var"])
  np.testing.assert_array_equal(st["layer1_2"]["bn2"]["mean"],
                                state["layer1.2.bn2.running_mean"])
  assert new_p["backbone"]["decoder"] is params["backbone"]["decoder"]
  assert not np.any(enc_p["conv1"]["kernel"])  # The caller's trees are not mutated.
  # Every encoder tensor was overwritten (the placeholders were zeros).
  assert all(np.any(np.asarray(x) != 0) for x in jax.tree_util.tree_leaves((enc, st)))

  del state["layer3.2.bn1.running_mean"]
  save_file(state, path)
  with pytest.raises(pretrained.PretrainedWeightsError, match="layer3.2.bn1.running_mean"):
    pretrained.load_resnet34_encoder(path, params, stats, in_channels=1)


def test_pretrained_errors_and_first_conv(encoder_shapes):
  state = _torchvision_state(np.random.default_rng(1))
  state["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"][:32]
  enc_p, enc_s = encoder_shapes
  with pytest.raises(pretrained.PretrainedWeightsError, match="layer1.0.conv2.weight"):
    pretrained.load_encoder_weights(state, enc_p, enc_s)
  w = np.random.default_rng(2).standard_normal((4, 3, 7, 7))
  np.testing.assert_array_equal(pretrained.adapt_first_conv(w, 3), w)
  five = pretrained.adapt_first_conv(w, 5)
  np.testing.assert_allclose(five[:, 4], w[:, 1] * 3 / 5)


def test_hwio_conv_matches_pytorch_convention():
  """A kernel transposed OIHW -> HWIO computes PyTorch's strided, padded conv."""
  rng = np.random.default_rng(3)
  w_OIHW = rng.standard_normal((5, 2, 7, 7)).astype(np.float32)
  x_NCHW = rng.standard_normal((1, 2, 12, 12)).astype(np.float32)
  ref = jax.lax.conv_general_dilated(x_NCHW, w_OIHW, (2, 2), ((3, 3), (3, 3)),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
  layer = nn.Conv(5, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False)
  out = layer.apply({"params": {"kernel": w_OIHW.transpose(2, 3, 1, 0)}},
                    x_NCHW.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(out.transpose(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-4)


def test_plain_unet_batch_norm_option():
  """BatchNorm after each conv: scale/bias instead of conv biases, stats in batch_stats."""
  x = jnp.linspace(0.0, 1.0, 2 * 16 * 16).reshape(2, 16, 16, 1)
  plain = backbone_lib.PlainUNet(filters=(4, 8), feature_channels=4, convs_per_block=2)
  normed = backbone_lib.PlainUNet(filters=(4, 8), feature_channels=4, convs_per_block=2,
                                  batch_norm=True)
  v_plain = plain.init(jax.random.key(0), x)
  v_bn = normed.init(jax.random.key(0), x)
  count = lambda t: sum(a.size for a in jax.tree.leaves(t))
  convs = [k for k in v_plain["params"] if "_conv" in k]
  # Each conv drops its bias (C) and gains a BatchNorm scale and bias (2C).
  extra = sum(v_plain["params"][k]["bias"].size for k in convs)
  assert count(v_bn["params"]) == count(v_plain["params"]) + extra
  assert "batch_stats" in v_bn and "batch_stats" not in v_plain
  out, updates = normed.apply(v_bn, x, True, mutable=["batch_stats"])
  assert out.shape == (2, 16, 16, 4)
  before = jax.tree.leaves(v_bn["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))

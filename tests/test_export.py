"""Exports: the folder's contents, exact weights, and serialized functions = the model."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from prosona_jax import exporter as export
from prosona_jax import inference
from prosona_jax import model_loader
from prosona_jax import parallel
from prosona_jax import prompt_bank
from prosona_jax.methods import prosona_stage2 as stage2
from prosona_jax.models import prob_unet
from prosona_jax.models import prompt as prompt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tiny_run):
  """The run's config, frozen Stage-1 variables and projector params, read the training way."""
  config = inference.load_config(tiny_run)
  model = prob_unet.build_from_config(config)
  frozen = stage2.load_frozen(
      config, os.path.join(tiny_run, "fold0", "stage1", "checkpoints"), parallel.make_mesh())
  run = inference.load_run(tiny_run)
  proj = inference.unflatten(run.weights)["projector"]
  return config, model, jax.device_get(frozen), proj


def test_folder_holds_weights_config_bank_functions_and_readme(tiny_export, tiny_run):
  files = set(os.listdir(tiny_export))
  assert {"params.safetensors", "config.json", "prompt_bank.npz", "README.md",
          "encode.jaxexport", "decode_prompts.jaxexport", "decode_latents.jaxexport",
          "prompt_probs.jaxexport", "prior.jaxexport", "decode.jaxexport"} <= files
  with open(os.path.join(tiny_export, "config.json")) as f:
    meta = json.load(f)
  assert meta["format"] == export.FORMAT and meta["format_version"] == export.FORMAT_VERSION
  assert meta["data"]["image_size"] == 32 and meta["data"]["num_raters"] == 4
  assert meta["model"]["backbone"] == "unet" and meta["stage2"]["eval_num_samples"] == 4
  assert meta["text"]["kind"] == "tiny_bert" and meta["source"]["fold"] == 0
  assert "b,p,32,32" in meta["functions"]["prompt_probs"]["outputs"][0]
  assert meta["num_prior_samples"] == 4
  assert meta["functions"]["encode"]["outputs"][0] == "features: float32[b,32,32,4]"
  assert "z: float32[b,4,6]" in meta["functions"]["encode"]["outputs"][3]
  bank = prompt_bank.PromptBank.load(os.path.join(tiny_export, "prompt_bank.npz"))
  run_bank = prompt_bank.PromptBank.load(os.path.join(tiny_run, "fold0", "stage2",
                                                      "prompt_bank.npz"))
  assert bank.prompts == run_bank.prompts
  np.testing.assert_array_equal(bank.embeddings, run_bank.embeddings)
  with open(os.path.join(tiny_export, "README.md")) as f:
    text = f.read()
  assert "prompt_probs.jaxexport" in text and "load('decode_prompts')" in text


def test_params_safetensors_reload_into_the_model_exactly(tiny_export, trained):
  _, _, state, proj = trained
  tree = inference.unflatten(load_file(os.path.join(tiny_export, "params.safetensors")))
  assert set(tree) == {"params", "projector"}  # The plain U-Net has no batch_stats.
  assert jax.tree.structure(tree["params"]) == jax.tree.structure(state["params"])
  for got, want in zip(jax.tree.leaves(tree["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(jax.tree.leaves(tree["projector"]), jax.tree.leaves(proj)):
    np.testing.assert_array_equal(got, want)


def _reference(config, model, state, proj, images, emb, keys):
  """Prompt probabilities with the training code's pieces (prompt_lib.prompt_logits)."""
  projector = prompt_lib.build_projector(config)

  @jax.jit
  def run(frozen, proj, images, emb, keys):
    feats = model.apply(frozen, images, False, method="features")
    mu, log_sigma = model.apply(frozen, images, method="prior_dist")
    eps = jnp.stack([jax.random.normal(jax.random.wrap_key_data(keys[i]), (4, mu.shape[-1]))
                     for i in range(keys.shape[0])])
    z = mu[:, None] + jnp.exp(log_sigma)[:, None] * eps
    logits, _, _ = prompt_lib.prompt_logits(model, frozen, projector, proj,
                                            prompt_lib.Shared(feats, z), emb, scale_scores=True)
    return jax.nn.sigmoid(logits), mu, log_sigma, feats

  frozen = state
  probs, mu, log_sigma, feats = run(frozen, proj, images, emb, keys)
  return np.asarray(probs), (mu, log_sigma), (frozen, feats)


@pytest.mark.parametrize("batch", [1, 5])
def test_exported_functions_match_the_model(tiny_export, trained, batch):
  config, model, state, proj = trained
  loaded = model_loader.load_export(tiny_export)
  rng = np.random.default_rng(batch)
  images = rng.random((batch, 32, 32, 1), np.float32)
  emb = loaded.bank.embeddings[:6]
  keys = inference.image_keys(7, np.arange(batch))
  want, (mu, log_sigma), (frozen, feats) = _reference(config, model, state, proj, images,
                                                      emb, keys)
  got = np.asarray(loaded.fns["prompt_probs"](images, emb, keys))
  assert got.shape == (batch, 6, 32, 32)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  e_mu, e_log = loaded.fns["prior"](images)
  np.testing.assert_allclose(e_mu, mu, atol=1e-5)
  np.testing.assert_allclose(e_log, log_sigma, atol=1e-5)
  z = rng.normal(size=(batch, 3, 6)).astype(np.float32)
  decode = jax.jit(lambda f, z: model.apply(frozen, f, z, method="decode"))
  want_logits = np.stack([decode(feats, z[:, j]) for j in range(3)], 1)
  np.testing.assert_allclose(loaded.fns["decode"](images, z), want_logits, atol=1e-5)
  # Each image draws from its own key: the first image's masks ignore the batch around it.
  alone = loaded.fns["prompt_probs"](images[:1], emb, keys[:1])
  np.testing.assert_allclose(alone, got[:1], atol=1e-6)
  # The split functions: the image part once, then any prompts or latents on its features.
  e_feats, e_mu2, e_log2, e_z = loaded.fns["encode"](images, keys)
  np.testing.assert_allclose(e_feats, feats, atol=1e-5)
  np.testing.assert_allclose(e_mu2, mu, atol=1e-5)
  np.testing.assert_allclose(e_log2, log_sigma, atol=1e-5)
  assert e_z.shape == (batch, 4, 6)
  np.testing.assert_allclose(loaded.fns["decode_prompts"](e_feats, e_z, emb), want, atol=1e-5)
  np.testing.assert_allclose(loaded.fns["decode_latents"](e_feats, z), want_logits, atol=1e-5)
  # Prompts one at a time on the same features give the same masks as all at once.
  one = loaded.fns["decode_prompts"](e_feats, e_z, emb[2:3])
  np.testing.assert_allclose(one[:, 0], want[:, 2], atol=1e-5)


def test_cli_exports_a_stage2_dir_and_needs_a_config_when_none_was_saved(
    tiny_run, tiny_export, tmp_path):
  out = str(tmp_path / "cell")
  proc = subprocess.run(
      [sys.executable, "-m", "prosona_jax.export", f"--workdir={tiny_run}", f"--out={out}",
       "--fold=0", f"--stage2_dir={os.path.join(tiny_run, 'fold0', 'stage2')}",
       "--platforms=cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["source"]["stage2_dir"].endswith(os.path.join("fold0", "stage2"))
  got, want = (load_file(os.path.join(d, "params.safetensors")) for d in (out, tiny_export))
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  empty = tmp_path / "old_run"
  empty.mkdir()
  with pytest.raises(inference.InferenceError, match="config.json: not found.*--config"):
    export.export_run(str(empty), str(tmp_path / "x"))


def test_exports_one_cell_of_a_grid_checkpoint(tiny_run, trained, tmp_path):
  from prosona_jax import checkpointing
  config, _, _, proj = trained
  # A grid trained in one program stacks every cell's projector on a leading axis.
  cells = len(config.stage2.grid_alpha) * len(config.stage2.grid_beta)
  stacked = jax.tree.map(lambda x: np.stack([x + c for c in range(cells)]), proj)
  grid_dir = tmp_path / "fold0" / "grid"
  ckpt = checkpointing.Checkpointer(str(grid_dir / "checkpoints"))
  ckpt.save(3, {"params": stacked, "step": np.asarray(3)})
  ckpt.close()
  shutil.copy(os.path.join(tiny_run, "fold0", "stage2", "prompt_bank.npz"), grid_dir)
  with pytest.raises(inference.InferenceError,
                     match=r"9 cells.*--cell=INDEX.*4: alpha=0.5 beta=0.5"):
    inference.load_run(tiny_run, stage2_dir=str(grid_dir))
  run = inference.load_run(tiny_run, stage2_dir=str(grid_dir), cell=4)
  assert run.source["alpha"] == 0.5 and run.source["beta"] == 0.5
  np.testing.assert_array_equal(run.weights["projector/params/out/bias"],
                                np.asarray(proj["params"]["out"]["bias"]) + 4)


def test_predictor_prompt_passes_agree(trained):
  """Decoding the prompts one per pass, three per pass or all at once: the same masks."""
  config, model, state, proj = trained
  projector = prompt_lib.build_projector(config)
  mesh = parallel.make_mesh()
  frozen = state
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((2, 32, 32, 1), np.float32))
  embed_dim = proj["params"]["hidden"]["kernel"].shape[0]
  emb = jnp.asarray(rng.normal(size=(7, embed_dim)), jnp.float32)
  out = {}
  for per_pass in (1, 3, 7):
    fn = stage2.make_predictor(model, projector, mesh, num_samples=5, scale_scores=True,
                               prompts_per_pass=per_pass)
    out[per_pass] = np.asarray(fn(frozen, proj, images, emb, jax.random.key(3)))
    # Fewer than all 7 per pass is a loop over prompts (lax.map's scan).
    scans = str(fn.trace(frozen, proj, images, emb, jax.random.key(3)).jaxpr).count(" scan[")
    assert (scans > 0) == (per_pass < 7), (per_pass, scans)
  assert out[7].shape == (2, 7, 32, 32)
  # Different prompts give different masks, so a pass that repeated one would show.
  assert np.abs(out[7][:, 0] - out[7][:, 1]).max() > 1e-4
  for per_pass in (1, 3):
    np.testing.assert_allclose(out[per_pass], out[7], atol=1e-6)


def _as_version_1(export_dir, out_dir) -> str:
  """A copy of an export as format version 1 wrote it: no split functions."""
  shutil.copytree(export_dir, out_dir)
  with open(os.path.join(out_dir, "config.json")) as f:
    meta = json.load(f)
  for name in ("encode", "decode_prompts", "decode_latents"):
    os.remove(os.path.join(out_dir, meta["functions"].pop(name)["file"]))
  meta["format_version"] = 1
  del meta["num_prior_samples"]
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(meta, f)
  return str(out_dir)


def test_version_1_exports_still_predict_whole_images_alike(tiny_export, tmp_path):
  from prosona_jax import predictor
  old = model_loader.load_export(_as_version_1(tiny_export, tmp_path / "v1"))
  new = model_loader.load_export(tiny_export)
  assert not old.has_split and new.has_split and old.has_projector
  x = np.random.default_rng(0).random((2, 70, 45, 1), np.float32)  # 3 x 2 tiles each.
  keys = inference.image_keys(5, np.arange(2))
  emb = new.bank.embeddings[:3]
  got = {}
  for name, model in (("v1", old), ("v2", new)):
    p = predictor.Predictor(model, batch_size=4)
    got[name] = (p.prompts(x, keys, emb), p.samples(x, keys, 5))
  assert got["v2"][0].shape == (2, 3, 70, 45) and got["v2"][1].shape == (2, 5, 70, 45)
  for a, b in zip(got["v1"], got["v2"]):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_functions_are_deserialized_on_first_use_and_bad_files_named(tiny_export, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(tiny_export, broken)
  (broken / "decode.jaxexport").write_bytes(b"not a jax export")
  model = model_loader.load_export(str(broken))  # Only listed files are checked here.
  assert set(model.fns) == set(export.FUNCTION_FILES) and model.has_split
  images = np.zeros((1, 32, 32, 1), np.float32)
  model.fns["encode"](images, inference.image_keys(0, [0]))
  with pytest.raises(inference.InferenceError,
                     match=r"decode\.jaxexport: cannot deserialize the decode function"):
    model.fns["decode"](images, np.zeros((1, 2, 6), np.float32))
  os.remove(broken / "prior.jaxexport")
  with pytest.raises(inference.InferenceError, match=r"prior\.jaxexport: missing"):
    model_loader.load_export(str(broken))

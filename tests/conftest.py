"""Test session set-up, and fixtures shared by the inference and real-data tests.

Compiles are most of a tiny run's time on a CPU, and many tests compile the same tiny
model (in this process and in the subprocesses they start), so the session shares one
persistent compilation cache. It lives in a fresh temporary folder: nothing carries over
between sessions.

The real LIDC samples live outside the repository (`<repo>/../shared/data`, or the folder
named by `PROSONA_SHARED_DATA`) and reach tests only through the `shared_data` fixture.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real-data samples the tests read (see the README of the shared data folder).
SHARED_SAMPLES = ("data_lidc_sample.pickle", "lidc_attributes_sample.pkl", "lidc_showcase6.npz")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="prosona_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> str:
  """A work directory of configs/tiny.py trained one epoch per stage (~30 s, once)."""
  from configs import tiny
  from prosona_jax import run
  workdir = tmp_path_factory.mktemp("tiny_run")
  config = tiny.get_config()
  config.stage1.epochs = 1
  config.stage2.epochs = 1
  config.eval.num_images_logged = 1
  run.train_and_evaluate(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> str:
  """The tiny run exported (CPU only: lowering for CUDA too adds time, not coverage)."""
  from prosona_jax import exporter
  out = tmp_path_factory.mktemp("tiny_export") / "model"
  exporter.export_run(tiny_run, str(out), platforms=["cpu"])
  return str(out)


def shared_data_dir() -> pathlib.Path:
  """The folder of the shared LIDC samples: `$PROSONA_SHARED_DATA`, else `<repo>/../shared/data`."""
  override = os.environ.get("PROSONA_SHARED_DATA")
  return pathlib.Path(override) if override else REPO.parent / "shared" / "data"


def _under_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The folder holding every file of SHARED_SAMPLES.

  When a sample is missing the test is skipped with the reason, except under CI
  (`CI=true`), where it fails: CI must run the real-data tests, and a skip there would
  hide a broken reader behind a green run.
  """
  root = shared_data_dir()
  missing = [name for name in SHARED_SAMPLES if not (root / name).is_file()]
  if missing:
    reason = (f"shared LIDC samples missing from {root}: {', '.join(missing)} "
              "(set PROSONA_SHARED_DATA to the folder that holds them)")
    if _under_ci():
      pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)
  return root


# Prompts of `styles_export` and the styles they choose.
STYLE_CORE = "solid core only"
STYLE_MARGIN = "core plus faint surrounding zone, generous margin"


def fit_tiny_model(config, loss_fn, *, targets, lr: float, steps: int):
  """The parameters of `config`'s Stage-1 model fitted quickly for an inference test.

  96 synthetic 32x32 images with 4 raters' masks; `targets(masks_NRHW)` makes what the
  loss compares with; Adam at `lr` for `steps` batches of 16, each step's
  `loss_fn(model, params, images, targets, key)` with a key of its own.
  """
  import jax
  import numpy as np
  import optax
  from prosona_jax.data import synthetic
  from prosona_jax.models import prob_unet

  model = prob_unet.build_from_config(config)
  items = [synthetic.generate_item(0, i, 16, 32, 4) for i in range(96)]
  x = np.stack([im for im, _ in items])[..., None]
  y = targets(np.stack([m for _, m in items]).astype(np.float32))
  params = jax.jit(lambda r: prob_unet.init_from_config(config, r))(jax.random.key(0))["params"]
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt, xb, yb, key):
    grads = jax.grad(lambda p: loss_fn(model, p, xb, yb, key))(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt

  opt = tx.init(params)
  rng = np.random.default_rng(0)
  for i in range(steps):
    idx = rng.choice(len(x), 16, replace=False)
    params, opt = step(params, opt, x[idx], y[idx], jax.random.key(i))
  return params


@pytest.fixture(scope="session")
def styles_export(tmp_path_factory) -> str:
  """A 32x32 model whose prompts choose a style, exported (CPU; ~40 s once on 2 cores).

  The tiny configuration's Stage 1, trained for 500 steps on the synthetic set to draw
  the conservative rater's mask when the latent's first coordinate is negative and the
  inclusive rater's when it is positive (BCE + soft Dice), its prior pulled to N(0, I) so
  that its samples fall on both sides. The projector is set by hand instead of trained: the
  first two embedding dimensions push z_proj along -/+ the first latent axis, so
  `STYLE_CORE` (embedding e0) picks the most negative of the K=16 prior samples and
  `STYLE_MARGIN` (e1) the most positive, and the bank's middle raters lie between.
  Free text goes through the tiny random text encoder of the config (32-d, like the bank).
  What the inference side does with a real model (encode, projector, similarity-weighted
  latent, Fcomb) is unchanged; only the weights are made quickly.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from configs import tiny
  from prosona_jax import exporter, inference, prompt_bank
  from prosona_jax.models import prob_unet
  from prosona_jax.models import prompt as prompt_lib

  config = tiny.get_config()
  config.stage2.eval_num_samples = 16

  def loss_fn(model, params, xb, yb, key):
    v = {"params": params}
    feats = model.apply(v, xb, False, method="features")
    mu, log_sigma = model.apply(v, xb, method="prior_dist")
    z = jax.lax.stop_gradient(
        prob_unet.gaussian_sample(mu, log_sigma, jax.random.normal(key, mu.shape)))
    target = jnp.where(z[:, 0, None, None] < 0, yb[:, 0], yb[:, 3])
    logits = model.apply(v, feats, z, method="decode")
    prob = jax.nn.sigmoid(logits)
    dice = (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
    kl = 0.5 * (mu ** 2 + jnp.exp(2 * log_sigma) - 1 - 2 * log_sigma).sum(-1)
    return (optax.sigmoid_binary_cross_entropy(logits, target).mean() + 1 - dice.mean()
            + kl.mean())

  # (N, 4, H, W) targets in style order.
  params = fit_tiny_model(config, loss_fn, targets=lambda masks: masks, lr=5e-3, steps=500)
  dim, d = 32, int(config.model.latent_dim)
  proj = prompt_lib.build_projector(config).init(jax.random.key(1), jnp.zeros((1, dim)))
  proj = jax.tree.map(np.zeros_like, jax.device_get(proj))
  hidden, out = proj["params"]["hidden"]["kernel"], proj["params"]["out"]["kernel"]
  hidden[0, 0] = hidden[1, 1] = 1.0
  out[0, 0], out[1, 0] = -20.0 * d ** 0.5, 20.0 * d ** 0.5
  bank = prompt_bank.PromptBank.from_phrasings(
      [p[:1] for p in prompt_bank.SYNTHETIC_PROMPTS["train"]])
  assert bank.prompts[0] == STYLE_CORE and bank.prompts[-1] == STYLE_MARGIN
  t = np.linspace(0.0, 1.0, len(bank.prompts))[:, None]
  bank.embeddings = np.zeros((len(bank.prompts), dim), np.float32)
  bank.embeddings[:, :2] = np.concatenate([1.0 - t, t], axis=1)
  bank.encoder_name = "tiny_bert"
  path = str(tmp_path_factory.mktemp("styles") / "model")
  exporter.write_export(path, config, inference.model_weights(params, {}, proj), bank=bank,
                        platforms=["cpu"])
  return path


def missing(reason: str) -> None:
  """Skips the test for a missing tool or package, with the reason; under CI=true fails
  instead (CI installs everything: a skip there would hide an untested feature)."""
  if _under_ci():
    pytest.fail(f"CI=true and {reason}", pytrace=False)
  pytest.skip(reason)


def serve_extra_missing() -> str | None:
  """Why the web app cannot run here (the `serve` extra is not installed), or None."""
  import importlib.util
  absent = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
  return (f"the serve extra is not installed ({', '.join(absent)}: bash scripts/setup.sh "
          "--serve)") if absent else None


@pytest.fixture(scope="session")
def serve_url(styles_export, tmp_path_factory):
  """`python -m prosona_jax.serve` on `styles_export`, on a free port of 127.0.0.1, with a
  1 MB upload limit; yields its address ("http://127.0.0.1:PORT/"), stops it at the end."""
  import queue
  import subprocess
  import sys
  import threading
  reason = serve_extra_missing()
  if reason:
    missing(reason)
  log = tmp_path_factory.mktemp("serve") / "stderr.txt"
  with open(log, "w") as err:
    proc = subprocess.Popen(
        [sys.executable, "-m", "prosona_jax.serve", f"--model={styles_export}", "--port=0",
         "--max_upload_mb=1", "--samples=6"], cwd=REPO, stdout=subprocess.PIPE, stderr=err,
        text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
  lines: queue.Queue = queue.Queue()

  def pump():
    for line in proc.stdout:
      lines.put(line)
    lines.put(None)  # The server exited.

  threading.Thread(target=pump, daemon=True).start()
  url = None
  try:
    while url is None:
      try:
        line = lines.get(timeout=300)
      except queue.Empty:
        line = None
      if line is None:
        break
      if line.startswith("Serving at "):
        url = line.split()[2]
    if url is None:
      proc.kill()
      pytest.fail(f"serve did not start:\n{log.read_text()[-3000:]}", pytrace=False)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()

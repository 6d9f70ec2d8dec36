"""Test session set-up, and fixtures shared by the inference tests.

Compiles are most of a tiny run's time on a CPU, and many tests compile the same tiny
model (in this process and in the subprocesses they start), so the session shares one
persistent compilation cache. It lives in a fresh temporary folder: nothing carries over
between sessions.
"""

import atexit
import os
import shutil
import tempfile

import pytest

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

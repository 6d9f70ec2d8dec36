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

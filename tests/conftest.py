"""Fixtures shared by the inference tests: one tiny trained run and its export."""

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> str:
  """A work directory of configs/tiny.py trained one epoch per stage (~30 s, once)."""
  from configs import tiny
  from prosona_jax import train
  workdir = tmp_path_factory.mktemp("tiny_run")
  config = tiny.get_config()
  config.stage1.epochs = 1
  config.stage2.epochs = 1
  config.eval.num_images_logged = 1
  train.train_and_evaluate(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> str:
  """The tiny run exported (CPU only: lowering for CUDA too adds time, not coverage)."""
  from prosona_jax import export
  out = tmp_path_factory.mktemp("tiny_export") / "model"
  export.export_run(tiny_run, str(out), platforms=["cpu"])
  return str(out)

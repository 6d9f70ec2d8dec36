"""gs:// work directories for everything outside Orbax: metric logs, eval JSON, summary,
figures. A fake `gs://` (fsspec's in-memory file system registered under the GCS
protocols) stands in for Cloud Storage; etils.epath reaches it exactly as it would gcsfs.
"""

import json
import sys

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import matplotlib.pyplot as plt
import numpy as np
import pytest

from etils import epath
from prosona_jax import figures
from prosona_jax import logger
from prosona_jax import evaluate
from prosona_jax import layout
from prosona_jax import metrics


class _FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  root_marker = ""

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # A gcsfs-only option.
    del finalize_on_close
    super().__init__(*args, **kwargs)


@pytest.fixture
def bucket():
  registry = sys.modules["fsspec.registry"]._registry  # pylint: disable=protected-access
  saved = {p: registry.get(p) for p in _FakeGCS.protocol}
  for p in _FakeGCS.protocol:
    fsspec.register_implementation(p, _FakeGCS, clobber=True)
  _FakeGCS.clear_instance_cache()
  yield "gs://prosona-test-bucket/run"
  for key in [k for k in MemoryFileSystem.store if "prosona-test-bucket" in k]:
    del MemoryFileSystem.store[key]
  MemoryFileSystem.pseudo_dirs[:] = [
      d for d in MemoryFileSystem.pseudo_dirs if "prosona-test-bucket" not in d]
  for p, cls in saved.items():
    if cls is None:
      registry.pop(p, None)
    else:
      fsspec.register_implementation(p, cls, clobber=True)


def _rows(path: epath.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_metric_writer_stages_locally_and_resumes(bucket):
  logdir = f"{bucket}/fold0/stage1/logs"
  writer = logger.MetricWriter(logdir, sync_every_s=0.0)
  writer.scalars(2, {"train/loss": 1.5})
  writer.images(2, "val/x", np.zeros((1, 4, 4, 1), np.float32))
  writer.close()
  remote = epath.Path(logdir)
  assert [r["train/loss"] for r in _rows(remote / "metrics.jsonl")] == [1.5]
  assert any(p.name.startswith("events.out.tfevents") for p in remote.iterdir())
  # A resumed run (a fresh host: empty staging directory) appends to the remote log.
  writer = logger.MetricWriter(logdir)
  writer.scalars(4, {"train/loss": 1.0})
  writer.close()
  assert [r["step"] for r in _rows(remote / "metrics.jsonl")] == [2, 4]


def test_eval_json_summary_and_figures(bucket):
  result = {"convention": "dpersona", "fold": 0,
            "mean": {k: 0.5 for k in metrics.SUMMARY_KEYS}}
  layout.write_json(f"{bucket}/eval/stage1_fold0.json", result)
  assert json.loads(epath.Path(f"{bucket}/eval/stage1_fold0.json").read_text()) == result
  text = evaluate.write_summary(bucket)
  assert "| stage1 | 0 (1 fold) | dpersona |" in text
  assert epath.Path(f"{bucket}/eval/summary.md").read_text() == text
  fig = plt.figure()
  figures.save(fig, f"{bucket}/eval/panel.png")
  assert epath.Path(f"{bucket}/eval/panel.png").read_bytes()[:4] == b"\x89PNG"


def test_prompt_bank_cache_and_grid_tables_on_gcs(bucket):
  from prosona_jax import ablation as grid
  from prosona_jax import prompt_bank
  from configs import tiny
  bank = prompt_bank.PromptBank.from_config(tiny.get_config().text.prompts)
  encoder = type("E", (), {"name": "fake",
                           "encode": lambda self, p: np.ones((len(p), 3), np.float32)})()
  bank = bank.embed(encoder)
  path = f"{bucket}/fold0/stage2/prompt_bank.npz"
  bank.save(path)
  again = prompt_bank.PromptBank.load(path)
  assert list(again.prompts) == list(bank.prompts)
  np.testing.assert_array_equal(again.embeddings, bank.embeddings)
  config = tiny.get_config()
  config.stage2.grid_alpha, config.stage2.grid_beta = (0.0,), (1.0,)
  row = {"alpha": 0.0, "beta": 1.0, "fold": 0, "convention": "dpersona",
         "mean": {"ged": 0.5, "dice_soft": 0.5, "dice_match": 0.5, "dice_each_direct": [0.5]}}
  cell_eval = epath.Path(grid.cell_dir(bucket, 0.0, 1.0)) / "eval"
  cell_eval.mkdir(parents=True, exist_ok=True)
  (cell_eval / "stage2_fold0.json").write_text(json.dumps(row))
  rows = grid.collect_cells(config, bucket)
  grid.write_grid(config, bucket, rows)
  assert json.loads((epath.Path(bucket) / "grid.json").read_text())["cells"][0]["alpha"] == 0.0
  assert "| 0 | 1 |" in (epath.Path(bucket) / "grid.md").read_text()
  assert (epath.Path(bucket) / "grid_ged.png").exists()


def test_workdir_lock_on_gcs_is_best_effort_but_refuses_a_live_holder(bucket):
  from prosona_jax import workdir_lock
  lock = epath.Path(f"{bucket}/{workdir_lock.LOCK_NAME}")
  with workdir_lock.hold(bucket):
    holder = json.loads(lock.read_text())
    assert holder["host"] and holder["pid"]
    with pytest.raises(workdir_lock.WorkdirLocked, match=f"pid {holder['pid']} on "):
      with workdir_lock.hold(bucket):
        pass
  assert not lock.exists()

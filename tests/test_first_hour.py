"""What a new user meets in the first hour (issue 14): checks before the first step,
reuse of a trained Stage 1, and progress lines that say what is happening.

- A run that needs a text encoder it cannot get fails in seconds, before Stage 1 trains,
  without minutes of hub retries; so do a missing Stage 1, pretrained-encoder file or an
  unwritable work directory.
- `grid` and `main --config.stages=stage2` start from a trained run's Stage 1
  (`--config.stage2.init_from=RUN_DIR`); the grid never retrains Stage 1 unasked.
- Compilation is announced and timed, the ETA leaves it out, the contrastive terms are
  shown beside their floor, one fold has no `±`, empty-on-empty masks are counted and
  noted, and stderr carries neither the config nor library noise.

End-to-end runs are subprocesses of configs/tiny.py sharing one compilation cache.
"""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from prosona_jax import ablation
from prosona_jax import contrastive
from prosona_jax import evaluate
from prosona_jax import layout
from prosona_jax import metrics
from prosona_jax import run
from prosona_jax import trainer
from prosona_jax.errors import UserError
from prosona_jax.methods import prosona_stage2
from prosona_jax.models import text_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
# A tiny run short enough for a subprocess: two steps per stage, a log line each step.
TINY_FLAGS = ("--config=configs/tiny.py", "--config.stage1.max_steps=2",
              "--config.stage2.max_steps=2", "--config.stage1.log_every=1",
              "--config.stage2.log_every=1", "--config.eval.num_images_logged=1")


def _closed_port() -> int:
  """A local TCP port nothing listens on (connections are refused at once)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  """Subprocess environment: CPU, a shared compile cache, and a hub that cannot be
  reached (a closed local port, so the test never waits on a real network)."""
  out = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
  out.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
             HF_HOME=str(tmp_path_factory.mktemp("empty_hf_home")))
  out.pop("HF_HUB_OFFLINE", None)
  out.pop("TRANSFORMERS_OFFLINE", None)
  return out


def _tool(tool: str, env: dict, *flags, timeout: float = 900) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"prosona_jax.{tool}", *flags], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _checkpoint_dirs(workdir) -> list[str]:
  return [root for root, dirs, _ in os.walk(workdir) if "checkpoints" in dirs]


@pytest.fixture(scope="module")
def tiny_main(tmp_path_factory, env):
  """`main` on configs/tiny.py, two steps per stage: (workdir, completed process)."""
  workdir = str(tmp_path_factory.mktemp("tiny_main"))
  proc = _tool("main", env, *TINY_FLAGS, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


# ---------------------------------------------------------------- 1. preflight

def test_hub_probe_tells_a_closed_port_from_a_listening_one(monkeypatch):
  for name in PROXY_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
  text_encoder.hub_reachable.cache_clear()
  assert not text_encoder.hub_reachable()
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    text_encoder.hub_reachable.cache_clear()
    assert text_encoder.hub_reachable()
  text_encoder.hub_reachable.cache_clear()


def test_lidc_without_hub_exits_2_before_any_training(shared_data, tmp_path, env):
  workdir = tmp_path / "lidc"
  # Batch 2: the six-slice sample leaves three training images in fold 0, fewer than the
  # config's batch of 8, which is refused first (also before any training step).
  proc = _tool("main", env, "--config=configs/lidc.py",
               f"--config.data.path={shared_data / 'lidc_attributes_sample.pkl'}",
               "--config.data.batch_size=2", f"--workdir={workdir}", timeout=180)
  assert proc.returncode == 2, proc.stderr[-4000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("main: error: Could not load the clip text encoder "
                         "'openai/clip-vit-base-patch32'"), last
  assert "was not reachable" in last and "--config.text.model=/path/to/folder" in last
  assert "Traceback" not in proc.stderr
  assert "Retrying" not in proc.stderr  # No hub retry storm: the probe said "offline".
  assert "compiling the train step" not in proc.stderr
  assert not _checkpoint_dirs(workdir)


def _tiny_config(**stage2):
  config = tiny.get_config()
  for k, v in stage2.items():
    config.stage2[k] = v
  return config


def test_stage2_alone_without_a_stage1_fails_before_training(tmp_path):
  config = _tiny_config()
  config.stages = ("stage2",)
  with pytest.raises(UserError, match=r"no trained Stage 1 for fold 0 .*"
                     r"--config.stage2.init_from=DIR .*keep 'stage1' in config.stages"):
    run.train_and_evaluate(config, str(tmp_path))
  assert not _checkpoint_dirs(tmp_path)


def test_missing_pretrained_encoder_fails_before_training(tmp_path):
  config = _tiny_config()
  config.model.backbone = "resnet34"
  config.model.pretrained_encoder = str(tmp_path / "resnet34.safetensors")
  with pytest.raises(UserError, match="pretrained_encoder=.*resnet34.safetensors: no such"):
    run.train_and_evaluate(config, str(tmp_path / "work"))
  assert not _checkpoint_dirs(tmp_path)


def test_unwritable_workdir_fails_at_once(tmp_path):
  (tmp_path / "a_file").write_text("")
  with pytest.raises(UserError, match="cannot write there"):
    run.train_and_evaluate(_tiny_config(), str(tmp_path / "a_file" / "run"))


# ---------------------------------------------------------------- 4. Stage-1 reuse

def test_init_from_a_run_dir_means_its_stage1_checkpoints(tiny_main):
  workdir, _ = tiny_main
  config = _tiny_config(init_from=workdir)
  assert layout.stage2_init_dir(config, "/elsewhere", 0) == os.path.join(
      workdir, "fold0", "stage1", "checkpoints")
  # A checkpoints folder is taken as it is.
  config.stage2.init_from = "/ckpts/fold{fold}"
  assert layout.stage2_init_dir(config, "/elsewhere", 2) == "/ckpts/fold2"


def test_grid_refuses_another_model_than_its_stage1(tiny_main, tmp_path):
  config = _tiny_config(init_from=tiny_main[0])
  config.model.feature_channels = 8
  with pytest.raises(UserError, match="built another model .*feature_channels"):
    ablation.preflight(config, str(tmp_path))


def test_grid_commands_start_from_the_named_stage1(tmp_path):
  cmds = ablation.commands("configs/tiny.py", str(tmp_path), _tiny_config(init_from="runs/demo"))
  assert len(cmds) == 9
  assert all(c.endswith(f"--config.stage2.init_from={os.path.abspath('runs/demo')}")
             for c in cmds)


def test_grid_without_a_stage1_stops_and_says_how(tmp_path, env):
  workdir = tmp_path / "grid"
  proc = _tool("grid", env, "--config=configs/tiny.py", f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stderr[-4000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("grid: error: no trained Stage 1 for fold 0"), last
  assert "--config.stage2.init_from=DIR" in last and "--train_stage1" in last
  assert not _checkpoint_dirs(workdir)


def test_grid_from_a_trained_run_trains_no_stage1_step(tiny_main, tmp_path, env):
  stage1_run, _ = tiny_main
  workdir = tmp_path / "grid"
  proc = _tool("grid", env, "--config=configs/tiny.py", f"--workdir={workdir}",
               f"--config.stage2.init_from={stage1_run}", "--config.stage2.max_steps=2",
               "--config.stage2.grid_alpha=(0.0,1.0)", "--config.stage2.grid_beta=(1.0,)")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "stage1/fold0" not in proc.stderr
  assert not (workdir / "fold0" / "stage1").exists()
  assert (workdir / "fold0" / "grid" / "prompt_bank.npz").is_file()
  grid = json.loads((workdir / "grid.json").read_text())
  assert len(grid["cells"]) == 2 and all("0" in c["folds"] for c in grid["cells"])


# ---------------------------------------------------------------- 5. messages

def test_progress_clock_leaves_the_compiling_step_out():
  clock = trainer.ProgressClock(total_steps=101)
  assert clock.tick(1, now=50.0) == (None, None)  # Before compilation has finished.
  clock.start(1, now=50.0)  # The first step took 50 s: compilation.
  assert clock.tick(1, now=50.0) == (None, None)  # No step since then: no rate yet.
  rate, eta = clock.tick(11, now=60.0)  # Ten steps in ten seconds.
  assert rate == pytest.approx(1.0) and eta == pytest.approx(90.0)
  rate, eta = clock.tick(21, now=65.0)  # The rate follows the latest interval.
  assert rate == pytest.approx(2.0) and eta == pytest.approx(40.0)


def test_tiny_run_says_what_happens_and_keeps_stderr_quiet(tiny_main):
  workdir, proc = tiny_main
  err = proc.stderr
  for stage in ("stage1", "stage2"):
    start = err.index(f"{stage}/fold0: compiling the train step...")
    assert err.index(f"{stage}/fold0: compiled in ", start) > start
  assert f"(floor {math.log(5):.3f})" in err  # Beside text and sim in progress lines.
  assert "Run: method prosona, stages stage1, stage2, fold 0" in err
  assert "Config:" not in err and "stage1:\n" not in err  # The dump is in main.log.
  assert "Unable to initialize backend" not in err
  with open(layout.log_path(workdir)) as f:
    log = f.read()
  assert log.startswith("Config:\n") and "compiling the train step" in log
  with open(os.path.join(workdir, "fold0", "stage2", "logs", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  floors = [r for r in rows if "train/text_floor" in r]
  assert len(floors) == 1 and floors[0]["train/text_floor"] == pytest.approx(math.log(5))


def test_one_fold_summary_has_no_plus_minus(tiny_main):
  workdir, proc = tiny_main
  with open(os.path.join(workdir, "eval", "summary.md")) as f:
    summary = f.read()
  assert "| stage1 | 0 (1 fold) |" in summary and "| stage2 | 0 (1 fold) |" in summary
  assert "±" not in summary.split("|---|")[-1]  # The rows; the legend explains ±.
  assert summary in proc.stdout


def test_eval_json_counts_empty_masks(tiny_main):
  workdir, _ = tiny_main
  with open(os.path.join(workdir, "eval", "stage2_fold0.json")) as f:
    result = json.load(f)
  counts = result["empty_masks"]
  assert counts["rater_masks"] == len(result["keys"]) * 4
  assert counts["predictions"] == len(result["keys"]) * 28  # Every phrasing of the bank.
  assert 0 <= counts["empty_on_empty"] <= min(counts["empty_labels"],
                                              counts["empty_predictions"])


def test_empty_counts_follow_the_raters_predictions_stand_for():
  labels = np.zeros((2, 2, 4, 4), np.uint8)
  labels[0, 1, 1, 1] = 1  # Image 0: rater 0 empty, rater 1 not. Image 1: both empty.
  preds = np.zeros((2, 3, 4, 4), np.float32)
  preds[1, 0, 2, 2] = 0.9  # Image 1: the prediction for rater 0 is not empty.
  per_rater = metrics.empty_counts(labels, preds, prediction_raters=(0, 1, 1))
  assert per_rater == {"rater_masks": 4, "empty_labels": 3, "predictions": 6,
                       "empty_predictions": 5, "empty_on_empty": 2}
  # Samples stand for every rater: one non-empty sample of image 1 spoils both its raters.
  assert metrics.empty_counts(labels, preds)["empty_on_empty"] == 1


def _write_eval(workdir, stage, fold, empty_on_empty, total=40):
  result = {"convention": "dpersona", "fold": fold, "stage": stage,
            "mean": {k: 0.5 for k in metrics.SUMMARY_KEYS},
            "empty_masks": {"rater_masks": total, "empty_labels": empty_on_empty,
                            "predictions": total, "empty_predictions": empty_on_empty,
                            "empty_on_empty": empty_on_empty}}
  layout.write_json(os.path.join(layout.eval_dir(workdir), f"{stage}_fold{fold}.json"),
                    result)


def test_summary_notes_empty_on_empty_masks_when_they_dominate(tmp_path):
  _write_eval(str(tmp_path), "stage1", 0, empty_on_empty=30)
  _write_eval(str(tmp_path), "stage1", 1, empty_on_empty=20)
  _write_eval(str(tmp_path), "stage2", 0, empty_on_empty=4)
  summary = evaluate.write_summary(str(tmp_path))
  assert ("Note: stage1: 50 of 80 rater masks (62%) are empty and were predicted empty: "
          "they score Dice 1 under the dpersona convention") in summary
  assert "stage2:" not in summary  # 10%: no note.
  assert "| stage1 | 0,1 | dpersona | 0.500 ± 0.000 |" in summary  # Two folds keep ±.


def test_contrastive_floor_is_ln_of_the_positives_and_is_reached():
  bank = prosona_stage2.config_bank(tiny.get_config()).train_view()
  positive = bank.positive_mask()
  floor = contrastive.loss_floor(positive)
  assert floor == pytest.approx(math.log(5))
  assert contrastive.loss_floor(positive, include_diagonal=False) == pytest.approx(
      math.log(4))
  # Prompts of one rater on one direction, raters apart: the loss sits at the floor.
  z = np.eye(8, dtype=np.float32)[bank.rater]
  loss = float(contrastive.text_loss(z, positive, tau=0.07))
  assert loss == pytest.approx(floor, abs=1e-4)
  assert float(contrastive.text_loss(z + 0.3 * np.roll(z, 1, 0), positive,
                                     tau=0.07)) > floor + 0.01

"""Every Table-1 method on the one `main`: dry-run counts, tiny runs that resume, the table.

- `--dry_run` of each method at LIDC's shape gives BASELINES.md's parameter counts
  (shapes only: nothing is compiled).
- Each method trains a few steps of `configs/tiny.py` through `python -m prosona_jax.main`
  in a subprocess; a SIGTERM after step 1 stops it, and re-running the same command
  resumes from that checkpoint. `python -m prosona_jax.table` over the runs then holds one
  row per method with finite values.
- TAB's compiled step changes only the parameters outside the frozen stem and layer1.
- Model selection keeps the best validation state (ties: the later), across a resume.

The subprocesses share the session's persistent compilation cache (conftest.py).
"""

import concurrent.futures
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fault_runs

from prosona_jax import checkpointing
from prosona_jax import config_defaults
from prosona_jax import run
from prosona_jax import selection
from prosona_jax import trainer
from prosona_jax.methods import base
from prosona_jax.models import baseline_common as common
from prosona_jax.models import confusion
from prosona_jax.models import dpersona_heads
from prosona_jax.models import pionono
from prosona_jax.models import tab as tab_lib
from prosona_jax.models import unet_head

REPO = fault_runs.REPO
STEPS = 2  # Per stage: step 1 is checkpointed by the preemption, step 2 by the end.

# BASELINES.md: 1-channel 128 x 128 input, 4 raters.
COUNTS = {
    "unet": {"total": 24_430_097},
    "cm_global": {"total": 24_430_101, "cm_heads": 4},
    "cm_pixel": {"total": 24_467_557, "cm_heads": 37_460},
    "pionono": {"total": 24_430_929, "latent": 288, "head": 689},
    "dpersona": {"heads": 88_128, "total": 28_366_473 + 88_128},
    "tab": {"total": 23_480_393, "trainable": 23_249_801},
    "prosona": {"total": 28_366_473, "backbone": 24_429_952, "fcomb": 929},
}


def _lidc_config(method: str):
  from configs import lidc  # pylint: disable=g-import-not-at-top
  config = lidc.get_config()
  config.method = method
  return config


@pytest.mark.parametrize("method", sorted(COUNTS))
def test_dry_run_counts(method, tmp_path):
  summary = run.dry_run(_lidc_config(method), str(tmp_path))
  with open(tmp_path / "model_summary.json") as f:
    assert json.load(f) == summary
  assert summary["method"] == method
  assert {k: summary[k] for k in COUNTS[method]} == COUNTS[method]
  if method not in ("tab", "dpersona"):
    assert summary["trainable"] == summary["total"]
  if method == "dpersona":
    assert summary["stages"]["dpersona"] == {"heads": 88_128, "total": 88_128,
                                             "trainable": 88_128}


def test_config_sections_are_the_module_defaults():
  c = config_defaults.base_config()
  backbone = set(common.BACKBONE_DEFAULTS)
  modules = {"unet": (unet_head, {"rater", "num_models"}),
             "cm_global": (confusion, {"level"}), "cm_pixel": (confusion, {"level"}),
             "pionono": (pionono, set()), "dpersona": (dpersona_heads, set()),
             "tab": (tab_lib, set())}
  for section, (module, elsewhere) in modules.items():
    for key, value in module.DEFAULTS.items():
      if key in backbone or key in elsewhere:
        assert key not in c[section], (section, key)  # From config.model / the stage.
        continue
      got = c[section][key]
      assert (tuple(got) if isinstance(value, tuple) else got) == value, (section, key)
  assert c.rater == unet_head.DEFAULTS["rater"]


# ---------------------------------------------------------------- tiny runs of every method

def _section(method: str) -> str:
  return {"prosona": "stage2"}.get(method, method)


def _flags(method: str, workdir: str, stage1_dir: str) -> list[str]:
  flags = ["--config=configs/tiny.py", f"--config.method={method}", f"--workdir={workdir}",
           "--config.eval.num_images_logged=1", f"--config.{_section(method)}.max_steps={STEPS}",
           f"--config.stage1.max_steps={STEPS}"]
  if method == "dpersona":
    # The heads on the ProSona run's Stage 1 (the same frozen model ProSona's Stage 2 has).
    flags += ["--config.stages=dpersona", f"--config.dpersona.init_from={stage1_dir}"]
  return flags


def _run(args: list[str], env_extra: dict, tool: str = "main") -> tuple[int, str]:
  cmd = ([sys.executable, fault_runs.FAULT_WORKER, tool] if tool == "main"
         else [sys.executable, "-m", f"prosona_jax.{tool}"])
  proc = subprocess.run(cmd + args, cwd=REPO, env=fault_runs.environment(env_extra),
                        capture_output=True, text=True, timeout=1200)
  return proc.returncode, proc.stdout + proc.stderr


METHODS = ("prosona", "unet", "cm_global", "cm_pixel", "pionono", "dpersona", "tab")
ROWS = {"prosona": "prosona", "unet": "unet_a1", "cm_global": "cm_global",
        "cm_pixel": "cm_pixel", "pionono": "pionono", "dpersona": "dpersona", "tab": "tab"}


def _train_and_resume(method: str, root, stage1_dir: str) -> tuple[str, list]:
  """One method's runs: preempted after step 1 (not ProSona), then run to the end."""
  workdir = str(root / method)
  flags = _flags(method, workdir, stage1_dir)
  attempts = []
  if method != "prosona":
    rc, log = _run(flags, {"PROSONA_FAULT_SIGTERM_AT_STEP": "1"})
    # Preempted before the end: nothing may have been tested yet.
    scored = os.path.exists(os.path.join(workdir, "eval", f"{ROWS[method]}_fold0.json"))
    attempts.append((rc, log + ("\nEVAL WRITTEN" if scored else "")))
  attempts.append(_run(flags, {}))
  return workdir, attempts


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  """Every method on configs/tiny.py: preempted after step 1, then re-run to the end.

  ProSona runs uninterrupted (its resume is test_train's); D-Persona's heads sit on its
  Stage 1, so they start once ProSona is done. Two methods run at a time: each process
  spends most of its time compiling, on one core. Returns {method: (workdir, [(returncode,
  output), ...])}.
  """
  root = tmp_path_factory.mktemp("methods")
  stage1_dir = str(root / "prosona" / "fold{fold}" / "stage1" / "checkpoints")
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    jobs = {m: pool.submit(_train_and_resume, m, root, stage1_dir)
            for m in METHODS if m != "dpersona"}
    jobs["prosona"].result()
    jobs["dpersona"] = pool.submit(_train_and_resume, "dpersona", root, stage1_dir)
    return {m: job.result() for m, job in jobs.items()}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_resumes(tiny_runs, method):
  workdir, attempts = tiny_runs[method]
  stage = ROWS[method] if method != "prosona" else "stage2"
  if method != "prosona":
    rc, out = attempts[0]
    assert rc == 143, out[-3000:]
    assert "preempted at step 1; checkpoint saved" in out
    assert "EVAL WRITTEN" not in out
  rc, out = attempts[-1]
  assert rc == 0, out[-3000:]
  if method != "prosona":
    assert f"{stage}/fold0: resumed from the checkpoint of step 1." in out, out[-3000:]
    assert f"finished {STEPS - 1} steps" in out
  with open(os.path.join(workdir, "eval", f"{stage}_fold0.json")) as f:
    result = json.load(f)
  assert result["method"] == method and result["stage"] == stage
  mean = result["mean"]
  assert all(np.isfinite(mean[k]) for k in ("ged", "dice_soft", "dice_max", "dice_match"))
  if method == "prosona":
    assert result["select_on"] == "last" and result["selected_step"] == STEPS
    return
  # The baselines select on the validation split; with no validation before the end
  # (tiny: 4 steps an epoch) the selected state is the last one.
  assert result["select_on"] == "val" and result["select_split"] == "val"
  assert result["selected_step"] == STEPS
  rater_dice = np.asarray(mean["prediction_rater_dice"])
  assert rater_dice.shape == ((1, 4) if method == "unet" else (4, 4))
  if method == "cm_global":
    # As run (C = 1), the four predictions are one map: four identical rows.
    np.testing.assert_array_equal(rater_dice, np.broadcast_to(rater_dice[:1], (4, 4)))
  if method == "unet":
    assert result["num_predictions"] == 1 and "dice_each_matched" not in mean


def test_rerun_of_a_finished_method_trains_nothing(tiny_runs):
  workdir, _ = tiny_runs["cm_pixel"]
  path = os.path.join(workdir, "eval", "cm_pixel_fold0.json")
  with open(path, "rb") as f:
    before = f.read()
  rc, out = _run(_flags("cm_pixel", workdir, ""), {})
  assert rc == 0, out[-3000:]
  assert f"already complete ({STEPS} steps)" in out
  with open(path, "rb") as f:
    assert f.read() == before  # The same selected state, tested again.


def test_table_has_one_finite_row_per_method(tiny_runs, tmp_path):
  dirs = [tiny_runs[m][0] for m in METHODS]
  rc, out = _run([*dirs, f"--out={tmp_path}", "--published"], {}, tool="table")
  assert rc == 0, out[-3000:]
  with open(tmp_path / "table.json") as f:
    table = json.load(f)
  measured = [r for r in table["rows"] if r["source"] == "measured"]
  assert sorted(r["label"] for r in measured) == sorted(ROWS.values())
  for row in measured:
    assert row["num_folds"] == 1 and row["folds"] == [0]
    cells = [c for c in row["values"].values() if c is not None]
    assert cells and all(np.isfinite([c["mean"], c["std"]]).all() for c in cells), row
  unet = next(r for r in measured if r["label"] == "unet_a1")["values"]
  assert unet["dice_match"] is None and unet["mean_dice_direct"] is None
  prosona = next(r for r in measured if r["label"] == "prosona")["values"]
  assert prosona["mean_dice_direct"] is not None
  assert any(r["label"] == "prosona (published)" for r in table["rows"])
  md = (tmp_path / "table.md").read_text()
  assert "| unet_a1 | 1 (0) |" in md and os.path.getsize(tmp_path / "table.csv") > 0


def test_table_user_mistakes(tmp_path):
  rc, out = _run(["--help"], {}, tool="table")
  assert rc == 0, out[-2000:]
  for args, expected in (([], "run directory"), ([str(tmp_path / "none")], "no such run"),
                         ([str(tmp_path)], "no eval/ folder")):
    rc, out = _run(args, {}, tool="table")
    errors = [l for l in out.splitlines() if "error:" in l]
    assert rc == 2 and len(errors) == 1 and expected in errors[0], out[-2000:]
    assert "Traceback" not in out


# ---------------------------------------------------------------- TAB's step

def test_tab_step_changes_only_unfrozen_parameters(tmp_path):
  """One step of the TAB Method's compiled step on tiny data (32 x 32)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from prosona_jax import parallel  # pylint: disable=g-import-not-at-top
  from prosona_jax.methods import tab  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.method = "tab"
  fold = next(run.folds(config, str(tmp_path)))
  method = tab.TAB(fold)
  tx, _ = method.make_optimizer()
  state = method.init_state(tx)
  before = jax.device_get(state)  # The step donates the state.
  batch = parallel.to_global(next(method.train_iterator()), fold.mesh)
  after, metrics = jax.device_get(method.make_train_step(tx)(state, batch))
  assert np.isfinite(metrics["loss"])
  # Adam's first moment after one step is (1 - b1) * gradient: zero exactly where no
  # gradient reached a parameter. Keyed by the parameter's path.
  first_moment = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(after.opt_state):
    name = jax.tree_util.keystr(path)
    if ".mu" in name:
      first_moment[name.split(".mu", 1)[1]] = np.asarray(leaf)
  mask = tab_lib.trainable_mask(before.params)
  frozen, unchanged, trainable_leaves = 0, set(), 0
  for (path, old), new, trainable in zip(jax.tree_util.tree_leaves_with_path(before.params),
                                         jax.tree.leaves(after.params),
                                         jax.tree.leaves(mask)):
    name = jax.tree_util.keystr(path)
    if not trainable:  # Bit-identical, and no optimizer state at all.
      frozen += 1
      assert np.asarray(old).tobytes() == np.asarray(new).tobytes(), name
      assert name not in first_moment, name
      continue
    trainable_leaves += 1
    moved = not np.array_equal(old, new)
    # A trainable parameter stays put only where its gradient is exactly zero (e.g. the
    # decoder's first self-attention reads tgt = 0; with tiny's one memory token (32 / 32)
    # every softmax over keys is constant).
    assert moved == bool(np.any(first_moment[name])), name
    unchanged |= set() if moved else {name}
  assert frozen == 1 + 3 * 2  # The stem conv and layer1's six convs.
  assert len(first_moment) == trainable_leaves
  assert len(unchanged) < 0.2 * trainable_leaves, unchanged
  # The trained encoder (layer2-4) and the mask head and its heads all moved.
  assert not [n for n in unchanged if n.startswith(
      ("['backbone']", "['mask_head']", "['mean_head']", "['diag_head']",
       "['factor_head']"))], unchanged
  for old, new in zip(jax.tree.leaves(before.batch_stats["buffers"]),
                      jax.tree.leaves(after.batch_stats["buffers"])):
    assert np.asarray(old).tobytes() == np.asarray(new).tobytes()
  assert any(not np.array_equal(o, n) for o, n in zip(
      jax.tree.leaves(before.batch_stats["batch_stats"]),
      jax.tree.leaves(after.batch_stats["batch_stats"])))
  # The optimizer holds Adam moments for the trainable parameters only.
  counts = tab_lib.count_params({"params": before.params})
  moments = sum(np.size(x) for x in jax.tree.leaves(before.opt_state) if np.ndim(x) > 0)
  assert moments == 2 * counts["trainable"] < 2 * counts["total"]


# ---------------------------------------------------------------- model selection

class _Fold:
  fold = 0

  class split:  # pylint: disable=invalid-name
    val = np.arange(3)
    test = np.arange(2)


class _Method:
  """What `selection.Selector` reads of a Method."""
  name = "toy"
  select_metric = "dice_max_mean+dice_soft"
  fold = _Fold()

  def __init__(self, stage_dir, select_on):
    self.stage_dir, self.select_on, self.selection = stage_dir, select_on, {}

  def selection_score(self, summary):
    return base.selection_score(self.select_metric, summary)


class _Evaluator:
  def __init__(self, scores):
    self.scores, self.splits = scores, []

  def validate(self, state, step, split="val"):
    self.splits.append(split)
    s = self.scores[step]
    return {"dice_max": s, "dice_max_reverse": s, "dice_soft": 0.0, "dice_match": 0.0,
            "ged": 0.0}


def _toy_state(step: int):
  tx = optax.sgd(0.1)
  state = trainer.TrainState.create({"w": jnp.full((2,), float(step), jnp.float32)}, tx)
  return state.replace(step=jnp.asarray(step, jnp.int32))


def test_selection_keeps_the_best_state_across_a_resume(tmp_path):
  scores = {2: 0.5, 4: 0.7, 6: 0.7, 8: 0.6}
  evaluator = _Evaluator(scores)
  method = _Method(str(tmp_path), "val")
  sel = selection.Selector(method, evaluator)
  for step in (2, 4):
    sel.validate(_toy_state(step), step)
  sel.close()
  # A resumed stage reads the best so far, then sees a tie (the later step wins).
  sel = selection.Selector(method, evaluator)
  assert sel.best["step"] == 4
  for step in (6, 8):
    summary = sel.validate(_toy_state(step), step)
  assert summary["select_score"] == pytest.approx(0.6)
  chosen = sel.select(_toy_state(8))
  sel.close()
  assert int(chosen.step) == 6 and float(chosen.params["w"][0]) == 6.0
  assert method.selection == {"select_on": "val", "selected_step": 6, "select_split": "val",
                              "select_metric": "dice_max_mean+dice_soft",
                              "select_score": pytest.approx(0.7)}
  assert selection.selected_checkpoint_dir(str(tmp_path / "checkpoints")) == str(
      tmp_path / "best")
  assert checkpointing.latest_step_dir(str(tmp_path / "best"))[0] == 6
  assert set(evaluator.splits) == {"val"}


def test_selection_on_the_test_fold_and_none(tmp_path):
  evaluator = _Evaluator({2: 0.9, 4: 0.1})
  method = _Method(str(tmp_path / "t"), "test")
  sel = selection.Selector(method, evaluator)
  for step in (2, 4):
    sel.validate(_toy_state(step), step)
  assert int(sel.select(_toy_state(4)).step) == 2 and evaluator.splits == ["test", "test"]
  sel.close()
  last = _Method(str(tmp_path / "l"), "last")
  sel = selection.Selector(last, evaluator)
  sel.validate(_toy_state(2), 2)
  assert int(sel.select(_toy_state(4)).step) == 4
  assert last.selection == {"select_on": "last", "selected_step": 4}
  assert not os.path.exists(tmp_path / "l" / "best")

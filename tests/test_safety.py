"""What a run checks so that it cannot go wrong silently (issue 13).

- Checkpoints are verified on restore (the CRC-32 of every array, finiteness, the step
  and the data iterator's position). A damaged newest step is reported in one line, set
  aside, and the run resumes from the previous step, ending bit-identical to an
  uninterrupted run. With no intact step the run exits 2 naming every step it tried.
- A state that is not finite is never saved, and the NaN stop names a good checkpoint.
- One run per work directory (`WORKDIR/.lock`): a second run exits 2 naming the first; a
  stale lock of a dead process is taken over with a warning.
- A resume whose config changed in a field that matters exits 2, config.json untouched;
  an allowed change (epochs) resumes.
- Unusable settings of `main`, `predict` and `export` end in one line and exit 2, before
  anything compiles.
- The data's patient grouping is recorded in config.json and the eval JSON, and its
  warning is shown once.

End-to-end runs are subprocesses of configs/tiny.py through `tests/fault_worker.py`, as
in test_train.py, sharing a persistent compilation cache.
"""

import glob
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import fault_runs

from prosona_jax import checkpointing
from prosona_jax import config_lib
from prosona_jax import logger as logger_lib
from prosona_jax import parallel
from prosona_jax import trainer
from prosona_jax import workdir_lock

REPO = fault_runs.REPO
TINY, TOTAL = fault_runs.TINY, fault_runs.TINY_STEPS


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
  """Environment of a persistent compilation cache shared by this module's subprocesses."""
  return fault_runs.cache_env(tmp_path_factory.mktemp("jax_cache"))


def _restore(state_dir: str):
  """A saved train state as a tree of arrays, read without any of the package's checks."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(state_dir)


def _errors(out: str) -> list[str]:
  return [line for line in out.splitlines() if ": error: " in line]


def _largest_data_file(step_dir: str) -> str:
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def _assert_trees_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


# ---------------------------------------------------------------- the runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
  """An uninterrupted run (and a second run started on its work directory meanwhile),
  and a run preempted after step 6 (checkpoints 4 and 6) that starts over a stale lock."""
  base, cut = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("cut")
  r = {"base": str(base), "cut": str(cut), "cache": cache}
  first = fault_runs.start(base, env=cache)  # Also fills the compilation cache.
  lock = base / workdir_lock.LOCK_NAME
  deadline = time.time() + 300
  while not lock.exists() and first.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  r["lock_record"] = json.loads(lock.read_text()) if lock.exists() else None
  r["first_pid"] = first.pid
  r["second"] = fault_runs.run(base, "--config.stage1.lr=3e-4", env=cache)
  r["baseline"] = fault_runs.finish(first)
  r["lock_left"] = lock.exists()
  r["final"] = _restore(os.path.join(fault_runs.ckpt_dir(base), str(TOTAL), "state"))
  r["eval"] = fault_runs.read(base / "eval" / "stage1_fold0.json")
  r["config"] = fault_runs.read(base / "config.json")
  r["stale_pid"] = _dead_pid()
  (cut / workdir_lock.LOCK_NAME).write_text(json.dumps(
      {"pid": r["stale_pid"], "host": socket.gethostname(), "started": "earlier",
       "command": "a run that died"}))
  r["cut_run"] = fault_runs.run(cut, env=dict(cache, PROSONA_FAULT_SIGTERM_AT_STEP="6"))
  return r


def _flip_a_bit_silently(step_dir: str) -> str:
  """Flips one bit of a stored array so that Orbax reads it without an error but with
  another value (most flips in zstd data do that); returns what was flipped."""
  state_dir = os.path.join(step_dir, "state")
  reference = _restore(state_dir)
  path = _largest_data_file(step_dir)
  original = fault_runs.read(path)
  rng = np.random.default_rng(0)
  for _ in range(60):
    pos, bit = int(rng.integers(64, len(original) - 16)), int(rng.integers(8))
    flipped = bytearray(original)
    flipped[pos] ^= 1 << bit
    with open(path, "wb") as f:
      f.write(flipped)
    try:
      read = _restore(state_dir)
    except Exception:  # pylint: disable=broad-except
      continue  # Orbax notices this one itself: not the silent kind.
    if any(not np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(read))):
      return f"bit {bit} of byte {pos} of {path}"
  with open(path, "wb") as f:
    f.write(original)
  raise AssertionError("no silent bit flip found")


def _delete(step_dir):
  os.remove(_largest_data_file(step_dir))


def _zero(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "wb") as f:
    f.write(bytes(os.path.getsize(path)))


def _garbage_iterator(step_dir):
  with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
    f.write("{garbage")


def _no_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


DAMAGES = {"deleted_data_file": _delete, "flipped_bit": _flip_a_bit_silently,
           "zeroed_data_file": _zero, "garbage_iterator_json": _garbage_iterator,
           "missing_METADATA": _no_metadata}


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
  """`resumed(kind)`: the preempted run, its step 6 damaged so, run again (once each)."""
  done = {}

  def get(kind: str) -> dict:
    if kind not in done:
      work = tmp_path_factory.mktemp(kind) / "work"
      shutil.copytree(runs["cut"], work)
      DAMAGES[kind](os.path.join(fault_runs.ckpt_dir(work), "6"))
      rc, out = fault_runs.run(work, env=runs["cache"])
      done[kind] = {"rc": rc, "out": out, "work": str(work)}
    return done[kind]

  return get


# ---------------------------------------------------------------- damaged checkpoints

def test_preempted_run_kept_steps_4_and_6(runs):
  rc, out = runs["cut_run"]
  assert rc == 143, out[-3000:]
  assert fault_runs.steps(runs["cut"]) == [4, 6]


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_damaged_latest_checkpoint_resumes_from_the_previous_one_bit_identically(
    runs, resumed, kind):
  r = resumed(kind)
  assert r["rc"] == 0, r["out"][-3000:]
  damaged = [line for line in r["out"].splitlines() if "is damaged" in line]
  assert len(damaged) == 1, r["out"][-3000:]
  assert "the checkpoint of step 6 in " in damaged[0]
  assert "resumed from the checkpoint of step 4." in r["out"]
  assert f"finished {TOTAL - 4} steps" in r["out"]
  assert "Traceback" not in r["out"] and "Exception ignored" not in r["out"]
  # The damaged step is kept aside for inspection; training wrote step 6 anew.
  assert os.path.isdir(os.path.join(fault_runs.ckpt_dir(r["work"]), "6.damaged"))
  assert fault_runs.steps(r["work"])[-1] == TOTAL
  _assert_trees_equal(runs["final"],
                      _restore(os.path.join(fault_runs.ckpt_dir(r["work"]), str(TOTAL), "state")))
  assert fault_runs.read(os.path.join(r["work"], "eval", "stage1_fold0.json")) == runs["eval"]


def test_no_intact_checkpoint_exits_2_naming_the_steps_tried(runs, tmp_path):
  work = tmp_path / "work"
  shutil.copytree(runs["cut"], work)
  for step in (4, 6):
    _delete(os.path.join(fault_runs.ckpt_dir(work), str(step)))
  rc, out = fault_runs.run(work, env=runs["cache"])
  assert rc == 2, out[-3000:]
  errors = _errors(out)
  assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
  assert "no intact checkpoint; tried step 6 (" in errors[0] and "; step 4 (" in errors[0]
  assert fault_runs.steps(work) == [4, 6]  # Nothing set aside when nothing could be resumed.


def test_checkpoint_meta_records_step_iterator_and_checksums(runs):
  meta = checkpointing.read_meta(checkpointing.step_dirs(fault_runs.ckpt_dir(runs["base"]))[0][1])
  assert meta["step"] == meta["batches"] == TOTAL
  assert meta["iterator"] == {"next_index": TOTAL}
  leaves = meta["checksum"]["leaves"]
  assert meta["checksum"]["algorithm"] == "crc32"
  assert set(leaves) == {checkpointing.leaf_name(p) for p, _ in
                         jax.tree_util.tree_leaves_with_path(runs["final"])}
  assert leaves == checkpointing.checksums(runs["final"])


def _toy_checkpoints(directory: str):
  """Steps 1 and 2 of a toy state with a Grain iterator; returns (checkpointer, target,
  fresh iterator)."""
  tx = optax.adam(0.1)
  records = [{"x": np.full((4,), v, np.float32)} for v in range(8)]
  make_iterator = lambda: iter(grain.MapDataset.source(records).to_iter_dataset())
  iterator = make_iterator()
  state = trainer.TrainState.create({"w": jnp.linspace(0.0, 1.0, 300)}, tx)
  ckpt = checkpointing.Checkpointer(directory)
  for step in (1, 2):
    next(iterator)
    state = state.replace(step=jnp.asarray(step, jnp.int32), params={"w": state.params["w"] + 1})
    ckpt.save(step, state, iterator, {"stage": "toy", "batches": step})
  ckpt.close()
  return trainer.TrainState.create({"w": jnp.zeros(300)}, tx), make_iterator


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  data = fault_runs.read(path)
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _iterator_elsewhere(step_dir):
  with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
    f.write('{"next_index": 1}')  # Valid, but not where step 2 left it.


def _no_meta(step_dir):
  os.remove(os.path.join(step_dir, "meta", "metadata"))


@pytest.mark.parametrize("damage,reason", [
    (_flip_a_bit_silently, "checksum mismatch in "),
    (_truncate, "OUT_OF_RANGE"),
    (_iterator_elsewhere, "the data iterator restored at {'next_index': 1}"),
    (_no_meta, "meta/metadata not found"),
    (_no_metadata, "state/_METADATA is missing"),
])
def test_restore_falls_back_past_a_damaged_step(tmp_path, damage, reason, caplog):
  target, make_iterator = _toy_checkpoints(str(tmp_path / "ck"))
  damage(str(tmp_path / "ck" / "2"))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"))
  iterator = make_iterator()
  try:
    restored, _, step = checkpointing.load_state_if_possible(ckpt, target, iterator, name="toy")
  finally:
    ckpt.close()
  assert step == 1 and int(restored.step) == 1
  assert iterator.get_state() == {"next_index": 1}
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2.damaged"]
  warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warned) == 1 and "step 2" in warned[0] and reason in warned[0], warned


def test_params_only_restore_verifies_and_falls_back_without_moving(tmp_path):
  _toy_checkpoints(str(tmp_path / "ck"))
  _zero(str(tmp_path / "ck" / "2"))
  params, step = checkpointing.load_params(str(tmp_path / "ck"))
  assert step == 1
  np.testing.assert_allclose(params["params"]["w"], np.linspace(0.0, 1.0, 300) + 1, rtol=1e-6)
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2"]  # Maybe another run's: left.
  _zero(str(tmp_path / "ck" / "1"))
  with pytest.raises(checkpointing.CheckpointError, match=r"tried step 2 \(.*\); step 1 \("):
    checkpointing.load_params(str(tmp_path / "ck"))


# ---------------------------------------------------------------- NaN

def test_nonfinite_parameters_are_never_saved_and_the_stop_names_a_good_step(tmp_path, cache):
  # NaN moments after step 3: step 4's loss and gradients are finite, its parameters NaN.
  work = tmp_path / "nan"
  rc, out = fault_runs.run(work, env=dict(cache, PROSONA_FAULT_NAN_OPT_STATE_AT_STEP="3"))
  assert rc == 1, out[-3000:]
  assert "became NaN or infinite by step 4" in out, out[-3000:]
  assert f"The last good checkpoint is step 2 in {fault_runs.ckpt_dir(work)}" in out
  assert fault_runs.steps(work) == [2]
  assert not checkpointing.nonfinite_leaves(_restore(os.path.join(fault_runs.ckpt_dir(work), "2",
                                                                  "state")))


def test_nan_learning_rate_saves_nothing(tmp_path):
  """`lr=nan` (refused by `main`'s checks, but possible from Python) made NaN parameters
  from a finite loss; the checkpoint of step 1 was then called good."""
  tx = optax.adam(float("nan"))
  records = [{"x": np.full((4,), v, np.float32)} for v in range(4)]
  iterator = iter(grain.MapDataset.source(records).to_iter_dataset())

  def step(state, batch):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((p["w"][None, :] - batch["x"][:, None]) ** 2))(state.params)
    return trainer.apply_update(state, grads, loss, tx), {"loss": loss}

  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  state = parallel.replicate(trainer.TrainState.create({"w": jnp.zeros(3)}, tx), mesh)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
  writer = logger_lib.MetricWriter(str(tmp_path / "logs"))
  loop = trainer.LoopConfig(name="toy", total_steps=4, log_every=1, checkpoint_every=1,
                            eval_every=0)
  try:
    with pytest.raises(trainer.NonFiniteLoss, match="NaN or infinite by step 1.*No checkpoint"):
      trainer.fit(loop, state=state, train_step=jax.jit(step), iterator=iterator, ckpt=ckpt,
                  writer=writer, mesh=mesh)
  finally:
    ckpt.close()
    writer.close()
  assert not [n for n in os.listdir(tmp_path / "ckpt") if n.isdigit()]


# ---------------------------------------------------------------- one run per workdir

def test_second_run_on_a_workdir_exits_2_naming_the_first(runs):
  assert runs["lock_record"] is not None, "the first run never took the lock"
  assert runs["lock_record"]["pid"] == runs["first_pid"]
  assert runs["lock_record"]["host"] == socket.gethostname()
  rc, out = runs["second"]
  assert rc == 2, out[-3000:]
  errors = _errors(out)
  assert len(errors) == 1 and f"pid {runs['first_pid']} on " in errors[0], out[-3000:]
  rc, out = runs["baseline"]
  assert rc == 0, out[-3000:]  # The first run was not disturbed...
  assert "Traceback" not in out
  assert not runs["lock_left"]  # ... and released the lock at its end.


def test_stale_lock_is_taken_over_with_a_warning(runs):
  _, out = runs["cut_run"]
  assert f"took over the stale lock of pid {runs['stale_pid']} on " in out, out[-3000:]
  # The preempted run (SystemExit 143) released it.
  assert not os.path.exists(os.path.join(runs["cut"], workdir_lock.LOCK_NAME))


def test_live_lock_refuses_the_grid_too(tmp_path, cache):
  with workdir_lock.hold(str(tmp_path)):
    rc, out = fault_runs.run(tmp_path, tool="grid", config=("--config=configs/tiny.py",), env=cache)
  assert rc == 2, out[-3000:]
  errors = _errors(out)
  assert len(errors) == 1 and f"pid {os.getpid()} on " in errors[0], out[-3000:]
  assert not os.path.exists(tmp_path / workdir_lock.LOCK_NAME)


# ---------------------------------------------------------------- resuming a changed config

def test_resume_with_another_architecture_exits_2_leaving_config_json(runs):
  rc, out = fault_runs.run(runs["base"], "--config.model.latent_dim=5", env=runs["cache"])
  assert rc == 2, out[-3000:]
  errors = _errors(out)
  assert len(errors) == 1, out[-3000:]
  assert "config differs from " in errors[0] and "model.latent_dim (6 -> 5)" in errors[0]
  assert "--config.allow_config_change=True" in errors[0]
  assert fault_runs.read(os.path.join(runs["base"], "config.json")) == runs["config"]
  assert not os.path.exists(os.path.join(runs["base"], "config.prev.json"))


def test_resume_with_more_epochs_trains_on(runs, tmp_path):
  work = tmp_path / "longer"
  shutil.copytree(runs["base"], work)
  rc, out = fault_runs.run(work, "--config.stage1.epochs=4", env=runs["cache"])
  assert rc == 0, out[-3000:]
  assert f"resumed from the checkpoint of step {TOTAL}." in out
  assert "finished 4 steps" in out
  assert fault_runs.read(work / "config.prev.json") == runs["config"]
  assert json.loads((work / "config.json").read_text())["stage1"]["epochs"] == 4


def test_config_changes_lists_what_matters_only():
  saved = {"stage1": {"lr": 1e-3, "epochs": 3, "log_every": 2}, "model": {"latent_dim": 6},
           "eval": {"num_samples": 4}, "stages": ["stage1"], "gone": 1}
  new = {"stage1": {"lr": 3e-4, "epochs": 9, "log_every": 5}, "model": {"latent_dim": 6.0},
         "eval": {"num_samples": 8}, "stages": ["stage2"], "added": {"x": 1}}
  assert config_lib.config_changes(saved, new) == [("stage1.lr", 1e-3, 3e-4)]
  assert config_lib.config_changes({"a": math.nan, "b": True}, {"a": math.nan, "b": 1}) == [
      ("b", True, 1)]


# ---------------------------------------------------------------- settings checked at start

@pytest.mark.parametrize("override,field", [
    ("--config.data.batch_size=0", "config.data.batch_size=0"),
    ("--config.stage1.checkpoint_every=0", "config.stage1.checkpoint_every=0"),
    ("--config.stage1.log_every=0", "config.stage1.log_every=0"),
    ("--config.stage1.epochs=0", "config.stage1.epochs=0: nothing to train"),
    ("--config.stage1.lr=nan", "config.stage1.lr=nan"),
])
def test_unusable_setting_is_one_line_before_compiling(tmp_path, override, field):
  work = tmp_path / "w"
  rc, out = fault_runs.run(work, override)
  assert rc == 2, out[-3000:]
  errors = _errors(out)
  assert len(errors) == 1 and field in errors[0], out[-3000:]
  assert "Traceback" not in out
  assert " train / " not in out  # The stage's start-up line: nothing was built.
  assert not os.path.exists(work / "fold0") and not os.path.exists(work / "config.json")


def test_config_check_names_every_bad_field_in_one_line():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config_lib.check(tiny.get_config())
  config = tiny.get_config()
  config.stage2.tau = 0.0
  config.data.val_fraction = 1.0
  config.model.backbone = "resnet34"  # Needs multiples of 32: tiny's 32 is one.
  config.data.image_size = 48
  config.stage2.grid_alpha = ()
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.check(config)
  message = str(err.value)
  assert "\n" not in message
  for part in ("config.data.val_fraction=1.0", "config.stage2.tau=0.0",
               "config.data.image_size=48: the resnet34 backbone needs a multiple of 32",
               "config.stage2.grid_alpha=()"):
    assert part in message, message


def test_predict_refuses_unusable_options_before_loading(tmp_path):
  from prosona_jax import predictor  # pylint: disable=g-import-not-at-top
  a_file = tmp_path / "taken"
  a_file.write_text("")
  cases = [(dict(threshold=float("nan")), "--threshold=nan"),
           (dict(threshold=1.0), "--threshold=1.0"),
           (dict(threshold=-0.1), "--threshold=-0.1"),
           (dict(batch_size=0), "--batch_size=0"),
           (dict(out=str(a_file)), "an existing file")]
  for kw, pattern in cases:
    opts = dict(out=str(tmp_path / "out"), model=str(tmp_path / "no_model"), inputs=["x.npy"])
    with pytest.raises(predictor.InferenceError, match=pattern):
      predictor.run(predictor.Options(**{**opts, **kw}))
  assert not os.path.exists(tmp_path / "out")
  proc = subprocess.run(
      [sys.executable, "-m", "prosona_jax.predict", f"--model={tmp_path}", "--input=x.npy",
       "--threshold=nan", f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True,
      text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [
      "predict: error: --threshold=nan: expected a probability in [0, 1)"]


def test_export_of_another_models_weights_is_one_line_naming_the_tensor(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from prosona_jax import exporter  # pylint: disable=g-import-not-at-top
  from prosona_jax import inference  # pylint: disable=g-import-not-at-top
  from prosona_jax import model_loader  # pylint: disable=g-import-not-at-top
  from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top

  def weights(config):
    variables = prob_unet.init_from_config(config, jax.random.key(0))
    return inference.model_weights(variables["params"], variables["batch_stats"])

  config = tiny.get_config("stage1")
  out = tmp_path / "model"
  exporter.write_export(str(out), config, weights(config), platforms=["cpu"])
  model_loader.load_export(str(out))  # Its own weights load.
  other = tiny.get_config("stage1")
  other.model.latent_dim = 5
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in weights(other).items()},
            str(out / "params.safetensors"))
  with pytest.raises(inference.InferenceError) as err:
    model_loader.load_export(str(out))
  message = str(err.value)
  assert "\n" not in message and "params.safetensors: tensor 'params/" in message, message
  assert "belong to another model" in message
  a_file = tmp_path / "taken"
  a_file.write_text("")
  with pytest.raises(inference.InferenceError, match="an existing file"):
    exporter.export_run(str(tmp_path / "no_run"), str(a_file))


# ---------------------------------------------------------------- patient grouping

def test_patient_grouping_is_recorded(runs):
  with open(os.path.join(runs["base"], "config.json")) as f:
    info = json.load(f)["data_info"]
  assert info == {"patient_grouping": "given", "num_images": 48, "num_patients": 16}
  assert json.loads(runs["eval"])["patient_grouping"] == "given"
  from prosona_jax import inference  # pylint: disable=g-import-not-at-top
  assert "data_info" not in inference.load_config(runs["base"])  # Not a config field.


def test_main_shows_the_one_per_image_warning_once(tmp_path):
  path = tmp_path / "unkeyed.npz"
  rng = np.random.default_rng(0)
  np.savez(path, images=rng.random((48, 32, 32), np.float32),
           masks=(rng.random((48, 4, 32, 32)) > 0.5).astype(np.uint8))
  rc, out = fault_runs.run(tmp_path / "w", "--config.data.format=npz", f"--config.data.path={path}",
                 "--config.stage1.epochs=0")
  assert rc == 2, out[-3000:]  # epochs=0 stops it after the data opened.
  assert out.count("every image is its own patient") == 1, out[-3000:]

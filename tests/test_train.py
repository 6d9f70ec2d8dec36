"""Guarantees of the training loop (`trainer.fit` through `python -m prosona_jax.main`).

- A run killed with SIGKILL and re-run ends bit-identical to an uninterrupted run (CPU).
- SIGTERM (preemption) writes a checkpoint of the step it stopped at and exits with 143.
- A NaN loss stops the run naming the step; the last good checkpoint is kept.
- The data-parallel step on 8 fake CPU devices matches 1 device.
- `--dry_run` writes exact parameter counts; a misspelt override fails at start-up.

End-to-end runs are subprocesses on configs/tiny.py, shared between tests by module-scoped
fixtures. They share a persistent compilation cache (compiles are most of a tiny run's
CPU time; XLA compiles the same program to the same executable either way). Faults are
injected through training-loop hooks (`tests/fault_worker.py`, which runs `main` with
hooks chosen by `PROSONA_FAULT_*_AT_STEP`) so that they land on a known step.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import fault_runs

from prosona_jax import checkpointing
from prosona_jax import logger as logger_lib
from prosona_jax import optimizers
from prosona_jax import parallel
from prosona_jax import run
from prosona_jax import trainer
from prosona_jax.data import pipeline
from prosona_jax.data import sources
from prosona_jax.methods import prosona_stage1
from prosona_jax.models import prob_unet

REPO = fault_runs.REPO
TINY, TOTAL = fault_runs.TINY, fault_runs.TINY_STEPS


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
  """Environment of a persistent compilation cache shared by this module's subprocesses."""
  return fault_runs.cache_env(tmp_path_factory.mktemp("jax_cache"))


def _restore(directory, step: int):
  """The saved TrainState of `step` as a pytree of arrays (no target needed)."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(directory, str(step), "state"))


def _train_losses(workdir) -> dict[int, list[float]]:
  """Every logged `train/loss` per step (several when a resumed run logs a step again)."""
  out = {}
  with open(os.path.join(workdir, "fold0", "stage1", "logs", "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "train/loss" in row:
        out.setdefault(row["step"], []).append(row["train/loss"])
  return out


def _assert_trees_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def _load_config(path: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(
      "config_" + os.path.basename(path)[:-3], os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ---------------------------------------------------------------- kill, preempt, resume

@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
  """An uninterrupted run, and one preempted at step 3, killed at step 8, then finished."""
  base = str(tmp_path_factory.mktemp("uninterrupted"))
  cut = str(tmp_path_factory.mktemp("interrupted"))
  eval_json = lambda d: os.path.join(d, "eval", "stage1_fold0.json")
  r = {"base": base, "cut": cut, "cache": cache}
  r["baseline"] = fault_runs.run(base, env=cache)  # First: it fills the compilation cache.
  # 1. SIGTERM after step 3 (not a multiple of checkpoint_every: only preemption saves it).
  r["sigterm"] = fault_runs.run(cut, env=dict(cache, PROSONA_FAULT_SIGTERM_AT_STEP="3"))
  r["sigterm_steps"] = fault_runs.steps(cut)
  r["sigterm_saved_step"] = (int(_restore(fault_runs.ckpt_dir(cut), 3)["step"])
                             if 3 in r["sigterm_steps"] else None)
  r["sigterm_eval"] = os.path.exists(eval_json(cut))
  # 2. SIGKILL right after the asynchronous save of step 8 was started (likely half written).
  r["sigkill"] = fault_runs.run(cut, env=dict(cache, PROSONA_FAULT_SIGKILL_AT_STEP="8"))
  r["sigkill_eval"] = os.path.exists(eval_json(cut))
  # 3. The same command again finishes the run.
  r["resume"] = fault_runs.run(cut, env=cache)
  r["base_eval"] = fault_runs.read(eval_json(base)) if os.path.exists(eval_json(base)) else None
  r["cut_eval"] = fault_runs.read(eval_json(cut)) if os.path.exists(eval_json(cut)) else None
  return r


def test_sigterm_saves_a_checkpoint_and_exits_143(runs):
  rc, out = runs["sigterm"]
  assert rc == 143, out[-3000:]
  assert "preempted at step 3; checkpoint saved" in out
  assert runs["sigterm_steps"] == [2, 3]
  assert runs["sigterm_saved_step"] == 3
  assert not runs["sigterm_eval"]  # Stopped before scoring.


def test_sigkill_then_rerun_resumes_from_a_checkpoint(runs):
  rc, out = runs["sigkill"]
  assert rc == -signal.SIGKILL, out[-3000:]
  assert "resumed from the checkpoint of step 3." in out
  assert not runs["sigkill_eval"]
  rc, out = runs["resume"]
  assert rc == 0, out[-3000:]
  # Step 8's save was in flight at the kill: resume from it if it finished, else from 6.
  resumed = re.findall(r"resumed from the checkpoint of step (\d+)\.", out)
  assert resumed and int(resumed[0]) in (6, 8), out[-3000:]
  assert f"finished {TOTAL - int(resumed[0])} steps" in out
  # A half-written checkpoint leaves no debris behind.
  assert not [n for n in os.listdir(fault_runs.ckpt_dir(runs["cut"])) if "tmp" in n]


def test_interrupted_run_ends_exactly_like_an_uninterrupted_one(runs):
  rc, out = runs["baseline"]
  assert rc == 0, out[-3000:]
  assert fault_runs.steps(runs["base"])[-1] == fault_runs.steps(runs["cut"])[-1] == TOTAL
  # Parameters, optimizer state and step counter: bit for bit.
  _assert_trees_equal(_restore(fault_runs.ckpt_dir(runs["base"]), TOTAL),
                      _restore(fault_runs.ckpt_dir(runs["cut"]), TOTAL))
  # Test-fold scores: byte for byte.
  assert runs["base_eval"] is not None and runs["base_eval"] == runs["cut_eval"]
  # Every step logged by both saw the same batch and rng (the data iterator resumed).
  base_losses, cut_losses = _train_losses(runs["base"]), _train_losses(runs["cut"])
  assert sorted(base_losses) == sorted(cut_losses) == list(range(2, TOTAL + 1, 2))
  for step, losses in cut_losses.items():
    assert all(v == base_losses[step][0] for v in losses), (step, losses, base_losses[step])


def test_rerun_of_a_finished_run_trains_nothing(runs):
  base = runs["base"]
  steps_before = fault_runs.steps(base)
  logs = os.path.join(base, "fold0", "stage1", "logs", "metrics.jsonl")
  log_before = fault_runs.read(logs)
  rc, out = fault_runs.run(base, env=runs["cache"])
  assert rc == 0, out[-3000:]
  assert f"already complete ({TOTAL} steps)" in out
  assert not re.search(rf"step \d+/{TOTAL}", out)
  assert fault_runs.steps(base) == steps_before
  assert fault_runs.read(logs) == log_before
  assert fault_runs.read(os.path.join(base, "eval", "stage1_fold0.json")) == runs["base_eval"]


# ---------------------------------------------------------------- NaN

def _toy_fit(tmp_path, *, log_every: int, checkpoint_every: int):
  """Fits w to the batch mean with Adam; the third batch holds a NaN."""
  tx = optax.adam(0.1)
  values = [1.0, 2.0, np.nan, 4.0, 5.0, 6.0, 7.0, 8.0]
  records = [{"x": np.full((4,), v, np.float32)} for v in values]
  iterator = iter(grain.MapDataset.source(records).to_iter_dataset())

  def step(state, batch):
    loss_fn = lambda p: jnp.mean((p["w"][None, :] - batch["x"][:, None]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return trainer.apply_update(state, grads, loss, tx), {"loss": loss}

  step = jax.jit(step)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  state0 = parallel.replicate(trainer.TrainState.create({"w": jnp.zeros(3)}, tx), mesh)
  expected = state0  # The state after the two good steps, computed by hand.
  for record in records[:2]:
    expected, _ = step(expected, parallel.to_global(record, mesh))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
  writer = logger_lib.MetricWriter(str(tmp_path / "logs"))
  loop = trainer.LoopConfig(name="toy", total_steps=len(values), log_every=log_every,
                            checkpoint_every=checkpoint_every, eval_every=0)
  try:
    with pytest.raises(trainer.NonFiniteLoss) as err:
      trainer.fit(loop, state=state0, train_step=step, iterator=iterator, ckpt=ckpt,
                  writer=writer, mesh=mesh)
  finally:
    ckpt.close()
    writer.close()
  return str(err.value), expected, ckpt.directory


@pytest.mark.parametrize("log_every,checkpoint_every,kept", [
    (1, 1, [1, 2]),  # Seen at once.
    (4, 2, [2]),  # Seen one step later, at the next log line: still names step 3.
    (4, 4, []),  # Seen before any checkpoint.
])
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, log_every, checkpoint_every, kept):
  message, expected, directory = _toy_fit(tmp_path, log_every=log_every,
                                          checkpoint_every=checkpoint_every)
  assert "NaN or infinite at step 3;" in message, message
  assert sorted(int(n) for n in os.listdir(directory) if n.isdigit()) == kept
  if kept:
    assert f"last good checkpoint is step {kept[-1]} in {directory}" in message, message
    saved = _restore(directory, 2)
    np.testing.assert_array_equal(saved["params"]["w"], np.asarray(expected.params["w"]))
    assert int(saved["step"]) == 2 and int(saved["nonfinite_step"]) == -1
  else:
    assert "No checkpoint was written" in message, message
  with open(tmp_path / "logs" / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert all(np.isfinite(row["train/loss"]) for row in logged)


def test_apply_update_skips_nonfinite_loss_or_gradients():
  tx = optax.adam(0.1)
  s0 = trainer.TrainState.create({"a": jnp.ones(2), "b": jnp.ones(())}, tx)
  good = {"a": jnp.ones(2), "b": jnp.ones(())}
  one = jnp.float32(1.0)

  s1 = trainer.apply_update(s0, good, one, tx)
  assert int(s1.nonfinite_step) == -1 and int(s1.step) == 1
  assert not np.array_equal(s1.params["a"], s0.params["a"])

  for grads, loss in [({"a": good["a"], "b": jnp.float32(jnp.inf)}, one),
                      ({"a": jnp.array([0.0, jnp.nan]), "b": good["b"]}, one),
                      (good, jnp.float32(jnp.nan)),
                      (good, jnp.float32(-jnp.inf))]:
    s2 = trainer.apply_update(s1, grads, loss, tx)
    assert int(s2.step) == 2
    assert int(s2.nonfinite_step) == 2  # Counted from 1, like log lines and checkpoints.
    _assert_trees_equal(s2.params, s1.params)
    _assert_trees_equal(s2.opt_state, s1.opt_state)
  # Later good steps apply again; the first bad step stays recorded.
  s3 = trainer.apply_update(s2, good, one, tx)
  assert int(s3.step) == 3 and int(s3.nonfinite_step) == 2
  assert not np.array_equal(s3.params["a"], s2.params["a"])


# ---------------------------------------------------------------- data parallelism

DP_STEPS = 3


def _dp_train(devices) -> tuple[dict, list[float], dict]:
  """DP_STEPS tiny Stage-1 steps on a mesh over `devices`; params, losses, placement."""
  config = _load_config("configs/tiny.py", "stage1")
  mesh = Mesh(np.asarray(devices), ("data",))
  source = sources.source_from_config(config.data)
  loader = pipeline.train_loader(source, np.arange(32), batch_size=config.data.batch_size,
                                 seed=0, shard_index=0, shard_count=1, augment_rotate=False)
  model = prob_unet.build_from_config(config)
  tx, _ = optimizers.adam(config.stage1, 4)
  state = prosona_stage1.init_state(model, config, tx, mesh, jax.random.key(0))
  step_fn = prosona_stage1.make_train_step(model, tx, config, mesh, jax.random.key(1))
  iterator, losses = iter(loader), []
  for _ in range(DP_STEPS):
    batch = parallel.to_global(next(iterator), mesh)
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  image = batch["image"]
  leaves = jax.tree.leaves(state.params)
  placement = {
      "devices": len(jax.devices()),
      "batch_spec": str(image.sharding.spec),
      "batch_shard_rows": sorted({s.data.shape[0] for s in image.addressable_shards}),
      "batch_devices": len(image.sharding.device_set),
      "params_replicated": all(x.sharding.is_fully_replicated for x in leaves),
      "params_devices": sorted({len(x.sharding.device_set) for x in leaves}),
  }
  params = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
  return params, losses, placement


def test_data_parallel_on_8_devices_matches_1_device(tmp_path):
  out = str(tmp_path / "dp8")
  flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--dp-worker", out],
                          cwd=REPO, env=fault_runs.environment({"XLA_FLAGS": flags.strip()}),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    ref_params, ref_losses, ref_placement = _dp_train(jax.devices()[:1])  # Meanwhile.
  finally:
    rc, log = fault_runs.finish(proc)
  assert rc == 0, log[-3000:]
  with open(out + ".json") as f:
    result = json.load(f)
  placement = result["placement"]
  assert placement == {
      "devices": 8, "batch_spec": str(P("data")), "batch_shard_rows": [1],
      "batch_devices": 8, "params_replicated": True, "params_devices": [8]}
  assert ref_placement["batch_devices"] == 1 and ref_placement["batch_shard_rows"] == [8]
  np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5)
  params = np.load(out + ".npz")
  assert sorted(params.files) == sorted(ref_params)
  for name, value in ref_params.items():
    # Reductions over the batch run in another order: equal up to float32 rounding.
    np.testing.assert_allclose(params[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------- start-up checks

LIDC_COUNTS = {"backbone": 24429952, "prior": 1967724, "posterior": 1967868, "fcomb": 929}


def test_dry_run_writes_exact_parameter_counts(tmp_path):
  workdir = tmp_path / "dry"
  # Compiles nothing.
  proc = fault_runs.start(workdir, "--dry_run", config=("--config=configs/lidc.py",))
  try:
    # Meanwhile, in this process: D-Persona's posterior sees all four masks.
    config = _load_config("configs/lidc.py")
    config.model.posterior_input = "all"
    summary_all = run.dry_run(config, str(tmp_path / "dry_all"))
  finally:
    rc, out = fault_runs.finish(proc)
  assert rc == 0, out[-3000:]
  assert os.listdir(workdir) == ["model_summary.json"]  # No data read, nothing trained.
  with open(workdir / "model_summary.json") as f:
    summary = json.load(f)
  assert {k: summary[k] for k in LIDC_COUNTS} == LIDC_COUNTS
  assert summary["total"] == sum(LIDC_COUNTS.values()) == 28366473
  expected_all = dict(LIDC_COUNTS, posterior=1968300)
  assert {k: summary_all[k] for k in expected_all} == expected_all
  assert summary_all["total"] == sum(expected_all.values())


@pytest.mark.parametrize("override,name", [
    ("--config.stage1.lrr=1", "lrr"),
    ("--config.stag1.lr=1", "stag1"),
])
def test_misspelt_override_fails_at_start_up(tmp_path, override, name):
  workdir = tmp_path / "never"
  rc, out = fault_runs.run(workdir, override)
  assert rc != 0
  assert f"'{name}'" in out, out[-3000:]
  assert not workdir.exists()


if __name__ == "__main__":
  # Worker of test_data_parallel_on_8_devices_matches_1_device (needs its own process:
  # the fake device count is fixed when JAX starts).
  assert sys.argv[1] == "--dp-worker"
  params_, losses_, placement_ = _dp_train(jax.devices())
  np.savez(sys.argv[2] + ".npz", **params_)
  with open(sys.argv[2] + ".json", "w") as f_:
    json.dump({"losses": losses_, "placement": placement_}, f_)

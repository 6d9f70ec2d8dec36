"""The (alpha, beta) grid: cells trained together equal cells trained alone."""

import json
import logging
import os
import signal

import jax
import numpy as np
import pytest

from configs import tiny
from prosona_jax import ablation as grid
from prosona_jax import checkpointing
from prosona_jax import config_lib
from prosona_jax import evaluate
from prosona_jax import parallel
from prosona_jax import run
from prosona_jax import trainer
from prosona_jax.data import sources
from prosona_jax.data import splits
from prosona_jax.methods import base
from prosona_jax.methods import prosona_stage1
from prosona_jax.methods import prosona_stage2


def _fold(config, workdir, source, split, mesh) -> base.Fold:
  return base.Fold(config=config, workdir=workdir, fold=0, source=source, split=split,
                   mesh=mesh)


def _grid_method(config, workdir, source, split, mesh) -> prosona_stage2.Stage2:
  """The grid's Stage-2 method on the fixture's Stage 1 (state under fold0/grid)."""
  return grid.grid_stage(_fold(config, workdir, source, split, mesh))


def _run_stage2(config, workdir, source, split, mesh):
  """A single Stage-2 run (train and test) of fold 0, as `main` runs it."""
  method = prosona_stage2.Stage2(_fold(config, workdir, source, split, mesh))
  state = run.train_stage(method)
  evaluate.Evaluator(method).test(state)
  return method, state


def _config():
  c = tiny.get_config()
  c.stage1.max_steps = 4
  c.stage2.max_steps = 6
  c.stage2.eval_every_epochs = 0
  c.stage2.grid_alpha = (0.0, 1.0)
  c.stage2.grid_beta = (0.5,)
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = _config()
  workdir = str(tmp_path_factory.mktemp("grid"))
  source = sources.source_from_config(config.data)
  split = splits.make_split(source.patient_ids, fold=0, num_folds=config.data.num_folds,
                            seed=config.data.split_seed, val_fraction=config.data.val_fraction)
  mesh = parallel.make_mesh()
  stage1 = prosona_stage1.Stage1(_fold(config, workdir, source, split, mesh))
  evaluate.Evaluator(stage1).test(run.train_stage(stage1))
  rows = grid.run_program(config, workdir)
  out = grid.write_grid(config, workdir, rows)
  return config, workdir, source, split, mesh, rows, out


def _restore_params(directory, target):
  ckpt = checkpointing.Checkpointer(directory)
  state, _ = ckpt.restore_latest_state(target)
  ckpt.close()
  return state.params


def test_grid_outputs(setup):
  config, workdir, *_, rows, out = setup
  assert len(rows) == 2
  with open(os.path.join(workdir, "grid.json")) as f:
    saved = json.load(f)
  assert saved["alphas"] == [0.0, 1.0] and saved["betas"] == [0.5]
  assert len(saved["cells"]) == 2
  for cell in saved["cells"]:
    metrics = cell["folds"]["0"]
    assert set(["ged", "dice_soft", "dice_match", "dice_each_direct",
                "prompt_rater_dice"]).issubset(metrics)
  assert os.path.getsize(os.path.join(workdir, "grid_ged.png")) > 1000
  assert out["cells"][1]["alpha"] == 1.0


def test_cell_equals_single_run(setup):
  config, workdir, source, split, mesh, rows, _ = setup
  # Train cell (alpha=1, beta=0.5) alone, on the same Stage-1 checkpoint.
  single = config.copy_and_resolve_references()
  single.stage2.alpha, single.stage2.beta = 1.0, 0.5
  alone_dir = os.path.join(workdir, "alone")
  single.stage2.init_from = os.path.join(workdir, "fold{fold}", "stage1", "checkpoints")
  _, alone_state = _run_stage2(single, alone_dir, source, split, mesh)

  method = _grid_method(config, workdir, source, split, mesh)
  target = grid.init_grid_state(method, method.make_optimizer()[0], 2)
  grid_params = _restore_params(os.path.join(workdir, "fold0", "grid", "checkpoints"), target)
  cell = jax.tree.map(lambda x: np.asarray(x[1]), grid_params)
  other = jax.tree.map(lambda x: np.asarray(x[0]), grid_params)
  alone = jax.tree.map(np.asarray, alone_state.params)
  for a, b in zip(jax.tree.leaves(cell), jax.tree.leaves(alone)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The other cell (alpha=0) really trained differently: the cells are not one copy.
  diff = max(float(np.abs(a - b).max())
             for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(alone)))
  assert diff > 1e-6
  with open(os.path.join(alone_dir, "eval", "stage2_fold0.json")) as f:
    alone_eval = json.load(f)
  grid_row = [r for r in rows if r["alpha"] == 1.0][0]
  np.testing.assert_allclose(grid_row["mean"]["ged"], alone_eval["mean"]["ged"], atol=1e-5)


def test_commands_and_merge(setup):
  config, workdir, *_ = setup
  cmds = grid.commands("configs/tiny.py", workdir, config)
  assert len(cmds) == 2
  assert "--config.stage2.alpha=1" in cmds[1] and "--config.stages=stage2 " in cmds[1]
  # Without the cells' results, merging says which cell is missing.
  with pytest.raises(grid.UserError, match="alpha=0 beta=0.5"):
    grid.collect_cells(config, workdir)


def test_cells_per_pass_do_not_change_results(setup):
  """Cells vmapped all at once and one per pass (lax.map) train to the same parameters."""
  config, workdir, source, split, mesh, *_ = setup
  config = config.copy_and_resolve_references()  # The fixture's config stays as it is.
  method = _grid_method(config, workdir, source, split, mesh)
  tx, _ = method.make_optimizer()
  batch = parallel.to_global(next(method.train_iterator()), mesh)
  finals = {}
  for per_pass in (1, 2):
    method.config.stage2.grid_cells_per_pass = per_pass
    assert grid.grid_cells_per_pass(method.config, 2) == per_pass
    step = grid.make_grid_step(method, tx, [0.0, 1.0], [0.5, 0.5])
    state = grid.init_grid_state(method, tx, 2)
    # One cell per pass is a loop over cells (lax.map's scan); both at once is none.
    scans = str(step.trace(state, batch, method.const).jaxpr).count(" scan[")
    assert (scans > 0) == (per_pass == 1), (per_pass, scans)
    for _ in range(3):
      state, metrics = step(state, batch, method.const)
    finals[per_pass] = jax.tree.map(np.asarray, state.params)
    assert np.isfinite(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(finals[1]), jax.tree.leaves(finals[2])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The two cells differ (alpha 0 vs 1), so a swapped or shared cell would be caught.
  cell0 = jax.tree.leaves(jax.tree.map(lambda x: x[0], finals[1]))
  cell1 = jax.tree.leaves(jax.tree.map(lambda x: x[1], finals[1]))
  assert max(float(np.abs(a - b).max()) for a, b in zip(cell0, cell1)) > 1e-6
  with pytest.raises(ValueError, match="grid_cells_per_pass"):
    method.config.stage2.grid_cells_per_pass = -1
    grid.grid_cells_per_pass(method.config, 2)


def test_test_cells_equals_test_of_each_cell(setup):
  """Scoring cells on one shared backbone pass gives each cell's own `test` result."""
  config, workdir, source, split, mesh, *_ = setup
  method = _grid_method(config, workdir, source, split, mesh)
  evaluator = evaluate.Evaluator(method)
  base = method.init_projector()
  # Two clearly different projectors: the base and one with its output layer flipped.
  other = jax.tree.map(lambda x: x, base)
  other["params"]["out"]["kernel"] = -base["params"]["out"]["kernel"]
  as_state = lambda proj: trainer.TrainState.create(proj, method.make_optimizer()[0])
  together = grid.test_cells(method, [base, other])
  assert len(together) == 2
  for got, proj in zip(together, (base, other)):
    want = evaluator.test(as_state(proj), write=False).result
    assert got["keys"] == want["keys"]
    for key in ("ged", "dice_soft", "dice_match", "prompt_rater_dice", "prompt_mean_area"):
      np.testing.assert_allclose(got["mean"][key], want["mean"][key], atol=1e-6)
    assert [p["direct_dice"] for p in got["prompts"]] == pytest.approx(
        [p["direct_dice"] for p in want["prompts"]], abs=1e-6)
  # The probabilities themselves (the tiny model's masks may all be empty at 0.5).
  cached = grid.shared_test(method, evaluator.test_rng)
  decode_fn = grid.make_prompt_decoder(method)
  probs = []
  for proj in (base, other):
    got = grid.predict_shared(decode_fn, method.frozen, proj, cached, method.emb_all)
    labels, want, keys = evaluator.predict(as_state(proj), split.test,
                                           jax.random.fold_in(method.eval_rng, 1))
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(cached.labels, labels)
    assert cached.keys == keys
    probs.append(got)
  assert np.abs(probs[0] - probs[1]).max() > 1e-4


def test_interrupted_grid_resumes_to_the_same_result(setup, caplog):
  """A grid preempted after step 3 resumes from its checkpoint and ends where an
  uninterrupted grid ends (the fixture's), with every cell scored."""
  config, workdir, *_ = setup
  config = config.copy_and_resolve_references()
  config.stage2.init_from = os.path.join(workdir, "fold{fold}", "stage1", "checkpoints")
  resumed_dir = os.path.join(workdir, "preempted")
  sigterm_after_3 = lambda step, state: step == 3 and os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(trainer.Preempted) as stopped:
    grid.run_program(config, resumed_dir, hooks=(sigterm_after_3,))
  assert stopped.value.step == 3 and stopped.value.code == 143
  grid_ckpts = os.path.join(resumed_dir, "fold0", "grid", "checkpoints")
  ckpt = checkpointing.Checkpointer(grid_ckpts)
  assert ckpt.latest_step() == 3
  ckpt.close()
  caplog.set_level(logging.INFO)
  rows = grid.run_program(config, resumed_dir)
  # It went on from step 3 (a fresh start would end with the same parameters too).
  assert "grid/fold0: resumed from the checkpoint of step 3." in caplog.text
  assert "grid/fold0: finished 3 steps" in caplog.text
  assert len(rows) == 2
  method = _grid_method(config, workdir, *setup[2:5])
  target = grid.init_grid_state(method, method.make_optimizer()[0], 2)
  resumed = _restore_params(grid_ckpts, target)
  straight = _restore_params(os.path.join(workdir, "fold0", "grid", "checkpoints"), target)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  straight_rows = setup[5]
  for got, want in zip(rows, straight_rows):
    assert (got["alpha"], got["beta"]) == (want["alpha"], want["beta"])
    np.testing.assert_allclose(got["mean"]["ged"], want["mean"]["ged"], atol=1e-6)


def test_separate_cell_jobs_merge_into_the_same_grid(setup):
  """Cells run as separate jobs (what `--mode=commands` prints), then `--mode=merge`:
  grid.json and the heatmap, with the scores of the one-program grid."""
  config, workdir, source, split, mesh, rows, _ = setup
  jobs_dir = os.path.join(workdir, "jobs")
  for alpha, beta in config_lib.grid_cells(config):
    cell = config.copy_and_resolve_references()  # What each printed command sets.
    cell.stage2.alpha, cell.stage2.beta = alpha, beta
    cell.stages = ("stage2",)
    cell.stage2.init_from = os.path.join(workdir, "fold{fold}", "stage1", "checkpoints")
    _run_stage2(cell, grid.cell_dir(jobs_dir, alpha, beta), source, split, mesh)
  merged = grid.write_grid(config, jobs_dir, grid.collect_cells(config, jobs_dir))
  with open(os.path.join(jobs_dir, "grid.json")) as f:
    assert json.load(f) == json.loads(json.dumps(merged))
  assert os.path.getsize(os.path.join(jobs_dir, "grid_ged.png")) > 1000
  for cell in merged["cells"]:
    program = [r for r in rows if (r["alpha"], r["beta"]) == (cell["alpha"], cell["beta"])]
    np.testing.assert_allclose(cell["folds"][0]["ged"], program[0]["mean"]["ged"], atol=1e-5)

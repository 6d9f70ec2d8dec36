r"""The (alpha, beta) ablation grid of the paper's Fig. 5 (`python -m prosona_jax.grid`).

In one program (default): every cell's projector trains together, on one shared Stage-1
model and one shared stream of batches, so the frozen backbone and the prior run once per
batch for all cells (the per-cell part runs in passes of `stage2.grid_cells_per_pass`
vmapped cells; see `grid_cells_per_pass`). Cells stay independent: each sees the batches,
prior samples and initialisation it would see alone, so a cell equals the run of that
cell by itself (`Stage2.cell_update` is the one update of both).

As separate jobs (a cluster): `commands` prints one `main` command per cell, each a
Stage-2 run on the shared Stage-1 checkpoints; `collect_cells` merges their results.

Both write WORKDIR/grid.json (per cell and fold: every metric), WORKDIR/grid.md and the GED
heatmap WORKDIR/grid_ged.png. An interrupted grid resumes from its checkpoints.
"""

from __future__ import annotations

import json
import os
import shlex
from typing import NamedTuple

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from prosona_jax import checkpointing
from prosona_jax import config_lib
from prosona_jax import evaluate
from prosona_jax import figures
from prosona_jax import layout
from prosona_jax import logger as logger_lib
from prosona_jax import parallel
from prosona_jax import run
from prosona_jax import trainer
from prosona_jax.data import sources
from prosona_jax.errors import ConfigError
from prosona_jax.errors import UserError
from prosona_jax.methods import prosona_stage1
from prosona_jax.methods import prosona_stage2
from prosona_jax.models import prompt as prompt_lib

MODES = ("program", "commands", "merge")


def cell_dir(workdir: str, alpha: float, beta: float) -> str:
  return os.path.join(workdir, "cells", f"alpha{alpha:g}_beta{beta:g}")


def grid_cells_per_pass(config, num_cells: int) -> int:
  """How many cells one pass of the grid step vmaps (`stage2.grid_cells_per_pass`).

  0 (auto): every cell at once on accelerators; one at a time on CPU, where the vmapped
  Fcomb decode of all cells outgrows the caches and runs memory-bound (`python
  benchmarks/bench_grid.py --cells_per_pass=1,3,9`). Either way the frozen backbone and
  prior run once per batch for all cells, and every cell computes what it would alone.
  """
  return parallel.items_per_pass(config.stage2.grid_cells_per_pass, num_cells,
                                 "config.stage2.grid_cells_per_pass")


def grid_stage(fold) -> prosona_stage2.Stage2:
  """The Stage-2 method of a fold, keeping its state under WORKDIR/fold<k>/grid."""
  return prosona_stage2.Stage2(fold, stage_dir=layout.stage_dir(fold.workdir, fold.fold,
                                                                 "grid"))


def make_grid_step(method: prosona_stage2.Stage2, tx, alphas_C, betas_C):
  """Compiled `(state, batch, constants)` step training every cell on one shared forward."""
  alphas_C = jnp.asarray(alphas_C, jnp.float32)
  betas_C = jnp.asarray(betas_C, jnp.float32)
  num_cells = len(alphas_C)
  cells_per_pass = grid_cells_per_pass(method.config, num_cells)

  def step(state: trainer.TrainState, batch, const: prosona_stage2.StepConstants):
    shared = method.shared_for_step(state.step, batch["image"], const)
    params, opt_state, finite_C, aux = parallel.map_in_passes(
        lambda xs: method.cell_update(tx, *xs, shared, batch["masks"], const),
        (state.params, state.opt_state, alphas_C, betas_C), cells_per_pass, num_cells)
    new_state = state.advanced(jnp.all(finite_C), params=params, opt_state=opt_state)
    metrics = {f"{k}/cell{c}": v[c] for k, v in aux.items() for c in range(num_cells)}
    metrics["loss"] = aux["loss"].mean()
    return new_state, metrics

  repl, data = parallel.replicated(method.mesh), parallel.batch_sharded(method.mesh)
  return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def init_grid_state(method: prosona_stage2.Stage2, tx, num_cells: int) -> trainer.TrainState:
  """Every cell starts from the projector a single run would start from."""
  params = method.init_projector()
  stack = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (num_cells,) + x.shape), t)
  state = trainer.TrainState.create(stack(params), tx)
  state = state.replace(opt_state=jax.vmap(tx.init)(state.params))
  return parallel.replicate(state, method.mesh)


def cell_params(state: trainer.TrainState, c: int):
  return jax.tree.map(lambda x: x[c], state.params)


class SharedEval(NamedTuple):
  """The projector-independent half of scoring a split, computed once for many projectors."""
  labels: np.ndarray  # (N, R, H, W) of the valid images.
  keys: list
  batches: list  # (Shared of the whole padded batch, valid mask) per eval batch.


def shared_test(method: prosona_stage2.Stage2, rng: jax.Array) -> SharedEval:
  """Backbone features and prior samples of the test fold, drawn as `Evaluator.test`
  draws them, so `predict_shared` reproduces its probabilities."""
  fold, cfg = method.fold, method.cfg
  repl, data = parallel.replicated(method.mesh), parallel.batch_sharded(method.mesh)
  shared_fn = jax.jit(lambda frozen, image, r: prompt_lib.shared_forward(
      method.model, frozen, image, r, cfg.eval_num_samples),
                      in_shardings=(repl, data, repl), out_shardings=data)
  labels, keys, out = [], [], []
  for i, (image, valid, batch_labels, batch_keys) in enumerate(evaluate.eval_inputs(
      fold.source, fold.split.test, batch_size=fold.eval_batch_size, mesh=fold.mesh)):
    out.append((shared_fn(method.frozen, image, jax.random.fold_in(rng, i)), valid))
    labels.append(batch_labels)
    keys.extend(batch_keys)
  return SharedEval(np.concatenate(labels), keys, out)


def make_prompt_decoder(method: prosona_stage2.Stage2):
  """Compiled `(frozen, proj_params, shared, emb_PE) -> probs (B, P, H, W)`: the rest of
  the Stage-2 predictor after the shared forward."""
  repl, data = parallel.replicated(method.mesh), parallel.batch_sharded(method.mesh)
  return jax.jit(method.prompt_probs, in_shardings=(repl, repl, data, repl),
                 out_shardings=repl)


def predict_shared(decode_fn, frozen, proj_params, cached: SharedEval, emb_PE) -> np.ndarray:
  """Probabilities (N, P, H, W) of one projector on a `shared_test` result."""
  return np.concatenate([np.asarray(decode_fn(frozen, proj_params, shared, emb_PE))[valid]
                         for shared, valid in cached.batches])


def test_cells(method: prosona_stage2.Stage2, params_per_cell) -> list[dict]:
  """The test results of several projectors (grid cells): the backbone, the prior and the
  data pipeline run once for all of them; each equals that projector's own test."""
  evaluator = evaluate.Evaluator(method)
  cached, decode_fn = shared_test(method, evaluator.test_rng), make_prompt_decoder(method)
  return [evaluator.result(
      cached.labels, predict_shared(decode_fn, method.frozen, p, cached, method.emb_all),
      cached.keys) for p in params_per_cell]


def preflight(config, workdir: str, *, train_stage1: bool = False) -> None:
  """Checks, before any fold trains, what the grid needs: a writable work directory, a
  trained Stage 1 for every fold (unless `train_stage1`), and the text encoder, by
  embedding the prompt bank into every fold's `grid` directory.

  Raises:
    UserError: with what is missing and how to provide it.
  """
  if train_stage1 and config.stage2.init_from:
    raise ConfigError(
        "--train_stage1 trains Stage 1 in the grid's work directory, but "
        f"--config.stage2.init_from={config.stage2.init_from} names another Stage 1: "
        "give one or the other.")
  layout.check_writable(workdir)
  folds = config_lib.folds_to_run(config.data)
  missing = [k for k in folds if checkpointing.latest_step_dir(
      layout.stage2_init_dir(config, workdir, k)) is None]
  if missing and train_stage1:
    prosona_stage1.Stage1.preflight(config, workdir, run_stages=("stage1", "grid"))
  else:
    # Stage 1 is reused, never retrained behind the user's back (issue 14).
    prosona_stage2.check_stage1(config, workdir, folds,
                                f"pass --train_stage1 to train Stage 1 in {workdir} first")
  prosona_stage2.prepare_banks(config, [layout.stage_dir(workdir, k, "grid") for k in folds])


@run.guard_workdir
def run_program(config, workdir: str, hooks: tuple = (), *,
                train_stage1: bool = False) -> list[dict]:
  """Trains and scores every cell of every requested fold in one program.

  Each fold starts from a trained Stage 1: `stage2.init_from` (a run's work directory or
  checkpoints), else this work directory's own; with none there, `train_stage1` trains
  one here first, and without it the grid stops before any training.
  """
  cells = config_lib.grid_cells(config)
  source = sources.source_from_config(config.data)  # The data first, as `main` does.
  layout.check_writable(workdir)
  log_path = layout.log_path(workdir)
  with logger_lib.run_log(log_path, f"Config:\n{config}"):
    logging.info("%s", run.header(config, workdir, source, log_path,
                                  f"the (alpha, beta) grid, {len(cells)} cells of Stage 2"))
    preflight(config, workdir, train_stage1=train_stage1)
    folds = list(run.folds(config, workdir, source=source))
    for fold in folds:  # Settings that cannot train are refused before anything compiles.
      if checkpointing.latest_step_dir(
          layout.stage2_init_dir(config, workdir, fold.fold)) is None:
        run.check_steps(fold, "stage1", layout.checkpoint_dir(workdir, fold.fold, "stage1"))
      run.check_steps(fold, "stage2", os.path.join(
          layout.stage_dir(workdir, fold.fold, "grid"), "checkpoints"))
    run.prepare_workdir(config, workdir, source)
    return _run_program(config, workdir, cells, folds, hooks)


def _run_program(config, workdir: str, cells, folds, hooks: tuple) -> list[dict]:
  rows = []
  for fold in folds:
    s1_dir = layout.stage2_init_dir(config, workdir, fold.fold)
    if checkpointing.latest_step_dir(s1_dir) is None:
      logging.info("No Stage-1 checkpoint for fold %d: training Stage 1 first "
                   "(--train_stage1).", fold.fold)
      stage1 = prosona_stage1.Stage1(fold)
      evaluate.Evaluator(stage1).test(run.train_stage(stage1, hooks))
    method = grid_stage(fold)
    tx, lr_fn = method.make_optimizer()
    step_fn = make_grid_step(method, tx, [a for a, _ in cells], [b for _, b in cells])
    ckpt = checkpointing.Checkpointer(os.path.join(method.stage_dir, "checkpoints"))
    writer = logger_lib.MetricWriter(os.path.join(method.stage_dir, "logs"))
    logging.info("grid/fold%d: %d cells x %d steps, one shared forward per batch.", fold.fold,
                 len(cells), method.total_steps)
    state = trainer.fit(method.loop_config(f"grid/fold{fold.fold}"),
                        state=init_grid_state(method, tx, len(cells)),
                        train_step=lambda s, b: step_fn(s, b, method.const),
                        iterator=method.train_iterator(), ckpt=ckpt, writer=writer,
                        mesh=fold.mesh, lr_fn=lr_fn, hooks=hooks)
    ckpt.close()
    writer.close()
    results = test_cells(method, [cell_params(state, c) for c in range(len(cells))])
    for result, (alpha, beta) in zip(results, cells):
      result.update(alpha=alpha, beta=beta)
      rows.append(result)
  return rows


def commands(config_arg: str, workdir: str, config) -> list[str]:
  """One shell command per cell for a cluster; each resumes by itself if interrupted."""
  out = []
  # The cells share one trained Stage 1: the one named by stage2.init_from, else WORKDIR's.
  init_from = config.stage2.init_from
  if not init_from:
    init_from = os.path.join(os.path.abspath(workdir), "fold{fold}", "stage1", "checkpoints")
  elif "://" not in init_from:
    init_from = os.path.abspath(init_from)
  for alpha, beta in config_lib.grid_cells(config):
    out.append(" ".join([
        "python -m prosona_jax.main", f"--config={shlex.quote(config_arg)}",
        f"--workdir={shlex.quote(cell_dir(workdir, alpha, beta))}",
        f"--config.stage2.alpha={alpha:g}", f"--config.stage2.beta={beta:g}",
        "--config.stages=stage2",
        "--config.stage2.init_from=" + shlex.quote(init_from)]))
  return out


def collect_cells(config, workdir: str) -> list[dict]:
  """Reads the eval JSON every separately run cell wrote."""
  rows = []
  for alpha, beta in config_lib.grid_cells(config):
    eval_dir = epath.Path(layout.eval_dir(cell_dir(workdir, alpha, beta)))
    found = sorted(f.name for f in (eval_dir.iterdir() if eval_dir.is_dir() else [])
                   if f.name.startswith("stage2_fold") and f.name.endswith(".json"))
    if not found:
      raise UserError(f"grid cell alpha={alpha:g} beta={beta:g}: no results in "
                              f"{eval_dir}; run its command (--mode=commands) first.")
    for fname in found:
      rows.append(json.loads((eval_dir / fname).read_text()))
  return rows


def write_grid(config, workdir: str, rows: list[dict]) -> dict:
  """grid.json (every metric per cell and fold), grid.md and the GED heatmap."""
  alphas = [float(a) for a in config.stage2.grid_alpha]
  betas = [float(b) for b in config.stage2.grid_beta]
  cells = []
  ged = np.full((len(alphas), len(betas)), np.nan)
  lines = ["| alpha | beta | folds | GED | Dice Soft | Dice Match | direct Dice (mean) |",
           "|---|---|---|---|---|---|---|"]
  for i, a in enumerate(alphas):
    for j, b in enumerate(betas):
      mine = [r for r in rows if r["alpha"] == a and r["beta"] == b]
      folds = {int(r["fold"]): r["mean"] for r in mine}
      cells.append({"alpha": a, "beta": b, "folds": folds})
      if not mine:
        continue
      mean = lambda k: float(np.mean([np.mean(m[k]) for m in folds.values()]))
      ged[i, j] = mean("ged")
      lines.append(f"| {a:g} | {b:g} | {','.join(map(str, sorted(folds)))} | {mean('ged'):.4f} | "
                   f"{100 * mean('dice_soft'):.2f} | {100 * mean('dice_match'):.2f} | "
                   f"{100 * mean('dice_each_direct'):.2f} |")
  out = {"convention": rows[0]["convention"] if rows else config.eval.convention,
         "alphas": alphas, "betas": betas, "cells": cells}
  layout.write_json(os.path.join(workdir, "grid.json"), out)
  layout.write_text(os.path.join(workdir, "grid.md"),
                    "# (alpha, beta) grid\n\nMean over folds; Dice in %.\n\n"
                    + "\n".join(lines) + "\n")
  if jax.process_index() == 0:
    figures.heatmap(ged, alphas, betas, os.path.join(workdir, "grid_ged.png"),
                    title=f"GED ({out['convention']}) over (alpha, beta)")
  print("\n".join(lines))
  return out

r"""The (alpha, beta) ablation grid of the paper's Fig. 5.

In one program (default): every cell's projector trains together, vmapped over a cell
axis, on one shared Stage-1 model and one shared stream of batches, so the frozen backbone
and the prior run once per batch for all cells (the per-cell part runs in passes of
`stage2.grid_cells_per_pass` vmapped cells; see `grid_cells_per_pass`). Cells stay
independent: each sees the batches, prior samples and initialisation it would see alone,
so a cell equals the run of that cell by itself.

  python -m prosona_jax.grid --config=configs/lidc.py:fold=-1 --workdir=runs/grid

As separate jobs (a cluster): print one command per cell, run them anywhere (they share
the Stage-1 checkpoints of WORKDIR), then merge:

  python -m prosona_jax.grid --config=configs/lidc.py --workdir=runs/grid --mode=commands
  python -m prosona_jax.grid --config=configs/lidc.py --workdir=runs/grid --mode=merge

Both write WORKDIR/grid.json (per cell and fold: every metric), WORKDIR/grid.md and the GED
heatmap WORKDIR/grid_ged.png. An interrupted grid resumes from its checkpoints.
"""

import json
import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from prosona_jax import checkpointing
from prosona_jax import figures
from prosona_jax import logger as logger_lib
from prosona_jax import parallel
from prosona_jax import stage2
from prosona_jax import stage2_train
from prosona_jax import train
from prosona_jax import trainer
from prosona_jax.data import sources
from prosona_jax.data import splits

MODES = ("program", "commands", "merge")


def cells_of(config) -> list[tuple[float, float]]:
  return [(float(a), float(b)) for a in config.stage2.grid_alpha for b in config.stage2.grid_beta]


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


def make_grid_step(ctx: stage2_train.Context, alphas_C, betas_C):
  """Compiled step training every cell at once on one shared forward pass."""
  s2, tx = ctx.config.stage2, ctx.tx
  kw = dict(model=ctx.model, projector=ctx.projector, tau=s2.tau, scale_scores=s2.scale_scores,
            dice_epsilon=ctx.config.stage1.dice_epsilon)
  alphas_C = jnp.asarray(alphas_C, jnp.float32)
  betas_C = jnp.asarray(betas_C, jnp.float32)
  num_cells = len(alphas_C)
  cells_per_pass = grid_cells_per_pass(ctx.config, num_cells)

  def one_cell(params, opt_state, alpha, beta, shared, masks, const):
    (loss, aux), grads = jax.value_and_grad(stage2.cell_loss, has_aux=True)(
        params, alpha, beta, frozen=const.frozen, shared=shared, masks_BRHW=masks,
        emb_PE=const.emb_PE, rater_P=const.rater_P, positive_PP=const.positive_PP, **kw)
    params, opt_state, _, finite = trainer.guarded_update(params, opt_state, grads, loss, tx)
    return params, opt_state, finite, aux

  def step(state: trainer.TrainState, batch, const: stage2.StepConstants):
    rng = jax.random.fold_in(ctx.step_rng, state.step)
    shared = stage2.shared_forward(ctx.model, const.frozen, batch["image"], rng, s2.num_samples,
                                   stage2.seg_prompts(rng, const, ctx.config))
    params, opt_state, finite_C, aux = parallel.map_in_passes(
        lambda xs: one_cell(*xs, shared, batch["masks"], const),
        (state.params, state.opt_state, alphas_C, betas_C), cells_per_pass, num_cells)
    new_state = state.advanced(jnp.all(finite_C), params=params, opt_state=opt_state)
    metrics = {f"{k}/cell{c}": v[c] for k, v in aux.items() for c in range(num_cells)}
    metrics["loss"] = aux["loss"].mean()
    return new_state, metrics

  repl, data = parallel.replicated(ctx.mesh), parallel.batch_sharded(ctx.mesh)
  return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def init_grid_state(ctx: stage2_train.Context, num_cells: int) -> trainer.TrainState:
  """Every cell starts from the projector a single run would start from."""
  params = ctx.init_projector()
  stack = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (num_cells,) + x.shape), t)
  state = trainer.TrainState.create(stack(params), ctx.tx)
  state = state.replace(opt_state=jax.vmap(ctx.tx.init)(state.params))
  return parallel.replicate(state, ctx.mesh)


def cell_params(state: trainer.TrainState, c: int):
  return jax.tree.map(lambda x: x[c], state.params)


def run_program(config, workdir: str) -> list[dict]:
  """Trains and scores every cell of every requested fold in one program."""
  cells = cells_of(config)
  source = sources.source_from_config(config.data)
  mesh = parallel.make_mesh()
  rows = []
  for fold in train.folds_to_run(config.data):
    split = splits.make_split(
        source.patient_ids, fold=fold, num_folds=config.data.num_folds,
        seed=config.data.split_seed, level=config.data.split_level,
        val_fraction=config.data.val_fraction)
    stage1_result = None
    s1_dir = stage2_train.stage1_checkpoint_dir(config, workdir, fold)
    if not epath.Path(s1_dir).is_dir():
      logging.info("No Stage-1 checkpoint for fold %d: training Stage 1 first.", fold)
      stage1_result = train.run_stage1(config, workdir, fold, source, split, mesh)
    grid_dir = os.path.join(workdir, f"fold{fold}", "grid")
    ctx = stage2_train.Context(config, workdir, fold, source, split, mesh, stage1_result,
                               stage_dir=grid_dir)
    step_fn = make_grid_step(ctx, [a for a, _ in cells], [b for _, b in cells])
    ckpt = checkpointing.Checkpointer(os.path.join(grid_dir, "checkpoints"))
    writer = logger_lib.MetricWriter(os.path.join(grid_dir, "logs"))
    logging.info("grid/fold%d: %d cells x %d steps, one shared forward per batch.", fold,
                 len(cells), ctx.total_steps)
    state = trainer.fit(ctx.loop_config(f"grid/fold{fold}"), state=init_grid_state(ctx, len(cells)),
                        train_step=lambda s, b: step_fn(s, b, ctx.const), iterator=ctx.iterator(),
                        ckpt=ckpt, writer=writer, mesh=mesh, lr_fn=ctx.lr_fn)
    ckpt.close()
    writer.close()
    results = ctx.test_cells([cell_params(state, c) for c in range(len(cells))])
    for result, (alpha, beta) in zip(results, cells):
      result.update(alpha=alpha, beta=beta)
      rows.append(result)
  return rows


def commands(config_arg: str, workdir: str, config) -> list[str]:
  """One shell command per cell for a cluster; each resumes by itself if interrupted."""
  out = []
  for alpha, beta in cells_of(config):
    out.append(" ".join([
        "python -m prosona_jax.main", f"--config={shlex.quote(config_arg)}",
        f"--workdir={shlex.quote(cell_dir(workdir, alpha, beta))}",
        f"--config.stage2.alpha={alpha:g}", f"--config.stage2.beta={beta:g}",
        "--config.stages=stage2",
        "--config.stage1.checkpoint=" + shlex.quote(
            os.path.join(os.path.abspath(workdir), "fold{fold}", "stage1", "checkpoints"))]))
  return out


def collect_cells(config, workdir: str) -> list[dict]:
  """Reads the eval JSON every separately run cell wrote."""
  rows = []
  for alpha, beta in cells_of(config):
    eval_dir = epath.Path(cell_dir(workdir, alpha, beta)) / "eval"
    found = sorted(f.name for f in (eval_dir.iterdir() if eval_dir.is_dir() else [])
                   if f.name.startswith("stage2_fold") and f.name.endswith(".json"))
    if not found:
      raise FileNotFoundError(f"grid cell alpha={alpha:g} beta={beta:g}: no results in "
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
  train.write_json(os.path.join(workdir, "grid.json"), out)
  train.write_text(os.path.join(workdir, "grid.md"),
                   "# (alpha, beta) grid\n\nMean over folds; Dice in %.\n\n" + "\n".join(lines) + "\n")
  if jax.process_index() == 0:
    figures.heatmap(ged, alphas, betas, os.path.join(workdir, "grid_ged.png"),
                    title=f"GED ({out['convention']}) over (alpha, beta)")
  print("\n".join(lines))
  return out


def main(argv):
  logger_lib.start_cli(argv, progress=True)
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if mode == "program":
    write_grid(config, workdir, run_program(config, workdir))
  elif mode == "commands":
    config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                      "configs/lidc.py")
    print("\n".join(commands(config_arg, workdir, config)))
  else:
    write_grid(config, workdir, collect_cells(config, workdir))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", "runs/grid", "Grid work directory.")
  _MODE = flags.DEFINE_enum("mode", "program", MODES,
                            "program: all cells in one vmapped program; commands: print one "
                            "command per cell; merge: collect separately run cells.")
  app.run(main)

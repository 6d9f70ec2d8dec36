r"""The (alpha, beta) ablation grid of the paper's Fig. 5; the work is in `ablation.py`.

  python -m prosona_jax.grid --config=configs/lidc.py:fold=-1 --workdir=runs/grid \
      --config.stage2.init_from=runs/lidc     # the trained Stage 1 of the run runs/lidc

The grid trains Stage 2 only: it starts from a trained Stage 1 (`--config.stage2.init_from`,
a run's work directory or `.../fold{fold}/stage1/checkpoints`, else WORKDIR's own) and
stops at once when there is none, unless `--train_stage1` asks it to train one in WORKDIR.

As separate jobs (a cluster): print one command per cell, run them anywhere (they share
the Stage-1 checkpoints of WORKDIR), then merge:

  python -m prosona_jax.grid --config=configs/lidc.py --workdir=runs/grid --mode=commands
  python -m prosona_jax.grid --config=configs/lidc.py --workdir=runs/grid --mode=merge

Both write WORKDIR/grid.json (per cell and fold: every metric), WORKDIR/grid.md and the GED
heatmap WORKDIR/grid_ged.png. An interrupted grid resumes from its checkpoints. Multi-host
runs (TPU pods, SLURM) start the same way as `main` (`--distributed`).
"""

import sys

from absl import flags

from prosona_jax import cli

_CONFIG = cli.define_config_file("config", "configs/demo.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/grid", "Grid work directory.")
_MODE = flags.DEFINE_enum("mode", "program", ("program", "commands", "merge"),
                          "program: all cells in one vmapped program; commands: print one "
                          "command per cell; merge: collect separately run cells.")
_TRAIN_STAGE1 = flags.DEFINE_bool(
    "train_stage1", False,
    "Train Stage 1 in WORKDIR for folds that have none. Without it the grid starts from a "
    "trained Stage 1 (--config.stage2.init_from=RUN_DIR, e.g. runs/demo, or WORKDIR's "
    "own) and stops at once when there is none.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Call jax.distributed.initialize() (multi-host). Default: on when PROSONA_DISTRIBUTED=1 "
    "or on a Cloud TPU VM with several workers.")


def main(argv, hooks: tuple = ()):
  del argv
  from prosona_jax import ablation  # pylint: disable=g-import-not-at-top
  from prosona_jax import config_lib  # pylint: disable=g-import-not-at-top
  from prosona_jax import distributed  # pylint: disable=g-import-not-at-top

  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  config_lib.check(config)  # Every mode: bad counts and sizes fail before any work.
  if mode == "program":
    distributed.maybe_initialize(_DISTRIBUTED.value)
    ablation.write_grid(config, workdir, ablation.run_program(
        config, workdir, hooks, train_stage1=_TRAIN_STAGE1.value))
  elif mode == "commands":
    config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                      "configs/lidc.py")
    print("\n".join(ablation.commands(config_arg, workdir, config)))
  else:
    ablation.write_grid(config, workdir, ablation.collect_cells(config, workdir))


if __name__ == "__main__":
  cli.run(main, name="grid", progress=True)

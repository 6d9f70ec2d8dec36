r"""Trains and evaluates a method (ProSona's two stages by default) over the configured folds.

  python -m prosona_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m prosona_jax.main --config=configs/lidc.py:fold=2 --workdir=runs/lidc \
      --config.data.path=/data/lidc_attributes.pkl --config.stage1.lr=3e-4
  python -m prosona_jax.main --config=configs/lidc.py --workdir=runs/lidc --dry_run

Any config field can be overridden (`--config.stage1.lr=3e-4`); a misspelt one fails at
start-up. Re-running the same command resumes from the latest checkpoints. The work is in
`run.py`; this module holds the flags only.
"""

from absl import flags

from prosona_jax import cli

_CONFIG = cli.define_config_file(
    "config", "configs/demo.py", "Path to a config file (`path.py[:arg]`).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Directory for checkpoints, logs and eval.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Build the model from the config, print parameter counts, read no data.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Call jax.distributed.initialize() (multi-host). Default: on when PROSONA_DISTRIBUTED=1 "
    "or on a Cloud TPU VM with several workers.")


def main(argv, hooks: tuple = ()):
  del argv
  # Imported here so that `--help` and flag errors do not pay for importing JAX.
  from prosona_jax import distributed  # pylint: disable=g-import-not-at-top
  from prosona_jax import run  # pylint: disable=g-import-not-at-top

  distributed.maybe_initialize(_DISTRIBUTED.value)
  config = _CONFIG.value
  if _DRY_RUN.value:
    run.dry_run(config, _WORKDIR.value)
    return
  # The config goes to WORKDIR/logs/main.log, not stderr (`run.train_and_evaluate`).
  run.train_and_evaluate(config, _WORKDIR.value, hooks=hooks)


if __name__ == "__main__":
  cli.run(main, name="main", progress=True)

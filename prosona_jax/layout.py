"""Where a run keeps things, and how its small files are written.

Layout of a work directory (local, or a URL such as gs://bucket/run through etils.epath):

  WORKDIR/config.json                         the run's config (export and predict read it;
                                              it also marks WORKDIR as a run, which
                                              `stage2.init_from` may name), with `data_info`
                                              (patient_grouping); the one before a changed
                                              resume: config.prev.json
  WORKDIR/.lock                               the running run (workdir_lock.py)
  WORKDIR/logs/main.log                       the config and every log line of the run
  WORKDIR/fold<k>/<stage>/checkpoints         Orbax: train state + Grain iterator per step
                                              (`<step>.damaged`: set aside, see checkpointing)
  WORKDIR/fold<k>/<stage>/logs                TensorBoard events and metrics.jsonl
  WORKDIR/fold<k>/stage2/prompt_bank.npz      the embedded prompt bank (Stage 2, grid)
  WORKDIR/fold<k>/grid                        the ablation grid's projectors (all cells)
  WORKDIR/eval/<stage>_fold<k>.json           test-fold scores (the scoring CLI's schema)
  WORKDIR/eval/summary.md                     mean and std over the folds run
  WORKDIR/eval/*.png                          figures

Training and serving both read it; it imports no training module.
"""

import json
import os
from typing import Any

from etils import epath
import jax

from prosona_jax.errors import UserError


def stage_dir(workdir: str, fold: int, stage: str) -> str:
  return os.path.join(workdir, f"fold{fold}", stage)


def checkpoint_dir(workdir: str, fold: int, stage: str) -> str:
  return os.path.join(stage_dir(workdir, fold, stage), "checkpoints")


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, "eval")


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def log_path(workdir: str) -> str:
  """The run's text log: its config, then every log line (`logger.run_log`)."""
  return os.path.join(workdir, "logs", "main.log")


def check_writable(workdir: str) -> None:
  """Creates `workdir` and a probe file in it, then removes the probe.

  Run before any training, so that a read-only or mistyped work directory fails at once
  rather than at the first checkpoint. Remote paths (gs://) are checked the same way
  through etils.epath, as far as their file system lets a write be tried. Process 0
  only, like every small-file write.

  Raises:
    UserError: the directory cannot be created or written.
  """
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir)
  probe = path / f".write_probe_{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    # Any failure (permissions, a file in the way, a missing bucket, no gcsfs) means
    # the run could not save; say so now, in one line.
    reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
    raise UserError(f"--workdir={workdir}: cannot write there ({reason}).") from e


def is_run_dir(path: str) -> bool:
  """Whether `path` is a run's work directory (it holds the run's `config.json`)."""
  try:
    return epath.Path(config_path(path)).is_file()
  except Exception:  # pylint: disable=broad-except
    return False  # An unreachable remote path is not a run; the caller reports it.


def stage2_init_dir(config, workdir: str, fold: int) -> str:
  """The Stage-1 checkpoints Stage 2 starts from.

  `stage2.init_from` with `{fold}` expanded: either a checkpoint directory, or a run's
  work directory (it holds `config.json`), which means that run's
  `fold<k>/stage1/checkpoints`. Unset: this run's own Stage 1.
  """
  init_from = config.stage2.init_from
  if not init_from:
    return checkpoint_dir(workdir, fold, "stage1")
  path = init_from.format(fold=fold)
  if is_run_dir(path):
    return checkpoint_dir(path, fold, "stage1")
  return path


def write_text(path: str, text: str) -> None:
  """Writes a file from process 0 only (via a temporary name); local or gs:// paths."""
  if jax.process_index() != 0:
    return
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=1))

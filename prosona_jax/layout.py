"""Where a run keeps things, and how its small files are written.

Layout of a work directory (local, or a URL such as gs://bucket/run through etils.epath):

  WORKDIR/config.json                         the run's config (export and predict read it),
                                              with `data_info` (patient_grouping); the one
                                              before a changed resume: config.prev.json
  WORKDIR/.lock                               the running run (workdir_lock.py)
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


def stage_dir(workdir: str, fold: int, stage: str) -> str:
  return os.path.join(workdir, f"fold{fold}", stage)


def checkpoint_dir(workdir: str, fold: int, stage: str) -> str:
  return os.path.join(stage_dir(workdir, fold, stage), "checkpoints")


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, "eval")


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def stage2_init_dir(config, workdir: str, fold: int) -> str:
  """The Stage-1 checkpoints Stage 2 starts from: `stage2.init_from` (`{fold}` expanded),
  or this run's own Stage 1."""
  if config.stage2.init_from:
    return config.stage2.init_from.format(fold=fold)
  return checkpoint_dir(workdir, fold, "stage1")


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

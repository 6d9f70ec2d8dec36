"""Training and evaluation of a method's stages over the folds the config asks for.

`python -m prosona_jax.main` calls `train_and_evaluate` (or `dry_run`). Each stage is a
`methods.base.Method`; this module holds what is the same for all of them: the fold
loop, one stage's training (`train_stage`, around `trainer.fit`) and its test scoring
(`evaluate.Evaluator`). The work directory's layout is described in `layout.py`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Iterator, Sequence

from absl import logging
from etils import epath
import jax
import ml_collections

from prosona_jax import checkpointing
from prosona_jax import config_lib
from prosona_jax import evaluate
from prosona_jax import layout
from prosona_jax import logger as logger_lib
from prosona_jax import parallel
from prosona_jax import selection
from prosona_jax import trainer
from prosona_jax import workdir_lock
from prosona_jax.errors import ConfigError
from prosona_jax.data import sources
from prosona_jax.data import splits
from prosona_jax.methods import base
from prosona_jax.methods import registry


def folds(config: ml_collections.ConfigDict, workdir: str, *, source=None, mesh=None
          ) -> Iterator[base.Fold]:
  """The one fold loop: every requested fold with its patient-level split."""
  source = source if source is not None else sources.source_from_config(config.data)
  mesh = mesh if mesh is not None else parallel.make_mesh()
  for k in config_lib.folds_to_run(config.data):
    split = splits.make_split(
        source.patient_ids, fold=k, num_folds=config.data.num_folds,
        seed=config.data.split_seed, level=config.data.split_level,
        val_fraction=config.data.val_fraction)
    yield base.Fold(config=config, workdir=workdir, fold=k, source=source, split=split,
                    mesh=mesh)


def preflight(config: ml_collections.ConfigDict, workdir: str,
              stage_classes: Sequence[type[base.Method]]) -> None:
  """Checks every external need of the run before its first step.

  Each stage's `Method.preflight` checks its own needs (Stage 1: the file of
  `model.pretrained_encoder`; Stage 2: a trained Stage 1 unless this run trains it, and
  the text encoder, by embedding the prompt bank now). The data source has opened, and
  `layout.check_writable` has passed, before this is called.

  Raises:
    UserError: with a message saying what is missing and how to provide it.
  """
  names = tuple(cls.stage_name(config) for cls in stage_classes)
  for cls in stage_classes:
    cls.preflight(config, workdir, run_stages=names)


def header(config: ml_collections.ConfigDict, workdir: str, source, log_path: str,
           what: str = "") -> str:
  """The few lines a run starts with on stderr (the whole config is in `log_path`).

  `what`: what runs (default: the config's method and stages).
  """
  devices = jax.devices()
  kinds = sorted({d.platform for d in devices})
  folds_run = ", ".join(str(k) for k in config_lib.folds_to_run(config.data))
  what = what or (f"method {config.method}, stages "
                   f"{', '.join(cls.stage_name(config) for cls in registry.stages(config))}")
  return (f"Run: {what}, "
          f"fold{'s' if ',' in folds_run else ''} {folds_run}; workdir {workdir}; "
          f"{len(devices)} {'/'.join(kinds)} device{'s' if len(devices) > 1 else ''}"
          f"{f' on {jax.process_count()} processes' if jax.process_count() > 1 else ''}.\n"
          f"Data: {source.describe()}\n"
          + (f"Config and the full log: {log_path}" if "://" not in log_path
             else f"Config: {layout.config_path(workdir)}"))


def train_stage(method: base.Method, hooks: tuple = ()) -> trainer.TrainState:
  """Trains one stage on its fold (resuming from its checkpoints) and returns the state
  to test: the final one, or the one model selection kept (`selection.py`)."""
  fold = method.fold
  loop = method.loop_config()
  logging.info("%s: %d train / %d val / %d test images, %d steps (%d per epoch); "
               "initialising the model...", loop.name, len(fold.split.train),
               len(fold.split.val), len(fold.split.test), method.total_steps,
               method.steps_per_epoch)
  tx, lr_fn = method.make_optimizer()
  state = method.init_state(tx)
  step_fn = method.make_train_step(tx)
  ckpt = checkpointing.Checkpointer(os.path.join(method.stage_dir, "checkpoints"))
  writer = logger_lib.MetricWriter(os.path.join(method.stage_dir, "logs"))
  evaluator = evaluate.Evaluator(method, writer)
  selector = selection.Selector(method, evaluator)
  state = trainer.fit(loop, state=state, train_step=step_fn, iterator=method.train_iterator(),
                      ckpt=ckpt, writer=writer, mesh=fold.mesh, lr_fn=lr_fn,
                      eval_fn=selector.validate, hooks=hooks)
  ckpt.close()
  writer.close()
  # The state to test: the final one, or the best kept by model selection.
  state = selector.select(state)
  selector.close()
  return state


def guard_workdir(fn):
  """Runs `fn(config, workdir, ...)` after checking the config (`config_lib.check`),
  holding `WORKDIR/.lock` (`workdir_lock`): one run per work directory."""
  @functools.wraps(fn)
  def guarded(config, workdir: str, *args, **kwargs):
    config_lib.check(config)
    layout.check_writable(workdir)  # Before the lock creates the directory.
    with workdir_lock.hold(workdir):
      return fn(config, workdir, *args, **kwargs)
  return guarded


def check_steps(fold: base.Fold, section: str, ckpt_dir: str) -> None:
  """Refuses, before anything compiles, a stage that cannot train on the fold: no whole
  batch in its training split, or nothing to train (epochs=0) and nothing to resume."""
  cfg, d = fold.config[section], fold.config.data
  steps_per_epoch = fold.steps_per_epoch
  if steps_per_epoch == 0:
    raise ConfigError(f"config.data.batch_size={d.batch_size}: more than the "
                      f"{len(fold.split.train)} training images of fold {fold.fold}; lower it")
  if base.total_steps(cfg, steps_per_epoch) == 0 and \
      checkpointing.latest_step_dir(ckpt_dir) is None:
    raise ConfigError(f"config.{section}.epochs=0: nothing to train, and no checkpoint in "
                      f"{ckpt_dir} to evaluate; set epochs >= 1 or max_steps >= 1")


def _has_results(workdir: str) -> bool:
  """Whether the work directory holds a checkpoint or a test result already."""
  root = epath.Path(workdir)
  return any(p.name.isdigit() for p in root.glob("fold*/*/checkpoints/*")) or \
      any(root.glob("eval/*.json"))


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, source) -> None:
  """Checks a resumed run's config against `WORKDIR/config.json`, then writes it.

  A run with checkpoints or results is resumed only with the config it was made with,
  up to `config_lib.RESUMABLE_FIELDS` (or with `allow_config_change`). config.json is
  replaced atomically (`layout.write_text`), the previous one kept as config.prev.json;
  it records the data's `patient_grouping` under `data_info`.

  Raises:
    ConfigError: the config differs in other fields (one line listing them).
  """
  path = epath.Path(layout.config_path(workdir))
  saved_text = path.read_text() if path.exists() else None
  new = json.loads(config.to_json_best_effort())
  if saved_text is not None and not config.allow_config_change and _has_results(workdir):
    try:
      saved = json.loads(saved_text)
    except ValueError as e:
      raise ConfigError(f"{path}: not readable JSON ({e}); restore it (config.prev.json may "
                        "hold the previous one) or pass --config.allow_config_change=True")
    saved.pop("data_info", None)
    changes = config_lib.config_changes(saved, new)
    if changes:
      listed = ", ".join(f"{field} ({json.dumps(old)} -> {json.dumps(cur)})"
                         for field, old, cur in changes)
      raise ConfigError(f"config differs from {path} in: {listed}; pass "
                        "--config.allow_config_change=True to resume anyway")
  new["data_info"] = {"patient_grouping": getattr(source, "patient_grouping", None),
                      "num_images": len(source),
                      "num_patients": len(set(source.patient_ids))}
  text = json.dumps(new, indent=1)
  if saved_text is not None and text != saved_text:
    layout.write_text(os.fspath(path.parent / "config.prev.json"), saved_text)
  layout.write_text(os.fspath(path), text)


@guard_workdir
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: tuple = ()) -> None:
  """Runs the configured stages on every requested fold, then writes the summary table.

  `hooks` go to every stage's `trainer.fit` (tests inject faults with them).
  """
  stage_classes = registry.stages(config)
  source = sources.source_from_config(config.data)
  layout.check_writable(workdir)
  for fold in folds(config, workdir, source=source):
    for cls in stage_classes:
      check_steps(fold, cls.section, layout.checkpoint_dir(workdir, fold.fold, cls.name))
  log_path = layout.log_path(workdir)
  with logger_lib.run_log(log_path, f"Config:\n{config}"):
    logging.info("%s", header(config, workdir, source, log_path))
    # Everything the run needs from outside is checked before its first step.
    preflight(config, workdir, stage_classes)
    # `export` and `predict` rebuild the model from it.
    prepare_workdir(config, workdir, source)
    for fold in folds(config, workdir, source=source):
      for cls in stage_classes:
        method = cls(fold)
        state = train_stage(method, hooks)
        evaluate.Evaluator(method).test(state)
    summary = evaluate.write_summary(workdir, registry.stage_names(config))
  if jax.process_index() == 0:
    print(summary)


def dry_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Builds the model from the config without data; prints and writes parameter counts.

  `model_summary.json`: the components, `total` and `trainable` (what the optimizers
  update; BatchNorm statistics, frozen buffers and fixed priors are not parameters),
  `method`, and per stage under `stages` for methods of several counted stages.
  """
  config_lib.check(config)
  registry.stages(config)
  summary = registry.param_counts(config)
  counts = {k: v for k, v in summary.items() if isinstance(v, int)}
  width = max(len(k) for k in counts)
  lines = [f"method {config.method}", f"{'component':<{width}}  {'parameters':>12}"]
  lines += [f"{k:<{width}}  {v:>12,}" for k, v in counts.items()]
  print("\n".join(lines))
  layout.write_text(os.path.join(workdir, "model_summary.json"), json.dumps(summary, indent=2))
  return summary

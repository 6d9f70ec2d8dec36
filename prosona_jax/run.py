"""Training and evaluation of a method's stages over the folds the config asks for.

`python -m prosona_jax.main` calls `train_and_evaluate` (or `dry_run`). Each stage is a
`methods.base.Method`; this module holds what is the same for all of them: the fold
loop, one stage's training (`train_stage`, around `trainer.fit`) and its test scoring
(`evaluate.Evaluator`). The work directory's layout is described in `layout.py`.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from absl import logging
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


def train_stage(method: base.Method, hooks: tuple = ()) -> trainer.TrainState:
  """Trains one stage on its fold (resuming from its checkpoints) and returns the state
  to test: the final one, or the one model selection kept (`selection.py`)."""
  fold = method.fold
  tx, lr_fn = method.make_optimizer()
  state = method.init_state(tx)
  step_fn = method.make_train_step(tx)
  ckpt = checkpointing.Checkpointer(os.path.join(method.stage_dir, "checkpoints"))
  writer = logger_lib.MetricWriter(os.path.join(method.stage_dir, "logs"))
  evaluator = evaluate.Evaluator(method, writer)
  selector = selection.Selector(method, evaluator)
  loop = method.loop_config()
  logging.info("%s: %d train / %d val / %d test images, %d steps (%d per epoch).", loop.name,
               len(fold.split.train), len(fold.split.val), len(fold.split.test),
               method.total_steps, method.steps_per_epoch)
  state = trainer.fit(loop, state=state, train_step=step_fn, iterator=method.train_iterator(),
                      ckpt=ckpt, writer=writer, mesh=fold.mesh, lr_fn=lr_fn,
                      eval_fn=selector.validate, hooks=hooks)
  ckpt.close()
  writer.close()
  # The state to test: the final one, or the best kept by model selection.
  state = selector.select(state)
  selector.close()
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: tuple = ()) -> None:
  """Runs the configured stages on every requested fold, then writes the summary table.

  `hooks` go to every stage's `trainer.fit` (tests inject faults with them).
  """
  stage_classes = registry.stages(config)
  source = sources.source_from_config(config.data)
  logging.info("Data: %s", source.describe())
  # `export` and `predict` rebuild the model from it.
  layout.write_text(layout.config_path(workdir), config.to_json_best_effort(indent=1))
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
  registry.stages(config)
  summary = registry.param_counts(config)
  counts = {k: v for k, v in summary.items() if isinstance(v, int)}
  width = max(len(k) for k in counts)
  lines = [f"method {config.method}", f"{'component':<{width}}  {'parameters':>12}"]
  lines += [f"{k:<{width}}  {v:>12,}" for k, v in counts.items()]
  print("\n".join(lines))
  layout.write_text(os.path.join(workdir, "model_summary.json"), json.dumps(summary, indent=2))
  return summary

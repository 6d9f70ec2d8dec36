"""Training and evaluation for both stages, over the folds the config asks for.

Layout of a work directory:
  WORKDIR/fold<k>/stage1/{checkpoints,logs}   Stage-1 state + Grain iterator; TensorBoard
  WORKDIR/fold<k>/stage2/{checkpoints,logs}   Stage-2 projector state (frozen parts apart)
  WORKDIR/eval/stage{1,2}_fold<k>.json        test-fold scores (scoring CLI schema)
  WORKDIR/eval/summary.md                     mean and std over the folds run
  WORKDIR/eval/*.png                          figures
"""

import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from prosona_jax import checkpointing
from prosona_jax import figures
from prosona_jax import logger as logger_lib
from prosona_jax import metrics
from prosona_jax import parallel
from prosona_jax import stage1
from prosona_jax import trainer
from prosona_jax.data import pipeline
from prosona_jax.data import sources
from prosona_jax.data import splits
from prosona_jax.models import prob_unet

SUMMARY_KEYS = ("ged", "dice_soft", "dice_max", "dice_max_reverse", "dice_match")


def folds_to_run(data_cfg) -> list[int]:
  if data_cfg.fold == -1:
    return list(range(data_cfg.num_folds))
  if not 0 <= data_cfg.fold < data_cfg.num_folds:
    raise ValueError(f"config.data.fold={data_cfg.fold}: expected -1 or 0..{data_cfg.num_folds - 1}")
  return [data_cfg.fold]


def dry_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Builds the model from the config without data; prints and writes parameter counts."""
  model = stage1.build_model(config)
  image, masks = stage1.example_inputs(config)
  shapes = jax.eval_shape(
      lambda r: model.init({"params": r, "sample": r}, image, masks, train=False),
      jax.random.key(0))
  counts = prob_unet.count_params(shapes["params"])
  width = max(len(k) for k in counts)
  lines = [f"{'component':<{width}}  {'parameters':>12}"]
  lines += [f"{k:<{width}}  {v:>12,}" for k, v in counts.items()]
  print("\n".join(lines))
  summary = {k: int(counts[k]) for k in ("backbone", "prior", "posterior", "fcomb", "total")}
  summary.update({k: int(v) for k, v in counts.items() if k not in summary})
  write_text(os.path.join(workdir, "model_summary.json"), json.dumps(summary, indent=2))
  return summary


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


def eval_batch_size(config, mesh) -> int:
  return stage1.round_up(config.data.eval_batch_size, mesh.devices.size)


def run_stage1(config, workdir: str, fold: int, source, split, mesh):
  """Trains Stage 1 on `split.train`, validates on `split.val`, scores `split.test`."""
  name = f"stage1/fold{fold}"
  stage_dir = os.path.join(workdir, f"fold{fold}", "stage1")
  model = stage1.build_model(config)
  local_bs = parallel.check_batch_size(config.data.batch_size, mesh)
  spe = pipeline.steps_per_epoch(len(split.train), local_bs, jax.process_count())
  total = stage1.total_steps(config.stage1, spe)
  tx, lr_fn = stage1.make_optimizer(config.stage1, spe)
  init_rng, step_rng, eval_rng = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), fold), 3)
  state = stage1.init_state(model, config, tx, mesh, init_rng)
  loader = pipeline.train_loader(
      source, split.train, batch_size=local_bs, seed=config.data.shuffle_seed + 1000 * fold,
      augment_flip=config.data.augment_flip, augment_rotate=config.data.augment_rotate,
      worker_count=config.data.worker_count)
  iterator = iter(loader)
  ckpt = checkpointing.Checkpointer(os.path.join(stage_dir, "checkpoints"))
  writer = logger_lib.MetricWriter(os.path.join(stage_dir, "logs"))
  step_fn = stage1.make_train_step(model, tx, config, mesh, step_rng)
  sample_fn = stage1.make_sampler(model, mesh, config.eval.num_samples)
  ebs = eval_batch_size(config, mesh)

  def validate(st, step):
    if len(split.val) == 0:
      return {}
    labels, preds, _ = stage1.predict(
        sample_fn, st, pipeline.eval_batches(source, split.val, batch_size=ebs), mesh, eval_rng)
    res = metrics.score(labels, preds, convention=config.eval.convention)["mean"]
    n = min(config.eval.num_images_logged, len(labels))
    images = np.concatenate([labels[:n, :, :, :, None].max(1), (preds[:n] > 0.5).max(1)[..., None]],
                            axis=2).astype(np.float32)
    writer.images(step, "val/union_labels_vs_samples", images)
    return {k: res[k] for k in SUMMARY_KEYS}

  loop = trainer.LoopConfig(
      name=name, total_steps=total, log_every=min(config.stage1.log_every, total),
      checkpoint_every=config.stage1.checkpoint_every,
      eval_every=config.stage1.eval_every_epochs * spe)
  logging.info("%s: %d train / %d val / %d test images, %d steps (%d per epoch).", name,
               len(split.train), len(split.val), len(split.test), total, spe)
  state = trainer.fit(loop, state=state, train_step=step_fn, iterator=iterator, ckpt=ckpt,
                      writer=writer, mesh=mesh, lr_fn=lr_fn, eval_fn=validate)
  ckpt.close()

  labels, preds, keys = stage1.predict(
      sample_fn, state, pipeline.eval_batches(source, split.test, batch_size=ebs), mesh,
      jax.random.fold_in(eval_rng, 1))
  result = metrics.score(labels, preds, convention=config.eval.convention)
  result.update(stage="stage1", fold=fold, num_samples=int(config.eval.num_samples),
                keys=keys)
  eval_dir = os.path.join(workdir, "eval")
  write_json(os.path.join(eval_dir, f"stage1_fold{fold}.json"), result)
  if jax.process_index() == 0:
    images = np.stack([source[int(i)]["image"] for i in split.test[:config.eval.num_images_logged]])
    figures.samples_panel(images, labels, preds, keys,
                          os.path.join(eval_dir, f"stage1_samples_fold{fold}.png"),
                          rater_names=config.data.rater_names,
                          order_raters_by_area=config.data.order_raters_by_area)
  writer.close()
  logging.info("%s test: %s", name,
               "  ".join(f"{k} {result['mean'][k]:.4f}" for k in SUMMARY_KEYS))
  return model, state


def write_summary(workdir: str) -> str:
  """Tabulates every `eval/stage*_fold*.json` in the work directory (mean, std over folds)."""
  eval_dir = epath.Path(workdir) / "eval"
  rows = []
  for stage in ("stage1", "stage2"):
    results = []
    for path in sorted(eval_dir.iterdir()) if eval_dir.is_dir() else []:
      if path.name.startswith(stage + "_fold") and path.name.endswith(".json"):
        results.append(json.loads(path.read_text()))
    if not results:
      continue
    conv = results[0]["convention"]
    cells = []
    for k in SUMMARY_KEYS:
      vals = np.asarray([r["mean"][k] for r in results], np.float64)
      scale = 1.0 if k == "ged" else 100.0
      cells.append(f"{scale * vals.mean():.3f} ± {scale * vals.std():.3f}" if k == "ged"
                   else f"{scale * vals.mean():.2f} ± {scale * vals.std():.2f}")
    folds = ",".join(str(r["fold"]) for r in results)
    rows.append(f"| {stage} | {folds} | {conv} | " + " | ".join(cells) + " |")
  header = ("| stage | folds | convention | GED | Dice Soft | Dice Max | Dice Max (rev) | "
            "Dice Match |\n|---|---|---|---|---|---|---|---|")
  text = ("# Results\n\nMean ± std (ddof 0) over the folds run; Dice in %.\n\n" + header + "\n"
          + "\n".join(rows) + "\n")
  if rows:
    write_text(os.fspath(eval_dir / "summary.md"), text)
  return text


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs the configured stages on every requested fold, then writes the summary table."""
  unknown = [s for s in config.stages if s not in ("stage1", "stage2")]
  if unknown or not config.stages:
    raise ValueError(f"config.stages={tuple(config.stages)!r}: expected stage1 and/or stage2, "
                     "e.g. --config.stages=stage2")
  # `export` and `predict` rebuild the model from it.
  write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=1))
  source = sources.source_from_config(config.data)
  logging.info("Data: %s", source.describe())
  mesh = parallel.make_mesh()
  for fold in folds_to_run(config.data):
    split = splits.make_split(
        source.patient_ids, fold=fold, num_folds=config.data.num_folds,
        seed=config.data.split_seed, level=config.data.split_level,
        val_fraction=config.data.val_fraction)
    stage1_result = None
    if "stage1" in config.stages:
      stage1_result = run_stage1(config, workdir, fold, source, split, mesh)
    if "stage2" in config.stages:
      from prosona_jax import stage2_train  # pylint: disable=g-import-not-at-top
      stage2_train.run_stage2(config, workdir, fold, source, split, mesh, stage1_result)
  summary = write_summary(workdir)
  if jax.process_index() == 0:
    print(summary)

"""Evaluation of any method: the eval-batch loop, validation, test scoring, summary table.

Every process runs the predictions (on a multi-host mesh they are collectives); only
process 0 writes files (`layout.write_text`, `figures`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

from absl import logging
from etils import epath
import jax
import numpy as np

from prosona_jax import layout
from prosona_jax import logger as logger_lib
from prosona_jax import metrics
from prosona_jax import parallel
from prosona_jax.data import pipeline
from prosona_jax.methods import base


def eval_inputs(source, indices, *, batch_size: int, mesh
                ) -> Iterator[tuple[jax.Array, np.ndarray, np.ndarray, list]]:
  """Per eval batch: (global images, valid-row mask, labels and keys of the valid rows)."""
  for batch in pipeline.eval_batches(source, indices, batch_size=batch_size):
    local = parallel.to_global(parallel.local_slice(batch, batch["image"].shape[0]), mesh)
    valid = np.asarray(batch["valid"], bool)
    yield (local["image"], valid, np.asarray(batch["masks"])[valid],
           [k for k, v in zip(batch["key"], valid) if v])


def predict(fn: Callable[[jax.Array, jax.Array], Any], source, indices, *,
            batch_size: int, mesh, rng: jax.Array, max_images: int | None = None
            ) -> tuple[np.ndarray, np.ndarray, list]:
  """The one eval loop: `fn(images, fold_in(rng, batch index))` over the batches.

  Returns labels (N, R, H, W), predictions (N, P, H, W) float32 and keys of the
  valid rows, in the order of `indices`.
  """
  labels, preds, keys = [], [], []
  for i, (image, valid, batch_labels, batch_keys) in enumerate(
      eval_inputs(source, indices, batch_size=batch_size, mesh=mesh)):
    probs = np.asarray(fn(image, jax.random.fold_in(rng, i)))
    labels.append(batch_labels)
    preds.append(probs[valid].astype(np.float32))
    keys.extend(batch_keys)
    if max_images is not None and len(keys) >= max_images:
      break
  return np.concatenate(labels), np.concatenate(preds), keys


class Evaluator:
  """Validation and test scoring of one method on its fold."""

  def __init__(self, method: base.Method,
               writer: logger_lib.MetricWriter | None = None):
    self.method = method
    self.writer = writer
    self._predict_fn = None
    self._validation_predict_fn = None

  @property
  def predict_fn(self) -> base.PredictFn:
    if self._predict_fn is None:
      self._predict_fn = self.method.make_predict_fn()
    return self._predict_fn

  @property
  def validation_predict_fn(self) -> base.PredictFn:
    if self._validation_predict_fn is None:
      self._validation_predict_fn = (self.method.make_validation_predict_fn()
                                     or self.predict_fn)
    return self._validation_predict_fn

  def predict(self, state, indices, rng: jax.Array, fn: base.PredictFn | None = None
              ) -> tuple[np.ndarray, np.ndarray, list]:
    fold, fn = self.method.fold, fn or self.predict_fn
    return predict(lambda image, r: fn(state, image, r), fold.source, indices,
                   batch_size=fold.eval_batch_size, mesh=fold.mesh, rng=rng)

  def validate(self, state, step: int, split: str = "val") -> dict:
    """A split's summary scalars (empty if it has no images); `split` is `val`, or
    `test` when the model is selected on the test fold (`selection.py`)."""
    m = self.method
    indices = getattr(m.fold.split, split)
    if len(indices) == 0:
      return {}
    labels, preds, _ = self.predict(state, indices, m.eval_rng, self.validation_predict_fn)
    mean = m.score(labels, preds)["mean"]
    if m.log_val_images and self.writer is not None:
      n = min(m.config.eval.num_images_logged, len(labels))
      images = np.concatenate([labels[:n, :, :, :, None].max(1),
                               (preds[:n] > 0.5).max(1)[..., None]], axis=2)
      self.writer.images(step, "val/union_labels_vs_samples", images.astype(np.float32))
    return m.validation_summary(mean)

  @property
  def test_rng(self) -> jax.Array:
    return jax.random.fold_in(self.method.eval_rng, 1)

  def result(self, labels: np.ndarray, probs: np.ndarray, keys: list) -> dict:
    """The test result dict of predictions `probs` (JSON schema of `score`)."""
    m = self.method
    result = m.score(labels, probs)
    result.update(stage=m.name, fold=m.fold.fold, method=m.method_name,
                  **m.result_fields(), **m.selection, keys=keys)
    # How the folds grouped images into patients (`one_per_image` may leak a patient's
    # slices between train and test): recorded beside the scores it qualifies.
    result["patient_grouping"] = getattr(m.fold.source, "patient_grouping", None)
    # Empty masks predicted empty score Dice 1: `write_summary` notes when they dominate.
    result["empty_masks"] = metrics.empty_counts(labels, probs, m.prediction_raters)
    return result

  def test(self, state, *, write: bool = True) -> base.TestOutput:
    """Scores the test fold; writes `eval/<stage>_fold<k>.json` and the figures."""
    m = self.method
    logging.info("%s/fold%d: scoring the test fold (%d images)...", m.name, m.fold.fold,
                 len(m.fold.split.test))
    labels, probs, keys = self.predict(state, m.fold.split.test, self.test_rng)
    out = base.TestOutput(self.result(labels, probs, keys), labels, probs, keys)
    if write:
      eval_dir = layout.eval_dir(m.fold.workdir)
      layout.write_json(os.path.join(eval_dir, f"{m.name}_fold{m.fold.fold}.json"),
                        out.result)
      m.figures(state, out, eval_dir)
    mean = out.result["mean"]
    logging.info("%s/fold%d test: %s%s", m.name, m.fold.fold,
                 "  ".join(f"{k} {mean[k]:.4f}" for k in metrics.SUMMARY_KEYS),
                 m.describe_test(mean))
    return out


# Above this fraction of rater masks empty and predicted empty, summary.md says so.
EMPTY_NOTE_FRACTION = 0.25


def _cell(values: np.ndarray, digits: int) -> str:
  """Mean ± std (ddof 0) over folds; one fold's value alone (a std of 0 would mislead)."""
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def empty_note(stage: str, results: list[dict]) -> str | None:
  """The summary's note when most rater masks are empty and predicted empty, else None."""
  counts = [r["empty_masks"] for r in results if "empty_masks" in r]
  total = sum(c["rater_masks"] for c in counts)
  both = sum(c["empty_on_empty"] for c in counts)
  if not total or both / total <= EMPTY_NOTE_FRACTION:
    return None
  return (f"{stage}: {both} of {total} rater masks ({100 * both / total:.0f}%) are empty and "
          f"were predicted empty: they score Dice 1 under the {results[0]['convention']} "
          "convention, so the Dice columns say little about the model here "
          "(docs/metrics.md).")


def write_summary(workdir: str, stages: tuple[str, ...] = ("stage1", "stage2")) -> str:
  """Tabulates every `eval/<stage>_fold*.json` of the work directory (mean, std over folds)."""
  eval_dir = epath.Path(layout.eval_dir(workdir))
  rows, notes = [], []
  for stage in stages:
    results = []
    for path in sorted(eval_dir.iterdir()) if eval_dir.is_dir() else []:
      if path.name.startswith(stage + "_fold") and path.name.endswith(".json"):
        results.append(json.loads(path.read_text()))
    if not results:
      continue
    conv = results[0]["convention"]
    cells = []
    for k in metrics.SUMMARY_KEYS:
      vals = np.asarray([r["mean"][k] for r in results], np.float64)
      cells.append(_cell(vals, 3) if k == "ged" else _cell(100.0 * vals, 2))
    folds = ",".join(str(r["fold"]) for r in results)
    if len(results) == 1:
      folds += " (1 fold)"
    rows.append(f"| {stage} | {folds} | {conv} | " + " | ".join(cells) + " |")
    note = empty_note(stage, results)
    if note:
      notes.append(note)
  header = ("| stage | folds | convention | GED | Dice Soft | Dice Max | Dice Max (rev) | "
            "Dice Match |\n|---|---|---|---|---|---|---|---|")
  text = ("# Results\n\nMean ± std (ddof 0) over the folds run (one fold: its value alone); "
          "Dice in %.\n\n" + header + "\n" + "\n".join(rows) + "\n")
  if notes:
    text += "\n" + "\n".join(f"Note: {n}" for n in notes) + "\n"
  if rows:
    layout.write_text(os.fspath(eval_dir / "summary.md"), text)
  return text

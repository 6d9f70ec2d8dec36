"""Model selection: which state of a stage is tested (`eval.select_on`).

- `val` (the baselines' default): every validation (each `eval_every_epochs`, and at the
  end) scores the validation split carved from the training patients; the state with
  the best selection score (`Method.select_metric`; ties go to the later step, as the
  reference keeps the later epoch) is saved to `<stage>/best` (Orbax, one kept) and is
  the state tested, and the one a later stage starts from.
- `test`: the same on the test fold, what the published baselines did (optimistic).
- `last`: no selection: the final state (ProSona's stages under `auto`, so runs of
  earlier versions, the demo and the golden test keep their numbers).
- `auto`: each stage's `Method.default_select_on`.

With `eval_every_epochs=0` there is only the final validation: selection is the last
state whatever `select_on` says. The best checkpoint's metadata holds its step and score,
so a resumed or re-run stage knows the best so far; the eval JSON records
`select_on`, `selected_step` and the score.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from prosona_jax import checkpointing
from prosona_jax.errors import ConfigError
from prosona_jax.methods import base

BEST = "best"


def best_dir(stage_dir: str) -> str:
  return os.path.join(stage_dir, BEST)


def selected_checkpoint_dir(checkpoint_dir: str) -> str:
  """The selected state's checkpoints beside a stage's `checkpoints`, if it kept one.

  A stage started from another (Stage 2, D-Persona's heads) sits on the state that was
  tested, not on the last one.
  """
  path = epath.Path(checkpoint_dir)
  if path.name == "checkpoints":
    best = path.parent / BEST
    if checkpointing.latest_step_dir(os.fspath(best)) is not None:
      return os.fspath(best)
  return checkpoint_dir


class Selector:
  """Validation with model selection around one stage's `trainer.fit`."""

  def __init__(self, method: base.Method, evaluator: Any):
    self.method = method
    self.evaluator = evaluator
    self.select_on = method.select_on
    if self.select_on not in base.SELECT_ON[:3]:
      raise ConfigError(f"eval.select_on={self.select_on!r}: expected one of "
                        f"{base.SELECT_ON}.")
    self.split = "test" if self.select_on == "test" else "val"
    if self.select_on == "val" and len(method.fold.split.val) == 0:
      raise ConfigError(
          "eval.select_on=val needs a validation split: set data.val_fraction > 0, or "
          "select on the test fold (eval.select_on=test) or not at all (last).")
    self.ckpt = None
    self.best: dict | None = None
    if self.select_on != "last":
      self.ckpt = checkpointing.Checkpointer(best_dir(method.stage_dir), max_to_keep=1)
      step = self.ckpt.latest_step()
      if step is not None:
        restored = self.ckpt.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        self.best = dict(restored["meta"])

  def validate(self, state, step: int) -> dict:
    """`trainer.fit`'s eval_fn: the summary scalars; keeps the state if it is the best."""
    summary = self.evaluator.validate(state, step, split=self.split)
    if self.ckpt is None or not summary:
      return summary
    score = self.method.selection_score(summary)
    summary = {**summary, "select_score": score}
    if self.best is None or score >= self.best["score"]:
      self.best = {"step": int(step), "score": float(score), "split": self.split,
                   "metric": self.method.select_metric}
      self.ckpt.save(int(step), state, meta=self.best)
      # Durable before training goes on: a crash must not lose a best it already passed.
      self.ckpt.wait()
      logging.info("%s/fold%d: step %d is the best so far on %s (%s %.4f).",
                   self.method.name, self.method.fold.fold, step, self.split,
                   self.method.select_metric, score)
    return summary

  def select(self, state):
    """The state to test (the best kept, or `state`); records `method.selection`."""
    last = int(jax.device_get(state.step))
    info = {"select_on": self.select_on, "selected_step": last}
    if self.ckpt is not None and self.best is None:
      logging.warning("%s: no validation ran, so no state was selected; testing the last.",
                      self.method.name)
    if self.ckpt is not None and self.best is not None:
      info.update(selected_step=int(self.best["step"]), select_split=self.split,
                  select_metric=self.best["metric"], select_score=self.best["score"])
      if self.best["step"] != last:
        state, _ = self.ckpt.restore(int(self.best["step"]), state)
    self.method.selection = info
    return state

  def close(self) -> None:
    if self.ckpt is not None:
      self.ckpt.close()

"""Orbax checkpoints holding the train state and the Grain iterator together.

Saving both in one `args.Composite` means a resumed run sees exactly the batches it would
have seen (MaxText and nanodo do the same). Every process calls save and restore: Orbax
writes arrays cooperatively and Grain writes one iterator file per process.
"""

import os
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A `CheckpointManager` with items `state` (pytree), `data` (iterator), `meta` (JSON)."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    # Orbax wants absolute local paths; gs:// and other URLs pass through (etils.epath).
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, iterator: Any = None, meta: dict | None = None) -> None:
    """Saves (asynchronously for arrays) unless a checkpoint of `step` already exists."""
    if step in self.manager.all_steps():
      return
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("Saving checkpoint of step %d to %s", step, self.directory)

  def restore(self, step: int, target_state: Any, iterator: Any = None) -> tuple[Any, dict]:
    """Restores `state` shaped and sharded like `target_state`, and the iterator in place."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], dict(restored["meta"] or {})

  def restore_latest_state(self, target_state: Any) -> tuple[Any, dict]:
    """Restores only the state of the latest checkpoint (e.g. Stage 1 for Stage 2)."""
    step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint found in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"] or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

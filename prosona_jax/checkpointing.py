"""Orbax checkpoints holding the train state and the Grain iterator together.

Saving both in one `args.Composite` means a resumed run sees exactly the batches it would
have seen (MaxText and nanodo do the same). Every process calls save and restore: Orbax
writes arrays cooperatively and Grain writes one iterator file per process.
"""

import os
from typing import Any

from absl import logging
from etils import epath
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
    """Restores only the state of the latest checkpoint (no iterator)."""
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


def latest_step_dir(directory: str) -> tuple[int, str] | None:
  """(step, path of its `state` item) of the newest checkpoint in `directory`, or None."""
  path = epath.Path(directory)
  if not path.is_dir():
    return None
  steps = sorted((int(p.name), p) for p in path.iterdir()
                 if p.name.isdigit() and (p / "state").is_dir())
  if not steps:
    return None
  step, step_dir = steps[-1]
  return step, os.fspath(step_dir / "state")


def load_params(directory: str, abstract: Any, *, fields: tuple[str, ...] = ("params",)
                ) -> tuple[Any, int]:
  """Reads only `fields` of the train state of the newest checkpoint in `directory`.

  The optimizer state, step counter and iterator of that run are not read, so the
  reader needs neither its optimizer nor its data: this is how Stage 2 starts from a
  trained Stage 1 (MaxText's `load_params_from_path`). `abstract` gives each field's
  shapes, dtypes and shardings (a dict `{field: tree of jax.ShapeDtypeStruct}`; leaves
  without a sharding land on this process's first device).

  Returns:
    ({field: restored tree}, the step read).
  """
  found = latest_step_dir(directory)
  if found is None:
    raise FileNotFoundError(f"{directory}: no checkpoint found")
  step, state_dir = found
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  item = jax.tree.map(
      lambda s: s if getattr(s, "sharding", None) is not None else
      jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here), {k: abstract[k] for k in fields})
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  return {k: restored[k] for k in fields}, step


def load_state_if_possible(ckpt: Checkpointer, state: Any, iterator: Any = None, *,
                           params_from: str = "", abstract_params: Any = None,
                           fields: tuple[str, ...] = ("params",)):
  """Where a stage's state comes from, in MaxText's order of preference.

  1. The stage's own latest checkpoint (a resumed run): the whole state, and the data
     iterator restored in place.
  2. Otherwise, when `params_from` names a directory, only `fields` of another run's
     latest state (see `load_params`).
  3. Otherwise nothing: the caller keeps its freshly initialised state.

  Returns:
    (restored state or None, restored fields or None, the step read or None).
  """
  latest = ckpt.latest_step()
  if latest is not None:
    restored, _ = ckpt.restore(latest, state, iterator)
    return restored, None, latest
  if params_from:
    params, step = load_params(params_from, abstract_params, fields=fields)
    return None, params, step
  return None, None, None

"""Orbax checkpoints holding the train state and the Grain iterator together, verified.

Saving both in one `args.Composite` means a resumed run sees exactly the batches it would
have seen (MaxText and nanodo do the same). Every process calls save and restore: Orbax
writes arrays cooperatively and Grain writes one iterator file per process.

A checkpoint of step N is `N/state` (the train state), `N/data` (the iterator) and
`N/meta` (JSON): the stage, `step`, `batches` (batches the iterator had yielded),
`iterator` (process 0's iterator state) and `checksum`, the CRC-32 of every array of the
state as saved (`{"algorithm": "crc32", "leaves": {"params/...": "float32[3,3]:1a2b3c4d"}}`).
A restore checks all of it: the checksums and finiteness of what it read, and that the
step, the batch count and the iterator agree. A step that fails (a missing, truncated or
flipped file, garbage JSON, anything Orbax, TensorStore or Grain raise) is reported in one
line and the next older step is tried; the damaged newer steps are then renamed
`N.damaged` (kept for inspection, ignored by Orbax) so that training can write step N
again. When no step is intact, `CheckpointError` names every step tried and why.
"""

import gc
import json
import os
import sys
import zlib
from typing import Any, Callable

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from prosona_jax.errors import UserError

CHECKSUM_ALGORITHM = "crc32"
PYTREE_METADATA_FILE = "_METADATA"  # Orbax's description of a saved tree (every version).
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(UserError):
  """No checkpoint of a directory could be read intact (the message lists the tries)."""


class DamagedCheckpoint(Exception):
  """A checkpoint read, but not as written: a checksum, a step or the iterator differ."""


class NonFiniteState(ValueError):
  """A state holding NaN or infinite values, which `Checkpointer.save` refuses to save."""

  def __init__(self, leaves: list[str]):
    super().__init__(f"{leaves[0]} holds NaN or infinite values")
    self.leaves = leaves


# ---------------------------------------------------------------- checksums
def leaf_name(path) -> str:
  """`params/enc/kernel` for a key path: the same for a TrainState, the dict Orbax
  restores without a target, and a partial restore of one field."""
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _host_value(x) -> np.ndarray | None:
  """The whole value of a leaf on this host, or None when no process holds all of it."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.is_fully_replicated:
      # Every process holds the whole array (this package replicates its state), so every
      # process computes the same checksum from its first local copy.
      return np.asarray(x.addressable_data(0))
    if not x.is_fully_addressable:
      return None  # Sharded over hosts: not checksummed (see `checksums`).
  return np.asarray(x)


def _leaf_checksum(value: np.ndarray) -> str:
  value = np.ascontiguousarray(value)
  crc = zlib.crc32(value.reshape(-1).view(np.uint8)) if value.size else 0
  return f"{value.dtype.name}[{','.join(map(str, value.shape))}]:{crc:08x}"


def digest(tree: Any) -> tuple[dict[str, str], list[str]]:
  """(`{leaf name: "dtype[shape]:crc32"}`, names of leaves holding NaN or infinities).

  One pass on the host over the bytes of each value (a device-to-host copy on
  accelerators; CRC-32 runs at about 2 GB/s). Arrays sharded over several hosts, which
  no single process holds, are left out: this package replicates its state.
  """
  sums, bad = {}, []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    value = _host_value(leaf)
    if value is None:
      continue
    name = leaf_name(path)
    sums[name] = _leaf_checksum(value)
    if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
      bad.append(name)
  return sums, bad


def checksums(tree: Any) -> dict[str, str]:
  """`{leaf name: "dtype[shape]:crc32"}` of every array of `tree` (see `digest`)."""
  return digest(tree)[0]


def nonfinite_leaves(tree: Any) -> list[str]:
  """Names of the floating-point leaves of `tree` holding a NaN or an infinity (host)."""
  return digest(tree)[1]


def verify(tree: Any, meta: dict, *, partial: bool = False) -> None:
  """Raises `DamagedCheckpoint` unless every leaf of `tree` matches `meta`'s checksum
  and is finite.

  Args:
    tree: what was restored.
    meta: the checkpoint's meta item. Checkpoints written before checksums were
      recorded have none: they are checked for finiteness only (and a warning says so).
    partial: `tree` holds only some fields of the saved state (a params-only restore):
      recorded leaves it lacks are not missing.
  """
  recorded = (meta.get("checksum") or {}).get("leaves")
  got, bad = digest(tree)
  if recorded is None:
    logging.warning("A checkpoint written before checksums were recorded: its content "
                    "cannot be verified, only checked for NaN.")
  else:
    for name, value in got.items():
      want = recorded.get(name)
      if want is None:
        raise DamagedCheckpoint(f"no checksum recorded for {name}")
      if value != want:
        raise DamagedCheckpoint(f"checksum mismatch in {name}: read {value}, saved {want}")
    if not partial:
      missing = sorted(set(recorded) - set(got))
      if missing:
        raise DamagedCheckpoint(f"{missing[0]} was saved but not restored")
  if bad:
    raise DamagedCheckpoint(f"{bad[0]} holds NaN or infinite values")


def _one_line(error: BaseException, limit: int = 300) -> str:
  """An exception as one short line: its root cause (`raise ... from`), which names the
  file or array (Orbax wraps TensorStore's error in one that prints a whole spec)."""
  seen = {id(error)}
  while error.__cause__ is not None and id(error.__cause__) not in seen:
    error = error.__cause__
    seen.add(id(error))
  text = " ".join(str(error).split("See full TensorStore details")[0].split())
  if not isinstance(error, DamagedCheckpoint):
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_abandoned_read(unraisable) -> bool:
  """Whether an unraisable exception is the echo of an Orbax read abandoned after a failure.

  Two kinds: the read coroutines garbage-collected still raising, and TensorStore's
  completion callbacks of those reads that arrive after Orbax closed the event loop they
  were started on (`RuntimeError: Event loop is closed` in `call_soon_threadsafe`).
  """
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return True
  error, tb = unraisable.exc_value, unraisable.exc_traceback
  if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed":
    return False
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


_FILTER_INSTALLED = False


def _drop_abandoned_read_echoes() -> None:
  """From now on, drops the tracebacks of Orbax reads abandoned after one failed.

  When one array of a damaged checkpoint cannot be read, the reads of the others are
  abandoned still running; Python prints each as it ends ("Exception ignored in ..." or
  "Event loop is closed"), seconds after, and long after the one line that says which step
  was damaged and why. Installed by the first restore; every other exception still prints.
  """
  global _FILTER_INSTALLED
  if _FILTER_INSTALLED:
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  _FILTER_INSTALLED = True


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (so that every host restores the same step)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


# ---------------------------------------------------------------- the manager
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
    """Saves (asynchronously for arrays) unless a checkpoint of `step` already exists.

    `meta` gets the step, the iterator's state and the checksums of `state`; they are
    computed here, before the next step may donate the arrays.

    Raises:
      NonFiniteState: `state` holds NaN or infinite values; nothing was saved.
    """
    if step in self.manager.all_steps():
      return
    sums, bad = digest(state)
    if bad:
      raise NonFiniteState(bad)
    meta = dict(meta or {})
    meta.setdefault("step", int(step))
    if iterator is not None:
      meta["iterator"] = iterator.get_state()
    meta["checksum"] = {"algorithm": CHECKSUM_ALGORITHM, "leaves": sums}
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("Saving checkpoint of step %d to %s", step, self.directory)

  def restore(self, step: int, target_state: Any, iterator: Any = None) -> tuple[Any, dict]:
    """Restores `state` shaped and sharded like `target_state`, and the iterator in place.

    Raises:
      DamagedCheckpoint: what was read is not what was saved (see `check_restored`);
        Orbax, TensorStore and Grain raise their own errors for unreadable files.
    """
    check_files(epath.Path(self.directory) / str(step))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    meta = dict(restored["meta"] or {})
    check_restored(step, restored["state"], meta, iterator)
    return restored["state"], meta

  def restore_latest_state(self, target_state: Any) -> tuple[Any, dict]:
    """Restores (and verifies) only the state of the latest checkpoint (no iterator)."""
    step = self.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint found in {self.directory}")
    return self.restore(step, target_state)

  def set_aside(self, steps: list[int]) -> list[str]:
    """Renames the checkpoints of `steps` to `<step>.damaged` (process 0; every process
    waits for it). Orbax then no longer lists them, so those steps can be saved again."""
    moved = []
    for step in steps:
      src = epath.Path(self.directory) / str(step)
      dst = src.parent / (src.name + DAMAGED_SUFFIX)
      n = 1
      while dst.exists():
        dst = src.parent / f"{src.name}{DAMAGED_SUFFIX}.{n}"
        n += 1
      if jax.process_index() == 0:
        src.rename(dst)
      moved.append(os.fspath(dst))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("prosona_checkpoint_set_aside")
    self.manager.reload()
    return moved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_files(step_dir: epath.Path) -> None:
  """Raises `DamagedCheckpoint` when the state's tree description is missing: without
  it Orbax fails deep in a tree comparison, with a message that does not say so."""
  if not (step_dir / "state" / PYTREE_METADATA_FILE).exists():
    raise DamagedCheckpoint(f"state/{PYTREE_METADATA_FILE} is missing")


def check_restored(step: int, state: Any, meta: dict, iterator: Any = None) -> None:
  """Raises `DamagedCheckpoint` unless a restored step is consistent with its meta item.

  The checksums and finiteness of the state (`verify`); the step the state counted, the
  step the meta names and the directory's step; and the iterator's position: its state
  equals the one saved beside the train state (process 0, whose state the meta holds),
  and Grain's own position (`next_index`) is the number of batches consumed.
  """
  verify(state, meta)
  counted = getattr(state, "step", None)
  if counted is not None and int(jax.device_get(counted)) != step:
    raise DamagedCheckpoint(f"the state counts step {int(jax.device_get(counted))}")
  if "step" in meta and int(meta["step"]) != step:
    raise DamagedCheckpoint(f"its meta item names step {meta['step']}")
  if iterator is None or "iterator" not in meta:
    return
  position = json.loads(json.dumps(iterator.get_state()))  # Tuples as JSON has them.
  if jax.process_index() == 0 and position != meta["iterator"]:
    raise DamagedCheckpoint(f"the data iterator restored at {position}, saved at "
                            f"{meta['iterator']}")
  if isinstance(position, dict) and isinstance(position.get("next_index"), int) \
      and "batches" in meta and position["next_index"] != int(meta["batches"]):
    raise DamagedCheckpoint(f"the data iterator is at batch {position['next_index']}, "
                            f"but {meta['batches']} batches were consumed")


def _try_steps(steps: list[int], attempt: Callable[[int], Any], where: str, name: str
               ) -> tuple[int, Any, list[tuple[int, str]]]:
  """`attempt(step)` on `steps` (newest first) until one succeeds on every process.

  Returns (step, its result, [(damaged newer step, why)]).

  Raises:
    CheckpointError: no step could be read; the message lists each and why.
  """
  tried = []
  _drop_abandoned_read_echoes()
  for step in steps:
    try:
      result, reason = attempt(step), None
    except Exception as e:  # pylint: disable=broad-except
      # Anything Orbax, TensorStore or Grain raise for damaged files, or a mismatch.
      result, reason = None, _one_line(e)
      gc.collect()  # The abandoned read coroutines end here, not in the next step's log.
    if _all_processes_agree(reason is None):
      return step, result, tried
    reason = reason or "unreadable on another process"
    logging.warning("%s: the checkpoint of step %d in %s is damaged (%s); trying the "
                    "previous one.", name, step, where, reason)
    tried.append((step, reason))
  raise CheckpointError(
      f"{where}: no intact checkpoint; tried step "
      + "; step ".join(f"{s} ({why})" for s, why in tried)
      + ". Move the directory away to start this stage afresh.")


# ---------------------------------------------------------------- params-only restore
def step_dirs(directory: str) -> list[tuple[int, epath.Path]]:
  """(step, step directory) of every checkpoint in `directory` with a `state` item,
  newest first (`N.damaged` and Orbax's temporary directories are not steps)."""
  path = epath.Path(directory)
  if not path.is_dir():
    return []
  return sorted(((int(p.name), p) for p in path.iterdir()
                 if p.name.isdigit() and (p / "state").is_dir()), reverse=True)


def latest_step_dir(directory: str) -> tuple[int, str] | None:
  """(step, path of its `state` item) of the newest checkpoint in `directory`, or None."""
  directory = directory if "://" in directory else os.path.abspath(directory)
  found = step_dirs(directory)
  if not found:
    return None
  step, step_dir = found[0]
  return step, os.fspath(step_dir / "state")


def read_meta(step_dir: epath.Path) -> dict:
  """The meta item (JSON) of a step directory."""
  meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
  if not isinstance(meta, dict):
    raise DamagedCheckpoint("its meta item is not a JSON object")
  return meta


def _abstract_from_metadata(state_dir: str, fields: tuple[str, ...]) -> dict:
  """Shapes and dtypes of `fields` as saved, for a restore without a target."""
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(state_dir).item_metadata.tree
  missing = [k for k in fields if k not in tree]
  if missing:
    raise DamagedCheckpoint(f"the saved state has no field {missing[0]!r}")
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                      {k: tree[k] for k in fields},
                      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def load_params(directory: str, abstract: Any = None, *,
                fields: tuple[str, ...] = ("params",), name: str = "") -> tuple[Any, int]:
  """Reads only `fields` of the train state of the newest intact checkpoint in `directory`.

  The optimizer state, step counter and iterator of that run are not read, so the
  reader needs neither its optimizer nor its data: this is how Stage 2 starts from a
  trained Stage 1 (MaxText's `load_params_from_path`). `abstract` gives each field's
  shapes, dtypes and shardings (a dict `{field: tree of jax.ShapeDtypeStruct}`; leaves
  without a sharding land on this process's first device); None takes them from the
  checkpoint. What is read is verified against the step's checksums; a damaged step is
  reported and the previous one read (the damaged one is left in place: the directory
  may be another run's).

  Returns:
    ({field: restored tree}, the step read).

  Raises:
    FileNotFoundError: no checkpoint in `directory`.
    CheckpointError: none is intact.
  """
  # Orbax wants absolute local paths (a relative --workdir is the common case).
  directory = directory if "://" in directory else os.path.abspath(directory)
  found = dict(step_dirs(directory))
  if not found:
    raise FileNotFoundError(f"{directory}: no checkpoint found")
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def attempt(step: int):
    check_files(found[step])
    state_dir = os.fspath(found[step] / "state")
    fields_abstract = (_abstract_from_metadata(state_dir, fields) if abstract is None
                       else {k: abstract[k] for k in fields})
    item = jax.tree.map(
        lambda s: s if getattr(s, "sharding", None) is not None else
        jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here), fields_abstract)
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    with ocp.PyTreeCheckpointer() as ckptr:
      restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    out = {k: restored[k] for k in fields}
    verify(out, read_meta(found[step]), partial=True)
    return out

  step, params, _ = _try_steps(sorted(found, reverse=True), attempt, directory,
                               name or "load_params")
  return params, step


def load_state_if_possible(ckpt: Checkpointer, state: Any, iterator: Any = None, *,
                           params_from: str = "", abstract_params: Any = None,
                           fields: tuple[str, ...] = ("params",), name: str = ""):
  """Where a stage's state comes from, in MaxText's order of preference.

  1. The stage's own newest intact checkpoint (a resumed run): the whole state, and the
     data iterator restored in place. Damaged newer steps are reported in one line each
     and set aside (`Checkpointer.set_aside`); `CheckpointError` when none is intact.
  2. Otherwise, when `params_from` names a directory, only `fields` of another run's
     latest intact state (see `load_params`).
  3. Otherwise nothing: the caller keeps its freshly initialised state.

  Returns:
    (restored state or None, restored fields or None, the step read or None).
  """
  steps = sorted(ckpt.manager.all_steps(), reverse=True)
  if steps:
    step, restored, damaged = _try_steps(
        steps, lambda s: ckpt.restore(s, state, iterator)[0], ckpt.directory,
        name or "restore")
    if damaged:
      moved = ckpt.set_aside([s for s, _ in damaged])
      logging.warning("%s: set the damaged checkpoints aside as %s; resuming from step %d.",
                      name or "restore", ", ".join(moved), step)
    return restored, None, step
  if params_from:
    params, step = load_params(params_from, abstract_params, fields=fields, name=name)
    return None, params, step
  return None, None, None


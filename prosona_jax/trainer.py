"""The training loop every method shares: resume, steps, logging, checkpoints, preemption.

A method supplies a compiled `train_step(state, batch) -> (state, metrics)`, a Grain
iterator and callbacks; this module owns everything around them. Metrics are fetched to
the host only on logging steps, so the device runs ahead of Python between them.

Hooks (`fit(..., hooks=[...])`) are called after every step with the step number (counted
from 1) and the state, as nanodo's loop calls its progress and profiling hooks; tests use
them to inject faults (a SIGKILL or SIGTERM after a given step, or a NaN: a hook that
returns a state replaces the loop's).

A checkpoint is written only of a state that is entirely finite (`Checkpointer.save`
checks every array on the host, with its checksums), so the last good checkpoint the NaN
stop names is one.
"""

import dataclasses
import signal
import time
from typing import Any, Callable, Sequence

from absl import logging
from flax import struct
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import optax

from prosona_jax import checkpointing
from prosona_jax import logger as logger_lib
from prosona_jax import parallel

Hook = Callable[[int, "TrainState"], None]


class TrainState(struct.PyTreeNode):
  """Everything a step changes.

  `nonfinite_step` is -1 until a loss or gradient is NaN or infinite, then the number of
  the first bad step, counted from 1 like log lines and checkpoints (step N is the N-th
  update; checkpoint N holds the state after it).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  batch_stats: Any
  nonfinite_step: jax.Array

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, batch_stats=None) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               batch_stats=batch_stats if batch_stats is not None else {},
               nonfinite_step=jnp.full((), -1, jnp.int32))

  def advanced(self, finite: jax.Array, **fields) -> "TrainState":
    """The state after one step with `fields` replaced; records the step if not `finite`."""
    return self.replace(
        step=self.step + 1,
        nonfinite_step=jnp.where(~finite & (self.nonfinite_step < 0), self.step + 1,
                                 self.nonfinite_step),
        **fields)


def guarded_update(params, opt_state, grads, loss: jax.Array,
                   tx: optax.GradientTransformation, extra=None, old_extra=None):
  """`tx` applied to `params`, or nothing when the loss or a gradient is not finite.

  Returns (params, opt_state, extra, finite): `extra` (e.g. new BatchNorm statistics) is
  kept only when the update is, else `old_extra` is returned.
  """
  finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

  # lax.cond rather than jnp.where over every array: same result, a fraction of the
  # compile time and memory (where keeps both the old and the new copy of everything).
  def update(op):
    params, opt_state, grads, extra, _ = op
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, extra

  def skip(op):
    params, opt_state, _, _, old_extra = op
    return params, opt_state, old_extra

  params, opt_state, extra = jax.lax.cond(finite, update, skip,
                                          (params, opt_state, grads, extra, old_extra))
  return params, opt_state, extra, finite


def apply_update(state: TrainState, grads, loss: jax.Array, tx: optax.GradientTransformation,
                 batch_stats=None) -> TrainState:
  """One optimizer update, skipped when the loss or a gradient is not finite.

  A skipped update leaves the state as it was before the bad step and records that step,
  so the host can stop with a message naming it while the last good state is intact.
  """
  if batch_stats is None:
    batch_stats = state.batch_stats
  params, opt_state, batch_stats, finite = guarded_update(
      state.params, state.opt_state, grads, loss, tx, batch_stats, state.batch_stats)
  return state.advanced(finite, params=params, opt_state=opt_state, batch_stats=batch_stats)


class NonFiniteLoss(RuntimeError):
  pass


class Preempted(SystemExit):
  """Raised after the checkpoint of a preempted run is written (exit status 143)."""

  def __init__(self, step: int):
    super().__init__(143)
    self.step = step


class _SigtermFlag:
  """Single-process SIGTERM handling. Multi-host runs use JAX's preemption sync point."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary.")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host reaches the same answer at the same step.
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received


@dataclasses.dataclass
class LoopConfig:
  name: str  # e.g. "stage1/fold0": used in progress lines and metric names.
  total_steps: int
  log_every: int
  checkpoint_every: int
  eval_every: int  # 0: validation only at the end.
  # Metric -> the lowest value it can reach (Stage 2's contrastive terms: ln 5), shown
  # beside it in progress lines and written once as `train/<metric>_floor`.
  floors: dict[str, float] = dataclasses.field(default_factory=dict)


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressClock:
  """Steps per second and the ETA of progress lines, from step times after compilation.

  The first step of a loop compiles the train step (tens of seconds on a CPU, longer
  than many steps); counted in, it made the first ETA several times too long. `start`
  is called once that step has finished, and rates count from there.
  """

  def __init__(self, total_steps: int):
    self.total_steps = total_steps
    self._step: int | None = None
    self._time = 0.0

  def start(self, step: int, now: float) -> None:
    """Marks the end of the compiling step `step` (counted from 1) at time `now`."""
    self._step, self._time = step, now

  def tick(self, step: int, now: float) -> tuple[float | None, float | None]:
    """(steps per second since the last tick or `start`, seconds left), or (None, None)
    when no step has run since compilation (a log line right after the first step)."""
    if self._step is None or step <= self._step:
      return None, None
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return rate, (self.total_steps - step) / max(rate, 1e-9)


def fit(loop: LoopConfig, *, state: TrainState, train_step: Callable, iterator,
        ckpt: checkpointing.Checkpointer, writer: logger_lib.MetricWriter, mesh,
        lr_fn: Callable[[int], float] | None = None,
        eval_fn: Callable[[TrainState, int], dict] | None = None,
        hooks: Sequence[Hook] = ()) -> TrainState:
  """Runs `train_step` from the state's step to `loop.total_steps`, resuming if possible.

  Args:
    loop: step counts and cadences.
    state: a freshly initialised state, placed on the mesh; replaced by the latest
      checkpoint in `ckpt` if there is one (the iterator is restored with it).
    train_step: compiled `(state, global_batch) -> (state, metrics)`.
    iterator: a checkpointable Grain iterator of this process's batches.
    ckpt: where checkpoints go.
    writer: metric sink.
    mesh: the device mesh batches are sharded over.
    lr_fn: learning rate at a step, for logging.
    eval_fn: validation `(state, step) -> metrics`, run every `loop.eval_every` steps and
      at the end.
    hooks: called as `hook(step, state)` after every step (step counted from 1); a hook
      that returns a `TrainState` replaces the loop's (tests inject faults so).

  Returns:
    The final state (also checkpointed).
  """
  restored, _, latest = checkpointing.load_state_if_possible(ckpt, state, iterator,
                                                             name=loop.name)
  if restored is not None:
    state = restored
    logging.info("%s: resumed from the checkpoint of step %d.", loop.name, latest)
  start = int(jax.device_get(state.step))
  if start >= loop.total_steps:
    logging.info("%s: already complete (%d steps).", loop.name, start)
    return state

  def stop(what: str) -> None:
    ckpt.wait()  # An earlier save may still be in flight: finish it before dying.
    # Only finite states are saved (`Checkpointer.save` refuses others): the newest is good.
    good = ckpt.latest_step()
    kept = (f"The last good checkpoint is step {good} in {ckpt.directory}" if good is not None
            else f"No checkpoint was written to {ckpt.directory} before it")
    raise NonFiniteLoss(f"{loop.name}: {what}; stopping. {kept} "
                        "(lower the learning rate or check the data).")

  def check_finite(step: int) -> None:
    del step
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
      stop(f"the loss became NaN or infinite at step {bad}")

  def save(step: int) -> None:
    check_finite(step)
    try:
      ckpt.save(step, state, iterator, {"stage": loop.name, "batches": step})
    except checkpointing.NonFiniteState as e:
      # The guard skips updates whose loss or gradients are not finite, but a finite
      # update can still make NaN parameters (a NaN learning rate, an overflow).
      stop(f"the parameters or optimizer state became NaN or infinite by step {step} "
           f"({e.leaves[0]}), with every loss and gradient finite (a non-finite learning "
           "rate, or an update that overflowed)")

  t_start = time.time()
  clock = ProgressClock(loop.total_steps)
  if loop.floors:
    values = sorted(set(round(v, 3) for v in loop.floors.values()))
    logging.info("%s: %s cannot go below %s (ln of the positives per prompt): a term at its "
                 "floor has reached its optimum; it has not stalled (docs/method.md).",
                 loop.name, " and ".join(loop.floors), " / ".join(f"{v:.3f}" for v in values))
    if start == 0:
      writer.scalars(0, {f"train/{k}_floor": v for k, v in loop.floors.items()})
  with _SigtermFlag() as sigterm:
    for step in range(start, loop.total_steps):
      if sigterm.should_stop(step):
        save(step)
        ckpt.wait()
        logging.warning("%s: preempted at step %d; checkpoint saved. Re-run the same "
                        "command to resume.", loop.name, step)
        raise Preempted(step)
      batch = parallel.to_global(next(iterator), mesh)
      if step == start:
        # The first call compiles: say so, and time it apart from the steps' rate.
        logging.info("%s: compiling the train step...", loop.name)
        t_compile = time.time()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(state)
        clock.start(step + 1, time.time())
        logging.info("%s: compiled in %.1f s (with the first step).", loop.name,
                     time.time() - t_compile)
      else:
        state, metrics = train_step(state, batch)
      done = step + 1
      if done % loop.log_every == 0 or done == loop.total_steps:
        metrics = jax.device_get(metrics)
        check_finite(done)
        rate, eta = clock.tick(done, time.time())
        row = {f"train/{k}": v for k, v in metrics.items()}
        if rate is not None:
          row["train/steps_per_sec"] = rate
        if lr_fn is not None:
          row["train/lr"] = lr_fn(done)
        writer.scalars(done, row)
        floors = "".join(f"  {k} {float(metrics[k]):.3f} (floor {v:.3f})"
                         for k, v in loop.floors.items() if k in metrics)
        speed = (f"  {rate:.2f} steps/s  ETA {_fmt_time(eta)}" if rate is not None else "")
        logging.info("%s step %d/%d  loss %.4f%s%s", loop.name, done, loop.total_steps,
                     float(metrics["loss"]), floors, speed)
      if done % loop.checkpoint_every == 0 and done < loop.total_steps:
        save(done)
      if eval_fn is not None and loop.eval_every and done % loop.eval_every == 0 \
          and done < loop.total_steps:
        writer.scalars(done, {f"val/{k}": v for k, v in eval_fn(state, done).items()})
      for hook in hooks:
        replaced = hook(done, state)
        if isinstance(replaced, TrainState):  # Other return values mean nothing.
          state = replaced
  save(loop.total_steps)
  ckpt.wait()
  if eval_fn is not None:
    writer.scalars(loop.total_steps,
                   {f"val/{k}": v for k, v in eval_fn(state, loop.total_steps).items()})
  writer.flush()
  logging.info("%s: finished %d steps in %s.", loop.name, loop.total_steps - start,
               _fmt_time(time.time() - t_start))
  return state

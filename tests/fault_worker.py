"""Runs a command-line tool of the package with fault-injection hooks (tests only).

  python tests/fault_worker.py main --config=configs/tiny.py --workdir=W

behaves as `python -m prosona_jax.main ...`, except that the training loop gets hooks
from the environment: after step N (counted from 1) the process sends itself
- SIGKILL when `PROSONA_FAULT_SIGKILL_AT_STEP=N` (a crash: no clean-up, an asynchronous
  save of step N may be half written);
- SIGTERM when `PROSONA_FAULT_SIGTERM_AT_STEP=N` (a preemption);
and `PROSONA_FAULT_NAN_OPT_STATE_AT_STEP=N` fills the optimizer state with NaN after step
N, so that the next update turns the parameters into NaN while its loss and gradients
are finite (as a NaN learning rate does).
Production code has no such switches: `trainer.fit` only calls the hooks it is given.
"""

import functools
import importlib
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = {"PROSONA_FAULT_SIGKILL_AT_STEP": signal.SIGKILL,
          "PROSONA_FAULT_SIGTERM_AT_STEP": signal.SIGTERM}


def signal_after(step: int, sig: int):
  """A `trainer.fit` hook that sends `sig` to this process right after `step`."""
  def hook(done, state):
    del state
    if done == step:
      os.kill(os.getpid(), sig)
  return hook


def nan_optimizer_state_after(step: int):
  """A `trainer.fit` hook returning the state with NaN moments right after `step`."""
  def hook(done, state):
    if done != step:
      return None
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    nan = lambda x: x + jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x
    return state.replace(opt_state=jax.tree.map(nan, state.opt_state))
  return hook


def hooks_from_env() -> tuple:
  hooks = tuple(signal_after(int(os.environ[name]), sig) for name, sig in FAULTS.items()
                if os.environ.get(name))
  if os.environ.get("PROSONA_FAULT_NAN_OPT_STATE_AT_STEP"):
    hooks += (nan_optimizer_state_after(int(os.environ["PROSONA_FAULT_NAN_OPT_STATE_AT_STEP"])),)
  return hooks


def main() -> None:
  tool = sys.argv.pop(1)
  sys.path.insert(0, REPO)
  module = importlib.import_module(f"prosona_jax.{tool}")  # Defines the tool's flags.
  from prosona_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(functools.partial(module.main, hooks=hooks_from_env()), name=tool, progress=True)


if __name__ == "__main__":
  main()

"""One process of `test_multihost.py`: runs a tool and records what it did.

Not a test itself. `python tests/multihost_worker.py TOOL FLAGS...` runs
`python -m prosona_jax.TOOL FLAGS...` (`main` or `grid`). Besides the normal run it
writes, into `$PROSONA_TEST_OUT`:
  params_<process>.npz   the parameters this process holds at the end of the last
                         training loop (host copy)
  writes_<process>.json  files this process opened for writing (or renamed, or created as
                         directories) under the work directory, outside `checkpoints/`
and, when `PROSONA_TEST_SIGTERM_AT=k` names a step, sends itself SIGTERM right after its
k-th train step (a preemption notice on one host only), then takes a second per step.
"""

import json
import os
import signal
import sys
import time


def _record_writes(workdir: str, sink: list) -> None:
  """Audit hook: every write-mode open, rename and mkdir under `workdir`."""
  root = os.path.realpath(workdir)
  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

  def under(path) -> str | None:
    if not isinstance(path, (str, bytes, os.PathLike)):
      return None
    path = os.path.realpath(os.fsdecode(path))
    if path.startswith(root + os.sep) and f"{os.sep}checkpoints" not in path[len(root):]:
      return path
    return None

  def hook(event, args):
    if event == "open" and args[2] is not None and args[2] & write_flags:
      paths = [args[0]]
    elif event in ("os.rename", "os.replace"):
      paths = args[:2]
    elif event == "os.mkdir":
      paths = args[:1]
    else:
      return
    for p in paths:
      p = under(p)
      if p is not None:
        sink.append(f"{event} {p}")

  sys.addaudithook(hook)


def main() -> None:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = os.environ["PROSONA_TEST_OUT"]
  workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
  writes: list[str] = []
  _record_writes(workdir, writes)

  tool = sys.argv.pop(1)
  import functools  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from prosona_jax import cli  # pylint: disable=g-import-not-at-top
  from prosona_jax import trainer  # pylint: disable=g-import-not-at-top
  tool_module = importlib.import_module(f"prosona_jax.{tool}")

  sigterm_at = int(os.environ.get("PROSONA_TEST_SIGTERM_AT", "0"))
  fit = trainer.fit
  calls = [0]

  def signal_then_slow_down(step, state):
    del step, state
    calls[0] += 1  # This process's steps, counted over resumes within the process.
    if calls[0] == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    elif calls[0] > sigterm_at:
      # Real steps take long enough for the notice to reach every host before the
      # run ends; tiny CPU steps may not on a loaded machine, so make them slow.
      time.sleep(1.0)

  def recording_fit(loop, **kwargs):
    state = fit(loop, **kwargs)
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    np.savez(os.path.join(out, f"params_{jax.process_index()}.npz"),
             **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
    return state

  trainer.fit = recording_fit
  hooks = (signal_then_slow_down,) if sigterm_at else ()
  try:
    cli.run(functools.partial(tool_module.main, hooks=hooks), name=tool, progress=True)
  finally:
    # `jax.process_index()` is valid here: main initialised the runtime first.
    with open(os.path.join(out, f"writes_{jax.process_index()}.json"), "w") as f:
      json.dump(writes, f, indent=1)


if __name__ == "__main__":
  main()

"""Tools run through `tests/fault_worker.py` in subprocesses, and what they leave behind.

The worker runs a command-line tool with the fault hooks named by `PROSONA_FAULT_*`
environment variables (a SIGTERM, SIGKILL or NaN at a chosen step), so that a test can
preempt or break a run at a known step and then look at its work directory.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_WORKER = os.path.join(REPO, "tests", "fault_worker.py")
# Stage 1 of configs/tiny.py: 33 training images at batch 8 are 4 steps per epoch, so 12
# steps in all, with a checkpoint every 2 steps.
TINY = ("--config=configs/tiny.py:stage1", "--config.stage1.epochs=3",
        "--config.stage1.checkpoint_every=2")
TINY_STEPS = 12


def cache_env(folder) -> dict:
  """Environment of a persistent compilation cache in `folder` that keeps every program."""
  return {"JAX_COMPILATION_CACHE_DIR": str(folder),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def environment(extra: dict | None = None) -> dict:
  """This process's environment without fault hooks, on CPU, with `extra` added."""
  out = {k: v for k, v in os.environ.items() if not k.startswith("PROSONA_FAULT_")}
  out.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **(extra or {}))
  return out


def start(workdir, *flags, config=TINY, tool: str = "main", env: dict | None = None
          ) -> subprocess.Popen:
  """Starts `tool` (`prosona_jax.<tool>`) with `config`, `--workdir` and `flags`; `env`:
  variables added to the environment (the fault hooks among them)."""
  return subprocess.Popen(
      [sys.executable, FAULT_WORKER, tool, *config, f"--workdir={workdir}", *flags],
      cwd=REPO, env=environment(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
  """(return code, stdout and stderr together) of a started tool."""
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def run(workdir, *flags, **kwargs) -> tuple[int, str]:
  return finish(start(workdir, *flags, **kwargs))


def ckpt_dir(workdir) -> str:
  return os.path.join(workdir, "fold0", "stage1", "checkpoints")


def steps(workdir) -> list[int]:
  """The steps of Stage 1's checkpoints in `workdir`, ascending."""
  return sorted(int(n) for n in os.listdir(ckpt_dir(workdir)) if n.isdigit())


def read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()

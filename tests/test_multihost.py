"""Multi-host training, for real: two JAX processes on localhost (CPU, gloo collectives).

Each process runs `prosona_jax.main` (through `multihost_worker.py`, which records the
final parameters and the files each process wrote) on tiny Stage 1 with a global batch of
8 split over the two processes. The two-process run is preempted (SIGTERM to one process)
and resumed, as on a spot TPU slice. Checked: the notice stops both processes at the same
step with one checkpoint; after resuming, both hold identical parameters, equal to those
of an uninterrupted single-process run with the same global batch; only process 0 writes
logs, eval files and figures; every process saves its iterator in the shared checkpoint.

Every process runs under a deadline and is killed (SIGKILL, whole process group) on a
failure or at the deadline, so the test never hangs on a dead peer.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
STEPS = 6  # One epoch is 4 steps: the run crosses an epoch and a validation.
DEADLINE_S = 150  # Per launch; a normal one takes 10-30 s on two CPU cores.
PREEMPTED = 143  # trainer.Preempted


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Compiling dominates these runs. A quick LLVM pipeline halves it (numerics differ from
# the default only in the last bits, and every run here uses the same flags), and the
# runs after the first reuse its executables from a persistent cache. No
# `--xla_force_host_platform_device_count`: one CPU device per process.
_FAST_COMPILE = dict(
    XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


class _Launch:
  """`num_processes` workers on one work directory; `wait()` returns their exit codes."""

  def __init__(self, tmp, name: str, workdir, num_processes: int,
               extra_env: dict[int, dict[str, str]] | None = None,
               command: tuple[str, ...] = ("main", "--config=configs/tiny.py:stage1",
                                           f"--config.stage1.max_steps={STEPS}")):
    self.out = tmp / name
    self.out.mkdir()
    self.procs = []
    port = _free_port()  # A fresh port per launch: a lingering coordinator cannot interfere.
    for i in range(num_processes):
      env = dict(os.environ, PROSONA_TEST_OUT=str(self.out), JAX_PLATFORMS="cpu",
                 JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"), **_FAST_COMPILE)
      if num_processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i),
                   PROSONA_DISTRIBUTED="1", PROSONA_DISTRIBUTED_TIMEOUT_S="30")
      env.update((extra_env or {}).get(i, {}))
      with open(self.out / f"log_{i}.txt", "w") as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, WORKER, *command, f"--workdir={workdir}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))

  def wait(self, ok=(0,)) -> list[int]:
    """Waits for all; a code outside `ok` or the deadline kills the rest at once."""
    deadline = time.monotonic() + DEADLINE_S
    try:
      while any(p.poll() is None for p in self.procs):
        failed = any(p.returncode is not None and p.returncode not in ok for p in self.procs)
        if failed or time.monotonic() > deadline:
          break
        time.sleep(0.2)
    finally:
      for p in self.procs:
        if p.poll() is None:
          os.killpg(p.pid, signal.SIGKILL)  # Its own session: Grain workers go too.
          p.wait()
    return [p.returncode for p in self.procs]

  def log(self, i: int) -> str:
    return (self.out / f"log_{i}.txt").read_text()

  def logs(self) -> str:
    return "\n".join(f"--- process {i} ---\n{self.log(i)[-4000:]}"
                     for i in range(len(self.procs)))

  def params(self, i: int) -> dict[str, np.ndarray]:
    with np.load(self.out / f"params_{i}.npz") as z:
      return dict(z)

  def writes(self, i: int) -> list[str]:
    return json.loads((self.out / f"writes_{i}.json").read_text())


def _assert_params_close(a: dict, b: dict, atol: float) -> None:
  assert a.keys() == b.keys()
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  assert worst <= atol, f"parameters differ by up to {worst:.3g} (allowed {atol:g})"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A single-process run, and a two-process run of the same config that is preempted
  (SIGTERM to process 1 only) and then resumed to the end by the same command."""
  tmp = tmp_path_factory.mktemp("multihost")
  one = _Launch(tmp, "one", tmp / "work_one", 1)
  preempt = _Launch(tmp, "preempt", tmp / "work_two", 2,
                    extra_env={1: {"PROSONA_TEST_SIGTERM_AT": "2"}})
  codes_preempt, codes_one = preempt.wait(ok=(PREEMPTED,)), one.wait()
  assert codes_preempt == [PREEMPTED, PREEMPTED], preempt.logs()
  assert codes_one == [0], one.logs()
  resume = _Launch(tmp, "resume", tmp / "work_two", 2)
  assert resume.wait() == [0, 0], resume.logs()
  return tmp, one, preempt, resume


def test_sigterm_on_one_host_checkpoints_every_host_at_one_step(runs):
  # JAX's preemption service propagates the notice; both processes save at the same sync
  # step, exit with 143, and the re-run resumes from that checkpoint.
  _, _, preempt, resume = runs
  pattern = r"preempted at step (\d+); checkpoint saved"
  steps = [re.findall(pattern, preempt.log(i)) for i in range(2)]
  assert steps[0] == steps[1] and len(steps[0]) == 1, preempt.logs()
  assert 2 <= int(steps[0][0]) < STEPS
  assert f"resumed from the checkpoint of step {steps[0][0]}." in resume.log(0)


def test_processes_hold_identical_params(runs):
  _, _, _, resume = runs
  _assert_params_close(resume.params(0), resume.params(1), atol=0.0)


def test_two_processes_match_one_process(runs):
  # Same global batches (process p reads rows 4p:4p+4 of each), same rngs, so the same
  # model; only the reduction order of the gradient all-reduce differs.
  _, one, _, resume = runs
  _assert_params_close(one.params(0), resume.params(0), atol=1e-6)


def test_only_process_zero_writes(runs):
  tmp, _, preempt, resume = runs
  work = tmp / "work_two"
  assert preempt.writes(1) == [] and resume.writes(1) == [], "process 1 wrote a file"
  written = " ".join(resume.writes(0))
  for name in ("logs/metrics.jsonl", "logs/events.out.tfevents", "eval/stage1_fold0.json",
               "eval/stage1_samples_fold0.png", "eval/summary.md", "config.json"):
    assert name in written, f"process 0 did not write {name}"
  rows = [json.loads(line) for line in
          (work / "fold0/stage1/logs/metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]  # Once each.
  result = json.loads((work / "eval/stage1_fold0.json").read_text())
  assert result["fold"] == 0 and len(result["keys"]) > 0
  # Non-zero processes log warnings only, so progress lines appear once.
  assert "step 6/6" in resume.log(0) and "step 6/6" not in resume.log(1)


def test_checkpoint_holds_every_process_iterator(runs):
  tmp, _, _, _ = runs
  data = tmp / "work_two/fold0/stage1/checkpoints" / str(STEPS) / "data"
  assert sorted(p.name for p in data.glob("process_*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


# ---------------------------------------------------------------- the ablation grid

GRID = ("grid", "--config=configs/tiny.py", "--train_stage1", "--config.stage1.max_steps=4",
        "--config.stage2.max_steps=4", "--config.stage2.grid_alpha=(0.0,1.0)",
        "--config.stage2.grid_beta=(0.5,)", "--config.stage2.eval_every_epochs=0",
        "--config.stage1.eval_every_epochs=0")


def test_two_process_grid_starts_the_runtime_and_matches_one_process(tmp_path):
  """`grid` on two processes initialises the distributed runtime (as `main` does) and
  trains every cell to what the single-process grid trains them to."""
  one = _Launch(tmp_path, "grid_one", tmp_path / "grid_one", 1, command=GRID)
  two = _Launch(tmp_path, "grid_two", tmp_path / "grid_two", 2, command=GRID)
  assert two.wait() == [0, 0], two.logs()
  assert one.wait() == [0], one.logs()
  assert "Distributed: process 0 of 2" in two.log(0), two.logs()
  assert "Distributed: process 1 of 2" in two.log(1), two.logs()
  assert "Distributed" not in one.log(0)
  # The recorded parameters are the grid's (its loop runs last): both cells stacked.
  grid_params = two.params(0)
  assert all(v.shape[0] == 2 for v in grid_params.values()), {
      k: v.shape for k, v in grid_params.items()}
  _assert_params_close(two.params(0), two.params(1), atol=0.0)
  _assert_params_close(one.params(0), grid_params, atol=1e-5)
  cells = [json.loads((tmp_path / d / "grid.json").read_text())["cells"]
           for d in ("grid_one", "grid_two")]
  for a, b in zip(*cells):
    np.testing.assert_allclose(a["folds"]["0"]["ged"], b["folds"]["0"]["ged"], atol=1e-5)

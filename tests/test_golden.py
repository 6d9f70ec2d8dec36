"""Golden one-step regression: both stages of `configs/tiny.py`, one training step each.

The run goes through the package's own entry (`python -m prosona_jax.main`), so the
whole route is guarded: config, data order, PRNG derivation, initialisation, loss,
optimizer update, checkpoint layout and test-fold scoring. The logged losses, the
parameters in the step-1 checkpoints and the test scores must equal the values stored
in `tests/golden/tiny_one_step.json`.

A change that is *meant* to alter them (a new loss term, another initialiser) must
regenerate the file deliberately, and say so in its commit message:

  PROSONA_REGEN_GOLDEN=1 python -m pytest -q tests/test_golden.py

Parameters are compared through per-leaf statistics (sum, sum of |x|, sum of x^2 and
the first values), which catch any change to any element at float32 resolution
without storing whole arrays.
"""

import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden", "tiny_one_step.json")
REGEN = os.environ.get("PROSONA_REGEN_GOLDEN") == "1"
HOW_TO_REGENERATE = (
    "If this change is meant to alter training numerically, regenerate the stored values "
    "deliberately with `PROSONA_REGEN_GOLDEN=1 python -m pytest -q tests/test_golden.py` "
    "and say so in the commit message; otherwise the change broke training.")
RTOL, ATOL = 1e-5, 1e-9
FLAGS = ("--config=configs/tiny.py", "--config.stage1.max_steps=1",
         "--config.stage2.max_steps=1", "--config.stage1.log_every=1",
         "--config.stage2.log_every=1", "--config.eval.num_images_logged=1")
SCORES = ("ged", "dice_soft", "dice_max", "dice_max_reverse", "dice_match")


def _leaf_stats(tree, prefix=""):
  out = {}
  if isinstance(tree, dict):
    for k in sorted(tree):
      out.update(_leaf_stats(tree[k], f"{prefix}/{k}" if prefix else str(k)))
    return out
  x = np.asarray(tree, np.float64).ravel()
  out[prefix] = [float(x.sum()), float(np.abs(x).sum()), float((x * x).sum())] + \
      [float(v) for v in x[:3]]
  return out


def _restore_state(directory: str, step: int):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(directory, str(step), "state"))


def _logged(logs: str) -> dict:
  with open(os.path.join(logs, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  row = next(r for r in rows if r["step"] == 1 and "train/loss" in r)
  return {k: v for k, v in sorted(row.items()) if k.startswith("train/") and
          k not in ("train/steps_per_sec",)}


def _measure(workdir: str) -> dict:
  out = {}
  for stage in ("stage1", "stage2"):
    base = os.path.join(workdir, "fold0", stage)
    state = _restore_state(os.path.join(base, "checkpoints"), 1)
    with open(os.path.join(workdir, "eval", f"{stage}_fold0.json")) as f:
      mean = json.load(f)["mean"]
    out[stage] = {"logged": _logged(os.path.join(base, "logs")),
                  "step": int(np.asarray(state["step"])),
                  "params": _leaf_stats(state["params"]),
                  "test": {k: float(mean[k]) for k in SCORES}}
  return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
  # A relative --workdir, as the README's commands give it (Orbax needs absolute paths
  # internally: a relative one once broke Stage 2's start from Stage 1).
  cwd = str(tmp_path_factory.mktemp("golden"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  flags = [f.replace("configs/", os.path.join(REPO, "configs") + "/") for f in FLAGS]
  proc = subprocess.run([sys.executable, "-m", "prosona_jax.main", *flags,
                         "--workdir=runs/golden"], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return _measure(os.path.join(cwd, "runs", "golden"))


def _compare(got, want, where: str, problems: list) -> None:
  if isinstance(want, dict):
    if sorted(got) != sorted(want):
      problems.append(f"{where}: keys {sorted(set(got) ^ set(want))} differ")
      return
    for k in want:
      _compare(got[k], want[k], f"{where}/{k}", problems)
  elif isinstance(want, list):
    if not np.allclose(got, want, rtol=RTOL, atol=ATOL):
      problems.append(f"{where}: got {got}, stored {want}")
  elif not np.isclose(got, want, rtol=RTOL, atol=ATOL):
    problems.append(f"{where}: got {got}, stored {want}")


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_one_step_matches_the_stored_values(measured, stage):
  if REGEN:
    stored = {}
    if os.path.exists(GOLDEN):
      with open(GOLDEN) as f:
        stored = json.load(f)
    stored[stage] = measured[stage]
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
      json.dump(stored, f, indent=1, sort_keys=True)
  assert os.path.exists(GOLDEN), f"{GOLDEN} is missing. {HOW_TO_REGENERATE}"
  with open(GOLDEN) as f:
    want = json.load(f)[stage]
  got = measured[stage]
  assert got["step"] == 1
  problems = []
  _compare(got, want, stage, problems)
  assert not problems, (f"{len(problems)} value(s) differ from {GOLDEN}:\n  "
                        + "\n  ".join(problems[:20]) + "\n" + HOW_TO_REGENERATE)

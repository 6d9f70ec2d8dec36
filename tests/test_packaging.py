"""The installed package: dependencies, console scripts, and the tools run from any directory.

scripts/setup.sh installs prosona_jax into .venv (editable); these tests run the tools from a
folder outside the repository with no PYTHONPATH, as a user would.
"""

import importlib.metadata
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from prosona_jax import console

REPO = pathlib.Path(__file__).parents[1]
SCRIPTS = {
    "prosona-train": ("train", "prosona_jax.main"),
    "prosona-grid": ("grid", "prosona_jax.grid"),
    "prosona-predict": ("predict", "prosona_jax.predict"),
    "prosona-export": ("export", "prosona_jax.export"),
    "prosona-convert": ("convert", "prosona_jax.convert"),
    "prosona-score": ("score", "prosona_jax.score"),
    "prosona-inspect": ("inspect_data", "prosona_jax.inspect_data"),
    "prosona-serve": ("serve", "prosona_jax.serve"),
}


def _outside_env() -> dict:
  """The environment minus PYTHONPATH: only the install can make prosona_jax importable."""
  env = dict(os.environ)
  env.pop("PYTHONPATH", None)
  return env


def _run_outside(args, cwd) -> subprocess.CompletedProcess:
  assert not pathlib.Path(cwd).resolve().is_relative_to(REPO.resolve())
  return subprocess.run(args, cwd=cwd, env=_outside_env(), capture_output=True, text=True,
                        check=False)


def _requirement_lines(text: str) -> list[str]:
  return [line.strip() for line in text.splitlines()
          if line.strip() and not line.lstrip().startswith("#")]


def test_pyproject_declares_the_requirements():
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+.
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  declared = project["dependencies"] + project["optional-dependencies"]["test"]
  required = _requirement_lines((REPO / "requirements.txt").read_text())
  assert sorted(declared) == sorted(required)
  assert {name: value for name, value in project["scripts"].items()} == {
      name: f"prosona_jax.console:{fn}" for name, (fn, _) in SCRIPTS.items()}


def test_console_scripts_are_installed_and_run_their_modules(monkeypatch):
  eps = {ep.name: ep.value
         for ep in importlib.metadata.entry_points(group="console_scripts")
         if ep.name.startswith("prosona-")}
  assert eps == {name: f"prosona_jax.console:{fn}" for name, (fn, _) in SCRIPTS.items()}, (
      "prosona_jax is not installed with its console scripts: run scripts/setup.sh")
  ran = []
  monkeypatch.setattr(console.runpy, "run_module",
                      lambda module, **kw: ran.append((module, kw)))
  for name, (fn, module) in SCRIPTS.items():
    getattr(console, fn)()
    assert ran[-1] == (module, {"run_name": "__main__", "alter_sys": True}), name
    assert importlib.util.find_spec(module) is not None, module


def test_score_help_from_another_directory(tmp_path):
  result = _run_outside([sys.executable, "-m", "prosona_jax.score", "--help"], tmp_path)
  # absl ends --help with status 1 (its convention); the usage text is what shows the
  # module was found and its flags defined.
  assert result.returncode in (0, 1), result.stderr
  assert "No module named" not in result.stderr
  assert "--convention" in result.stdout and "docs/metrics.md" in result.stdout


def test_score_runs_from_another_directory(tmp_path):
  rng = np.random.default_rng(0)
  labels = (rng.random((2, 3, 8, 8)) < 0.3).astype(np.uint8)
  np.save(tmp_path / "labels.npy", labels)
  np.save(tmp_path / "preds.npy", labels[:, ::-1].astype(np.float32))
  result = _run_outside([sys.executable, "-m", "prosona_jax.score", "--labels=labels.npy",
                         "--preds=preds.npy", "--json=s.json"], tmp_path)
  assert result.returncode == 0, result.stderr
  assert re.search(r"GED", result.stdout) and (tmp_path / "s.json").is_file()


def test_console_script_with_flags_defined_under_main(tmp_path):
  # grid.py defines its flags only under `if __name__ == "__main__":`.
  script = pathlib.Path(sys.executable).parent / "prosona-grid"
  if not script.exists():
    pytest.fail(f"{script} is missing: scripts/setup.sh installs the console scripts")
  result = _run_outside([str(script), "--help"], tmp_path)
  assert result.returncode in (0, 1), result.stderr
  assert "--mode" in result.stdout and "--workdir" in result.stdout

"""The real-data tests never skip in silence: CI fails without the samples, elsewhere they skip
with the reason printed.

Each case runs one real-data test in a pytest subprocess with `PROSONA_SHARED_DATA` pointed at
an empty folder, so what the shared samples' absence does is checked, not assumed.
"""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).parents[1]
# A cheap test that reads the samples only through the `shared_data` fixture.
PROBE = "tests/test_metrics.py::test_lidc_empty_predictions"


def _run_probe(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
  env = dict(os.environ, PROSONA_SHARED_DATA=str(tmp_path / "no_samples_here"))
  env.pop("CI", None)
  if ci is not None:
    env["CI"] = ci
  return subprocess.run([sys.executable, "-m", "pytest", "-q", PROBE],
                        cwd=REPO, env=env, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_samples_fail_under_ci(tmp_path, ci):
  result = _run_probe(tmp_path, ci)
  assert result.returncode != 0, result.stdout
  assert "1 error" in result.stdout and "skipped" not in result.stdout
  assert "shared LIDC samples missing" in result.stdout and "no_samples_here" in result.stdout


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_samples_skip_with_their_reason_elsewhere(tmp_path, ci):
  result = _run_probe(tmp_path, ci)
  assert result.returncode == 0, result.stdout + result.stderr
  # -rs (pyproject's addopts) prints the reason in the summary.
  assert "SKIPPED [1]" in result.stdout
  assert "shared LIDC samples missing" in result.stdout and "PROSONA_SHARED_DATA" in result.stdout

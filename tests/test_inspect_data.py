"""Tests of the `inspect_data` card, JSON summary, figure and command line."""

import json
import pathlib
import subprocess
import sys

import numpy as np

from prosona_jax.data import inspect as inspect_data
from prosona_jax.data.synthetic import SyntheticSource

REPO = pathlib.Path(__file__).parents[1]
KEYS = {"num_images", "num_raters", "num_patients", "patient_grouping", "fold_sizes",
        "rater_mean_area", "num_empty_masks"}


def _check_folds(summary, source):
  """Holds for any patient-grouped K=4 partition."""
  sizes = summary["fold_sizes"]
  assert len(sizes) == 4 and sum(sizes) == len(source) and min(sizes) > 0
  per_patient = len(source) // len(set(source.patient_ids))
  assert all(s % per_patient == 0 for s in sizes)  # Whole patients only.


def test_summarize_and_card_on_synthetic(tmp_path):
  source = SyntheticSource(num_images=24, num_patients=6, image_size=32)
  summary = inspect_data.summarize(source)
  assert set(summary) == KEYS
  areas = source.mask_areas()
  assert summary["num_images"] == 24 and summary["num_raters"] == 4
  assert summary["num_patients"] == 6
  np.testing.assert_allclose(summary["rater_mean_area"], areas.mean(0), atol=1e-3)
  assert summary["num_empty_masks"] == int((areas == 0).sum())
  _check_folds(summary, source)
  text = inspect_data.card(source, summary)
  assert "patients:        6 (given)" in text and "conservative" in text
  assert summary["patient_grouping"] == "given"
  picks = inspect_data.draw_examples(source, str(tmp_path / "ex.png"), 3)
  assert len(picks) == 3 and (tmp_path / "ex.png").stat().st_size > 1000


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "prosona_jax.inspect_data", *args],
                        cwd=REPO, capture_output=True, text=True, check=True)


def test_cli_synthetic_json_and_png(tmp_path):
  out = _cli("synthetic", "--format=synthetic", "--num_images=24", "--num_patients=6",
             "--image_size=32", f"--json={tmp_path / 's.json'}",
             f"--png={tmp_path / 's.png'}")
  summary = json.loads((tmp_path / "s.json").read_text())
  source = SyntheticSource(num_images=24, num_patients=6, image_size=32)
  assert summary == inspect_data.summarize(source)
  assert "images per fold" in out.stdout and (tmp_path / "s.png").exists()


def test_cli_on_the_lidc_sample(shared_data, tmp_path):
  out = _cli(str(shared_data / "data_lidc_sample.pickle"), f"--json={tmp_path / 'l.json'}")
  summary = json.loads((tmp_path / "l.json").read_text())
  assert set(summary) == KEYS
  assert summary["num_images"] == 6 and summary["num_raters"] == 4
  assert summary["num_patients"] == 6 and sum(summary["fold_sizes"]) == 6
  # The six crops come from six scans: grouping by key prefix cannot group anything.
  assert summary["patient_grouping"] == "one_per_image"
  assert "every image is its own patient" in out.stderr
  assert summary["num_empty_masks"] == 12  # 12 of the 24 real masks are empty.
  assert summary["rater_mean_area"] == sorted(summary["rater_mean_area"])  # By area.
  assert "lidc_crops" in out.stdout and "read 6 records" in out.stderr


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "prosona_jax.inspect_data", str(tmp_path / "none.npz")],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 2  # A user mistake: cli.EXIT_USER_ERROR.
  assert "none.npz" in result.stderr and "no such" in result.stderr
  assert "Traceback" not in result.stderr


def test_cli_flags_images_without_patients(tmp_path):
  path = tmp_path / "flat.npz"
  rng = np.random.default_rng(0)
  np.savez(path, images=rng.random((8, 16, 16)).astype(np.float32),
           masks=(rng.random((8, 2, 16, 16)) < 0.3).astype(np.uint8),
           keys=np.array([f"scan{i // 2}slice{i}" for i in range(8)]))  # No `_`.
  out = _cli(str(path), f"--json={tmp_path / 'f.json'}")
  assert json.loads((tmp_path / "f.json").read_text())["patient_grouping"] == "one_per_image"
  assert "patients:        8 (one_per_image (every image is its own patient" in out.stdout
  warnings = [line for line in out.stderr.splitlines() if "its own patient" in line]
  assert len(warnings) == 1 and "flat.npz" in warnings[0] and "pass patient_ids" in warnings[0]
  np.savez(path, images=rng.random((8, 16, 16)).astype(np.float32),
           masks=(rng.random((8, 2, 16, 16)) < 0.3).astype(np.uint8),
           keys=np.array([f"scan{i // 2}_slice{i}" for i in range(8)]))
  out = _cli(str(path), f"--json={tmp_path / 'f.json'}")
  assert json.loads((tmp_path / "f.json").read_text())["patient_grouping"] == "derived_from_keys"
  assert "its own patient" not in out.stderr + out.stdout

"""Tests of the scoring CLI `python -m prosona_jax.score` and its file errors."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prosona_jax import metrics
from prosona_jax import scoring as score

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def files(tmp_path):
  rng = np.random.default_rng(0)
  labels = (rng.random((5, 4, 16, 16)) < 0.3).astype(np.uint8)
  labels[0, 2:] = 0  # Empty masks, so the conventions differ.
  preds = rng.random((5, 4, 16, 16)).astype(np.float32)
  paths = {"labels": str(tmp_path / "labels.npy"), "preds": str(tmp_path / "preds.npy")}
  np.save(paths["labels"], labels)
  np.save(paths["preds"], preds)
  return paths, labels, preds


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "prosona_jax.score", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120, check=False)


def test_cli_end_to_end(files, tmp_path):
  paths, labels, preds = files
  out_json = tmp_path / "scores.json"
  proc = _cli("--labels", paths["labels"], "--preds", paths["preds"], "--convention",
              "standard", "--rank-by-area", "--json", str(out_json))
  assert proc.returncode == 0, proc.stderr
  assert "Convention: standard" in proc.stdout
  assert "raters ranked by area" in proc.stdout
  expected = metrics.score(labels, preds, convention="standard", rank_by_area=True)
  assert json.loads(out_json.read_text()) == expected
  for name, key in (("GED", "ged"), ("Dice Soft", "dice_soft"), ("Dice Match", "dice_match")):
    line = next(l for l in proc.stdout.splitlines() if l.startswith(name + " "))
    assert f"{expected['mean'][key]:.4f}" in line
  assert "Dice Each (direct)" in proc.stdout


def test_cli_error_exit_status_and_message(files, tmp_path):
  paths, _, _ = files
  missing = str(tmp_path / "missing.npy")
  proc = _cli("--labels", missing, "--preds", paths["preds"])
  assert proc.returncode == 2  # A user mistake: cli.EXIT_USER_ERROR.
  assert f"--labels: file not found: {missing}" in proc.stderr
  proc = _cli("--labels", paths["labels"], "--preds", paths["preds"], "--convention", "x")
  assert proc.returncode != 0 and "--convention" in proc.stderr


def test_run_default_convention_prints_table(files):
  paths, labels, preds = files
  buf = io.StringIO()
  result = score.run(paths["labels"], paths["preds"], out=buf)
  assert result == metrics.score(labels, preds)
  text = buf.getvalue()
  assert "Convention: dpersona" in text and "IoU 0" in text
  assert "Dice Each (matched)" in text and "r4" in text


def test_run_many_samples_omits_direct(files, tmp_path):
  paths, labels, _ = files
  preds10 = np.random.default_rng(1).random((5, 10, 16, 16))
  p = str(tmp_path / "p10.npy")
  np.save(p, preds10)
  buf = io.StringIO()
  out_json = str(tmp_path / "s.json")
  score.run(paths["labels"], p, json_path=out_json, out=buf)
  with open(out_json) as f:
    data = json.load(f)
  assert "dice_each_direct" not in data["mean"]
  assert len(data["per_image"]) == 5
  assert "10 predictions each" in buf.getvalue()


def _write(path, content):
  with open(path, "wb") as f:
    f.write(content)
  return str(path)


@pytest.mark.parametrize("which", ["labels", "preds"])
def test_file_errors_name_the_file(files, tmp_path, which):
  paths, labels, preds = files
  other = "preds" if which == "labels" else "labels"
  cases = []
  cases.append((str(tmp_path / "nope.npy"), "file not found"))
  cases.append((_write(tmp_path / "text.npy", b"not an array\n"), "is not an .npy file"))
  npz = str(tmp_path / "arr.npz")
  np.savez(npz, a=labels)
  cases.append((npz, "is an .npz archive"))
  cases.append((str(tmp_path), "is a folder"))
  truncated = _write(tmp_path / "trunc.npy", open(paths[which], "rb").read()[:200])
  cases.append((truncated, "cannot load"))
  flat = str(tmp_path / "flat.npy")
  np.save(flat, labels[:, 0])
  cases.append((flat, "expected 4 dimensions"))
  for bad, message in cases:
    args = dict(paths)
    args[which] = bad
    with pytest.raises(score.ScoreFileError) as e:
      score.run(args["labels"], args["preds"], out=io.StringIO())
    assert f"--{which}" in str(e.value) and bad in str(e.value), str(e.value)
    assert message in str(e.value)
    assert f"--{other}" not in str(e.value) or message == "expected 4 dimensions"


def test_shape_mismatch_and_value_errors_name_both_files(files, tmp_path):
  paths, labels, preds = files
  fewer = str(tmp_path / "fewer.npy")
  np.save(fewer, preds[:3])
  with pytest.raises(score.ScoreFileError, match=r"has 3 images .* has 5"):
    score.run(paths["labels"], fewer, out=io.StringIO())
  small = str(tmp_path / "small.npy")
  np.save(small, preds[:, :, :8])
  with pytest.raises(score.ScoreFileError, match=r"8 x 16 .* 16 x 16"):
    score.run(paths["labels"], small, out=io.StringIO())
  nan = str(tmp_path / "nan.npy")
  bad = preds.copy()
  bad[0, 0, 0, 0] = np.nan
  np.save(nan, bad)
  with pytest.raises(ValueError, match=r"NaN") as e:
    score.run(paths["labels"], nan, out=io.StringIO())
  assert nan in str(e.value) and paths["labels"] in str(e.value)
  scaled = str(tmp_path / "255.npy")
  np.save(scaled, labels * 255)
  with pytest.raises(ValueError, match=r"\{0, 1\}") as e:
    score.run(scaled, paths["preds"], out=io.StringIO())
  assert scaled in str(e.value)
  with pytest.raises(ValueError, match=r"convention must be one of"):
    score.run(paths["labels"], paths["preds"], convention="phiseg", out=io.StringIO())


def test_unwritable_json(files, tmp_path):
  paths, _, _ = files
  target = str(tmp_path / "no_such_dir" / "s.json")
  with pytest.raises(score.ScoreFileError, match=r"--json: cannot write"):
    score.run(paths["labels"], paths["preds"], json_path=target, out=io.StringIO())

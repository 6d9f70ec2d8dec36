r"""Scores saved predictions against multi-rater labels (every metric of docs/metrics.md).

Usage:
  python -m prosona_jax.score --labels L.npy --preds P.npy \
      [--convention dpersona|standard] [--rank-by-area] [--json FILE]

`L.npy` holds the rater masks (N, R, H, W) in {0, 1}; `P.npy` the predicted probabilities
(N, S, H, W) in [0, 1] (S prior samples, or one prediction per rater ordered like the
raters). The mean of each metric is printed as a table, with the convention it uses; `--json`
also writes the per-image values (`prosona_jax.metrics.score`'s dict).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence, TextIO

import numpy as np

from prosona_jax import metrics

# What each convention means, for the printed table: published numbers depend on it.
_CONVENTION_NOTES = {
    "dpersona": "D-Persona/ProSona tables; two empty masks: IoU 0 (distance 1), Dice 1",
    "standard": "Probabilistic U-Net/PHiSeg; two empty masks: IoU 1 (distance 0), Dice 1",
}
_LABELS = {
    "ged": "GED",
    "dice_soft": "Dice Soft",
    "dice_max": "Dice Max",
    "dice_max_reverse": "Dice Max (reverse)",
    "dice_match": "Dice Match",
    "dice_each_matched": "Dice Each (matched)",
    "dice_each_direct": "Dice Each (direct)",
}
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


class ScoreFileError(ValueError):
  """An input or output file of the scoring CLI is missing, unreadable or malformed."""


def load_array(path: str, *, flag: str) -> np.ndarray:
  """Loads one array from an .npy file, memory-mapped (test sets of samples are large).

  Args:
    path: the file.
    flag: name of the command-line flag that gave it, for error messages.

  Returns:
    The array (read-only memory map).

  Raises:
    ScoreFileError: the file is missing, a folder, not an .npy file, or unreadable.
  """
  if not os.path.exists(path):
    raise ScoreFileError(f"--{flag}: file not found: {path}")
  if os.path.isdir(path):
    raise ScoreFileError(f"--{flag}: {path} is a folder; expected an .npy file")
  try:
    with open(path, "rb") as f:
      head = f.read(len(_NPY_MAGIC))
  except OSError as e:
    raise ScoreFileError(f"--{flag}: cannot read {path}: {e}") from e
  if head.startswith(_ZIP_MAGIC):
    raise ScoreFileError(f"--{flag}: {path} is an .npz archive; expected a single array "
                         "saved with numpy.save (.npy)")
  if head != _NPY_MAGIC:
    raise ScoreFileError(f"--{flag}: {path} is not an .npy file (no .npy header); expected "
                         "an array saved with numpy.save")
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ScoreFileError(f"--{flag}: cannot load {path} as an .npy array (truncated, "
                         f"corrupt or an object array?): {e}") from e


def _check_shapes(labels: np.ndarray, preds: np.ndarray, labels_path: str,
                  preds_path: str) -> None:
  """Checks the shapes of the loaded arrays, naming the files that are wrong."""
  if labels.ndim != 4:
    raise ScoreFileError(f"--labels: {labels_path} holds an array of shape {labels.shape}; "
                         "expected 4 dimensions (N, R, H, W) = (images, raters, height, width)")
  if preds.ndim != 4:
    raise ScoreFileError(f"--preds: {preds_path} holds an array of shape {preds.shape}; "
                         "expected 4 dimensions (N, S, H, W) = (images, samples, height, width)")
  if preds.shape[0] != labels.shape[0]:
    raise ScoreFileError(f"--preds: {preds_path} has {preds.shape[0]} images (shape "
                         f"{preds.shape}) but --labels {labels_path} has {labels.shape[0]} "
                         f"(shape {labels.shape})")
  if preds.shape[2:] != labels.shape[2:]:
    raise ScoreFileError(f"--preds: {preds_path} images are {preds.shape[2]} x "
                         f"{preds.shape[3]} but --labels {labels_path} images are "
                         f"{labels.shape[2]} x {labels.shape[3]}")


def format_table(result: dict[str, Any], *, num_images: int, num_raters: int,
                 num_samples: int, rank_by_area: bool = False) -> str:
  """Renders the mean metrics of a `metrics.score` result as a readable table.

  Args:
    result: the dict returned by `metrics.score`.
    num_images: N.
    num_raters: R.
    num_samples: S.
    rank_by_area: whether raters were ranked by area (shown in the header).

  Returns:
    The table, lines joined by newlines, without a trailing newline.
  """
  convention = result["convention"]
  lines = [
      f"Scored {num_images} images: {num_raters} raters, {num_samples} predictions each"
      f"{'; raters ranked by area' if rank_by_area else ''}.",
      f"Convention: {convention} ({_CONVENTION_NOTES[convention]}).",
  ]
  width = max(len(v) for v in _LABELS.values())
  lines.append(f"{'metric':<{width}}  mean")
  lines.append(f"{'-' * width}  {'-' * 6}")
  for key in metrics.METRIC_KEYS:
    if key not in result["mean"]:
      continue
    value = result["mean"][key]
    if isinstance(value, list):
      text = "  ".join(f"r{i + 1} {v:.4f}" for i, v in enumerate(value))
      text += f"  (mean {np.mean(value):.4f})"
    else:
      # Rounding noise of an exact 0 (e.g. GED of identical sets) must not print as -0.0000.
      text = f"{0.0 if abs(value) < 5e-5 else value:.4f}"
    lines.append(f"{_LABELS[key]:<{width}}  {text}")
  mean = result["mean"]
  if "dice_each_matched" not in mean:
    lines.append("(Dice Each omitted: fewer predictions than raters.)")
  elif "dice_each_direct" not in mean:
    lines.append("(Dice Each direct only when predictions = raters, one per rater.)")
  return "\n".join(lines)


def run(labels_path: str, preds_path: str, *, convention: str = "dpersona",
        rank_by_area: bool = False, json_path: str | None = None,
        out: TextIO | None = None) -> dict[str, Any]:
  """Loads, scores, prints the table and optionally writes the JSON.

  Args:
    labels_path: .npy file of the rater masks (N, R, H, W).
    preds_path: .npy file of the probabilities (N, S, H, W).
    convention: `dpersona` or `standard`.
    rank_by_area: sort each image's raters by ascending area before scoring.
    json_path: where to write the result as JSON; None writes nothing.
    out: stream for the table (default: stdout).

  Returns:
    The `metrics.score` result.

  Raises:
    ScoreFileError: a file is missing, malformed or of the wrong shape, or the JSON cannot
      be written.
    ValueError: invalid values (labels not binary, preds outside [0, 1] or NaN) or an
      unknown convention; the message names the files.
  """
  out = sys.stdout if out is None else out
  metrics.check_convention(convention)  # Fail before reading large files.
  labels = load_array(labels_path, flag="labels")
  preds = load_array(preds_path, flag="preds")
  _check_shapes(labels, preds, labels_path, preds_path)
  try:
    result = metrics.score(labels, preds, convention=convention, rank_by_area=rank_by_area)
  except ValueError as e:
    raise ValueError(f"{e} [--labels {labels_path}, --preds {preds_path}]") from e
  print(format_table(result, num_images=labels.shape[0], num_raters=labels.shape[1],
                     num_samples=preds.shape[1], rank_by_area=rank_by_area), file=out)
  if json_path:
    try:
      with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    except OSError as e:
      raise ScoreFileError(f"--json: cannot write {json_path}: {e}") from e
    print(f"Wrote {json_path}", file=out)
  return result


def define_flags() -> None:
  """Defines the CLI flags (only when run as a program, so importing adds no flags)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("labels", None, ".npy file of rater masks (N, R, H, W) in {0, 1}.")
  flags.DEFINE_string("preds", None, ".npy file of probabilities (N, S, H, W) in [0, 1].")
  flags.DEFINE_enum("convention", "dpersona", list(metrics.CONVENTIONS),
                    "What empty masks are worth: dpersona (the D-Persona/ProSona tables) or "
                    "standard (Probabilistic U-Net/PHiSeg); see docs/metrics.md.")
  flags.DEFINE_bool("rank_by_area", False,
                    "Sort each image's raters by ascending area before scoring.")
  flags.DEFINE_alias("rank-by-area", "rank_by_area")
  flags.DEFINE_string("json", None, "Also write the per-image and mean metrics here.")
  flags.mark_flags_as_required(["labels", "preds"])


def main(argv: Sequence[str]) -> int:
  """absl entry point: scores the files named by the flags; returns the exit status."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    print(f"score: error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    return 2
  f = flags.FLAGS
  try:
    run(f.labels, f.preds, convention=f.convention, rank_by_area=f.rank_by_area,
        json_path=f.json)
  except ValueError as e:  # ScoreFileError is a ValueError too.
    print(f"score: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  define_flags()
  app.run(main)

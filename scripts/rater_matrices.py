"""Rater x prediction Dice matrices of finished runs (the `prompt_rater_dice` of ProSona's
Stage 2, the `prediction_rater_dice` of methods whose predictions stand for raters).

  python scripts/rater_matrices.py runs/table1_demo

Row i: the prediction made for rater i (a prompt, a head, a per-rater U-Net); column j:
its mean Dice against rater j's masks on the test fold. A method that personalises has
its largest value of each row on the diagonal.
"""

import glob
import json
import os
import sys


def _matrices(run: str):
  for path in sorted(glob.glob(os.path.join(run, "eval", "*_fold*.json"))):
    with open(path, encoding="utf-8") as f:
      result = json.load(f)
    mean = result.get("mean", {})
    matrix = mean.get("prompt_rater_dice") or mean.get("prediction_rater_dice")
    if matrix:
      yield os.path.basename(path)[:-5], result.get("num_predictions"), matrix


def main(argv):
  if len(argv) != 2 or not os.path.isdir(argv[1]):
    sys.exit("usage: python scripts/rater_matrices.py RUNS_DIR (a folder of run folders)")
  unet_rows = []
  for run in sorted(glob.glob(os.path.join(argv[1], "*", ""))):
    for name, _, matrix in _matrices(run):
      if name.startswith("unet_a"):  # One prediction per run: a row of the joint matrix.
        unet_rows.append(matrix[0])
        continue
      _print(f"{os.path.basename(run.rstrip('/'))}: {name}", matrix)
  if unet_rows:
    _print("unet: one U-Net per rater (rows unet_a1..)", unet_rows)


def _print(title, matrix):
  print(f"\n{title}")
  print("         " + "".join(f"  rater{j + 1}" for j in range(len(matrix[0]))))
  for i, row in enumerate(matrix):
    best = max(range(len(row)), key=row.__getitem__)
    cells = "".join(f"  {v:6.3f}{'*' if j == best else ' '}" for j, v in enumerate(row))
    print(f"  pred{i + 1}{cells}")


if __name__ == "__main__":
  main(sys.argv)

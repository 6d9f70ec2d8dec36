"""The results table over runs (`python -m prosona_jax.table`): one row per method.

Reads every `eval/<stage>_fold<k>.json` of the given run directories (the scoring CLI's
schema plus `stage`, `fold` and `method`), groups them into rows and writes
`table.md`, `table.csv` and `table.json`.

Rows: one per method, from its tested stage: ProSona's Stage 2 (row `prosona`),
D-Persona's heads (`dpersona`), every U-Net rater (`unet_a1`..), the baselines, their
variants (`cm_global_2class`); with `stage1=True` also the Stage-1 models
(`prosona_stage1`). Cells are the mean ± std (ddof 0) over the folds present; the row
says how many. A column that does not apply is "-": Dice Match and both Mean Dice need
a prediction per rater (a single U-Net has one prediction per image), the direct Mean
Dice needs predictions that stand for raters in order (not samples).

Mean Dice, both definitions: matched = the mean over raters of the Dice with the
prediction the Hungarian assignment gives each (D-Persona's code; equals Dice Match),
direct = the mean over raters r of the Dice of prediction r with rater r.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
from typing import Any

import numpy as np

from prosona_jax import published as published_lib
from prosona_jax.errors import UserError

COLUMNS = (
    ("ged", "GED"),
    ("dice_soft", "Dice Soft"),
    ("dice_max", "Dice Max"),
    ("dice_max_reverse", "Dice Max (rev.)"),
    ("dice_match", "Dice Match"),
    ("mean_dice_matched", "Mean Dice (matched)"),
    ("mean_dice_direct", "Mean Dice (direct)"),
)
# Where a published column goes (published.py says why).
PUBLISHED_COLUMNS = {"ged": "ged", "dice_soft": "dice_soft", "dice_max": "dice_max_reverse",
                     "dice_match": "dice_match", "mean_dice": "mean_dice_direct"}
# Table 1's order; other rows follow, alphabetically.
ORDER = ("unet_a1", "unet_a2", "unet_a3", "unet_a4", "cm_global", "cm_pixel", "tab",
         "pionono", "dpersona", "prosona")
_EVAL_FILE = re.compile(r"^(?P<stage>.+)_fold(?P<fold>\d+)\.json$")


class TableError(UserError, ValueError):
  """A run directory or eval file the table cannot use."""


def row_label(result: dict, *, stage1: bool = False) -> str | None:
  """The row an eval result belongs to, or None when it is not tabulated.

  ProSona's and D-Persona's Stage 1 make the `<method>_stage1` row (only with `stage1`);
  ProSona's Stage 2 the `prosona` row; any other stage its own name (`unet_a1`,
  `cm_global_2class`, `dpersona`, ...).
  """
  stage = result["stage"]
  method = result.get("method") or ("prosona" if stage in ("stage1", "stage2") else stage)
  if stage == "stage1":
    return f"{method}_stage1" if stage1 else None
  if stage in ("stage2", method):
    return method
  return stage


def cell_values(mean: dict) -> dict[str, float | None]:
  """The table's values of one result's means; None where a column does not apply."""
  matched, direct = mean.get("dice_each_matched"), mean.get("dice_each_direct")
  return {
      "ged": mean["ged"], "dice_soft": mean["dice_soft"], "dice_max": mean["dice_max"],
      "dice_max_reverse": mean["dice_max_reverse"],
      "dice_match": mean["dice_match"] if matched is not None else None,
      "mean_dice_matched": float(np.mean(matched)) if matched is not None else None,
      "mean_dice_direct": float(np.mean(direct)) if direct is not None else None,
  }


def _expand(paths: list[str]) -> list[str]:
  out = []
  for p in paths:
    matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
    if not matches:
      raise TableError(f"{p}: no run directory matches")
    out.extend(matches)
  return out


def read_results(run_dirs: list[str]) -> list[tuple[str, dict]]:
  """(path, result) of every eval JSON in the run directories (globs expanded)."""
  if not run_dirs:
    raise TableError("name at least one run directory (e.g. runs/prosona runs/unet)")
  found = []
  for run_dir in _expand(run_dirs):
    eval_dir = os.path.join(run_dir, "eval")
    if not os.path.isdir(run_dir):
      raise TableError(f"{run_dir}: no such run directory")
    if not os.path.isdir(eval_dir):
      raise TableError(f"{run_dir}: no eval/ folder (has the run finished a stage?)")
    for name in sorted(os.listdir(eval_dir)):
      match = _EVAL_FILE.match(name)
      if not match:
        continue
      path = os.path.join(eval_dir, name)
      try:
        with open(path) as f:
          result = json.load(f)
      except (OSError, ValueError) as e:
        raise TableError(f"{path}: not a readable eval JSON ({e})") from e
      if not isinstance(result, dict) or not {"stage", "fold", "mean"} <= set(result):
        raise TableError(f"{path}: not an eval result (needs stage, fold and mean)")
      found.append((path, result))
  if not found:
    raise TableError(f"no eval/<stage>_fold<k>.json in {' '.join(run_dirs)}")
  return found


def _sort_key(label: str) -> tuple:
  base = label.split("_2class")[0].split("_stage1")[0]
  rank = ORDER.index(base) if base in ORDER else len(ORDER)
  return (rank, label)


def build(run_dirs: list[str], *, stage1: bool = False, published: str | None = None
          ) -> dict[str, Any]:
  """The table as a dict (what `table.json` holds).

  Args:
    run_dirs: run directories or globs.
    stage1: also tabulate the Stage-1 models.
    published: add the published numbers of this dataset (`published.DATASETS`) beside
      the rows they exist for.
  """
  groups: dict[str, dict[int, tuple[str, dict]]] = {}
  for path, result in read_results(run_dirs):
    label = row_label(result, stage1=stage1)
    if label is None:
      continue
    fold = int(result["fold"])
    if fold in groups.setdefault(label, {}):
      raise TableError(f"two results for {label} fold {fold}: {groups[label][fold][0]} and "
                       f"{path}; name one run per method")
    groups[label][fold] = (path, result)
  if not groups:
    raise TableError("no tabulated result (only Stage-1 results? add --stage1)")
  pub = published_lib.table(published) if published else {}
  rows = []
  for label in sorted(groups, key=_sort_key):
    folds = sorted(groups[label])
    results = [groups[label][k][1] for k in folds]
    per_fold = [cell_values(r["mean"]) for r in results]
    values = {}
    for key, _ in COLUMNS:
      vals = [v[key] for v in per_fold]
      values[key] = (None if any(v is None for v in vals) else
                     {"mean": float(np.mean(vals)), "std": float(np.std(vals))})
    conventions = sorted({r.get("convention", "?") for r in results})
    rows.append({
        "label": label, "source": "measured", "method": results[0].get("method", label),
        "stages": sorted({r["stage"] for r in results}), "folds": folds,
        "num_folds": len(folds), "convention": ",".join(conventions), "values": values,
        "selection": [{k: r[k] for k in ("select_on", "selected_step", "select_split",
                                          "select_score") if k in r} for r in results],
        "sources": [{"path": groups[label][k][0], "fold": k,
                     "convention": r.get("convention"), "mean": r["mean"]}
                    for k, r in zip(folds, results)],
    })
    if label in pub:
      values = {key: None for key, _ in COLUMNS}
      for col, key in PUBLISHED_COLUMNS.items():
        v = pub[label][col]
        # Published Dice is in %; the table holds fractions like the eval files.
        values[key] = None if v is None else {
            "mean": v if col == "ged" else round(v / 100.0, 6), "std": None}
      rows.append({"label": f"{label} (published)", "source": "published",
                   "method": label, "folds": [], "num_folds": 4, "convention": "dpersona",
                   "values": values, "reference": published_lib.SOURCE})
  return {"columns": [{"key": k, "name": n} for k, n in COLUMNS],
          "units": "fractions as in the eval files (table.md shows Dice in %)",
          "rows": rows}


def _fmt(key: str, cell: dict | None) -> str:
  if cell is None:
    return "-"
  scale, digits = (1.0, 3) if key == "ged" else (100.0, 2)
  mean = f"{scale * cell['mean']:.{digits}f}"
  if cell["std"] is None:
    return mean
  return f"{mean} ± {scale * cell['std']:.{digits}f}"


def to_markdown(table: dict) -> str:
  head = ["method", "folds"] + [name for _, name in COLUMNS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in table["rows"]:
    folds = (f"{row['num_folds']} ({','.join(map(str, row['folds']))})"
             if row["source"] == "measured" else "4 (paper)")
    cells = [_fmt(k, row["values"][k]) for k, _ in COLUMNS]
    lines.append("| " + " | ".join([row["label"], folds] + cells) + " |")
  notes = ["Mean ± std (ddof 0) over the folds present; Dice in %. \"-\": the column does "
           "not apply (Dice Match and Mean Dice need one prediction per rater; the direct "
           "Mean Dice predictions that stand for raters in order)."]
  if any(r["source"] == "published" for r in table["rows"]):
    notes.append("Published rows: ProSona's Table 1 (no std). Its \"Dice Max\" is shown "
                 "under Dice Max (rev.) and its \"Mean Dice\" under Mean Dice (direct); "
                 "see prosona_jax/published.py.")
  return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def to_csv(table: dict) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  keys = [k for k, _ in COLUMNS]
  writer.writerow(["label", "source", "method", "num_folds", "folds", "convention"]
                  + [f"{k}_{s}" for k in keys for s in ("mean", "std")])
  for row in table["rows"]:
    cells = []
    for k in keys:
      cell = row["values"][k]
      cells += ["", ""] if cell is None else [
          repr(cell["mean"]), "" if cell["std"] is None else repr(cell["std"])]
    writer.writerow([row["label"], row["source"], row["method"], row["num_folds"],
                     " ".join(map(str, row["folds"])), row["convention"]] + cells)
  return out.getvalue()


def write(table: dict, out_dir: str) -> dict[str, str]:
  """Writes table.md, table.csv and table.json into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {ext: os.path.join(out_dir, f"table.{ext}") for ext in ("md", "csv", "json")}
  texts = {"md": to_markdown(table), "csv": to_csv(table),
           "json": json.dumps(table, indent=1)}
  for ext, path in paths.items():
    with open(path, "w") as f:
      f.write(texts[ext])
  return paths


def all_finite(table: dict) -> bool:
  """Every measured cell that applies is a finite number."""
  return all(math.isfinite(c["mean"]) and math.isfinite(c["std"])
             for r in table["rows"] if r["source"] == "measured"
             for c in r["values"].values() if c is not None)

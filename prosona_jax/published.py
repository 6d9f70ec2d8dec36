"""The published Table-1 numbers (ProSona paper; BASELINES.md section 6), as data.

Dice values are in %, GED as is; four-fold means, no std published. Keys are the row
labels of `python -m prosona_jax.table` (`results_table.row_label`). `None`: not
reported (one prediction per image). Two notes on what the columns mean:

- "Dice Max" is the reverse form (best prediction per rater, our `dice_max_reverse`):
  CM-Global's four identical predictions pin it (its Dice Max equals its Dice Match).
- "Mean Dice" is not defined in the paper: in D-Persona's code it equals Dice Match; the
  TAB, Pionono and CM-Pixel rows differ from their Dice Match, so it was probably the
  direct Dice[i, i] there. The table shows it under "Mean Dice (direct)".
"""

from __future__ import annotations

COLUMNS = ("ged", "dice_soft", "dice_max", "dice_match", "mean_dice")
SOURCE = "ProSona (Elgebaly et al., arXiv 2511.08046), Table 1"

_LIDC = {
    "unet_a1": (0.306, 86.59, 85.36, None, None),
    "unet_a2": (0.246, 88.43, 87.50, None, None),
    "unet_a3": (0.244, 88.20, 87.59, None, None),
    "unet_a4": (0.296, 85.83, 85.85, None, None),
    "cm_global": (0.243, 88.53, 87.51, 87.51, 87.51),
    "cm_pixel": (0.241, 88.64, 87.72, 87.72, 87.51),
    "tab": (0.232, 86.35, 87.11, 86.06, 85.97),
    "pionono": (0.150, 90.00, 90.10, 88.97, 88.84),
    "dpersona": (0.144, 90.31, 90.38, 89.17, 89.17),
    "prosona": (0.120, 91.56, 92.29, 90.26, 90.26),
}
_PROSTATE = {
    "dpersona": (0.158, 87.70, 90.01, 86.96, 86.96),
    "prosona": (0.146, 87.74, 90.26, 87.02, 87.03),
}
DATASETS = ("lidc", "prostate")


def table(dataset: str = "lidc") -> dict[str, dict[str, float | None]]:
  """{row label: {column: value}} of the published table of `dataset`."""
  rows = {"lidc": _LIDC, "prostate": _PROSTATE}.get(dataset)
  if rows is None:
    raise ValueError(f"No published numbers for {dataset!r}; known: {DATASETS}.")
  return {label: dict(zip(COLUMNS, values)) for label, values in rows.items()}

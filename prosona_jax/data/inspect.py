"""What a dataset holds: the summary, the text card and the example figure.

The library behind `python -m prosona_jax.inspect_data` (see its `--help`).
"""

from __future__ import annotations

import textwrap
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from prosona_jax.data.npz import ONE_PER_IMAGE, ArraySource


def summarize(source: ArraySource, *, num_folds: int = 4, seed: int = 1337) -> Dict[str, Any]:
  """The JSON summary of a source (areas come from the source, no image decoding).

  Args:
    source: Any source of `prosona_jax.data.sources`.
    num_folds: K of the patient-grouped folds.
    seed: Seed of the fold assignment.

  Returns:
    A dict with exactly the keys `num_images`, `num_raters`, `num_patients`,
    `patient_grouping`, `fold_sizes`, `rater_mean_area` and `num_empty_masks`.
  """
  from prosona_jax.data.splits import fold_indices  # pylint: disable=g-import-not-at-top
  areas = source.mask_areas()
  folds = fold_indices(source.patient_ids, num_folds=num_folds, seed=seed, level="patient")
  return {
      "num_images": len(source),
      "num_raters": source.num_raters,
      "num_patients": len(set(source.patient_ids)),
      "patient_grouping": source.patient_grouping,
      "fold_sizes": [int(len(f)) for f in folds],
      "rater_mean_area": [round(float(a), 3) for a in areas.mean(axis=0)],
      "num_empty_masks": int((areas == 0).sum()),
  }


def card(source: ArraySource, summary: Dict[str, Any]) -> str:
  """The human-readable card printed by the CLI."""
  h, w, c = source.image_shape
  order = "ascending area per image" if source.order_raters_by_area else "identity"
  areas = ", ".join(f"{a:.1f}" for a in summary["rater_mean_area"])
  total = summary["num_images"] * summary["num_raters"]
  grouping = summary["patient_grouping"]
  if grouping == ONE_PER_IMAGE:
    grouping += " (every image is its own patient; pass patient_ids)"
  lines = [
      source.describe(),
      f"  images:          {summary['num_images']} ({h}x{w}, {c} channel(s))",
      f"  raters:          {summary['num_raters']} (order: {order})",
      f"  patients:        {summary['num_patients']} ({grouping})",
      f"  images per fold: {summary['fold_sizes']}",
      f"  mean area/rater: [{areas}] pixels",
      f"  empty masks:     {summary['num_empty_masks']} of {total}",
  ]
  styles = getattr(source, "styles", None)
  if styles:
    lines += [f"  rater {k + 1}: {s}" for k, s in enumerate(styles)]
  return "\n".join(lines)


def draw_examples(source: ArraySource, path: str, num_examples: int = 4,
                  rater_names: Optional[Sequence[str]] = None) -> List[int]:
  """Draws images with each rater's mask contour (Agg backend) to `path`.

  Prefers images on which some rater drew something, evenly spread over the set. The
  legend names the raters by `figures.rater_labels`: ranks when the source orders raters
  by area, else `rater_names` (default: the source's own names, if it has any).

  Returns:
    The indices drawn.
  """
  from prosona_jax import figures  # pylint: disable=g-import-not-at-top (selects Agg)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  drawn = np.flatnonzero(source.mask_areas().sum(axis=1) > 0)
  pool = drawn if len(drawn) >= num_examples else np.arange(len(source))
  picks = [int(pool[i]) for i in np.linspace(0, len(pool) - 1, min(num_examples, len(pool))
                                             ).round().astype(int)]
  r_total = source.num_raters
  names = figures.rater_labels(rater_names or getattr(source, "rater_names", None),
                               source.order_raters_by_area, r_total)
  # Bright colours only: viridis' dark end vanished on dark lung tissue.
  colors = plt.get_cmap("turbo")(np.linspace(0.15, 0.95, r_total))
  # Constrained layout keeps the titles and the legend inside the saved figure.
  fig, axes = plt.subplots(1, len(picks), figsize=(3 * len(picks), 3.6), squeeze=False,
                           layout="constrained")
  for ax, index in zip(axes[0], picks):
    item = source[index]
    image = item["image"]
    ax.imshow(image[..., 0] if image.shape[-1] != 3 else image, cmap="gray")
    for r in range(r_total):
      if item["masks"][r].any():
        ax.contour(item["masks"][r], levels=[0.5], colors=[colors[r]], linewidths=1)
    # Keys can be longer than a panel is wide (about 40 characters at 8 pt).
    ax.set_title(textwrap.fill(str(item["key"]), 40), fontsize=8)
    ax.axis("off")
  handles = [plt.Line2D([], [], color=colors[r], label=names[r]) for r in range(r_total)]
  fig.legend(handles=handles, loc="outside lower center", ncol=min(r_total, 4), fontsize=8)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return picks

"""Figures written to `WORKDIR/eval/`: sampled styles, prompt panels, interpolation strips."""

import textwrap
from typing import Sequence

from etils import epath
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def _show(ax, image_HWC, mask_HW=None, title=None, color=(1.0, 0.2, 0.2)):
  img = np.asarray(image_HWC, np.float32)
  img = img[..., 0] if img.ndim == 3 else img
  ax.imshow(img, cmap="gray", vmin=0.0, vmax=max(1e-6, float(img.max())))
  if mask_HW is not None:
    m = np.asarray(mask_HW) > 0.5
    overlay = np.zeros(m.shape + (4,), np.float32)
    overlay[m] = (*color, 0.45)
    ax.imshow(overlay)
    if m.any():
      ax.contour(m.astype(np.float32), levels=[0.5], colors=[color], linewidths=0.8)
  if title:
    ax.set_title(title, fontsize=7)
  ax.set_axis_off()


def rater_labels(rater_names: Sequence[str] | None, order_raters_by_area: bool,
                 num_raters: int | None = None) -> list[str]:
  """What to call each rater slot in a figure.

  When raters are ranked per image by area (LIDC), slot i holds the i-th smallest mask of
  each image, drawn by different people on different images, so the slot is labelled by
  its rank, not by a name. Otherwise the names are rater identities (or styles) and are
  shown as they are.

  Args:
    rater_names: names in rater order (`config.data.rater_names`), or None.
    order_raters_by_area: whether the masks were re-ordered per image by ascending area.
    num_raters: R; defaults to len(rater_names). Names are replaced by "rater i" when
      there are none or their count is not R.

  Returns:
    R labels, e.g. ["rater rank 1 (smallest)", ..., "rater rank 4 (largest)"].
  """
  r = len(rater_names) if num_raters is None and rater_names is not None else num_raters
  if r is None:
    raise ValueError("rater_labels: give rater_names or num_raters")
  if order_raters_by_area:
    labels = [f"rater rank {i + 1}" for i in range(r)]
    if r > 1:
      labels[0] += " (smallest)"
      labels[-1] += " (largest)"
    return labels
  if rater_names is None or len(rater_names) != r:
    return [f"rater {i + 1}" for i in range(r)]
  return [str(n) for n in rater_names]


def text_color(rgb: Sequence[float]) -> str:
  """"black" or "white", whichever contrasts more with a background colour.

  Uses the relative luminance of sRGB (WCAG 2): black text has the higher contrast ratio
  exactly when the luminance exceeds about 0.179, so light colours (viridis' yellow) get
  black text and dark ones white.

  Args:
    rgb: red, green, blue in [0, 1] (an alpha channel, if present, is ignored).
  """
  c = np.clip(np.asarray(rgb, np.float64)[:3], 0.0, 1.0)
  linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
  luminance = float(linear @ np.array([0.2126, 0.7152, 0.0722]))
  # Contrast ratios (L1 + 0.05) / (L2 + 0.05) against black (L = 0) and white (L = 1).
  return "black" if (luminance + 0.05) / 0.05 > 1.05 / (luminance + 0.05) else "white"


def save(fig, path: str, dpi: int = 110) -> str:
  """Saves and closes `fig`; local or gs:// path (etils.epath), format from the suffix."""
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("wb") as f:
    fig.savefig(f, format=out.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return path


def samples_panel(images, labels, preds, keys: Sequence[str], path: str,
                  rater_names: Sequence[str] | None = None, max_rows: int = 4, *,
                  order_raters_by_area: bool = False) -> str:
  """One row per image: the image, every rater's mask, then the samples by ascending area.

  Sorting samples by area lays them out from the most conservative to the most inclusive
  hypothesis, so a reader sees at a glance whether the latent space spans the raters.
  Rater columns are labelled by `rater_labels` (ranks when `order_raters_by_area`).
  """
  n = min(max_rows, len(images))
  r, s = labels.shape[1], preds.shape[1]
  names = [_wrap(t, 14) for t in rater_labels(rater_names, order_raters_by_area, r)]
  fig, axes = plt.subplots(n, 1 + r + s, figsize=(1.3 * (1 + r + s), 1.4 * n), squeeze=False,
                           layout="constrained")
  for row in range(n):
    _show(axes[row, 0], images[row], title=str(keys[row]))
    for j in range(r):
      _show(axes[row, 1 + j], images[row], labels[row, j], names[j] if row == 0 else None,
            color=(0.2, 0.9, 0.2))
    binary = preds[row] > 0.5
    order = np.argsort(binary.reshape(s, -1).sum(-1), kind="stable")
    for j, k in enumerate(order):
      _show(axes[row, 1 + r + j], images[row], binary[k],
            f"sample ({binary[k].sum()} px)" if row == 0 else f"{binary[k].sum()} px")
  fig.suptitle("Prior samples, ordered by area (green: raters, red: samples)", fontsize=8)
  return save(fig, path)


def prompt_panel(images, labels, preds, keys: Sequence[str], prompts: Sequence[str], path: str,
                 rater_names: Sequence[str] | None = None, max_rows: int = 4, *,
                 order_raters_by_area: bool = False) -> str:
  """The paper's Fig. 3: image, every rater, union, intersection, one prediction per prompt.

  Rater columns are labelled by `rater_labels` (ranks when `order_raters_by_area`).
  """
  n = min(max_rows, len(images))
  r, p = labels.shape[1], preds.shape[1]
  names = [_wrap(t, 14) for t in rater_labels(rater_names, order_raters_by_area, r)]
  cols = 1 + r + 2 + p
  # Constrained layout makes room for the suptitle above the three-line prompt headings,
  # which a fixed suptitle position ran into when the figure has only a row or two.
  fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.5 * n), squeeze=False,
                           layout="constrained")
  for row in range(n):
    lab = labels[row] > 0.5
    _show(axes[row, 0], images[row], title=str(keys[row]))
    for j in range(r):
      _show(axes[row, 1 + j], images[row], lab[j], names[j] if row == 0 else None,
            color=(0.2, 0.9, 0.2))
    _show(axes[row, 1 + r], images[row], lab.any(0), "union" if row == 0 else None,
          color=(0.2, 0.6, 1.0))
    _show(axes[row, 2 + r], images[row], lab.all(0), "intersection" if row == 0 else None,
          color=(0.2, 0.6, 1.0))
    for j in range(p):
      title = _wrap(prompts[j], max_lines=4) if row == 0 else None
      _show(axes[row, 3 + r + j], images[row], preds[row, j] > 0.5, title)
  fig.suptitle("Raters (green) and the prediction for each rater's prompt (red)", fontsize=8)
  return save(fig, path)


def interpolation_strip(image, probs_THW, alphas: Sequence[float], prompt_a: str,
                        prompt_b: str, path: str, *, image_name: str | None = None) -> str:
  """The paper's Fig. 4: masks moving from prompt A to prompt B.

  Args:
    image: (H, W[, C]) the image every mask is drawn on.
    probs_THW: one probability map per step.
    alphas: the step positions t in [0, 1] (0: prompt A, 1: prompt B).
    prompt_a: the prompt at t = 0.
    prompt_b: the prompt at t = 1.
    path: output file (local or gs://).
    image_name: which image this is (a dataset key or file name), shown in the title.
  """
  t = len(alphas)
  fig, axes = plt.subplots(1, t, figsize=(1.4 * t, 1.8), squeeze=False, layout="constrained")
  for j, a in enumerate(alphas):
    m = np.asarray(probs_THW[j]) > 0.5
    _show(axes[0, j], image, m, f"t={a:.2f}\n{int(m.sum())} px")
  title = f"'{prompt_a}'  ->  '{prompt_b}'"
  if image_name:
    title = f"{image_name}: {title}"
  # About 14 characters of 8-pt text per inch of figure width.
  fig.suptitle(textwrap.fill(title, max(40, int(14 * 1.4 * t))), fontsize=8)
  return save(fig, path)


def heatmap(values_AB, alphas: Sequence[float], betas: Sequence[float], path: str,
            title: str = "GED") -> str:
  """The paper's Fig. 5: a metric over the (alpha, beta) grid."""
  values = np.asarray(values_AB, np.float64)
  fig, ax = plt.subplots(figsize=(3.6, 3.0))
  im = ax.imshow(values, cmap="viridis_r", origin="lower")
  ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
  ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
  ax.set_xlabel("beta (L_sim)")
  ax.set_ylabel("alpha (L_text)")
  for i in range(values.shape[0]):
    for j in range(values.shape[1]):
      # Text colour per cell: white on viridis' yellow end (the best cell) is unreadable.
      rgba = im.cmap(im.norm(values[i, j]))  # A NaN cell is transparent: white paper.
      ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=7,
              color=text_color(rgba) if rgba[3] > 0 else "black")
  fig.colorbar(im, ax=ax)
  ax.set_title(title, fontsize=9)
  return save(fig, path)


def _wrap(text: str, width: int = 18, max_lines: int = 3) -> str:
  words, lines, cur = text.split(), [], ""
  for w in words:
    if cur and len(cur) + 1 + len(w) > width:
      lines.append(cur)
      cur = w
    else:
      cur = f"{cur} {w}".strip()
  lines.append(cur)
  if len(lines) > max_lines:  # Say that the text goes on rather than cut it off unmarked.
    lines = lines[:max_lines - 1] + [lines[max_lines - 1] + " ..."]
  return "\n".join(lines)

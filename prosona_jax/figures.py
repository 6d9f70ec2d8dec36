"""Figures written to `WORKDIR/eval/`: sampled styles, prompt panels, interpolation strips."""

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


def save(fig, path: str, dpi: int = 110) -> str:
  """Saves and closes `fig`; local or gs:// path (etils.epath), format from the suffix."""
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("wb") as f:
    fig.savefig(f, format=out.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return path


def samples_panel(images, labels, preds, keys: Sequence[str], path: str,
                  rater_names: Sequence[str] | None = None, max_rows: int = 4) -> str:
  """One row per image: the image, every rater's mask, then the samples by ascending area.

  Sorting samples by area lays them out from the most conservative to the most inclusive
  hypothesis, so a reader sees at a glance whether the latent space spans the raters.
  """
  n = min(max_rows, len(images))
  r, s = labels.shape[1], preds.shape[1]
  names = list(rater_names or [f"rater {i + 1}" for i in range(r)])
  fig, axes = plt.subplots(n, 1 + r + s, figsize=(1.3 * (1 + r + s), 1.4 * n), squeeze=False)
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
                 rater_names: Sequence[str] | None = None, max_rows: int = 4) -> str:
  """The paper's Fig. 3: image, every rater, union, intersection, one prediction per prompt."""
  n = min(max_rows, len(images))
  r, p = labels.shape[1], preds.shape[1]
  names = list(rater_names or [f"rater {i + 1}" for i in range(r)])
  cols = 1 + r + 2 + p
  fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.5 * n), squeeze=False)
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
      title = _wrap(prompts[j]) if row == 0 else None
      _show(axes[row, 3 + r + j], images[row], preds[row, j] > 0.5, title)
  fig.suptitle("Raters (green) and the prediction for each rater's prompt (red)", fontsize=8)
  return save(fig, path)


def interpolation_strip(image, probs_THW, alphas: Sequence[float], prompt_a: str,
                        prompt_b: str, path: str) -> str:
  """The paper's Fig. 4: masks moving from prompt A to prompt B."""
  t = len(alphas)
  fig, axes = plt.subplots(1, t, figsize=(1.4 * t, 1.8), squeeze=False)
  for j, a in enumerate(alphas):
    m = np.asarray(probs_THW[j]) > 0.5
    _show(axes[0, j], image, m, f"t={a:.2f}\n{int(m.sum())} px")
  fig.suptitle(f"'{prompt_a}'  ->  '{prompt_b}'", fontsize=8)
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
      ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=7, color="w")
  fig.colorbar(im, ax=ax)
  ax.set_title(title, fontsize=9)
  return save(fig, path)


def _wrap(text: str, width: int = 18) -> str:
  words, lines, cur = text.split(), [], ""
  for w in words:
    if cur and len(cur) + 1 + len(w) > width:
      lines.append(cur)
      cur = w
    else:
      cur = f"{cur} {w}".strip()
  lines.append(cur)
  return "\n".join(lines[:3])

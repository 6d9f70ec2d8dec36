"""Multi-rater segmentation metrics: GED, Dice Soft, Dice Max, Dice Match, Dice Each.

The definitions are those of `docs/metrics.md`. For one image, `labels` are R binary rater
masks and `preds` are S probability maps; a prediction is binarised with the strict test
`p > 0.5`. Every metric takes a `convention` for what empty masks are worth:

- `dpersona` (D-Persona / ProSona tables): IoU = |A & B| / (|A | B| + 1e-8), so two empty
  masks (also an empty mask with itself) have IoU 0 and distance 1; Dice =
  (2 |A & B| + 1e-8) / (|A| + |B| + 1e-8), so two empty masks have Dice 1.
- `standard` (Probabilistic U-Net TF code, PHiSeg): two empty masks have IoU 1 and Dice 1,
  otherwise IoU = |A & B| / |A | B| and Dice = 2 |A & B| / (|A| + |B|).

Everything is vectorised with numpy: masks are flattened, and the foreground counts of every
pair of masks of an image come from one batched float32 Gram matrix (exact, as the entries
are 0/1 and the counts stay below 2**24). Only the Hungarian assignment of Dice Match runs
per image, on an R x S matrix.

The per-metric functions take `labels` (N, R, H, W) in {0, 1} and `preds` (N, S, H, W) in
[0, 1], keyword-only options, and return one value per image (`reduction="none"`, an array of
shape (N,) or (N, R)) or the mean over images (`reduction="mean"`). `score` computes them all
in one pass and returns plain Python numbers, ready for JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from scipy import optimize

# The columns of every results table (summary.md, grid.md, validation logs).
SUMMARY_KEYS = ("ged", "dice_soft", "dice_max", "dice_max_reverse", "dice_match")
CONVENTIONS = ("dpersona", "standard")
# Fixed by docs/metrics.md (and by D-Persona's `dice_at_thresh`).
DICE_SOFT_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Predictions are foreground where p > BINARY_THRESHOLD (strict).
BINARY_THRESHOLD = 0.5
# The smoothing constant of the `dpersona` IoU and Dice.
EPS = 1e-8
# Metric keys of `score`, in display order.
METRIC_KEYS = ("ged", "dice_soft", "dice_max", "dice_max_reverse", "dice_match",
               "dice_each_matched", "dice_each_direct")
REDUCTIONS = ("none", "mean")

# Mask elements held in memory at once while forming Gram matrices (16 Mi floats, 64 MB):
# bounds memory for a whole test set and keeps each chunk's matrices cache-friendly.
_CHUNK_ELEMENTS = 1 << 24
# float32 sums of 0/1 values are exact below 2**24.
_FLOAT32_EXACT = 1 << 24


# ----------------------------------------------------------------------------- validation


def _as_numeric(x: Any, name: str) -> np.ndarray:
  """Returns `x` as a numpy array of bools, integers or floats, or raises ValueError."""
  try:
    arr = np.asarray(x)
  except Exception as e:  # noqa: BLE001 - any failure means "not an array".
    raise ValueError(f"{name} must be an array, got {type(x).__name__}: {e}") from e
  if arr.dtype.kind not in "biuf":
    raise ValueError(f"{name} must hold numbers (bool, int or float), got dtype {arr.dtype}")
  return arr


def check_convention(convention: str) -> str:
  """Returns `convention` if it is one of CONVENTIONS, else raises ValueError."""
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {', '.join(map(repr, CONVENTIONS))}, "
                     f"got {convention!r}")
  return convention


def _check_reduction(reduction: str) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, "
                     f"got {reduction!r}")


def check_labels(labels: Any) -> np.ndarray:
  """Validates rater masks.

  Args:
    labels: (N, R, H, W) array of binary masks, values in {0, 1} (any bool, int or float
      dtype).

  Returns:
    `labels` as a numpy array (not copied when it already is one).

  Raises:
    ValueError: wrong number of dimensions, an empty axis, or values other than 0 and 1.
  """
  arr = _as_numeric(labels, "labels")
  if arr.ndim != 4:
    raise ValueError("labels must have 4 dimensions (N, R, H, W) = (images, raters, height, "
                     f"width); got {arr.ndim} dimensions, shape {arr.shape}")
  if 0 in arr.shape:
    raise ValueError(f"labels must not have an empty axis; got shape {arr.shape}")
  if arr.dtype.kind == "b":
    return arr
  if arr.dtype.kind == "u":
    ok = arr.max() <= 1  # One pass; enough for unsigned integers.
  elif arr.dtype.kind == "i":
    ok = arr.min() >= 0 and arr.max() <= 1
  else:
    ok = False  # Floats need the full test below (it also rejects NaN).
  if not ok:
    bad = (arr != 0) & (arr != 1)
    if bad.any():
      examples = np.unique(arr[bad])[:5].tolist()
      hint = " (0/255 masks: pass masks > 0)" if 255 in examples else ""
      shown = ", ".join(f"{v:.4g}" for v in examples)
      raise ValueError(f"labels must be binary masks with values in {{0, 1}}; found "
                       f"{int(bad.sum())} other values, e.g. {shown}{hint}")
  return arr


def check_preds(preds: Any, labels_shape: Sequence[int]) -> np.ndarray:
  """Validates prediction maps against the shape of the labels they are scored on.

  Args:
    preds: (N, S, H, W) probabilities in [0, 1] (bool, int or float dtype).
    labels_shape: shape (N, R, H, W) of the labels.

  Returns:
    `preds` as a numpy array (not copied when it already is one).

  Raises:
    ValueError: wrong number of dimensions, N or H, W unlike the labels', no samples,
      NaN, or values outside [0, 1].
  """
  arr = _as_numeric(preds, "preds")
  if arr.ndim != 4:
    raise ValueError("preds must have 4 dimensions (N, S, H, W) = (images, samples, height, "
                     f"width); got {arr.ndim} dimensions, shape {arr.shape}")
  if arr.shape[0] != labels_shape[0]:
    raise ValueError(f"preds and labels must hold the same number of images N; preds has "
                     f"{arr.shape[0]} (shape {arr.shape}), labels has {labels_shape[0]} "
                     f"(shape {tuple(labels_shape)})")
  if tuple(arr.shape[2:]) != tuple(labels_shape[2:]):
    raise ValueError(f"preds and labels must have the same image size H x W; preds are "
                     f"{arr.shape[2]} x {arr.shape[3]}, labels are {labels_shape[2]} x "
                     f"{labels_shape[3]}")
  if arr.shape[1] == 0:
    raise ValueError(f"preds must hold at least one sample per image; got shape {arr.shape}")
  lo, hi = arr.min(), arr.max()
  if arr.dtype.kind == "f" and (np.isnan(lo) or np.isnan(hi)):
    raise ValueError(f"preds must not contain NaN; found {int(np.isnan(arr).sum())} NaN "
                     "values")
  if lo < 0 or hi > 1:
    raise ValueError(f"preds must be probabilities in [0, 1]; found values in [{lo}, {hi}] "
                     "(apply a sigmoid to logits first)")
  return arr


def _check_pair(labels: Any, preds: Any) -> tuple[np.ndarray, np.ndarray]:
  labels = check_labels(labels)
  return labels, check_preds(preds, labels.shape)


def _check_all(labels: Any, preds: Any, convention: str,
               reduction: str = "none") -> tuple[np.ndarray, np.ndarray]:
  """Validates the options first (cheap), then the arrays."""
  check_convention(convention)
  _check_reduction(reduction)
  return _check_pair(labels, preds)


# ----------------------------------------------------------------------------- helpers


def binarize(preds: Any, *, threshold: float = BINARY_THRESHOLD) -> np.ndarray:
  """Returns the boolean masks `preds > threshold` (strict, as in both reference codes)."""
  return np.asarray(preds) > threshold


def area_order(labels: Any) -> np.ndarray:
  """Returns, per image, the rater indices sorted by ascending foreground area.

  The sort is stable: raters of equal area (for instance several empty masks) keep their
  stored order, so the ranking is reproducible.

  Args:
    labels: (N, R, H, W) binary masks.

  Returns:
    (N, R) int array; `labels[n, order[n]]` has ascending areas.
  """
  return _area_order(check_labels(labels))


def _area_order(labels: np.ndarray) -> np.ndarray:
  n, r = labels.shape[:2]
  areas = np.count_nonzero(labels.reshape(n, r, -1), axis=-1)
  return np.argsort(areas, axis=1, kind="stable")


def _order_by_area(labels: np.ndarray) -> np.ndarray:
  return np.take_along_axis(labels, _area_order(labels)[:, :, None, None], axis=1)


def order_by_area(labels: Any) -> np.ndarray:
  """Returns `labels` with each image's raters sorted by ascending foreground area (stable).

  This is the rater ranking of D-Persona's LIDC evaluation (`order_raters_by_area`): rater
  slot i then means "the i-th smallest annotation" rather than a rater identity.

  Args:
    labels: (N, R, H, W) binary masks.

  Returns:
    (N, R, H, W) array, same dtype, raters re-ordered per image.
  """
  return _order_by_area(check_labels(labels))


@dataclasses.dataclass(frozen=True)
class _Counts:
  """Foreground pixel counts of one batch of images; everything the metrics need.

  Attributes:
    gram: (N, R + S, R + S) int64. Masks 0..R-1 are the labels, R..R+S-1 the binarised
      predictions; entry [a, b] is |mask_a & mask_b|, so the diagonal holds the areas.
    num_raters: R.
    soft_inter: (N, T) |label-mean map > t  &  pred-mean map > t| per Dice Soft threshold.
    soft_label_area: (N, T) |label-mean map > t|.
    soft_pred_area: (N, T) |pred-mean map > t|.
  """
  gram: np.ndarray
  num_raters: int
  soft_inter: np.ndarray | None = None
  soft_label_area: np.ndarray | None = None
  soft_pred_area: np.ndarray | None = None

  def _area(self) -> np.ndarray:
    return np.diagonal(self.gram, axis1=1, axis2=2)

  def label_area(self) -> np.ndarray:
    return self._area()[:, :self.num_raters]

  def pred_area(self) -> np.ndarray:
    return self._area()[:, self.num_raters:]

  def label_pred(self) -> np.ndarray:
    return self.gram[:, :self.num_raters, self.num_raters:]

  def label_label(self) -> np.ndarray:
    return self.gram[:, :self.num_raters, :self.num_raters]

  def pred_pred(self) -> np.ndarray:
    return self.gram[:, self.num_raters:, self.num_raters:]


def _count(labels: np.ndarray, preds: np.ndarray, *, pairs: bool = True,
           soft_thresholds: Sequence[float] | None = None) -> _Counts:
  """Computes the pair counts (and the Dice Soft counts) of validated inputs, in chunks."""
  n, r, h, w = labels.shape
  s = preds.shape[1]
  p = h * w
  k = r + s
  # Exact in float32 below 2**24 pixels; larger images fall back to float64 (still exact).
  gram_dtype = np.float32 if p < _FLOAT32_EXACT else np.float64
  chunk = max(1, _CHUNK_ELEMENTS // (k * p))
  gram = np.zeros((n, k, k), np.int64) if pairs else np.zeros((n, 0, 0), np.int64)
  num_t = 0 if soft_thresholds is None else len(soft_thresholds)
  soft_inter = np.zeros((n, num_t), np.int64)
  soft_label_area = np.zeros((n, num_t), np.int64)
  soft_pred_area = np.zeros((n, num_t), np.int64)
  # D-Persona averages float32 sigmoid outputs in float32; keep float64 inputs in float64 so
  # a mean sitting exactly on a threshold compares as the caller's own arithmetic would.
  mean_dtype = np.float64 if preds.dtype == np.float64 else np.float32
  for start in range(0, n, chunk):
    stop = min(n, start + chunk)
    lab = labels[start:stop].reshape(stop - start, r, p)
    prd = preds[start:stop].reshape(stop - start, s, p)
    if pairs:
      masks = np.empty((stop - start, k, p), gram_dtype)
      masks[:, :r] = lab
      np.greater(prd, BINARY_THRESHOLD, out=masks[:, r:])
      g = np.matmul(masks, masks.transpose(0, 2, 1))
      gram[start:stop] = np.rint(g).astype(np.int64)
    if num_t:
      label_mean = lab.mean(axis=1, dtype=np.float32)
      pred_mean = prd.mean(axis=1, dtype=mean_dtype)
      for ti, t in enumerate(soft_thresholds):
        # Strict `>` at each threshold for both maps; `t` is a Python float, so numpy
        # compares in the map's dtype (float32), as torch does in the reference code.
        lb = label_mean > t
        pb = pred_mean > t
        soft_inter[start:stop, ti] = np.count_nonzero(lb & pb, axis=-1)
        soft_label_area[start:stop, ti] = np.count_nonzero(lb, axis=-1)
        soft_pred_area[start:stop, ti] = np.count_nonzero(pb, axis=-1)
  return _Counts(gram=gram, num_raters=r, soft_inter=soft_inter,
                 soft_label_area=soft_label_area, soft_pred_area=soft_pred_area)


def _dice(inter: np.ndarray, area_a: np.ndarray, area_b: np.ndarray,
          convention: str) -> np.ndarray:
  """Dice from integer counts (broadcasting), as float64."""
  total = area_a + area_b
  if convention == "dpersona":
    # Evaluated in float32 exactly as D-Persona's torch code does, so the Dice matrix agrees
    # bit for bit and the Hungarian assignment breaks ties the same way. (In float32 the
    # 1e-8 vanishes unless the intersection is 0; empty vs empty is 1e-8 / 1e-8 = 1.)
    eps = np.float32(EPS)
    num = (2 * inter).astype(np.float32) + eps
    den = np.asarray(total).astype(np.float32) + eps
    return (num / den).astype(np.float64)
  return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def _iou_distance(inter: np.ndarray, area_a: np.ndarray, area_b: np.ndarray,
                  convention: str) -> np.ndarray:
  """1 - IoU of foreground from integer counts (broadcasting), as float64."""
  union = area_a + area_b - inter
  if convention == "dpersona":
    # D-Persona's `iou`: float64 inter / (union + 1e-8); empty vs empty gives 0 / 1e-8 = 0.
    iou = inter / (union + EPS)
  else:
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
  return 1.0 - iou


def _ged_from(c: _Counts, convention: str) -> np.ndarray:
  la, pa = c.label_area(), c.pred_area()
  d_lp = _iou_distance(c.label_pred(), la[:, :, None], pa[:, None, :], convention)
  d_ll = _iou_distance(c.label_label(), la[:, :, None], la[:, None, :], convention)
  d_pp = _iou_distance(c.pred_pred(), pa[:, :, None], pa[:, None, :], convention)
  # V-statistic: all ordered pairs, the diagonal included, as in both reference codes.
  return 2.0 * d_lp.mean(axis=(1, 2)) - d_ll.mean(axis=(1, 2)) - d_pp.mean(axis=(1, 2))


def _dice_matrix_from(c: _Counts, convention: str) -> np.ndarray:
  la, pa = c.label_area(), c.pred_area()
  return _dice(c.label_pred(), la[:, :, None], pa[:, None, :], convention)


def _dice_soft_from(c: _Counts, convention: str) -> np.ndarray:
  d = _dice(c.soft_inter, c.soft_label_area, c.soft_pred_area, convention)
  return d.mean(axis=1)


def _assign(dm: np.ndarray) -> np.ndarray:
  """Hungarian assignment per image maximising total Dice.

  Args:
    dm: (N, R, S) Dice matrices.

  Returns:
    (N, R) int array: the prediction matched to each rater, -1 for a rater left unmatched
    (only when S < R).
  """
  n, r, _ = dm.shape
  cols = np.full((n, r), -1, np.int64)
  for i in range(n):
    # Minimising 1 - Dice (not maximising Dice) feeds the solver the same cost matrix as
    # D-Persona's `dice_at_all`, so ties among optimal assignments resolve identically.
    rows, matched = optimize.linear_sum_assignment(1.0 - dm[i])
    cols[i, rows] = matched
  return cols


def _matched_values(dm: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """(N, R) Dice of each rater with its matched prediction (NaN where unmatched)."""
  vals = np.take_along_axis(dm, np.maximum(cols, 0)[:, :, None], axis=2)[:, :, 0]
  return np.where(cols >= 0, vals, np.nan)


def _reduce(values: np.ndarray, reduction: str) -> np.ndarray | float:
  if reduction == "none":
    return values
  mean = values.mean(axis=0)
  return float(mean) if mean.ndim == 0 else mean


# ----------------------------------------------------------------------------- metrics


def ged(labels: Any, preds: Any, *, convention: str = "dpersona",
        reduction: str = "none") -> np.ndarray | float:
  """Generalised energy distance (squared form), d = 1 - IoU of foreground.

  GED = 2 mean_{i,j} d(Y_i, S_j) - mean_{i,i'} d(Y_i, Y_i') - mean_{j,j'} d(S_j, S_j'),
  all means over all ordered pairs, the diagonal included.

  Args:
    labels: (N, R, H, W) binary rater masks.
    preds: (N, S, H, W) probabilities; binarised with p > 0.5.
    convention: `dpersona` or `standard` (empty-mask IoU, see the module docstring).
    reduction: `none` for the (N,) per-image values, `mean` for their mean (a float).

  Returns:
    Per-image GED (N,) or its mean over images.
  """
  labels, preds = _check_all(labels, preds, convention, reduction)
  return _reduce(_ged_from(_count(labels, preds), convention), reduction)


def dice_matrix(labels: Any, preds: Any, *, convention: str = "dpersona") -> np.ndarray:
  """Dice of every rater mask with every binarised prediction.

  Args:
    labels: (N, R, H, W) binary rater masks.
    preds: (N, S, H, W) probabilities; binarised with p > 0.5.
    convention: `dpersona` or `standard`.

  Returns:
    (N, R, S) float64 array, Dm[n, i, j] = Dice(Y_i, S_j) of image n.
  """
  labels, preds = _check_all(labels, preds, convention)
  return _dice_matrix_from(_count(labels, preds), convention)


def dice_max(labels: Any, preds: Any, *, convention: str = "dpersona",
             reduction: str = "none") -> np.ndarray | float:
  """Dice Max: mean over predictions of the best Dice with any label, mean_j max_i Dm[i, j].

  Args:
    labels: (N, R, H, W) binary rater masks.
    preds: (N, S, H, W) probabilities; binarised with p > 0.5.
    convention: `dpersona` or `standard`.
    reduction: `none` for (N,) per-image values, `mean` for their mean.

  Returns:
    Per-image Dice Max (N,) or its mean over images.
  """
  labels, preds = _check_all(labels, preds, convention, reduction)
  dm = _dice_matrix_from(_count(labels, preds), convention)
  return _reduce(dm.max(axis=1).mean(axis=1), reduction)


def dice_max_reverse(labels: Any, preds: Any, *, convention: str = "dpersona",
                     reduction: str = "none") -> np.ndarray | float:
  """Dice Max (reverse): mean over labels of the best prediction, mean_i max_j Dm[i, j].

  Args:
    labels: (N, R, H, W) binary rater masks.
    preds: (N, S, H, W) probabilities; binarised with p > 0.5.
    convention: `dpersona` or `standard`.
    reduction: `none` for (N,) per-image values, `mean` for their mean.

  Returns:
    Per-image reverse Dice Max (N,) or its mean over images.
  """
  labels, preds = _check_all(labels, preds, convention, reduction)
  dm = _dice_matrix_from(_count(labels, preds), convention)
  return _reduce(dm.max(axis=2).mean(axis=1), reduction)


def match_raters(labels: Any, preds: Any, *, convention: str = "dpersona") -> np.ndarray:
  """Optimal one-to-one assignment of predictions to raters (Hungarian, maximal Dice).

  Rectangular when S != R: with S > R every rater gets a distinct prediction; with S < R,
  S raters are matched and the others get -1.

  Args:
    labels: (N, R, H, W) binary rater masks.
    preds: (N, S, H, W) probabilities; binarised with p > 0.5.
    convention: `dpersona` or `standard`.

  Returns:
    (N, R) int array: index of the prediction matched to each rater, or -1.
  """
  return _assign(dice_matrix(labels, preds, convention=convention))


def dice_match(labels: Any, preds: Any, *, convention: str = "dpersona",
               reduction: str = "none") -> np.ndarray | float:
  """Dice Match: mean Dice of the optimal one-to-one label-prediction assignment.

  The mean is over the min(R, S) matched pairs (R when S >= R, as in D-Persona).

  Args:
    labels: (N, R, H, W) binary rater masks.
    preds: (N, S, H, W) probabilities; binarised with p > 0.5.
    convention: `dpersona` or `standard`.
    reduction: `none` for (N,) per-image values, `mean` for their mean.

  Returns:
    Per-image Dice Match (N,) or its mean over images.
  """
  labels, preds = _check_all(labels, preds, convention, reduction)
  dm = _dice_matrix_from(_count(labels, preds), convention)
  return _reduce(np.nanmean(_matched_values(dm, _assign(dm)), axis=1), reduction)


def dice_each_matched(labels: Any, preds: Any, *, convention: str = "dpersona",
                      reduction: str = "none") -> np.ndarray:
  """Dice Each, matched form (D-Persona's `Dice_each`): Dice of rater i with its match.

  The mean over raters equals Dice Match. When several assignments are optimal, the
  per-rater values depend on the tie-break (the solver's, as in D-Persona); the mean does
  not.

  Args:
    labels: (N, R, H, W) binary rater masks.
    preds: (N, S, H, W) probabilities, S >= R; binarised with p > 0.5.
    convention: `dpersona` or `standard`.
    reduction: `none` for (N, R) per-image values, `mean` for the (R,) means over images.

  Returns:
    (N, R) or (R,) float64 array.

  Raises:
    ValueError: S < R (some rater would have no prediction).
  """
  labels, preds = _check_all(labels, preds, convention, reduction)
  if preds.shape[1] < labels.shape[1]:
    raise ValueError(f"dice_each_matched needs at least one prediction per rater; preds "
                     f"has S={preds.shape[1]} samples, labels R={labels.shape[1]} raters")
  dm = _dice_matrix_from(_count(labels, preds), convention)
  return _reduce(_matched_values(dm, _assign(dm)), reduction)


def dice_each_direct(labels: Any, preds: Any, *, convention: str = "dpersona",
                     reduction: str = "none") -> np.ndarray:
  """Dice Each, direct form: Dm[i, i], prediction i against rater i.

  This answers the personalisation question (does the prompt for rater i reproduce rater
  i?); it needs one prediction per rater, ordered like the raters.

  Args:
    labels: (N, R, H, W) binary rater masks.
    preds: (N, R, H, W) probabilities, prediction i made for rater i.
    convention: `dpersona` or `standard`.
    reduction: `none` for (N, R) per-image values, `mean` for the (R,) means over images.

  Returns:
    (N, R) or (R,) float64 array.

  Raises:
    ValueError: S != R.
  """
  labels, preds = _check_all(labels, preds, convention, reduction)
  if preds.shape[1] != labels.shape[1]:
    raise ValueError(f"dice_each_direct needs one prediction per rater (S == R); preds has "
                     f"S={preds.shape[1]} samples, labels R={labels.shape[1]} raters")
  dm = _dice_matrix_from(_count(labels, preds), convention)
  return _reduce(np.diagonal(dm, axis1=1, axis2=2).copy(), reduction)


def dice_soft(labels: Any, preds: Any, *, convention: str = "dpersona",
              thresholds: Sequence[float] = DICE_SOFT_THRESHOLDS,
              reduction: str = "none") -> np.ndarray | float:
  """Dice Soft: Dice of the mean prediction map with the mean label map over thresholds.

  The mean of the probability maps (not of the binarised predictions) and the mean of the
  rater masks are each binarised with a strict `>` at every threshold; the result is the
  mean Dice over thresholds.

  Args:
    labels: (N, R, H, W) binary rater masks.
    preds: (N, S, H, W) probabilities.
    convention: `dpersona` or `standard` (the Dice formula; see the module docstring).
    thresholds: the thresholds (docs/metrics.md: 0.1, 0.3, 0.5, 0.7, 0.9).
    reduction: `none` for (N,) per-image values, `mean` for their mean.

  Returns:
    Per-image Dice Soft (N,) or its mean over images.
  """
  labels, preds = _check_all(labels, preds, convention, reduction)
  if len(thresholds) == 0:
    raise ValueError("thresholds must not be empty")
  c = _count(labels, preds, pairs=False, soft_thresholds=tuple(thresholds))
  return _reduce(_dice_soft_from(c, convention), reduction)


def score(labels: Any, preds: Any, *, convention: str = "dpersona",
          rank_by_area: bool = False) -> dict[str, Any]:
  """Scores predictions against multi-rater labels with every metric of docs/metrics.md.

  Args:
    labels: (N, R, H, W) binary rater masks, values in {0, 1}.
    preds: (N, S, H, W) probabilities in [0, 1]: S prior samples (Stage 1) or one
      prediction per rater, ordered like the raters (Stage 2, S == R).
    convention: `dpersona` or `standard` (what empty masks are worth).
    rank_by_area: first sort each image's raters by ascending area (`order_by_area`, as
      D-Persona does on LIDC). Only the labels are re-ordered: predictions for rater
      positions must already follow the ranked order.

  Returns:
    {"convention": str, "mean": {...}, "per_image": [{...}, ...]} where each metric dict
    has `ged`, `dice_soft`, `dice_max`, `dice_max_reverse`, `dice_match` (floats),
    `dice_each_matched` (list of R floats; only when S >= R) and `dice_each_direct` (list of
    R floats; only when S == R). `mean` holds the means over the N images. All numbers are
    plain Python floats.

  Raises:
    ValueError: invalid inputs (shape, values) or an unknown convention.
  """
  labels, preds = _check_all(labels, preds, convention)
  if rank_by_area:
    labels = _order_by_area(labels)
  r, s = labels.shape[1], preds.shape[1]
  c = _count(labels, preds, soft_thresholds=DICE_SOFT_THRESHOLDS)
  dm = _dice_matrix_from(c, convention)
  matched = _matched_values(dm, _assign(dm))
  per: dict[str, np.ndarray] = {
      "ged": _ged_from(c, convention),
      "dice_soft": _dice_soft_from(c, convention),
      "dice_max": dm.max(axis=1).mean(axis=1),
      "dice_max_reverse": dm.max(axis=2).mean(axis=1),
      "dice_match": np.nanmean(matched, axis=1),
  }
  if s >= r:
    per["dice_each_matched"] = matched
  if s == r:
    per["dice_each_direct"] = np.diagonal(dm, axis1=1, axis2=2)
  # tolist() yields plain Python floats (JSON-ready) in one call per metric.
  mean = {k: v.mean(axis=0).tolist() for k, v in per.items()}
  columns = {k: v.tolist() for k, v in per.items()}
  keys = list(per)
  per_image = [dict(zip(keys, row)) for row in zip(*(columns[k] for k in keys))]
  return {"convention": convention, "mean": mean, "per_image": per_image}


def empty_counts(labels: Any, preds: Any,
                 prediction_raters: Sequence[int | None] | None = None) -> dict[str, int]:
  """Counts empty rater masks, empty predictions, and rater masks empty on both sides.

  Two empty masks have Dice 1 in both conventions, so where most rater masks are empty and
  predicted empty, high Dice columns say little about a model: one that predicts nothing
  after one step scores Dice Max 100 on such a set. `evaluate` stores these counts with
  every test result and `summary.md` notes when they dominate.

  Args:
    labels: (N, R, H, W) binary rater masks.
    preds: (N, S, H, W) probabilities; a prediction is empty when no pixel has p > 0.5.
    prediction_raters: for each of the S predictions, the rater it stands for, or None for
      a sample of the whole distribution (it stands for every rater); default all None.

  Returns:
    {"rater_masks": N * R, "empty_labels", "predictions": N * S, "empty_predictions",
    "empty_on_empty"}: the last counts rater masks that are empty and for which every
    prediction standing for their rater is empty.
  """
  labels, preds = _check_pair(labels, preds)
  n, r, s = labels.shape[0], labels.shape[1], preds.shape[1]
  raters = list(prediction_raters) if prediction_raters is not None else [None] * s
  if len(raters) != s:
    raise ValueError(f"prediction_raters has {len(raters)} entries for {s} predictions")
  label_empty = ~labels.reshape(n, r, -1).any(-1)
  # Image by image: the binarised predictions of a whole test set can be large.
  pred_empty = np.stack([~(preds[i] > BINARY_THRESHOLD).reshape(s, -1).any(-1)
                         for i in range(n)])
  both = 0
  for k in range(r):
    cols = [j for j, x in enumerate(raters) if x is None or x == k]
    if cols:
      both += int((label_empty[:, k] & pred_empty[:, cols].all(-1)).sum())
  return {"rater_masks": n * r, "empty_labels": int(label_empty.sum()),
          "predictions": n * s, "empty_predictions": int(pred_empty.sum()),
          "empty_on_empty": both}

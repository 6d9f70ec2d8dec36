"""Tests of prosona_jax.metrics against hand-computed values and a naive loop reference.

The reference below is written straight from docs/metrics.md, one image and one pair of masks at
a time, with Python integers and float64 (it shares no code with the module).
"""

import itertools
import json

import numpy as np
import pytest
from scipy import ndimage

from prosona_jax import metrics

CONVENTIONS = ("dpersona", "standard")
TOL = 1e-6  # float32 Dice (dpersona, as D-Persona) vs the float64 reference.


# ----------------------------------------------------------------------------- reference


def ref_iou(a, b, convention):
  inter = int(np.logical_and(a, b).sum())
  union = int(np.logical_or(a, b).sum())
  if convention == "dpersona":
    return inter / (union + 1e-8)
  return 1.0 if union == 0 else inter / union


def ref_dice(a, b, convention):
  inter = int(np.logical_and(a, b).sum())
  total = int(a.sum()) + int(b.sum())
  if convention == "dpersona":
    return (2 * inter + 1e-8) / (total + 1e-8)
  return 1.0 if total == 0 else 2 * inter / total


def ref_best_matching(dm):
  """Brute force over all one-to-one assignments; returns the mean matched Dice."""
  r, s = dm.shape
  if s >= r:
    best = max(sum(dm[i, c[i]] for i in range(r)) for c in itertools.permutations(range(s), r))
    return best / r
  best = max(sum(dm[c[j], j] for j in range(s)) for c in itertools.permutations(range(r), s))
  return best / s


def ref_image(labels, preds, convention):
  """All metrics of one image: labels (R, H, W), preds (S, H, W)."""
  ys = [np.asarray(y).astype(bool) for y in labels]
  ss = [np.asarray(p) > 0.5 for p in preds]
  d = lambda a, b: 1.0 - ref_iou(a, b, convention)
  ged = (2 * np.mean([d(y, s) for y in ys for s in ss])
         - np.mean([d(y, y2) for y in ys for y2 in ys])
         - np.mean([d(s, s2) for s in ss for s2 in ss]))
  dm = np.array([[ref_dice(y, s, convention) for s in ss] for y in ys])
  pm = np.mean(np.asarray(preds, np.float64), axis=0)
  lm = np.mean(np.asarray(labels, np.float64), axis=0)
  soft = np.mean([ref_dice(lm > t, pm > t, convention) for t in (0.1, 0.3, 0.5, 0.7, 0.9)])
  out = {
      "ged": ged,
      "dice_soft": soft,
      "dice_max": np.mean([max(dm[i, j] for i in range(len(ys))) for j in range(len(ss))]),
      "dice_max_reverse": np.mean([max(dm[i, j] for j in range(len(ss)))
                                   for i in range(len(ys))]),
      "dice_match": ref_best_matching(dm),
      "dm": dm,
  }
  if len(ss) == len(ys):
    out["dice_each_direct"] = [dm[i, i] for i in range(len(ys))]
  return out


def check_against_reference(labels, preds, convention, *, tol=TOL):
  result = metrics.score(labels, preds, convention=convention)
  r, s = labels.shape[1], preds.shape[1]
  dm = metrics.dice_matrix(labels, preds, convention=convention)
  for n in range(labels.shape[0]):
    ref = ref_image(labels[n], preds[n], convention)
    got = result["per_image"][n]
    for key in ("ged", "dice_soft", "dice_max", "dice_max_reverse", "dice_match"):
      assert got[key] == pytest.approx(ref[key], abs=tol), (n, key)
    np.testing.assert_allclose(dm[n], ref["dm"], atol=tol)
    if s >= r:
      # Ties make the per-rater matched values assignment dependent, not their mean.
      assert np.mean(got["dice_each_matched"]) == pytest.approx(got["dice_match"], abs=1e-12)
    else:
      assert "dice_each_matched" not in got
    if s == r:
      np.testing.assert_allclose(got["dice_each_direct"], ref["dice_each_direct"], atol=tol)
    else:
      assert "dice_each_direct" not in got
  return result


def random_masks(rng, shape, p_empty=0.3, density=0.3):
  """Random sparse masks with a share of fully empty ones (the LIDC situation)."""
  m = rng.random(shape) < density
  m[rng.random(shape[:2]) < p_empty] = False
  return m.astype(np.uint8)


def empty_fraction(masks):
  n, k = masks.shape[:2]
  return (np.count_nonzero(masks.reshape(n, k, -1), axis=-1) == 0).mean(axis=1)


@pytest.fixture(scope="module")
def lidc(shared_data):
  """Real rater masks (6, 4, 128, 128), rater slots as stored."""
  with np.load(shared_data / "lidc_showcase6.npz") as z:
    return z["masks"]


# ----------------------------------------------------------------------------- hand cases


def _hand_case():
  # 2 x 2 images, flattened order: Y1 = {0, 1}, Y2 = {0}; S1 -> {0, 1}, S2 -> {} .
  labels = np.array([[[[1, 1], [0, 0]], [[1, 0], [0, 0]]]], np.uint8)
  preds = np.array([[[[1.0, 0.8], [0.0, 0.0]], [[0.2, 0.4], [0.0, 0.0]]]], np.float32)
  return labels, preds


@pytest.mark.parametrize("convention,ged", [("standard", 0.5), ("dpersona", 0.25)])
def test_hand_computed(convention, ged):
  labels, preds = _hand_case()
  got = metrics.score(labels, preds, convention=convention)["per_image"][0]
  # d_LS = (0 + 1 + 1/2 + 1) / 4, d_LL = 1/4, d_SS = 1/2 (standard) or 3/4 (dpersona:
  # S2 against itself is at distance 1).
  assert got["ged"] == pytest.approx(ged, abs=1e-7)
  # Dm = [[1, 0], [2/3, 0]] (the dpersona zeros are 1e-8 / |A|).
  assert got["dice_max"] == pytest.approx(0.5, abs=1e-7)
  assert got["dice_max_reverse"] == pytest.approx(5 / 6, abs=1e-7)
  assert got["dice_match"] == pytest.approx(0.5, abs=1e-7)
  assert got["dice_each_matched"] == pytest.approx([1.0, 0.0], abs=1e-7)
  assert got["dice_each_direct"] == pytest.approx([1.0, 0.0], abs=1e-7)
  # Mean maps: label [1, .5, 0, 0], pred [.6, .6, 0, 0]. Dice per threshold .1..9:
  # 1, 1, 2/3 (.5 > .5 is false), 0, 0.
  assert got["dice_soft"] == pytest.approx(8 / 15, abs=1e-7)


def test_strict_binarisation_threshold():
  labels = np.ones((1, 1, 2, 2), np.uint8)
  at_half = np.full((1, 1, 2, 2), 0.5, np.float32)
  above = np.nextafter(at_half, np.float32(1))
  assert not metrics.binarize(at_half).any()
  assert metrics.binarize(above).all()
  assert metrics.dice_match(labels, at_half, convention="standard")[0] == 0.0
  assert metrics.dice_match(labels, above, convention="standard")[0] == 1.0


def test_dice_soft_thresholds_are_strict():
  # With 4 raters the label mean is .5 where 2 raters agree: not foreground at t = .5.
  labels = np.zeros((1, 4, 1, 4), np.uint8)
  labels[0, :2, 0, 0] = 1
  preds = np.zeros((1, 2, 1, 4), np.float32)
  preds[0, :, 0, 0] = 0.5  # Mean .5: foreground at .1 and .3 only, like the labels.
  assert metrics.dice_soft(labels, preds, convention="standard")[0] == pytest.approx(1.0)
  preds[0, :, 0, 0] = 0.6  # Now also at .5, where the label mean is not: Dice 0 there.
  assert metrics.dice_soft(labels, preds, convention="standard")[0] == pytest.approx(0.8)


def test_dice_soft_uses_mean_of_probabilities_not_of_binarised_samples():
  labels = np.ones((1, 1, 1, 1), np.uint8)
  preds = np.full((1, 2, 1, 1), 0.4, np.float32)  # Binarised: empty. Mean map: 0.4.
  # Mean map .4 is foreground at .1 and .3 (label mean 1 at every threshold): 2 of 5.
  assert metrics.dice_soft(labels, preds, convention="standard")[0] == pytest.approx(0.4)


# ----------------------------------------------------------------------------- conventions


def test_conventions_on_empty_masks():
  empty = np.zeros((1, 1, 3, 3), np.uint8)
  full = np.ones((1, 1, 3, 3), np.uint8)
  two_empty_labels = np.zeros((1, 2, 3, 3), np.uint8)
  for c in CONVENTIONS:
    # Dice of two empty masks is 1 in both conventions.
    assert metrics.dice_matrix(empty, empty.astype(float), convention=c)[0, 0, 0] == 1.0
  # Dice of empty vs non-empty: 0 (standard), 1e-8 / 9 (dpersona's smoothing).
  assert metrics.dice_matrix(empty, full.astype(float), convention="standard")[0, 0, 0] == 0.0
  assert metrics.dice_matrix(empty, full.astype(float), convention="dpersona")[0, 0, 0] == (
      pytest.approx(1e-8 / 9, rel=1e-6))
  # Empty labels vs a full prediction: d_LS = 1, d_SS = 0; d_LL is 0 (standard) or 1
  # (dpersona: an empty mask is at distance 1 even from itself).
  assert metrics.ged(two_empty_labels, full.astype(float), convention="standard")[0] == (
      pytest.approx(2.0))
  assert metrics.ged(two_empty_labels, full.astype(float), convention="dpersona")[0] == (
      pytest.approx(1.0))
  # One empty label, predictions {empty, full}: standard 2(.5) - 0 - .5; dpersona
  # 2(1) - 1 - .75.
  preds = np.concatenate([empty, full], axis=1).astype(float)
  assert metrics.ged(empty, preds, convention="standard")[0] == pytest.approx(0.5)
  assert metrics.ged(empty, preds, convention="dpersona")[0] == pytest.approx(0.25)
  # Everything empty: both conventions give GED 0 and Dice 1.
  for c in CONVENTIONS:
    res = metrics.score(two_empty_labels, np.zeros((1, 3, 3, 3)), convention=c)
    assert res["mean"]["ged"] == pytest.approx(0.0, abs=1e-12)
    assert res["mean"]["dice_match"] == 1.0
    assert res["mean"]["dice_soft"] == 1.0


def test_ged_convention_identity():
  rng = np.random.default_rng(1)
  labels = random_masks(rng, (40, 4, 6, 6), p_empty=0.4)
  preds = rng.random((40, 7, 6, 6)) * (rng.random((40, 7, 1, 1)) > 0.35)
  g_dp = metrics.ged(labels, preds, convention="dpersona")
  g_st = metrics.ged(labels, preds, convention="standard")
  e_y = empty_fraction(labels)
  e_s = empty_fraction(preds > 0.5)
  assert (e_y != e_s).sum() > 10  # The identity is not trivially 0 = 0 here.
  np.testing.assert_allclose(g_dp, g_st - (e_y - e_s) ** 2, atol=1e-7)


def test_dpersona_dice_is_float32_like_the_reference_code():
  # D-Persona evaluates (2 I + 1e-8) / (|A| + |B| + 1e-8) on float32 torch tensors; the
  # module reproduces that rounding so ties break as in the reference.
  rng = np.random.default_rng(2)
  labels = random_masks(rng, (5, 4, 7, 7))
  preds = rng.random((5, 6, 7, 7)).astype(np.float32)
  dm = metrics.dice_matrix(labels, preds, convention="dpersona")
  for n, i, j in itertools.product(range(5), range(4), range(6)):
    a, b = labels[n, i].astype(bool), preds[n, j] > 0.5
    num = np.float32(2 * np.logical_and(a, b).sum()) + np.float32(1e-8)
    den = np.float32(a.sum() + b.sum()) + np.float32(1e-8)
    assert dm[n, i, j] == np.float64(num / den)


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("num_raters,num_samples", [(4, 10), (4, 4), (3, 5), (4, 2), (1, 1)])
def test_vectorised_equals_naive_loop(convention, num_raters, num_samples):
  rng = np.random.default_rng(10 * num_raters + num_samples)
  labels = random_masks(rng, (8, num_raters, 5, 6), density=0.4)
  soft = rng.random((8, num_samples, 5, 6))
  soft[rng.random((8, num_samples)) < 0.3] *= 0.5  # Some empty predictions.
  check_against_reference(labels, soft, convention)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_chunked_counts_equal_unchunked(monkeypatch, convention):
  rng = np.random.default_rng(3)
  labels = random_masks(rng, (9, 4, 8, 8))
  preds = rng.random((9, 10, 8, 8)).astype(np.float32)
  whole = metrics.score(labels, preds, convention=convention)
  monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 2 * 14 * 64)  # Chunks of 2 images.
  assert metrics.score(labels, preds, convention=convention) == whole


def test_dice_match_equals_brute_force_and_assignment_is_one_to_one():
  rng = np.random.default_rng(4)
  # Tiny masks make many equal Dice values, so ties are exercised.
  labels = random_masks(rng, (12, 4, 3, 3), density=0.5)
  preds = rng.random((12, 10, 3, 3))
  for c in CONVENTIONS:
    dm = metrics.dice_matrix(labels, preds, convention=c)
    cols = metrics.match_raters(labels, preds, convention=c)
    match = metrics.dice_match(labels, preds, convention=c)
    each = metrics.dice_each_matched(labels, preds, convention=c)
    for n in range(12):
      assert len(set(cols[n].tolist())) == 4 and cols[n].min() >= 0
      assert match[n] == pytest.approx(ref_best_matching(dm[n]), abs=1e-12)
      np.testing.assert_array_equal(each[n], dm[n, np.arange(4), cols[n]])
    np.testing.assert_allclose(each.mean(axis=1), match, atol=1e-12)


def test_dice_match_fewer_predictions_than_raters():
  rng = np.random.default_rng(5)
  labels = random_masks(rng, (6, 4, 4, 4), density=0.5)
  preds = rng.random((6, 2, 4, 4))
  cols = metrics.match_raters(labels, preds)
  assert ((cols >= 0).sum(axis=1) == 2).all()
  dm = metrics.dice_matrix(labels, preds)
  for n in range(6):
    assert metrics.dice_match(labels, preds)[n] == pytest.approx(ref_best_matching(dm[n]))
  with pytest.raises(ValueError, match="at least one prediction per rater"):
    metrics.dice_each_matched(labels, preds)
  assert "dice_each_matched" not in metrics.score(labels, preds)["mean"]


def test_dice_each_direct_is_the_diagonal():
  rng = np.random.default_rng(6)
  labels = random_masks(rng, (5, 4, 6, 6), p_empty=0.2, density=0.5)
  # Prediction i is rater (i + 1) % 4: the direct form pairs different raters while the
  # matched form finds each rater's own mask.
  preds = np.roll(labels, 1, axis=1).astype(np.float32)
  direct = metrics.dice_each_direct(labels, preds, convention="standard")
  for n, i in itertools.product(range(5), range(4)):
    assert direct[n, i] == pytest.approx(ref_dice(labels[n, i], labels[n, (i - 1) % 4],
                                                  "standard"))
  matched = metrics.dice_each_matched(labels, preds, convention="standard")
  np.testing.assert_allclose(matched, 1.0)
  assert direct.mean() < 0.9
  with pytest.raises(ValueError, match=r"S == R"):
    metrics.dice_each_direct(labels, preds[:, :3])


def test_reductions():
  rng = np.random.default_rng(7)
  labels = random_masks(rng, (6, 4, 5, 5))
  preds = rng.random((6, 4, 5, 5))
  for fn in (metrics.ged, metrics.dice_soft, metrics.dice_max, metrics.dice_max_reverse,
             metrics.dice_match):
    per = fn(labels, preds, convention="standard")
    assert per.shape == (6,)
    mean = fn(labels, preds, convention="standard", reduction="mean")
    assert isinstance(mean, float) and mean == pytest.approx(per.mean())
  for fn in (metrics.dice_each_matched, metrics.dice_each_direct):
    per = fn(labels, preds)
    assert per.shape == (6, 4)
    np.testing.assert_allclose(fn(labels, preds, reduction="mean"), per.mean(axis=0))
  with pytest.raises(ValueError, match="reduction must be one of"):
    metrics.ged(labels, preds, reduction="sum")
  with pytest.raises(TypeError):
    metrics.ged(labels, preds, "standard")  # Options are keyword-only.


# ----------------------------------------------------------------------------- ranking


def test_order_by_area_is_stable_and_ascending():
  labels = np.zeros((2, 4, 3, 3), np.uint8)
  labels[0, 0, 0, :3] = 1  # Area 3.
  labels[0, 1, 1, 0] = 1  # Area 1.
  labels[0, 2, 2, :3] = 1  # Area 3, a different mask from rater 0.
  # Rater 3 empty.
  labels[1, :, 0, 0] = 1  # All equal areas: the order must not change.
  labels[1, 1, 1, 1] = 0
  np.testing.assert_array_equal(metrics.area_order(labels), [[3, 1, 0, 2], [0, 1, 2, 3]])
  ranked = metrics.order_by_area(labels)
  np.testing.assert_array_equal(ranked[0], labels[0, [3, 1, 0, 2]])
  np.testing.assert_array_equal(ranked[1], labels[1])


def test_rank_by_area_reorders_labels_only():
  rng = np.random.default_rng(8)
  labels = random_masks(rng, (6, 4, 6, 6), p_empty=0.3, density=0.4)
  preds = rng.random((6, 4, 6, 6))
  ranked = metrics.score(labels, preds, rank_by_area=True)
  expected = metrics.score(metrics.order_by_area(labels), preds)
  assert ranked == expected
  plain = metrics.score(labels, preds)
  # Set-level metrics do not depend on rater order; the direct form does.
  for key in ("ged", "dice_soft", "dice_max", "dice_max_reverse", "dice_match"):
    assert ranked["mean"][key] == pytest.approx(plain["mean"][key], abs=1e-12)
  assert ranked["mean"]["dice_each_direct"] != plain["mean"]["dice_each_direct"]


# ----------------------------------------------------------------------------- real LIDC


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_lidc_other_raters_masks(lidc, convention):
  # Hard predictions = the raters' own masks, shifted by one slot: the same set.
  preds = np.roll(lidc, 1, axis=1).astype(np.float32)
  res = check_against_reference(lidc, preds, convention)
  m = res["mean"]
  assert m["ged"] == pytest.approx(0.0, abs=1e-7)
  for key in ("dice_soft", "dice_max", "dice_max_reverse", "dice_match"):
    assert m[key] == pytest.approx(1.0, abs=1e-7)
  assert m["dice_each_matched"] == pytest.approx([1.0] * 4, abs=1e-7)
  assert m["dice_each_direct"][0] < 0.9  # Rater 1 vs rater 4's mask: inter-rater Dice.
  # Leave-one-out: 3 other raters' masks (S < R), and every rater's mask twice (S > R).
  check_against_reference(lidc, lidc[:, 1:].astype(np.float32), convention)
  check_against_reference(lidc, np.concatenate([lidc, lidc[:, ::-1]], 1).astype(float),
                          convention)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_lidc_soft_predictions(lidc, convention):
  blurred = np.stack([ndimage.gaussian_filter(m.astype(np.float32), sigma=(0, 1.5, 1.5))
                      for m in lidc])
  res = check_against_reference(lidc, np.clip(blurred, 0, 1), convention)
  consensus = np.repeat(lidc.mean(axis=1, keepdims=True), 10, axis=1)  # Values .25 .. 1.
  check_against_reference(lidc, consensus, convention)
  assert 0 < res["mean"]["dice_match"] <= 1


def test_lidc_empty_predictions(lidc):
  empty = np.zeros((6, 10, 128, 128), np.float32)
  res = {c: check_against_reference(lidc, empty, c) for c in CONVENTIONS}
  e_y = empty_fraction(lidc)
  g_st = np.array([p["ged"] for p in res["standard"]["per_image"]])
  g_dp = np.array([p["ged"] for p in res["dpersona"]["per_image"]])
  np.testing.assert_allclose(g_dp, g_st - (e_y - 1.0) ** 2, atol=1e-7)
  # Predicting nothing: standard GED is 2 e_nonempty - (pairs of differing emptiness)...
  # checked by the reference; and dpersona rewards it relative to standard.
  assert (g_dp < g_st).all()


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_lidc_noisy_predictions(lidc, convention):
  rng = np.random.default_rng(9)
  flips = rng.random((6, 10, 128, 128)) < 0.002
  base = lidc[:, rng.integers(0, 4, 10)].astype(bool)
  noisy = np.where(base ^ flips, rng.uniform(0.5, 1.0, flips.shape),
                   rng.uniform(0.0, 0.5, flips.shape)).astype(np.float32)
  res = check_against_reference(lidc, noisy, convention)
  e_s = empty_fraction(noisy > 0.5)
  assert (e_s == 0).all()  # Noise makes every sample non-empty: the conventions differ.
  if convention == "dpersona":
    g_st = np.array(metrics.ged(lidc, noisy, convention="standard"))
    g_dp = np.array([p["ged"] for p in res["per_image"]])
    np.testing.assert_allclose(g_dp, g_st - empty_fraction(lidc) ** 2, atol=1e-7)


# ----------------------------------------------------------------------------- API


def test_score_json_ready_and_keys():
  rng = np.random.default_rng(11)
  labels = random_masks(rng, (3, 4, 5, 5))
  res = metrics.score(labels, rng.random((3, 4, 5, 5)), convention="standard")
  assert set(res) == {"convention", "mean", "per_image"}
  assert res["convention"] == "standard"
  assert list(res["mean"]) == list(metrics.METRIC_KEYS)
  assert len(res["per_image"]) == 3
  for record in [res["mean"], *res["per_image"]]:
    assert list(record) == list(metrics.METRIC_KEYS)
    for key, value in record.items():
      values = value if key.startswith("dice_each") else [value]
      assert len(values) == (4 if key.startswith("dice_each") else 1)
      assert all(type(v) is float for v in values), key  # pylint: disable=unidiomatic-typecheck
  assert json.loads(json.dumps(res)) == res
  res10 = metrics.score(labels, rng.random((3, 10, 5, 5)))
  assert "dice_each_direct" not in res10["mean"] and "dice_each_matched" in res10["mean"]


@pytest.mark.parametrize("labels,preds,kwargs,message", [
    (np.zeros((2, 4, 8)), np.zeros((2, 3, 8, 8)), {}, r"labels must have 4 dimensions"),
    (np.zeros((2, 4, 8, 8)), np.zeros((2, 8, 8)), {}, r"preds must have 4 dimensions"),
    (np.zeros((2, 4, 8, 8)), np.zeros((3, 3, 8, 8)), {}, r"same number of images N"),
    (np.zeros((2, 4, 8, 8)), np.zeros((2, 3, 8, 9)), {}, r"same image size H x W"),
    (np.full((1, 1, 2, 2), 255, np.uint8), np.zeros((1, 1, 2, 2)), {}, r"\{0, 1\}.*255"),
    (np.full((1, 1, 2, 2), 0.5), np.zeros((1, 1, 2, 2)), {}, r"labels must be binary"),
    (np.full((1, 1, 2, 2), -1), np.zeros((1, 1, 2, 2)), {}, r"labels must be binary"),
    (np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), 1.5), {}, r"preds must be probabilities"),
    (np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), -0.1), {}, r"preds must be probabilities"),
    (np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), np.nan), {}, r"preds must not contain NaN"),
    (np.zeros((1, 1, 2, 2)), np.zeros((1, 0, 2, 2)), {}, r"at least one sample"),
    (np.zeros((0, 1, 2, 2)), np.zeros((0, 1, 2, 2)), {}, r"labels must not have an empty"),
    (np.array([["a"]]), np.zeros((1, 1, 2, 2)), {}, r"labels must hold numbers"),
    (np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), {"convention": "phiseg"},
     r"convention must be one of 'dpersona', 'standard', got 'phiseg'"),
])
def test_input_validation(labels, preds, kwargs, message):
  with pytest.raises(ValueError, match=message):
    metrics.score(labels, preds, **kwargs)


def test_accepts_bool_int_and_float64_inputs():
  rng = np.random.default_rng(12)
  labels = random_masks(rng, (4, 4, 6, 6))
  preds = rng.random((4, 5, 6, 6))
  base = metrics.score(labels, preds.astype(np.float32))
  for lab in (labels.astype(bool), labels.astype(np.int64), labels.astype(np.float32)):
    assert metrics.score(lab, preds.astype(np.float32)) == base
  hard = (preds > 0.5)
  assert metrics.score(labels, hard)["mean"]["dice_match"] == base["mean"]["dice_match"]
  f64 = metrics.score(labels, preds)
  assert f64["mean"]["ged"] == pytest.approx(base["mean"]["ged"], abs=1e-12)

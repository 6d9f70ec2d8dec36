"""Tests of the cross-validation folds and the validation carve-out."""

import numpy as np
import pytest

from prosona_jax.data.errors import DataError
from prosona_jax.data.splits import check_disjoint, fold_indices, make_split


def _patient_ids(num_patients: int = 23, seed: int = 0) -> list[str]:
  """Patients with 1..6 images each, images interleaved (not grouped by patient)."""
  rng = np.random.default_rng(seed)
  ids = [f"LIDC-{p:04d}" for p in range(num_patients) for _ in range(rng.integers(1, 7))]
  return [ids[i] for i in rng.permutation(len(ids))]


def _patients(ids, indices) -> set[str]:
  return {ids[i] for i in indices}


@pytest.mark.parametrize("num_folds", [2, 4, 5])
def test_patient_folds_partition_and_are_disjoint(num_folds):
  ids = _patient_ids()
  folds = fold_indices(ids, num_folds=num_folds, seed=1337)
  assert len(folds) == num_folds
  everything = np.concatenate(folds)
  np.testing.assert_array_equal(np.sort(everything), np.arange(len(ids)))  # Exactly once.
  for f in folds:
    assert f.size > 0 and np.all(np.diff(f) > 0)  # Non-empty and sorted.
  for a in range(num_folds):
    for b in range(a + 1, num_folds):
      assert not _patients(ids, folds[a]) & _patients(ids, folds[b])
  # Every image of a patient is in that patient's fold.
  for f in folds:
    members = _patients(ids, f)
    assert {i for i, p in enumerate(ids) if p in members} == set(f.tolist())


def test_patient_folds_are_balanced_by_image_count():
  ids = _patient_ids(num_patients=40)
  sizes = [f.size for f in fold_indices(ids, num_folds=4)]
  # Greedy balancing keeps folds within one patient's size (<= 6 images) of each other.
  assert max(sizes) - min(sizes) <= 6


def test_folds_deterministic_and_seed_dependent():
  ids = _patient_ids()
  a = fold_indices(ids, seed=1337)
  b = fold_indices(list(ids), seed=1337)
  c = fold_indices(ids, seed=7)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_slice_level_folds():
  ids = ["same"] * 10 + ["other"] * 3  # Only 2 patients: patient level cannot do 4 folds.
  folds = fold_indices(ids, num_folds=4, seed=1337, level="slice")
  assert [f.size for f in folds] == [4, 3, 3, 3]  # np.array_split sizes.
  np.testing.assert_array_equal(np.sort(np.concatenate(folds)), np.arange(13))
  again = fold_indices(ids, num_folds=4, seed=1337, level="slice")
  assert all(np.array_equal(x, y) for x, y in zip(folds, again))
  with pytest.raises(DataError, match="patient"):
    fold_indices(ids, num_folds=4, level="patient")
  with pytest.raises(DataError):
    fold_indices(ids[:3], num_folds=4, level="slice")


def test_check_disjoint_names_the_shared_patient():
  ids = ["a", "a", "b", "c", "shared", "shared"]
  check_disjoint(ids, [np.array([0, 1, 2]), np.array([3, 4, 5])])  # Fine.
  with pytest.raises(DataError, match=r"'shared'.*fold 0 and fold 1"):
    check_disjoint(ids, [np.array([0, 1, 4]), np.array([2, 3, 5])])


@pytest.mark.parametrize("level", ["patient", "slice"])
@pytest.mark.parametrize("fold", [0, 3])
def test_make_split_disjoint_and_complete(level, fold):
  ids = _patient_ids()
  split = make_split(ids, fold=fold, num_folds=4, seed=1337, level=level, val_fraction=0.2)
  test = fold_indices(ids, num_folds=4, seed=1337, level=level)[fold]
  np.testing.assert_array_equal(split.test, test)
  parts = [split.train, split.val, split.test]
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(ids)))
  assert split.val.size > 0 and split.train.size > 0
  # Validation shares no patient with training, and no image with test.
  assert not _patients(ids, split.val) & _patients(ids, split.train)
  assert not set(split.val.tolist()) & set(split.test.tolist())
  if level == "patient":
    assert not _patients(ids, split.val) & _patients(ids, split.test)
  again = make_split(ids, fold=fold, num_folds=4, seed=1337, level=level, val_fraction=0.2)
  np.testing.assert_array_equal(again.val, split.val)


def test_val_fraction_counts_patients():
  ids = _patient_ids(num_patients=40)
  split = make_split(ids, fold=0, val_fraction=0.25)
  train_val_patients = _patients(ids, np.concatenate([split.train, split.val]))
  assert len(_patients(ids, split.val)) == round(0.25 * len(train_val_patients))
  none = make_split(ids, fold=0, val_fraction=0.0)
  assert none.val.size == 0


def test_bad_arguments_raise_clearly():
  ids = _patient_ids()
  with pytest.raises(ValueError, match="out of range"):
    make_split(ids, fold=4, num_folds=4)
  with pytest.raises(ValueError, match="out of range"):
    make_split(ids, fold=-1)
  with pytest.raises(ValueError, match="level"):
    fold_indices(ids, level="volume")
  with pytest.raises(ValueError, match="val_fraction"):
    make_split(ids, fold=0, val_fraction=1.0)
  with pytest.raises(DataError, match="empty"):
    fold_indices([])
  # 4 patients, 4 folds: 3 patients outside the test fold; 0.9 would take all three.
  with pytest.raises(DataError, match="val"):
    make_split(["a", "b", "c", "d"], fold=0, val_fraction=0.9)

"""K-fold cross-validation splits grouped by patient, plus a validation carve-out.

Two fold schemes (config field `data.split_level`):

- `"patient"` (default): every image of a patient lands in the same fold, so no patient is
  both trained and tested on. The sorted unique patient ids are shuffled with
  `np.random.default_rng(seed)` and then *balanced by image count*: each patient, in
  shuffled order, goes to the fold that currently holds the fewest images (ties go to the
  lowest fold number). Balancing matters because patients contribute very different
  numbers of images (LIDC: 1 to dozens of lesions), so round-robin dealing can give folds
  of quite unequal size. The first K patients always open the K folds, so every fold is
  non-empty whenever there are at least K patients.
- `"slice"`: D-Persona's historical folds, ignoring patients: the image indices are
  permuted with `np.random.default_rng(seed)` and cut into K nearly equal parts
  (`np.array_split`). The same scheme as D-Persona's, not its exact RNG stream, so the
  membership of each fold differs from their published folds.

The validation set is always carved by patient from the training folds (never from the
test fold), with an RNG seeded by `(seed, fold)` so each fold's carve-out is fixed.
"""

from collections.abc import Sequence
import dataclasses

import numpy as np

from prosona_jax.data.errors import DataError

LEVELS = ("patient", "slice")


@dataclasses.dataclass(frozen=True)
class Split:
  """Sorted int64 index arrays into a source, pairwise disjoint.

  Attributes:
    train: Images to train on.
    val: Images for model selection (patients disjoint from `train`).
    test: Images of the held-out fold.
  """
  train: np.ndarray
  val: np.ndarray
  test: np.ndarray


def _as_ids(patient_ids: Sequence[str]) -> np.ndarray:
  """Returns the ids as a numpy str array, refusing an empty list."""
  ids = np.asarray([str(p) for p in patient_ids], dtype=str)
  if ids.size == 0:
    raise DataError("cannot split an empty dataset: patient_ids is empty")
  return ids


def _check_args(num_folds: int, level: str) -> None:
  if not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
    raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}")
  if level not in LEVELS:
    raise ValueError(f"split level must be one of {LEVELS}, got {level!r}")


def check_disjoint(patient_ids: Sequence[str], folds: Sequence[np.ndarray]) -> None:
  """Raises if any patient has images in two different folds.

  Args:
    patient_ids: Patient id of every image of the source.
    folds: Index arrays into `patient_ids`, one per fold.

  Raises:
    DataError: Naming the first patient found in two folds and both fold numbers.
  """
  ids = _as_ids(patient_ids)
  owner: dict[str, int] = {}
  for fold, indices in enumerate(folds):
    for patient in np.unique(ids[np.asarray(indices, dtype=np.int64)]):
      patient = str(patient)
      if patient in owner and owner[patient] != fold:
        raise DataError(
            f"patient {patient!r} appears in fold {owner[patient]} and fold {fold}; "
            "patient-level folds must not share patients")
      owner[patient] = fold


def fold_indices(patient_ids: Sequence[str], *, num_folds: int = 4, seed: int = 1337,
                 level: str = "patient") -> list[np.ndarray]:
  """Returns the test indices of each of the K folds.

  Args:
    patient_ids: Patient id of every image, in source order.
    num_folds: K.
    seed: Seed of the fold assignment.
    level: `"patient"` (grouped, image-count balanced) or `"slice"` (D-Persona's).

  Returns:
    K sorted int64 arrays that partition `range(len(patient_ids))`.

  Raises:
    DataError: Fewer patients (patient level) or images (slice level) than folds.
    ValueError: A bad `num_folds` or `level`.
  """
  _check_args(num_folds, level)
  ids = _as_ids(patient_ids)
  rng = np.random.default_rng(seed)
  if level == "slice":
    if ids.size < num_folds:
      raise DataError(f"{ids.size} images cannot fill {num_folds} slice-level folds")
    parts = np.array_split(rng.permutation(ids.size), num_folds)
    return [np.sort(p).astype(np.int64) for p in parts]

  unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
  if unique.size < num_folds:
    raise DataError(
        f"{unique.size} patient(s) cannot fill {num_folds} patient-level folds; "
        "lower data.num_folds or use data.split_level='slice'")
  order = rng.permutation(unique.size)
  fold_of_patient = np.empty(unique.size, dtype=np.int64)
  load = np.zeros(num_folds, dtype=np.int64)
  for p in order:
    target = int(np.argmin(load))  # argmin returns the first minimum: ties -> lowest fold
    fold_of_patient[p] = target
    load[target] += counts[p]
  image_fold = fold_of_patient[inverse.reshape(-1)]
  folds = [np.flatnonzero(image_fold == k).astype(np.int64) for k in range(num_folds)]
  check_disjoint(ids, folds)  # Cheap self-check of the grouping.
  return folds


def make_split(patient_ids: Sequence[str], *, fold: int, num_folds: int = 4,
               seed: int = 1337, level: str = "patient",
               val_fraction: float = 0.1) -> Split:
  """Returns the train / val / test indices of one cross-validation fold.

  The test set is fold `fold` of `fold_indices`. Of the remaining images, the patients are
  shuffled (RNG seeded by `(seed, fold)`) and the first `round(val_fraction * P)` of them
  (at least one when `val_fraction > 0`) become validation; the rest is training.

  Args:
    patient_ids: Patient id of every image, in source order.
    fold: The test fold, 0..num_folds-1.
    num_folds: K.
    seed: Seed of the fold assignment and of the validation carve-out.
    level: Fold scheme, see `fold_indices`.
    val_fraction: Fraction of training-fold patients moved to validation, in [0, 1).

  Returns:
    A `Split` of sorted, pairwise disjoint int64 index arrays.

  Raises:
    ValueError: A fold outside 0..K-1 or a bad `val_fraction`.
    DataError: Too few patients for the folds or for a train/val split.
  """
  _check_args(num_folds, level)
  if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)):
    raise ValueError(f"fold must be an integer, got {fold!r}")
  if not 0 <= fold < num_folds:
    raise ValueError(
        f"fold {fold} is out of range for {num_folds} folds (valid: 0..{num_folds - 1}; "
        "data.fold=-1 means 'every fold' and is expanded by the caller)")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
  ids = _as_ids(patient_ids)
  folds = fold_indices(ids, num_folds=num_folds, seed=seed, level=level)
  test = folds[fold]
  pool = np.sort(np.concatenate([f for k, f in enumerate(folds) if k != fold]))
  if val_fraction == 0.0:
    return Split(train=pool, val=np.zeros(0, np.int64), test=test)

  pool_patients = np.unique(ids[pool])
  num_val = max(1, int(round(val_fraction * pool_patients.size)))
  if num_val >= pool_patients.size:
    raise DataError(
        f"only {pool_patients.size} patient(s) outside test fold {fold}: cannot carve "
        f"{num_val} validation patient(s) and keep any for training; "
        "lower data.val_fraction or data.num_folds")
  rng = np.random.default_rng([seed, fold])
  val_patients = pool_patients[rng.permutation(pool_patients.size)[:num_val]]
  is_val = np.isin(ids[pool], val_patients)
  return Split(train=pool[~is_val], val=pool[is_val], test=test)

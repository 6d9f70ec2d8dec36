"""Tests of the synthetic multi-rater set: determinism, rater styles, speed."""

import pickle
import re
import time

import numpy as np
import pytest

from prosona_jax.data.errors import DataError
from prosona_jax.data.sources import open_source
from prosona_jax.data.synthetic import (RATER_NAMES, RATER_STYLES, SyntheticSource,
                                        rater_names, rater_styles)


@pytest.fixture(scope="module")
def small():
  return SyntheticSource(num_images=96, num_patients=12, seed=0, image_size=64)


def test_items_follow_the_record_contract(small):
  item = small[5]
  assert item["image"].dtype == np.float32 and item["image"].shape == (64, 64, 1)
  assert item["masks"].dtype == np.uint8 and item["masks"].shape == (4, 64, 64)
  assert set(np.unique(item["masks"]).tolist()) <= {0, 1}
  assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
  assert item["key"] == small.keys[5] and item["patient_id"] == small.patient_ids[5]
  assert item["key"].split("_")[0] == item["patient_id"]
  assert len(set(small.patient_ids)) == 12 and len(set(small.keys)) == 96
  assert small.num_raters == 4 and small.image_shape == (64, 64, 1)
  assert "synthetic" in small.describe() and "SyntheticSource(" in repr(small)


def test_deterministic_per_seed_and_per_index(small):
  again = SyntheticSource(num_images=10, num_patients=12, seed=0, image_size=64)
  for i in range(10):
    np.testing.assert_array_equal(again[i]["image"], small[i]["image"])
    np.testing.assert_array_equal(again[i]["masks"], small[i]["masks"])
    assert again.keys[i] == small.keys[i]
  other = SyntheticSource(num_images=10, num_patients=12, seed=1, image_size=64)
  assert not np.array_equal(other[0]["image"], small[0]["image"])


def test_rater_styles_are_distinct_and_ordered(small):
  areas = small.mask_areas()
  mean = areas.mean(axis=0)
  assert np.all(mean[1:] > 1.3 * mean[:-1]), mean  # Strictly increasing, clear gaps.
  # Per image too: each rater's rule is consistent, not only on average.
  assert np.all(np.diff(areas, axis=1) >= 0)
  assert (areas[:, 0] == 0).sum() > 0  # The conservative rater misses faint lesions.
  assert (areas[:, 1:] > 0).all()
  assert len(RATER_STYLES) == 4 and len(set(RATER_STYLES)) == 4
  assert RATER_STYLES[0].startswith("conservative") and RATER_STYLES[-1].startswith(
      "inclusive")
  assert small.styles == RATER_STYLES
  for r in (1, 2, 3, 6):
    assert len(rater_styles(r)) == r and len(set(rater_styles(r))) == r


def test_one_list_of_rater_names_that_fits_the_prompt_bank(small):
  from configs import demo  # pylint: disable=g-import-not-at-top
  from prosona_jax import prompt_bank  # pylint: disable=g-import-not-at-top
  assert len(RATER_NAMES) == 4 and len(set(RATER_NAMES)) == 4
  assert [s.split(":")[0] for s in RATER_STYLES] == list(RATER_NAMES)
  assert tuple(demo.get_config().data.rater_names) == RATER_NAMES
  assert small.rater_names == RATER_NAMES == rater_names(4)
  for r in (1, 2, 3, 6):
    assert len(rater_names(r)) == r and len(set(rater_names(r))) == r
  # No name borrows a word the synthetic prompt bank uses for another rater.
  bank = prompt_bank.SYNTHETIC_PROMPTS
  for k, name in enumerate(RATER_NAMES):
    for other in range(4):
      if other == k:
        continue
      words = set(re.findall(r"[a-z]+", " ".join(bank["train"][other]
                                                  + bank["heldout"][other]).lower()))
      for word in name.split("-"):
        assert word not in words, (name, word, other)


@pytest.mark.parametrize("num_raters", [2, 6])
def test_any_number_of_raters_keeps_the_order(num_raters):
  source = SyntheticSource(num_images=32, num_patients=8, image_size=32,
                           num_raters=num_raters, in_channels=3)
  assert source.image_shape == (32, 32, 3) and source.num_raters == num_raters
  mean = source.mask_areas().mean(axis=0)
  assert np.all(np.diff(mean) > 0), mean


def test_area_ordering_option_and_pickling(small):
  ordered = open_source("synthetic", num_images=16, num_patients=4, image_size=64,
                        order_raters_by_area=True)
  assert ordered.order_raters_by_area and not small.order_raters_by_area
  np.testing.assert_array_equal(ordered[3]["masks"], small[3]["masks"])  # Already sorted.
  copy = pickle.loads(pickle.dumps(small))
  np.testing.assert_array_equal(copy[7]["masks"], small[7]["masks"])


def test_default_size_is_fast():
  start = time.perf_counter()
  source = SyntheticSource(num_images=256, num_patients=64, image_size=128)
  elapsed = time.perf_counter() - start
  assert len(source) == 256 and elapsed < 4.0, elapsed  # About 0.5 s on one idle core.


@pytest.mark.parametrize("kwargs", [dict(num_images=0), dict(num_patients=0),
                                    dict(image_size=4), dict(num_raters=0)])
def test_bad_arguments_are_errors(kwargs):
  with pytest.raises(DataError, match=next(iter(kwargs))):
    SyntheticSource(**kwargs)

"""Tests of the augmentation and the Grain training / evaluation pipelines."""

import numpy as np
import pytest

from prosona_jax.data import augment
from prosona_jax.data import pipeline
from prosona_jax.data.errors import DataError

H = W = 16


class TinySource:
  """In-memory source: image pixel (0, 0) holds the record index, masks are blobs."""

  def __init__(self, n: int = 20, raters: int = 2):
    self.n, self.raters = n, raters
    self.patient_ids = [f"p{i // 2}" for i in range(n)]

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    rng = np.random.default_rng(i)
    image = rng.random((H, W, 1), dtype=np.float32)
    image[0, 0, 0] = i  # Identifies the record when augmentation is off.
    masks = np.zeros((self.raters, H, W), np.uint8)
    for r in range(self.raters):
      masks[r, 3:9 + r, 4:7] = 1
    return {"image": image, "masks": masks, "key": f"k{i}", "patient_id": self.patient_ids[i]}


def _l_shape() -> np.ndarray:
  """An asymmetric, off-centre blob: every flip or rotation changes it."""
  m = np.zeros((H, W), np.uint8)
  m[2:12, 3:6] = 1
  m[9:12, 6:11] = 1
  return m


def _ids(batch) -> list[int]:
  return [int(round(v)) for v in batch["image"][:, 0, 0, 0]]


def _loader(source, **kw):
  args = dict(batch_size=4, seed=3, shard_index=0, shard_count=1)
  args.update(kw)
  return pipeline.train_loader(source, np.arange(len(source)), **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["masks"], b["masks"])


# ------------------------------------------------------------------ augmentation


def test_flip_only_is_an_exact_flip_of_image_and_masks():
  mask = _l_shape()
  image = mask[..., None].astype(np.float32)
  masks = np.stack([mask, 1 - mask])
  seen = set()
  for seed in range(16):
    out_img, out_masks = augment.augment_example(image, masks, np.random.default_rng(seed),
                                                 flip=True, rotate=False)
    flips = {(h, v): mask[::-1 if v else 1, ::-1 if h else 1] for h in (0, 1) for v in (0, 1)}
    match = [k for k, f in flips.items() if np.array_equal(out_masks[0], f)]
    assert len(match) == 1
    seen.add(match[0])
    np.testing.assert_array_equal(out_img[..., 0], out_masks[0])  # Image moved the same.
    np.testing.assert_array_equal(out_masks[1], 1 - out_masks[0])
  assert len(seen) == 4  # All four flip combinations occur.


def test_rotation_by_90_matches_rot90():
  mask = _l_shape()
  image = mask[..., None].astype(np.float32) * 0.8
  out_img, out_masks = augment.transform_example(image, mask[None], angle=90.0)
  np.testing.assert_array_equal(out_masks[0], np.rot90(mask))
  np.testing.assert_allclose(out_img[..., 0], np.rot90(image[..., 0]), atol=1e-5)


def test_random_rotation_keeps_masks_binary_and_aligned():
  mask = _l_shape()
  image = mask[..., None].astype(np.float32)
  changed = 0
  for seed in range(10):
    out_img, out_masks = augment.augment_example(image, np.stack([mask, mask]),
                                                 np.random.default_rng(seed))
    assert out_img.dtype == np.float32 and out_img.shape == (H, W, 1)
    assert out_masks.dtype == np.uint8 and set(np.unique(out_masks)) <= {0, 1}
    assert out_masks[0].sum() > 0.5 * mask.sum()  # The blob survives the rotation.
    mismatch = np.sum((out_img[..., 0] >= 0.5) != out_masks[0].astype(bool))
    assert mismatch <= 2  # Aligned: at most a couple of rounding pixels on the edge.
    changed += not np.array_equal(out_masks[0], mask)
  assert changed == 10


def test_augment_transform_passes_other_fields_and_is_seeded():
  record = TinySource()[5]
  t = augment.Augment()
  a = t.random_map(record, np.random.default_rng(1))
  b = t.random_map(record, np.random.default_rng(1))
  assert a["key"] == "k5" and a["patient_id"] == record["patient_id"]
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["masks"], b["masks"])


# ------------------------------------------------------------------ training stream


def test_batches_shapes_epochs_and_determinism():
  source = TinySource(n=10)
  it = _loader(source, augment_flip=False, augment_rotate=False, num_epochs=2)
  batches = list(it)
  # 10 examples, batch 4, drop remainder: 2 batches per epoch, 2 epochs.
  assert len(batches) == 2 * pipeline.steps_per_epoch(10, 4) == 4
  b = batches[0]
  assert set(b) == {"image", "masks"}
  assert b["image"].shape == (4, H, W, 1) and b["image"].dtype == np.float32
  assert b["masks"].shape == (4, 2, H, W) and b["masks"].dtype == np.uint8
  epoch0, epoch1 = _ids(batches[0]) + _ids(batches[1]), _ids(batches[2]) + _ids(batches[3])
  assert len(set(epoch0)) == 8 and len(set(epoch1)) == 8  # No repeats inside an epoch.
  assert epoch0 != epoch1  # Reshuffled per epoch.
  _assert_same(_take(_loader(source, num_epochs=2), 4), _take(_loader(source), 4))
  other = _take(_loader(source, seed=4), 1)[0]
  assert not np.array_equal(other["image"], _take(_loader(source), 1)[0]["image"])


def test_indices_restrict_the_source():
  source = TinySource(n=20)
  it = pipeline.train_loader(source, [1, 3, 5, 7, 9, 11, 13, 15], batch_size=4, seed=0,
                             augment_flip=False, augment_rotate=False,
                             shard_index=0, shard_count=1)
  seen = {i for b in _take(it, 6) for i in _ids(b)}
  assert seen == {1, 3, 5, 7, 9, 11, 13, 15}


def test_state_restore_yields_exactly_the_next_batch():
  source = TinySource(n=10)
  reference = _take(_loader(source), 9)  # Crosses several epoch boundaries.
  it = _loader(source)
  _take(it, 5)
  state = it.get_state()
  fresh = _loader(source)
  fresh.set_state(state)
  _assert_same(_take(fresh, 4), reference[5:])


def test_orbax_round_trip_of_the_iterator(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  source = TinySource(n=10)
  reference = _take(_loader(source), 6)
  it = _loader(source)
  _take(it, 3)
  params = {"w": np.arange(3, dtype=np.float32)}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(params),
                                         data=pipeline.CheckpointSave(it)))
    _take(it, 2)  # Moving on after `save` must not change what was saved.
    mngr.wait_until_finished()
  restored_it = _loader(source)
  # Restore through explicitly registered handlers, as a fresh process would.
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": pipeline.CheckpointHandler()}
  with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as mngr:
    restored = mngr.restore(3, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(params), data=pipeline.CheckpointRestore(restored_it)))
  np.testing.assert_array_equal(restored.state["w"], params["w"])
  assert restored.data is restored_it
  _assert_same(_take(restored_it, 3), reference[3:])


def test_two_shards_split_the_global_batch():
  source = TinySource(n=21)
  plain = dict(augment_flip=False, augment_rotate=False, batch_size=3)
  shards = [_take(_loader(source, shard_index=s, shard_count=2, **plain), 3) for s in (0, 1)]
  whole = _take(_loader(source, **{**plain, "batch_size": 6}), 3)
  epoch = []
  for step in range(3):
    a, b = _ids(shards[0][step]), _ids(shards[1][step])
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(_ids(whole[step]))
    epoch += a + b
  assert len(set(epoch)) == 18  # 21 // 6 * 6 distinct examples in one epoch.
  # With augmentation on, each shard gets rows 3s:3s+3 of the single-process global batch
  # (where jax.make_array_from_process_local_data puts them), across epochs too.
  aug = [_take(_loader(source, shard_index=s, shard_count=2, batch_size=3), 7) for s in (0, 1)]
  glob = _take(_loader(source, batch_size=6), 7)
  for step in range(7):
    for s in (0, 1):
      np.testing.assert_array_equal(aug[s][step]["masks"], glob[step]["masks"][3 * s:3 * s + 3])
      np.testing.assert_array_equal(aug[s][step]["image"], glob[step]["image"][3 * s:3 * s + 3])


def test_steps_per_epoch_and_errors():
  assert pipeline.steps_per_epoch(21, 3, 2) == 3
  assert pipeline.steps_per_epoch(21, 4, 2, drop_remainder=False) == 3
  assert pipeline.steps_per_epoch(5, 8) == 0
  with pytest.raises(DataError, match="batch"):
    _loader(TinySource(n=5), batch_size=8)
  with pytest.raises(DataError, match="indices"):
    pipeline.train_loader(TinySource(n=5), [0, 9], batch_size=1, seed=0,
                          shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="shard"):
    _loader(TinySource(n=5), shard_index=2, shard_count=2)


# ------------------------------------------------------------------ evaluation


def test_eval_batches_pad_and_keep_order():
  source = TinySource(n=12)
  order = [7, 2, 9, 4, 11]
  batches = list(pipeline.eval_batches(source, order, batch_size=2))
  assert len(batches) == 3
  for b in batches:
    assert b["image"].shape == (2, H, W, 1) and b["masks"].shape == (2, 2, H, W)
    assert b["valid"].dtype == bool and len(b["key"]) == 2
  assert [k for b in batches for k in b["key"]] == ["k7", "k2", "k9", "k4", "k11", ""]
  np.testing.assert_array_equal(batches[-1]["valid"], [True, False])
  assert not batches[-1]["image"][1].any() and not batches[-1]["masks"][1].any()
  np.testing.assert_array_equal(batches[0]["image"][0], source[7]["image"])  # No augment.
  assert list(pipeline.eval_batches(source, [], batch_size=4)) == []

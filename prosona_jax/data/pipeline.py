"""Grain input pipelines: a checkpointable training stream and padded evaluation batches.

Training uses Grain's `MapDataset` API, built so that the per-epoch order, the
augmentation and the global batches do not depend on how many processes share the work:

  subset(indices) -> keep image/masks -> shuffle (reseeded every epoch)
    -> augment (seeded by global position) -> trim to whole global batches
    -> batch (per-process size B) -> shard the batches [process::num_processes]
    -> repeat(num_epochs) -> iterator

Process `s` of `K` therefore gets rows `s*B:(s+1)*B` of the global batch of `K * B`
elements that a single process would have read, which is where
`jax.make_array_from_process_local_data` puts them: the global array is the
single-process batch, row for row, and every process yields the same number of batches.
Training batches hold only `image` (B, H, W, C) float32 and `masks` (B, R, H, W) uint8:
the string fields are dropped because a jitted step cannot take them.

The iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()` give a small
JSON-able dict, and Orbax saves it with Grain's own handler (`CheckpointSave` /
`CheckpointRestore` below, registered with Orbax when Grain is imported)::

  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=CheckpointSave(iterator)))
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=CheckpointRestore(iterator)))
"""

from collections.abc import Iterator, Sequence
import math
from typing import Any

import grain
import numpy as np

from prosona_jax.data.augment import Augment
from prosona_jax.data.errors import DataError

# Re-exported so the checkpointing code needs only this module.
CheckpointSave = grain.checkpoint.CheckpointSave
CheckpointRestore = grain.checkpoint.CheckpointRestore
CheckpointHandler = grain.checkpoint.CheckpointHandler


class _Subset:
  """Random-access view of `source` restricted to `indices` (picklable for workers)."""

  def __init__(self, source: Any, indices: np.ndarray):
    self.source = source
    self.indices = indices

  def __len__(self) -> int:
    return int(self.indices.size)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.source[int(self.indices[i])]


def _train_fields(record: dict[str, Any]) -> dict[str, np.ndarray]:
  """Keeps the array fields a training step consumes, with fixed dtypes."""
  return {"image": np.asarray(record["image"], dtype=np.float32),
          "masks": np.asarray(record["masks"], dtype=np.uint8)}


def _derived_seed(seed: int, stream: int) -> int:
  """A 32-bit seed per random stream, hashed so that seeds s and s+1 do not overlap.

  Grain reseeds its shuffle as `seed + epoch`; hashing keeps epoch 1 of one run from
  repeating epoch 0 of the run with the next seed.
  """
  return int(np.random.SeedSequence([int(seed), stream]).generate_state(1)[0])


def _check_indices(source: Any, indices: Sequence[int]) -> np.ndarray:
  idx = np.asarray(indices, dtype=np.int64).reshape(-1)
  if idx.size and (idx.min() < 0 or idx.max() >= len(source)):
    raise DataError(f"indices must lie in [0, {len(source)}) of the source; got "
                    f"min {idx.min()}, max {idx.max()}")
  return idx


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """Defaults to this JAX process's slot; validates explicit values."""
  if shard_index is None and shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # Imported only when defaulting.
    return jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None:
    raise ValueError("give both shard_index and shard_count, or neither")
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} of "
                     f"{shard_count}")
  return int(shard_index), int(shard_count)


def _usable_per_epoch(num_examples: int, batch_size: int, shard_count: int,
                      drop_remainder: bool) -> int:
  """Elements per epoch kept so that every process gets the same number of batches."""
  unit = batch_size * shard_count if drop_remainder else shard_count
  return (num_examples // unit) * unit


def steps_per_epoch(num_examples: int, batch_size: int, shard_count: int = 1, *,
                    drop_remainder: bool = True) -> int:
  """Number of (per-process) batches `train_loader` yields per epoch.

  Args:
    num_examples: Size of the training split.
    batch_size: Per-process batch size.
    shard_count: Number of processes sharing the epoch.
    drop_remainder: As passed to `train_loader`.

  Returns:
    Batches per epoch on each process (the same on all).
  """
  usable = _usable_per_epoch(num_examples, batch_size, shard_count, drop_remainder)
  return math.ceil(usable // shard_count / batch_size)


def _ensure_absl_flags_parsed() -> None:
  """Lets worker processes read Grain's absl flags when no absl app parsed them."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_loader(source: Any, indices: Sequence[int], *, batch_size: int, seed: int,
                 num_epochs: int | None = None, augment_flip: bool = True,
                 augment_rotate: bool = True, shard_index: int | None = None,
                 shard_count: int | None = None, worker_count: int = 0,
                 drop_remainder: bool = True, read_threads: int = 2,
                 prefetch_batches: int = 4) -> grain.DatasetIterator:
  """Returns a checkpointable iterator of augmented, shuffled training batches.

  Args:
    source: Random-access source of records (see docs/DESIGN.md).
    indices: Indices of the training split into `source`.
    batch_size: Per-process batch size (global batch = batch_size * shard_count).
    seed: Seed of the shuffle and the augmentation (epochs are reshuffled from it).
    num_epochs: Epochs before `StopIteration`; None repeats forever.
    augment_flip: Random horizontal and vertical flips.
    augment_rotate: Random rotation in [-180, 180] degrees.
    shard_index: This process's shard; default `jax.process_index()`.
    shard_count: Number of shards; default `jax.process_count()`.
    worker_count: Grain worker processes (0: read in this process). Workers pickle the
      source, so it must be picklable (open file handles lazily).
    drop_remainder: Drop each epoch's last incomplete global batch (fixed shapes). If
      False, only up to `shard_count - 1` elements per epoch are dropped and each epoch
      ends with a smaller batch.
    read_threads: Threads producing batches in this process.
    prefetch_batches: Batches read ahead (per worker when `worker_count > 0`).

  Returns:
    A `grain.DatasetIterator` of dicts `image` (B, H, W, C) float32 and `masks`
    (B, R, H, W) uint8, with `get_state()` / `set_state()`. Call `close()` when done if
    `worker_count > 0`.

  Raises:
    DataError: Bad indices, or too few examples for one batch on every shard.
    ValueError: Bad batch size, epochs, worker count or shard arguments.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")
  idx = _check_indices(source, indices)
  shard_index, shard_count = _resolve_shard(shard_index, shard_count)
  usable = _usable_per_epoch(idx.size, batch_size, shard_count, drop_remainder)
  if usable == 0:
    raise DataError(
        f"{idx.size} training example(s) cannot fill one batch of {batch_size} on each "
        f"of {shard_count} process(es); lower data.batch_size")

  ds = grain.MapDataset.source(_Subset(source, idx)).map(_train_fields)
  ds = ds.shuffle(seed=_derived_seed(seed, 0))
  if augment_flip or augment_rotate:
    # Seeded by position in the (epoch-folded) stream, before sharding, so a given
    # element's augmentation does not depend on the number of processes.
    ds = ds.random_map(Augment(flip=augment_flip, rotate=augment_rotate),
                       seed=_derived_seed(seed, 1))
  if usable < idx.size:
    ds = ds[:usable]  # Slices are epoch-aware: each epoch drops its own shuffled tail.
  if drop_remainder:
    # Shard whole per-process batches: contiguous rows of each global batch (see above).
    ds = ds.batch(batch_size, drop_remainder=True)
    if shard_count > 1:
      ds = ds[shard_index::shard_count]
  else:
    if shard_count > 1:
      ds = ds[shard_index::shard_count]
    ds = ds.batch(batch_size, drop_remainder=False)
  ds = ds.repeat(num_epochs)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=prefetch_batches))
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=prefetch_batches))
  return iter(it_ds)


def eval_batches(source: Any, indices: Sequence[int], *,
                 batch_size: int) -> Iterator[dict[str, Any]]:
  """Yields fixed-size evaluation batches in the order of `indices`, without augmentation.

  The last batch is padded to `batch_size` with zero images and masks so every batch has
  the same shapes (one compilation); `valid` marks the real rows.

  Args:
    source: Random-access source of records.
    indices: Indices to evaluate, in the order wanted.
    batch_size: Rows per batch.

  Yields:
    Dicts with `image` (B, H, W, C) float32, `masks` (B, R, H, W) uint8, `valid` (B,)
    bool, and `key` / `patient_id` lists of B str ("" for padding rows).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  idx = _check_indices(source, indices)
  for start in range(0, idx.size, batch_size):
    records = [source[int(i)] for i in idx[start:start + batch_size]]
    pad = batch_size - len(records)
    image = np.stack([np.asarray(r["image"], np.float32) for r in records])
    masks = np.stack([np.asarray(r["masks"], np.uint8) for r in records])
    if pad:
      image = np.concatenate([image, np.zeros((pad,) + image.shape[1:], image.dtype)])
      masks = np.concatenate([masks, np.zeros((pad,) + masks.shape[1:], masks.dtype)])
    yield {
        "image": image,
        "masks": masks,
        "valid": np.arange(batch_size) < len(records),
        "key": [str(r["key"]) for r in records] + [""] * pad,
        "patient_id": [str(r["patient_id"]) for r in records] + [""] * pad,
    }

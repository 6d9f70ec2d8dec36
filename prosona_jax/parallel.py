"""Device mesh and data placement: batch sharded over `data`, parameters replicated.

Works the same on one CPU, 8 fake CPU devices, a GPU node or a multi-host TPU slice: each
process hands in its own part of the global batch and JAX assembles the global array.
"""

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from prosona_jax.errors import ConfigError


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, axis name `data`."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def items_per_pass(configured: int, num_items: int, what: str) -> int:
  """How many of `num_items` independent items (grid cells, prompts) one pass vmaps.

  `configured` > 0 is taken as given (capped at `num_items`); 0 means auto: every item at
  once on accelerators, one per pass on CPU, where vmapping many of Fcomb's full-size
  decodes outgrows the caches and runs memory-bound (`benchmarks/bench_grid.py`).
  """
  if configured < 0:
    raise ValueError(f"{what} must be >= 0 (0: auto), got {configured}.")
  if configured == 0:
    configured = 1 if jax.default_backend() == "cpu" else num_items
  return max(1, min(configured, num_items))


def map_in_passes(fn, xs, per_pass: int, num_items: int):
  """`jax.vmap(fn)(xs)` over the leading axis, run `per_pass` items at a time.

  All at once is a plain vmap; fewer is `jax.lax.map` with `batch_size` (vmapped passes
  one after the other). The results are the same, up to float rounding.
  """
  if per_pass >= num_items:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=per_pass)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Returns the per-process batch size, or raises if the batch does not divide evenly."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch_size % n_dev:
    raise ConfigError(
        f"config.data.batch_size={global_batch_size} must be a multiple of the number of "
        f"devices ({n_dev}) for data-parallel training.")
  return global_batch_size // n_proc


def to_global(batch: dict, mesh: Mesh) -> dict:
  """Turns this process's numpy batch into global arrays sharded along `data`.

  Non-numeric fields (keys, strings) stay on the host and are dropped here.
  """
  sharding = batch_sharded(mesh)
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "biuf":
      out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out


def local_slice(batch: dict, n: int) -> dict:
  """This process's share of an eval batch that every process iterates identically."""
  p, count = jax.process_index(), jax.process_count()
  per = n // count
  return {k: v[p * per:(p + 1) * per] for k, v in batch.items()
          if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


def replicate(tree, mesh: Mesh):
  """Places a pytree of host or device arrays replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))

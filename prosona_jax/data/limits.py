"""How much memory and nesting one input file may make a reader allocate.

A hostile or corrupt file can declare sizes its bytes do not hold (an array
header claiming 10^12 elements) or make a reader build the same large object
many times over (a pickle referring to one array thousands of times). Readers
therefore charge what a file makes them allocate against a budget that grows
with the file: `max(multiple * file size, floor)`. The floor lets small files
hold anything reasonable; the multiple lets genuine large files through.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

# Overrides the floor of every reader's budget, in bytes (for genuine files that
# expand more than the default multiple allows, e.g. highly compressed .npz).
ENV_MAX_BYTES = "PROSONA_DATA_MAX_BYTES"
DEFAULT_FLOOR_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class ReadLimits:
  """Bounds on what one input file may make a reader allocate or nest.

  Attributes:
    multiple: The budget as a multiple of the file's size in bytes.
    floor_bytes: The budget of small files; None reads `$PROSONA_DATA_MAX_BYTES`,
      else 256 MiB.
    max_depth: How deeply containers (dicts, lists, tuples) may nest.
  """
  multiple: float = 8.0
  floor_bytes: Optional[int] = None
  max_depth: int = 64

  def floor(self) -> int:
    """The floor in bytes (the environment's, when not set here)."""
    if self.floor_bytes is not None:
      return int(self.floor_bytes)
    value = os.environ.get(ENV_MAX_BYTES, "")
    try:
      return int(value) if value else DEFAULT_FLOOR_BYTES
    except ValueError:  # A typo must not silently lift or drop the limit.
      raise ValueError(f"${ENV_MAX_BYTES}={value!r}; expected a number of bytes") from None

  def budget(self, file_size: int) -> int:
    """The most bytes a file of `file_size` bytes may make a reader allocate."""
    return max(int(self.multiple * file_size), self.floor())

  def describe(self, file_size: int) -> str:
    """How the budget came about, for error messages."""
    return (f"{self.budget(file_size):,} bytes = max({self.multiple:g} x the file's "
            f"{file_size:,} bytes, {self.floor():,}); if the file is genuine, raise it with "
            f"{ENV_MAX_BYTES}=<bytes>")


# Pickles: every byte an array holds is in the file, so 8x leaves room for the
# copies a reader makes (decoded text, built arrays, records handed over).
PICKLE_LIMITS = ReadLimits(multiple=8.0)
# .npz members may be deflated, and masks compress well: allow more expansion.
NPZ_LIMITS = ReadLimits(multiple=64.0)

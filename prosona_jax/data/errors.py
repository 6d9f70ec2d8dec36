"""The one exception every data reader raises for bad input."""

from __future__ import annotations

import os
from typing import Optional, Union

from prosona_jax.errors import UserError

PathLike = Union[str, os.PathLike]


class DataError(UserError, ValueError):
  """Input data that does not match the expected format.

  The message always names the file (or folder), the record key or array name
  when there is one, and what was expected, so that a user can find and fix the
  offending entry without reading the reader's code.
  """


def data_error(path: PathLike, what: str, key: Optional[str] = None) -> DataError:
  """Builds a `DataError` with the uniform `<file>: <key>: <what>` layout.

  Args:
    path: The file or folder being read.
    what: What is wrong and what was expected.
    key: The record key or array name, if the problem is local to one.

  Returns:
    The error, for the caller to raise.
  """
  where = f"{os.fspath(path)}: "
  if key is not None:
    where += f"{key!r}: "
  return DataError(where + what)

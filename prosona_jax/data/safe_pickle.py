"""Restricted unpickling of the LIDC dataset pickles.

The multi-rater literature distributes LIDC as pickles, and unpickling an
untrusted file can run arbitrary code. Every global a pickle refers to therefore
goes through an allow-list: numpy array reconstruction, builtin containers and
pydicom's UID / value types (or stand-ins for them when pydicom is absent, so
that the 3.4 GB `data_lidc.pickle` loads without pydicom installed). Anything
else (`os.system`, `builtins.eval`, ...) raises a `DataError` before it can run.

`stream_dict_records` reads a pickled `dict key -> record` from the open file
and hands each record to a callback as soon as its batch is complete, then
forgets it, so that a caller converting records to compact arrays never holds
the whole decoded file (plus a converted copy) in memory.
"""

from __future__ import annotations

import collections
import decimal
import importlib
import os
import pickle
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from prosona_jax.data.errors import DataError, PathLike

# Python 2 era pickles name the builtins modules differently.
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

_BUILTINS = frozenset({
    "dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes", "str",
    "int", "float", "complex", "bool", "slice", "object"})


def _numpy_attr(submodule: str, name: str) -> Any:
  # numpy 2 moved `numpy.core` to `numpy._core`; pickles name either.
  for prefix in ("numpy._core.", "numpy.core."):
    try:
      module = importlib.import_module(prefix + submodule)
    except ImportError:
      continue
    if hasattr(module, name):
      return getattr(module, name)
  raise AttributeError(f"numpy has no {submodule}.{name}")


_NUMPY_GLOBALS: Dict[Tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}
for _core in ("numpy.core", "numpy._core"):
  _NUMPY_GLOBALS[(_core + ".multiarray", "_reconstruct")] = (
      lambda: _numpy_attr("multiarray", "_reconstruct"))
  _NUMPY_GLOBALS[(_core + ".multiarray", "scalar")] = (
      lambda: _numpy_attr("multiarray", "scalar"))
  _NUMPY_GLOBALS[(_core + ".numeric", "_frombuffer")] = (
      lambda: _numpy_attr("numeric", "_frombuffer"))


class UID(str):
  """Stand-in for `pydicom.uid.UID` when pydicom is not installed."""


class DSfloat(float):
  """Stand-in for `pydicom.valuerep.DSfloat`."""


class DSdecimal(decimal.Decimal):
  """Stand-in for `pydicom.valuerep.DSdecimal`."""


class IS(int):
  """Stand-in for `pydicom.valuerep.IS`."""


class PersonName:
  """Stand-in for `pydicom.valuerep.PersonName` (state kept as attributes)."""

  def __str__(self) -> str:
    return str(getattr(self, "original_string", ""))


_STAND_INS = {"UID": UID, "DSfloat": DSfloat, "DSdecimal": DSdecimal, "IS": IS,
              "PersonName": PersonName, "PersonName3": PersonName}
# (module named in the pickle, class name) -> real pydicom module to import.
_PYDICOM_GLOBALS = {
    ("pydicom.uid", "UID"): "pydicom.uid",
    ("dicom.UID", "UID"): "pydicom.uid",  # pydicom < 1.0 was the `dicom` package.
}
for _name in ("DSfloat", "DSdecimal", "IS", "PersonName", "PersonName3"):
  _PYDICOM_GLOBALS[("pydicom.valuerep", _name)] = "pydicom.valuerep"
  _PYDICOM_GLOBALS[("dicom.valuerep", _name)] = "pydicom.valuerep"


def _pydicom_class(real_module: str, name: str) -> type:
  """Returns pydicom's own class when importable, else the stand-in."""
  try:
    module = importlib.import_module(real_module)
  except ImportError:  # Includes `sys.modules["pydicom"] = None`.
    return _STAND_INS[name]
  cls = getattr(module, name, None)
  if cls is None and name == "PersonName3":
    cls = getattr(module, "PersonName", None)
  return cls if isinstance(cls, type) else _STAND_INS[name]


def resolve_global(path: PathLike, module: str, name: str) -> Any:
  """Resolves a pickled global reference through the allow-list.

  Args:
    path: The file being unpickled (for the error message).
    module: The module the pickle names.
    name: The attribute the pickle names.

  Returns:
    The allowed object.

  Raises:
    DataError: The global is not on the allow-list; nothing was imported from it.
  """
  module = _MODULE_ALIASES.get(module, module)
  if module == "builtins" and name in _BUILTINS:
    return getattr(__import__("builtins"), name)
  if (module, name) in (("copyreg", "_reconstructor"), ("copyreg", "__newobj__")):
    # These only instantiate classes that themselves passed this allow-list.
    return getattr(__import__("copyreg"), name)
  if (module, name) == ("collections", "OrderedDict"):
    return collections.OrderedDict
  if (module, name) == ("_codecs", "encode"):  # Protocol-2 bytes of arrays.
    return __import__("_codecs").encode
  if (module, name) in _NUMPY_GLOBALS:
    return _NUMPY_GLOBALS[(module, name)]()
  if module == "numpy.dtypes" and name.endswith("DType"):
    cls = getattr(importlib.import_module("numpy.dtypes"), name, None)
    if isinstance(cls, type) and issubclass(cls, np.dtype):
      return cls
  if (module, name) in _PYDICOM_GLOBALS:
    return _pydicom_class(_PYDICOM_GLOBALS[(module, name)], name)
  raise DataError(
      f"{os.fspath(path)}: refusing to unpickle global '{module}.{name}': only "
      "numpy arrays, builtin containers and pydicom UID/value types are allowed "
      "(the file may be corrupt or malicious)")


class RestrictedUnpickler(pickle.Unpickler):
  """A `pickle.Unpickler` whose `find_class` enforces the allow-list."""

  def __init__(self, file: Any, path: PathLike):
    super().__init__(file, encoding="latin1")
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    return resolve_global(self._path, module, name)

  def persistent_load(self, pid: Any) -> Any:
    raise DataError(f"{os.fspath(self._path)}: persistent ids are not allowed")


def safe_load(path: PathLike) -> Any:
  """Unpickles a whole file through the allow-list (for small files).

  Raises:
    DataError: A forbidden global, or a file that is not a valid pickle.
  """
  with open(path, "rb") as f:
    try:
      return RestrictedUnpickler(f, path).load()
    except DataError:
      raise
    except Exception as e:  # Truncated or corrupt pickles raise many types.
      raise DataError(f"{os.fspath(path)}: not a readable pickle ({e!r})") from e


_DROPPED = object()  # Memo slot of an object already handed to the callback.


def _is_heavy(obj: Any) -> bool:
  """Objects that may hold pixel data: forgotten after each batch of records."""
  if isinstance(obj, (np.ndarray, dict, list)):
    return True
  if isinstance(obj, (bytes, bytearray)):
    return len(obj) >= 1024
  if isinstance(obj, tuple):
    return any(_is_heavy(x) for x in obj if not isinstance(x, tuple))
  return False


class _Memo(dict):
  """Pickle memo that can drop record data while keeping its numbering.

  Protocol 4 numbers memo entries by `len(memo)`, so dropped entries keep a
  placeholder slot instead of being deleted.
  """

  def __init__(self, path: PathLike):
    super().__init__()
    self.path = path
    self.heavy = []

  def __setitem__(self, idx: int, obj: Any) -> None:
    super().__setitem__(idx, obj)
    if _is_heavy(obj):
      self.heavy.append(idx)

  def __getitem__(self, idx: int) -> Any:
    obj = super().__getitem__(idx)
    if obj is _DROPPED:
      raise DataError(
          f"{os.fspath(self.path)}: a record refers to an object of an earlier "
          "record (shared arrays); this reader streams records independently")
    return obj

  def __missing__(self, idx: int) -> Any:
    raise DataError(f"{os.fspath(self.path)}: corrupt pickle (memo entry {idx})")

  def drop_heavy(self) -> None:
    for idx in self.heavy:
      dict.__setitem__(self, idx, _DROPPED)
    self.heavy.clear()


class _Peeked(Exception):
  """Stops unpickling once the first record is complete."""

  def __init__(self, record: Dict[Any, Any]):
    super().__init__()
    self.record = record


class _StreamingUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Pure-Python unpickler that streams the items of the top-level dict.

  The C unpickler cannot be hooked per opcode, so this uses the pure-Python one:
  the LIDC pickles have ~45 opcodes per record, so the overhead is small next
  to reading the pixel bytes.
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file: Any, path: PathLike,
               on_item: Optional[Callable[[Any, Any], None]], peek: bool):
    super().__init__(file, encoding="latin1")
    self._path = path
    self._on_item = on_item
    self._peek = peek
    self._top = None
    self.memo = _Memo(path)

  def find_class(self, module: str, name: str) -> Any:
    return resolve_global(self._path, module, name)

  def persistent_load(self, pid: Any) -> Any:
    raise DataError(f"{os.fspath(self._path)}: persistent ids are not allowed")

  def _note_new_dict(self) -> None:
    # The first dict pushed onto an empty stack is the top-level object.
    if self._top is None and len(self.stack) == 1 and not self.metastack:
      self._top = self.stack[0]

  def _load_empty_dictionary(self) -> None:
    pickle._Unpickler.load_empty_dictionary(self)  # pylint: disable=protected-access
    self._note_new_dict()

  def _load_dict(self) -> None:
    pickle._Unpickler.load_dict(self)  # pylint: disable=protected-access
    self._note_new_dict()

  def _set_items(self, target: Dict[Any, Any], items: list) -> None:
    if target is self._top and self._top is not None:
      for i in range(0, len(items), 2):
        self._on_item(items[i], items[i + 1])
      items.clear()
      self.memo.drop_heavy()  # The batch is converted: forget the originals.
      return
    for i in range(0, len(items), 2):
      target[items[i]] = items[i + 1]
    if self._peek and isinstance(target, dict) and "image" in target:
      raise _Peeked(target)

  def _load_setitems(self) -> None:
    items = self.pop_mark()
    self._set_items(self.stack[-1], items)

  def _load_setitem(self) -> None:
    value = self.stack.pop()
    key = self.stack.pop()
    self._set_items(self.stack[-1], [key, value])

  dispatch[pickle.EMPTY_DICT[0]] = _load_empty_dictionary
  dispatch[pickle.DICT[0]] = _load_dict
  dispatch[pickle.SETITEMS[0]] = _load_setitems
  dispatch[pickle.SETITEM[0]] = _load_setitem


def _run(path: PathLike, unpickler_args: Tuple[Any, ...]) -> Any:
  with open(path, "rb") as f:
    unpickler = _StreamingUnpickler(f, path, *unpickler_args)
    try:
      top = unpickler.load()
    except (DataError, _Peeked):
      raise
    except Exception as e:  # Truncated or corrupt pickles raise many types.
      raise DataError(f"{os.fspath(path)}: not a readable pickle ({e!r})") from e
    if not isinstance(top, dict) or top is not unpickler._top:  # pylint: disable=protected-access
      raise DataError(f"{os.fspath(path)}: expected a pickled dict key -> record, "
                      f"got {type(top).__name__}")
    return top


def stream_dict_records(path: PathLike, on_item: Callable[[Any, Any], None]) -> None:
  """Unpickles a `dict key -> record` file, calling `on_item(key, record)` per item.

  Records arrive in file order, in batches as the pickle stores them (1,000 per
  batch for protocol >= 1); the unpickler drops its references to a batch once
  every record of it has been handed over, so the caller decides what is kept.

  Raises:
    DataError: A forbidden global, a corrupt file, or a top level that is not a dict.
  """
  _run(path, (on_item, False))


def peek_first_record(path: PathLike) -> Dict[Any, Any]:
  """Returns the first record (a dict with an `image` field) without reading on.

  Raises:
    DataError: As `stream_dict_records`, or no record with an `image` field.
  """
  try:
    _run(path, (lambda key, value: None, True))
  except _Peeked as peeked:
    return peeked.record
  raise DataError(f"{os.fspath(path)}: no record with an 'image' field found")

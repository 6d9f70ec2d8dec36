"""Reading the LIDC dataset pickles without trusting them.

The multi-rater literature distributes LIDC as pickles, and `pickle.load` of an
untrusted file can run arbitrary code; even a pickle that names only numpy's
array helpers can crash the process (a dtype with an object field and crafted
flags makes numpy free a pointer taken from the file), overwrite attributes of
classes (BUILD on a class), blow the C stack (a deeply nested tuple hashed as a
key) or allocate gigabytes (`bytearray(10**10)`, one array referred to
thousands of times).

So this module does not use `pickle.Unpickler` at all. It runs the pickle
opcodes itself and never calls anything the file names:

- A global the file names must be on `ALLOWED_GLOBALS`; it becomes an inert
  token that only this reader interprets (build an array, a dtype, a set, a
  pydicom value), each with its arguments checked. Nothing else is imported.
- dtypes come from a closed set of plain numeric and boolean types (`DTYPES`),
  built here from the descriptor's name and byte order: no object or structured
  fields, no flags from the file.
- Arrays are made by `np.frombuffer` from bytes whose count equals shape x
  itemsize, checked before anything is allocated.
- BUILD (setting state) applies only to objects this reader created: arrays,
  dtypes and pydicom values, never to classes, functions or singletons.
- Containers nest at most `ReadLimits.max_depth` deep, checked iteratively.
- What the file makes the reader allocate (arrays, byte strings, sets, records
  handed over, memo references to large objects) is charged against a budget
  (`limits.PICKLE_LIMITS`: 8x the file's size, at least 256 MiB).

Each refusal is a `DataError` naming the file, the record key being read and
what was expected.

`stream_dict_records` reads a pickled `dict key -> record` and hands each record
to a callback as soon as its batch is complete, then forgets it, so that a
caller converting records to compact arrays never holds the whole decoded file
(plus a converted copy) in memory.
"""

from __future__ import annotations

import codecs
import collections
import decimal
import importlib
import itertools
import os
import pickle
import pickletools
import struct
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import numpy as np

from prosona_jax.data.errors import DataError, PathLike, data_error
from prosona_jax.data.limits import PICKLE_LIMITS, ReadLimits

# Python 2 era pickles (and Python 3's at protocol < 3) name builtins differently.
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_NAME_ALIASES = {("builtins", "unicode"): "str", ("builtins", "long"): "int"}

# (module, name) -> what the reader does with it. Pickles of numpy < 2 name
# `numpy.core`, of numpy >= 2 `numpy._core`.
_GLOBAL_KINDS: Dict[Tuple[str, str], str] = {
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",  # Bytes at protocol <= 2.
    ("copyreg", "_reconstructor"): "reconstructor",  # Instances at protocol <= 1.
    ("copyreg", "__newobj__"): "newobj",
    ("collections", "OrderedDict"): "ordered_dict",
    ("builtins", "set"): "set",
    ("builtins", "frozenset"): "frozenset",
    ("builtins", "bytearray"): "bytearray",
    ("builtins", "bytes"): "bytes",
    ("builtins", "complex"): "complex",
    ("builtins", "slice"): "slice",
    # Only as the base class argument of copyreg._reconstructor.
    ("builtins", "object"): "base",
    ("builtins", "str"): "base",
    ("builtins", "int"): "base",
    ("builtins", "float"): "base",
}
for _core in ("numpy.core", "numpy._core"):
  _GLOBAL_KINDS[(_core + ".multiarray", "_reconstruct")] = "reconstruct"
  _GLOBAL_KINDS[(_core + ".multiarray", "scalar")] = "scalar"
  _GLOBAL_KINDS[(_core + ".numeric", "_frombuffer")] = "frombuffer"  # Protocol 5.


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
# The base class copyreg._reconstructor must name for each value class.
_VALUE_BASES = {"UID": "str", "DSfloat": "float", "IS": "int", "PersonName": "object",
                "PersonName3": "object"}
# (module named in the pickle, class name) -> real pydicom module to import.
_PYDICOM_GLOBALS = {
    ("pydicom.uid", "UID"): "pydicom.uid",
    ("dicom.UID", "UID"): "pydicom.uid",  # pydicom < 1.0 was the `dicom` package.
}
for _name in ("DSfloat", "DSdecimal", "IS", "PersonName", "PersonName3"):
  _PYDICOM_GLOBALS[("pydicom.valuerep", _name)] = "pydicom.valuerep"
  _PYDICOM_GLOBALS[("dicom.valuerep", _name)] = "pydicom.valuerep"
for _key in _PYDICOM_GLOBALS:
  _GLOBAL_KINDS[_key] = "value"

ALLOWED_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset(_GLOBAL_KINDS)

# The only dtypes a pickle can produce: descriptor name -> dtype (native order).
DTYPES: Dict[str, np.dtype] = {
    name: np.dtype(name) for name in (
        "b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8",
        "c8", "c16")}

_MAX_NDIM = 32
_NODE_BYTES = 32  # Charged per object a walk visits: a reference plus a small object.
_MEMO_CHARGE_MIN = 1024  # Memo references to smaller objects are not charged.
_MAX_GLOBAL_LINE = 512
_REFUSED_OPCODES = {
    pickle.PERSID[0]: "persistent ids (PERSID)", pickle.BINPERSID[0]: "persistent ids "
    "(BINPERSID)", pickle.INST[0]: "class instantiation (INST)", pickle.OBJ[0]: "class "
    "instantiation (OBJ)", pickle.NEWOBJ_EX[0]: "keyword construction (NEWOBJ_EX)",
    pickle.EXT1[0]: "the extension registry (EXT1)", pickle.EXT2[0]: "the extension "
    "registry (EXT2)", pickle.EXT4[0]: "the extension registry (EXT4)",
    pickle.NEXT_BUFFER[0]: "out-of-band buffers (NEXT_BUFFER)",
    pickle.READONLY_BUFFER[0]: "out-of-band buffers (READONLY_BUFFER)"}


def _canonical(module: str, name: str) -> Tuple[str, str]:
  module = _MODULE_ALIASES.get(module, module)
  return module, _NAME_ALIASES.get((module, name), name)


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


def _refusal(module: str, name: str) -> str:
  return (f"refusing to unpickle global '{module[:100]}.{name[:100]}': only numpy arrays, "
          "builtin containers and pydicom UID/value types are allowed (the file may be "
          "corrupt or malicious)")


def resolve_global(path: PathLike, module: str, name: str) -> Any:
  """The object an allowed global names (for inspection; the reader never calls it).

  Args:
    path: The file being read (for the error message).
    module: The module the pickle names.
    name: The attribute the pickle names.

  Returns:
    The class or function; pydicom classes fall back to stand-ins when pydicom
    is not installed.

  Raises:
    DataError: The global is not on `ALLOWED_GLOBALS`; nothing was imported.
  """
  module, name = _canonical(module, name)
  kind = _GLOBAL_KINDS.get((module, name))
  if kind is None:
    raise data_error(path, _refusal(module, name))
  if kind == "value":
    return _pydicom_class(_PYDICOM_GLOBALS[(module, name)], name)
  if module.startswith("numpy."):
    return _numpy_attr(module.split(".")[-1], name)
  return getattr(importlib.import_module(module), name)


class _Global:
  """An allowed global on the reader's stack: a name, never the object itself."""
  __slots__ = ("kind", "module", "name", "cls")

  def __init__(self, kind: str, module: str, name: str, cls: Optional[type]):
    self.kind, self.module, self.name, self.cls = kind, module, name, cls


class _PendingArray:
  """`_reconstruct(...)`'s result until BUILD gives it shape, dtype and bytes."""
  __slots__ = ("value",)

  def __init__(self):
    self.value: Optional[np.ndarray] = None


class _PendingDtype:
  """`dtype(name)`'s result until BUILD gives it a byte order."""
  __slots__ = ("dtype", "value")

  def __init__(self, dtype: np.dtype):
    self.dtype, self.value = dtype, None


_ATOMS = frozenset({str, bytes, int, float, bool, complex, type(None)})
_KEY_CONTAINERS = frozenset({tuple, frozenset})
_DATA_CONTAINERS = frozenset({tuple, frozenset, list, set, dict, collections.OrderedDict})
_DROPPED = object()  # Memo slot of an object already handed to the callback.


class _Stop(Exception):

  def __init__(self, value: Any):
    super().__init__()
    self.value = value


class _Peeked(Exception):
  """Stops reading once the first record is complete."""

  def __init__(self, record: Dict[Any, Any]):
    super().__init__()
    self.record = record


def _short(obj: Any, limit: int = 60) -> str:
  """A bounded description of a value from the file, for messages."""
  t = type(obj)
  if t is int:
    return repr(obj) if obj.bit_length() <= 64 else f"a {obj.bit_length()}-bit integer"
  if t in (str, bytes):
    text = repr(obj[:limit])
    return text + ("..." if len(obj) > limit else "")
  if t is _Global:
    return f"the global '{obj.module}.{obj.name}'"
  if t in (_PendingArray, _PendingDtype):
    return "an array or dtype still being built"
  if t is tuple and len(obj) <= _MAX_NDIM and all(type(x) in _ATOMS for x in obj):
    return "(" + ", ".join(_short(x, 20) for x in obj) + ("," if len(obj) == 1 else "") + ")"
  if t in (tuple, list, dict, set, frozenset):
    return f"a {t.__name__} of {len(obj)} items"
  if t is np.ndarray:
    return f"a {obj.dtype} array of shape {obj.shape}"
  return f"a {t.__name__}"


_HEAVY = frozenset({np.ndarray, dict, list, set, collections.OrderedDict, _PendingArray})
_BYTES_LIKE = frozenset({bytes, bytearray, str})


def _is_heavy(obj: Any) -> bool:
  """Objects that may hold pixel data: forgotten after each batch of records."""
  t = type(obj)
  if t in _HEAVY:
    return True
  if t in _BYTES_LIKE:
    return len(obj) >= 1024
  if t is tuple:  # A bounded look, so that PUT stays O(1) for huge tuples.
    if len(obj) > 16:
      return True
    for x in obj:
      tx = type(x)
      if tx in _HEAVY or (tx in _BYTES_LIKE and len(x) >= 1024):
        return True
  return False


class _Reader:
  """Runs the opcodes of one pickle file (see the module docstring)."""

  def __init__(self, file: Any, path: PathLike, size: int, limits: ReadLimits,
               on_item: Optional[Callable[[Any, Any], None]], peek: bool):
    self._file, self._path, self._size = file, path, size
    self._limits = limits
    self._budget = limits.budget(size)
    self._used = 0
    self._pos = 0
    self._on_item, self._peek = on_item, peek
    self._top: Optional[dict] = None
    self._records = 0
    self.stack: List[Any] = []
    self.metastack: List[List[Any]] = []
    self.memo: Dict[int, Any] = {}
    self._heavy: List[int] = []
    self._value_types: set = set()
    self._dispatch = {code: getattr(self, "_op_" + name) for code, name in _OPCODES.items()}

  # Errors and budgets.

  def _current_key(self) -> Optional[str]:
    """The key of the top-level record being read, if any (for messages)."""
    if self._top is None:
      return None
    frames = self.metastack + [self.stack]
    if not frames[0] or frames[0][0] is not self._top:
      return None
    if len(frames[0]) > 1:  # SETITEM (protocol 0, batches of one): [top, key, ...].
      key = frames[0][1]
    elif len(frames) > 1:  # MARK k1 v1 k2 v2 ... SETITEMS: the items are the next frame.
      # The value being read may have pieces on this frame too; records are dicts, so
      # the key is the last one followed by a dict (or a key whose value has not begun).
      items, key = frames[1], None
      for i in range(len(items) - 2 + len(items) % 2, -1, -2):
        if type(items[i + 1]) is dict:
          key = items[i]
          break
      if key is None and len(items) % 2:
        key = items[-1]
    else:
      return None
    if type(key) is bytes:
      key = key.decode("latin1")
    if type(key) is not str:
      return None
    return key if len(key) <= 100 else key[:100] + "..."

  def error(self, what: str) -> DataError:
    return data_error(self._path, what, self._current_key())

  def _charge(self, nbytes: int, what: str) -> None:
    if nbytes > self._budget:
      raise self.error(f"{what} of {nbytes:,} bytes exceeds the per-object limit of "
                       f"{self._limits.describe(self._size)}")
    self._used += nbytes
    if self._used > self._budget:
      raise self.error(f"{what}: the file has made the reader allocate {self._used:,} "
                       f"bytes, over its limit of {self._limits.describe(self._size)}")

  def _walk(self, root: Any, what: str, key_mode: bool = False) -> None:
    """Checks the nesting and contents of `root` and charges its size, iteratively.

    In key mode only atoms and tuples / frozensets of them pass (safe to hash);
    otherwise containers, arrays, numpy scalars, dtypes and pydicom values do.
    Objects still being built and bare globals never pass.
    """
    max_depth = self._limits.max_depth
    containers = _KEY_CONTAINERS if key_mode else _DATA_CONTAINERS
    room = self._budget - self._used
    cost = 0
    todo = [([root], 0)]  # Containers still to visit, with their depth.
    while todo:
      obj, depth = todo.pop()
      if depth > max_depth:
        raise self.error(f"{what}: containers nested deeper than {max_depth} levels (the "
                         "limit of this reader)")
      if type(obj) is dict or type(obj) is collections.OrderedDict:
        cost += 2 * _NODE_BYTES * len(obj)
        children = itertools.chain.from_iterable(obj.items())
      else:
        cost += _NODE_BYTES * len(obj)
        children = obj
      for child in children:
        ct = type(child)
        if ct in _ATOMS:
          if ct is str or ct is bytes:
            cost += len(child)
        elif ct in containers:
          todo.append((child, depth + 1))
        elif key_mode:
          raise self.error(f"{what}: {_short(child)} cannot be hashed safely; expected "
                           "strings, numbers and tuples of them")
        elif ct is np.ndarray:
          cost += child.nbytes
        elif ct is bytearray:
          cost += len(child)
        elif not (ct is slice or ct in self._value_types or isinstance(child, np.generic)
                  or isinstance(child, np.dtype)):
          raise self.error(f"{what}: holds {_short(child)}, which is not data this "
                           "reader produces")
      if cost > room:
        break
    self._charge(cost, what)

  def _check_key(self, key: Any) -> None:
    # Hashing runs C code over the whole key: a deep tuple would overflow its stack.
    if type(key) not in _ATOMS:
      self._walk(key, "a dict key or set element", key_mode=True)

  # Reading the file.

  def _read(self, n: int) -> bytes:
    left = self._size - self._pos
    if n < 0 or n > left:
      raise self.error(f"an opcode declares {_short(n)} bytes but {left:,} remain in the "
                       "file (truncated or corrupt)")
    data = self._file.read(n)
    if len(data) != n:
      raise self.error("the file is shorter than its size (truncated while reading)")
    self._pos += n
    return data

  def _readline(self, limit: int = -1) -> bytes:
    line = self._file.readline(limit)
    self._pos += len(line)
    if not line.endswith(b"\n"):
      raise self.error("a text opcode's line is cut off (truncated or not a pickle)")
    return line

  def _pop_mark(self) -> List[Any]:
    if not self.metastack:
      raise self.error("an opcode needs a MARK that is not there (corrupt pickle)")
    items = self.stack
    self.stack = self.metastack.pop()
    return items

  def load(self) -> Any:
    read, dispatch = self._file.read, self._dispatch
    try:
      while True:
        code = read(1)
        if not code:
          raise self.error("the file ends before the pickle's STOP (truncated)")
        self._pos += 1
        handler = dispatch.get(code[0])
        if handler is None:
          raise self.error(_opcode_refusal(code[0]))
        handler()
    except _Stop as stop:
      return stop.value

  # Opcodes: framing and stack.

  def _op_PROTO(self) -> None:
    proto = self._read(1)[0]
    if proto > pickle.HIGHEST_PROTOCOL:
      raise self.error(f"pickle protocol {proto}; expected at most {pickle.HIGHEST_PROTOCOL}")

  def _op_FRAME(self) -> None:
    # Frames only group opcodes; reading straight through them is equivalent.
    (n,) = struct.unpack("<Q", self._read(8))
    if n > self._size - self._pos:
      raise self.error(f"a frame declares {n:,} bytes but the file has fewer (truncated)")

  def _op_STOP(self) -> None:
    if self.metastack or len(self.stack) != 1:
      raise self.error("STOP with a MARK open or not exactly one object (corrupt pickle)")
    raise _Stop(self.stack.pop())

  def _op_POP(self) -> None:
    if self.stack:
      self.stack.pop()
    else:
      self._pop_mark()

  def _op_POP_MARK(self) -> None:
    self._pop_mark()

  def _op_DUP(self) -> None:
    self._charge_reuse(self.stack[-1])
    self.stack.append(self.stack[-1])

  def _op_MARK(self) -> None:
    if len(self.metastack) >= self._limits.max_depth:
      raise self.error(f"MARKs nested deeper than {self._limits.max_depth} levels (limit "
                       "of this reader)")
    self.metastack.append(self.stack)
    self.stack = []

  # Opcodes: atoms.

  def _op_NONE(self) -> None:
    self.stack.append(None)

  def _op_NEWFALSE(self) -> None:
    self.stack.append(False)

  def _op_NEWTRUE(self) -> None:
    self.stack.append(True)

  def _op_INT(self) -> None:
    data = self._readline()
    self.stack.append(False if data == b"00\n" else True if data == b"01\n" else int(data, 0))

  def _op_BININT(self) -> None:
    self.stack.append(struct.unpack("<i", self._read(4))[0])

  def _op_BININT1(self) -> None:
    self.stack.append(self._read(1)[0])

  def _op_BININT2(self) -> None:
    self.stack.append(struct.unpack("<H", self._read(2))[0])

  def _op_LONG(self) -> None:
    val = self._readline()[:-1]
    if val.endswith(b"L"):
      val = val[:-1]
    self.stack.append(int(val, 0))

  def _op_LONG1(self) -> None:
    self.stack.append(pickle.decode_long(self._read(self._read(1)[0])))

  def _op_LONG4(self) -> None:
    self.stack.append(pickle.decode_long(self._read(struct.unpack("<i", self._read(4))[0])))

  def _op_FLOAT(self) -> None:
    self.stack.append(float(self._readline()[:-1]))

  def _op_BINFLOAT(self) -> None:
    self.stack.append(struct.unpack(">d", self._read(8))[0])

  def _op_STRING(self) -> None:
    data = self._readline()[:-1]
    if len(data) < 2 or data[0] != data[-1] or data[0] not in b"\"'":
      raise self.error("the STRING opcode's argument is not quoted (corrupt pickle)")
    self.stack.append(codecs.escape_decode(data[1:-1])[0].decode("latin1"))

  def _op_BINSTRING(self) -> None:
    # Python 2 `str`: text or bytes, unknowable; latin1 keeps every byte (as numpy expects).
    self.stack.append(self._read(struct.unpack("<i", self._read(4))[0]).decode("latin1"))

  def _op_SHORT_BINSTRING(self) -> None:
    self.stack.append(self._read(self._read(1)[0]).decode("latin1"))

  def _op_BINBYTES(self) -> None:
    self.stack.append(self._read(struct.unpack("<I", self._read(4))[0]))

  def _op_SHORT_BINBYTES(self) -> None:
    self.stack.append(self._read(self._read(1)[0]))

  def _op_BINBYTES8(self) -> None:
    self.stack.append(self._read(struct.unpack("<Q", self._read(8))[0]))

  def _op_BYTEARRAY8(self) -> None:
    self.stack.append(bytearray(self._read(struct.unpack("<Q", self._read(8))[0])))

  def _op_UNICODE(self) -> None:
    self.stack.append(str(self._readline()[:-1], "raw-unicode-escape"))

  def _op_BINUNICODE(self) -> None:
    self.stack.append(str(self._read(struct.unpack("<I", self._read(4))[0]), "utf-8",
                   "surrogatepass"))

  def _op_SHORT_BINUNICODE(self) -> None:
    self.stack.append(str(self._read(self._read(1)[0]), "utf-8", "surrogatepass"))

  def _op_BINUNICODE8(self) -> None:
    self.stack.append(str(self._read(struct.unpack("<Q", self._read(8))[0]), "utf-8",
                   "surrogatepass"))

  # Opcodes: containers.

  def _op_EMPTY_TUPLE(self) -> None:
    self.stack.append(())

  def _op_TUPLE(self) -> None:
    items = tuple(self._pop_mark())  # Rebinds self.stack: read it after.
    self.stack.append(items)

  def _op_TUPLE1(self) -> None:
    self.stack[-1] = (self.stack[-1],)

  def _op_TUPLE2(self) -> None:
    self.stack[-2:] = [(self.stack[-2], self.stack[-1])]

  def _op_TUPLE3(self) -> None:
    self.stack[-3:] = [(self.stack[-3], self.stack[-2], self.stack[-1])]

  def _op_EMPTY_LIST(self) -> None:
    self.stack.append([])

  def _op_LIST(self) -> None:
    items = self._pop_mark()  # Rebinds self.stack: read it after.
    self.stack.append(items)

  def _target(self, kinds: Tuple[type, ...], opcode: str) -> Any:
    target = self.stack[-1]
    if type(target) not in kinds:
      raise self.error(f"{opcode} on {_short(target)}; expected a "
                       f"{' or '.join(k.__name__ for k in kinds)} this reader created")
    return target

  def _op_APPEND(self) -> None:
    value = self.stack.pop()
    self._target((list,), "APPEND").append(value)

  def _op_APPENDS(self) -> None:
    items = self._pop_mark()
    self._target((list,), "APPENDS").extend(items)

  def _note_new_dict(self) -> None:
    # In streaming mode the first dict pushed onto an empty stack is the top level.
    if (self._on_item is not None and self._top is None and len(self.stack) == 1
        and not self.metastack):
      self._top = self.stack[0]

  def _op_EMPTY_DICT(self) -> None:
    self.stack.append({})
    self._note_new_dict()

  def _op_DICT(self) -> None:
    items = self._pop_mark()
    self.stack.append({})
    self._note_new_dict()
    self._set_items(self.stack[-1], items)

  def _op_SETITEM(self) -> None:
    value = self.stack.pop()
    key = self.stack.pop()
    self._set_items(self._target((dict, collections.OrderedDict), "SETITEM"), [key, value])

  def _op_SETITEMS(self) -> None:
    items = self._pop_mark()
    self._set_items(self._target((dict, collections.OrderedDict), "SETITEMS"), items)

  def _set_items(self, target: Dict[Any, Any], items: List[Any]) -> None:
    if len(items) % 2:
      raise self.error("SETITEMS with a key but no value (corrupt pickle)")
    if target is self._top:
      for i in range(0, len(items), 2):
        key, value = items[i], items[i + 1]
        if type(key) not in (str, bytes):
          raise self.error(f"record keys must be strings, got {_short(key)} (record "
                           f"{self._records + 1})")
        self._walk(value, "the record")
        self._on_item(key, value)
        self._records += 1
      items.clear()
      self._drop_heavy()  # The batch is converted: forget the originals.
      return
    for i in range(0, len(items), 2):
      self._check_key(items[i])
      target[items[i]] = items[i + 1]
    if self._peek and type(target) is dict and "image" in target:
      self._walk(target, "the record")
      raise _Peeked(target)

  def _op_EMPTY_SET(self) -> None:
    self.stack.append(set())

  def _op_ADDITEMS(self) -> None:
    items = self._pop_mark()
    target = self._target((set,), "ADDITEMS")
    for item in items:
      self._check_key(item)
    target.update(items)

  def _op_FROZENSET(self) -> None:
    items = self._pop_mark()
    for item in items:
      self._check_key(item)
    self.stack.append(frozenset(items))

  # Opcodes: memo.

  def _memo_put(self, idx: int) -> None:
    if idx < 0:
      raise self.error(f"negative memo index {idx} (corrupt pickle)")
    obj = self.stack[-1]
    self.memo[idx] = obj
    if _is_heavy(obj):
      self._heavy.append(idx)

  def _drop_heavy(self) -> None:
    for idx in self._heavy:
      self.memo[idx] = _DROPPED
    self._heavy.clear()

  def _charge_reuse(self, obj: Any) -> None:
    # A second reference to a large leaf is a second copy to whoever converts it.
    t = type(obj)
    n = obj.nbytes if t is np.ndarray else len(obj) if t in (bytes, bytearray, str) else 0
    if n >= _MEMO_CHARGE_MIN:
      self._charge(n, f"a memo reference to {_short(obj)}")

  def _memo_get(self, idx: int) -> None:
    try:
      obj = self.memo[idx]
    except KeyError:
      raise self.error(f"memo entry {idx} was never stored (corrupt pickle)") from None
    if obj is _DROPPED:
      raise self.error("a record refers to an object of an earlier record (shared "
                       "arrays); this reader streams records independently")
    if type(obj) in (_PendingArray, _PendingDtype) and obj.value is not None:
      obj = obj.value
    self._charge_reuse(obj)
    self.stack.append(obj)

  def _op_GET(self) -> None:
    self._memo_get(int(self._readline()[:-1]))

  def _op_BINGET(self) -> None:
    self._memo_get(self._read(1)[0])

  def _op_LONG_BINGET(self) -> None:
    self._memo_get(struct.unpack("<I", self._read(4))[0])

  def _op_PUT(self) -> None:
    self._memo_put(int(self._readline()[:-1]))

  def _op_BINPUT(self) -> None:
    self._memo_put(self._read(1)[0])

  def _op_LONG_BINPUT(self) -> None:
    self._memo_put(struct.unpack("<I", self._read(4))[0])

  def _op_MEMOIZE(self) -> None:
    self._memo_put(len(self.memo))

  # Opcodes: globals and construction.

  def _global(self, module: Any, name: Any) -> _Global:
    if type(module) is not str or type(name) is not str:
      raise self.error(f"a global named by {_short(module)} and {_short(name)}; expected "
                       "two strings")
    module, name = _canonical(module, name)
    kind = _GLOBAL_KINDS.get((module, name))
    if kind is None:
      raise self.error(_refusal(module, name))
    cls = None
    if kind == "value":
      cls = _pydicom_class(_PYDICOM_GLOBALS[(module, name)], name)
      self._value_types.add(cls)
    return _Global(kind, module, name, cls)

  def _op_GLOBAL(self) -> None:
    module = self._readline(_MAX_GLOBAL_LINE)[:-1].decode("utf-8")
    name = self._readline(_MAX_GLOBAL_LINE)[:-1].decode("utf-8")
    self.stack.append(self._global(module, name))

  def _op_STACK_GLOBAL(self) -> None:
    name = self.stack.pop()
    module = self.stack.pop()
    self.stack.append(self._global(module, name))

  def _op_REDUCE(self) -> None:
    args = self.stack.pop()
    func = self.stack[-1]
    if type(func) is not _Global:
      raise self.error(f"REDUCE calls {_short(func)}; only allowed globals can be called")
    if type(args) is not tuple:
      raise self.error(f"REDUCE with arguments {_short(args)}; expected a tuple")
    self.stack[-1] = self._call(func, args)

  def _op_NEWOBJ(self) -> None:
    args = self.stack.pop()
    cls = self.stack.pop()
    if type(args) is not tuple:
      raise self.error(f"NEWOBJ with arguments {_short(args)}; expected a tuple")
    self.stack.append(self._new_value(cls, args))

  def _op_BUILD(self) -> None:
    state = self.stack.pop()
    inst = self.stack[-1]
    t = type(inst)
    if t is _PendingArray and inst.value is None:
      inst.value = self.stack[-1] = self._array_from_state(state)
    elif t is _PendingDtype and inst.value is None:
      inst.value = self.stack[-1] = self._dtype_from_state(inst.dtype, state)
    elif t in self._value_types:
      self._set_value_state(inst, state)
    else:
      raise self.error(f"BUILD (setting state) on {_short(inst)} is refused: only arrays, "
                       "dtypes and pydicom values this reader just created take state")

  # What the allowed globals build.

  def _plain_args(self, g: _Global, args: tuple, most: int) -> None:
    if len(args) > most or any(type(a) not in _ATOMS for a in args):
      raise self.error(f"{g.module}.{g.name} called with {len(args)} arguments of types "
                       f"{[type(a).__name__ for a in args[:4]]}; expected at most {most} "
                       "plain values (str, number, None)")

  def _new_value(self, cls: Any, args: tuple) -> Any:
    """NEWOBJ: `cls.__new__(cls, *args)` for pydicom value classes only."""
    if type(cls) is not _Global or cls.kind != "value":
      raise self.error(f"NEWOBJ on {_short(cls)}; only pydicom value classes can be "
                       "instantiated")
    self._plain_args(cls, args, 2)
    try:
      obj = cls.cls.__new__(cls.cls, *args)
    except Exception as e:  # pydicom validates its values.
      raise self.error(f"{cls.name}{_short(args)} failed: {_short(str(e), 200)}") from e
    return self._own_value(cls, obj)

  def _own_value(self, g: _Global, obj: Any) -> Any:
    if type(obj) is not g.cls:
      raise self.error(f"{g.module}.{g.name} produced a {type(obj).__name__}")
    return obj

  def _call(self, g: _Global, args: tuple) -> Any:
    kind = g.kind
    if kind == "reconstruct":
      # numpy's `_reconstruct(ndarray, (0,), b'b')`: an empty array BUILD fills in.
      if len(args) != 3 or type(args[0]) is not _Global or args[0].kind != "ndarray":
        raise self.error(f"{g.name} called with {_short(args)}; expected "
                         "(numpy.ndarray, shape, typecode)")
      return _PendingArray()
    if kind == "dtype":
      if not 1 <= len(args) <= 3 or type(args[0]) is not str or any(
          type(a) not in (bool, int) for a in args[1:]):
        raise self.error(f"numpy.dtype called with {_short(args)}; expected "
                         "(name, align, copy)")
      dtype = DTYPES.get(args[0])
      if dtype is None:
        raise self.error(f"dtype {_short(args[0])} refused; expected a plain numeric or "
                         f"boolean type: {', '.join(DTYPES)}")
      return _PendingDtype(dtype)
    if kind == "scalar":
      if len(args) != 2:
        raise self.error(f"numpy scalar with {len(args)} arguments; expected (dtype, bytes)")
      dtype, raw = self._dtype(args[0]), self._raw(args[1], "scalar")
      if len(raw) != dtype.itemsize:
        raise self.error(f"a {dtype} scalar with {len(raw)} bytes; expected {dtype.itemsize}")
      return np.frombuffer(raw, dtype, 1)[0]
    if kind == "frombuffer":
      if len(args) != 4 or type(args[3]) is not str or args[3] not in ("C", "F"):
        raise self.error(f"{g.name} called with {_short(args)}; expected "
                         "(buffer, dtype, shape, 'C' or 'F')")
      if type(args[0]) not in (bytes, bytearray):
        raise self.error(f"{g.name} of {_short(args[0])}; expected in-band bytes")
      return self._array(args[0], self._dtype(args[1]), args[2], args[3] == "F")
    if kind == "encode":
      if (len(args) != 2 or type(args[0]) is not str or type(args[1]) is not str
          or args[1] not in ("latin1", "latin-1")):
        raise self.error(f"_codecs.encode called with {_short(args)}; expected "
                         "(str, 'latin1')")
      self._charge(len(args[0]), "encoded bytes")
      return args[0].encode("latin1")
    if kind in ("set", "frozenset"):
      items = args[0] if len(args) == 1 else ()
      if len(args) > 1 or type(items) not in (list, tuple, set, frozenset):
        raise self.error(f"{g.name} of {_short(args)}; expected a list of items")
      self._charge(_NODE_BYTES * len(items), f"a {g.name}")
      for item in items:
        self._check_key(item)
      return set(items) if kind == "set" else frozenset(items)
    if kind == "ordered_dict":
      if args:
        raise self.error(f"OrderedDict called with {_short(args)}; expected no arguments "
                         "(items follow as SETITEMS)")
      return collections.OrderedDict()
    if kind in ("bytearray", "bytes"):
      if not args:
        return bytearray() if kind == "bytearray" else b""
      if len(args) == 1 and type(args[0]) in (bytes, bytearray):
        data = args[0]
      elif (kind == "bytearray" and len(args) == 2 and type(args[0]) is str
            and type(args[1]) is str and args[1] in ("latin-1", "latin1")):
        data = args[0].encode("latin1")  # Python 2's bytearray pickles.
      else:
        raise self.error(f"{g.name} of {_short(args)}; expected bytes (a size would "
                         "allocate memory the file does not hold)")
      self._charge(len(data), f"a {g.name}")
      return bytearray(data) if kind == "bytearray" else bytes(data)
    if kind == "complex":
      if len(args) > 2 or any(type(a) not in (int, float) for a in args):
        raise self.error(f"complex of {_short(args)}; expected (real, imag) numbers")
      return complex(*args)
    if kind == "slice":
      if not 1 <= len(args) <= 3 or any(type(a) not in (int, type(None)) for a in args):
        raise self.error(f"slice of {_short(args)}; expected up to three ints or None")
      return slice(*args)
    if kind == "value":
      self._plain_args(g, args, 2)
      try:
        return self._own_value(g, g.cls(*args))
      except DataError:
        raise
      except Exception as e:  # pydicom validates its values.
        raise self.error(f"{g.name}{_short(args)} failed: {_short(str(e), 200)}") from e
    if kind == "reconstructor":
      return self._reconstructor(args)
    if kind == "newobj":
      if not args:
        raise self.error("copyreg.__newobj__ called without a class")
      return self._new_value(args[0], args[1:])
    raise self.error(f"{g.module}.{g.name} cannot be called here"
                     + (" (it is only a base class argument)" if kind == "base" else ""))

  def _reconstructor(self, args: tuple) -> Any:
    """`copyreg._reconstructor(cls, base, state)` (protocols 0 and 1)."""
    if (len(args) != 3 or type(args[0]) is not _Global or args[0].kind != "value"
        or type(args[1]) is not _Global or args[1].kind != "base"
        or _VALUE_BASES.get(args[0].name) != args[1].name):
      raise self.error(f"copyreg._reconstructor of {_short(args)}; expected a pydicom value "
                       "class, its builtin base and a plain value")
    cls, base, state = args[0], args[1].name, args[2]
    want = {"object": (type(None),), "str": (str,), "int": (int,),
            "float": (float, int)}[base]
    if type(state) not in want:
      raise self.error(f"copyreg._reconstructor({cls.name}, {base}) with {_short(state)}")
    if base == "object":
      return self._own_value(cls, object.__new__(cls.cls))
    builtin = {"str": str, "int": int, "float": float}[base]
    return self._own_value(cls, builtin.__new__(cls.cls, state))

  def _set_value_state(self, inst: Any, state: Any) -> None:
    """BUILD on a pydicom value this reader made: its attributes, as plain data."""
    if type(state) is not dict or any(type(k) is not str or k.startswith("__")
                                      for k in state):
      raise self.error(f"the state of a {type(inst).__name__} is {_short(state)}; expected "
                       "a dict of attribute names")
    self._walk(state, f"the state of a {type(inst).__name__}")
    attrs = getattr(inst, "__dict__", None)
    if attrs is None:
      raise self.error(f"a {type(inst).__name__} takes no state")
    attrs.update(state)  # Not setattr: no descriptor of the class runs.

  def _dtype(self, obj: Any) -> np.dtype:
    t = type(obj)
    if t is _PendingDtype:
      return obj.value if obj.value is not None else obj.dtype
    if isinstance(obj, np.dtype) and obj.kind in "biufc" and not obj.hasobject and (
        obj.fields is None and obj.subdtype is None):
      return obj  # Only this reader makes dtypes, from DTYPES.
    raise self.error(f"expected a dtype, got {_short(obj)}")

  def _dtype_from_state(self, dtype: np.dtype, state: Any) -> np.dtype:
    """A dtype's BUILD: only the byte order is taken from the file."""
    if type(state) is not tuple or len(state) not in (8, 9):
      raise self.error(f"dtype state {_short(state)}; expected numpy's 8- or 9-tuple")
    version, order, subarray, names, fields, elsize, align, flags = state[:8]
    checks = (
        ("version", version, type(version) is int and version in (3, 4)),
        ("byte order", order, type(order) is str and order in ("<", ">", "=", "|")
         and (order != "|" or dtype.itemsize == 1)),
        ("subarray", subarray, subarray is None), ("names", names, names is None),
        ("fields", fields, fields is None),
        ("element size", elsize, type(elsize) is int and elsize in (-1, dtype.itemsize)),
        ("alignment", align, type(align) is int and align in (-1, dtype.alignment)),
        ("flags", flags, type(flags) is int and flags == 0),
        ("metadata", state[8:], len(state) == 8 or state[8] is None))
    for field, value, ok in checks:
      if not ok:
        raise self.error(f"{dtype.name} dtype with {field} {_short(value)}: expected a "
                         "plain dtype (no fields, subarrays, flags or metadata)")
    return dtype.newbyteorder(order) if order in "<>" else dtype

  def _raw(self, data: Any, what: str) -> bytes:
    if type(data) in (bytes, bytearray):
      return data
    if type(data) is str:  # Python 2 pickles hold raw bytes as latin1 text.
      self._charge(len(data), f"{what} bytes")
      try:
        return data.encode("latin1")
      except UnicodeEncodeError as e:
        raise self.error(f"{what} data is text beyond latin1; expected raw bytes") from e
    raise self.error(f"{what} data is {_short(data)}; expected bytes")

  def _array_from_state(self, state: Any) -> np.ndarray:
    """An array's BUILD: `(version, shape, dtype, is_fortran, bytes)`."""
    if type(state) is not tuple or len(state) not in (4, 5) or (
        len(state) == 5 and (type(state[0]) is not int or state[0] != 1)):
      raise self.error(f"array state {_short(state)}; expected (1, shape, dtype, "
                       "is_fortran, bytes)")
    shape, dtype, fortran, raw = state[-4:]
    if type(fortran) not in (bool, int):
      raise self.error(f"array order flag {_short(fortran)}; expected a bool")
    return self._array(raw, self._dtype(dtype), shape, bool(fortran))

  def _array(self, raw: Any, dtype: np.dtype, shape: Any, fortran: bool) -> np.ndarray:
    if (type(shape) is not tuple or len(shape) > _MAX_NDIM
        or any(type(s) is not int or s < 0 for s in shape)):
      raise self.error(f"array shape {_short(shape)}; expected a tuple of at most "
                       f"{_MAX_NDIM} non-negative ints")
    count = 1
    for s in shape:
      count *= s
    nbytes = count * dtype.itemsize  # Python ints: no overflow.
    if self._used + nbytes > self._budget:  # The message only when it is needed.
      self._charge(nbytes, f"a {dtype.name} array of shape {_short(shape)}")
    self._used += nbytes
    raw = self._raw(raw, "array")
    if len(raw) != nbytes:
      raise self.error(f"a {dtype.name} array of shape {shape} needs {nbytes:,} bytes; the "
                       f"file gives {len(raw):,}")
    if count == 0:
      return np.zeros(shape, dtype)
    if type(raw) is bytearray:  # Protocol 5: a view, as numpy's own `_frombuffer` gives.
      return np.frombuffer(raw, dtype, count).reshape(shape, order="F" if fortran else "C")
    # numpy's own unpickling, fed only with what was checked above: a dtype of
    # DTYPES and exactly shape x itemsize bytes (it adopts large buffers, no copy).
    array = np.ndarray((0,), np.uint8)
    array.__setstate__((1, shape, dtype, fortran, raw))
    return array


def _opcode_refusal(code: int) -> str:
  if code in _REFUSED_OPCODES:
    return f"opcode refused: {_REFUSED_OPCODES[code]} is not allowed in data files"
  op = pickletools.code2op.get(chr(code))
  return (f"opcode {op.name} is not supported" if op else
          f"byte {code:#04x} is not a pickle opcode (corrupt or not a pickle)")


_OPCODES = {getattr(pickle, name)[0]: name for name in (
    "PROTO", "FRAME", "STOP", "POP", "POP_MARK", "DUP", "MARK", "NONE", "NEWFALSE",
    "NEWTRUE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT",
    "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES",
    "BINBYTES8", "BYTEARRAY8", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
    "BINUNICODE8", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST",
    "LIST", "APPEND", "APPENDS", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET",
    "ADDITEMS", "FROZENSET", "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT",
    "LONG_BINPUT", "MEMOIZE", "GLOBAL", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD")}


def _run(path: PathLike, on_item: Optional[Callable[[Any, Any], None]], peek: bool,
         limits: Optional[ReadLimits]) -> Any:
  with open(path, "rb") as f:
    reader = _Reader(f, path, os.fstat(f.fileno()).st_size, limits or PICKLE_LIMITS,
                     on_item, peek)
    try:
      top = reader.load()
    except (DataError, _Peeked):
      raise
    except Exception as e:  # Truncated or corrupt pickles raise many types.
      raise reader.error(f"not a readable pickle ({type(e).__name__}: "
                         f"{_short(str(e), 200)})") from e
  if on_item is None:
    reader._walk(top, "the unpickled object")  # pylint: disable=protected-access
  elif type(top) is not dict or top is not reader._top:  # pylint: disable=protected-access
    raise data_error(path, f"expected a pickled dict key -> record, got "
                     f"{type(top).__name__}")
  return top


def safe_load(path: PathLike, limits: Optional[ReadLimits] = None) -> Any:
  """Unpickles a whole file under the same rules (for small files).

  Raises:
    DataError: A forbidden global or opcode, a limit exceeded, or not a pickle.
  """
  return _run(path, None, False, limits)


def stream_dict_records(path: PathLike, on_item: Callable[[Any, Any], None],
                        limits: Optional[ReadLimits] = None) -> None:
  """Unpickles a `dict key -> record` file, calling `on_item(key, record)` per item.

  Records arrive in file order, in batches as the pickle stores them (1,000 per
  batch for protocol >= 1); the reader drops its references to a batch once
  every record of it has been handed over, so the caller decides what is kept.

  Args:
    path: The pickle.
    on_item: Called with each key (str or bytes) and record.
    limits: Memory and nesting limits (default `limits.PICKLE_LIMITS`).

  Raises:
    DataError: A forbidden global or opcode, a limit exceeded, a corrupt file, or
      a top level that is not a dict.
  """
  _run(path, on_item, False, limits)


def peek_first_record(path: PathLike, limits: Optional[ReadLimits] = None
                      ) -> Dict[Any, Any]:
  """Returns the first record (a dict with an `image` field) without reading on.

  Raises:
    DataError: As `stream_dict_records`, or no record with an `image` field.
  """
  try:
    _run(path, lambda key, value: None, True, limits)
  except _Peeked as peeked:
    return peeked.record
  raise data_error(path, "no record with an 'image' field found")

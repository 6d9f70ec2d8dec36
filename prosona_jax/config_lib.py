"""Helpers for `configs/*.py` and for reading configs back: arguments, renamed fields.

`parse_arg` turns the `:arg` of `--config=configs/lidc.py:fold=2,dpersona` into typed
values, as big_vision's `configs/common.py` does: every key has a default (whose type
the value takes), a bare word is a boolean switch, and anything else is refused with a
message that lists what the config accepts.
"""

from __future__ import annotations

from typing import Any, Iterable

import ml_collections

from prosona_jax.errors import ConfigError

# Fields that moved or were renamed: old dotted name -> new dotted name. A command line
# that sets an old name is refused with the new one; an old run's config.json is read
# with the new names (`migrate`).
RENAMED = {
    "stage1.checkpoint": "stage2.init_from",
}


def parse_arg(arg: str | None, *, config: str, **spec: Any) -> ml_collections.ConfigDict:
  """Parses `key=value,key2=value2,flag` against `spec` (each key's default).

  Args:
    arg: the text after `:` in `--config=path.py:arg` (None or "" for none).
    config: the config file's name, for error messages.
    **spec: accepted keys and their defaults; a value takes its default's type.

  Returns:
    A ConfigDict with every key of `spec`, overridden by `arg`.

  Raises:
    ConfigError: an unknown key, or a value of the wrong type.
  """
  out = ml_collections.ConfigDict(spec)
  accepted = ", ".join(f"{k}={v!r}" if not isinstance(v, bool) else k for k, v in spec.items())
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, has_value, text = part.partition("=")
    key = key.strip()
    if key not in spec:
      raise ConfigError(f"{config}: unknown argument {key!r}; it accepts {accepted}")
    default = spec[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ConfigError(f"{config}: argument {key!r} needs a value ({key}=...)")
      out[key] = True
      continue
    try:
      if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
          raise ValueError(text)
        value = text.lower() in ("true", "1")
      else:
        value = type(default)(text)
    except ValueError:
      raise ConfigError(f"{config}: argument {key}={text!r}: expected a "
                        f"{type(default).__name__}") from None
    out[key] = value
  return out


def renamed_overrides(argv: Iterable[str], flag: str = "config") -> list[str]:
  """Messages for command-line overrides that use a renamed field's old name."""
  out = []
  for arg in argv:
    for old, new in RENAMED.items():
      if arg.split("=", 1)[0] == f"--{flag}.{old}":
        out.append(f"--{flag}.{old} was renamed: use --{flag}.{new}")
  return out


def migrate(config_dict: dict) -> dict:
  """A config dict (e.g. an old run's config.json) with renamed fields under new names."""
  for old, new in RENAMED.items():
    old_parent, old_leaf = old.rsplit(".", 1)
    parent = config_dict.get(old_parent)
    if isinstance(parent, dict) and old_leaf in parent:
      value = parent.pop(old_leaf)
      new_parent, new_leaf = new.rsplit(".", 1)
      config_dict.setdefault(new_parent, {}).setdefault(new_leaf, value)
  return config_dict


def folds_to_run(data_cfg) -> list[int]:
  """The test folds a run covers: `data.fold`, or every fold when it is -1."""
  if data_cfg.fold == -1:
    return list(range(data_cfg.num_folds))
  if not 0 <= data_cfg.fold < data_cfg.num_folds:
    raise ConfigError(f"config.data.fold={data_cfg.fold}: expected -1 or "
                      f"0..{data_cfg.num_folds - 1}")
  return [data_cfg.fold]


def grid_cells(config) -> list[tuple[float, float]]:
  """The (alpha, beta) cells of the ablation grid, alpha-major."""
  return [(float(a), float(b)) for a in config.stage2.grid_alpha
          for b in config.stage2.grid_beta]


def load_config_module(path: str):
  """Imports a config file by path (a variant's base sits beside it: `tiny.py` starts
  from `demo.py`), so configs work from any directory, packaged or not."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  name = "prosona_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"{path}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def base_of(config_file: str, base: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config `base` (e.g. "demo.py") beside `config_file`."""
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), base)
  return load_config_module(path).get_config(arg)

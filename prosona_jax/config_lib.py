"""Helpers for `configs/*.py` and for reading configs back: arguments, renamed fields.

`parse_arg` turns the `:arg` of `--config=configs/lidc.py:fold=2,dpersona` into typed
values, as big_vision's `configs/common.py` does: every key has a default (whose type
the value takes), a bare word is a boolean switch, and anything else is refused with a
message that lists what the config accepts.
"""

from __future__ import annotations

import math
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


# ---------------------------------------------------------------- checks at start
class Problems:
  """The problems found in one config section, each `config.<section>.<field>=<value>:
  expected ...`; the section's check functions add to it."""

  def __init__(self, config, section: str):
    self.cfg = config[section] if section else config
    self.prefix = f"config.{section}." if section else "config."
    self.found: list[str] = []

  def add(self, field: str, expected: str) -> None:
    value = self._get(field)
    self.found.append(f"{self.prefix}{field}={value!r}: expected {expected}")

  def _get(self, field: str):
    node = self.cfg
    for part in field.split("."):
      node = node[part]
    return node

  def has(self, field: str) -> bool:
    try:
      self._get(field)
      return True
    except (KeyError, AttributeError):
      return False

  def integer(self, field: str, low: int, high: int | None = None) -> None:
    """An integer in [low, high] (high None: no upper bound)."""
    value = self._get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
        high is not None and value > high):
      self.add(field, f"an integer >= {low}" if high is None else
               f"an integer in {low}..{high}")

  def number(self, field: str, *, low: float = -math.inf, low_open: bool = False,
             high: float = math.inf, high_open: bool = False) -> None:
    """A finite number in the interval given ([low, high], ends open when asked)."""
    value = self._get(field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and \
        (value < high if high_open else value <= high)
    if not ok:
      if math.isinf(high):
        bound = "" if math.isinf(low) else f" {'>' if low_open else '>='} {low:g}"
      else:
        bound = (" in " + ("(" if low_open else "[") + f"{low:g}, {high:g}"
                 + (")" if high_open else "]"))
      self.add(field, "a finite number" + bound)

  def one_of(self, field: str, choices: tuple) -> None:
    if self._get(field) not in choices:
      self.add(field, f"one of {', '.join(map(repr, choices))}")

  def sizes(self, field: str) -> None:
    """A non-empty sequence of integers >= 1."""
    value = self._get(field)
    if not isinstance(value, (tuple, list)) or not value or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
      self.add(field, "a non-empty tuple of integers >= 1")

  def numbers(self, field: str, *, low: float = -math.inf) -> None:
    """A non-empty sequence of finite numbers >= low."""
    value = self._get(field)
    if not isinstance(value, (tuple, list)) or not value or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        or v < low for v in value):
      self.add(field, f"a non-empty tuple of finite numbers >= {low:g}")


def check_top(p: Problems) -> None:
  if not isinstance(p.cfg.stages, (tuple, list)) or not all(
      isinstance(s, str) and s for s in p.cfg.stages):
    p.add("stages", "a tuple of stage names (empty: all of the method's stages)")


def check_data(p: Problems) -> None:
  for field in ("batch_size", "eval_batch_size", "image_size", "in_channels", "num_raters"):
    p.integer(field, 1)
  p.integer("num_folds", 2)
  p.integer("worker_count", 0)
  if isinstance(p.cfg.num_folds, int) and p.cfg.num_folds >= 2:
    p.integer("fold", -1, p.cfg.num_folds - 1)
  p.number("val_fraction", low=0.0, high=1.0, high_open=True)
  p.one_of("split_level", ("patient", "slice"))
  if isinstance(p.cfg.num_raters, int) and len(p.cfg.rater_names) != p.cfg.num_raters:
    p.add("rater_names", f"{p.cfg.num_raters} names, one per rater (data.num_raters)")
  if p.has("synthetic"):
    p.integer("synthetic.num_images", 1)
    p.integer("synthetic.num_patients", 1)
  if p.has("folder"):
    p.integer("folder.axis", 0, 2)
    p.one_of("folder.resize", ("crop_or_pad", "resample"))
    p.one_of("folder.normalize", ("robust", "minmax", "none"))


def check_model(p: Problems, config) -> None:
  for field in ("feature_channels", "latent_dim", "convs_per_block"):
    p.integer(field, 1)
  p.integer("fcomb_layers", 0)
  p.sizes("unet_filters")
  p.sizes("gaussian_filters")
  p.one_of("backbone", ("resnet34", "unet"))
  p.one_of("posterior_input", ("one_random", "all"))
  size = config.data.image_size
  if isinstance(size, int) and size >= 1:
    # The backbone halves the image this many times and needs whole sizes on the way.
    factor = {"resnet34": 32,
              "unet": 2 ** max(len(p.cfg.unet_filters) - 1, 0)}.get(p.cfg.backbone, 1)
    if size % factor:
      p.found.append(f"config.data.image_size={size}: the {p.cfg.backbone} backbone needs a "
                     f"multiple of {factor}")


def check_stage(p: Problems) -> None:
  """The fields every training stage's section has (epochs, lr, cadences, seeds)."""
  p.integer("epochs", 0)
  p.number("lr", low=0.0, low_open=True)
  p.one_of("schedule", ("constant", "cosine"))
  p.integer("checkpoint_every", 1)
  p.integer("log_every", 1)
  p.integer("eval_every_epochs", 0)
  steps = p.cfg.max_steps
  if steps != -1 and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
    p.add("max_steps", "-1 (epochs decide) or an integer >= 1")
  if p.has("dice_epsilon"):
    p.number("dice_epsilon", low=0.0, low_open=True)


def check_stage1(p: Problems) -> None:
  check_stage(p)
  p.integer("num_bound_samples", 1)
  for field in ("bound_weight", "kl_weight", "reg_weight"):
    p.number(field, low=0.0)
  p.one_of("seg_latent", ("posterior", "prior"))
  p.one_of("bound_form", ("sum", "dpersona"))


def check_stage2(p: Problems) -> None:
  check_stage(p)
  p.integer("num_samples", 1)
  p.integer("eval_num_samples", 1)
  p.integer("seg_phrasings_per_rater", 0)
  p.integer("projector_hidden", 1)
  p.integer("grid_cells_per_pass", 0)
  p.number("alpha", low=0.0)
  p.number("beta", low=0.0)
  p.number("tau", low=0.0, low_open=True)
  p.numbers("grid_alpha", low=0.0)
  p.numbers("grid_beta", low=0.0)


def check_text(p: Problems) -> None:
  p.integer("max_length", 1)


def check_eval(p: Problems) -> None:
  p.integer("num_samples", 1)
  p.integer("num_images_logged", 0)
  p.one_of("convention", ("dpersona", "standard"))


# Section -> its check, `fn(problems)` or `fn(problems, config)` (for checks that need
# another section). A method adding a config section adds its check here (through
# `register_check`); a training stage's section starts from `check_stage`.
SECTION_CHECKS: dict[str, Any] = {
    "": check_top, "data": check_data, "model": check_model, "stage1": check_stage1,
    "stage2": check_stage2, "text": check_text, "eval": check_eval,
}


def register_check(section: str, fn) -> None:
  """Adds (or replaces) the check of a config section (see `SECTION_CHECKS`)."""
  SECTION_CHECKS[section] = fn


def check(config) -> None:
  """Refuses a config with a count, period, size or rate the run cannot use.

  Called first by `run.train_and_evaluate`, `run.dry_run` and the grid, before any data
  is read or anything compiled.

  Raises:
    ConfigError: one line naming every bad field and what it expects.
  """
  import inspect  # pylint: disable=g-import-not-at-top
  found = []
  for section, fn in SECTION_CHECKS.items():
    if section and section not in config:
      continue
    p = Problems(config, section)
    try:
      if len(inspect.signature(fn).parameters) > 1:
        fn(p, config)
      else:
        fn(p)
    except (AttributeError, KeyError, TypeError) as e:
      found.append(f"config.{section or '<top>'}: malformed ({e})")
    found.extend(p.found)
  if found:
    raise ConfigError("; ".join(found))


# ---------------------------------------------------------------- resuming
# Fields a resumed run may change (dotted names, `*` matches one name): they change how
# long a run trains, how often it logs, saves and validates, how it is scored, and how
# fast, but not what an existing checkpoint means. Anything else differing from the
# run's config.json refuses the resume unless `--config.allow_config_change=True`.
RESUMABLE_FIELDS = (
    "allow_config_change",
    "stages",  # Which stages this invocation runs (e.g. Stage 2 after Stage 1).
    "*.epochs", "*.max_steps",  # Training longer (a cosine schedule then stretches).
    "*.log_every", "*.checkpoint_every", "*.eval_every_epochs",
    "data.fold",  # Another fold of the same protocol trains in its own directories.
    "data.eval_batch_size", "data.worker_count",
    "stage2.eval_num_samples", "stage2.grid_cells_per_pass",
    "eval.*",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _same(a: Any, b: Any) -> bool:
  """Equal as JSON values: 1 == 1.0, NaN == NaN, but True != 1 and a list is a tuple."""
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, bool) or isinstance(b, bool):
    return a is b
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b


def config_changes(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """(field, saved value, new value) of every field of `new` that differs from `saved`
  and is not in `RESUMABLE_FIELDS`. Fields `saved` lacks (added since) take the value
  `new` has, so they do not count; fields only `saved` has (removed since) are ignored."""
  import fnmatch  # pylint: disable=g-import-not-at-top
  old, cur = _flat(migrate(saved)), _flat(new)
  out = []
  for field, value in cur.items():
    if field not in old or _same(old[field], value):
      continue
    if any(fnmatch.fnmatchcase(field, pattern) and field.count(".") == pattern.count(".")
           for pattern in RESUMABLE_FIELDS):
      continue
    out.append((field, old[field], value))
  return out

"""The one way every command-line tool starts and fails.

Each tool (`main`, `grid`, `predict`, `export`, `convert`, `score`, `inspect_data`,
`table`, `serve`) is a small module: absl flags at module level, a `main(argv)`, and

  if __name__ == "__main__":
    cli.run(main, name="predict")

`run` gives them the same behaviour:
- `--help` (and `--helpshort`, `--helpfull`) prints the help and exits 0;
- stray positional arguments are refused;
- a user mistake (a misspelt or renamed config field, a bad `:arg`, a wrong config path,
  a bad flag value, a missing data file or model folder: any `errors.UserError`) ends in
  one line on stderr, `<tool>: error: ...`, and exit status 2, before any work is done
  where it can be found that early;
- anything else is a bug and keeps its traceback;
- the persistent JAX compilation cache is on (`compile_cache.py`) before the tool
  compiles anything; `--compilation_cache=DIR` moves it, `--compilation_cache=` (or
  `none`) turns it off.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags

from prosona_jax import config_lib
from prosona_jax import logger
from prosona_jax.errors import UserError

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None,
    "Folder of the persistent JAX compilation cache, which saves recompiling in later runs "
    "(default: $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/prosona_jax/jax or "
    "~/.cache/prosona_jax/jax); empty or 'none' turns it off.")
_DEFERRED: list[str] = []  # Config-flag errors found while the flags were defined.
_CONFIG_ERRORS = (UserError, AttributeError, KeyError, ValueError, TypeError, OSError,
                  SyntaxError, ImportError)
_HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml", "-help")
EXIT_USER_ERROR = 2


def fail(name: str, message: str) -> None:
  """Prints `<name>: error: <message>` (one line) on stderr and exits with status 2."""
  text = " ".join(str(message).split())
  print(f"{name}: error: {text}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _asked_for_help(argv: Sequence[str]) -> bool:
  return any(a.split("=", 1)[0] in _HELP_FLAGS for a in argv[1:])


def _config_error_message(error: BaseException, argv: Sequence[str]) -> str:
  """A one-line account of an error raised while parsing `--config...` flags."""
  text = str(error.args[0] if isinstance(error, (AttributeError, KeyError)) and error.args
             else error)
  if "Traceback (most recent call last)" in text:
    # ml_collections wraps an error of `get_config` with its whole traceback: keep the
    # exception's own line (`module.Error: message`), without the class path.
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last
  text = text.strip().strip("'\"").replace("\\n", " ").replace("\\'", "'")
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  missing = re.match(r"^'?([\w]+)'?", text)
  if isinstance(error, (AttributeError, KeyError)) and (suggestion or missing):
    good, bad = suggestion.groups() if suggestion else (None, missing.group(1))
    for arg in argv:
      parts = arg.split("=", 1)[0].lstrip("-").split(".")
      if bad in parts[1:]:
        parent = ".".join(parts[:parts.index(bad, 1)])
        hint = f"; did you mean '{good}'?" if good else ""
        return f"{arg.split('=', 1)[0]}: {parent} has no field '{bad}'{hint}"
  return text


def _parse_flags(name: str, argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    # absl's help flags print the help, then exit with status 1.
    if _asked_for_help(argv) and e.code in (0, 1, None):
      raise SystemExit(0) from None
    raise
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:
      text = _config_error_message(e, argv)
    fail(name, f"{text} (see --help)")
  except _CONFIG_ERRORS as e:
    # ml_collections' config flags load the config file and apply the overrides while
    # the flags are parsed; their mistakes surface as these.
    fail(name, _config_error_message(e, argv))
  return argv  # Not reached.


def define_config_file(name: str, default: str | None, help_string: str, **kwargs):
  """`config_flags.DEFINE_config_file`, whose mistakes wait for `run` to report them.

  A config flag with a default loads that file, and applies the command line's
  `--config.field=value` overrides, while it is being defined (at import): a misspelt
  field fails there, before `run` could turn it into one line.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except _CONFIG_ERRORS as e:
    _DEFERRED.append(_config_error_message(e, sys.argv))
    return None


def _unreadable_configs() -> list[str]:
  """Messages for config flags whose file could not be loaded.

  ml_collections defers a missing or unreadable config file to the first use of the
  config; a tool should refuse it before doing anything.
  """
  out = []
  for name in flags.FLAGS:
    value = flags.FLAGS[name].value
    if type(value).__name__ == "_ErrorConfig":
      error = object.__getattribute__(value, "_error")
      path = flags.FLAGS[name].serialize().split("=", 1)[-1]
      reason = getattr(error, "strerror", None) or "not loadable"
      missing = "No such file" in str(error)
      out.append(f"--{name}={path}: " + ("no such config file" if missing else
                                         f"cannot load the config file ({reason})"))
  return out


def _main(main: Callable[[list[str]], Any], name: str, positional: int, progress: bool,
          argv: list[str]) -> Any:
  for message in _unreadable_configs():
    fail(name, message)
  if len(argv) - 1 > positional:
    fail(name, f"unexpected arguments: {' '.join(argv[1 + positional:])} (see --help)")
  logger.set_verbosity(progress=progress)
  _start_compilation_cache(name)
  try:
    return main(argv)
  except (UserError, app.UsageError) as e:
    fail(name, str(e))
  return None


def _start_compilation_cache(name: str) -> None:
  """Turns on the persistent compilation cache (`--compilation_cache`), before any compile."""
  from prosona_jax import compile_cache  # pylint: disable=g-import-not-at-top
  try:
    compile_cache.enable(compile_cache.resolve(_COMPILATION_CACHE.value))
  except OSError as e:  # A read-only home must not stop the tool: it only runs slower.
    print(f"{name}: warning: compilation cache off ({e})", file=sys.stderr)
    compile_cache.enable(None)


def run(main: Callable[[list[str]], Any], *, name: str, positional: int = 0,
        progress: bool = False) -> None:
  """Runs `main(argv)` as the tool `name` (see the module docstring).

  Args:
    main: the tool's `main(argv)`; its return value is the exit status.
    name: the tool's name in messages (`python -m prosona_jax.<name>`).
    positional: positional arguments the tool accepts (inspect_data: its PATH).
    progress: keep this package's INFO lines (training progress); otherwise only
      warnings and errors are logged.
  """
  # Listed in the tool's own --help, not only in --helpfull.
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["compilation_cache"])
  renamed = config_lib.renamed_overrides(sys.argv[1:])
  for message in renamed + _DEFERRED:
    fail(name, message)
  app.run(functools.partial(_main, main, name, positional, progress),
          flags_parser=functools.partial(_parse_flags, name))

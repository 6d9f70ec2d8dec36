"""The persistent JAX compilation cache that every command-line tool turns on.

Compiling is most of a short command's time on a CPU: `predict` on one image spends
seconds compiling programs that are the same in every run. JAX can keep compiled programs
on disk, keyed by the program, the JAX and jaxlib versions, the device and the compiler
flags; a later process that builds the same program loads it instead. `cli.run` calls
`enable` before the tool does any work, so before anything is compiled. The folder is

- `--compilation_cache=DIR` when given; `--compilation_cache=` (empty) or `=none` turns
  the cache off;
- else `$JAX_COMPILATION_CACHE_DIR` when set (JAX's own variable);
- else a per-user folder: `$XDG_CACHE_HOME/prosona_jax/jax`, or
  `~/.cache/prosona_jax/jax`.

Every program is cached, however quick its compile (JAX's default skips those under 1 s,
which on a CPU is nearly all of `predict`'s), unless
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` says otherwise. The folder grows with each
new program (model, batch size, tile count); it can be deleted at any time, and
`JAX_COMPILATION_CACHE_MAX_SIZE=<bytes>` caps it (least recently used first out).
"""

from __future__ import annotations

import os

OFF = ("", "none")  # Flag values that turn the cache off.


def default_dir() -> str:
  """The per-user cache folder (module docstring)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "prosona_jax", "jax")


def resolve(flag_value: str | None) -> str | None:
  """The folder to use: `flag_value` when given (None: not given), else the defaults.

  Returns None when the cache is off.
  """
  if flag_value is not None:
    value = flag_value.strip()
    return None if value.lower() in OFF else os.path.abspath(os.path.expanduser(value))
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir()


def enable(path: str | None) -> str | None:
  """Points JAX's persistent compilation cache at `path` (None: turns it off).

  Call it before the first compile: JAX opens the cache once, at its first compile.

  Returns:
    The folder in use, or None when the cache is off.

  Raises:
    OSError: `path` cannot be created or written (the cache stays as it was).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  os.makedirs(path, exist_ok=True)
  if not os.access(path, os.W_OK):
    raise PermissionError(f"{path}: not writable")
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
    # -1: no size floor (0 would let JAX pick one for the file system).
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path

"""Default XLA flags for CPU runs, added to `XLA_FLAGS` before JAX starts a backend.

XLA reads `XLA_FLAGS` once, when the first backend is created, and aborts the process on
a flag it does not know. So each default here is added only when
- the user has not set that flag (theirs always wins),
- the run is on CPU (JAX_PLATFORMS names cpu first, or no accelerator plugin is installed),
- the installed jaxlib knows the flag and the value (checked in its shared library),
- and `PROSONA_XLA_DEFAULTS` is not `0`.

`set_cpu_defaults()` must run before the first `jax.devices()`/computation; importing
`jax` alone is fine. Importing `prosona_jax` runs it (`prosona_jax/__init__.py`).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import mmap
import os

# Flags worth measuring on CPU (`benchmarks/bench_stage1.py --xla_flags=<name>`): the
# flag, and strings the installed XLA must contain for the flag and its value to parse.
CANDIDATES: dict[str, tuple[str, tuple[bytes, ...]]] = {
    # XLA's own (Eigen) convolutions instead of YNNPACK's, YNNPACK kept for dots.
    "eigen_conv": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
                   (b"xla_cpu_experimental_ynn_fusion_type",
                    b"LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")),
}

# Names from CANDIDATES added to CPU runs. `eigen_conv`: on a quiet 2-core AMD EPYC
# (jaxlib 0.10.2) the Stage-1 step at batch 8 takes 1.43 s instead of 1.91 s, 10 prior
# samples of 16 images 0.77 s instead of 1.02 s (benchmarks/README.md); YNNPACK runs each
# convolution on one thread, Eigen on all of them. Other flags tried (YNNPACK off for
# dots, its elementwise and reduce fusions, 512-bit vectors, oneDNN, the thunk runtime
# off, the concurrency-optimised scheduler) were no faster.
CPU_DEFAULTS: tuple[str, ...] = ("eigen_conv",)

_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin",
                        "jax_rocm6_plugin", "jax_rocm7_plugin", "jax_plugins")


def _flag_name(flag: str) -> str:
  return flag.lstrip("-").split("=", 1)[0]


def _is_cpu_run() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", ""))
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PLUGINS)


@functools.lru_cache(maxsize=None)
def _xla_library() -> str | None:
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return None
  folder = list(spec.submodule_search_locations)[0]
  for name in ("libjax_common.so", "xla_extension.so", "libjax_common.dylib"):
    for path in glob.glob(os.path.join(folder, name + "*")):
      return path
  return None


@functools.lru_cache(maxsize=None)
def _library_contains(needles: tuple[bytes, ...]) -> bool:
  path = _xla_library()
  if path is None:
    return False
  try:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
      return all(m.find(n) >= 0 for n in needles)
  except (OSError, ValueError):
    return False


def with_cpu_defaults(xla_flags: str, names: tuple[str, ...] | None = None) -> str:
  """`xla_flags` plus each supported flag of `names` (default CPU_DEFAULTS) it lacks."""
  present = {_flag_name(f) for f in xla_flags.split() if f.startswith("--")}
  added = []
  for name in CPU_DEFAULTS if names is None else names:
    flag, needles = CANDIDATES[name]
    if _flag_name(flag) not in present and _library_contains(needles):
      added.append(flag)
  return " ".join([xla_flags.strip()] + added).strip()


def set_cpu_defaults() -> str:
  """Adds the CPU defaults to `os.environ['XLA_FLAGS']` where they apply; returns it."""
  current = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("PROSONA_XLA_DEFAULTS", "1") == "0" or not _is_cpu_run():
    return current
  new = with_cpu_defaults(current)
  if new != current:
    os.environ["XLA_FLAGS"] = new
  return new

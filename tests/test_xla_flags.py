"""CPU XLA flag defaults: added only where they apply, never over the user's choice."""

import os
import subprocess
import sys

from prosona_jax import xla_flags


def _names(flags: str) -> list[str]:
  return [f.lstrip("-").split("=")[0] for f in flags.split()]


def test_with_cpu_defaults_keeps_user_flags(monkeypatch):
  monkeypatch.setattr(xla_flags, "_library_contains", lambda needles: True)
  flag, _ = xla_flags.CANDIDATES["eigen_conv"]
  name = flag.lstrip("-").split("=")[0]
  assert xla_flags.with_cpu_defaults("", ("eigen_conv",)) == flag
  user = f"--xla_dump_to=/tmp/x --{name}=individual_dot"
  out = xla_flags.with_cpu_defaults(user, ("eigen_conv",))
  assert out.startswith(user) and _names(out).count(name) == 1
  assert all(n in xla_flags.CANDIDATES for n in xla_flags.CPU_DEFAULTS)


def test_unsupported_flags_are_skipped(monkeypatch):
  assert not xla_flags._library_contains((b"xla_cpu_no_such_flag_zz9",))
  monkeypatch.setattr(xla_flags, "_library_contains", lambda needles: False)
  assert xla_flags.with_cpu_defaults("--xla_dump_to=/tmp/x", ("eigen_conv",)) == (
      "--xla_dump_to=/tmp/x")


def test_set_cpu_defaults_respects_opt_out_and_platform(monkeypatch):
  monkeypatch.setattr(xla_flags, "_library_contains", lambda needles: True)
  monkeypatch.setattr(xla_flags, "CPU_DEFAULTS", ("eigen_conv",))
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert xla_flags.set_cpu_defaults() == "--xla_dump_to=/tmp/x"
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PROSONA_XLA_DEFAULTS", "0")
  assert xla_flags.set_cpu_defaults() == "--xla_dump_to=/tmp/x"
  monkeypatch.setenv("PROSONA_XLA_DEFAULTS", "1")
  assert xla_flags.set_cpu_defaults() == os.environ["XLA_FLAGS"] != "--xla_dump_to=/tmp/x"


def test_installed_jaxlib_accepts_the_candidates():
  """XLA aborts on an unknown flag: start a CPU backend with every candidate that passes."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PROSONA_XLA_DEFAULTS="1")
  code = ("import os; from prosona_jax import xla_flags; os.environ['XLA_FLAGS'] = "
          "xla_flags.with_cpu_defaults('', tuple(xla_flags.CANDIDATES)); "
          "xla_flags.set_cpu_defaults(); import jax, jax.numpy as jnp; "
          "print(float(jnp.ones(3).sum()))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       check=True)
  assert out.stdout.strip() == "3.0"

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


def test_importing_the_package_applies_the_cpu_defaults_unless_told_not_to():
  """`import prosona_jax` sets XLA_FLAGS on CPU (before any backend starts); opt-out and
  the user's own value of a flag are respected."""
  expected = xla_flags.with_cpu_defaults("")
  assert expected, "this jaxlib supports none of CPU_DEFAULTS: nothing to check"
  code = "import os, prosona_jax; print(os.environ.get('XLA_FLAGS', ''))"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def flags_after_import(**extra) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "PROSONA_XLA_DEFAULTS")}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()

  assert flags_after_import() == expected
  assert flags_after_import(PROSONA_XLA_DEFAULTS="0") == ""
  flag, _ = xla_flags.CANDIDATES[xla_flags.CPU_DEFAULTS[0]]
  own = flag.split("=")[0] + "=-individual_dot"
  assert flags_after_import(XLA_FLAGS=own) == own

"""The persistent compilation cache every tool turns on: where it goes, and turning it off."""

import os
import subprocess
import sys

import numpy as np

from prosona_jax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_flag_then_jax_variable_then_per_user_folder(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  assert compile_cache.resolve(None) == str(tmp_path / "xdg" / "prosona_jax" / "jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert compile_cache.resolve(None) == os.path.expanduser("~/.cache/prosona_jax/jax")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jaxvar"))
  assert compile_cache.resolve(None) == str(tmp_path / "jaxvar")
  assert compile_cache.resolve(str(tmp_path / "mine")) == str(tmp_path / "mine")
  assert compile_cache.resolve("") is None and compile_cache.resolve("None") is None


def _predict(model, image, out, *flags, env):
  proc = subprocess.run([sys.executable, "-m", "prosona_jax.predict", f"--model={model}",
                         f"--input={image}", f"--out={out}", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isfile(os.path.join(out, "x_prompt0.npy"))


def _entries(folder) -> list[str]:
  if not os.path.isdir(folder):
    return []
  return [n for n in os.listdir(folder) if not n.startswith(".")]


def test_predict_fills_the_per_user_cache_and_the_flag_moves_or_disables_it(tiny_export,
                                                                          tmp_path):
  image = tmp_path / "x.npy"
  np.save(image, np.random.default_rng(0).random((32, 32)).astype(np.float32))
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
  per_user = tmp_path / "xdg" / "prosona_jax" / "jax"
  # Off: nothing written, not even the default folder.
  _predict(tiny_export, image, tmp_path / "o1", "--compilation_cache=", env=env)
  _predict(tiny_export, image, tmp_path / "o2", "--compilation_cache=none", env=env)
  assert not per_user.exists()
  # On by default, in the per-user folder.
  _predict(tiny_export, image, tmp_path / "o3", env=env)
  assert len(_entries(per_user)) >= 2  # At least the encode and decode_prompts programs.
  # Moved by the flag.
  _predict(tiny_export, image, tmp_path / "o4", f"--compilation_cache={tmp_path / 'mine'}",
           env=env)
  # The same programs (the keys differ: the folder is part of XLA's options).
  programs = lambda folder: sorted(n.rsplit("-", 2)[0] for n in _entries(folder))
  assert programs(tmp_path / "mine") == programs(per_user)

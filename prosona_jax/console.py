"""Console scripts (`prosona-train`, `prosona-score`, ...) declared in pyproject.toml.

Each runs its module exactly as `python -m prosona_jax.<module>` does: the module is
executed as `__main__`, so the flags it defines under `if __name__ == "__main__":` (some
define them only there, so that importing them adds no flags) exist, and a console script
cannot drift from the `python -m` form the README documents.
"""

import runpy


def _run(module: str) -> None:
  # alter_sys: sys.argv[0] and sys.modules["__main__"] as under `python -m`, which absl's
  # usage text and flag parsing read.
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def train() -> None:
  """`prosona-train`: `python -m prosona_jax.main` (both stages, folds, evaluation)."""
  _run("prosona_jax.main")


def grid() -> None:
  """`prosona-grid`: `python -m prosona_jax.grid` (the alpha/beta ablation grid)."""
  _run("prosona_jax.grid")


def predict() -> None:
  """`prosona-predict`: `python -m prosona_jax.predict` (masks for files or dataset keys)."""
  _run("prosona_jax.predict")


def export() -> None:
  """`prosona-export`: `python -m prosona_jax.export` (a run's weights and functions)."""
  _run("prosona_jax.export")


def convert() -> None:
  """`prosona-convert`: `python -m prosona_jax.convert` (D-Persona PyTorch checkpoints)."""
  _run("prosona_jax.convert")


def score() -> None:
  """`prosona-score`: `python -m prosona_jax.score` (metrics of saved predictions)."""
  _run("prosona_jax.score")


def inspect_data() -> None:
  """`prosona-inspect`: `python -m prosona_jax.inspect_data` (a dataset's card)."""
  _run("prosona_jax.inspect_data")


def serve() -> None:
  """`prosona-serve`: `python -m prosona_jax.serve` (the local review page and JSON API)."""
  _run("prosona_jax.serve")

"""The methods `--config.method` names, each a sequence of stages trained in order."""

from __future__ import annotations

from prosona_jax.errors import ConfigError
from prosona_jax.methods import base
from prosona_jax.methods import prosona_stage1
from prosona_jax.methods import prosona_stage2

# method -> its stages, in training order. `config.stages` picks a subset by name.
METHODS: dict[str, tuple[type[base.Method], ...]] = {
    "prosona": (prosona_stage1.Stage1, prosona_stage2.Stage2),
}


def stages(config) -> list[type[base.Method]]:
  """The stage classes a run trains: the method's stages named in `config.stages`."""
  if config.method not in METHODS:
    raise ConfigError(f"config.method={config.method!r}: expected one of {sorted(METHODS)}")
  available = {cls.name: cls for cls in METHODS[config.method]}
  wanted = tuple(config.stages)
  unknown = [s for s in wanted if s not in available]
  if unknown or not wanted:
    raise ConfigError(
        f"config.stages={wanted!r}: method {config.method!r} has the stages "
        f"{tuple(available)}, e.g. --config.stages={next(reversed(available))}")
  return [cls for cls in METHODS[config.method] if cls.name in wanted]


def stage_names(config) -> tuple[str, ...]:
  """Every stage name of the config's method (what a summary table lists)."""
  return tuple(cls.name for cls in METHODS.get(config.method, ()))

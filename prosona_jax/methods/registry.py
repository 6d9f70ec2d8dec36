"""The methods `--config.method` names, each a sequence of stages trained in order."""

from __future__ import annotations

from typing import Callable, Union

from prosona_jax.errors import ConfigError
from prosona_jax.methods import base
from prosona_jax.methods import baselines
from prosona_jax.methods import dpersona
from prosona_jax.methods import prosona_stage1
from prosona_jax.methods import prosona_stage2
from prosona_jax.methods import tab

Stages = tuple[type[base.Method], ...]

# method -> its stages, in training order (or a function of the config giving them).
# `config.stages` picks a subset by name (empty: all of them).
METHODS: dict[str, Union[Stages, Callable[..., Stages]]] = {
    "prosona": (prosona_stage1.Stage1, prosona_stage2.Stage2),
    # `config.rater`: one U-Net (row "U-Net (A{rater+1})"), or all R in turn (-1).
    "unet": baselines.unet_stages,
    "cm_global": (baselines.CMGlobal,),
    "cm_pixel": (baselines.CMPixel,),
    "pionono": (baselines.Pionono,),
    # D-Persona's heads on ProSona's Stage 1 (the same frozen latent space).
    "dpersona": (prosona_stage1.Stage1, dpersona.DPersonaStage),
    "tab": (tab.TAB,),
}


def method_stages(config) -> Stages:
  """Every stage of the config's method, in training order."""
  if config.method not in METHODS:
    raise ConfigError(f"config.method={config.method!r}: expected one of {sorted(METHODS)}")
  entry = METHODS[config.method]
  return tuple(entry(config) if callable(entry) else entry)


def stages(config) -> list[type[base.Method]]:
  """The stage classes a run trains: the method's stages named in `config.stages`."""
  classes = method_stages(config)
  available = {cls.stage_name(config): cls for cls in classes}
  wanted = tuple(config.stages) or tuple(available)
  unknown = [s for s in wanted if s not in available]
  if unknown:
    raise ConfigError(
        f"config.stages={wanted!r}: method {config.method!r} has the stages "
        f"{tuple(available)}, e.g. --config.stages={next(reversed(available))}")
  return [cls for name, cls in available.items() if name in wanted]


def stage_names(config) -> tuple[str, ...]:
  """Every stage name of the config's method (what a summary table lists)."""
  if config.method not in METHODS:
    return ()
  return tuple(cls.stage_name(config) for cls in method_stages(config))


def param_counts(config) -> dict:
  """Parameter counts of the method from the config alone (the dry run's summary).

  Each stage counts the parameters it owns (D-Persona's stage: its heads; ProSona's
  Stage 2: none, its projector's width is the text encoder's). The method's `total`
  and `trainable` are the sums over its stages; the components of every stage are
  listed at the top level too (the first stage's win a clash), and per stage under
  `stages` when there are several.
  """
  per_stage = {}
  for cls in method_stages(config):
    counts = cls.param_counts(config)
    if counts:
      per_stage[cls.stage_name(config)] = counts
  summary: dict = {}
  for counts in per_stage.values():
    for k, v in counts.items():
      if k not in ("total", "trainable"):
        summary.setdefault(k, int(v))
  summary["total"] = sum(int(c["total"]) for c in per_stage.values())
  summary["trainable"] = sum(int(c["trainable"]) for c in per_stage.values())
  summary["method"] = str(config.method)
  if len(per_stage) > 1:
    summary["stages"] = {name: {k: int(v) for k, v in c.items()}
                         for name, c in per_stage.items()}
  return summary

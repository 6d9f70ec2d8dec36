"""The method interface: what every trainable thing gives the one loop and the evaluator.

A *method* is one stage of training (ProSona's Stage 1, its Stage 2, a baseline): it
builds its model, initialises its state, compiles its train step, and makes the N
predictions per image that the metrics score, saying which rater each stands for. The
protocol around it is shared and lives elsewhere:

- `Fold` (here): the data, split, mesh and seeds of one fold, the same for every method;
- `trainer.fit`: resume, steps, logging, checkpoints, NaN stop, preemption;
- `evaluate.Evaluator`: validation and test scoring, the JSON files, figures;
- `run.train_and_evaluate`: the fold loop over the method's stages.

A method reads only its own config section (`section`), the shared `data`, `model`,
`text` and `eval` sections, and nothing of another stage's section.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
import optax

from prosona_jax import layout
from prosona_jax import metrics
from prosona_jax import optimizers
from prosona_jax import parallel
from prosona_jax import trainer
from prosona_jax.data import pipeline

TrainStep = Callable[[trainer.TrainState, dict], tuple[trainer.TrainState, dict]]
# (state, images (B, H, W, C) sharded over the mesh, rng) -> probabilities (B, N, H, W).
PredictFn = Callable[[trainer.TrainState, jax.Array, jax.Array], jax.Array]


# Model selection (`eval.select_on`): on the validation split carved from the training
# patients, on the test fold (what the published baselines did), or none (the final state).
SELECT_ON = ("val", "test", "last", "auto")
# Selection metrics: Dice Max averaged over both directions plus Dice Soft (the baselines'
# `train.py`), or Dice Match (D-Persona's Stage 2).
SELECT_METRICS = ("dice_max_mean+dice_soft", "dice_match")


def selection_score(metric: str, summary: dict) -> float:
  """The scalar a method's model selection maximises, from a validation summary."""
  if metric == "dice_max_mean+dice_soft":
    return float(0.5 * (summary["dice_max"] + summary["dice_max_reverse"])
                 + summary["dice_soft"])
  if metric == "dice_match":
    return float(summary["dice_match"])
  raise ValueError(f"Unknown selection metric {metric!r}; expected one of {SELECT_METRICS}.")


def prediction_rater_dice(labels: np.ndarray, probs: np.ndarray, convention: str
                          ) -> list[list[float]]:
  """Mean direct Dice of every prediction (rows, P) with every rater (columns, R).

  The `prompt_rater_dice` of ProSona's Stage 2 for any method whose predictions stand
  for raters: a personalised model has its largest entries on the diagonal.
  """
  dm_NRP = metrics.dice_matrix(labels, probs, convention=convention)
  return dm_NRP.mean(0).T.tolist()


def round_up(n: int, multiple: int) -> int:
  return int(math.ceil(n / multiple) * multiple)


@dataclasses.dataclass
class Fold:
  """One fold of the protocol: what every method trained on it shares."""
  config: ml_collections.ConfigDict
  workdir: str
  fold: int
  source: Any
  split: Any  # data.splits.Split: train / val / test indices.
  mesh: jax.sharding.Mesh

  @property
  def local_batch_size(self) -> int:
    """This process's share of the global batch (`data.batch_size`)."""
    return parallel.check_batch_size(self.config.data.batch_size, self.mesh)

  @property
  def steps_per_epoch(self) -> int:
    return pipeline.steps_per_epoch(len(self.split.train), self.local_batch_size,
                                    jax.process_count())

  @property
  def eval_batch_size(self) -> int:
    return round_up(self.config.data.eval_batch_size, self.mesh.devices.size)

  def train_iterator(self, shuffle_seed_offset: int):
    """The checkpointable Grain iterator of this process's training batches."""
    d = self.config.data
    seed = d.shuffle_seed + d.shuffle_seed_per_fold * self.fold + shuffle_seed_offset
    return iter(pipeline.train_loader(
        self.source, self.split.train, batch_size=self.local_batch_size, seed=seed,
        augment_flip=d.augment_flip, augment_rotate=d.augment_rotate,
        worker_count=d.worker_count))


class TestOutput(NamedTuple):
  """A method's scored test fold: the result dict (JSON) and what it was computed from."""
  result: dict
  labels: np.ndarray  # (N, R, H, W)
  probs: np.ndarray  # (N, P, H, W): every prediction the method makes.
  keys: list


def total_steps(stage_cfg, steps_per_epoch: int) -> int:
  if stage_cfg.max_steps > 0:
    return int(stage_cfg.max_steps)
  return int(stage_cfg.epochs) * steps_per_epoch


class Method(abc.ABC):
  """One trainable stage. Subclasses set `name` and `section` and fill in the four
  abstract methods; everything else has a default that fits most methods."""

  name: ClassVar[str]  # Stage name: its directory, log prefix and eval file.
  section: ClassVar[str]  # Its config section (epochs, lr, schedule, cadences, seeds).
  log_val_images: ClassVar[bool] = False  # Union of labels vs predictions to TensorBoard.
  # What `eval.select_on=auto` means for this stage, and the metric selection maximises.
  default_select_on: ClassVar[str] = "val"
  select_metric: ClassVar[str] = "dice_max_mean+dice_soft"

  @classmethod
  def preflight(cls, config: ml_collections.ConfigDict, workdir: str, *,
                run_stages: Sequence[str] = (), dir_name: str | None = None) -> None:
    """Checks what the stage needs from outside the config, before any fold trains.

    `run.train_and_evaluate` and the grid call it for every stage of the run, after
    the data source has opened and before the first step, so that a missing file or
    model fails in seconds rather than after hours of an earlier stage. Work done here
    that the stage would do anyway (Stage 2: embedding the prompt bank) is left where
    the stage finds it.

    Args:
      config: the run's config.
      workdir: the run's work directory.
      run_stages: names of the stages this run trains (a stage may need the output of
        an earlier one, which then need not exist yet).
      dir_name: the stage's directory under `fold<k>/` (default `name`; the grid's
        Stage 2 keeps its state under `grid`).

    Raises:
      UserError: something the user must provide is missing or unreadable; the
        message says what and how to provide it.
    """
    del config, workdir, run_stages, dir_name

  def __init__(self, fold: Fold, *, stage_dir: str | None = None):
    self.fold = fold
    self.config = fold.config
    # A variant may rename its stage (e.g. `cm_global_2class`); instances carry it.
    self.name = type(self).stage_name(fold.config)
    self.cfg = fold.config[self.section]
    self.mesh = fold.mesh
    self.stage_dir = stage_dir or layout.stage_dir(fold.workdir, fold.fold, self.name)
    self.steps_per_epoch = fold.steps_per_epoch
    self.total_steps = total_steps(self.cfg, self.steps_per_epoch)
    key = jax.random.fold_in(jax.random.key(self.config.seed + self.cfg.seed_offset),
                             fold.fold)
    self.init_rng, self.step_rng, self.eval_rng = jax.random.split(key, 3)
    # Filled by `run.train_stage`: which state is tested (`selection.Selector.info`).
    self.selection: dict = {}

  @classmethod
  def stage_name(cls, config: ml_collections.ConfigDict) -> str:
    """The stage's name under `config` (its directory and eval file)."""
    del config
    return cls.name

  @property
  def method_name(self) -> str:
    """The method this stage belongs to, as the eval JSON and `table` name it."""
    return str(self.config.method)

  @classmethod
  def param_counts(cls, config: ml_collections.ConfigDict) -> dict[str, int]:
    """Parameter counts of the stage's model, from the config alone (no data, no
    compile): at least `total` and `trainable` (what its optimizer updates)."""
    raise NotImplementedError(f"{cls.__name__} has no parameter counts.")

  @property
  def select_on(self) -> str:
    """Where the tested state is chosen: val, test or last (`eval.select_on`)."""
    choice = str(self.config.eval.select_on)
    return self.default_select_on if choice == "auto" else choice

  def selection_score(self, summary: dict) -> float:
    return selection_score(self.select_metric, summary)

  # ---------------------------------------------------------------- training
  def make_optimizer(self) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    """(optimizer, learning rate at a step for logging); default Adam with a schedule."""
    return optimizers.adam(self.cfg, self.steps_per_epoch)

  @abc.abstractmethod
  def init_state(self, tx: optax.GradientTransformation) -> trainer.TrainState:
    """A fresh state, replicated on the mesh (a resumed run then restores over it)."""

  @abc.abstractmethod
  def make_train_step(self, tx: optax.GradientTransformation) -> TrainStep:
    """The compiled `(state, global batch) -> (state, metrics)`; metrics hold `loss`."""

  def train_iterator(self):
    return self.fold.train_iterator(self.cfg.shuffle_seed_offset)

  def loop_config(self, name: str | None = None) -> trainer.LoopConfig:
    c = self.cfg
    return trainer.LoopConfig(
        name=name or f"{self.name}/fold{self.fold.fold}", total_steps=self.total_steps,
        log_every=min(c.log_every, self.total_steps), checkpoint_every=c.checkpoint_every,
        eval_every=c.eval_every_epochs * self.steps_per_epoch)

  # ---------------------------------------------------------------- evaluation
  @abc.abstractmethod
  def make_predict_fn(self) -> PredictFn:
    """The compiled `(state, images, rng) -> probabilities (B, N, H, W)`."""

  @property
  @abc.abstractmethod
  def prediction_raters(self) -> tuple[int | None, ...]:
    """For each of the N predictions, the rater it stands for (None: a sample of the
    whole distribution, scored against every rater)."""

  def make_validation_predict_fn(self) -> PredictFn | None:
    """The predictions of validation and model selection; None: the test's (one compile)."""
    return None

  def score(self, labels: np.ndarray, probs: np.ndarray) -> dict:
    """The result dict of the test fold (the scoring CLI's schema).

    Methods whose predictions stand for raters also get `prediction_rater_dice`.
    """
    convention = self.config.eval.convention
    result = metrics.score(labels, probs, convention=convention)
    if any(r is not None for r in self.prediction_raters):
      result["mean"]["prediction_rater_dice"] = prediction_rater_dice(labels, probs,
                                                                      convention)
    return result

  def validation_summary(self, mean: dict) -> dict:
    """The scalars logged as `val/...` from a scored split's means."""
    return {k: mean[k] for k in metrics.SUMMARY_KEYS}

  def describe_test(self, mean: dict) -> str:
    """Extra text for the test log line (e.g. per-rater figures)."""
    del mean
    return ""

  def result_fields(self) -> dict:
    """Fields added to the test result after `stage`, `fold` (e.g. `num_samples`)."""
    return {}

  def figures(self, state: trainer.TrainState, test: TestOutput, eval_dir: str) -> None:
    """Writes the method's figures of the test fold (every process calls it)."""
    del state, test, eval_dir

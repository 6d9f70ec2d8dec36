"""ProSona's Stage 2: prompt-guided personalization on a frozen Stage-1 model.

The frozen parts (backbone, prior, Fcomb and BatchNorm statistics) are one tree,
`frozen = {"params": ..., "batch_stats": ...}`, read params-only from the Stage-1
checkpoints (`stage2.init_from`, default this run's Stage 1), passed into every step as
an argument and never seen by the optimizer. The only trainable tree is the projector's.

A step splits into a shared forward (backbone features and K prior samples, computed once
per batch, no gradients; `models.prompt.shared_forward`) and `cell_update`, the part that
depends on the projector and on (alpha, beta). The ablation grid (`ablation.py`) maps
`cell_update` over its cells on the same shared forward; a single run is one cell.

The prompt bank is embedded once per run with the frozen text encoder and saved beside
the checkpoints (`prompt_bank.npz`), so bank prompts work later without the encoder.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prosona_jax import checkpointing
from prosona_jax import config_lib
from prosona_jax import contrastive
from prosona_jax import figures
from prosona_jax import layout
from prosona_jax import losses
from prosona_jax import metrics
from prosona_jax import parallel
from prosona_jax import prompt_bank as bank_lib
from prosona_jax import selection
from prosona_jax import trainer
from prosona_jax.errors import ConfigError
from prosona_jax.errors import UserError
from prosona_jax.methods import base
from prosona_jax.models import prob_unet
from prosona_jax.models import prompt as prompt_lib

# Stream of the step's key that picks the phrasings decoded for L_seg.
_SEG_PROMPTS_STREAM = 7


class StepConstants(NamedTuple):
  """Arrays every Stage-2 step reads: the frozen model and the training prompt bank."""
  frozen: Any
  emb_PE: jax.Array
  rater_P: jax.Array
  positive_PP: jax.Array


def choose_phrasings(rng: jax.Array, rater_P: jax.Array, num_raters: int,
                     per_rater: int) -> jax.Array:
  """Indices of `per_rater` random phrasings of every rater (with replacement), rater-major.

  Decoding every phrasing of every rater each step costs P Fcomb passes per image and
  grid cell; a few per rater give the same expected L_seg at a fraction of the work, while
  L_text and L_sim still see every phrasing (they need no decoding).
  """
  def pick(r):
    logits_P = jnp.where(rater_P == r, 0.0, -jnp.inf)
    return jax.random.categorical(jax.random.fold_in(rng, r), logits_P, shape=(per_rater,))
  return jnp.concatenate([pick(r) for r in range(num_raters)])


def cell_loss(proj_params, alpha, beta, *, model, frozen, projector, shared: prompt_lib.Shared,
              masks_BRHW: jax.Array, emb_PE: jax.Array, rater_P: jax.Array,
              positive_PP: jax.Array, tau: float, scale_scores: bool, dice_epsilon: float):
  """L_stage2 = L_seg + alpha L_text + beta L_sim for one projector (one grid cell).

  L_text and L_sim use every prompt; L_seg decodes `shared.seg_prompts_S` (all if None).
  """
  z_proj_PD = projector.apply(proj_params, emb_PE)
  z_prompt_BPD, _, scores_BPK = prompt_lib.prompt_latent(
      z_proj_PD, shared.z_BKD, scale_scores=scale_scores)
  seg_S = shared.seg_prompts_S
  if seg_S is None:
    seg_S = jnp.arange(emb_PE.shape[0])
  logits_BSHW = prompt_lib.decode_prompts(model, frozen, shared.features_BHWF,
                                          jnp.take(z_prompt_BPD, seg_S, axis=1))
  targets_BSHW = jnp.take(masks_BRHW.astype(jnp.float32), rater_P[seg_S], axis=1)
  # One Dice loss per prompt, pooled over the batch as in Stage 1; mean over prompts.
  seg = jnp.mean(jax.vmap(
      lambda lg, t: losses.dice_loss(lg, t, epsilon=dice_epsilon), in_axes=(1, 1))(
          logits_BSHW, targets_BSHW))
  text = contrastive.text_loss(z_proj_PD, positive_PP, tau=tau)
  sim = contrastive.sim_loss(scores_BPK, positive_PP, tau=tau)
  loss = seg + alpha * text + beta * sim
  return loss, {"loss": loss, "seg": seg, "text": text, "sim": sim}


def score_prompts(labels, probs_NPHW, bank: bank_lib.PromptBank, convention: str) -> dict:
  """Scores one prediction per rater prompt and reports every phrasing's direct Dice."""
  canon = bank.canonical_indices()
  preds = probs_NPHW[:, canon]
  result = metrics.score(labels, preds, convention=convention)
  dm_NRP = metrics.dice_matrix(labels, probs_NPHW, convention=convention)
  mean_RP = dm_NRP.mean(0)
  result["mean"]["prompt_rater_dice"] = mean_RP[:, canon].T.tolist()
  area_NP = (probs_NPHW > 0.5).sum((2, 3))
  result["mean"]["prompt_mean_area"] = area_NP[:, canon].mean(0).tolist()
  result["prompts"] = [
      {"prompt": p, "rater": int(r), "heldout": bool(h),
       "direct_dice": float(mean_RP[r, j]), "mean_area": float(area_NP[:, j].mean())}
      for j, (p, r, h) in enumerate(zip(bank.prompts, bank.rater, bank.heldout))]
  return result


def _bank_path(stage_dir: str) -> str:
  return os.path.join(stage_dir, "prompt_bank.npz")


def _cached_bank(bank: bank_lib.PromptBank, stage_dir: str) -> bank_lib.PromptBank | None:
  """The embedded copy of `bank` cached in `stage_dir`, or None."""
  path = _bank_path(stage_dir)
  if epath.Path(path).exists():
    cached = bank_lib.PromptBank.load(path)
    if list(cached.prompts) == list(bank.prompts) and cached.embeddings is not None:
      return cached
  return None


def config_bank(config) -> bank_lib.PromptBank:
  """The config's prompt bank, not embedded; checked against the number of raters."""
  bank = bank_lib.PromptBank.from_config(config.text.prompts)
  if bank.num_raters != config.data.num_raters:
    raise ConfigError(f"config.text.prompts has phrasings for {bank.num_raters} raters; "
                      f"config.data.num_raters is {config.data.num_raters}.")
  return bank


def embedded_bank(config, stage_dir: str) -> bank_lib.PromptBank:
  """The config's prompt bank with embeddings, from the run's cache or the text encoder."""
  bank = config_bank(config)
  cached = _cached_bank(bank, stage_dir)
  if cached is not None:
    return cached
  from prosona_jax.models import text_encoder  # pylint: disable=g-import-not-at-top
  encoder = text_encoder.text_encoder_from_config(config.text)
  logging.info("Embedding %d prompts with %s.", len(bank), encoder.name)
  bank = bank.embed(encoder)
  if jax.process_index() == 0:
    bank.save(_bank_path(stage_dir))
  return bank


def prepare_banks(config, stage_dirs) -> bank_lib.PromptBank:
  """Embeds the config's bank at most once and caches it in every one of `stage_dirs`.

  The preflight of Stage 2 and of the grid: the text encoder is loaded (or found
  missing) before anything trains, and each fold's stage then reads the cached copy.
  """
  stage_dirs = list(stage_dirs)
  bank = embedded_bank(config, stage_dirs[0])
  for stage_dir in stage_dirs[1:]:
    if _cached_bank(bank, stage_dir) is None and jax.process_index() == 0:
      bank.save(_bank_path(stage_dir))
  return bank


def _run_of(init_dir: str) -> str | None:
  """The work directory of the run whose Stage-1 checkpoints are `init_dir`, if known."""
  # Split on "/" rather than normalising: gs:// paths must keep their double slash.
  parts = init_dir.rstrip("/").rsplit("/", 3)
  if len(parts) == 4 and parts[1].startswith("fold") and parts[2:] == ["stage1",
                                                                     "checkpoints"]:
    run_dir = parts[0] or "/"
    if layout.is_run_dir(run_dir):
      return run_dir
  return None


def _check_same_model(config, init_dir: str) -> None:
  """Refuses Stage-1 checkpoints of a run whose model differs from this config's.

  Restoring them would fail in Orbax with a shape error far from its cause.
  """
  run_dir = _run_of(init_dir)
  if run_dir is None:
    return
  try:
    theirs = json.loads(epath.Path(layout.config_path(run_dir)).read_text())
  except (OSError, ValueError):
    return  # Not readable as JSON: the restore itself will say what is wrong.
  ours = json.loads(config.to_json_best_effort())
  fields = [("model", k) for k in ours["model"]] + [("data", "image_size"),
                                                     ("data", "in_channels")]
  differ = [f"{a}.{b}: {theirs.get(a, {}).get(b)!r} there, {ours[a][b]!r} here"
            for a, b in fields if a in theirs and b in theirs[a]
            and theirs[a][b] != ours[a][b]]
  if differ:
    raise UserError(f"--config.stage2.init_from: the Stage-1 run {run_dir} built another "
                    f"model ({'; '.join(differ[:3])}). Use the same model config as that "
                    "run, or another Stage 1.")


def check_stage1(config, workdir: str, folds, how_to_train: str) -> None:
  """Refuses a run whose Stage 2 would find no trained Stage 1 for one of `folds`.

  Args:
    config: the run's config.
    workdir: the run's work directory.
    folds: the folds that need a Stage 1.
    how_to_train: the way to train Stage 1 in this run, for the message.
  """
  missing = []
  for k in folds:
    init_dir = layout.stage2_init_dir(config, workdir, k)
    if checkpointing.latest_step_dir(init_dir) is None:
      missing.append((k, init_dir))
    else:
      _check_same_model(config, init_dir)
  if missing:
    ks = ", ".join(str(k) for k, _ in missing)
    raise UserError(
        f"no trained Stage 1 for fold{'s' if len(missing) > 1 else ''} {ks} (no checkpoint "
        f"in {missing[0][1]}). Start from a trained run with "
        "--config.stage2.init_from=DIR (its work directory, e.g. runs/demo, or a "
        f"checkpoints folder, '{{fold}}' replaced by the fold), or {how_to_train}.")


def load_frozen(config, init_dir: str, mesh) -> dict:
  """The trained Stage-1 variables `{"params", "batch_stats"}`, replicated on the mesh.

  A params-only restore (`checkpointing.load_params`): Stage 1's optimizer state, step
  and data iterator are not read. When Stage 1 kept a selected state (`selection`), that
  state is the one read.
  """
  init_dir = selection.selected_checkpoint_dir(init_dir)
  model = prob_unet.build_from_config(config)
  repl = parallel.replicated(mesh)
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
      jax.eval_shape(lambda r: prob_unet.init_variables(
          model, r, image_size=config.data.image_size, in_channels=config.data.in_channels),
          jax.random.key(0)))
  if checkpointing.latest_step_dir(init_dir) is None:
    raise UserError(
        f"No Stage-1 checkpoint in {init_dir}: train Stage 1 first (config.stages includes "
        "'stage1') or name one with --config.stage2.init_from=DIR.")
  fields = ("params", "batch_stats") if abstract["batch_stats"] else ("params",)
  frozen, step = checkpointing.load_params(init_dir, abstract, fields=fields)
  logging.info("Stage 2 starts from the Stage-1 parameters of step %d in %s.", step, init_dir)
  return {"params": frozen["params"], "batch_stats": frozen.get("batch_stats", {})}


def prompt_probs(model, projector, frozen, proj_params, shared: prompt_lib.Shared, emb_PE, *,
                 scale_scores: bool, prompts_per_pass: int = 0) -> jax.Array:
  """Probabilities (B, P, H, W) of every prompt, decoded in passes of `prompts_per_pass`
  (0: auto, `parallel.items_per_pass`: all at once on accelerators, one on CPU)."""
  per_pass = parallel.items_per_pass(prompts_per_pass, emb_PE.shape[0], "prompts_per_pass")
  logits, _, _ = prompt_lib.prompt_logits(model, frozen, projector, proj_params, shared,
                                          emb_PE, scale_scores=scale_scores,
                                          prompts_per_pass=per_pass)
  return jax.nn.sigmoid(logits)


def make_predictor(model, projector, mesh, *, num_samples: int, scale_scores: bool,
                   prompts_per_pass: int = 0):
  """Compiled `(frozen, proj_params, image, emb_PE, rng) -> probs (B, P, H, W)`.

  `prompts_per_pass`: prompts decoded together (0: auto; on CPU one at a time measured
  1.7x faster than all 28 of the demo's bank at once).
  """
  def predict(frozen, proj_params, image, emb_PE, rng):
    shared = prompt_lib.shared_forward(model, frozen, image, rng, num_samples)
    return prompt_probs(model, projector, frozen, proj_params, shared, emb_PE,
                        scale_scores=scale_scores, prompts_per_pass=prompts_per_pass)

  repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(predict, in_shardings=(repl, repl, data, repl, repl), out_shardings=repl)


class Stage2(base.Method):
  """The text-conditioned projector over a frozen Stage-1 latent space."""

  name = "stage2"
  section = "stage2"
  # No selection unless asked; with it, Dice Match over the rater prompts (as D-Persona
  # selects its Stage 2).
  default_select_on = "last"
  select_metric = "dice_match"

  @classmethod
  def param_counts(cls, config) -> dict[str, int]:
    """None counted: the projector's input width is the text encoder's, known only once
    the encoder is loaded (a dry run loads nothing)."""
    del config
    return {}

  def __init__(self, fold: base.Fold, **kwargs):
    super().__init__(fold, **kwargs)
    config, mesh = self.config, self.mesh
    self.model = prob_unet.build_from_config(config)
    self.init_dir = layout.stage2_init_dir(config, fold.workdir, fold.fold)
    self.frozen = load_frozen(config, self.init_dir, mesh)
    self.bank = embedded_bank(config, self.stage_dir)
    train_bank = self.bank.train_view()
    self.num_train_prompts = len(train_bank)
    self.const = parallel.replicate(StepConstants(
        frozen=self.frozen, emb_PE=jnp.asarray(train_bank.embeddings, jnp.float32),
        rater_P=jnp.asarray(train_bank.rater, jnp.int32),
        positive_PP=jnp.asarray(train_bank.positive_mask(), jnp.float32)), mesh)
    self.projector = prompt_lib.build_projector(config)
    self.emb_all = parallel.replicate(jnp.asarray(self.bank.embeddings, jnp.float32), mesh)
    self._predictor = None
    logging.info("%s/fold%d: %d training prompts for %d raters, %d steps.", self.name,
                 fold.fold, self.num_train_prompts, self.bank.num_raters, self.total_steps)

  @classmethod
  def preflight(cls, config, workdir, *, run_stages=(), dir_name=None) -> None:
    """A trained Stage 1 for every fold (unless this run trains it), and the prompt
    bank embedded now, into every fold's stage directory: the text encoder is the
    one thing most likely to be missing (no hub), and Stage 2 runs last."""
    folds = config_lib.folds_to_run(config.data)
    own = {k: os.path.abspath(layout.checkpoint_dir(workdir, k, "stage1")) for k in folds}
    elsewhere = [k for k in folds if "stage1" not in run_stages or os.path.abspath(
        layout.stage2_init_dir(config, workdir, k)) != own[k]]
    check_stage1(config, workdir, elsewhere,
                 "train it in this run (keep 'stage1' in config.stages, as by default)")
    prepare_banks(config, [layout.stage_dir(workdir, k, dir_name or cls.name)
                           for k in folds])

  def loop_config(self, name: str | None = None):
    loop = super().loop_config(name)
    # L_text and L_sim cannot go below this (their optimum), so a progress line shows
    # it beside them: a value sitting there has converged, not stalled.
    floor = contrastive.loss_floor(self.bank.train_view().positive_mask())
    loop.floors = {"text": floor, "sim": floor}
    return loop

  # ---------------------------------------------------------------- training
  def init_projector(self):
    return self.projector.init(self.init_rng,
                               jnp.zeros((1, self.bank.embeddings.shape[1]), jnp.float32))

  def init_state(self, tx):
    return parallel.replicate(trainer.TrainState.create(self.init_projector(), tx), self.mesh)

  def shared_for_step(self, step: jax.Array, image: jax.Array,
                      const: StepConstants) -> prompt_lib.Shared:
    """The step's shared forward: features, K prior samples and the L_seg phrasings."""
    rng = jax.random.fold_in(self.step_rng, step)
    seg_S = None
    if self.cfg.seg_phrasings_per_rater > 0:
      seg_S = choose_phrasings(jax.random.fold_in(rng, _SEG_PROMPTS_STREAM), const.rater_P,
                               self.config.data.num_raters, self.cfg.seg_phrasings_per_rater)
    return prompt_lib.shared_forward(self.model, const.frozen, image, rng,
                                     self.cfg.num_samples, seg_S)

  def cell_update(self, tx: optax.GradientTransformation, params, opt_state, alpha, beta,
                  shared: prompt_lib.Shared, masks_BRHW: jax.Array, const: StepConstants):
    """One guarded optimizer update of one projector: (params, opt_state, finite, aux)."""
    s2 = self.cfg
    (loss, aux), grads = jax.value_and_grad(cell_loss, has_aux=True)(
        params, alpha, beta, model=self.model, frozen=const.frozen, projector=self.projector,
        shared=shared, masks_BRHW=masks_BRHW, emb_PE=const.emb_PE, rater_P=const.rater_P,
        positive_PP=const.positive_PP, tau=s2.tau, scale_scores=s2.scale_scores,
        dice_epsilon=s2.dice_epsilon)
    params, opt_state, _, finite = trainer.guarded_update(params, opt_state, grads, loss, tx)
    return params, opt_state, finite, aux

  def step_fn(self, tx):
    """The un-jitted `(state, batch, const) -> (state, metrics)` (benchmarks lower it)."""
    s2 = self.cfg

    def step(state: trainer.TrainState, batch, const: StepConstants):
      shared = self.shared_for_step(state.step, batch["image"], const)
      params, opt_state, finite, aux = self.cell_update(
          tx, state.params, state.opt_state, s2.alpha, s2.beta, shared, batch["masks"], const)
      return state.advanced(finite, params=params, opt_state=opt_state), aux
    return step

  def make_train_step(self, tx):
    step = self.step_fn(tx)
    repl, data = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
    jitted = jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                     donate_argnums=(0,))
    return lambda state, batch: jitted(state, batch, self.const)

  # ---------------------------------------------------------------- evaluation
  def prompt_probs(self, frozen, proj_params, shared: prompt_lib.Shared, emb_PE):
    """Probabilities (B, P, H, W) of every prompt on a shared forward (`prompt_probs`)."""
    return prompt_probs(self.model, self.projector, frozen, proj_params, shared, emb_PE,
                        scale_scores=self.cfg.scale_scores)

  @property
  def predictor(self):
    """Compiled `(frozen, proj_params, image, emb_PE, rng) -> probs (B, P, H, W)`."""
    if self._predictor is None:
      self._predictor = make_predictor(self.model, self.projector, self.mesh,
                                       num_samples=self.cfg.eval_num_samples,
                                       scale_scores=self.cfg.scale_scores)
    return self._predictor

  def make_predict_fn(self):
    predictor = self.predictor
    return lambda state, image, rng: predictor(self.frozen, state.params, image,
                                               self.emb_all, rng)

  @property
  def prediction_raters(self):
    return tuple(int(r) for r in self.bank.rater)

  def score(self, labels, probs):
    return score_prompts(labels, probs, self.bank, self.config.eval.convention)

  def validation_summary(self, mean: dict) -> dict:
    out = super().validation_summary(mean)
    out["dice_each_direct_mean"] = float(np.mean(mean["dice_each_direct"]))
    return out

  def result_fields(self) -> dict:
    # A grid cell's result replaces alpha and beta with the cell's.
    return {"num_samples": int(self.cfg.eval_num_samples), "alpha": float(self.cfg.alpha),
            "beta": float(self.cfg.beta)}

  def describe_test(self, mean: dict) -> str:
    return (f"  direct Dice per rater {np.round(mean['dice_each_direct'], 3).tolist()}"
            f"  mean area per prompt {np.round(mean['prompt_mean_area'], 1).tolist()}")

  def figures(self, state, test: base.TestOutput, eval_dir: str) -> None:
    """Fig. 3 (prompt panel) and Fig. 4 (interpolation strip) of the paper."""
    fold, config, bank = self.fold, self.config, self.bank
    labels, probs, keys = test.labels, test.probs, test.keys
    canon = bank.canonical_indices()
    n = min(config.eval.num_images_logged, len(labels))
    # Prefer images where raters disagree most: that is where styles show.
    spread = labels.reshape(len(labels), labels.shape[1], -1).sum(-1)
    order = np.argsort(-(spread.max(1) - spread.min(1)), kind="stable")[:n]
    images = np.stack([fold.source[int(fold.split.test[i])]["image"] for i in order])
    a, b = canon[0], canon[-1]
    alphas = np.linspace(0.0, 1.0, 7)
    emb = np.asarray(bank.embeddings, np.float32)
    path_PE = (1 - alphas[:, None]) * emb[a][None] + alphas[:, None] * emb[b][None]
    bs = base.round_up(1, self.mesh.devices.size)
    batch = parallel.local_slice({"image": np.repeat(images[:1], bs, axis=0)}, bs)
    # Every process runs the predictor (it is a collective on a multi-host mesh).
    strip = np.asarray(self.predictor(
        self.frozen, state.params, parallel.to_global(batch, self.mesh)["image"],
        parallel.replicate(jnp.asarray(path_PE), self.mesh), self.eval_rng))[0]
    if jax.process_index() != 0:
      return
    figures.prompt_panel(images, labels[order], probs[order][:, canon],
                         [keys[i] for i in order], [bank.prompts[j] for j in canon],
                         os.path.join(eval_dir, f"stage2_prompts_fold{fold.fold}.png"),
                         rater_names=config.data.rater_names,
                         order_raters_by_area=config.data.order_raters_by_area)
    figures.interpolation_strip(
        images[0], strip, alphas, bank.prompts[a], bank.prompts[b],
        os.path.join(eval_dir, f"stage2_interpolation_fold{fold.fold}.png"),
        image_name=keys[order[0]])

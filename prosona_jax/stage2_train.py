"""Stage-2 training and evaluation of one fold (the loop itself is `trainer.fit`).

The prompt bank is embedded once per run with the frozen text encoder and saved beside the
Stage-2 checkpoints (`prompt_bank.npz`), so bank prompts work later without the encoder.
"""

import os

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from prosona_jax import checkpointing
from prosona_jax import figures
from prosona_jax import logger as logger_lib
from prosona_jax import metrics
from prosona_jax import parallel
from prosona_jax import prompt_bank as bank_lib
from prosona_jax import stage1
from prosona_jax import stage2
from prosona_jax import trainer
from prosona_jax.data import pipeline

SUMMARY_KEYS = ("ged", "dice_soft", "dice_max", "dice_max_reverse", "dice_match")


def stage1_checkpoint_dir(config, workdir: str, fold: int) -> str:
  """The Stage-1 checkpoints Stage 2 starts from (`stage1.checkpoint` may name `{fold}`)."""
  if config.stage1.checkpoint:
    return config.stage1.checkpoint.format(fold=fold)
  return os.path.join(workdir, f"fold{fold}", "stage1", "checkpoints")


def load_stage1(config, ckpt_dir: str, mesh):
  """Restores a trained Stage-1 state (replicated on the mesh) without initialising one."""
  model = stage1.build_model(config)
  tx, _ = stage1.make_optimizer(config.stage1, 1)
  image, masks = stage1.example_inputs(config)

  def init(rng):
    variables = model.init({"params": rng, "sample": rng}, image, masks, train=False)
    return trainer.TrainState.create(variables["params"], tx, variables.get("batch_stats", {}))

  repl = parallel.replicated(mesh)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                          jax.eval_shape(init, jax.random.key(0)))
  if not epath.Path(ckpt_dir).is_dir():
    raise FileNotFoundError(
        f"No Stage-1 checkpoint at {ckpt_dir}: train Stage 1 first (config.stages includes "
        "'stage1') or name one with --config.stage1.checkpoint=DIR.")
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  state, _ = ckpt.restore_latest_state(abstract)
  ckpt.close()
  return model, state


def embedded_bank(config, stage_dir: str) -> bank_lib.PromptBank:
  """The config's prompt bank with embeddings, from the run's cache or the text encoder."""
  bank = bank_lib.PromptBank.from_config(config.text.prompts)
  if bank.num_raters != config.data.num_raters:
    raise ValueError(f"config.text.prompts has phrasings for {bank.num_raters} raters; "
                     f"config.data.num_raters is {config.data.num_raters}.")
  path = os.path.join(stage_dir, "prompt_bank.npz")
  if epath.Path(path).exists():
    cached = bank_lib.PromptBank.load(path)
    if list(cached.prompts) == list(bank.prompts) and cached.embeddings is not None:
      return cached
  from prosona_jax.models import text_encoder  # pylint: disable=g-import-not-at-top
  encoder = text_encoder.text_encoder_from_config(config.text)
  logging.info("Embedding %d prompts with %s.", len(bank), encoder.name)
  bank = bank.embed(encoder)
  if jax.process_index() == 0:
    bank.save(path)
  return bank


def score_prompts(labels, probs_NPHW, bank, convention: str) -> dict:
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


class Context:
  """Everything a Stage-2 run of one fold shares between a single cell and the grid."""

  def __init__(self, config, workdir: str, fold: int, source, split, mesh, stage1_result=None,
               stage_dir: str | None = None):
    self.config, self.fold, self.source, self.split, self.mesh = config, fold, source, split, mesh
    self.stage_dir = stage_dir or os.path.join(workdir, f"fold{fold}", "stage2")
    if stage1_result is None:
      self.model, s1_state = load_stage1(config, stage1_checkpoint_dir(config, workdir, fold),
                                         mesh)
    else:
      self.model, s1_state = stage1_result
    self.frozen = stage2.frozen_from_state(s1_state)
    self.bank = embedded_bank(config, self.stage_dir)
    train_bank = self.bank.train_view()
    self.num_train_prompts = len(train_bank)
    self.const = parallel.replicate(stage2.StepConstants(
        frozen=self.frozen, emb_PE=jnp.asarray(train_bank.embeddings, jnp.float32),
        rater_P=jnp.asarray(train_bank.rater, jnp.int32),
        positive_PP=jnp.asarray(train_bank.positive_mask(), jnp.float32)), mesh)
    self.local_bs = parallel.check_batch_size(config.data.batch_size, mesh)
    self.steps_per_epoch = pipeline.steps_per_epoch(len(split.train), self.local_bs,
                                                    jax.process_count())
    self.total_steps = stage1.total_steps(config.stage2, self.steps_per_epoch)
    self.tx, self.lr_fn = stage2.make_optimizer(config.stage2, self.steps_per_epoch)
    # The same keys for a single run and for every grid cell: cells then differ only in
    # (alpha, beta), and a grid cell reproduces the run of that cell alone.
    self.init_rng, self.step_rng, self.eval_rng = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed + 2), fold), 3)
    self.projector = stage2.build_projector(config)
    self.predict_fn = stage2.make_predictor(self.model, self.projector, mesh,
                                            num_samples=config.stage2.eval_num_samples,
                                            scale_scores=config.stage2.scale_scores)
    self.eval_batch_size = stage1.round_up(config.data.eval_batch_size, mesh.devices.size)
    self.emb_all = parallel.replicate(jnp.asarray(self.bank.embeddings, jnp.float32), mesh)

  def init_projector(self):
    return stage2.init_projector(self.projector, self.bank.embeddings.shape[1], self.init_rng)

  def iterator(self):
    c = self.config
    return iter(pipeline.train_loader(
        self.source, self.split.train, batch_size=self.local_bs,
        seed=c.data.shuffle_seed + 1000 * self.fold + 1, augment_flip=c.data.augment_flip,
        augment_rotate=c.data.augment_rotate, worker_count=c.data.worker_count))

  def predict(self, proj_params, indices, rng):
    """Labels (N,R,H,W), probabilities of every bank prompt (N,P,H,W), keys."""
    batches = pipeline.eval_batches(self.source, indices, batch_size=self.eval_batch_size)
    return stage2.predict_batches(self.predict_fn, self.frozen, proj_params, batches,
                                  self.emb_all, self.mesh, rng)

  def validate(self, proj_params) -> dict:
    if len(self.split.val) == 0:
      return {}
    labels, probs, _ = self.predict(proj_params, self.split.val, self.eval_rng)
    res = score_prompts(labels, probs, self.bank, self.config.eval.convention)["mean"]
    out = {k: res[k] for k in SUMMARY_KEYS}
    out["dice_each_direct_mean"] = float(np.mean(res["dice_each_direct"]))
    return out

  @property
  def test_rng(self) -> jax.Array:
    return jax.random.fold_in(self.eval_rng, 1)

  def _test_result(self, labels, probs, keys) -> dict:
    result = score_prompts(labels, probs, self.bank, self.config.eval.convention)
    result.update(stage="stage2", fold=self.fold,
                  num_samples=int(self.config.stage2.eval_num_samples), keys=keys)
    return result

  def test(self, proj_params):
    """Scores the test fold: (result dict, labels, probs, keys)."""
    labels, probs, keys = self.predict(proj_params, self.split.test, self.test_rng)
    return self._test_result(labels, probs, keys), labels, probs, keys

  def shared_test(self) -> stage2.SharedEval:
    """Backbone features and prior samples of the test fold, as `test` draws them."""
    return stage2.shared_eval(
        stage2.make_shared_fn(self.model, self.mesh,
                              num_samples=self.config.stage2.eval_num_samples),
        self.frozen, pipeline.eval_batches(self.source, self.split.test,
                                           batch_size=self.eval_batch_size),
        self.mesh, self.test_rng)

  def make_prompt_decoder(self):
    return stage2.make_prompt_decoder(self.model, self.projector, self.mesh,
                                      scale_scores=self.config.stage2.scale_scores)

  def test_cells(self, params_per_cell) -> list[dict]:
    """`test` of several projectors (grid cells): the backbone, the prior and the data
    pipeline run once for all of them; each result equals that projector's `test`."""
    cached, decode_fn = self.shared_test(), self.make_prompt_decoder()
    return [self._test_result(
        cached.labels, stage2.predict_shared(decode_fn, self.frozen, p, cached, self.emb_all),
        cached.keys) for p in params_per_cell]

  def loop_config(self, name: str) -> trainer.LoopConfig:
    s2 = self.config.stage2
    return trainer.LoopConfig(
        name=name, total_steps=self.total_steps, log_every=min(s2.log_every, self.total_steps),
        checkpoint_every=s2.checkpoint_every, eval_every=s2.eval_every_epochs * self.steps_per_epoch)


def run_stage2(config, workdir: str, fold: int, source, split, mesh, stage1_result=None):
  """Trains the projector for one fold on a frozen Stage-1 model and scores the test fold."""
  name = f"stage2/fold{fold}"
  ctx = Context(config, workdir, fold, source, split, mesh, stage1_result)
  state = parallel.replicate(trainer.TrainState.create(ctx.init_projector(), ctx.tx), mesh)
  ckpt = checkpointing.Checkpointer(os.path.join(ctx.stage_dir, "checkpoints"))
  writer = logger_lib.MetricWriter(os.path.join(ctx.stage_dir, "logs"))
  step_fn = stage2.make_train_step(ctx.model, ctx.projector, ctx.tx, config, mesh, ctx.step_rng)
  logging.info("%s: %d training prompts for %d raters, %d steps.", name, ctx.num_train_prompts,
               ctx.bank.num_raters, ctx.total_steps)
  state = trainer.fit(ctx.loop_config(name), state=state,
                      train_step=lambda s, b: step_fn(s, b, ctx.const), iterator=ctx.iterator(),
                      ckpt=ckpt, writer=writer, mesh=mesh, lr_fn=ctx.lr_fn,
                      eval_fn=lambda st, step: ctx.validate(st.params))
  ckpt.close()

  result, labels, probs, keys = ctx.test(state.params)
  result.update(alpha=float(config.stage2.alpha), beta=float(config.stage2.beta))
  eval_dir = os.path.join(workdir, "eval")
  from prosona_jax import train  # pylint: disable=g-import-not-at-top
  train.write_json(os.path.join(eval_dir, f"stage2_fold{fold}.json"), result)
  write_figures(config, eval_dir, fold, source, split, labels, probs, keys, ctx.bank,
                ctx.predict_fn, ctx.frozen, state.params, mesh, ctx.eval_rng)
  writer.close()
  m = result["mean"]
  logging.info("%s test: %s  direct Dice per rater %s  mean area per prompt %s", name,
               "  ".join(f"{k} {m[k]:.4f}" for k in SUMMARY_KEYS),
               np.round(m["dice_each_direct"], 3).tolist(),
               np.round(m["prompt_mean_area"], 1).tolist())
  return ctx.projector, state, ctx.bank


def write_figures(config, eval_dir, fold, source, split, labels, probs, keys, bank,
                  predict_fn, frozen, proj_params, mesh, rng):
  """Fig. 3 (prompt panel) and Fig. 4 (interpolation strip) of the paper, for this fold."""
  canon = bank.canonical_indices()
  n = min(config.eval.num_images_logged, len(labels))
  # Prefer images where raters disagree most: that is where styles show.
  spread = labels.reshape(len(labels), labels.shape[1], -1).sum(-1)
  order = np.argsort(-(spread.max(1) - spread.min(1)), kind="stable")[:n]
  images = np.stack([source[int(split.test[i])]["image"] for i in order])
  a, b = canon[0], canon[-1]
  alphas = np.linspace(0.0, 1.0, 7)
  emb = np.asarray(bank.embeddings, np.float32)
  path_PE = (1 - alphas[:, None]) * emb[a][None] + alphas[:, None] * emb[b][None]
  bs = stage1.round_up(1, mesh.devices.size)
  batch = stage1.local_slice({"image": np.repeat(images[:1], bs, axis=0)}, bs)
  # Every process runs the predictor (it is a collective on a multi-host mesh).
  strip = np.asarray(predict_fn(frozen, proj_params, parallel.to_global(batch, mesh)["image"],
                                parallel.replicate(jnp.asarray(path_PE), mesh), rng))[0]
  if jax.process_index() != 0:
    return
  figures.prompt_panel(images, labels[order], probs[order][:, canon], [keys[i] for i in order],
                       [bank.prompts[j] for j in canon],
                       os.path.join(eval_dir, f"stage2_prompts_fold{fold}.png"),
                       rater_names=config.data.rater_names,
                       order_raters_by_area=config.data.order_raters_by_area)
  figures.interpolation_strip(images[0], strip, alphas, bank.prompts[a], bank.prompts[b],
                              os.path.join(eval_dir, f"stage2_interpolation_fold{fold}.png"),
                              image_name=keys[order[0]])

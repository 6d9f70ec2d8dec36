r"""FLOPs of one training step of every method, from XLA's cost analysis (no run).

Each method's real step (the function its Method jits) is lowered on abstract inputs at
the paper's scale (128 x 128, 1 channel, 4 raters, the ResNet-34 U-Net) and XLA's cost
analysis of the lowered program is read: nothing is compiled or executed, so it takes
seconds per method on a CPU. The count is that of the unoptimised HLO (what the model
asks for; fusion changes memory traffic, not the arithmetic much).

  python benchmarks/bench_flops.py                   # batch 12 (D-Persona's protocol)
  python benchmarks/bench_flops.py --batch=8 --methods=prosona,tab
  python benchmarks/bench_flops.py --tflops=100      # the GPU's sustained rate to assume

It prints, per method and stage, GFLOP per step, PFLOP of 100 epochs of one LIDC fold
(1,609 slices, 4 folds, 10% of the training patients held out: about 1,086 training
images) and the minutes those take at `--tflops` sustained. The rate is an assumption,
not a measurement: 128 x 128 convs at batch 12 reach a small fraction of a GPU's peak
(float32; 10 TFLOP/s is a guess for an A100/H100), so read the minutes as a lower bound
and the FLOPs as the ratio between methods. Validation, test and Stage 2's text encoder
are not counted.
"""

from __future__ import annotations

import math
import os
import sys

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)  # Runs from a checkout without installing the package.

METHODS = ("prosona", "unet", "cm_global", "cm_pixel", "pionono", "dpersona", "tab")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Methods to count.")
_BATCH = flags.DEFINE_integer("batch", 12, "Global batch size (D-Persona 12, ProSona 8).")
_SIZE = flags.DEFINE_integer("image_size", 128, "Image side.")
_EPOCHS = flags.DEFINE_integer("epochs", 100, "Epochs per stage, for the totals.")
_TRAIN_IMAGES = flags.DEFINE_integer("train_images", 1086, "Training images per fold.")
_TFLOPS = flags.DEFINE_float("tflops", 10.0, "Assumed sustained TFLOP/s of the GPU.")
# CLIP ViT-B/32's embedding width (Stage 2's prompt embeddings).
_CLIP_DIM = 512


def _config(method: str, batch: int, image_size: int):
  from prosona_jax import config_defaults  # pylint: disable=g-import-not-at-top
  c = config_defaults.base_config()
  c.method = method
  c.data.image_size = image_size
  c.data.batch_size = batch
  c.model.backbone = "resnet34"
  return c


def _abstract(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _batch(c):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b, s, r = c.data.batch_size, c.data.image_size, c.data.num_raters
  return {"image": jax.ShapeDtypeStruct((b, s, s, c.data.in_channels), jnp.float32),
          "masks": jax.ShapeDtypeStruct((b, r, s, s), jnp.uint8)}


def _state(params, tx, batch_stats):
  import jax  # pylint: disable=g-import-not-at-top
  from prosona_jax import trainer  # pylint: disable=g-import-not-at-top
  return jax.eval_shape(lambda p, s: trainer.TrainState.create(p, tx, s), params,
                        batch_stats)


def steps(method: str, batch: int | None = None, image_size: int | None = None
          ) -> list[tuple[str, object, tuple]]:
  """[(stage, step, abstract arguments)] of a method's training stages; the step is the
  Method's own function (jitted or not), at `batch` and `image_size` (default: the flags).
  `benchmarks/cost_model.py` compiles these too."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prosona_jax import optimizers  # pylint: disable=g-import-not-at-top
  from prosona_jax import prompt_bank  # pylint: disable=g-import-not-at-top
  from prosona_jax.methods import baselines, dpersona, prosona_stage1, prosona_stage2  # pylint: disable=g-import-not-at-top,g-multiple-import
  from prosona_jax.methods import registry, tab  # pylint: disable=g-import-not-at-top,g-multiple-import
  from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top
  c = _config(method, batch or _BATCH.value, image_size or _SIZE.value)
  key = jax.random.key(0)
  out = []
  stage1_vars = jax.eval_shape(lambda r: prob_unet.init_from_config(c, r), key)
  for cls in registry.method_stages(c):
    if cls is prosona_stage1.Stage1:
      model = prob_unet.build_from_config(c)
      tx, _ = optimizers.adam(c.stage1, 1)
      state = _state(stage1_vars["params"], tx, stage1_vars["batch_stats"])
      # The Method's step is already jitted (with shardings); lower it as it is.
      mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
      step = prosona_stage1.make_train_step(model, tx, c, mesh, key)
      out.append(("stage1", step, (state, _batch(c))))
    elif cls is prosona_stage2.Stage2:
      # A Stage 2 without its checkpoint and text encoder: only what the step reads.
      stage2 = object.__new__(prosona_stage2.Stage2)
      stage2.config, stage2.cfg = c, c.stage2
      stage2.model, stage2.step_rng = prob_unet.build_from_config(c), key
      stage2.projector = prosona_stage2.prompt_lib.build_projector(c)
      bank = prompt_bank.PromptBank.from_phrasings(
          prompt_bank.LIDC_PROMPTS["train"], prompt_bank.LIDC_PROMPTS["heldout"]).train_view()
      p = len(bank)
      const = prosona_stage2.StepConstants(
          frozen=stage1_vars, emb_PE=jax.ShapeDtypeStruct((p, _CLIP_DIM), jnp.float32),
          rater_P=jax.ShapeDtypeStruct((p,), jnp.int32),
          positive_PP=jax.ShapeDtypeStruct((p, p), jnp.float32))
      tx, _ = optimizers.adam(c.stage2, 1)
      proj = jax.eval_shape(stage2.projector.init, key, jnp.zeros((1, _CLIP_DIM)))
      out.append(("stage2", stage2.step_fn(tx), (_state(proj, tx, {}), _batch(c), const)))
    elif cls is dpersona.DPersonaStage:
      model = dpersona.build(c)
      tx = dpersona.dpersona_heads.make_optimizer()
      heads = jax.eval_shape(lambda r: model.heads.init(
          r, jnp.zeros((1, c.data.image_size, c.data.image_size, 16)), False), key)["params"]
      state = _state({"heads": heads}, tx, stage1_vars["batch_stats"])
      out.append(("dpersona", dpersona.make_step(model, c, tx, key),
                  (state, _batch(c), stage1_vars["params"])))
    elif cls is tab.TAB:
      model = tab.build(c)
      tx, _ = tab.build_optimizer(c, 1)
      v = jax.eval_shape(lambda r: tab.init_variables(model, c, r), key)
      state = _state(v["params"], tx, {"buffers": v["buffers"],
                                       "batch_stats": v["batch_stats"]})
      out.append(("tab", baselines.make_step(tab.loss_fn(model, c), tx, key),
                  (state, _batch(c))))
    else:  # The baselines with a U-Net of their own.
      model = cls.build(c)
      tx, _ = cls.build_optimizer(c, 1)
      v = jax.eval_shape(lambda r, m=model, k=cls: k.init_variables(m, c, r), key)
      state = _state(v["params"], tx, v["batch_stats"])
      out.append((cls.stage_name(c), baselines.make_step(cls.make_loss_fn(model, c), tx,
                                                         key), (state, _batch(c))))
  return out


def flops(step, args) -> float:
  """FLOPs of `step(*args)` from the cost analysis of the lowered (uncompiled) HLO."""
  import jax  # pylint: disable=g-import-not-at-top
  fn = step if hasattr(step, "lower") else jax.jit(step)
  cost = fn.lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per device.
    cost = cost[0]
  return float(cost["flops"])


def main(argv) -> None:
  del argv
  steps_per_epoch = math.ceil(_TRAIN_IMAGES.value / _BATCH.value)
  total_steps = _EPOCHS.value * steps_per_epoch
  print(f"batch {_BATCH.value}, {_SIZE.value}x{_SIZE.value}, {steps_per_epoch} steps/epoch, "
        f"{_EPOCHS.value} epochs per stage; minutes per fold at {_TFLOPS.value:g} TFLOP/s "
        "sustained (assumed)")
  print(f"{'method':<10} {'stage':<10} {'GFLOP/step':>11} {'PFLOP/fold':>11} "
        f"{'min/fold':>9}")
  for method in _METHODS.value:
    for stage, step, args in steps(method):
      f = flops(step, args)
      total = f * total_steps
      minutes = total / (_TFLOPS.value * 1e12) / 60
      print(f"{method:<10} {stage:<10} {f / 1e9:>11.1f} {total / 1e15:>11.2f} "
            f"{minutes:>9.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)

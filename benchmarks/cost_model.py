r"""XLA's own accounting of the train steps, and what it implies on an accelerator.

  python benchmarks/cost_model.py                            # this machine's backend
  python benchmarks/cost_model.py --batch_sizes=8,64,256 --dtypes=float32,bfloat16
  JAX_PLATFORMS=cuda python benchmarks/cost_model.py --json=h100_costs.json

Compiles (never runs) the Stage-1 step (`configs/lidc.py:dpersona`, the setting of
`bench_vs_torch.py`) for each batch size and backbone dtype, and ProSona's Stage-2 step
(the Method's own, from `bench_flops.steps`; float32) for each batch size, and prints
what the compiled programs report:
`cost_analysis()` (FLOPs, bytes accessed) and `memory_analysis()` (arguments, outputs,
temporaries: the device memory a step needs), and the number of kernels (fusions,
convolutions, library calls) of the optimised program. Memory is fitted as
`fixed + per_image x B` to give the largest batch that fits `--memory_gb`.

The step-time estimate is a roofline with launch overhead:
`max(FLOPs / (efficiency x peak), bytes / bandwidth) + kernels x launch_us`, with the
peak, bandwidth and efficiency given as flags (defaults: an H100 SXM's dense TF32 and
BF16 tensor-core peaks, 3.35 TB/s, 35% of peak for convolutions this small, 4 us per
kernel). The figures of a compile on the CPU are the CPU compiler's: bytes accessed
and the kernel count depend on its fusion decisions, and an accelerator's compiler
fuses differently; compile on the accelerator for its own figures.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)  # Runs from a checkout without installing the package.

_BATCHES = flags.DEFINE_list("batch_sizes", ["8", "16", "32", "64"], "Global batch sizes.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"],
                            "Backbone computation dtypes (losses stay float32).")
_STAGES = flags.DEFINE_list("stages", ["stage1", "stage2"], "Steps to compile.")
_PEAK = flags.DEFINE_list("peak_tflops", ["float32=494", "bfloat16=989"],
                          "Dense tensor-core peak per dtype (H100 SXM: TF32 494, BF16 989).")
_BANDWIDTH = flags.DEFINE_float("bandwidth_tbs", 3.35, "Memory bandwidth, TB/s (H100 SXM).")
_EFFICIENCY = flags.DEFINE_float("efficiency", 0.35, "Fraction of peak the convolutions reach.")
_LAUNCH_US = flags.DEFINE_float("launch_us", 4.0, "Fixed cost per kernel, microseconds.")
_MEMORY_GB = flags.DEFINE_float("memory_gb", 80.0, "Device memory for the largest batch.")
_JSON = flags.DEFINE_string("json", "", "Write every figure to this file.")


def _kernels(hlo_text: str) -> int:
  """Instructions of the entry computation that launch work (fusions, convolutions,
  dots, custom calls, scatters, sorts), the optimised program's kernel count."""
  entry = hlo_text[hlo_text.find("\nENTRY "):]
  ops = (" fusion(", " convolution(", " dot(", " custom-call(", " scatter(", " sort(",
         " reduce-window(", " select-and-scatter(", " reduce(")
  return sum(1 for line in entry.splitlines() if any(op in line for op in ops))


def _compile_stage1(batch: int, dtype):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import lidc  # pylint: disable=g-import-not-at-top
  from prosona_jax import optimizers  # pylint: disable=g-import-not-at-top
  from prosona_jax.methods import prosona_stage1 as stage1  # pylint: disable=g-import-not-at-top
  from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top
  config = lidc.get_config("dpersona")
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  model = prob_unet.build_model(config.model, num_raters=config.data.num_raters, dtype=dtype)
  tx, _ = optimizers.adam(config.stage1, steps_per_epoch=100)
  state = jax.eval_shape(lambda r: stage1.init_state(model, config, tx, mesh, r),
                         jax.random.key(0))
  s, r = config.data.image_size, config.data.num_raters
  batch_spec = {"image": jax.ShapeDtypeStruct((batch, s, s, 1), np.float32),
                "masks": jax.ShapeDtypeStruct((batch, r, s, s), np.float32)}
  step = stage1.make_train_step(model, tx, config, mesh, jax.random.key(1))
  return step.lower(state, batch_spec).compile()


def _compile_stage2(batch: int, dtype):
  """ProSona's Stage-2 step as its Method builds it (`bench_flops.steps`), float32."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import bench_flops  # pylint: disable=g-import-not-at-top
  if jnp.dtype(dtype) != jnp.float32:
    raise ValueError("Stage 2's step has no backbone dtype switch: float32 only.")
  _, step, args = next(s for s in bench_flops.steps("prosona", batch, 128)
                       if s[0] == "stage2")
  fn = step if hasattr(step, "lower") else jax.jit(step)
  return fn.lower(*args).compile()


def _measure(stage: str, batch: int, dtype_name: str) -> dict:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dtype = jnp.dtype(dtype_name)
  t0 = time.perf_counter()
  compiled = (_compile_stage1 if stage == "stage1" else _compile_stage2)(batch, dtype)
  out = {"stage": stage, "batch": batch, "dtype": dtype_name,
         "compile_s": time.perf_counter() - t0, "kernels": _kernels(compiled.as_text())}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  out["gflop"] = float(cost.get("flops", 0.0)) / 1e9
  out["gbytes"] = float(cost.get("bytes accessed", 0.0)) / 1e9
  m = compiled.memory_analysis()
  if m is not None:
    out["memory_gib"] = {k: getattr(m, f"{k}_size_in_bytes") / 2**30
                         for k in ("argument", "output", "temp", "alias", "generated_code")}
    out["peak_gib"] = (m.argument_size_in_bytes + m.output_size_in_bytes
                       + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**30
  return out


def _estimate_ms(row: dict) -> float:
  peaks = dict(kv.split("=") for kv in _PEAK.value)
  peak = float(peaks.get(row["dtype"], peaks["float32"])) * 1e12
  compute = row["gflop"] * 1e9 / (_EFFICIENCY.value * peak)
  memory = row["gbytes"] * 1e9 / (_BANDWIDTH.value * 1e12)
  return 1e3 * (max(compute, memory) + row["kernels"] * _LAUNCH_US.value * 1e-6)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
  rows = []
  for stage in _STAGES.value:
    # Stage 2 trains only the projector on a frozen float32 backbone.
    for dtype in _DTYPES.value if stage == "stage1" else ["float32"]:
      for b in _BATCHES.value:
        row = _measure(stage, int(b), dtype)
        row["estimate_ms"] = _estimate_ms(row)
        rows.append(row)
        mem = (f"peak {row['peak_gib']:.2f} GiB (temp {row['memory_gib']['temp']:.2f})"
               if "peak_gib" in row else "memory n/a")
        print(f"{stage} {dtype:>8} B={row['batch']:>4}: {row['gflop']:8.1f} GFLOP, "
              f"{row['gbytes']:7.2f} GB accessed, {row['kernels']:5d} kernels, {mem}; "
              f"estimate {row['estimate_ms']:.1f} ms/step (compile {row['compile_s']:.0f} s)",
              flush=True)
  print(f"\nEstimate: max(FLOPs / ({_EFFICIENCY.value:.0%} of {_PEAK.value} TFLOP/s), bytes / "
        f"{_BANDWIDTH.value} TB/s) + kernels x {_LAUNCH_US.value} us")
  for stage in _STAGES.value:
    for dtype in _DTYPES.value:
      pts = [(r["batch"], r["peak_gib"]) for r in rows
             if r["stage"] == stage and r["dtype"] == dtype and "peak_gib" in r]
      if len(pts) >= 2:
        (b0, m0), (b1, m1) = pts[0], pts[-1]
        per = (m1 - m0) / (b1 - b0)
        fixed = m0 - per * b0
        limit = _MEMORY_GB.value * 1e9 / 2**30
        print(f"{stage} {dtype}: memory ~ {fixed:.2f} GiB + {1024 * per:.1f} MiB/image -> "
              f"largest batch in {_MEMORY_GB.value:.0f} GB ~ {int((limit - fixed) / per)}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)

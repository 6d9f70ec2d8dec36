r"""Times the Stage-1 train step and prior sampling with the real `stage1` functions.

The step is `prosona_stage1.make_train_step` (ResNet-34 U-Net, prior, posterior, Fcomb decoding
K = 10 bound samples, Adam, donated state) on a 1-device mesh; inference is
`prosona_stage1.make_sampler` drawing 10 prior samples for one image. Inputs are random images
and random disc masks; only the timings mean anything.

Every (XLA-flag preset, job) pair runs in a fresh subprocess, because XLA reads
`XLA_FLAGS` once, when JAX starts a backend, and so that each peak RSS belongs to one job.
With several presets the rounds interleave them, so a noisy neighbour on a shared machine
hurts all presets alike; the summary gives the min and median over rounds.

  python benchmarks/bench_stage1.py                      # batch 8 and 12, + inference
  python benchmarks/bench_stage1.py --xla_flags=none,eigen_conv --rounds=3
  python benchmarks/bench_stage1.py --batch_sizes=8 --steps=5 --backbone=unet
  python benchmarks/bench_stage1.py --xla_flags='--xla_cpu_prefer_vector_width=512'

`--xla_flags` presets: `default` (this project's CPU defaults, `xla_flags.CPU_DEFAULTS`;
currently `eigen_conv`), `none` (JAX's own defaults), a name from `xla_flags.CANDIDATES` (e.g.
`eigen_conv`; added only if the installed jaxlib knows it), or a literal string of XLA
flags starting with `--` (used as given). Separate several presets with commas, or with
`;` when a literal string holds commas. `XLA_FLAGS` from the environment is kept in all.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)  # Runs from a checkout without installing the package.
# The user's XLA flags, before importing prosona_jax adds its CPU defaults to them.
_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["8", "12"], "Global batch sizes to time.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps per batch size and round.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_BACKBONE = flags.DEFINE_enum("backbone", "resnet34", ["resnet34", "unet"], "Backbone.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Image side H = W.")
_IN_CHANNELS = flags.DEFINE_integer("in_channels", 1, "Image channels C.")
_NUM_RATERS = flags.DEFINE_integer("num_raters", 4, "Raters R.")
_BOUND_SAMPLES = flags.DEFINE_integer("num_bound_samples", 10, "K of the bound loss.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 10, "Prior samples at inference.")
_INFER_CALLS = flags.DEFINE_integer("infer_calls", 30, "Timed sampler calls per round.")
_INFERENCE = flags.DEFINE_bool("inference", True, "Also time the sampler.")
_XLA_FLAGS = flags.DEFINE_string(
    "xla_flags", "default", "Preset(s): default | none | a name from "
    "xla_flags.CANDIDATES | a literal '--xla_...' string; comma- or ';'-separated to "
    "compare several.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Repeats of every (preset, job), interleaved.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random inputs and parameters.")
_JSON = flags.DEFINE_string("json", "", "Also write every raw measurement to this file.")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one job ('train:B' or 'infer').")

# D-Persona's PyTorch code on the same 2-core CPU (torch 2.13, 2 threads), 128 x 128.
DPERSONA_STEP_S = {8: 0.71, 12: 1.13}
DPERSONA_INFER_MS = 36.0


# ----------------------------------------------------------------------------- child side


def _config():
  from prosona_jax import config_defaults  # pylint: disable=g-import-not-at-top
  c = config_defaults.base_config()
  c.data.image_size = _IMAGE_SIZE.value
  c.data.in_channels = _IN_CHANNELS.value
  c.data.num_raters = _NUM_RATERS.value
  c.model.backbone = _BACKBONE.value
  c.stage1.num_bound_samples = _BOUND_SAMPLES.value
  return c


def _inputs(batch: int, c, seed: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  s, r = c.data.image_size, c.data.num_raters
  image = rng.standard_normal((batch, s, s, c.data.in_channels)).astype(np.float32)
  yy, xx = np.mgrid[:s, :s]
  centre = rng.uniform(0.3 * s, 0.7 * s, (batch, r, 2))
  radius = rng.uniform(0.05 * s, 0.2 * s, (batch, r))
  d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
  masks = (d2 <= radius[..., None, None] ** 2).astype(np.float32)
  return {"image": image, "masks": masks}


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux.


def _memory(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
    return {"temp_mib": m.temp_size_in_bytes / 2**20,
            "args_mib": m.argument_size_in_bytes / 2**20,
            "out_mib": m.output_size_in_bytes / 2**20,
            "alias_mib": m.alias_size_in_bytes / 2**20}
  except Exception:  # pylint: disable=broad-except
    return {}


def _run_child(job: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from prosona_jax import optimizers  # pylint: disable=g-import-not-at-top
  from prosona_jax import parallel  # pylint: disable=g-import-not-at-top
  from prosona_jax.methods import prosona_stage1 as stage1  # pylint: disable=g-import-not-at-top
  from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top

  c = _config()
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  model = prob_unet.build_from_config(c)
  tx, _ = optimizers.adam(c.stage1, steps_per_epoch=100)
  rng = jax.random.key(_SEED.value)
  t0 = time.perf_counter()
  state = stage1.init_state(model, c, tx, mesh, rng)
  jax.block_until_ready(state)
  out = {"job": job, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "device": str(jax.devices()[0].device_kind), "init_s": time.perf_counter() - t0,
         "jax": jax.__version__}

  if job.startswith("train:"):
    batch_size = int(job.split(":")[1])
    batch = parallel.to_global(_inputs(batch_size, c, _SEED.value), mesh)
    step = stage1.make_train_step(model, tx, c, mesh, jax.random.key(1))
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out.update(trace_s=t1 - t0, compile_s=t2 - t1, **_memory(compiled))
    for _ in range(max(_WARMUP.value, 1)):  # The first call allocates; never time it.
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times, cpu = [], []
    for _ in range(_STEPS.value):
      t0, c0 = time.perf_counter(), time.process_time()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    out.update(step_s=times, step_cpu_s=cpu, loss=float(metrics["loss"]))
  elif job == "infer":
    image = parallel.to_global({"image": _inputs(1, c, _SEED.value)["image"]}, mesh)["image"]
    sample = stage1.make_sampler(model, mesh, _NUM_SAMPLES.value)
    args = (state.params, state.batch_stats, image, jax.random.key(2))
    t0 = time.perf_counter()
    lowered = sample.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out.update(trace_s=t1 - t0, compile_s=t2 - t1, **_memory(compiled))
    for _ in range(3):
      jax.block_until_ready(compiled(*args))
    times, cpu = [], []
    for i in range(_INFER_CALLS.value):
      key = jax.random.key(i)
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(compiled(args[0], args[1], image, key))
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    out.update(call_s=times, call_cpu_s=cpu)
  else:
    raise ValueError(f"unknown job {job!r}")
  out["peak_rss_mib"] = _rss_mib()
  return out


# ---------------------------------------------------------------------------- parent side


def _presets(spec: str) -> list[str]:
  sep = ";" if ";" in spec else ","
  if spec.strip().startswith("--") and ";" not in spec:
    return [spec.strip()]  # A single literal string may hold commas.
  return [p.strip() for p in spec.split(sep) if p.strip()]


def _child_env(preset: str) -> dict:
  from prosona_jax import xla_flags  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
  env["PROSONA_XLA_DEFAULTS"] = "0"  # The child never adds defaults on its own.
  base = _USER_XLA_FLAGS
  if preset == "default":
    env["XLA_FLAGS"] = xla_flags.with_cpu_defaults(base)
  elif preset == "none":
    env["XLA_FLAGS"] = base
  elif preset in xla_flags.CANDIDATES:
    env["XLA_FLAGS"] = xla_flags.with_cpu_defaults(base, (preset,))
  elif preset.startswith("--"):
    env["XLA_FLAGS"] = (base + " " + preset).strip()
  else:
    raise app.UsageError(f"--xla_flags preset {preset!r}: expected default, none, one of "
                         f"{sorted(xla_flags.CANDIDATES)} or '--...'.")
  return env


def _spawn(job: str, preset: str) -> dict:
  argv = [sys.executable, os.path.abspath(__file__), f"--child={job}"]
  argv += [a for a in sys.argv[1:] if not a.startswith(("--child", "--json", "--rounds"))]
  proc = subprocess.run(argv, env=_child_env(preset), capture_output=True, text=True,
                        check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
    raise RuntimeError(f"child {job} ({preset}) failed with status {proc.returncode}")
  return json.loads(lines[-1][len("RESULT "):])


def _stats(values: list[float]) -> str:
  return (f"min {min(values):.3f}  median {statistics.median(values):.3f}"
          if len(values) > 1 else f"{values[0]:.3f}")


def main(argv):
  del argv
  if _CHILD.value:
    print("RESULT " + json.dumps(_run_child(_CHILD.value)), flush=True)
    return
  presets = _presets(_XLA_FLAGS.value)
  jobs = [f"train:{int(b)}" for b in _BATCH_SIZES.value]
  if _INFERENCE.value:
    jobs.append("infer")
  print(f"Stage-1 benchmark: backbone {_BACKBONE.value}, {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}"
        f"x{_IN_CHANNELS.value}, R={_NUM_RATERS.value}, K={_BOUND_SAMPLES.value}, "
        f"{_STEPS.value} timed steps after {_WARMUP.value} warm-up, {_ROUNDS.value} round(s), "
        f"{os.cpu_count()} CPUs")
  results: dict[tuple[str, str], list[dict]] = {}
  for r in range(_ROUNDS.value):
    for preset in presets:
      for job in jobs:
        res = _spawn(job, preset)
        results.setdefault((preset, job), []).append(res)
        if job == "infer":
          ms = 1e3 * statistics.median(res["call_s"])
          cms = 1e3 * statistics.median(res["call_cpu_s"])
          print(f"[round {r + 1}] {preset:>10}  {job:>9}: compile {res['compile_s']:.1f} s, "
                f"{ms:.1f} ms/call (median of {len(res['call_s'])}; CPU {cms:.0f} ms), "
                f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
        else:
          med = statistics.median(res["step_s"])
          print(f"[round {r + 1}] {preset:>10}  {job:>9}: compile {res['compile_s']:.1f} s, "
                f"{med:.3f} s/step (median of {len(res['step_s'])}, min "
                f"{min(res['step_s']):.3f}; CPU {statistics.median(res['step_cpu_s']):.3f} s), "
                f"peak RSS {res['peak_rss_mib']:.0f} MiB, "
                f"loss {res['loss']:.4f}", flush=True)

  print("\nSummary (over rounds: min and median of each round's median wall time; CPU = "
        "process CPU time of all threads, less sensitive to a busy machine; "
        "D-Persona = PyTorch 2.13, 2 threads, same CPU)")
  # D-Persona's figures are for its setting only.
  comparable = (_BACKBONE.value == "resnet34" and _IMAGE_SIZE.value == 128
                and _IN_CHANNELS.value == 1 and _NUM_RATERS.value == 4
                and _BOUND_SAMPLES.value == 10)
  for preset in presets:
    flags_used = results[(preset, jobs[0])][0]["xla_flags"] or "(none)"
    print(f"\npreset {preset!r}: XLA_FLAGS={flags_used}")
    for job in jobs:
      runs = results[(preset, job)]
      compile_s = [x["compile_s"] for x in runs]
      rss = max(x["peak_rss_mib"] for x in runs)
      temp = runs[0].get("temp_mib")
      mem = f"peak RSS {rss:.0f} MiB" + (f", XLA temp {temp:.0f} MiB" if temp else "")
      if job == "infer":
        ms = [1e3 * statistics.median(x["call_s"]) for x in runs]
        cms = statistics.median(1e3 * statistics.median(x["call_cpu_s"]) for x in runs)
        cmp = (f" (D-Persona {DPERSONA_INFER_MS:.0f} ms; ratio "
               f"{statistics.median(ms) / DPERSONA_INFER_MS:.2f}x)"
               if comparable and _NUM_SAMPLES.value == 10 else "")
        print(f"  inference, {_NUM_SAMPLES.value} samples of 1 image: {_stats(ms)} ms "
              f"(CPU {cms:.0f} ms){cmp}; compile {_stats(compile_s)} s; {mem}")
      else:
        b = int(job.split(":")[1])
        s = [statistics.median(x["step_s"]) for x in runs]
        cpu = statistics.median(statistics.median(x["step_cpu_s"]) for x in runs)
        ref = DPERSONA_STEP_S.get(b) if comparable else None
        cmp = (f" (D-Persona {ref:.2f} s/step; ratio {statistics.median(s) / ref:.2f}x)"
               if ref else "")
        print(f"  train batch {b:>3}: {_stats(s)} s/step (CPU {cpu:.3f} s) = "
              f"{1 / statistics.median(s):.2f} steps/s{cmp}; compile {_stats(compile_s)} s; "
              f"{mem}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump([{"preset": p, **x} for (p, _), xs in results.items() for x in xs], f,
                indent=1)


if __name__ == "__main__":
  app.run(main)

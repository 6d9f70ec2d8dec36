r"""Times the (alpha, beta) grid in one program against one cell, and data parallelism.

  python benchmarks/bench_grid.py                 # demo config, 9 cells vs 1 cell
  python benchmarks/bench_grid.py --devices=1,2,8 # also the Stage-1 step on fake CPU devices
  python benchmarks/bench_grid.py --set model.backbone=resnet34 --set data.image_size=128 \
      --set stage2.num_samples=10              # the paper's backbone and size
  python benchmarks/bench_grid.py --end_to_end=DIR/fold{fold}/stage1/checkpoints
      # whole `python -m prosona_jax.grid` runs: every cell vs one cell (same program)

Part 1: the Stage-2 step of a single cell vs the vmapped step of every grid cell, on the
same batches (most of a step is the frozen backbone and prior, which the grid runs once).
Part 2: the Stage-1 data-parallel step at the same global batch on 1, 2 and 8 fake CPU
devices (`--xla_force_host_platform_device_count`); each count runs in its own process
because the device count is fixed when JAX starts.
Part 3 (`--end_to_end=STAGE1_CHECKPOINTS`): the wall time of whole grid runs (start-up,
text encoder, training, scoring every cell, grid.json), all cells against one cell, on a
trained Stage-1 checkpoint (e.g. `python -m prosona_jax.main --config=configs/demo.py
--workdir=runs/demo --config.stages=stage1`); each run starts from an empty workdir.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_config(config_path: str, overrides: list[str]):
  """The config of `config_path`, with `key=value` overrides (values as Python literals)."""
  import ast  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, config_path))
  cfg_mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg_mod)
  config = cfg_mod.get_config()
  for item in overrides:
    key, value = item.split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    config.update_from_flattened_dict({key: value})
  return config


def _time_steps(step, state, batches, n_warmup: int):
  """(seconds for the warm-up steps incl. compilation, median seconds per later step).

  Each timed step is waited for; the median keeps a busy neighbour's spikes out.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  for b in batches[:n_warmup]:
    state, m = step(state, b)
  jax.block_until_ready((state, m))
  compile_s = time.perf_counter() - t0
  times = []
  for b in batches[n_warmup:]:
    t0 = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  return compile_s, float(np.median(times))


def grid_vs_cell(config_path: str, steps: int, warmup: int, overrides: list[str],
                 cells_per_pass: list[int]) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from prosona_jax import ablation, checkpointing, config_lib, optimizers, parallel, run  # pylint: disable=g-import-not-at-top,g-multiple-import
  from prosona_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from prosona_jax.methods import prosona_stage1, prosona_stage2  # pylint: disable=g-import-not-at-top,g-multiple-import
  from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  config = load_config(config_path, overrides)
  with tempfile.TemporaryDirectory() as tmp:
    # Stage 2 starts from a Stage-1 checkpoint: an untrained one is as fast as any.
    fold = next(run.folds(config, tmp))
    mesh = fold.mesh
    model = prob_unet.build_from_config(config)
    tx1, _ = optimizers.adam(config.stage1, 1)
    s1_state = prosona_stage1.init_state(model, config, tx1, mesh, jax.random.key(0))
    ckpt = checkpointing.Checkpointer(os.path.join(tmp, "stage1"))
    ckpt.save(1, s1_state)
    ckpt.close()
    config.stage2.init_from = os.path.join(tmp, "stage1")
    method = prosona_stage2.Stage2(fold, stage_dir=tmp)
    tx, _ = method.make_optimizer()
    it = iter(pipeline.train_loader(fold.source, fold.split.train,
                                    batch_size=fold.local_batch_size, seed=0,
                                    augment_flip=False, augment_rotate=False))
    batches = [parallel.to_global(next(it), mesh) for _ in range(warmup + steps)]
    cells = config_lib.grid_cells(config)
    one = method.make_train_step(tx)
    c1, t1 = _time_steps(one, method.init_state(tx), batches, warmup)
    grid_times = []
    for per_pass in cells_per_pass or [0]:
      config.stage2.grid_cells_per_pass = per_pass
      used = ablation.grid_cells_per_pass(config, len(cells))
      many = ablation.make_grid_step(method, tx, [a for a, _ in cells], [b for _, b in cells])
      grid_times.append((per_pass, used, *_time_steps(
          lambda s, b: many(s, b, method.const), ablation.init_grid_state(
              method, tx, len(cells)), batches, warmup)))
  n = len(cells)
  print(f"Stage-2 step on {jax.default_backend()}, {config_path}, batch {config.data.batch_size}, "
        f"{config.data.image_size}x{config.data.image_size}, K={config.stage2.num_samples}, "
        f"{method.num_train_prompts} prompts")
  print(f"  one cell               : {1e3 * t1:8.1f} ms/step  "
        f"(first {warmup} steps incl. compile {c1:.1f} s)")
  for per_pass, used, c9, t9 in grid_times:
    label = f"{n} cells, {used}/pass" + (" (auto)" if per_pass == 0 else "")
    print(f"  {label:23s}: {1e3 * t9:8.1f} ms/step  (first {warmup} steps incl. compile "
          f"{c9:.1f} s)  = {t9 / t1:.2f}x one cell (separate runs: {n}x)")


def data_parallel(devices: list[int], config_path: str, steps: int) -> None:
  for n in devices:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
               PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, __file__, "--_dp_child", config_path, str(steps)],
                         env=env, capture_output=True, text=True, check=False)
    line = [l for l in out.stdout.splitlines() if l.startswith("DP ")]
    print(line[0][3:] if line else f"{n} devices: failed\n{out.stderr[-2000:]}")


def _dp_child(config_path: str, steps: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from prosona_jax import optimizers, parallel  # pylint: disable=g-import-not-at-top,g-multiple-import
  from prosona_jax.methods import prosona_stage1  # pylint: disable=g-import-not-at-top
  from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top
  config = load_config(config_path, [])
  mesh = parallel.make_mesh()
  model = prob_unet.build_from_config(config)
  tx, _ = optimizers.adam(config.stage1, 10)
  state = prosona_stage1.init_state(model, config, tx, mesh, jax.random.key(0))
  step = prosona_stage1.make_train_step(model, tx, config, mesh, jax.random.key(1))
  b, s, r = config.data.batch_size, config.data.image_size, config.data.num_raters
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((b, s, s, 1), np.float32),
           "masks": (rng.random((b, r, s, s)) > 0.7).astype(np.uint8)}
  batches = [parallel.to_global(batch, mesh) for _ in range(steps + 2)]
  compile_s, t = _time_steps(step, state, batches, 2)
  print(f"DP {jax.device_count()} devices: {1e3 * t:8.1f} ms/step at global batch {b} "
        f"(compile {compile_s:.1f} s)")


def end_to_end(config_path: str, stage1_checkpoints: str, repeats: int) -> None:
  """Wall time of `python -m prosona_jax.grid` with every cell and with one cell."""
  config = load_config(config_path, [])
  alpha, beta = config.stage2.grid_alpha[-1], config.stage2.grid_beta[-1]
  n = len(config.stage2.grid_alpha) * len(config.stage2.grid_beta)
  runs = {f"{n} cells": [],
          "1 cell": [f"--config.stage2.grid_alpha=({alpha!r},)",
                     f"--config.stage2.grid_beta=({beta!r},)"]}
  times = {name: [] for name in runs}
  for rep in range(repeats):
    for name, extra in runs.items():
      with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "prosona_jax.grid", f"--config={config_path}",
               f"--workdir={tmp}", f"--config.stage2.init_from={stage1_checkpoints}", *extra]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        times[name].append(time.perf_counter() - t0)
        if out.returncode:
          sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
      print(f"  run {rep + 1}: {name}: {times[name][-1]:.1f} s", flush=True)
  import numpy as np  # pylint: disable=g-import-not-at-top
  many, one = (float(np.median(times[k])) for k in runs)
  print(f"Whole grid runs on {config_path} (median of {repeats}): {n} cells {many:.1f} s, "
        f"1 cell {one:.1f} s = {many / one:.2f}x (separate runs: {n}x)")


def main():
  if len(sys.argv) > 1 and sys.argv[1] == "--_dp_child":
    _dp_child(sys.argv[2], int(sys.argv[3]))
    return
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--cells_per_pass", default="0",
                 help="comma-separated stage2.grid_cells_per_pass values to time (0: auto)")
  p.add_argument("--devices", default="", help="e.g. 1,2,8 to time data parallelism too")
  p.add_argument("--end_to_end", default="", metavar="STAGE1_CHECKPOINTS",
                 help="time whole grid runs on this Stage-1 checkpoint folder ({fold} allowed)")
  p.add_argument("--repeats", type=int, default=3, help="whole runs per variant (median)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.backbone=resnet34 (repeatable)")
  a = p.parse_args()
  if a.end_to_end:
    end_to_end(a.config, a.end_to_end, a.repeats)
    return
  grid_vs_cell(a.config, a.steps, a.warmup, a.set,
               [int(c) for c in a.cells_per_pass.split(",") if c])
  if a.devices:
    data_parallel([int(d) for d in a.devices.split(",")], a.config, a.steps)


if __name__ == "__main__":
  main()

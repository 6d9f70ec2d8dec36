r"""Times `predict` on one image from process start to exit, cold and warm compilation cache.

  python benchmarks/bench_predict_startup.py                      # demo-sized model
  python benchmarks/bench_predict_startup.py --config=configs/tiny.py
  python benchmarks/bench_predict_startup.py --model=models/lidc --runs=7
  python benchmarks/bench_predict_startup.py --size=512           # a whole 512x512 slice

Without `--model`, the model is an export of `--config`'s architecture with untrained
weights and a prompt bank of random embeddings (start-up does not depend on the weights,
and no text encoder is loaded). The input is a PNG of the model's size (or `--size`).

Each run is a fresh `python -m prosona_jax.predict` process on the default prompts:
- cold: an empty compilation cache folder each run (what a first run costs);
- warm: the same folder, filled by one run before the timed ones;
- off: `--compilation_cache=` (no persistent cache at all).
It prints every run's wall time, the medians of wall and CPU time (user + system, which
depends less on what else runs) and the load average: on a shared machine, compare
medians of several runs taken at the same load.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_export(config_path: str, out_dir: str) -> int:
  """Writes an untrained export of the config's model; returns its image size."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from prosona_jax import exporter, inference, prompt_bank  # pylint: disable=g-import-not-at-top
  from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top
  from prosona_jax.models import prompt as prompt_lib  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, config_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  variables = jax.jit(lambda r: prob_unet.init_from_config(config, r))(jax.random.key(0))
  bank = prompt_bank.PromptBank.from_config(config.text.prompts, default="synthetic")
  dim = 384  # all-MiniLM-L6-v2's width; any width works for timing.
  bank.embeddings = np.random.default_rng(0).normal(size=(len(bank.prompts), dim)).astype(
      np.float32)
  bank.encoder_name = "random (benchmark)"
  proj = prompt_lib.build_projector(config).init(jax.random.key(1), jnp.zeros((1, dim)))
  weights = inference.model_weights(variables["params"], variables["batch_stats"], proj)
  exporter.write_export(out_dir, config, weights, bank=bank, platforms=["cpu"])
  return int(config.data.image_size)


def run_once(model: str, image: str, out: str, cache: str) -> tuple[float, float]:
  """(wall seconds, CPU seconds: user + system) of one predict process."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "prosona_jax.predict", f"--model={model}",
                         f"--input={image}", f"--out={out}", f"--compilation_cache={cache}"],
                        cwd=ROOT, capture_output=True, text=True,
                        env={k: v for k, v in os.environ.items()
                             if not k.startswith("JAX_PERSISTENT_CACHE")
                             and k != "JAX_COMPILATION_CACHE_DIR"})
  seconds = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise SystemExit(f"predict failed:\n{proc.stderr[-3000:]}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return seconds, cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", help="An export folder (default: build one from --config).")
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--runs", type=int, default=5, help="Timed runs per condition.")
  parser.add_argument("--size", type=int, default=0, help="Input side (default: the model's).")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
    model = args.model
    if model:
      import json  # pylint: disable=g-import-not-at-top
      with open(os.path.join(model, "config.json")) as f:
        size = int(json.load(f)["data"]["image_size"])
    else:
      model = os.path.join(tmp, "model")
      size = build_export(args.config, model)
    import numpy as np  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    side = args.size or size
    image = os.path.join(tmp, "slice.png")
    pixels = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    times = {"cold": [], "warm": [], "off": []}
    warm_cache = os.path.join(tmp, "warm_cache")
    run_once(model, image, os.path.join(tmp, "out"), warm_cache)  # Fills the warm cache.
    for i in range(args.runs):  # Interleaved, so that load changes hit every condition.
      out = os.path.join(tmp, "out")
      times["cold"].append(run_once(model, image, out, os.path.join(tmp, f"cold{i}")))
      times["warm"].append(run_once(model, image, out, warm_cache))
      times["off"].append(run_once(model, image, out, ""))
    entries = len([n for n in os.listdir(warm_cache) if not n.startswith(".")])
    print(f"predict on one {side}x{side} PNG, {size}x{size} model "
          f"({args.model or args.config}), {args.runs} runs each; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    for name, values in times.items():
      wall, cpu = zip(*values)
      print(f"  {name:5s} wall median {statistics.median(wall):5.2f} s (runs "
            f"{' '.join(f'{v:.2f}' for v in wall)}); CPU (user+sys) median "
            f"{statistics.median(cpu):5.2f} s")
    print(f"  warm cache: {entries} entries")


if __name__ == "__main__":
  main()

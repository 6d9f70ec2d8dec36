r"""Times the review app's answers: a prompt change and a slider move, through its JSON API.

  python benchmarks/bench_serve.py                          # untrained demo-sized export
  python benchmarks/bench_serve.py --model=runs/demo_export --runs=40
  python benchmarks/bench_serve.py --size=256               # a 256x256 image (16 tiles)

Starts `python -m prosona_jax.serve` on a free port of 127.0.0.1, uploads one synthetic
image (the demo's kind: a lesion with a faint zone; `--size` places it on a larger
canvas, predicted as a sliding window), then, over HTTP as the page does:
- load: the upload and the first answer on it (the image part runs: backbone, prior);
- prompt change: /api/predict with the first prompt and a new one (the page re-sends all
  its prompts): a bank phrasing, or free text (embedded once by the text encoder);
- slider move: /api/interpolate at a new alpha between two prompts;
- repeat: the same request again (every map cached).
Every kind is run once before timing (first-call compilation and the text encoder's
first use are excluded). Prints the median and 90th percentile of the round trips and of
the server's own time (`elapsed_ms`), and the load average: on a shared machine, compare
figures taken at the same load. Latency does not depend on training, so the default model
is an export of `--config`'s architecture with untrained weights (as
bench_predict_startup.py builds; no text encoder is needed for bank phrasings, and free
text uses the config's).
"""

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def start_server(model: str, log: str) -> tuple[subprocess.Popen, str]:
  """The app on a free port; returns the process and its address."""
  with open(log, "w") as err:
    proc = subprocess.Popen([sys.executable, "-m", "prosona_jax.serve", f"--model={model}",
                             "--port=0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                            text=True)
  for line in proc.stdout:
    if line.startswith("Serving at "):
      return proc, line.split()[2]
  raise SystemExit(f"serve did not start:\n{open(log).read()[-3000:]}")


def post(url: str, body, content_type: str = "application/json") -> tuple[float, dict]:
  """(round-trip milliseconds, JSON answer)."""
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
  start = time.perf_counter()
  with urllib.request.urlopen(req, timeout=600) as r:
    out = json.loads(r.read())
  return 1e3 * (time.perf_counter() - start), out


def image_png(size: int, side: int) -> bytes:
  """A synthetic demo image (size x size) in the middle of a side x side canvas."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from prosona_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  image, _ = synthetic.generate_item(0, 2, 80, size, 4)
  pixels = np.uint8(np.round(255 * image))
  canvas = np.full((side, side), int(np.median(pixels)), np.uint8)
  o = (side - size) // 2
  canvas[o:o + size, o:o + size] = pixels
  buf = io.BytesIO()
  Image.fromarray(canvas).save(buf, "PNG")
  return buf.getvalue()


def summary(name: str, values: list[tuple[float, float]]) -> str:
  trip, server = (sorted(v) for v in zip(*values))
  p90 = lambda v: v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))]
  return (f"  {name:28s} median {statistics.median(trip):7.1f} ms (p90 {p90(trip):7.1f}); "
          f"server {statistics.median(server):7.1f} ms (p90 {p90(server):7.1f}); n={len(trip)}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", help="An export folder (default: build one from --config).")
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--runs", type=int, default=30, help="Timed requests per kind.")
  parser.add_argument("--size", type=int, default=0, help="Image side (default: the model's).")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
    model = args.model
    if not model:
      from bench_predict_startup import build_export  # pylint: disable=g-import-not-at-top
      model = os.path.join(tmp, "model")
      build_export(args.config, model)
    proc, url = start_server(model, os.path.join(tmp, "serve.log"))
    try:
      with urllib.request.urlopen(url + "api/info") as r:
        info = json.loads(r.read())
      size = int(info["image_size"])
      side = max(args.size, size)
      bank = [b["prompt"] for b in info["bank"]]
      first = info["default_prompts"][0]
      load_ms, image = post(f"{url}api/images?filename=bench.png", image_png(size, side),
                            "application/octet-stream")
      ms, out = post(url + "api/predict", {"image_id": image["image_id"], "prompts": [first]})
      load = (load_ms + ms, out["elapsed_ms"])
      times = {k: [] for k in ("bank", "free", "slider", "repeat")}
      # Each kind once untimed: compiles decode for it, loads the text encoder's program.
      post(url + "api/predict", {"image_id": image["image_id"], "prompts": [first, bank[1]]})
      if info["free_text"]:
        post(url + "api/predict", {"image_id": image["image_id"],
                                   "prompts": [first, "warm-up free text"]})
      post(url + "api/interpolate", {"image_id": image["image_id"],
                                     "prompts": [first, bank[-1]], "alpha": 0.5})
      rng = __import__("random").Random(0)
      new_bank = [p for p in bank if p not in (first, bank[1])]
      for i in range(args.runs):
        if new_bank:
          ms, out = post(url + "api/predict", {"image_id": image["image_id"],
                                               "prompts": [first, new_bank.pop()]})
          times["bank"].append((ms, out["elapsed_ms"]))
        if info["free_text"]:
          text = f"annotation style number {i}: {rng.choice(['tight', 'wide', 'rim'])} margin"
          ms, out = post(url + "api/predict", {"image_id": image["image_id"],
                                               "prompts": [first, text]})
          times["free"].append((ms, out["elapsed_ms"]))
        ms, out = post(url + "api/interpolate", {"image_id": image["image_id"],
                                                 "prompts": [first, bank[-1]],
                                                 "alpha": rng.random()})
        times["slider"].append((ms, out["elapsed_ms"]))
        ms, out = post(url + "api/predict", {"image_id": image["image_id"],
                                             "prompts": [first, bank[-1]]})
        times["repeat"].append((ms, out["elapsed_ms"]))
      areas = post(url + "api/predict", {"image_id": image["image_id"],
                                         "prompts": [first, bank[-1]]})[1]["masks"]
    finally:
      proc.terminate()
      proc.wait(timeout=30)
  print(f"serve on a {side}x{side} PNG, {size}x{size} model ({args.model or args.config}; "
        f"{image['plan']}); load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} CPUs")
  print(f"  {'new image (upload + encode)':28s} {load[0]:7.1f} ms; server {load[1]:7.1f} ms")
  labels = {"bank": "prompt change (bank)", "free": "prompt change (free text)",
            "slider": "slider move", "repeat": "repeated prompts (cached)"}
  for key, values in times.items():
    if values:
      print(summary(labels[key], values))
  print("  areas: " + "; ".join(f"{m['prompt']!r} {m['area']} px" for m in areas))


if __name__ == "__main__":
  main()

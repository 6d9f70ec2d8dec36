r"""prosona_jax's steps against D-Persona's PyTorch model, side by side, in one run.

  python benchmarks/bench_vs_torch.py                        # every job, on this machine
  python benchmarks/bench_vs_torch.py --jobs=s1:8,infer:10:1 --steps=15
  python benchmarks/bench_vs_torch.py --platform=gpu --json=h100.json
  python benchmarks/bench_vs_torch.py --xla_flags=none       # without the CPU defaults

Jobs (`--jobs`, comma-separated):
- `s1:B`: the Stage-1 train step at batch B: `prosona_stage1.make_train_step` on
  `configs/lidc.py:dpersona` (ResNet-34 U-Net at 128 x 128, posterior on all four masks,
  K = 10 bound samples, Adam) against D-Persona's `train_step(stage=1)` + Adam.
- `s2:B`: the Stage-2 train step at batch B: ProSona's projector (`configs/lidc.py`,
  K = 10, the LIDC prompt bank with random embeddings) and the JAX port of D-Persona's
  heads (`models/dpersona_heads.py`, bank of 100) against D-Persona's
  `train_step(stage=2)` (heads, bank of 100, backward through the U-Net) + Adam.
- `infer:N:B`: N prior samples of B images (`prosona_stage1.make_sampler`) against
  D-Persona's `val_step` (sigmoid included in both).
- `raters:B`: every rater's prediction for B images: ProSona's predictor with each
  rater's default prompt (K = 10) and the JAX port of D-Persona's heads, against
  D-Persona's `test_step` with its bank of 500.

PyTorch is `prosona_jax.testing.dpersona_torch` (D-Persona's architecture and tensor
names); the JAX side gets the same weights through `converter.convert_state_dict`, the
same inputs, float32, and the same CPU cores (`--threads`: `torch.set_num_threads` and
the CPU affinity of every child). Without torch the benchmark says so and times JAX
alone. Every contestant of a job runs in its own child process; the children are started
together and driven in turns, `--block` steps at a time, while the others wait on a pipe
(no CPU), so a busy neighbour slows all of them alike and the ratio (PyTorch median /
JAX median) stays meaningful when the absolute times do not. The table also gives the
load average when the job started. `--json` writes every step time, XLA's cost and
memory analyses, compile times and versions.

On a GPU (`--platform=gpu`, or `auto` finding one) JAX runs there and PyTorch on CUDA if
its build has it (else the PyTorch column is left out); both keep their default
float32 convolution precision (TF32 allowed on Ampere and later).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs from a checkout without installing the package; a variant's `CODE=DIR` runs the
# package (and configs) of another checkout, e.g. `git archive` of an older commit.
sys.path.insert(0, os.environ.get("CODE", _ROOT))
# The user's XLA flags, before importing prosona_jax adds its CPU defaults to them.
_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")

_JOBS = flags.DEFINE_list(
    "jobs", ["s1:8", "s1:12", "s2:12", "infer:10:1", "infer:10:16", "infer:50:1",
             "infer:50:16", "raters:1"], "Jobs to time (see the module docstring).")
_STEPS = flags.DEFINE_integer("steps", 15, "Timed steps per contestant and job.")
_BLOCK = flags.DEFINE_integer("block", 3, "Steps a contestant runs per turn.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_THREADS = flags.DEFINE_integer(
    "threads", 0, "CPU cores for every contestant (0: all of this machine's).")
_PLATFORM = flags.DEFINE_enum("platform", "auto", ["auto", "cpu", "gpu", "tpu"],
                              "JAX platform; PyTorch uses CUDA when JAX is on a GPU.")
_TORCH = flags.DEFINE_bool("torch", True, "Time PyTorch too (when it is installed).")
_PORT = flags.DEFINE_bool(
    "dpersona_port", False, "Also time the JAX port of D-Persona's heads (s2, raters); "
    "its Stage-2 step is slow on CPU (~17 s at batch 2), so it is off by default.")
_XLA_FLAGS = flags.DEFINE_string(
    "xla_flags", "default", "`default` (the package's CPU defaults, "
    "`xla_flags.CPU_DEFAULTS`), `none`, or a literal '--xla_...' string added to them.")
_OMP_PASSIVE = flags.DEFINE_bool(
    "torch_omp_passive", False, "OMP_WAIT_POLICY=PASSIVE for PyTorch: its OpenMP workers "
    "then sleep instead of spinning at barriers, which a machine busy with other work needs "
    "(spinning threads there can make PyTorch several times slower).")
_VARIANTS = flags.DEFINE_string(
    "jax_variants", "", "More JAX contestants, ';'-separated, each a string of XLA flags "
    "('--xla_...') and environment settings ('NAME=value'; `CODE=DIR` runs the package "
    "of the checkout DIR), added to the default ones: they run in turns with the others, "
    "e.g. --jax_variants='--xla_cpu_use_thunk_runtime=false;CODE=/tmp/old'.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and inputs.")
_JSON = flags.DEFINE_string("json", "", "Write every measurement to this file.")
_CHILD = flags.DEFINE_string("child", "", "Internal: 'contestant:job' of a child.")
_WEIGHTS = flags.DEFINE_string("weights", "", "Internal: D-Persona weights (.npz).")

IMAGE_SIZE, RATERS = 128, 4
TORCH, JAX, PORT = "pytorch", "jax", "jax-dpersona-port"
_DESCRIBE = {
    "s1": "Stage-1 train step, batch {b}",
    "s2": "Stage-2 train step, batch {b}",
    "infer": "{n} prior samples, batch {b}",
    "raters": "4 raters' predictions, batch {b}",
}


def _parse(job: str) -> tuple[str, int, int]:
  """'s1:8' -> ('s1', 0, 8); 'infer:10:16' -> ('infer', 10, 16)."""
  parts = job.split(":")
  kind = parts[0]
  if kind == "infer" and len(parts) == 3:
    return kind, int(parts[1]), int(parts[2])
  if kind in ("s1", "s2", "raters") and len(parts) == 2:
    return kind, 0, int(parts[1])
  raise app.UsageError(f"job {job!r}: expected s1:B, s2:B, infer:N:B or raters:B")


def _variants() -> list[str]:
  return [v.strip() for v in _VARIANTS.value.split(";") if v.strip()]


def _contestants(kind: str, with_torch: bool) -> list[str]:
  out = [JAX] + [f"{JAX}#{i + 1}" for i in range(len(_variants()))]
  if _PORT.value and kind in ("s2", "raters"):
    out.append(PORT)
  return ([TORCH] if with_torch else []) + out


def _inputs(batch: int, seed: int):
  """Images (B, H, W, 1) and disc masks (B, R, H, W), float32 numpy."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  s = IMAGE_SIZE
  image = rng.random((batch, s, s, 1), np.float32)
  yy, xx = np.mgrid[:s, :s]
  centre = rng.uniform(0.3 * s, 0.7 * s, (batch, RATERS, 2))
  radius = rng.uniform(0.05 * s, 0.2 * s, (batch, RATERS))
  d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
  masks = (d2 <= radius[..., None, None] ** 2).astype(np.float32)
  return image, masks


# ------------------------------------------------------------------------ PyTorch child


class _TorchJob:
  """One job in PyTorch: `run()` does one step or call and waits for the device."""

  def __init__(self, kind: str, n: int, b: int):
    import numpy as np  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from prosona_jax.testing import dpersona_torch as dp  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.set_num_threads(_threads())
    self.device = torch.device("cuda" if _PLATFORM.value in ("gpu", "auto")
                               and torch.cuda.is_available() else "cpu")
    net = dp.build("resnet34", num_raters=RATERS, seed=_SEED.value)
    if _WEIGHTS.value and not os.path.exists(_WEIGHTS.value):
      np.savez(_WEIGHTS.value, **dp.state_dict_numpy(net))
    self.net = net.to(self.device)
    image, masks = _inputs(b, _SEED.value)
    self.x = torch.from_numpy(image).permute(0, 3, 1, 2).contiguous().to(self.device)
    self.m = torch.from_numpy(masks).to(self.device)
    self.rng = np.random.default_rng(_SEED.value)
    with torch.no_grad():  # Same weights as the JAX side: compare what both compute.
      self.net.eval()
      centre = self.net.unet(self.x[:1])[0, :, IMAGE_SIZE // 2, IMAGE_SIZE // 2]
      self.check = self.net.prior(self.x[:1])[0][0].cpu().tolist() + centre.cpu().tolist()
    if kind == "s1":
      net.train()
      opt = torch.optim.Adam([p for name in ("unet", "prior", "posterior", "fcomb")
                              for p in getattr(net, name).parameters()], lr=1e-4)

      def step():
        opt.zero_grad()
        loss = dp.stage1_loss(net, self.x, self.m, rater=int(self.rng.integers(RATERS)))
        loss.backward()
        opt.step()
        return loss.item()  # D-Persona reads the loss every step (NaN check, logging).
    elif kind == "s2":
      net.train()  # As D-Persona's loop: BatchNorm in training mode, dropout on.
      opt = torch.optim.Adam(net.proj_heads.parameters(), lr=1e-4)

      def step():
        opt.zero_grad()
        loss = dp.generalized_dice_loss(dp.rater_logits(net, self.x, bank_size=100), self.m)
        loss.backward()  # Reaches the U-Net: its parameters keep requires_grad.
        opt.step()
        return loss.item()
    elif kind == "infer":
      net.eval()

      def step():
        with torch.no_grad():
          return torch.sigmoid(dp.sample_logits(net, self.x, n))
    else:
      net.eval()

      def step():
        with torch.no_grad():
          return torch.sigmoid(dp.rater_logits(net, self.x, bank_size=500))
    self.step = step
    self.info = {"device": str(self.device), "torch": torch.__version__,
                 "threads": torch.get_num_threads()}

  def run(self):
    self.step()
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()


# ---------------------------------------------------------------------------- JAX child


def _analyses(compiled) -> dict:
  out = {}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out["gflop"] = float(cost.get("flops", 0.0)) / 1e9
    out["gbytes_accessed"] = float(cost.get("bytes accessed", 0.0)) / 1e9
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    m = compiled.memory_analysis()
    out.update(temp_mib=m.temp_size_in_bytes / 2**20, args_mib=m.argument_size_in_bytes / 2**20,
               out_mib=m.output_size_in_bytes / 2**20, alias_mib=m.alias_size_in_bytes / 2**20)
  except Exception:  # pylint: disable=broad-except
    pass
  return out


class _JaxJob:
  """One job in JAX; the compiled function runs in `run()`."""

  def __init__(self, contestant: str, kind: str, n: int, b: int):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from configs import lidc  # pylint: disable=g-import-not-at-top
    from prosona_jax import converter  # pylint: disable=g-import-not-at-top
    from prosona_jax import inference  # pylint: disable=g-import-not-at-top
    from prosona_jax import parallel  # pylint: disable=g-import-not-at-top
    from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top
    self.jax = jax
    config = lidc.get_config("dpersona" if kind == "s1" else None)
    config.data.batch_size = b
    config.model.posterior_input = "all"  # D-Persona's weights: the posterior sees 4 masks.
    self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    model = prob_unet.build_from_config(config)
    if _WEIGHTS.value:
      state_dict = dict(np.load(_WEIGHTS.value))
      _, weights, _ = converter.convert_state_dict(state_dict, config)
      frozen, _ = inference.split_weights(weights)
    else:
      frozen = jax.jit(lambda r: prob_unet.init_variables(
          model, r, image_size=IMAGE_SIZE, in_channels=1))(jax.random.key(_SEED.value))
    frozen = parallel.replicate({"params": frozen["params"],
                                 "batch_stats": frozen.get("batch_stats", {})}, self.mesh)
    image, masks = _inputs(b, _SEED.value)
    batch = parallel.to_global({"image": image, "masks": masks}, self.mesh)
    mu = jax.jit(lambda v, x: model.apply(v, x, method="prior_dist"))(frozen, image[:1])[0]
    feats = jax.jit(lambda v, x: model.apply(v, x, False, method="features"))(frozen, image[:1])
    self.check = (np.asarray(mu[0]).tolist()
                  + np.asarray(feats[0, IMAGE_SIZE // 2, IMAGE_SIZE // 2]).tolist())
    self.info = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                 "xla_flags": os.environ.get("XLA_FLAGS", "")}
    t0 = time.perf_counter()
    if contestant == PORT:
      self._dpersona_port(kind, model, frozen, batch, b)
    elif kind == "s1":
      self._stage1(config, model, frozen, batch)
    elif kind == "infer":
      from prosona_jax.methods import prosona_stage1 as stage1  # pylint: disable=g-import-not-at-top
      sample = stage1.make_sampler(model, self.mesh, n)
      args = (frozen["params"], frozen["batch_stats"], batch["image"], jax.random.key(2))
      compiled = sample.lower(*args).compile()
      self.info.update(_analyses(compiled))
      self.call = lambda: compiled(*args)
    else:
      self._stage2(kind, config, frozen, batch)
    jax.block_until_ready(self.call())  # Compiles where it has not yet.
    self.info["compile_s"] = time.perf_counter() - t0

  def _stage1(self, config, model, frozen, batch):
    from prosona_jax import optimizers  # pylint: disable=g-import-not-at-top
    from prosona_jax import parallel  # pylint: disable=g-import-not-at-top
    from prosona_jax import trainer  # pylint: disable=g-import-not-at-top
    from prosona_jax.methods import prosona_stage1 as stage1  # pylint: disable=g-import-not-at-top
    jax = self.jax
    tx, _ = optimizers.adam(config.stage1, steps_per_epoch=100)
    state = parallel.replicate(
        trainer.TrainState.create(frozen["params"], tx, frozen["batch_stats"]), self.mesh)
    step = stage1.make_train_step(model, tx, config, self.mesh, jax.random.key(1))
    compiled = step.lower(state, batch).compile()
    self.info.update(_analyses(compiled))
    holder = [state]

    def call():
      holder[0], metrics = compiled(holder[0], batch)  # The state is donated.
      return metrics
    self.call = call

  def _stage2(self, kind, config, frozen, batch):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from prosona_jax import parallel  # pylint: disable=g-import-not-at-top
    from prosona_jax import prompt_bank  # pylint: disable=g-import-not-at-top
    from prosona_jax.methods import prosona_stage2  # pylint: disable=g-import-not-at-top
    from prosona_jax.models import prob_unet  # pylint: disable=g-import-not-at-top
    from prosona_jax.models import prompt as prompt_lib  # pylint: disable=g-import-not-at-top
    jax = self.jax
    bank = prompt_bank.PromptBank.from_config(config.text.prompts)
    emb = np.random.default_rng(_SEED.value).standard_normal((len(bank), 512))
    bank = prompt_bank.PromptBank(bank.prompts, bank.rater, bank.heldout,
                                  (emb / np.linalg.norm(emb, axis=1, keepdims=True)))
    # `Stage2` without its fold: `__init__` reads a run's checkpoint and text encoder;
    # everything the step and the predictor use is set here, so that the code timed is
    # the method's own.
    method = object.__new__(prosona_stage2.Stage2)
    method.config, method.cfg, method.mesh = config, config.stage2, self.mesh
    method.steps_per_epoch = 100
    method.init_rng, method.step_rng, method.eval_rng = jax.random.split(jax.random.key(3), 3)
    method.model = prob_unet.build_from_config(config)
    method.frozen, method.bank, method._predictor = frozen, bank, None  # pylint: disable=protected-access
    train = bank.train_view()
    method.const = parallel.replicate(prosona_stage2.StepConstants(
        frozen=frozen, emb_PE=jnp.asarray(train.embeddings, jnp.float32),
        rater_P=jnp.asarray(train.rater, jnp.int32),
        positive_PP=jnp.asarray(train.positive_mask(), jnp.float32)), self.mesh)
    method.projector = prompt_lib.build_projector(config)
    method.emb_all = parallel.replicate(jnp.asarray(bank.embeddings, jnp.float32), self.mesh)
    tx, _ = method.make_optimizer()
    if kind == "s2":
      step = method.make_train_step(tx)
      holder = [method.init_state(tx)]

      def call():
        holder[0], metrics = step(holder[0], batch)
        return metrics
      self.call = call
    else:
      predictor = method.predictor
      params = method.init_projector()
      emb_canon = parallel.replicate(
          jnp.asarray(bank.embeddings[bank.canonical_indices()], jnp.float32), self.mesh)
      key = jax.random.key(4)
      self.call = lambda: predictor(frozen, params, batch["image"], emb_canon, key)

  def _dpersona_port(self, kind, model, frozen, batch, b):
    import optax  # pylint: disable=g-import-not-at-top
    from prosona_jax.models import dpersona_heads as dph  # pylint: disable=g-import-not-at-top
    jax = self.jax
    dp = dph.build_dpersona_heads(stage1=model)
    variables = dph.init_variables(dp, jax.random.key(5), IMAGE_SIZE, 1, RATERS,
                                   stage1_variables=frozen)
    if kind == "s2":
      tx = dph.make_optimizer()

      @jax.jit
      def step(params, opt_state, batch, rng):
        (loss, _), grads = jax.value_and_grad(dph.loss_fn, has_aux=True)(
            params, variables["batch_stats"], model=dp, batch=batch, rng=rng,
            frozen_params=variables["frozen_params"], train=True, train_samples=100)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

      holder = [variables["params"], tx.init(variables["params"]), 0]

      def call():
        p, o, i = holder
        p, o, loss = step(p, o, batch, jax.random.key(i))
        holder[:] = [p, o, i + 1]
        return loss
      self.call = call
    else:
      predict = jax.jit(lambda v, x, r: dph.predict_fn(v, x, r, model=dp, test_samples=500))
      key = jax.random.key(6)
      self.call = lambda: predict(variables, batch["image"], key)

  def run(self):
    self.jax.block_until_ready(self.call())


def _threads() -> int:
  return _THREADS.value or os.cpu_count() or 1


def _child_main(spec: str) -> None:
  contestant, job = spec.split(":", 1)
  kind, n, b = _parse(job)
  if _THREADS.value and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:_THREADS.value]))
  t0 = time.perf_counter()
  runner = (_TorchJob(kind, n, b) if contestant == TORCH
            else _JaxJob(contestant, kind, n, b))
  for _ in range(_WARMUP.value):
    runner.run()
  info = dict(runner.info, check=runner.check, setup_s=time.perf_counter() - t0)
  print("READY " + json.dumps(info), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      break
    times = []
    for _ in range(int(cmd[1])):
      t, c = time.perf_counter(), time.process_time()
      runner.run()
      times.append((time.perf_counter() - t, time.process_time() - c))
    print("TIMES " + json.dumps(times), flush=True)


# --------------------------------------------------------------------------- the parent


def _child_env(contestant: str) -> dict:
  from prosona_jax import xla_flags  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  if _PLATFORM.value != "auto":
    env["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(_PLATFORM.value, _PLATFORM.value)
  if contestant == TORCH and _OMP_PASSIVE.value:
    env["OMP_WAIT_POLICY"] = "PASSIVE"
  if contestant != TORCH:
    base = env["XLA_FLAGS"] = _USER_XLA_FLAGS
    if _XLA_FLAGS.value == "default":
      env["XLA_FLAGS"] = xla_flags.with_cpu_defaults(base) if _is_cpu(env) else base
    elif _XLA_FLAGS.value != "none":
      env["XLA_FLAGS"] = (xla_flags.with_cpu_defaults(base) + " " + _XLA_FLAGS.value).strip()
    env["PROSONA_XLA_DEFAULTS"] = "0"  # Decided here, not again in the child.
  if "#" in contestant:
    for token in _variants()[int(contestant.split("#")[1]) - 1].split():
      if token.startswith("--"):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + token).strip()
      else:
        name, _, value = token.partition("=")
        env[name] = value
  return env


def _is_cpu(env: dict) -> bool:
  platforms = env.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0] == "cpu"
  from prosona_jax import xla_flags  # pylint: disable=g-import-not-at-top
  return xla_flags._is_cpu_run()  # pylint: disable=protected-access


class _Child:
  """A contestant's process, driven over its stdin and stdout."""

  def __init__(self, contestant: str, job: str, weights: str):
    self.name = contestant
    argv = [sys.executable, os.path.abspath(__file__), f"--child={contestant}:{job}",
            f"--weights={weights}", f"--threads={_THREADS.value}",
            f"--platform={_PLATFORM.value}", f"--warmup={_WARMUP.value}",
            f"--seed={_SEED.value}"]
    self.proc = subprocess.Popen(argv, env=_child_env(contestant), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 bufsize=1, cwd=_ROOT)
    self.info = json.loads(self._expect("READY"))
    self.times: list[float] = []  # Wall seconds per step.
    self.cpu: list[float] = []  # CPU seconds of the process (all threads) per step.

  def _expect(self, tag: str) -> str:
    for line in self.proc.stdout:
      if line.startswith(tag + " "):
        return line[len(tag) + 1:]
    err = self.proc.stderr.read()
    raise RuntimeError(f"{self.name} child failed:\n{err[-4000:]}")

  def run(self, n: int) -> None:
    self.proc.stdin.write(f"run {n}\n")
    self.proc.stdin.flush()
    for wall, cpu in json.loads(self._expect("TIMES")):
      self.times.append(wall)
      self.cpu.append(cpu)

  def close(self) -> None:
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
    except OSError:
      pass
    self.proc.wait(timeout=60)


def _torch_available() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("torch") is not None


def _time_job(job: str, weights: str, with_torch: bool) -> dict:
  kind, _, _ = _parse(job)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  children = []
  try:
    # Started one after the other: each compiles and warms up alone.
    for contestant in _contestants(kind, with_torch):
      children.append(_Child(contestant, job, weights))
    done = 0
    while done < _STEPS.value:
      n = min(_BLOCK.value, _STEPS.value - done)
      order = children if (done // _BLOCK.value) % 2 == 0 else children[::-1]
      for child in order:
        child.run(n)
        time.sleep(0.05)  # Lets the previous child's spinning worker threads go idle.
      done += n
  finally:
    for child in children:
      child.close()
  result = {"job": job, "load_average_1min": load, "contestants": {}}
  for child in children:
    result["contestants"][child.name] = dict(
        child.info, step_s=child.times, median_s=statistics.median(child.times),
        step_cpu_s=child.cpu, median_cpu_s=statistics.median(child.cpu))
  return result


def _fmt(seconds: float) -> str:
  return f"{seconds:.3f} s" if seconds >= 1.0 else f"{1e3 * seconds:.1f} ms"


def _print_table(results: list[dict], with_torch: bool) -> None:
  print("\n| work | PyTorch (D-Persona) | prosona_jax | ratio PyTorch/JAX | "
        "D-Persona port (JAX) | load |")
  print("|---|---|---|---|---|---|")
  variants = _variants()
  for i, v in enumerate(variants):
    print(f"{JAX}#{i + 1}: {v}")
  for r in results:
    kind, n, b = _parse(r["job"])
    c = r["contestants"]
    jax_s = c[JAX]["median_s"]
    torch_s = c[TORCH]["median_s"] if TORCH in c else None
    port = c.get(PORT)
    row = [_DESCRIBE[kind].format(n=n, b=b),
           _fmt(torch_s) if torch_s else "-", _fmt(jax_s),
           f"{torch_s / jax_s:.2f}" if torch_s else "-",
           (_fmt(port["median_s"]) + (f" ({torch_s / port['median_s']:.2f})" if torch_s
                                      else "")) if port else "-",
           f"{r['load_average_1min']:.1f}"]
    print("| " + " | ".join(row) + " |")
    for i in range(len(variants)):
      v = c[f"{JAX}#{i + 1}"]["median_s"]
      print(f"|   {JAX}#{i + 1} | | {_fmt(v)} | " + (f"{torch_s / v:.2f}" if torch_s else "-")
            + f" | ({jax_s / v:.2f}x the default) | |")
  if not with_torch:
    print("(PyTorch not timed: " + ("not installed" if _TORCH.value else "--notorch") + ")")


def _check_weights(results: list[dict]) -> None:
  """Prior mean and centre-pixel features of image 0 from every contestant (eval mode):
  the weights must be the same."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  worst = 0.0
  for r in results:
    checks = [np.asarray(c["check"], np.float64) for c in r["contestants"].values()]
    for other in checks[1:]:
      worst = max(worst, float(np.abs(other - checks[0]).max() / np.abs(checks[0]).max()))
  print(f"Same weights: prior means and features agree to {worst:.1e} (relative)")


def main(argv):
  del argv
  if _CHILD.value:
    _child_main(_CHILD.value)
    return
  for job in _JOBS.value:
    _parse(job)
  with_torch = _TORCH.value and _torch_available()
  if _TORCH.value and not with_torch:
    print("PyTorch is not installed: timing JAX alone (pip install torch for the comparison).")
  print(f"{os.cpu_count()} CPUs, threads {_threads()}, platform {_PLATFORM.value}, "
        f"PyTorch OpenMP wait policy {'PASSIVE' if _OMP_PASSIVE.value else 'default'}, "
        f"{_STEPS.value} timed steps per contestant in turns of {_BLOCK.value}, "
        f"after {_WARMUP.value} warm-up steps", flush=True)
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    # The first PyTorch child writes its weights here; every JAX child converts them.
    weights = os.path.join(tmp, "dpersona.npz") if with_torch else ""
    for job in _JOBS.value:
      res = _time_job(job, weights, with_torch)
      results.append(res)
      parts = [f"{name} {_fmt(c['median_s'])} (CPU {_fmt(c['median_cpu_s'])})"
               for name, c in res["contestants"].items()]
      print(f"{job:>12}: " + ", ".join(parts) + f"  (load {res['load_average_1min']:.1f}; "
            f"JAX compile {res['contestants'][JAX]['compile_s']:.1f} s)", flush=True)
  _print_table(results, with_torch)
  if with_torch:
    _check_weights(results)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"argv": sys.argv, "cpus": os.cpu_count(), "threads": _threads(),
                 "results": results}, f, indent=1)


if __name__ == "__main__":
  app.run(main)

"""Metrics out: TensorBoard event files (tensorboardX, no TensorFlow) and a JSONL log.

Only process 0 writes; the other processes get a writer that does nothing, so callers
need no `if jax.process_index() == 0` of their own.

The log directory may be a URL such as `gs://bucket/run/fold0/stage1/logs` (etils.epath;
gs:// needs `gcsfs`). Cloud storage cannot append, so then both files are written to a
local staging directory and copied up whole on `flush()`, `close()` and at most once a
minute while logging; a resumed run first fetches the existing `metrics.jsonl`.
"""

import contextlib
import json
import logging as py_logging
import os
import shutil
import tempfile
import time
from typing import Any, Iterator, Mapping

from etils import epath
import jax
import numpy as np


# Libraries whose INFO lines say nothing a user acts on, e.g. JAX's "Unable to initialize
# backend 'tpu'" on every CPU run; their warnings still show.
_NOISY_LOGGERS = ("jax", "jaxlib", "orbax", "grain", "etils", "transformers",
                  "huggingface_hub", "urllib3", "filelock", "fsspec")


def quiet_library_logs() -> None:
  """Keeps library INFO lines out of the run's log: Orbax's (dozens per checkpoint, logged
  through absl) and those of `_NOISY_LOGGERS`."""
  py_logging.getLogger("absl").addFilter(
      lambda r: r.levelno >= py_logging.WARNING or "/orbax/" not in r.pathname)
  for name in _NOISY_LOGGERS:
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


@contextlib.contextmanager
def run_log(path: str | None, preamble: str = "") -> Iterator[None]:
  """Copies every log line of the block into `path` (the run's `logs/main.log`), after
  `preamble` (the config): the file holds what stderr leaves out.

  Appends, so a resumed run adds to it. Process 0 only, and local paths only (a remote
  work directory gets none: its stderr is the log).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not path or "://" in path or jax.process_index() != 0:
    yield
    return
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  handler = py_logging.FileHandler(path, encoding="utf-8")
  handler.setLevel(py_logging.INFO)
  handler.setFormatter(absl_logging.PythonFormatter())
  if preamble:
    handler.stream.write(preamble.rstrip("\n") + "\n")
    handler.flush()
  root = py_logging.getLogger()
  root.addHandler(handler)
  try:
    yield
  finally:
    root.removeHandler(handler)
    handler.close()


def set_verbosity(*, progress: bool) -> None:
  """The log level of a command-line tool (`cli.run`). `progress`: keep this package's
  INFO lines (training progress) and drop only Orbax's; otherwise (one-shot tools) log
  warnings and errors only."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  if progress:
    quiet_library_logs()
  else:
    logging.set_verbosity(logging.WARNING)  # Orbax and XLA log dozens of INFO lines.


class MetricWriter:
  """Writes scalars and images to `<logdir>` (TensorBoard) and `<logdir>/metrics.jsonl`."""

  def __init__(self, logdir: str, *, sync_every_s: float = 60.0):
    self.logdir = logdir
    self._active = jax.process_index() == 0
    self._remote = "://" in logdir
    self._sync_every_s = sync_every_s
    self._last_sync = time.time()
    self._tb = None
    self._jsonl = None
    if self._active:
      self._local = tempfile.mkdtemp(prefix="prosona_logs_") if self._remote else logdir
      os.makedirs(self._local, exist_ok=True)
      if self._remote and (epath.Path(logdir) / "metrics.jsonl").exists():
        with open(os.path.join(self._local, "metrics.jsonl"), "wb") as f:
          f.write((epath.Path(logdir) / "metrics.jsonl").read_bytes())
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(self._local)
      self._jsonl = open(os.path.join(self._local, "metrics.jsonl"), "a")

  def _sync(self, force: bool = False) -> None:
    """Copies the staged files to a remote `logdir` (whole files: no appends there)."""
    if not self._remote or (not force and time.time() - self._last_sync < self._sync_every_s):
      return
    self._tb.flush()
    self._jsonl.flush()
    remote = epath.Path(self.logdir)
    remote.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self._local):
      with open(os.path.join(self._local, name), "rb") as f:
        (remote / name).write_bytes(f.read())
    self._last_sync = time.time()

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    if not self._active:
      return
    row = {"step": int(step), "time": time.time()}
    for name, value in values.items():
      value = float(np.asarray(value))
      row[name] = value
      self._tb.add_scalar(name, value, int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    self._sync()

  def images(self, step: int, name: str, images_NHWC: np.ndarray) -> None:
    """Writes a batch of images in [0, 1], (N, H, W, C) with C in {1, 3}."""
    if not self._active:
      return
    images = np.clip(np.asarray(images_NHWC, np.float32), 0.0, 1.0)
    self._tb.add_images(name, images, int(step), dataformats="NHWC")

  def flush(self) -> None:
    if self._active:
      self._tb.flush()
      self._jsonl.flush()
      self._sync(force=True)

  def close(self) -> None:
    if self._active:
      self._sync(force=True)
      self._tb.close()
      self._jsonl.close()
      if self._remote:
        shutil.rmtree(self._local, ignore_errors=True)
      self._active = False

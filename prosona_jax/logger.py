"""Metrics out: TensorBoard event files (tensorboardX, no TensorFlow) and a JSONL log.

Only process 0 writes; the other processes get a writer that does nothing, so callers
need no `if jax.process_index() == 0` of their own.
"""

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


class MetricWriter:
  """Writes scalars and images to `<logdir>` (TensorBoard) and `<logdir>/metrics.jsonl`."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._active:
      os.makedirs(logdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir)
      self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")

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

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()
      self._active = False

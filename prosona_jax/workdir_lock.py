"""One run per work directory: `WORKDIR/.lock`.

Two runs writing one work directory mix their checkpoints silently (one resumes from
the other's), so `main` and `grid` hold a lock for as long as they run:

- The lock file is created atomically (`O_CREAT | O_EXCL`) and holds JSON: `pid`, `host`,
  `started` (UTC), `command`. While the run lives it also holds an advisory `flock` on
  the file, which the kernel drops when the process dies, however it dies.
- A second run finds the file, cannot take the `flock`, and stops (`WorkdirLocked`, exit
  status 2) naming the holder.
- A stale lock is taken over with a warning: the `flock` is free and the holder is a
  process of this host that is gone (its pid is dead, or now belongs to a process that
  started later). A holder on another host cannot be checked from here: the run stops
  and says to delete the file if that run is over.
- The lock is released (file removed) on every exit Python sees: a normal end, an
  exception, the preemption exit (`trainer.Preempted`). A SIGKILL leaves a stale file.
- Multi-host runs lock from process 0 only; the others learn the outcome from it.
- gs:// and other URLs (etils.epath) have no atomic create here: the check and the write
  are separate, so two runs started within moments of each other may both pass. Best
  effort, as documented.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
from typing import Iterator

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from prosona_jax.errors import UserError

LOCK_NAME = ".lock"


class WorkdirLocked(UserError):
  """Another run holds the work directory."""


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_NAME)


def _start_time(pid: int) -> str | None:
  """When process `pid` started (clock ticks since boot, Linux), None if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # The command name (field 2) may hold spaces; fields after it are plain.
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _record() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "pid_start_time": _start_time(os.getpid()),
          "command": " ".join(sys.argv)}


def describe(holder: dict) -> str:
  """`pid 123 on host, started 2025-01-01T00:00:00+00:00: python -m ...`."""
  return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
          f"{holder.get('started', '?')}: {holder.get('command', '?')}")


def _parse(text: str) -> dict:
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict) -> bool:
  """Whether the holder is certainly gone: a process of this host that no longer runs."""
  if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
    return False
  pid = holder["pid"]
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    pass  # Alive, another user's.
  recorded, now = holder.get("pid_start_time"), _start_time(pid)
  # The pid was reused by a process started after the holder.
  return recorded is not None and now is not None and recorded != now


def _refuse(path: str, holder: dict) -> WorkdirLocked:
  if not holder:
    return WorkdirLocked(f"{path}: another run is using this work directory (the lock "
                         "holds no readable record); one run per work directory")
  hint = ("" if holder.get("host") == socket.gethostname() else
          f"; if that run is over, delete {path}")
  return WorkdirLocked(f"{path}: the work directory is in use by {describe(holder)}; one "
                       f"run per work directory{hint}")


def _flock(fd: int) -> bool | None:
  """Takes the advisory lock: True, False when another process holds it, None when the
  file system does not support it."""
  import fcntl  # pylint: disable=g-import-not-at-top
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  except OSError as e:
    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
      return None
    raise


def _read_fd(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  chunks = []
  while chunk := os.read(fd, 65536):
    chunks.append(chunk)
  return b"".join(chunks).decode("utf-8", "replace")


class _LocalLock:
  """The lock on a local (or mounted) file system."""

  def __init__(self, path: str):
    self.path = path
    self.fd: int | None = None

  def acquire(self) -> dict:
    """Takes the lock; returns the stale holder it replaced ({} if none)."""
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    for _ in range(10):  # Retries only when a holder released the file meanwhile.
      try:
        fd, created = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
      except FileExistsError:
        try:
          fd, created = os.open(self.path, os.O_RDWR), False
        except FileNotFoundError:
          continue
      locked = _flock(fd)
      holder = {} if created else _parse(_read_fd(fd))
      if locked is False:
        os.close(fd)
        raise _refuse(self.path, holder)
      try:
        same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same_file = False
      if not same_file:  # Released and re-created between our open and our flock.
        os.close(fd)
        continue
      # With the flock ours, a holder recorded in the file is gone, unless the file
      # system ignores flocks (then the pid decides) or it ran on another host.
      if holder and (locked is None or holder.get("host") != socket.gethostname()) \
          and not _is_stale(holder):
        os.close(fd)
        raise _refuse(self.path, holder)
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(_record()).encode(), 0)
      os.fsync(fd)
      self.fd = fd
      return holder
    raise WorkdirLocked(f"{self.path}: could not take the lock (it changed hands "
                        "repeatedly); try again")

  def release(self) -> None:
    if self.fd is None:
      return
    try:
      if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
        os.unlink(self.path)  # Before closing: nobody may flock a file about to vanish.
    except FileNotFoundError:
      pass
    finally:
      os.close(self.fd)
      self.fd = None


class _RemoteLock:
  """Best effort for URLs (gs://...): no atomic create, no flock."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.mine = ""

  def acquire(self) -> dict:
    holder = {}
    if self.path.exists():
      holder = _parse(self.path.read_text())
      if not _is_stale(holder):
        raise _refuse(os.fspath(self.path), holder)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.mine = json.dumps(_record())
    self.path.write_text(self.mine)
    return holder

  def release(self) -> None:
    with contextlib.suppress(OSError):
      if self.mine and self.path.read_text() == self.mine:
        self.path.unlink()


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds `WORKDIR/.lock` for the body (see the module docstring).

  Raises:
    WorkdirLocked: another live run holds it.
  """
  path = lock_path(workdir)
  lock = _RemoteLock(path) if "://" in workdir else _LocalLock(path)
  error = None
  if jax.process_index() == 0:
    try:
      stale = lock.acquire()
      if stale:
        logging.warning("%s: took over the stale lock of %s (no longer running).", path,
                        describe(stale))
    except WorkdirLocked as e:
      error = e
  if jax.process_count() > 1:
    # Every process stops, or none: the others follow process 0's outcome.
    ok = multihost_utils.broadcast_one_to_all(np.asarray(error is None, np.int32))
    if not int(ok) and error is None:
      error = WorkdirLocked(f"{path}: process 0 could not take the lock (its log says "
                            "who holds it)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if jax.process_index() == 0:
      lock.release()

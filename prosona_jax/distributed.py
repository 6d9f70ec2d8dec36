"""Multi-controller start-up: one Python process per host, all running the same program."""

import os

from absl import logging
import jax


def _on_multiworker_tpu() -> bool:
  # Cloud TPU VMs list every worker of the slice here; one name means a single host.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h.strip()]) > 1


def maybe_initialize(requested: bool | None) -> bool:
  """Calls `jax.distributed.initialize()` when asked to or when on a multi-host TPU slice.

  Args:
    requested: True/False from `--distributed`; None decides from the environment
      (`PROSONA_DISTRIBUTED=1`, or a Cloud TPU VM with several workers). The coordinator
      address, process count and id come from the environment JAX reads
      (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, or SLURM / TPU
      auto-detection). `PROSONA_DISTRIBUTED_TIMEOUT_S` shortens JAX's timeouts.

  Processes other than 0 log only warnings and errors from here on.

  Returns:
    Whether the distributed runtime was initialised.
  """
  if requested is None:
    requested = os.environ.get("PROSONA_DISTRIBUTED", "") == "1" or _on_multiworker_tpu()
  if not requested:
    return False
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
  if os.environ.get("PROSONA_DISTRIBUTED_TIMEOUT_S"):
    # One value for connecting, heartbeats and the shutdown barrier (JAX: 300 s, 100 s,
    # 300 s). Shorter means a crashed peer stops the others sooner (tests use ~30 s).
    t = int(os.environ["PROSONA_DISTRIBUTED_TIMEOUT_S"])
    kwargs.update(initialization_timeout=t, heartbeat_timeout_seconds=t,
                  shutdown_timeout_seconds=t)
  jax.distributed.initialize(**kwargs)
  if jax.process_index() != 0:
    # Every process runs the same program; one copy of the progress lines is enough.
    logging.set_verbosity(logging.WARNING)
  logging.warning("Distributed: process %d of %d, %d local / %d global devices.",
                  jax.process_index(), jax.process_count(), jax.local_device_count(),
                  jax.device_count())
  return True

"""Data-parallel sharding: one mesh axis ``'data'`` over every device of every host.

Parameters, optimiser and loss state are replicated, or with ``train.param_sharding='fsdp'``
every large parameter and optimiser array is split along one of its axes over ``'data'``
(XLA gathers it where a computation needs it); a global batch is sharded along its first
axis. Each host loads only its share of the data (``shard_index =
jax.process_index()``, ``shard_count = jax.process_count()``) and the global array is
assembled from the per-host arrays with :func:`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"

_ENV_COORDINATOR = ("JAXRANK_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
_ENV_NUM_PROCESSES = ("JAXRANK_NUM_PROCESSES", "JAX_NUM_PROCESSES")
_ENV_PROCESS_ID = ("JAXRANK_PROCESS_ID", "JAX_PROCESS_ID")


def _env(names: tuple[str, ...]) -> str | None:
  for name in names:
    if os.environ.get(name):
      return os.environ[name]
  return None


def maybe_initialize_distributed(
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  force: bool = False,
) -> bool:
  """Calls :func:`jax.distributed.initialize` for a multi-host run.

  Runs when an argument is given, when ``JAXRANK_COORDINATOR_ADDRESS`` /
  ``JAX_COORDINATOR_ADDRESS`` (with ``*_NUM_PROCESSES`` and ``*_PROCESS_ID``) are set,
  when ``force`` is True (cluster auto-detection: SLURM, Open MPI, Kubernetes, TPU pods),
  or under a SLURM job with several tasks. Returns whether it initialised.
  """
  coordinator_address = coordinator_address or _env(_ENV_COORDINATOR)
  if num_processes is None and _env(_ENV_NUM_PROCESSES):
    num_processes = int(_env(_ENV_NUM_PROCESSES))
  if process_id is None and _env(_ENV_PROCESS_ID):
    process_id = int(_env(_ENV_PROCESS_ID))
  slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if not (explicit or force or slurm):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs: dict[str, Any] = {}
  if coordinator_address is not None:
    kwargs["coordinator_address"] = coordinator_address
  if num_processes is not None:
    kwargs["num_processes"] = num_processes
  if process_id is not None:
    kwargs["process_id"] = process_id
  jax.distributed.initialize(**kwargs)
  log.info(
    "jax.distributed initialised: process %d of %d, %d local / %d global devices",
    jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
  )
  return True


def make_mesh(devices: Any = None) -> Mesh:
  """1-D mesh ``('data',)`` over ``devices`` (default: all devices of all hosts)."""
  devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
  return Mesh(devices, (DATA_AXIS,))


PARAM_SHARDINGS = ("replicated", "fsdp")
#: Arrays with fewer elements stay replicated under 'fsdp'.
FSDP_MIN_SIZE = 1 << 14


def leaf_sharding(x: Any, mesh: Mesh, mode: str = "replicated") -> NamedSharding:
  """Replicated, or for ``mode='fsdp'`` and an array of at least :data:`FSDP_MIN_SIZE`
  elements, split over ``'data'`` along its largest axis divisible by the axis size."""
  if mode not in PARAM_SHARDINGS:
    raise ValueError(f"param sharding must be one of {PARAM_SHARDINGS}, got {mode!r}")
  shape = tuple(getattr(x, "shape", ()))
  n = mesh.shape[DATA_AXIS]
  if mode == "fsdp" and n > 1 and shape and int(np.prod(shape)) >= FSDP_MIN_SIZE:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % n == 0:
        spec = [None] * len(shape)
        spec[dim] = DATA_AXIS
        return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(tree: Any, mesh: Mesh, mode: str = "replicated") -> Any:
  """:func:`leaf_sharding` of every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``)."""
  return jax.tree.map(lambda x: leaf_sharding(x, mesh, mode), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """First axis split over ``'data'``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def per_host_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This host's share of a global batch; checks divisibility by devices and hosts."""
  n_dev = mesh.devices.size
  n_proc = jax.process_count()
  if global_batch_size % n_dev:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the {n_dev} devices"
    )
  if global_batch_size % n_proc:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the {n_proc} processes"
    )
  return global_batch_size // n_proc


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays sharded along ``'data'`` from this host's numpy batch."""
  sharding = data_sharded(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts a pytree of host / single-device arrays on every device (same value on every
  host is assumed)."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """Numpy copies of (possibly multi-host sharded) global arrays, on every host."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def abstract_like(tree: Any, sharding: Any) -> Any:
  """``ShapeDtypeStruct`` tree of ``tree`` with ``sharding``."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

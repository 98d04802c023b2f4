"""Device mesh and multi-host start-up.

The mesh has two named axes, ``("data", "model")``:

* ``data``  - the batch is split over it (data-parallel backbone);
* ``model`` - extra devices for the class-centre matrix.

The class-centre matrix is sharded over *both* axes by default (see
``x2jax.parallel.sharding.DEFAULT_RULES``), so a plain data-parallel mesh
(``model=1``) already spreads W over every device, as insightface's Partial FC
does with one GPU = one batch slice = one block of class centres.

Axis types are ``Auto``: ``jax.make_mesh`` in JAX >= 0.7 defaults to
``Explicit`` axes, under which gathers of class-sharded arrays raise
``ShardingTypeError``; x2jax relies on the partitioner (GSPMD/Shardy) and
``shard_map`` instead.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)

# Environment variables read by ``initialize_distributed`` when an argument is None.
ENV_COORDINATOR = "X2JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "X2JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "X2JAX_PROCESS_ID"

_log = logging.getLogger(__name__)


def make_mesh(
    data: int = -1,
    model: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a ``("data", "model")`` mesh with ``Auto`` axis types.

    Args:
      data: size of the data axis; ``-1`` takes all devices left over by ``model``.
      model: size of the model axis.
      devices: devices to use (default: ``jax.devices()``, all processes).

    Raises:
      ValueError: if the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1:
        raise ValueError(f"make_mesh: model axis size must be >= 1, got model={model}")
    if data == -1:
        if n % model:
            raise ValueError(
                f"make_mesh: {n} devices are not divisible by model={model}")
        data = n // model
    if data < 1 or data * model != n:
        raise ValueError(
            f"make_mesh: data={data} x model={model} = {data * model} does not match "
            f"the {n} available devices")
    return jax.make_mesh(
        (data, model), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices)


def make_mesh_from_config(config: Mapping[str, Any] | Any) -> Mesh:
    """Mesh from a config with optional fields ``data`` (default -1) and ``model`` (1).

    Accepts a dict, an ``ml_collections.ConfigDict`` or any object with those
    attributes (e.g. ``config.mesh`` of the training config).
    """
    get = (config.get if isinstance(config, Mapping) or hasattr(config, "get")
           else lambda k, d: getattr(config, k, d))
    return make_mesh(data=int(get("data", -1)), model=int(get("model", 1)))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = False,
) -> bool:
    """Starts ``jax.distributed`` for multi-host runs; a no-op for one process.

    Each argument that is None is read from ``X2JAX_COORDINATOR_ADDRESS``,
    ``X2JAX_NUM_PROCESSES`` and ``X2JAX_PROCESS_ID``. With nothing set and
    ``auto_detect=False`` this is a single-process run and nothing happens.
    ``auto_detect=True`` calls ``jax.distributed.initialize()`` with the
    missing values left to JAX's cluster detection (TPU pod slices, SLURM,
    Open MPI, ...).

    Must run before anything touches ``jax.devices()``.

    Returns:
      True if ``jax.distributed.initialize`` was called.

    Raises:
      ValueError: for a partial or inconsistent setting (e.g. 2 processes and
        no coordinator address, or a process id out of range).
    """
    if coordinator_address is None:
        coordinator_address = os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])

    nothing_set = coordinator_address is None and num_processes in (None, 1) and process_id in (None, 0)
    if nothing_set and not auto_detect:
        return False
    if not auto_detect:
        missing = [name for name, v in (("coordinator_address", coordinator_address),
                                        ("num_processes", num_processes),
                                        ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(
                f"initialize_distributed: {', '.join(missing)} not given (arguments or "
                f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); pass "
                "auto_detect=True to let JAX detect the cluster")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"initialize_distributed: num_processes={num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"initialize_distributed: process_id={process_id} outside [0, {num_processes})")
    _log.info("jax.distributed.initialize(%s, %s, %s)", coordinator_address, num_processes,
              process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def initialize_distributed_from_config(config: Mapping[str, Any] | Any) -> bool:
    """``initialize_distributed`` from a config with optional fields
    ``coordinator_address``, ``num_processes``, ``process_id``, ``auto_detect``."""
    get = (config.get if isinstance(config, Mapping) or hasattr(config, "get")
           else lambda k, d: getattr(config, k, d))
    return initialize_distributed(
        get("coordinator_address", None), get("num_processes", None),
        get("process_id", None), auto_detect=bool(get("auto_detect", False)))


def mesh_axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """Number of shards along ``axes`` (a name, a tuple of names, or None = 1)."""
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))

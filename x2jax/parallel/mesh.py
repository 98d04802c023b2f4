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

import atexit
import logging
import numbers
import os
import sys
import threading
import time
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


class PeerTimeoutError(RuntimeError):
    """Not every process joined ``jax.distributed`` within the initialization timeout."""


# Progress lines while ``jax.distributed.initialize`` blocks: the first after
# _FIRST_REPORT_S, then every _REPORT_EVERY_S; while the exit waits for the other
# processes: after _EXIT_REPORT_S, then every _EXIT_REPORT_EVERY_S.
_FIRST_REPORT_S = 5.0
_REPORT_EVERY_S = 10.0
_EXIT_REPORT_S = 3.0
_EXIT_REPORT_EVERY_S = 30.0
# JAX (0.10) keeps trying to register for 5 s past ``initialization_timeout``
# before it aborts the process (coordination_service_agent.cc).
_JAX_REGISTER_GRACE_S = 5
_INIT_TIMEOUT_KEY = "--config.distributed.initialization_timeout_s"
_HEARTBEAT_KEY = "--config.distributed.heartbeat_timeout_s"
_exit_report_registered = False


def _say(message: str) -> None:
    """One line on stderr, where JAX's own errors go; stdout is flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    print(f"x2jax: {message}", file=sys.stderr, flush=True)


def _whole_seconds(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"initialize_distributed: {name}={value!r} must be a whole number of seconds >= 1")
    return int(value)


def _describe(coordinator_address: str | None, num_processes: int | None,
              process_id: int | None) -> tuple[str, str, str]:
    """(this process, whom it waits for, where) for messages."""
    me = (f"process {process_id}" if process_id is not None else "this process") + (
        f" of {num_processes}" if num_processes is not None else "")
    others = (f"the other {num_processes - 1} process(es)" if num_processes is not None
              else "the other processes")
    where = coordinator_address or "the auto-detected coordinator"
    return me, others, where


def _timeout_message(me: str, others: str, where: str, num_processes: int | None,
                     timeout_s: int) -> str:
    expected = f"all {num_processes} processes" if num_processes is not None else "all processes"
    return (
        f"{me} timed out waiting for {others} at {where}: not every process joined within "
        f"initialization_timeout_s={timeout_s} s. Start {expected} with the same coordinator "
        f"address within that time, or raise it with {_INIT_TIMEOUT_KEY}=N "
        "(initialize_distributed(initialization_timeout_s=N)).")


def _watch_initialization(done: threading.Event, t0: float, me: str, others: str, where: str,
                          num_processes: int | None, timeout_s: int) -> None:
    """Prints progress until ``done``; at the timeout, the clear message (JAX then aborts)."""
    next_report = _FIRST_REPORT_S
    while True:
        elapsed = time.monotonic() - t0
        wait = min(next_report, timeout_s) - elapsed
        if wait > 0 and done.wait(wait):
            return
        elapsed = time.monotonic() - t0
        if elapsed >= timeout_s:
            break
        _say(f"{me} waiting for {others} at {where} ({elapsed:.0f} s of {timeout_s} s, "
             f"{_INIT_TIMEOUT_KEY})")
        next_report += _REPORT_EVERY_S
    _say(_timeout_message(me, others, where, num_processes, timeout_s)
         + f" JAX ends this process within about {_JAX_REGISTER_GRACE_S} s (unless they join "
         "in that grace) with DEADLINE_EXCEEDED; 'another task died' in its message means "
         "this timeout.")


def _watch_exit(done: threading.Event, me: str, heartbeat_s: int) -> None:
    """Prints, unless ``done`` soon, that the exit waits for the others and what a death looks like."""
    t0 = time.monotonic()
    if done.wait(_EXIT_REPORT_S):
        return
    _say(f"{me} is waiting at exit for the other processes to shut down. If one died, "
         f"JAX ends this process within heartbeat_timeout_s={heartbeat_s} s ({_HEARTBEAT_KEY}) "
         "with 'Task K heartbeat timeout' or 'tasks are unhealthy (stopped sending "
         "heartbeats): K', K being the process id of the one that died.")
    while not done.wait(_EXIT_REPORT_EVERY_S):
        _say(f"{me} still waiting at exit ({time.monotonic() - t0:.0f} s)")


def _report_slow_exit(me: str, heartbeat_s: int) -> None:
    """At exit, before JAX's own shutdown barrier: say why the process may hang there."""
    if not jax.distributed.is_initialized():
        return
    # Daemon thread: it dies with the process, so it never delays a healthy exit.
    threading.Thread(target=_watch_exit, args=(threading.Event(), me, heartbeat_s),
                     name="x2jax-exit-report", daemon=True).start()


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = False,
    initialization_timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
) -> bool:
    """Starts ``jax.distributed`` for multi-host runs; a no-op for one process.

    Each argument that is None is read from ``X2JAX_COORDINATOR_ADDRESS``,
    ``X2JAX_NUM_PROCESSES`` and ``X2JAX_PROCESS_ID``. With nothing set and
    ``auto_detect=False`` this is a single-process run and nothing happens.
    ``auto_detect=True`` calls ``jax.distributed.initialize()`` with the
    missing values left to JAX's cluster detection (TPU pod slices, SLURM,
    Open MPI, ...).

    While it waits for the other processes it prints a progress line on
    stderr (after 5 s, then every 10 s). ``initialization_timeout_s`` bounds
    that wait; ``heartbeat_timeout_s`` is how long a process that died (or
    stopped sending heartbeats) goes unnoticed once running: JAX then ends the
    others. On timeout JAX 0.10 aborts the process itself (after a 5 s grace),
    so the clear message is printed first; a JAX that raises instead gets
    ``PeerTimeoutError``. See docs/parallel.md, "When a process is missing".

    Must run before anything touches ``jax.devices()``.

    Returns:
      True if ``jax.distributed.initialize`` was called.

    Raises:
      ValueError: for a partial or inconsistent setting (e.g. 2 processes and
        no coordinator address, a process id out of range, a timeout < 1 s).
      PeerTimeoutError: JAX raised DEADLINE_EXCEEDED while waiting for peers.
    """
    initialization_timeout_s = _whole_seconds("initialization_timeout_s",
                                              initialization_timeout_s)
    heartbeat_timeout_s = _whole_seconds("heartbeat_timeout_s", heartbeat_timeout_s)
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
    _log.info("jax.distributed.initialize(%s, %s, %s, initialization_timeout=%d, "
              "heartbeat_timeout_seconds=%d)", coordinator_address, num_processes, process_id,
              initialization_timeout_s, heartbeat_timeout_s)
    me, others, where = _describe(coordinator_address, num_processes, process_id)
    done = threading.Event()
    t0 = time.monotonic()
    watchdog = threading.Thread(
        target=_watch_initialization, name="x2jax-init-watchdog", daemon=True,
        args=(done, t0, me, others, where, num_processes, initialization_timeout_s))
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=initialization_timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    except Exception as e:
        if "DEADLINE_EXCEEDED" in str(e) or "Deadline Exceeded" in str(e):
            raise PeerTimeoutError(_timeout_message(
                me, others, where, num_processes, initialization_timeout_s)) from e
        raise
    finally:
        done.set()
        watchdog.join()
    elapsed = time.monotonic() - t0
    if elapsed >= _FIRST_REPORT_S:
        late = (f" (past initialization_timeout_s={initialization_timeout_s} s, in JAX's grace)"
                if elapsed >= initialization_timeout_s else "")
        _say(f"{me}: all processes joined at {where} after {elapsed:.0f} s{late}")
    global _exit_report_registered
    if jax.distributed.is_initialized() and not _exit_report_registered:
        # Registered after JAX's own atexit hook, so it runs before JAX's shutdown barrier.
        atexit.register(_report_slow_exit, me, heartbeat_timeout_s)
        _exit_report_registered = True
    return True


def initialize_distributed_from_config(config: Mapping[str, Any] | Any) -> bool:
    """``initialize_distributed`` from a config (``config.distributed`` of train.py's).

    Optional fields ``coordinator_address`` ("" = unset), ``num_processes``
    (0 = unset), ``process_id`` (-1 = unset), ``auto_detect``,
    ``initialization_timeout_s`` (300) and ``heartbeat_timeout_s`` (100); unset
    values fall back to the environment variables, as with None.
    """
    get = (config.get if isinstance(config, Mapping) or hasattr(config, "get")
           else lambda k, d: getattr(config, k, d))
    process_id = get("process_id", None)
    return initialize_distributed(
        get("coordinator_address", None) or None, get("num_processes", None) or None,
        None if process_id is None or process_id < 0 else process_id,
        auto_detect=bool(get("auto_detect", False)),
        initialization_timeout_s=get("initialization_timeout_s", 300),
        heartbeat_timeout_s=get("heartbeat_timeout_s", 100))


def mesh_axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """Number of shards along ``axes`` (a name, a tuple of names, or None = 1)."""
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))

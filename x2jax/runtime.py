"""XLA:CPU flags that x2jax's entry points set before JAX starts its backend.

:func:`use_fast_cpu_flags` appends two flags to ``XLA_FLAGS`` (each unless the
user set that flag already):

* :data:`CPU_CONV_FLAG`. On XLA:CPU (jaxlib 0.10) convolutions are handed to
  YNNPACK by default, whose convolution weight gradients are slow on IResNet's
  shapes at 56 and 112 px; XLA's own (Eigen) kernels are faster per layer and
  on whole training steps (``python benchmarks/conv_grads.py`` and
  ``benchmarks/backbone_step.py``, each with and without ``--ynn-convs``;
  figures in docs/benchmarks.md). The flag removes
  convolutions from the YNNPACK fusion list and keeps YNNPACK for everything
  else (elementwise and reduction fusions, where it is the faster one)::

      --xla_cpu_experimental_ynn_fusion_type=-individual_convolution

* :data:`CPU_SCHEDULER_FLAG`. XLA:CPU's default schedule orders a program so that
  independent operations can run concurrently, at the cost of more live
  memory. A training step's temporaries are one buffer, freshly allocated (and
  page-faulted in) on every execution, and the convolutions of
  ``conv_impl="onednn"`` use every core one after the other anyway; the
  memory-minimising schedule shrinks that buffer and the page faults with it
  (``benchmarks/backbone_step.py --xla-scheduler``, docs/benchmarks.md)::

      --xla_cpu_enable_concurrency_optimized_scheduler=false

``train.py``, ``eval.py``, the benchmarks and the test suite call it first
thing. Library users who build models in their own script call it before their
first JAX computation (XLA reads ``XLA_FLAGS`` once, when the backend starts);
they are CPU flags: GPU and TPU backends ignore them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
CPU_FLAGS = (CPU_CONV_FLAG, CPU_SCHEDULER_FLAG)

__all__ = ["CPU_CONV_FLAG", "CPU_FLAGS", "CPU_SCHEDULER_FLAG", "use_fast_cpu_flags"]


def use_fast_cpu_flags(environ: MutableMapping[str, str] | None = None,
                       flags: tuple[str, ...] = CPU_FLAGS) -> bool:
    """Append each of ``flags`` to ``XLA_FLAGS`` unless that flag is already set.

    Returns True when all of them are in ``XLA_FLAGS`` afterwards and set in
    time (a user's own value of one of these flags is kept as it is, and False
    returned). Warns, and changes nothing, when JAX's backend has already
    started: the flags would have no effect.
    """
    env = os.environ if environ is None else environ
    current = env.get("XLA_FLAGS", "")
    missing = [f for f in flags if f.split("=")[0] not in current]
    if missing and environ is None and _backend_started():
        warnings.warn("x2jax.runtime.use_fast_cpu_flags: JAX's backend has already "
                      "started, XLA_FLAGS is read once at start; call it before the first "
                      "JAX computation", RuntimeWarning, stacklevel=2)
        return False
    if missing:
        env["XLA_FLAGS"] = " ".join([current, *missing]).strip()
    return all(f in env["XLA_FLAGS"].split() for f in flags)


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # jax not installed or moved: nothing has started
        return False
    return bool(xla_bridge.backends_are_initialized())

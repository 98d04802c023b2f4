"""XLA runtime flags that x2jax's entry points set before JAX starts its backend.

On XLA:CPU (jaxlib 0.10) convolutions are handed to YNNPACK by default. On the
IResNet shapes at 56 and 112 px YNNPACK's convolution weight gradient runs at 4-54
GFLOP/s; XLA's own (Eigen) kernels are up to 3.6x faster per layer and 1.26-1.35x
on whole IResNet-18/50 training steps (``python benchmarks/conv_grads.py`` and
``benchmarks/backbone_step.py``, each with and without ``--ynn-convs``;
docs/benchmarks.md). :func:`use_fast_cpu_convolutions` removes convolutions from
the YNNPACK fusion list and keeps YNNPACK for everything else (elementwise and
reduction fusions, where it is the faster one)::

    XLA_FLAGS += --xla_cpu_experimental_ynn_fusion_type=-individual_convolution

``train.py``, ``eval.py``, the benchmarks and the test suite call it first
thing. Library users who build models in their own script call it before their
first JAX computation (XLA reads ``XLA_FLAGS`` once, when the backend starts);
it is a CPU flag: GPU and TPU backends ignore it.
"""

from __future__ import annotations

import os
import warnings
from typing import MutableMapping

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_FLAG_NAME = "--xla_cpu_experimental_ynn_fusion_type"

__all__ = ["CPU_CONV_FLAG", "use_fast_cpu_convolutions"]


def use_fast_cpu_convolutions(environ: MutableMapping[str, str] | None = None) -> bool:
    """Append :data:`CPU_CONV_FLAG` to ``XLA_FLAGS`` unless the flag is already set.

    Returns True when the flag is in ``XLA_FLAGS`` afterwards and set in time
    (the user's own ``--xla_cpu_experimental_ynn_fusion_type=...`` is kept as
    it is, and False returned). Warns, and changes nothing, when JAX's backend
    has already started: the flag would have no effect.
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if _FLAG_NAME in flags:
        return CPU_CONV_FLAG in flags.split()
    if environ is None and _backend_started():
        warnings.warn("x2jax.runtime.use_fast_cpu_convolutions: JAX's backend has already "
                      "started, XLA_FLAGS is read once at start; call it before the first "
                      "JAX computation", RuntimeWarning, stacklevel=2)
        return False
    env["XLA_FLAGS"] = f"{flags} {CPU_CONV_FLAG}".strip()
    return True


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # jax not installed or moved: nothing has started
        return False
    return bool(xla_bridge.backends_are_initialized())

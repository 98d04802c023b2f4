"""Deployment export of the embedding function with ``jax.export`` (StableHLO).

The exported function is the model contract: float32 images (B, S, S, 3)
normalised as ``(x / 255 - 0.5) / 0.5`` -> float32 embeddings (B, E), not
flip-summed, not normalised. The batch dimension is symbolic (any B works).

* ``bake_variables=True`` (default): the weights are constants inside the
  serialised module; the file alone is the model: ``fn(images)``.
* ``bake_variables=False``: the weights are the first argument,
  ``fn(variables, images)``, so one small file serves any weights of that
  architecture (e.g. those read by :func:`x2jax.models.load_model`).

The file is ``Exported.serialize()`` as is; it can be called from any JAX of the
same or a newer version (StableHLO compatibility window, about 6 months) on
the platforms it was lowered for (``platforms``, default: the current backend).
ONNX files for insightface's inference come from :mod:`x2jax.evaluation.onnx_export`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import export as jax_export

from x2jax.evaluation.loading import model_spec
from x2jax.models.spec import ModelSpec


def export_embedding(
    spec: Any,
    variables: Any,
    *,
    bake_variables: bool = True,
    platforms: Sequence[str] | None = None,
) -> jax_export.Exported:
    """Lower the embedding of ``spec`` for images (b, S, S, 3) float32, b symbolic.

    The module is ``spec.replace(conv_impl="xla").build()``: the conv implementation
    is a runtime choice (same parameters, same function) and the others may be
    custom calls ("onednn", or "auto" where it picks onednn) that ``jax.export``
    cannot serialise.

    Args:
      spec: a :class:`~x2jax.models.spec.ModelSpec`, or a
        :func:`~x2jax.evaluation.loading.load_for_eval` ``info`` dict to build one from.
      variables: the backbone's ``{'params', 'batch_stats'}``.
      bake_variables: weights as constants (``fn(images)``) or as the first argument
        (``fn(variables, images)``).
      platforms: to lower for (default: the current backend).

    Returns:
      The ``jax.export.Exported`` function.
    """
    if not isinstance(spec, ModelSpec):
        spec = model_spec(spec)
    module = spec.replace(conv_impl="xla").build()
    apply_fn = functools.partial(module.apply, train=False)
    (batch,) = jax_export.symbolic_shape("b")
    images = jax.ShapeDtypeStruct((batch, spec.image_size, spec.image_size, 3), jnp.float32)
    if bake_variables:
        fn = jax.jit(lambda x: apply_fn(variables, x))
        args = (images,)
    else:
        fn = jax.jit(apply_fn)
        args = (jax.tree.map(lambda v: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)), variables), images)
    return jax_export.export(fn, platforms=platforms)(*args)


def save_exported(path: str | os.PathLike, exported: jax_export.Exported) -> str:
    """Write the serialised function to ``path`` (parent directories created)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    return path


def load_exported(path: str | os.PathLike) -> jax_export.Exported:
    """Read a file written by :func:`save_exported`; call it with ``.call(...)``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported model not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return jax_export.deserialize(bytearray(data))
    except Exception as e:  # flatbuffer errors are cryptic: say which file
        raise ValueError(f"{path} is not a jax.export serialisation ({type(e).__name__}: {e})") from e

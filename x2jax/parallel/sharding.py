"""Logical axis names -> mesh axes, in one place, and shardings for pytrees.

Logical axes used by x2jax:

=========  =====================  ==============================================
logical    default mesh axes      what
=========  =====================  ==============================================
batch      ``("data",)``          leading dim of images, labels, embeddings
classes    ``("data", "model")``  rows of the class-centre matrix W (C, D)
embed      ``None`` (replicated)  embedding dim D
fsdp       ``("data",)``          backbone params with ``strategy="fsdp"``
=========  =====================  ==============================================

``classes`` spans both axes, so W is split over every device of the mesh
(a ``model=1`` mesh is the Partial FC layout: one batch slice and one block of
class centres per device). Backbone params are replicated by default, or
FSDP-sharded big_vision style (the largest dimension divisible by the fsdp axis
size is split; small arrays stay replicated). Optimizer states follow their
params (derived by tree structure with ``optax.tree_map_params``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from x2jax.parallel.mesh import DATA_AXIS, MESH_AXES, MODEL_AXIS, mesh_axis_size

MeshAxes = tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axes (None = replicated). The one table of rules.

    Each field takes a tuple of mesh axis names, one name, a comma-separated
    string (``"data,model"``, as ``config.mesh.rules`` spells them) or
    None / ``""`` / ``()`` for replicated; it is stored as a tuple or None.

    Raises:
      ValueError: an axis that is not one of the mesh's ("data", "model").
    """

    batch: MeshAxes = (DATA_AXIS,)
    classes: MeshAxes = (DATA_AXIS, MODEL_AXIS)
    embed: MeshAxes = None
    fsdp: MeshAxes = (DATA_AXIS,)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str):
                value = tuple(a.strip() for a in value.split(",") if a.strip())
            value = tuple(value) if value else None
            unknown = [a for a in value or () if a not in MESH_AXES]
            if unknown:
                raise ValueError(f"sharding rule {field.name}: unknown mesh axes {unknown}; the mesh has {MESH_AXES}")
            object.__setattr__(self, field.name, value)

    @classmethod
    def from_config(cls, rules: Any) -> "ShardingRules":
        """From ``config.mesh.rules`` (a mapping of the logical names to axis strings)."""
        return cls(**{field.name: rules[field.name] for field in dataclasses.fields(cls)})

    def spec(self, *logical: str | None) -> P:
        """PartitionSpec for an array whose dims carry these logical names."""
        out = []
        for name in logical:
            if name is None:
                out.append(None)
                continue
            if not hasattr(self, name):
                raise ValueError(f"ShardingRules.spec: unknown logical axis {name!r}")
            out.append(getattr(self, name))
        return P(*out)


DEFAULT_RULES = ShardingRules()


def logical_sharding(mesh: Mesh, *logical: str | None,
                     rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """``NamedSharding`` for an array with the given logical dims."""
    return NamedSharding(mesh, rules.spec(*logical))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dim split over the batch axes, the rest replicated."""
    return NamedSharding(mesh, P(rules.batch))


def class_centers_sharding(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """W (C, D): ``P(classes, None)``."""
    return logical_sharding(mesh, "classes", "embed", rules=rules)


def num_class_shards(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> int:
    return mesh_axis_size(mesh, rules.classes)


def fsdp_spec(shape: Sequence[int], axis_size: int, axes: MeshAxes,
              min_size: int = 2**14) -> P:
    """big_vision-style FSDP: split the largest dim divisible by ``axis_size``.

    Arrays with fewer than ``min_size`` elements, or no divisible dim, stay
    replicated (``P()``).
    """
    if axes is None or axis_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % axis_size == 0:
            spec = [None] * len(shape)
            spec[i] = axes
            return P(*spec)
    return P()


def param_shardings(
    params: Any,
    mesh: Mesh,
    *,
    strategy: Literal["replicate", "fsdp"] = "replicate",
    rules: ShardingRules = DEFAULT_RULES,
    min_fsdp_size: int = 2**14,
) -> Any:
    """NamedShardings for a backbone param pytree (arrays or ShapeDtypeStructs)."""
    if strategy == "replicate":
        return jax.tree.map(lambda _: replicated(mesh), params)
    if strategy == "fsdp":
        size = mesh_axis_size(mesh, rules.fsdp)
        return jax.tree.map(
            lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size, rules.fsdp,
                                                    min_fsdp_size)), params)
    raise ValueError(f"param_shardings: strategy must be 'replicate' or 'fsdp', got {strategy!r}")


def opt_state_shardings(
    tx: optax.GradientTransformation | Callable[[Any], Any],
    opt_state: Any,
    params_shardings: Any,
    mesh: Mesh,
) -> Any:
    """Shardings of an optax state: every params-shaped subtree (momentum,
    Adam moments, ...) takes the params' shardings; other leaves (step
    counts) are replicated. ``opt_state`` may be abstract (``jax.eval_shape``).
    Groups of ``optax.partition`` keep their ``MaskedNode`` placeholders."""
    rep = replicated(mesh)
    return optax.tree_map_params(
        tx, lambda v, s: v if isinstance(v, optax.MaskedNode) else s,
        opt_state, params_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))


def host_local_to_global(batch: Any, mesh: Mesh,
                         rules: ShardingRules = DEFAULT_RULES) -> Any:
    """Per-process numpy batch -> global ``jax.Array``s split on the batch axes.

    Each process passes its own slice (leading dim = global batch / process
    count); the global batch is the concatenation in process order.
    """
    sharding = batch_sharding(mesh, rules)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

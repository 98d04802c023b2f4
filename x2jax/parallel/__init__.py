"""Data-parallel backbone, class-sharded head (Partial FC), multi-host helpers.

See docs/parallel.md.
"""
from x2jax.parallel.head import (
    HeadAux,
    SampledRows,
    gather_rows,
    init_class_centers,
    num_sampled_per_shard,
    pad_num_classes,
    select_rows,
    sharded_margin_loss,
    update_rows,
)
from x2jax.parallel.mesh import (
    DATA_AXIS,
    MESH_AXES,
    MODEL_AXIS,
    PeerTimeoutError,
    initialize_distributed,
    initialize_distributed_from_config,
    make_mesh,
    mesh_axis_size,
)
from x2jax.parallel.optim import masked_row_updates, row_sparse_sgd
from x2jax.parallel.sharding import (
    DEFAULT_RULES,
    ShardingRules,
    batch_sharding,
    class_centers_sharding,
    fsdp_spec,
    host_local_to_global,
    logical_sharding,
    num_class_shards,
    opt_state_shardings,
    param_shardings,
    replicated,
)

__all__ = [
    "DATA_AXIS",
    "DEFAULT_RULES",
    "MESH_AXES",
    "MODEL_AXIS",
    "HeadAux",
    "PeerTimeoutError",
    "SampledRows",
    "ShardingRules",
    "batch_sharding",
    "class_centers_sharding",
    "fsdp_spec",
    "gather_rows",
    "host_local_to_global",
    "init_class_centers",
    "initialize_distributed",
    "initialize_distributed_from_config",
    "logical_sharding",
    "make_mesh",
    "masked_row_updates",
    "mesh_axis_size",
    "num_class_shards",
    "num_sampled_per_shard",
    "opt_state_shardings",
    "pad_num_classes",
    "param_shardings",
    "replicated",
    "row_sparse_sgd",
    "select_rows",
    "sharded_margin_loss",
    "update_rows",
]

"""Everything a training run needs, built before its first step: ``build_run(config, workdir) -> Run``.

mesh -> data (training source, verification sets) -> model -> schedule and
optimizer -> state factory (shardings, abstract state) -> jitted step ->
checkpointer. :func:`build_step` is the model-to-step part alone, for callers
that have no data (compiling ahead for another platform).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from x2jax.data import pipeline
from x2jax.models.spec import ModelSpec
from x2jax.parallel.mesh import make_mesh, mesh_axis_size
from x2jax.parallel.sharding import ShardingRules
from x2jax.train import config as config_lib
from x2jax.train import inputs
from x2jax.train.checkpointing import Checkpointer
from x2jax.train.optimizer import make_optimizer, make_schedule
from x2jax.train.state import make_state_factory
from x2jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class Step:
    """The model, optimizer and jitted train step of a config on a mesh (no data read)."""

    spec: ModelSpec  # what rebuilds the backbone (its to_json() is stored in checkpoints)
    model: Any
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    create_state: Callable[[jax.Array], Any]  # rng -> TrainState, born sharded
    shardings: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings (restore target, AOT compile input)
    train_step: Callable  # jit(step, in_shardings, out_shardings, donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class Run:
    """A built training run: what :func:`x2jax.train.loop.train_loop` runs."""

    config: ml_collections.ConfigDict
    workdir: Path
    mesh: Mesh
    rules: ShardingRules
    train_data: inputs.TrainData
    num_classes: int
    image_size: int
    total_steps: int
    eval_sets: dict[str, tuple[Any, Any]]
    step: Step
    checkpointer: Checkpointer
    meta: dict[str, Any]  # saved with every checkpoint

    @property
    def per_process_batch(self) -> int:
        return self.config.data.batch_size // jax.process_count()


def make_run_mesh(config: ml_collections.ConfigDict, rules: ShardingRules,
                  devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``("data", "model")`` mesh of ``config.mesh``, checked against the batch.

    ``devices`` (default ``jax.devices()``, every process's) may be another platform's,
    e.g. the compile-only devices of a TPU topology (:mod:`x2jax.tpu`); their
    ``process_index`` values are the processes the batch is checked against.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = config.mesh.num_devices
    if n > len(devices):
        raise config_lib.ConfigError(f"mesh.num_devices={n} but only {len(devices)} device(s) "
                                     f"are available ({devices[0].platform})")
    mesh = make_mesh(data=config.mesh.data, model=config.mesh.model, devices=devices[:n] if n > 0 else devices)
    config_lib.validate_for_devices(config, batch_shards=mesh_axis_size(mesh, rules.batch),
                                    process_count=len({d.process_index for d in devices}))
    return mesh


def build_step(config: ml_collections.ConfigDict, mesh: Mesh, rules: ShardingRules, *, num_classes: int,
               image_size: int, total_steps: int, platform: str | None = None) -> Step:
    """Model, schedule, optimizer, state factory and jitted step of ``config`` on ``mesh``.

    ``platform`` ("cpu", "gpu", "tpu"; default: this process's backend) is the one the
    step is compiled for: pass "tpu" to compile ahead of time for a TPU topology.
    """
    spec = ModelSpec.from_config(config, image_size)
    # conv_impl "auto" resolved for the target platform and the mesh's devices; batch_norm="local"
    # takes BatchNorm statistics per batch shard of the mesh
    try:
        model = spec.build(platform=platform, num_devices=mesh.size, batch_shards=mesh_axis_size(mesh, rules.batch))
    except ValueError as e:  # e.g. an image size the architecture cannot take
        raise config_lib.ConfigError(f"model {spec.arch!r}: {e}") from None
    schedule = make_schedule(config.schedule, total_steps, num_epochs=float(config.num_epochs))
    sparse = config_lib.row_sparse_head(config)  # Partial FC with SGD: only sampled rows of W are touched
    tx = make_optimizer(config.optimizer, schedule, row_sparse_head=sparse)
    float16 = config.model.dtype == "float16"
    create_state, shardings, abstract_state = make_state_factory(
        model=model, tx=tx, mesh=mesh, num_classes=num_classes, loss_name=config.loss.name,
        float16=float16, param_strategy=config.mesh.param_sharding, rules=rules,
        head_dtype=config.loss.head_store_dtype,
    )
    train_step = make_train_step(
        model=model, tx=tx, schedule=schedule, mesh=mesh, shardings=shardings, num_classes=num_classes,
        loss_name=config.loss.name, loss_params=dict(config.loss.params), sample_rate=config.loss.sample_rate,
        float16=float16, rules=rules, row_sparse_head=sparse,
    )
    return Step(spec, model, schedule, tx, create_state, shardings, abstract_state, train_step)


def build_run(config: ml_collections.ConfigDict, workdir: str | Path, *, say: Callable[[str], None] = print) -> Run:
    """Mesh, data, model, optimizer, state factory, step and checkpointer of a validated config."""
    workdir = Path(workdir)
    rules = ShardingRules.from_config(config.mesh.rules)
    mesh = make_run_mesh(config, rules)
    say(f"devices: {jax.device_count()} x {jax.devices()[0].platform} in {jax.process_count()} process(es); "
        f"mesh {dict(mesh.shape)}")

    train_data = inputs.open_train_data(config.data, seed=config.seed)
    num_classes, image_size = train_data.num_classes, train_data.image_size
    steps_per_epoch = max(pipeline.steps_per_epoch(train_data.source, batch_size=config.data.batch_size
                                                   // jax.process_count(), shard_count=jax.process_count()), 1)
    total_steps = int(config.num_steps) if config.num_steps > 0 else int(math.ceil(config.num_epochs * steps_per_epoch))
    eval_sets = inputs.open_verification_sets(
        [s.strip() for s in config.eval.sets.split(",") if s.strip()],
        data_dir=config.eval.data_dir,
        data_config=config.data,
        image_size=image_size,
    )
    say(f"data: {config.data.name} ({len(train_data.source)} images, {num_classes} identities, "
        f"{image_size}x{image_size}); {total_steps} steps of {config.data.batch_size}; "
        f"eval sets: {', '.join(eval_sets) or 'none'}")

    step = build_step(config, mesh, rules, num_classes=num_classes, image_size=image_size, total_steps=total_steps)
    checkpointer = Checkpointer(workdir / "checkpoints", every_steps=config.checkpoint.every_steps,
                                keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    meta = {
        "config": json.loads(config.to_json()),
        "model": step.spec.to_json(),
        "num_classes": num_classes,
        "mesh": dict(mesh.shape),
        "process_count": jax.process_count(),
    }
    return Run(config, workdir, mesh, rules, train_data, num_classes, image_size, total_steps, eval_sets, step,
               checkpointer, meta)

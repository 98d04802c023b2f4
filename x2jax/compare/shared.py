"""What the runs of a comparison share, built once: data, mesh, verification sets, run length.

:func:`build_shared` is ``build_run`` of the first run (x2jax/train/setup.py), with
the training data's order set to the comparison's data seed; :func:`run_for`
turns it into any run's :class:`~x2jax.train.setup.Run` (its own config, step,
checkpointer and meta) without opening the data again.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax
from jax.sharding import Mesh

from x2jax import losses
from x2jax.compare.runs import Comparison, RunPlan
from x2jax.parallel.sharding import ShardingRules
from x2jax.train.checkpointing import Checkpointer
from x2jax.train.setup import Run, Step, build_run, build_step


def build_shared(comparison: Comparison, *, say: Callable[[str], None] = print) -> Run:
    """``build_run`` of the first run, its data iterated in the data seed's order."""
    first = comparison.runs[0]
    run = build_run(first.config, first.workdir, say=say)
    run.checkpointer.close()  # each run gets its own (run_for)
    return dataclasses.replace(run, train_data=dataclasses.replace(run.train_data, seed=comparison.data_seed))


def run_meta(shared: Run, plan: RunPlan, comparison: Comparison, step: Step, mesh: Mesh) -> dict:
    """The checkpoint meta train.py writes (config, model, classes, mesh), plus the comparison's data seed."""
    return dict(shared.meta, config=json.loads(plan.config.to_json()), model=step.spec.to_json(),
                mesh=dict(mesh.shape), compare={"data_seed": comparison.data_seed, "loss_label": plan.loss.label})


def abstract_state_for(step: Step, loss_name: str) -> Any:
    """``step.abstract_state`` with the loss state of ``loss_name`` (what that run's checkpoints hold)."""
    loss_state = jax.eval_shape(losses.spec(loss_name).init_state)
    rep = step.shardings.rng  # replicated
    return step.abstract_state.replace(loss_state=jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), loss_state))


def make_checkpointer(plan: RunPlan) -> Checkpointer:
    """The run's Orbax checkpointer, as ``build_run`` makes it."""
    c = plan.config.checkpoint
    return Checkpointer(plan.workdir / "checkpoints", every_steps=c.every_steps, keep=c.keep, async_save=c.async_save)


def run_for(shared: Run, plan: RunPlan, comparison: Comparison) -> Run:
    """The run of ``plan`` on the shared data and mesh (train.py's ``Run``, ready for ``train_loop``)."""
    rules: ShardingRules = shared.rules
    step = build_step(plan.config, shared.mesh, rules, num_classes=shared.num_classes,
                      image_size=shared.image_size, total_steps=shared.total_steps)
    return dataclasses.replace(shared, config=plan.config, workdir=plan.workdir, step=step,
                               checkpointer=make_checkpointer(plan),
                               meta=run_meta(shared, plan, comparison, step, shared.mesh))

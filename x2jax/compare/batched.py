"""K runs in one jitted step: ``jax.vmap`` of train.py's step over stacked train states.

Each run keeps its own params, BN statistics, optimizer state, rng, step and
loss state: the leaves of K :class:`~x2jax.train.state.TrainState` stacked on a
leading run axis. The step is :func:`x2jax.train.step.make_step_fn`, the
function train.py jits, vmapped with ``in_axes=(0, None, 0)``: every run sees
the same batch (it is not vmapped), and a per-run ``run`` argument carries

- ``loss_index``: which loss branch the run takes (``jax.lax.switch`` on a
  vmapped index, so every branch is computed and selected per run);
- ``loss_params``: the run's loss parameters as float32 arrays (one dict per
  branch), so runs that differ only in a numeric parameter share a branch.
  A loss whose margin function does not trace its numeric parameters (a
  Python ``if`` on them: CosFace's ``m3 == 0`` test, SphereFace's integer
  margin, X2-Softmax's exact gradient) keeps them static: each value is then a
  branch of its own.

With several losses the state's ``loss_state`` is a tuple with every branch's
state (a run advances only its own). The run axis is the ``"runs"`` axis of a
``("runs", "data", "model")`` mesh whose data and model axes have size 1, so
the head's ``shard_map`` sees the run axis through ``vmap(spmd_axis_name=...)``
and a device holds whole runs. Batched runs need the same settings and shapes
(all but seed and loss), ``loss.sample_rate == 1``, one process, and a run
count that is a multiple of the devices.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from x2jax import losses
from x2jax.compare.runs import RunPlan
from x2jax.parallel.mesh import DATA_AXIS, MODEL_AXIS
from x2jax.train import config as config_lib
from x2jax.train.state import TrainState
from x2jax.train.step import LossBranch, StepFn

RUN_AXIS = "runs"
# what batched runs may differ in
PER_RUN_KEYS = ("seed", "loss")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How K runs map onto loss branches.

    branches: the distinct (loss, static params) of the runs.
    branch_of_run: (K,) the branch of each run.
    run_args: ``{"loss_index": int32 (K,), "loss_params": tuple (per branch) of
      {name: float32 (K,)}}``, numpy; what the vmapped step gets per run.
    """

    branches: tuple[LossBranch, ...]
    branch_of_run: tuple[int, ...]
    run_args: dict[str, Any]

    @property
    def multi(self) -> bool:
        return len(self.branches) > 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def traceable_params(name: str, params: dict[str, Any]) -> tuple[str, ...]:
    """The numeric params of loss ``name`` that can be traced arrays (all of them or none).

    Traces the margin function and its gradient with every numeric param an
    abstract float32 scalar (``jax.eval_shape``): a Python ``if`` or ``float()``
    on one fails there, and then they all stay static.
    """
    numeric = tuple(sorted(k for k, v in params.items() if _is_number(v)))
    if not numeric:
        return ()
    spec = losses.spec(name)
    static = {k: v for k, v in params.items() if k not in numeric}
    extra: dict[str, Any] = dict(spec.init_state())
    if spec.needs_norms:
        extra["norms"] = jnp.ones((2,), jnp.float32)
    if spec.needs_rng:
        extra["rng"] = jax.random.PRNGKey(0)

    def total(cosine, traced):
        return jnp.sum(spec.fn(cosine, jnp.array([0, 1], jnp.int32), **static, **traced, **extra))

    abstract = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in numeric}
    try:
        jax.eval_shape(jax.grad(total), jax.ShapeDtypeStruct((2, 3), jnp.float32), abstract)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
            jax.errors.TracerIntegerConversionError, TypeError, ValueError):
        return ()
    return numeric


def _settings(config) -> dict[str, Any]:
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(json.loads(config.to_json()), "")
    return {k: v for k, v in flat.items() if k.split(".")[0] not in PER_RUN_KEYS}


def check_batchable(plans: Sequence[RunPlan], *, num_devices: int, process_count: int) -> None:
    """Raises ``ConfigError`` unless the runs can share one batched step (before any work).

    Args:
      plans: the runs.
      num_devices: devices the run axis is split over.
      process_count: processes of this job.

    Raises:
      config_lib.ConfigError: naming what stops it: settings or shapes that
        differ (all but seed and loss must agree), ``loss.sample_rate < 1``,
        several processes, ``model.batch_norm='local'``, or a run count that is
        not a multiple of ``num_devices``.
    """
    if not plans:
        raise config_lib.ConfigError("batched mode: no runs")
    first = _settings(plans[0].config)
    for plan in plans[1:]:
        other = _settings(plan.config)
        diffs = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diffs:
            shown = "; ".join(f"{k}: {first.get(k)!r} vs {other.get(k)!r}" for k in diffs[:5])
            raise config_lib.ConfigError(
                f"batched mode: runs {plans[0].name!r} and {plan.name!r} differ in {shown}: batched runs share one "
                "step, so they need the same shapes and settings (all but seed and loss); use --sequential")
    config = plans[0].config
    if config.loss.sample_rate < 1.0:
        raise config_lib.ConfigError(f"batched mode needs loss.sample_rate=1 (got {config.loss.sample_rate}); "
                                     "use --sequential for Partial FC")
    if config.model.get("batch_norm", "global") == "local":
        raise config_lib.ConfigError("batched mode takes BatchNorm statistics over each run's whole batch; "
                                     "model.batch_norm='local' needs --sequential")
    if process_count > 1:
        raise config_lib.ConfigError(f"batched mode runs in one process (this job has {process_count}); "
                                     "use --sequential")
    if len(plans) % num_devices:
        raise config_lib.ConfigError(
            f"batched mode splits the {len(plans)} runs over the {num_devices} devices: the run count must be a "
            f"multiple of the device count; set --config.mesh.num_devices to a divisor of {len(plans)} or use "
            "--sequential")


def plan_batch(plans: Sequence[RunPlan]) -> BatchPlan:
    """Branches and per-run arguments of a batch.

    Args:
      plans: the runs, in batch order.

    Returns:
      The :class:`BatchPlan`: one branch per distinct (loss, static params), the
      traced params of each run as float32 arrays.
    """
    keys: list[tuple[str, tuple]] = []
    branches: list[LossBranch] = []
    traced_of_branch: list[tuple[str, ...]] = []
    branch_of_run, traced_of_run = [], []
    for plan in plans:
        name, params = plan.loss.name, plan.config.loss.params.to_dict()
        traced = traceable_params(name, params)
        static = {k: v for k, v in params.items() if k not in traced}
        key = (name, tuple(sorted((k, json.dumps(v)) for k, v in static.items())), traced)
        if key not in keys:
            keys.append(key)
            branches.append(LossBranch(name, static))
            traced_of_branch.append(traced)
        branch_of_run.append(keys.index(key))
        traced_of_run.append({k: float(params[k]) for k in traced})
    # every run carries every branch's params (a branch reads only its own runs' values)
    loss_params = []
    for b, names in enumerate(traced_of_branch):
        filler = traced_of_run[branch_of_run.index(b)]
        loss_params.append({k: np.array([(traced_of_run[i] if branch_of_run[i] == b else filler)[k]
                                         for i in range(len(plans))], np.float32) for k in names})
    run_args = {"loss_index": np.array(branch_of_run, np.int32), "loss_params": tuple(loss_params)}
    return BatchPlan(tuple(branches), tuple(branch_of_run), run_args)


def run_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """The ``("runs", "data", "model")`` mesh: runs split over ``devices``, data and model of size 1."""
    return Mesh(np.array(list(devices)).reshape(len(devices), 1, 1), (RUN_AXIS, DATA_AXIS, MODEL_AXIS))


def make_batched_step(step_fn: StepFn, mesh: Mesh):
    """``jit(vmap(step_fn))``: ``(states, batch, run_args) -> (states, metrics (K,) each)``, states donated.

    Args:
      step_fn: :func:`x2jax.train.step.make_step_fn` of the batch's branches on ``mesh``.
      mesh: the :func:`run_mesh`; every leaf of states, run args and metrics is split
        on its leading (run) axis, the batch is replicated.
    """
    def batched(states: TrainState, batch: dict[str, jax.Array], run_args: dict[str, Any]):
        return jax.vmap(step_fn, in_axes=(0, None, 0), spmd_axis_name=RUN_AXIS)(states, batch, run_args)

    runs, rep = NamedSharding(mesh, P(RUN_AXIS)), NamedSharding(mesh, P())
    return jax.jit(batched, in_shardings=(runs, rep, runs), out_shardings=(runs, runs), donate_argnums=0)


def stack_states(states: Sequence[TrainState], plan: BatchPlan, mesh: Mesh) -> TrainState:
    """K per-run states (train.py's layout) -> one state with a leading run axis, split over the runs.

    With several branches each run's ``loss_state`` becomes the tuple of every
    branch's state, its own in its branch's slot.
    """
    if plan.multi:
        states = [s.replace(loss_state=tuple(
            s.loss_state if b == plan.branch_of_run[i] else losses.spec(branch.name).init_state()
            for b, branch in enumerate(plan.branches))) for i, s in enumerate(states)]
    host = [jax.device_get(s) for s in states]
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *host)
    return jax.device_put(stacked, NamedSharding(mesh, P(RUN_AXIS)))


def run_state(host_states: TrainState, i: int, plan: BatchPlan) -> TrainState:
    """Run ``i``'s state in train.py's layout (its own loss state), from a host copy of the stacked states."""
    state = jax.tree.map(lambda x: x[i], host_states)
    if plan.multi:
        state = state.replace(loss_state=state.loss_state[plan.branch_of_run[i]])
    return state

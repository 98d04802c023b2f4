"""Batched mode's loop: K runs stepped together, each logged, verified and checkpointed in its own workdir.

What each run's workdir gets is what ``python train.py`` writes there:
``metrics.jsonl`` and TensorBoard events (train lines at the log steps, eval
lines at the eval steps), ``best_model/`` and ``best.json``, and Orbax
checkpoints ``checkpoints/<step>/{state, data, meta}`` of the run's own
:class:`~x2jax.train.state.TrainState` (its own loss state), saved at the steps
train.py saves (the first step, every ``checkpoint.every_steps``, the last, and
on SIGTERM / Ctrl-C). So ``eval.py --checkpoint <run dir>`` reads a batched
run, and a batched comparison resumes batched or ``--sequential``.

Resume: every run restores the newest step that all of them have (a batched
comparison killed during a save may leave some runs one save ahead; those newer
steps are moved aside to ``checkpoints/superseded-<step>`` and replayed); a step
that does not restore in some run is moved aside to ``corrupt-<step>`` there and
the next older common step is tried.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from x2jax import losses
from x2jax.compare import batched as B
from x2jax.compare.runs import Comparison, RunPlan
from x2jax.compare.shared import abstract_state_for, make_checkpointer, run_meta
from x2jax.models.io import read_meta
from x2jax.models.spec import ModelSpec
from x2jax.train import config as config_lib
from x2jax.train.callbacks import VerificationCallback
from x2jax.train.checkpointing import CheckpointMismatchError, PreemptionWatcher, RunInterrupted, move_aside
from x2jax.train.loop import BadLabelError, NonFiniteLossError
from x2jax.train.metrics import MetricWriter, Progress, format_duration, progress_fields
from x2jax.train.setup import Run, build_step
from x2jax.train.step import make_step_fn
from x2jax.train.workdir_lock import WorkdirLock


class _RunIO:
    """One run's workdir: lock, checkpointer, meta, metric writer, verification."""

    def __init__(self, plan: RunPlan, meta: dict):
        self.plan, self.meta = plan, meta
        self.lock = WorkdirLock(plan.workdir).acquire()
        try:
            self.ckpt = make_checkpointer(plan)
        except Exception:
            self.lock.release()
            raise
        self.writer: MetricWriter | None = None
        self.verify: VerificationCallback | None = None

    def close(self) -> None:
        for closer in (self.writer, self.ckpt):
            if closer is not None:
                closer.close()
        self.lock.release()


def _check_resumable(path: Path, saved: dict, plan: RunPlan, spec: ModelSpec, num_classes: int) -> None:
    """The checkpoint was written by this run (same model, classes, and config.RESUME_KEYS)."""
    if not ModelSpec.from_json(saved["model"]).same_function(spec) or saved["num_classes"] != num_classes:
        raise CheckpointMismatchError(f"checkpoint {path} was written for model {saved['model']} with "
                                      f"{saved['num_classes']} classes; run {plan.name} has {spec.to_json()} "
                                      f"with {num_classes}")
    diffs = config_lib.resume_differences(saved.get("config", {}), plan.config)
    if diffs and plan.config.resume_mismatch != "allow":
        raise CheckpointMismatchError(f"checkpoint {path} was written by a run with other settings: "
                                      f"{'; '.join(diffs)}. Use another --workdir for another comparison")


def _set_aside(io: _RunIO, step: int, kind: str) -> Path:
    directory = io.ckpt.directory
    if kind == "corrupt":
        target = move_aside(directory, step)
    else:
        target, k = directory / f"{kind}-{step}", 0
        while target.exists():
            k += 1
            target = directory / f"{kind}-{step}.{k}"
        shutil.move(str(directory / str(step)), str(target))
    io.ckpt.manager.reload()
    return target


def _restore(ios: list[_RunIO], abstract: list[Any], iterator, spec: ModelSpec, num_classes: int,
             say: Callable[[str], None]) -> tuple[int, list[Any] | None, Any]:
    """(step, per-run states or None for a fresh start, iterator) at the newest step every run has."""
    while True:
        steps = [set(io.ckpt.manager.all_steps()) for io in ios]
        common = set.intersection(*steps) if steps else set()
        newest = max(common) if common else 0
        for io, have in zip(ios, steps):
            for s in sorted(x for x in have if x > newest):
                say(f"{io.plan.name}: step {s} is newer than the newest step every run has ({newest or 'none'}); "
                    f"moved to {_set_aside(io, s, 'superseded')}, replaying it")
        if not newest:
            return 0, None, iterator
        states, failed = [], None
        for io, target in zip(ios, abstract):
            try:
                _, saved = read_meta(io.ckpt.directory, newest)
                _check_resumable(io.ckpt.directory / str(newest), saved, io.plan, spec, num_classes)
                state, iterator, _ = io.ckpt.restore(newest, target, iterator)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # pylint: disable=broad-except  (a step that does not restore is corrupt)
                failed = (io, e)
                break
            states.append(state)
        if failed is None:
            return newest, states, iterator
        io, error = failed
        say(f"checkpoint {io.ckpt.directory / str(newest)} does not restore ({type(error).__name__}: {error}); "
            f"moved to {_set_aside(io, newest, 'corrupt')}, trying the next older step")


def _check_metrics(plan: RunPlan, step: int, m: dict[str, float]) -> None:
    """Stops as train.py does on a bad label or (with on_nonfinite='stop') a non-finite step, naming the run."""
    config = plan.config
    if m["bad_labels"] > 0:
        raise BadLabelError(f"run {plan.name}, step {step}: {int(m['bad_labels'])} label(s) outside "
                            "[0, num_classes) in the batch; the step was not applied")
    if m["nonfinite"] > 0 and config.model.dtype != "float16" and config.on_nonfinite == "stop":
        raise NonFiniteLossError(f"run {plan.name}, step {step}: non-finite loss or gradients (loss={m['loss']}); "
                                 "the step was not applied. Lower the learning rate or set on_nonfinite='skip'")


def train_batched(plans: Sequence[RunPlan], shared: Run, comparison: Comparison, *,
                  say: Callable[[str], None] = print, step_hook: Callable[[int], None] | None = None) -> bool:
    """Trains (or resumes) ``plans`` together in one batched step; False if preempted.

    Args:
      plans: the runs, checked with :func:`x2jax.compare.batched.check_batchable` first.
      shared: :func:`x2jax.compare.shared.build_shared` (data, eval sets, the data mesh).
      comparison: the comparison (data seed).
      say: prints a line.
      step_hook: called with the step number after each step (tests send a SIGTERM from it).

    Raises:
      config_lib.ConfigError: the runs cannot be batched (before any work).
      BadLabelError, NonFiniteLossError: as train.py, naming the run and step.
    """
    config = plans[0].config
    devices = list(shared.mesh.devices.flat)
    B.check_batchable(plans, num_devices=len(devices), process_count=jax.process_count())
    plan = B.plan_batch(plans)
    mesh = B.run_mesh(devices)
    rules, num_classes, total = shared.rules, shared.num_classes, shared.total_steps
    step = build_step(config, mesh, rules, num_classes=num_classes, image_size=shared.image_size, total_steps=total)
    step_fn = make_step_fn(model=step.model, tx=step.tx, schedule=step.schedule, mesh=mesh, num_classes=num_classes,
                           branches=plan.branches, sample_rate=1.0, float16=config.model.dtype == "float16",
                           rules=rules)
    batched_step = B.make_batched_step(step_fn, mesh)
    runs_sharding, replicated = NamedSharding(mesh, P(B.RUN_AXIS)), NamedSharding(mesh, P())
    run_args = jax.device_put(plan.run_args, runs_sharding)

    abstract = [abstract_state_for(step, p.loss.name) for p in plans]  # each run's own loss state
    ios: list[_RunIO] = []
    watcher = None
    try:
        for p in plans:
            ios.append(_RunIO(p, run_meta(shared, p, comparison, step, mesh)))
        iterator = shared.train_data.make_iterator(batch_size=config.data.batch_size, shard_index=0, shard_count=1)
        start, restored, iterator = _restore(ios, abstract, iterator, step.spec, num_classes, say)
        if restored is None:
            restored = [step.create_state(jax.random.PRNGKey(p.seed)).replace(
                loss_state=losses.spec(p.loss.name).init_state()) for p in plans]
        else:
            say(f"{len(plans)} runs resumed from step {start}")
        states = B.stack_states(restored, plan, mesh)
        del restored
        # Verification embeds on the data mesh, as train.py does, except on CPU: there the
        # simulated devices share the same cores (nothing to gain), and the embedding's
        # all-to-alls on a several-device CPU mesh were seen to deadlock in XLA:CPU's
        # rendezvous (docs/comparisons.md, "Known problems").
        eval_mesh = None if devices[0].platform == "cpu" else shared.mesh
        for io in ios:
            io.writer = MetricWriter(io.plan.workdir, start_step=start)
            io.verify = VerificationCallback(model=shared.step.model, spec=shared.step.spec, sets=shared.eval_sets,
                                             writer=io.writer, workdir=io.plan.workdir,
                                             batch_size=config.eval.batch_size, mesh=eval_mesh,
                                             say=lambda m, n=io.plan.name: say(f"{n}: {m}"))
        batch_images = config.data.batch_size * len(plans)
        progress = Progress(total, start, batch_images)
        watcher = PreemptionWatcher(catch_sigint=True)
        say(f"batched: {len(plans)} runs in one step ({len(plan.branches)} loss branch(es)) on "
            f"{len(devices)} device(s); steps {start}..{total}")

        def host_run_states():
            host = jax.device_get(states)
            return [B.run_state(host, i, plan) for i in range(len(plans))]

        if start == 0 and config.eval.every_steps:
            for io, s in zip(ios, host_run_states()):
                io.verify(0, s, track_best=False)
        step_no, pending, t_start, first = start, [], time.perf_counter(), True
        preempted = False
        while step_no < total:
            try:
                with watcher.interruptible():
                    batch = next(iterator)
            except RunInterrupted:
                for io in ios:
                    io.ckpt.wait()
                preempted = True
                say(f"{watcher.signal_name} received while waiting for data for step {step_no + 1}: nothing new "
                    "saved; the latest checkpoints are intact; exiting")
                break
            states, metrics = batched_step(states, jax.device_put(batch, replicated), run_args)
            step_no += 1
            if first:  # compiled: measure from here
                jax.block_until_ready(metrics)
                progress.restart_clock(step_no)
                first = False
            pending.append((step_no, metrics))
            if step_hook is not None:
                step_hook(step_no)
            last = step_no == total
            if step_no % config.log_every_steps == 0 or last or watcher.requested:
                for s, m in jax.device_get(pending):
                    for i, io in enumerate(ios):
                        _check_metrics(io.plan, s, {k: float(v[i]) for k, v in m.items()})
                pending = []
                m_all = jax.device_get(metrics)
                ips = progress.images_per_second(step_no)
                for i, io in enumerate(ios):
                    m = {k: float(v[i]) for k, v in m_all.items()}
                    m["images_per_second"] = ips / len(plans)
                    io.writer.write(step_no, "train", m)
                progress.update(step_no, {"runs": str(len(plans))})
                for i, io in enumerate(ios):
                    fields = progress_fields({k: float(v[i]) for k, v in m_all.items()})
                    say("    " + f"{io.plan.name}: " + " | ".join(
                        f"{k} {v}" if isinstance(v, str) else f"{k} {v:.4g}" for k, v in fields.items()))
            evaluate = bool(config.eval.every_steps and step_no % config.eval.every_steps == 0) or last
            save = last or watcher.requested or any(io.ckpt.manager.should_save(step_no) for io in ios)
            if evaluate or save:
                run_states = host_run_states()
                if evaluate:
                    for io, s in zip(ios, run_states):
                        io.verify(step_no, s)
                if save:
                    for io, s, target in zip(ios, run_states, abstract):
                        on_device = jax.device_put(s, jax.tree.map(lambda a: a.sharding, target))
                        io.ckpt.save(step_no, on_device, iterator, io.meta, force=True)
            if watcher.requested:
                for io in ios:
                    io.ckpt.wait()
                preempted = True
                say(f"{watcher.signal_name} received: saved step {step_no} of the {len(plans)} runs, exiting; "
                    "run the same command to resume")
                break
        for io in ios:
            io.ckpt.wait()
        if not preempted:
            say(f"batched: {step_no - start} steps of {len(plans)} runs in "
                f"{format_duration(time.perf_counter() - t_start)}")
        return not preempted
    finally:
        if watcher is not None:
            watcher.close()
        for io in ios:
            io.close()


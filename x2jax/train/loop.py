"""The training loop: ``train(config, workdir)`` = build the run, then ``train_loop(run)``.

``build_run`` (x2jax/train/setup.py) makes mesh, data, model, optimizer, state
factory, step and checkpointer; ``train_loop`` restores or creates the state
and steps, logs, verifies (x2jax/train/callbacks.py) and checkpoints.
Everything is restartable: the latest finished checkpoint under
``<workdir>/checkpoints`` is restored automatically (onto whatever mesh this run
has), with the data iterator where it stopped, so a resumed run sees exactly
the batches it would have seen.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from x2jax.data.pipeline import NoUsableRecordsError
from x2jax.data.sources import EmptyDatasetError
from x2jax.data.verification_bin import UnsafePickleError
from x2jax.parallel.mesh import PeerTimeoutError, initialize_distributed_from_config
from x2jax.parallel.sharding import host_local_to_global
from x2jax.train import config as config_lib
from x2jax.train.callbacks import VerificationCallback
from x2jax.train.checkpointing import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    PreemptionWatcher,
    RunInterrupted,
)
from x2jax.models.io import read_meta
from x2jax.models.spec import ModelSpec
from x2jax.train.metrics import MetricWriter, Progress, StepTimer, format_duration, progress_fields
from x2jax.train.setup import Run, build_run
from x2jax.train.step import AheadOfTimeStep, batch_spec
from x2jax.train.workdir_lock import WorkdirInUseError, WorkdirLock


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients were NaN/Inf (with ``on_nonfinite='stop'``)."""


class BadLabelError(ValueError):
    """A training batch held a label outside [0, num_classes)."""


# Errors that name what to fix: train.py prints their message alone, without a traceback.
USER_ERRORS = (
    config_lib.ConfigError, FileNotFoundError, WorkdirInUseError, CheckpointMismatchError, CheckpointCorruptError,
    BadLabelError, NonFiniteLossError, EmptyDatasetError, NoUsableRecordsError, UnsafePickleError, PeerTimeoutError,
)


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def setup_compilation_cache(directory: str) -> None:
    """Persistent XLA compilation cache, so a restart does not compile again."""
    if not directory:
        return
    path = os.path.expanduser(directory)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _check_step_metrics(config, step: int, m: dict[str, float]) -> None:
    if m["bad_labels"] > 0:
        raise BadLabelError(
            f"step {step}: {int(m['bad_labels'])} label(s) outside [0, num_classes) in the batch; "
            "the step was not applied. Check the dataset's labels and num_classes."
        )
    if m["nonfinite"] > 0 and config.model.dtype != "float16" and config.on_nonfinite == "stop":
        raise NonFiniteLossError(
            f"step {step}: non-finite loss or gradients (loss={m['loss']}); the step was not applied "
            "and the last checkpoint is intact. Lower the learning rate or set on_nonfinite='skip'."
        )


BatchHook = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          batch_hook: BatchHook | None = None, step_hook: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train (or resume) according to ``config``; returns a summary dict.

    Args:
      config: a config of :func:`x2jax.train.config.base_config`'s schema.
      workdir: the run directory (checkpoints, metrics, best model).
      batch_hook: ``(step, host batch) -> batch`` before each step (tests use it
        to plant a NaN image or a bad label).
      step_hook: called with the step number after each step.

    Raises:
      WorkdirInUseError: another live run holds ``workdir``.
      CheckpointMismatchError: the checkpoint was written by another run (see
        ``config.resume_mismatch``).
      CheckpointCorruptError: checkpoints exist but none restores.
    """
    t_enter = time.perf_counter()
    config_lib.validate(config)
    workdir = Path(workdir)
    initialize_distributed_from_config(config.distributed)
    lock = _lock_workdir(workdir)
    try:
        setup_compilation_cache(config.compilation_cache_dir)
        run = build_run(config, workdir, say=_say)
        return train_loop(run, t_enter=t_enter, batch_hook=batch_hook, step_hook=step_hook)
    finally:
        if lock is not None:
            lock.release()


def _lock_workdir(workdir: Path) -> WorkdirLock | None:
    """Process 0 takes the workdir lock; every process learns whether it got it."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirInUseError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        held = bool(multihost_utils.broadcast_one_to_all(np.int32(lock is not None)))
        if not held and error is None:
            error = WorkdirInUseError(f"workdir {workdir} is in use by another run (process 0 could not lock it)")
    if error is not None:
        raise error
    return lock


def _resume_or_create(run: Run, iterator) -> tuple[AheadOfTimeStep, Any, Any]:
    """(step compiling ahead, state, iterator): the newest restorable checkpoint (corrupt ones moved
    aside) of this run, or a new state.

    The checkpoint's meta is checked before the step starts compiling; the state
    is restored while it compiles.
    """
    config, ckpt, step = run.config, run.checkpointer, run.step

    def read_resumable_meta(s: int) -> dict:
        _, saved = read_meta(ckpt.directory, s)
        _check_resumable(ckpt.directory / str(s), saved, config, step.spec, run.num_classes)
        return saved

    def restore(s: int):
        read_resumable_meta(s)  # again: an older step may be of another run
        return ckpt.restore(s, step.abstract_state, iterator)

    found = ckpt.restore_newest(read_resumable_meta)
    # Compiles (or loads from the persistent cache) in a background thread while the
    # loader starts, the state is created or restored and the step-0 evaluation runs.
    # On CPU it also runs the step once on zeros (first-execution setup off the first step).
    train_step = AheadOfTimeStep(step.train_step, step.abstract_state, batch_spec(config.data.batch_size,
                                                                                   run.image_size),
                                 warm_up=jax.default_backend() == "cpu" and jax.process_count() == 1)
    if found is None:
        return train_step, step.create_state(jax.random.PRNGKey(config.seed)), iterator
    latest, (state, iterator, saved) = ckpt.restore_newest(restore, below=found[0])
    _say(f"resumed from step {latest} (saved on mesh {saved['mesh']})")
    return train_step, state, iterator


def train_loop(run: Run, *, t_enter: float | None = None, batch_hook: BatchHook | None = None,
               step_hook: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Restore or create the state, then step, log, verify and checkpoint until the run's last step."""
    config, ckpt, mesh = run.config, run.checkpointer, run.mesh
    iterator = run.train_data.make_iterator(
        batch_size=run.per_process_batch, shard_index=jax.process_index(), shard_count=jax.process_count()
    )
    try:
        train_step, state, iterator = _resume_or_create(run, iterator)
    except Exception:
        ckpt.close()
        raise
    step = int(jax.device_get(state.step))
    timer = StepTimer(time.perf_counter() if t_enter is None else t_enter)
    writer = MetricWriter(run.workdir, start_step=step)  # replayed steps' lines are dropped
    progress = Progress(run.total_steps, step, config.data.batch_size)
    watcher = PreemptionWatcher(catch_sigint=True)
    verify = VerificationCallback(model=run.step.model, spec=run.step.spec, sets=run.eval_sets,
                                  writer=writer, workdir=run.workdir, batch_size=config.eval.batch_size, mesh=mesh,
                                  say=_say)
    pending: list[tuple[int, dict]] = []
    summary: dict[str, Any] = {"start_step": step, "total_steps": run.total_steps, "preempted": False}
    t_start = time.perf_counter()
    try:
        if step == 0 and config.eval.every_steps:  # the baseline of the accuracy curve
            verify(0, state, track_best=False)
        while step < run.total_steps:
            try:
                with watcher.interruptible():  # a signal while waiting for data ends the run here
                    batch = next(iterator)
            except RunInterrupted:
                ckpt.wait()
                summary["preempted"] = True
                _say(f"{watcher.signal_name} received while waiting for data for step {step + 1}: nothing new "
                     f"saved, the latest checkpoint (step {ckpt.latest_step()}) is intact; exiting")
                break
            if batch_hook is not None:
                batch = batch_hook(step, batch)
            t0 = time.perf_counter()
            state, metrics = train_step(state, host_local_to_global(batch, mesh, run.rules))
            step += 1
            if timer.active and timer.stop(t0, metrics):
                progress.restart_clock(step)
            pending.append((step, metrics))
            if step_hook is not None:
                step_hook(step)

            last = step == run.total_steps
            if step % config.log_every_steps == 0 or last or watcher.requested:
                for s, m in jax.device_get(pending):
                    m = {k: float(v) for k, v in m.items()}
                    _check_step_metrics(config, s, m)
                    if m["skipped"]:
                        _say(f"step {s}: non-finite loss or gradients, step skipped")
                pending = []
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                m["images_per_second"] = progress.images_per_second(step)
                writer.write(step, "train", m)
                progress.update(step, progress_fields(m))
                summary["loss"] = m["loss"]

            if (config.eval.every_steps and step % config.eval.every_steps == 0) or last:
                verify(step, state)

            saved = ckpt.save(step, state, iterator, run.meta, force=last)
            if watcher.requested or ckpt.reached_preemption(step):
                if not saved:  # (Orbax also saves a fresh run's first step: no second save of it)
                    ckpt.save(step, state, iterator, run.meta, force=True)
                ckpt.wait()
                summary["preempted"] = True
                _say(f"{watcher.signal_name or 'preemption'} received: saved step {step} in "
                     f"{ckpt.directory}, exiting; run the same command to resume")
                break
        ckpt.wait()
    finally:
        watcher.close()
        writer.close()
        ckpt.close()
    summary.update(timer.times, step_compiled_ahead=train_step.compiled_ahead)
    if verify.last:
        summary["eval"] = verify.last
    summary.update(step=step, seconds=time.perf_counter() - t_start, best=verify.best, num_classes=run.num_classes)
    if not summary["preempted"]:
        _say(f"done: {step} steps in {format_duration(summary['seconds'])}; checkpoints in {ckpt.directory}")
    return summary


def _check_resumable(path: Path, saved: dict, config, spec: ModelSpec, num_classes: int) -> None:
    """The checkpoint's run computes what this config computes (or the difference is allowed)."""
    if not ModelSpec.from_json(saved["model"]).same_function(spec) or saved["num_classes"] != num_classes:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for model {saved['model']} with {saved['num_classes']} classes; "
            f"this config has {spec.to_json()} with {num_classes}"
        )
    diffs = config_lib.resume_differences(saved.get("config", {}), config)
    if diffs and config.resume_mismatch != "allow":
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by a run with other settings: {'; '.join(diffs)}. Use the "
            "checkpoint's settings, another --workdir, or --config.resume_mismatch=allow to change them deliberately"
        )
    if diffs:
        _say(f"resuming {path} with changed settings (resume_mismatch=allow): {'; '.join(diffs)}")

"""The training loop: mesh -> data -> state -> step -> loop -> checkpoint / verification.

``train(config, workdir)`` runs (or resumes) a run and returns a summary dict.
Everything is restartable: the latest finished checkpoint under
``<workdir>/checkpoints`` is restored automatically (onto whatever mesh this run
has), with the data iterator where it stopped, so a resumed run sees exactly
the batches it would have seen.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from x2jax.data.pipeline import NoUsableRecordsError
from x2jax.data.sources import EmptyDatasetError
from x2jax.data.verification_bin import UnsafePickleError
from x2jax.evaluation.verification import embed_images, verification_accuracy
from x2jax.models.io import save_model
from x2jax.parallel.mesh import PeerTimeoutError, initialize_distributed, make_mesh, mesh_axis_size
from x2jax.parallel.sharding import ShardingRules, host_local_to_global
from x2jax.train import config as config_lib
from x2jax.train import inputs
from x2jax.train.checkpointing import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    Checkpointer,
    PreemptionWatcher,
    RunInterrupted,
    build_model,
    model_description,
    model_kwargs,
    read_meta,
    same_model,
)
from x2jax.train.metrics import MetricWriter, Progress, format_duration
from x2jax.train.optimizer import make_optimizer, make_schedule
from x2jax.train.state import make_state_factory
from x2jax.train.step import AheadOfTimeStep, batch_spec, make_train_step
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


def _inject_debug(config, step: int, batch: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Test hooks: a NaN image or an out-of-range label at a given step."""
    if step + 1 == config.debug.nan_at_step:
        batch = dict(batch, image=batch["image"].copy())
        batch["image"][0] = np.nan
    if step + 1 == config.debug.bad_label_at_step:
        batch = dict(batch, label=batch["label"].copy())
        batch["label"][0] = num_classes
    return batch


def run_verification(apply_fn, variables, sets, *, batch_size: int, mesh) -> dict[str, dict]:
    results = {}
    for name, (images, issame) in sets.items():
        emb = embed_images(apply_fn, variables, images, batch_size, mesh=mesh)
        results[name] = verification_accuracy(emb, issame)
    return results


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train (or resume) according to ``config``; returns a summary dict.

    Raises:
      WorkdirInUseError: another live run holds ``workdir``.
      CheckpointMismatchError: the checkpoint was written by another run (see
        ``config.resume_mismatch``).
      CheckpointCorruptError: checkpoints exist but none restores.
    """
    t_enter = time.perf_counter()
    config_lib.validate(config)
    workdir = Path(workdir)
    d = config.distributed
    initialize_distributed(
        d.coordinator_address or None,
        d.num_processes or None,
        d.process_id if d.process_id >= 0 else None,
        auto_detect=d.auto_detect,
        initialization_timeout_s=d.initialization_timeout_s,
        heartbeat_timeout_s=d.heartbeat_timeout_s,
    )
    lock = _lock_workdir(workdir)
    try:
        return _train_locked(config, workdir, t_enter)
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


def _train_locked(config: ml_collections.ConfigDict, workdir: Path, t_enter: float) -> dict[str, Any]:
    setup_compilation_cache(config.compilation_cache_dir)

    # ---- mesh -----------------------------------------------------------------------
    if config.mesh.num_devices > jax.device_count():
        raise config_lib.ConfigError(f"mesh.num_devices={config.mesh.num_devices} but only {jax.device_count()} device(s) "
                         f"are available ({jax.devices()[0].platform})")
    devices = jax.devices()[: config.mesh.num_devices] if config.mesh.num_devices > 0 else None
    mesh = make_mesh(data=config.mesh.data, model=config.mesh.model, devices=devices)
    rules = ShardingRules()
    config_lib.validate_for_devices(
        config, batch_shards=mesh_axis_size(mesh, rules.batch), process_count=jax.process_count()
    )
    _say(f"devices: {jax.device_count()} x {jax.devices()[0].platform} in {jax.process_count()} process(es); "
         f"mesh {dict(mesh.shape)}")

    # ---- data -----------------------------------------------------------------------
    train_data = inputs.open_train_data(config.data, seed=config.seed)
    num_classes, image_size = train_data.num_classes, train_data.image_size
    per_process_batch = config.data.batch_size // jax.process_count()
    steps_per_epoch = max(len(train_data.source) // config.data.batch_size, 1)
    total_steps = int(config.num_steps) if config.num_steps > 0 else int(math.ceil(config.num_epochs * steps_per_epoch))
    eval_sets = inputs.open_verification_sets(
        [s.strip() for s in config.eval.sets.split(",") if s.strip()],
        data_dir=config.eval.data_dir,
        data_config=config.data,
        image_size=image_size,
    )
    _say(f"data: {config.data.name} ({len(train_data.source)} images, {num_classes} identities, "
         f"{image_size}x{image_size}); {total_steps} steps of {config.data.batch_size}; "
         f"eval sets: {', '.join(eval_sets) or 'none'}")

    # ---- model, optimizer, state ----------------------------------------------------------
    description = model_description(config, image_size)
    model = build_model(description)
    schedule = make_schedule(config.schedule, total_steps)
    tx = make_optimizer(config.optimizer, schedule)
    float16 = config.model.dtype == "float16"
    create_state, shardings, abstract_state = make_state_factory(
        model=model, tx=tx, mesh=mesh, num_classes=num_classes, loss_name=config.loss.name,
        float16=float16, param_strategy=config.mesh.param_sharding, rules=rules,
    )
    train_step = make_train_step(
        model=model, tx=tx, schedule=schedule, mesh=mesh, shardings=shardings, num_classes=num_classes,
        loss_name=config.loss.name, loss_params=dict(config.loss.params), sample_rate=config.loss.sample_rate,
        float16=float16, rules=rules,
    )

    # ---- checkpoint: one to resume, and of this run? (before any compile starts) -----------------
    ckpt = Checkpointer(workdir / "checkpoints", every_steps=config.checkpoint.every_steps,
                        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    def read_resumable_meta(step: int) -> dict:
        _, saved = read_meta(workdir / "checkpoints", step)
        _check_resumable(workdir / "checkpoints" / str(step), saved, config, description, num_classes)
        return saved
    try:
        found = ckpt.restore_newest(read_resumable_meta)
    except Exception:
        ckpt.close()
        raise
    latest = found[0] if found else None

    # Compiles (or loads from the persistent cache) in a background thread while the
    # loader starts, the state is created or restored and the step-0 evaluation runs.
    # On CPU it also runs the step once on zeros (first-execution setup off the first step).
    train_step = AheadOfTimeStep(train_step, abstract_state, batch_spec(config.data.batch_size, image_size),
                                 warm_up=jax.default_backend() == "cpu" and jax.process_count() == 1)
    iterator = train_data.make_iterator(
        batch_size=per_process_batch, shard_index=jax.process_index(), shard_count=jax.process_count()
    )
    meta = {
        "config": json.loads(config.to_json()),
        "model": description,
        "num_classes": num_classes,
        "mesh": dict(mesh.shape),
        "process_count": jax.process_count(),
    }

    # ---- state: restore (falling back past corrupt steps) or create ------------------------------
    if latest is not None:
        def restore(step: int):
            read_resumable_meta(step)  # again: an older step may be of another run
            return ckpt.restore(step, abstract_state, iterator)
        try:
            latest, (state, iterator, saved) = ckpt.restore_newest(restore, below=latest)
        except Exception:
            ckpt.close()
            raise
        _say(f"resumed from step {latest} (saved on mesh {saved['mesh']})")
    else:
        state = create_state(jax.random.PRNGKey(config.seed))
    step = int(jax.device_get(state.step))

    # ---- loop -----------------------------------------------------------------------------
    writer = MetricWriter(workdir, start_step=step)  # replayed steps' lines are dropped
    progress = Progress(total_steps, step, config.data.batch_size)
    watcher = PreemptionWatcher(catch_sigint=True)
    def eval_apply(variables, images):  # one function object: the eval embedding compiles once
        return model.apply(variables, images, train=False)

    best: dict[str, Any] = _read_best(workdir)
    pending: list[tuple[int, dict]] = []
    summary: dict[str, Any] = {"start_step": step, "total_steps": total_steps, "preempted": False}
    t_start = time.perf_counter()
    first_step_time = None
    if step == 0 and config.eval.every_steps and eval_sets:  # the baseline of the accuracy curve
        variables = _backbone_variables(state)
        results = run_verification(eval_apply, variables, eval_sets, batch_size=config.eval.batch_size, mesh=mesh)
        _report_eval(0, results, best, writer, workdir, variables, description, summary, track_best=False)
    try:
        while step < total_steps:
            try:
                with watcher.interruptible():  # a signal while waiting for data ends the run here
                    batch = next(iterator)
            except RunInterrupted:
                ckpt.wait()
                summary["preempted"] = True
                _say(f"{watcher.signal_name} received while waiting for data for step {step + 1}: nothing new "
                     f"saved, the latest checkpoint (step {ckpt.latest_step()}) is intact; exiting")
                break
            batch = _inject_debug(config, step, batch, num_classes)
            t0 = time.perf_counter()
            state, metrics = train_step(state, host_local_to_global(batch, mesh, rules))
            step += 1
            if "second_step_seconds" not in summary:  # the first two steps, each timed alone
                jax.block_until_ready(metrics)
                if first_step_time is None:
                    first_step_time = time.perf_counter() - t0
                    summary["first_step_seconds"] = first_step_time
                    summary["startup_seconds"] = time.perf_counter() - t_enter
                    summary["step_compiled_ahead"] = train_step.compiled_ahead
                    progress.restart_clock(step)
                else:
                    summary["second_step_seconds"] = time.perf_counter() - t0
            pending.append((step, metrics))
            if config.debug.sigterm_at_step == step:
                os.kill(os.getpid(), 15)

            last = step == total_steps
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
                progress.update(step, {"loss": m["loss"], "lr": m["lr"]})
                summary["loss"] = m["loss"]

            if (config.eval.every_steps and step % config.eval.every_steps == 0) or last:
                if eval_sets:
                    variables = _backbone_variables(state)
                    results = run_verification(eval_apply, variables, eval_sets,
                                               batch_size=config.eval.batch_size, mesh=mesh)
                    best = _report_eval(step, results, best, writer, workdir, variables, description, summary)

            ckpt.save(step, state, iterator, meta, force=last)
            if watcher.requested or ckpt.reached_preemption(step):
                if not last:
                    ckpt.save(step, state, iterator, meta, force=True)
                ckpt.wait()
                summary["preempted"] = True
                _say(f"{watcher.signal_name or 'preemption'} received: saved step {step} in "
                     f"{workdir / 'checkpoints'}, exiting; run the same command to resume")
                break
        ckpt.wait()
    finally:
        watcher.close()
        writer.close()
        ckpt.close()
    summary.update(step=step, seconds=time.perf_counter() - t_start, best=best, num_classes=num_classes)
    if not summary["preempted"]:
        _say(f"done: {step} steps in {format_duration(summary['seconds'])}; checkpoints in {workdir / 'checkpoints'}")
    return summary


def _check_resumable(path: Path, saved: dict, config, description: dict, num_classes: int) -> None:
    """The checkpoint's run computes what this config computes (or the difference is allowed)."""
    if not same_model(saved["model"], description) or saved["num_classes"] != num_classes:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for model {saved['model']} with {saved['num_classes']} classes; "
            f"this config has {description} with {num_classes}"
        )
    diffs = config_lib.resume_differences(saved.get("config", {}), config)
    if diffs and config.resume_mismatch != "allow":
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by a run with other settings: {'; '.join(diffs)}. Use the "
            "checkpoint's settings, another --workdir, or --config.resume_mismatch=allow to change them deliberately"
        )
    if diffs:
        _say(f"resuming {path} with changed settings (resume_mismatch=allow): {'; '.join(diffs)}")


def _backbone_variables(state) -> dict[str, Any]:
    """The backbone's ``{'params', 'batch_stats'}`` of a TrainState (what eval and export read)."""
    return {"params": state.params["backbone"], "batch_stats": state.batch_stats}


def _read_best(workdir: Path) -> dict[str, Any]:
    path = workdir / "best.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _report_eval(step, results, best, writer, workdir, variables, description, summary, track_best=True):
    mean_acc = float(np.mean([r["accuracy"] for r in results.values()]))
    for name, r in results.items():
        writer.write(step, f"eval/{name}", {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"],
                                            "val_at_far": r["val"]})
        _say(f"step {step}: verification {name}: accuracy {100 * r['accuracy']:.2f} +- "
             f"{100 * r['accuracy_std']:.2f} %, VAL@FAR=1e-3 {100 * r['val']:.2f} %")
    summary["eval"] = {name: {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"], "val": r["val"]}
                       for name, r in results.items()}
    if track_best and mean_acc > best.get("accuracy", -1.0):
        best = {"step": step, "accuracy": mean_acc, "sets": summary["eval"]}
        if jax.process_index() == 0:
            target = workdir / "best_model"
            tmp = workdir / f"best_model.tmp{step}"
            save_model(tmp, variables, **model_kwargs(description))
            if target.exists():
                import shutil  # noqa: PLC0415

                shutil.rmtree(target)
            tmp.rename(target)
            (workdir / "best.json").write_text(json.dumps(best, indent=1) + "\n")
    return best

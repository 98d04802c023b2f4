"""Orbax checkpoints of a training run: state, data iterator, metadata.

Layout: ``<workdir>/checkpoints/<step>/{state, data, meta}``:

- ``state``: the whole :class:`~x2jax.train.state.TrainState` (StandardSave). It
  restores onto any mesh: the target is an abstract state whose
  ``jax.ShapeDtypeStruct`` leaves carry the new shardings.
- ``data``: the grain iterator state, one JSON file per process.
- ``meta``: JSON with the config, the model (:meth:`x2jax.models.spec.ModelSpec.to_json`,
  what ``eval.py`` needs to rebuild the backbone) and the class count.

Reading a backbone out of these checkpoints (:func:`x2jax.models.io.load_backbone`,
``read_meta``, ``restore_backbone``) is the models' side of the format.

Orbax writes each step into a temporary directory and renames it when complete;
``latest_step`` only sees finished steps, so a run killed mid-save resumes from
the previous checkpoint. Saves are asynchronous (the device-to-host copy
happens before ``save`` returns, so the donated state can be reused at once).

Preemption: :class:`PreemptionWatcher` turns SIGTERM and SIGINT (and, on
multi-host runs, JAX's preemption sync point) into a flag the loop checks after
each step; the loop then saves, waits for the save and exits cleanly. A signal
while the loop waits for data ends the run at once, saving nothing new.

Corruption: :meth:`Checkpointer.restore_newest` moves a step that does not
restore aside to ``corrupt-<step>`` and falls back to the next older one.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from x2jax.data import pipeline

from x2jax.models.io import CheckpointCorruptError, one_line

__all__ = ["CheckpointCorruptError", "CheckpointMismatchError", "Checkpointer", "PreemptionWatcher",
           "RunInterrupted", "move_aside"]


T = TypeVar("T")


class CheckpointMismatchError(ValueError):
    """A checkpoint written by another run (another model, loss, batch, seed, schedule, ...)."""


def move_aside(directory: str | os.PathLike, step: int) -> Path:
    """Renames ``<directory>/<step>`` to ``corrupt-<step>`` (``corrupt-<step>.1``, ... if taken)."""
    directory = Path(directory)
    target, k = directory / f"corrupt-{step}", 0
    while target.exists():
        k += 1
        target = directory / f"corrupt-{step}.{k}"
    shutil.move(str(directory / str(step)), str(target))
    return target


def _all_processes_ok(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(multihost_utils.process_allgather(np.int32(ok)).min())


class Checkpointer:
    """CheckpointManager for ``state`` + ``data`` + ``meta`` items."""

    def __init__(self, directory: str | os.PathLike, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every_steps), 1),
            max_to_keep=int(keep) if keep else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_newest(self, attempt: Callable[[int], T], *, below: int | None = None) -> tuple[int, T] | None:
        """``(step, attempt(step))`` for the newest step on which ``attempt`` succeeds.

        A step whose ``attempt`` raises (a missing or truncated file, broken meta
        JSON, ...) is reported in one line and moved aside to
        ``corrupt-<step>`` (never deleted); the next older step is tried.
        :class:`CheckpointMismatchError` (a checkpoint of another run) is not
        corruption and propagates. In a multi-process run the processes agree:
        a step fails if it fails on any of them, and process 0 moves it.

        Args:
          attempt: reads one step; its exceptions mark the step corrupt.
          below: only try steps ``<= below``.

        Returns:
          None when there is no checkpoint at all.

        Raises:
          CheckpointCorruptError: checkpoints exist but none restores.
        """
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            if below is not None and step > below:
                continue
            try:
                result, error = attempt(step), None
            except CheckpointMismatchError:
                raise
            except Exception as e:  # pylint: disable=broad-except  (any failure to read marks the step)
                result, error = None, e
            if _all_processes_ok(error is None):
                return step, result
            reason = one_line(error) if error is not None else "failed to restore on another process"
            moved = self._move_aside(step)
            failures.append(f"step {step}: {reason}")
            if jax.process_index() == 0:
                print(f"checkpoint {self.directory / str(step)} does not restore ({reason}); "
                      f"moved to {moved}, trying the next older step", flush=True)
        if failures:
            raise CheckpointCorruptError(
                f"no checkpoint in {self.directory} restores (each was moved aside to corrupt-<step>): "
                + "; ".join(failures) + ". Delete the checkpoints directory to start afresh."
            )
        return None

    def _move_aside(self, step: int) -> Path:
        target = move_aside(self.directory, step) if jax.process_index() == 0 else self.directory / f"corrupt-{step}"
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f"x2jax_move_aside_{step}")
        self.manager.reload()
        return target

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict, *, force: bool = False) -> bool:
        """Save if ``step`` is on the interval (or ``force``); True if a save started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=pipeline.checkpoint_save_args(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, Any, dict]:
        """Restore ``step`` into ``abstract_state``'s shapes and shardings."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=pipeline.checkpoint_restore_args(data_iterator),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"], restored["meta"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class RunInterrupted(Exception):
    """A stop signal arrived inside :meth:`PreemptionWatcher.interruptible` (e.g. waiting for data)."""


class PreemptionWatcher:
    """Sets ``requested`` on SIGTERM (or SIGINT when ``catch_sigint``); restores handlers on close.

    Inside ``with watcher.interruptible():`` (the loop's wait for data) a
    signal gives the wait ``wait_grace_s`` to end by itself, so that the step
    runs and is saved as after any other signal; a wait still going then (a
    loader that may never yield) is ended with :class:`RunInterrupted`. A second
    SIGINT raises ``KeyboardInterrupt``.
    """

    def __init__(self, catch_sigint: bool = False, *, wait_grace_s: float = 5.0):
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self._interruptible = False
        self._grace_over = False
        self.wait_grace_s = float(wait_grace_s)
        self.signal_name: str | None = None
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be caught on the main thread
        signals = [signal.SIGTERM] + ([signal.SIGINT] if catch_sigint else [])
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        if self._grace_over:  # re-delivered by _end_wait: the wait did not end in time
            self._grace_over = False
            if self._interruptible:
                raise RunInterrupted(self.signal_name)
            return
        if signum == signal.SIGINT and self._event.is_set():
            raise KeyboardInterrupt  # the second Ctrl-C does not wait for the step
        self.signal_name = signal.Signals(signum).name
        self._event.set()
        if self._interruptible:
            if self.wait_grace_s <= 0:
                raise RunInterrupted(self.signal_name)
            timer = threading.Timer(self.wait_grace_s, self._end_wait, args=(signum,))
            timer.daemon = True
            timer.start()

    def _end_wait(self, signum: int) -> None:
        if self._interruptible:
            self._grace_over = True
            _thread.interrupt_main(signum)  # runs _handle in the main thread

    @contextlib.contextmanager
    def interruptible(self):
        """A block that a stop signal ends with :class:`RunInterrupted` after the grace
        (at once if the signal came before)."""
        if self.requested:
            raise RunInterrupted(self.signal_name)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

"""Sequential mode: each run trained by train.py's own loop, one after the other.

A run is ``train_loop`` (x2jax/train/loop.py) on :func:`x2jax.compare.shared.run_for`:
the same restore-or-create, logging, verification, checkpoints and preemption
handling as ``python train.py``, in the run's workdir (locked while it trains).
A finished run (a checkpoint at the last step) is skipped; an unfinished one
resumes from its newest checkpoint.
"""

from __future__ import annotations

from typing import Callable, Sequence

from x2jax.compare.runs import Comparison, RunPlan
from x2jax.compare.shared import run_for
from x2jax.train.loop import train_loop
from x2jax.train.setup import Run
from x2jax.train.workdir_lock import WorkdirLock
from x2jax.models.io import finished_steps


def latest_step(plan: RunPlan) -> int:
    """The newest finished checkpoint step of a run (0 if none)."""
    try:
        steps = finished_steps(plan.workdir / "checkpoints")
    except FileNotFoundError:
        return 0
    return steps[0] if steps else 0


def train_sequential(plans: Sequence[RunPlan], shared: Run, comparison: Comparison, *,
                     say: Callable[[str], None] = print) -> bool:
    """Trains (or resumes) each run in turn with train.py's ``train_loop``.

    Args:
      plans: the runs (finished ones are skipped).
      shared: :func:`x2jax.compare.shared.build_shared` (data, eval sets, mesh).
      comparison: the comparison (data seed, for each run's meta).
      say: prints a line.

    Returns:
      False if a run was preempted (SIGTERM / Ctrl-C; the rest is not started), else True.
    """
    for i, plan in enumerate(plans):
        if latest_step(plan) >= shared.total_steps:
            say(f"[{i + 1}/{len(plans)}] {plan.name}: finished ({plan.workdir})")
            continue
        say(f"[{i + 1}/{len(plans)}] {plan.name}: training in {plan.workdir}")
        lock = WorkdirLock(plan.workdir).acquire()
        try:
            summary = train_loop(run_for(shared, plan, comparison))
        finally:
            lock.release()
        if summary["preempted"]:
            return False
    return True

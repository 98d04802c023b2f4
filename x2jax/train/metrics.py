"""Metrics of a run: JSONL log, TensorBoard event files, a progress line.

The train lines carry every metric of the step (x2jax/train/step.py), among
them ``target_prob``, ``target_angle_deg`` and ``nearest_angle_deg``; the
progress line shows those as ``p_y``, ``target`` and ``nearest``
(:func:`progress_fields`). Only process 0 writes. ``<workdir>/metrics.jsonl`` has one JSON object a line
(``{"step": ..., "split": "train"|"eval", ...}``); ``<workdir>/tensorboard`` has
event files (tensorboardX, no TensorFlow needed).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
    """Appends scalars to metrics.jsonl and TensorBoard; no-op on processes > 0."""

    def __init__(self, workdir: str | os.PathLike, *, start_step: int = 0, tensorboard: bool = True):
        """``start_step``: the step the run starts or resumes from. Lines of later
        steps (written by a run that stopped after its last checkpoint, and about
        to be replayed) are dropped, so each step is logged once; a fresh run
        (``start_step=0``) moves an old ``metrics.jsonl`` aside to ``metrics.jsonl.old``."""
        self.active = jax.process_index() == 0
        self._tb = None
        if not self.active:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "metrics.jsonl"
        if path.is_file():
            _keep_lines_up_to(path, start_step)
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides the replayed steps' events of the earlier run
            self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), "split": split, "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{split}/{k}", v, int(step))

    def close(self) -> None:
        if not self.active:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _keep_lines_up_to(path: Path, start_step: int) -> None:
    """Rewrites ``path`` (atomically) with the lines of steps ``<= start_step`` (none when 0)."""
    if start_step == 0:
        os.replace(path, path.with_name(path.name + ".old"))
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= start_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a killed process
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


class StepTimer:
    """Start-up and the first two steps, each timed alone (blocking on their results).

    ``times`` gets ``startup_seconds`` (from ``t_enter`` to the end of the first
    step), ``first_step_seconds`` and ``second_step_seconds``.
    """

    def __init__(self, t_enter: float):
        self.t_enter = t_enter
        self.times: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return "second_step_seconds" not in self.times

    def stop(self, t0: float, result: Any) -> bool:
        """Blocks on ``result`` of a step started at ``t0``; True after the first step."""
        jax.block_until_ready(result)
        now = time.perf_counter()
        if "first_step_seconds" not in self.times:
            self.times.update(first_step_seconds=now - t0, startup_seconds=now - self.t_enter)
            return True
        self.times["second_step_seconds"] = now - t0
        return False


def progress_fields(m: Mapping[str, float]) -> dict[str, float | str]:
    """The train metrics the progress line shows: loss, p_y, target and nearest angle, lr.

    Args:
      m: a step's metrics (``loss``, ``lr``, and when present ``target_prob``,
        ``target_angle_deg``, ``nearest_angle_deg``).

    Returns:
      ``{label: value}`` for :meth:`Progress.update`, e.g. ``loss 80.27 | p_y 1.2e-35 |
      target 71.2 deg | nearest 85.3 deg | lr 0.1``.
    """
    out: dict[str, float | str] = {"loss": m["loss"]}
    if "target_prob" in m:
        out["p_y"] = f"{m['target_prob']:.3g}"
    for key, label in (("target_angle_deg", "target"), ("nearest_angle_deg", "nearest")):
        if key in m:
            out[label] = f"{m[key]:.1f} deg"
    out["lr"] = m["lr"]
    return out


class Progress:
    """A one-line status every call: step, loss, images/s, ETA."""

    def __init__(self, total_steps: int, start_step: int, global_batch: int, stream=None):
        self.total, self.batch = total_steps, global_batch
        self.stream = stream or sys.stdout
        self._t0, self._step0 = time.perf_counter(), start_step
        self.active = jax.process_index() == 0

    def restart_clock(self, step: int) -> None:
        """Start measuring from ``step`` (call after the first, compiling step)."""
        self._t0, self._step0 = time.perf_counter(), step

    def images_per_second(self, step: int) -> float:
        elapsed = time.perf_counter() - self._t0
        return (step - self._step0) * self.batch / elapsed if elapsed > 0 and step > self._step0 else float("nan")

    def update(self, step: int, scalars: Mapping[str, float | str]) -> None:
        """Prints the line: ``name value`` per scalar (floats as ``.4g``, strings as given)."""
        if not self.active:
            return
        ips = self.images_per_second(step)
        eta = (self.total - step) * self.batch / ips if ips == ips and ips > 0 else float("nan")
        pct = 100.0 * step / max(self.total, 1)
        parts = [f"step {step}/{self.total} ({pct:3.0f}%)"]
        parts += [f"{k} {v}" if isinstance(v, str) else f"{k} {v:.4g}" for k, v in scalars.items()]
        parts.append(f"{ips:.0f} img/s" if ips == ips else "-- img/s")
        parts.append(f"ETA {format_duration(eta)}" if eta == eta else "ETA --")
        print(" | ".join(parts), file=self.stream, flush=True)

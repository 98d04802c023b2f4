"""End-to-end ``train.py`` on the default config: steps/s, and first step cold vs warm.

Each run is a fresh process calling ``x2jax.train.loop.train`` (what ``train.py``
runs) on ``configs/synthetic_tiny_x2softmax.py`` with a fresh work directory
(no resume) and these overrides: ``num_steps=--steps``, ``log_every_steps`` and
``checkpoint.every_steps`` = ``--steps`` (one progress line and one checkpoint,
both at the end, so the steady rate is not diluted by saves), the conv
implementation, and the compilation cache directory. Per conv implementation:

* ``cold``: an empty persistent compilation cache directory;
* ``warm``: a second process with the same cache directory (what a restart sees).

The last column splits the train step's jit (``jax.monitoring`` duration events of
the function named ``step``): Python tracing, lowering to MLIR, and XLA compile
(cold) or persistent-cache load (warm; the cache key is computed after lowering,
so tracing and lowering are paid on every start).

Reported: ``startup_seconds`` (``train()`` entry to the first step done: data,
state, step-0 evaluation and the step's compile or cache load, which runs in a
background thread alongside them), ``first_step_seconds`` (the first
``train_step`` call: what is left of the compile + one step; data loading
excluded), ``second_step_seconds`` (the second call, also timed alone: the
like-for-like steady reference, batch transfer included and no overlap with
loading), whether the first call ran the step compiled ahead, the steady
images/s of the progress line (steps 2..N, measured by the
loop), steps/s, and first / second step.

    python benchmarks/end_to_end.py                      # 100 steps, conv impl xla
    python benchmarks/end_to_end.py --steps 400 --impls auto
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

CONFIG = os.path.join(_common.REPO, "configs", "synthetic_tiny_x2softmax.py")


STEP_FUN_NAME = "step"  # x2jax.train.step.make_train_step's jitted function
EVENTS = {  # jax.monitoring duration events -> column
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_or_load_s",
}


def worker(args) -> None:
    sys.path.insert(0, _common.REPO)
    import jax.monitoring

    from x2jax.train import config as config_lib
    from x2jax.train.loop import train

    step_events: dict[str, float] = {}

    def listener(event, duration, **kwargs):
        if event in EVENTS and kwargs.get("fun_name") in (STEP_FUN_NAME, f"jit({STEP_FUN_NAME})"):
            step_events[EVENTS[event]] = step_events.get(EVENTS[event], 0.0) + duration
        elif event == "/jax/compilation_cache/cache_retrieval_time_sec":
            step_events["max_cache_read_s"] = max(step_events.get("max_cache_read_s", 0.0), duration)

    jax.monitoring.register_event_duration_secs_listener(listener)

    overrides = [f"num_steps={args.steps}", f"log_every_steps={args.steps}",
                 f"checkpoint.every_steps={args.steps}", f"model.conv_impl={args.impl}",
                 f"compilation_cache_dir={args.cache_dir}"] + list(args.override)
    config = config_lib.load_config(args.config, overrides)
    summary = train(config, args.workdir)
    summary = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
    summary["batch_size"] = int(config.data.batch_size)
    summary["peak_rss_gib"] = _common.peak_rss_gib()
    summary.update(step_events)
    print("RESULT " + json.dumps(summary), flush=True)


def run_once(args, impl: str, cache_dir: str, workdir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl,
           "--cache-dir", cache_dir, "--workdir", workdir, "--steps", str(args.steps),
           "--config", args.config] + [f"--override={o}" for o in args.override]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_common.REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    wall = time.perf_counter() - t0
    result = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not result:
        raise RuntimeError(f"train run failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    summary = json.loads(result[-1][len("RESULT "):])
    progress = [l for l in proc.stdout.splitlines() if "img/s" in l]
    match = re.search(r"([0-9.]+) img/s", progress[-1]) if progress else None
    summary["images_per_second"] = float(match.group(1)) if match else float("nan")
    summary["process_wall_s"] = wall
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--impls", default="xla", help="conv impls to compare, e.g. xla,im2col")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--override", action="append", default=[],
                        help="extra config override key=value (repeatable)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="xla", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = _common.parse_cpu_args(parser)
    if args.worker:
        worker(args)
        return

    print(f"# end to end: {os.path.relpath(args.config, _common.REPO)}, {args.steps} steps, "
          f"overrides {args.override or '-'}")
    print(f"# machine: {_common.machine_line()}", flush=True)
    root = tempfile.mkdtemp(prefix="x2jax_e2e_")
    rows = []
    try:
        for impl in [i for i in args.impls.split(",") if i]:
            cache = os.path.join(root, f"cache_{impl}")
            for phase in ("cold", "warm"):
                s = run_once(args, impl, cache, os.path.join(root, f"run_{impl}_{phase}"))
                steady = s["batch_size"] / s["images_per_second"]
                rows.append([impl, phase, f"{s['startup_seconds']:.2f}",
                             "yes" if s.get("step_compiled_ahead") else "no",
                             f"{s['first_step_seconds']:.3f}", f"{s['second_step_seconds']:.3f}",
                             f"{s['first_step_seconds'] / s['second_step_seconds']:.2f}", f"{steady:.3f}",
                             f"{s['images_per_second']:.0f}", f"{1 / steady:.2f}",
                             f"{s['process_wall_s']:.0f}", f"{s['peak_rss_gib']:.2f}",
                             f"{s.get('loss', float('nan')):.3f}",
                             " / ".join(f"{s.get(k, float('nan')):.2f}" for k in
                                        ("trace_s", "lower_s", "compile_or_load_s"))])
                print(f"# {impl} {phase}: done ({s['process_wall_s']:.0f} s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(_common.markdown_table(
        ["conv impl", "cache", "startup s", "compiled ahead", "first step s", "second step s",
         "first / second", "steady step s",
         "images/s", "steps/s", "process wall s", "peak RSS GiB", "final loss",
         "train step trace / lower / compile-or-cache-load s"], rows))
    print(f"# finished: load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

"""Shared helpers of the benchmark scripts: timing, machine description, tables."""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def set_threads(threads: int | None = None) -> int:
    """Pins OMP/MKL thread counts to ``threads`` (default: all cores); call before imports."""
    n = threads or os.cpu_count() or 1
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


def _runtime():
    sys.path.insert(0, REPO)
    from x2jax import runtime  # no jax import: safe before XLA_FLAGS is set

    return runtime


# jaxlib's defaults, the inverse of what x2jax.runtime sets (for comparison runs)
YNN_CONV_FLAG = _runtime().CPU_CONV_FLAG.replace("=-", "=+")
XLA_SCHEDULER_FLAG = _runtime().CPU_SCHEDULER_FLAG.replace("=false", "=true")


def parse_cpu_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Adds ``--ynn-convs`` and ``--xla-scheduler``, parses, then (before jax is
    imported) pins the thread counts to ``args.threads`` and sets ``XLA_FLAGS`` as
    ``train.py`` does (``x2jax.runtime.use_fast_cpu_flags``), except for what the
    options keep at jaxlib's default, for comparison: ``--ynn-convs`` YNNPACK
    convolutions, ``--xla-scheduler`` the concurrency-optimised schedule.
    Subprocesses (train.py, workers) inherit both."""
    parser.add_argument("--ynn-convs", action="store_true",
                        help="keep jaxlib's YNNPACK convolutions on CPU (x2jax's entry points "
                             "switch them off, see x2jax/runtime.py); for comparison")
    parser.add_argument("--xla-scheduler", action="store_true",
                        help="keep XLA:CPU's concurrency-optimised schedule (x2jax's entry "
                             "points pick the memory-minimising one); for comparison")
    args = parser.parse_args()
    set_threads(args.threads)
    keep = [YNN_CONV_FLAG] if args.ynn_convs else []
    keep += [XLA_SCHEDULER_FLAG] if args.xla_scheduler else []
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *keep]).strip()
    sys.path.insert(0, REPO)
    from x2jax.runtime import use_fast_cpu_flags
    use_fast_cpu_flags()  # the flags not set above
    return args


def time_fn(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Wall seconds of ``fn()`` (which must block until its result is ready), after warmup."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 1,
                     repeats: int = 5) -> dict[str, list[float]]:
    """Like :func:`time_fn` for several functions, run round-robin so that a change of
    machine load during the measurement hits every function alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def peak_rss_gib() -> float:
    """Peak resident memory of this process (ru_maxrss, KiB on Linux) in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine_line() -> str:
    """One line: cores, CPU flags of note, memory, load average, versions."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        have = [f for f in ("avx2", "avx512f", "avx512_bf16") if f" {f}" in text]
        flags = "+".join(have)
    except OSError:
        pass
    mem = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f"{pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    versions = [f"python {platform.python_version()}"]
    for mod in ("jax", "torch"):
        if mod in sys.modules:
            versions.append(f"{mod} {sys.modules[mod].__version__}")
    return (f"{os.cpu_count()} cores ({flags}), {mem}, load average {load}, "
            f"{', '.join(versions)}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def compile_with_flops(jitted, *args) -> tuple[object, float, float | None]:
    """``(compiled, compile seconds, XLA's FLOP count or None)`` of ``jitted`` on ``args``."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best effort
        pass
    return compiled, compile_s, flops

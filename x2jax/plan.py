"""Will this run fit a TPU slice? Compile its train step for the topology here, no TPU and no data.

    python -m x2jax.plan --config configs/webface42m_r100_x2softmax.py --topology v5p:2x2x4
    python -m x2jax.plan --config configs/ms1mv3_r50_x2softmax.py --topology v5e:2x2 --per-chip-batch 128 --json
    python -m x2jax.plan --config configs/glint360k_r100_x2softmax.py --topology v6e:2x4 --max-classes

The run is built as ``train.py`` builds it (the config file and ``--config.key=value``
overrides, :func:`x2jax.train.config.validate`, the mesh of ``config.mesh`` over the
topology's chips, ``x2jax.train.setup.build_step``) and compiled by libtpu for the
topology (:mod:`x2jax.tpu`). It prints, per chip: HBM for arguments, temporaries and
outputs against the chip's capacity (fits or not, by how much), the bytes of the
class-centre matrix W and its optimizer state, FLOPs, collectives by kind with their
bytes, and a lower bound on step time and images/s from FLOPs / peak and HBM bytes /
bandwidth (a bound from public chip figures, not a measurement). ``--max-classes`` /
``--max-batch`` fit per-chip memory linearly in C (or in the per-chip batch) from two
compiles and check the predicted maximum with a third.

Exit status: 0 the plan printed (fits or not); 2 a bad argument or config, libtpu
missing, an unknown topology; 3 ``--require-fit`` and it does not fit; 4 the TPU
compiler failed (crashed, or an error other than running out of HBM).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_USAGE, EXIT_NO_FIT, EXIT_COMPILER = 2, 3, 4
PROG = "python -m x2jax.plan"
GIB = 2**30

# Datasets the recipes name, with their class and image counts (insightface arcface_torch configs:
# num_classes / num_image of ms1mv3_r50, ms1mv2_r50, glint360k_r100, wf42m_pfc02_r100), all 112x112
# RecordIO; matched against data.path and the config file's name.
KNOWN_DATASETS = (
    ("ms1mv3", ("ms1mv3", "ms1m-retinaface", "ms1m_retinaface"), 93431, 5179510, 112),
    ("ms1mv2", ("ms1mv2", "faces_emore"), 85742, 5822653, 112),
    ("glint360k", ("glint360k",), 360232, 17091657, 112),
    ("webface42m", ("webface42m", "wf42m"), 2059906, 42474557, 112),
)
# Chips whose train-step compile is known to crash the process (SIGSEGV in libtpu 0.0.42.1):
# compiled in a child process by default (--isolate auto).
CRASHY_CHIPS = ("v6e",)


class PlanError(Exception):
    """What the user can fix (exit 2), or a failed compile (exit 4): one message, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def _say(message: str) -> None:
    print(f"plan: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Config, classes and image size


def load_plan_config(path: str, overrides: Sequence[str]) -> Any:
    """The config as train.py loads it: ``apply_overrides(load_config(path), overrides)``, validated.

    :func:`x2jax.train.config.validate` runs on a copy without the two checks that need data
    on disk (``data.path`` exists, the eval sets are found): the plan reads no data.
    """
    from x2jax.train import config as config_lib  # noqa: PLC0415

    config = config_lib.apply_overrides(config_lib.load_config(path), list(overrides))
    checked = copy.deepcopy(config)
    checked.eval.sets = ""
    if checked.data.name not in ("synthetic", "tfds") and not (
            checked.data.path and Path(os.path.expanduser(checked.data.path)).exists()):
        checked.data.path = os.curdir
    config_lib.validate(checked)
    return config


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What the step needs to know of the data, and where the plan took it from."""

    num_classes: int
    image_size: int
    num_images: int | None  # for num_epochs -> steps (the learning-rate schedule); None: unknown
    source: str


def data_shape(config: Any, config_path: str, *, num_classes: int | None = None,
               image_size: int | None = None) -> DataShape:
    """Classes, image size and image count of the run, without reading data.

    Synthetic data: its variant with ``data.num_identities`` / ``data.image_size``. Real
    datasets: the flags, else :data:`KNOWN_DATASETS` when ``data.path`` or the config's
    file name names one. Flags given always win.

    Raises:
      PlanError: a real dataset the plan cannot size and no flags.
    """
    d = config.data
    flags = " and flags" if num_classes or image_size else ""
    if d.name == "synthetic":
        from x2jax.data import synthetic  # noqa: PLC0415
        from x2jax.train.inputs import synthetic_overrides  # noqa: PLC0415

        sc = synthetic.get_config(d.variant, **synthetic_overrides(d))
        return DataShape(num_classes or sc.num_identities, image_size or sc.image_size,
                         sc.num_identities * sc.images_per_identity, f"synthetic variant {d.variant!r}{flags}")
    names = " ".join([str(d.path), Path(config_path.split(":")[0]).name]).lower()
    for name, aliases, classes, images, size in KNOWN_DATASETS:
        if any(a in names for a in aliases):
            return DataShape(num_classes or classes, image_size or size, images,
                             f"{name} ({classes} identities, {images} images at {size}x{size}){flags}")
    if num_classes and image_size:
        return DataShape(num_classes, image_size, None, "--num-classes / --image-size")
    known = ", ".join(f"{n} {c} classes at {s}" for n, _, c, _, s in KNOWN_DATASETS)
    raise PlanError(f"{config_path}: data.name={d.name!r} takes its class count and image size from the data, "
                    f"which the plan does not read, and neither data.path ({d.path!r}) nor the file name names a "
                    f"known dataset ({known}): pass --num-classes N and --image-size S")


# ---------------------------------------------------------------------------------------------
# One compile -> one report (a JSON-able dict)


def class_center_bytes(step: Any) -> dict[str, Any]:
    """Per-chip bytes of W and of its optimizer state, from the abstract state's shardings."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415

    state = step.abstract_state

    def shard_bytes(x: Any) -> int:
        return int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize

    w = state.params["head"]["weight"]
    markers = jax.tree.map(lambda _: False, state.params)
    markers["head"]["weight"] = True
    picked = optax.tree_map_params(
        step.tx, lambda v, is_w: v if is_w and isinstance(v, jax.ShapeDtypeStruct) else None,
        state.opt_state, markers, transform_non_params=lambda _: None,
        is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, optax.MaskedNode)))
    opt = [x for x in jax.tree.leaves(picked) if isinstance(x, jax.ShapeDtypeStruct)]
    weight, optimizer = shard_bytes(w), sum(shard_bytes(x) for x in opt)
    return {"shape": list(w.shape), "shard_shape": list(w.sharding.shard_shape(w.shape)), "dtype": str(w.dtype),
            "weight_bytes": weight, "optimizer_bytes": optimizer, "optimizer_leaves": len(opt),
            "total_bytes": weight + optimizer}


def _describe_run(config: Any, built: Any, num_classes: int, image_size: int) -> dict[str, Any]:
    from x2jax.parallel.mesh import mesh_axis_size  # noqa: PLC0415
    from x2jax.parallel.sharding import num_class_shards  # noqa: PLC0415
    from x2jax.tpu import chip_spec  # noqa: PLC0415

    chip = chip_spec(built.devices[0].device_kind)
    batch_shards = mesh_axis_size(built.mesh, built.rules.batch)
    w = built.step.abstract_state.params["head"]["weight"]
    return {
        "topology": built.topology, "chips": len(built.devices), "hosts": len({d.process_index for d in built.devices}),
        "chip": chip.name, "device_kind": chip.device_kind, "hbm_per_chip_bytes": chip.hbm_bytes,
        "peak_bf16_flops_per_s": chip.peak_flops, "hbm_bandwidth_bytes_per_s": chip.hbm_bandwidth,
        "mesh": {k: int(v) for k, v in built.mesh.shape.items()},
        "model": config.model.name, "dtype": config.model.dtype, "loss": config.loss.name,
        "sample_rate": float(config.loss.sample_rate), "num_classes": num_classes,
        "padded_classes": int(w.shape[0]), "class_shards": num_class_shards(built.mesh, built.rules),
        "image_size": image_size, "global_batch": int(config.data.batch_size),
        "per_chip_batch": int(config.data.batch_size) // batch_shards,
        "class_centers": class_center_bytes(built.step),
    }


def bound(flops_per_chip: float, bytes_per_chip: float, peak_flops: float, hbm_bandwidth: float,
          global_batch: int) -> dict[str, Any]:
    """Lower bound on step time: max(FLOPs / peak, HBM bytes / bandwidth), per chip; images/s from it."""
    compute_s, hbm_s = flops_per_chip / peak_flops, bytes_per_chip / hbm_bandwidth
    step_s = max(compute_s, hbm_s)
    return {"step_time_s": step_s, "images_per_s": global_batch / step_s if step_s > 0 else None,
            "compute_s": compute_s, "hbm_s": hbm_s, "limited_by": "compute" if compute_s >= hbm_s else "HBM bandwidth"}


def total_steps(config: Any, num_images: int | None) -> int:
    """The run's steps as train.py counts them (num_steps, or num_epochs of ``num_images``);
    where the image count is unknown, enough steps for the warm-up. Only the schedule uses it."""
    if config.num_steps > 0:
        return int(config.num_steps)
    if num_images:
        return max(int(math.ceil(config.num_epochs * max(num_images // config.data.batch_size, 1))), 1)
    return max(1000, 2 * int(config.schedule.warmup_steps))


def plan_in_process(config: Any, topology: str, *, num_classes: int, image_size: int, num_images: int | None = None,
                    capacity_bytes: int | None = None, say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Build, compile and summarise the step; the report dict (see :func:`format_report`).

    Raises:
      ImportError: no libtpu. ValueError / ConfigError: unknown topology, bad mesh or batch.
      PlanError: the compiler failed with anything but running out of HBM (exit 4).
    """
    from x2jax import tpu  # noqa: PLC0415

    steps = total_steps(config, num_images)
    built = tpu.build_train_step(config, topology, num_classes=num_classes, image_size=image_size,
                                 total_steps=steps)
    report = _describe_run(config, built, num_classes, image_size)
    capacity = capacity_bytes or report["hbm_per_chip_bytes"]
    report["capacity_bytes"] = capacity
    say(f"compiling for {topology} ({report['chips']} x {report['chip']}): {num_classes} classes, "
        f"batch {report['global_batch']} ({report['per_chip_batch']} per chip), {image_size}x{image_size} ...")
    t0 = time.perf_counter()
    try:
        compiled = tpu.compile_lowered(built.lower())
    except tpu.HbmExhaustedError as e:
        report["compile_s"] = time.perf_counter() - t0
        say(f"compiler: does not fit ({report['compile_s']:.1f} s): {e}")
        report.update(status="does not fit", fits=False, compiler_message=str(e),
                      memory={"required_bytes": e.required_bytes, "available_bytes": e.available_bytes})
        return report
    except Exception as e:  # noqa: BLE001 (any other compiler failure is reported, exit 4)
        raise PlanError(f"the TPU compiler failed for {topology}: {type(e).__name__}: {str(e).splitlines()[0]}",
                        EXIT_COMPILER) from None
    report["compile_s"] = time.perf_counter() - t0
    say(f"compiled in {report['compile_s']:.1f} s")
    summary = tpu.summarize_compiled(compiled)
    return _add_summary(report, summary)


def _add_summary(report: dict[str, Any], summary: Any) -> dict[str, Any]:
    total, capacity = summary.total_bytes, report["capacity_bytes"]
    report["memory"] = dict(summary.memory, total=total, headroom=capacity - total)
    report["fits"] = total <= capacity
    report["status"] = "fits" if report["fits"] else "does not fit"
    flops = summary.cost.get("flops")
    traffic = summary.cost.get("bytes accessed")
    per_step = None if flops is None else flops * report["chips"]
    report["flops"] = None if flops is None else {
        "per_chip": flops, "per_step": per_step, "per_image": per_step / report["global_batch"]}
    report["bytes_accessed_per_chip"] = traffic
    counts, nbytes = summary.counts(), summary.collective_bytes()
    report["collectives"] = {k: {"count": counts[k], "bytes": nbytes[k]} for k in counts}
    report["collective_count"], report["collective_bytes"] = sum(counts.values()), sum(nbytes.values())
    report["bound"] = None if flops is None or traffic is None else bound(
        flops, traffic, report["peak_bf16_flops_per_s"], report["hbm_bandwidth_bytes_per_s"], report["global_batch"])
    return report


# ---------------------------------------------------------------------------------------------
# The same compile in a child process (a libtpu crash becomes a report, not the end of the tool)


def run_isolated(argv: Sequence[str]) -> dict[str, Any]:
    """Run a child ``argv`` that prints one report as JSON on stdout; its crash becomes a report.

    The child's ``plan: `` progress lines are passed on to stderr as they come. Returns the
    child's report, or ``{"status": "compiler crashed", "compiler_message": ...}`` when it died
    of a signal. A child exiting 2 (a bad input) or 4 raises PlanError with its message.
    """
    import collections  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    tail: collections.deque[str] = collections.deque(maxlen=20)
    with tempfile.TemporaryFile("w+") as out:
        with subprocess.Popen(list(argv), stdout=out, stderr=subprocess.PIPE, text=True) as child:
            for line in child.stderr:
                if line.startswith("plan: "):
                    sys.stderr.write(line)
                    sys.stderr.flush()
                if line.strip():
                    tail.append(line.rstrip("\n"))
        returncode = child.returncode
        out.seek(0)
        stdout = out.read()
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return {"status": "compiler crashed", "fits": None,
                "compiler_message": f"the compiling process died of {name} (signal {sig})"}
    if returncode in (EXIT_USAGE, EXIT_COMPILER) and not stdout.strip():
        message = tail[-1] if tail else "(no message)"
        raise PlanError(message.removeprefix(f"{PROG}: error: "), returncode)
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        raise PlanError(f"the compiling process exited {returncode} without a report:\n" + "\n".join(list(tail)[-5:]),
                        EXIT_COMPILER) from None


def _child_argv(args: argparse.Namespace, overrides: Sequence[str], num_classes: int, image_size: int) -> list[str]:
    argv = [sys.executable, "-m", "x2jax.plan", "--config", args.config, "--topology", args.topology,
            "--num-classes", str(num_classes), "--image-size", str(image_size), "--json", "--isolate", "never"]
    if args.hbm_gib:
        argv += ["--hbm-gib", repr(args.hbm_gib)]
    return argv + [f"--config.{o}" for o in overrides]


# ---------------------------------------------------------------------------------------------
# Largest class count / per-chip batch that fits


def max_fit(compile_at: Callable[[int], dict[str, Any]], start: int, *, unit: int, what: str,
            first: dict[str, Any] | None = None, slope_guess: float | None = None,
            say: Callable[[str], None] = _say) -> dict[str, Any]:
    """The largest multiple of ``unit`` for which ``compile_at(x)`` fits, from a linear fit.

    Per-chip memory is taken as m(x) = a + b x. Two compiles that fit give the line:
    ``start`` (its report may be given as ``first``; divided by 4, up to 3 times, until it
    fits) and ``2 start``, or less where ``slope_guess`` (bytes per unit, default
    m(start) / start) says that is more than halfway to the maximum (the step is halved
    while it does not fit). The predicted maximum is compiled; if it does not fit, the line is
    corrected (through the failed point when it compiled, else to the compiler's own HBM
    limit) and the corrected maximum checked once more. ``compile_at`` returns a report with
    ``fits``, ``memory.total`` and ``capacity_bytes``.
    """
    tried: list[dict[str, Any]] = []

    def record(x: int, r: dict[str, Any]) -> dict[str, Any]:
        total = (r.get("memory") or {}).get("total")
        tried.append({"value": x, "fits": r.get("fits"), "total_bytes": total, "status": r.get("status")})
        if r.get("status") == "compiler crashed":
            raise PlanError(f"{what}: the compiler crashed at {x}: {r.get('compiler_message')}", EXIT_COMPILER)
        return r

    def at(x: int) -> dict[str, Any]:
        say(f"{what}: compile {len(tried) + 1} at {x} ...")
        return record(x, compile_at(x))

    def down(x: float) -> int:
        return max(unit, int(x // unit) * unit)

    def result(value: int | None, **extra: Any) -> dict[str, Any]:
        return {"value": value, "verified": value is not None, "compiles": sum(t.get("compiled", True) for t in tried),
                "tried": tried, **extra}

    x1 = down(start)
    r1 = record(x1, first) if first is not None and x1 == start else at(x1)
    if first is not None and x1 == start:
        tried[-1]["compiled"] = False  # the plan's own compile, reused
    for _ in range(3):
        if r1["fits"] or x1 <= unit:
            break
        x1 = down(x1 / 4)
        r1 = at(x1)
    if not r1["fits"]:
        return result(None, note=f"even {x1} does not fit")
    capacity, m1 = r1["capacity_bytes"], r1["memory"]["total"]
    guess = slope_guess or m1 / x1
    x2 = down(min(2 * x1, x1 + max(unit, 0.5 * (capacity - m1) / guess)))
    if x2 == x1:
        x2 = x1 + unit
    r2 = at(x2)
    while not r2["fits"] and x2 - x1 > unit:  # overshot: halve the step (rare: the guess is meant to be high)
        x2 = down(x1 + (x2 - x1) / 2)
        r2 = at(x2) if x2 > x1 else r2
        if len(tried) > 6:
            break
    if not r2["fits"]:
        return result(x1, note=f"{x1} fits and {x2} does not; no room for a fit")
    m2 = r2["memory"]["total"]
    slope = (m2 - m1) / (x2 - x1)
    fit = {"intercept_bytes": m1 - slope * x1, "bytes_per_unit": slope}
    if slope <= 0:
        return result(None, fit=fit, note=f"per-chip memory does not grow between {x1} and {x2}: no maximum")
    pred = down(x2 + (capacity - m2) / slope)
    r3 = at(pred)
    if not r3["fits"]:
        total3 = (r3.get("memory") or {}).get("total")
        if total3 is not None:  # compiled but over capacity: the line through the failed point
            pred2 = down(x2 + (capacity - m2) * (pred - x2) / (total3 - m2))
        else:  # the compiler refused it: aim at its own limit (e.g. 15.75 GiB of a 16 GiB v5e), 2 % lower
            available = (r3.get("memory") or {}).get("available_bytes")
            limit = min(capacity, available) if available else capacity
            pred2 = down(x2 + (0.98 * limit - m2) / slope)
        pred2 = min(pred2, pred - unit)
        if pred2 <= x2:
            return result(x2, fit=fit, note=f"the predicted {pred} does not fit; {x2} is the largest that fit")
        r4 = at(pred2)
        if not r4["fits"]:
            best = max(t["value"] for t in tried if t["fits"])
            return result(best, fit=fit, note=f"the predicted {pred} and {pred2} did not fit; "
                                              f"{best} is the largest that compiled and fit")
        pred, r3 = pred2, r4
    return result(pred, fit=fit, total_bytes=r3["memory"]["total"], capacity_bytes=capacity)


# ---------------------------------------------------------------------------------------------
# Text


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _sci(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}"


def format_report(r: dict[str, Any]) -> str:
    """The plan as a table of text lines."""
    lines = [f"x2jax plan: {r.get('config', '?')} on {r['topology']}"
             + (f" (compiled in {r['compile_s']:.1f} s)" if r.get("compile_s") is not None else "")]
    if "chips" in r:
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
        lines += [
            f"  chips                {r['chips']} x {r['device_kind']} ({r['chip']}), "
            f"{fmt_bytes(r['hbm_per_chip_bytes'])} HBM each; {r['hosts']} host(s); mesh {mesh}",
            f"  run                  {r['model']} {r['dtype']}, {r['loss']}"
            + (f" Partial FC {r['sample_rate']:g}" if r["sample_rate"] < 1 else "")
            + f"; {r['num_classes']} classes ({r['padded_classes']} rows over {r['class_shards']} shards); "
            f"{r['image_size']}x{r['image_size']}; batch {r['global_batch']} ({r['per_chip_batch']} per chip)",
        ]
    mem = r.get("memory") or {}
    cap = r.get("capacity_bytes")
    lines.append("per chip HBM")
    if "total" in mem:
        for k in ("arguments", "temporaries", "outputs", "aliased", "code"):
            note = " (outputs reusing donated arguments)" if k == "aliased" else ""
            lines.append(f"  {k:<20} {fmt_bytes(mem[k])}{note}")
        free = mem["headroom"]
        verdict = (f"FITS, {fmt_bytes(free)} free ({100 * free / cap:.1f} %)" if r["fits"]
                   else f"DOES NOT FIT, {fmt_bytes(-free)} over")
        lines.append(f"  total (peak)         {fmt_bytes(mem['total'])} of {fmt_bytes(cap)}: {verdict}")
    else:
        lines.append(f"  {r.get('status', '?').upper()}: {r.get('compiler_message', '')}")
        if mem.get("required_bytes") is not None:
            lines.append(f"  the compiler needs {fmt_bytes(mem['required_bytes'])} (temporaries) of "
                         f"{fmt_bytes(mem.get('available_bytes'))} it allows")
    w = r.get("class_centers")
    if w:
        lines.append(f"  W (class centres)    shard {' x '.join(map(str, w['shard_shape']))} {w['dtype']}: "
                     f"{fmt_bytes(w['weight_bytes'])} + optimizer state {fmt_bytes(w['optimizer_bytes'])} "
                     f"({w['optimizer_leaves']} array(s)) = {fmt_bytes(w['total_bytes'])}")
    f = r.get("flops")
    if f:
        lines.append(f"FLOPs                  per step {_sci(f['per_step'])}, per image {_sci(f['per_image'])}, "
                     f"per chip {_sci(f['per_chip'])}; HBM traffic per chip "
                     f"{fmt_bytes(r.get('bytes_accessed_per_chip'))}")
    if r.get("collectives"):
        lines.append(f"collectives per chip   {r['collective_count']} ops, {fmt_bytes(r['collective_bytes'])} "
                     "(sum of result shapes)")
        for k, v in r["collectives"].items():
            lines.append(f"  {k:<20} {v['count']:>5}  {fmt_bytes(v['bytes'])}")
    b = r.get("bound")
    if b:
        lines.append(f"bound (NOT a measurement): step >= {b['step_time_s'] * 1e3:.3g} ms, <= {b['images_per_s']:.4g} "
                     f"images/s ({b['limited_by']}: FLOPs / {r['peak_bf16_flops_per_s'] / 1e12:g} TFLOP/s = "
                     f"{b['compute_s'] * 1e3:.3g} ms, HBM bytes / {r['hbm_bandwidth_bytes_per_s'] / 1e9:g} GB/s = "
                     f"{b['hbm_s'] * 1e3:.3g} ms)")
    for key, label in (("max_classes", "max classes"), ("max_batch", "max per-chip batch")):
        m = r.get(key)
        if m:
            value = "none found" if m["value"] is None else str(m["value"])
            lines.append(f"{label:<22} {value}" + (" (compiled and fits)" if m.get("verified") else "")
                         + (f"; {m['note']}" if m.get("note") else "")
                         + (f"; linear fit {fmt_bytes(m['fit']['intercept_bytes'])} + "
                            f"{m['fit']['bytes_per_unit']:.4g} B each" if m.get("fit") else "")
                         + f"; {m['compiles']} more compile(s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file (file.py or file.py:arg), as train.py's")
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:2x2, v5p:2x2x4, v6e:2x4")
    p.add_argument("--num-classes", type=int, default=None, help="class count (real datasets; default: known recipe)")
    p.add_argument("--image-size", type=int, default=None, help="image side (real datasets; default: known recipe)")
    p.add_argument("--per-chip-batch", type=int, default=None,
                   help="set data.batch_size to this times the batch-axis chips")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="capacity per chip to check against (default: the chip's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--max-classes", action="store_true", help="also find the largest class count that fits")
    p.add_argument("--max-batch", action="store_true", help="also find the largest per-chip batch that fits")
    p.add_argument("--require-fit", action="store_true", help=f"exit {EXIT_NO_FIT} when the step does not fit")
    p.add_argument("--isolate", choices=("auto", "always", "never"), default="auto",
                   help=f"compile in a child process (auto: on {', '.join(CRASHY_CHIPS)}, whose compiles crash libtpu)")
    args, rest = p.parse_known_args(list(argv))
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            p.error(f"unrecognised argument {item!r} (overrides look like --config.key=value)")
        overrides.append(item[len("--config."):])
    for name in ("num_classes", "image_size", "per_chip_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hbm_gib is not None and args.hbm_gib <= 0:
        p.error(f"--hbm-gib must be > 0, got {args.hbm_gib}")
    return args, overrides


def run(args: argparse.Namespace, overrides: list[str]) -> tuple[dict[str, Any], int]:
    """The report and the exit status of a parsed command line."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; no TPU is opened
    from x2jax import tpu  # noqa: PLC0415
    from x2jax.parallel.mesh import make_mesh, mesh_axis_size  # noqa: PLC0415
    from x2jax.parallel.sharding import ShardingRules, num_class_shards  # noqa: PLC0415
    from x2jax.train.state import CLASS_PAD_MULTIPLE  # noqa: PLC0415

    config = load_plan_config(args.config, overrides)
    devices = tpu.topology_devices(args.topology)
    tpu.check_one_device_per_chip(devices, args.topology)
    chip = tpu.chip_spec(devices[0].device_kind)
    rules = ShardingRules.from_config(config.mesh.rules)
    if args.per_chip_batch:
        mesh = make_mesh(data=config.mesh.data, model=config.mesh.model, devices=devices)
        overrides = overrides + [f"data.batch_size={args.per_chip_batch * mesh_axis_size(mesh, rules.batch)}"]
        config = load_plan_config(args.config, overrides)
    shape = data_shape(config, args.config, num_classes=args.num_classes, image_size=args.image_size)
    num_classes, image_size = shape.num_classes, shape.image_size
    _say(f"{args.config}: {num_classes} classes at {image_size}x{image_size} from {shape.source}")
    isolate = args.isolate == "always" or (args.isolate == "auto" and chip.name in CRASHY_CHIPS)
    capacity = int(args.hbm_gib * GIB) if args.hbm_gib else None

    def compile_with(extra: Sequence[str], classes: int) -> dict[str, Any]:
        if isolate:
            r = run_isolated(_child_argv(args, overrides + list(extra), classes, image_size))
            r.setdefault("topology", args.topology)
            return r
        cfg = load_plan_config(args.config, overrides + list(extra)) if extra else config
        return plan_in_process(cfg, args.topology, num_classes=classes, image_size=image_size,
                               num_images=shape.num_images, capacity_bytes=capacity)

    if isolate:
        _say("compiling in a child process (" + ("--isolate always" if args.isolate == "always" else
                                                f"{chip.name} train-step compiles are known to crash libtpu") + ")")
    report = compile_with((), num_classes)
    report.update(config=args.config, overrides=overrides)
    report.setdefault("chip", chip.name)
    if args.max_classes:
        mesh = make_mesh(data=config.mesh.data, model=config.mesh.model, devices=devices)
        unit = math.lcm(CLASS_PAD_MULTIPLE, num_class_shards(mesh, rules))
        start = report.get("padded_classes") or num_classes
        w = report.get("class_centers") or {}
        # a class costs its W and optimizer rows with their gradient and update (~2x), and a column of
        # the logits and the arrays derived from them (~6 x 4 bytes x global batch x sample rate, per shard)
        guess = (2 * w["total_bytes"] / start + 24 * report["global_batch"] * report["sample_rate"]
                 / report["class_shards"]) if w.get("total_bytes") else None
        report["max_classes"] = max_fit(lambda c: compile_with((), c), start, unit=unit, what="max classes",
                                        first=report if report.get("padded_classes") == start else None,
                                        slope_guess=guess)
    if args.max_batch:
        mesh = make_mesh(data=config.mesh.data, model=config.mesh.model, devices=devices)
        shards = mesh_axis_size(mesh, rules.batch)
        start = max(1, int(config.data.batch_size) // shards)
        report["max_batch"] = max_fit(lambda b: compile_with((f"data.batch_size={b * shards}",), num_classes), start,
                                      unit=1, what="max per-chip batch",
                                      first=report if report.get("per_chip_batch") == start else None)
    if report.get("status") == "compiler crashed":
        return report, EXIT_COMPILER
    return report, EXIT_NO_FIT if args.require_fit and not report.get("fits") else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m x2jax.plan --config FILE --topology NAME [flags] [--config.key=value ...]``."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from x2jax.train import config as config_lib  # noqa: PLC0415

    try:
        report, status = run(args, overrides)
    except (config_lib.ConfigError, FileNotFoundError, ImportError, ValueError, PlanError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", EXIT_USAGE)
    print(json.dumps(report, indent=1) if args.json else format_report(report), flush=True)
    if status == EXIT_NO_FIT:
        print(f"{PROG}: error: the step does not fit {args.topology} (--require-fit)", file=sys.stderr, flush=True)
    elif status == EXIT_COMPILER:
        print(f"{PROG}: error: {report.get('compiler_message')}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

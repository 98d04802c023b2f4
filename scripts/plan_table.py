"""The recipe x topology table of docs/tpu.md: ``python -m x2jax.plan`` per row, one compile at a time.

    python scripts/plan_table.py                      # run every row not yet in the results, in order
    python scripts/plan_table.py --only ms1mv3_r50    # rows whose recipe or slice contains the text
    python scripts/plan_table.py --list               # the rows, and which are measured
    python scripts/plan_table.py --markdown           # the table of the measured rows (docs/tpu.md)

For each recipe and chip generation it looks for the smallest slice the step fits (slices
in ascending order until one fits; a compiler crash ends the search) and plans one
pod-scale slice (v5e:16x16 and v6e:16x16, 256 chips; v5p:4x4x4, one 64-chip cube), all
at 128 images per chip (the recipes' "128 per device"; ``--per-chip-batch 128``). Each row
runs in its own process (``--json``); its report, exit status and wall time are appended to
scripts/plan_table.jsonl, so an interrupted run resumes where it stopped. A crash of the
TPU compiler (v6e train steps crash libtpu 0.0.42.1) is a row status, not the end of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "plan_table.jsonl"
PER_CHIP_BATCH = 128
# Slices in ascending size (Cloud TPU docs' supported shapes; v5p's smallest slice is 2x2x1).
SLICES = {
    "v5e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v5p": ("2x2x1", "2x2x2", "2x4x4", "4x4x4"),
    "v6e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
}
POD = {"v5e": "16x16", "v5p": "4x4x4", "v6e": "16x16"}
RECIPES = ("ms1mv3_r50_x2softmax", "webface42m_r100_x2softmax", "webface42m_vit_b_x2softmax", "ms1mv3_r100_x2softmax",
           "glint360k_r100_x2softmax", "ms1mv3_vit_t_x2softmax", "synthetic_large_r18_x2softmax",
           "synthetic_tiny_x2softmax")
# What runs first: r50 and webface42m r100 on v5e and v5p, then v6e; ViT-B on v5e and v6e
# (next to r100), then the rest.
ORDER = ([(r, g) for r in RECIPES[:2] for g in ("v5e", "v5p")] + [(r, "v6e") for r in RECIPES[:2]]
         + [(RECIPES[2], g) for g in ("v5e", "v6e", "v5p")]
         + [(r, g) for r in RECIPES[3:] for g in ("v5e", "v5p", "v6e")])


def command(recipe: str, topology: str) -> list[str]:
    return ["python", "-m", "x2jax.plan", "--config", f"configs/{recipe}.py", "--topology", topology,
            "--per-chip-batch", str(PER_CHIP_BATCH)]


def load_results(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out[(row["recipe"], row["topology"])] = row
    return out


def run_row(recipe: str, topology: str, *, timeout_s: float) -> dict[str, Any]:
    """One ``python -m x2jax.plan ... --json`` in a child process: its report, status and wall time."""
    cmd = command(recipe, topology)
    print(f"plan_table: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    try:
        done = subprocess.run([sys.executable] + cmd[1:] + ["--json"], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout_s, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired:
        rc, stdout, stderr = None, "", f"timed out after {timeout_s:.0f} s"
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    try:
        report = json.loads(stdout) if stdout.strip() else None
    except json.JSONDecodeError:
        report = None
    if report is not None:
        status = report.get("status", "?")
    elif rc is not None and rc < 0:
        status = f"crashed (signal {-rc})"
    else:
        lines = [x for x in stderr.splitlines() if x.strip() and not x.startswith(("WARNING", "I0000", "W0000"))]
        status = "error: " + (lines[-1] if lines else f"exit {rc}")
    print(f"plan_table: {recipe} on {topology}: {status} ({wall:.0f} s)", file=sys.stderr, flush=True)
    return {"recipe": recipe, "topology": topology, "command": " ".join(cmd), "returncode": rc, "wall_s": wall,
            "load_average": [round(load0, 2), round(load1, 2)], "status": status, "report": report}


def planned(results: dict[tuple[str, str], dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
    """``(recipe, topology, why)`` of the rows still to run, in :data:`ORDER`, given the results so far."""
    for recipe, gen in ORDER:
        for shape in SLICES[gen]:  # the smallest slice that fits
            topology = f"{gen}:{shape}"
            row = results.get((recipe, topology))
            if row is None:
                yield recipe, topology, "smallest fitting slice"
                row = results.get((recipe, topology))
                if row is None:
                    break  # not run (filtered out): the search cannot go on
            if row["status"] != "does not fit":
                break  # fits, crashed or failed: the search ends here
        pod = f"{gen}:{POD[gen]}"
        if (recipe, pod) not in results:
            yield recipe, pod, "pod-scale slice"


def gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f}"


def markdown(results: dict[tuple[str, str], dict[str, Any]]) -> str:
    """The measured rows as a Markdown table (docs/tpu.md), in :data:`ORDER`."""
    head = ("| recipe | slice | fits? | per-chip HBM, GiB (of) | W + optimizer, MiB/chip | collectives (ops, MiB/chip) "
            "| bound: step ms, images/s | compile wall | command |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for recipe, gen in ORDER:
        for shape in dict.fromkeys(SLICES[gen] + (POD[gen],)):
            row = results.get((recipe, f"{gen}:{shape}"))
            if row is None:
                continue
            r = row["report"] or {}
            mem = r.get("memory") or {}
            fits = {"fits": "yes", "does not fit": "no"}.get(row["status"], row["status"])
            total = mem.get("total")
            hbm = (f"{gib(total)} ({gib(r.get('capacity_bytes'))})" if total is not None else
                   f"needs > {gib(mem['required_bytes'])} ({gib(mem.get('available_bytes'))} usable)"
                   if mem.get("required_bytes") else "")
            w = r.get("class_centers") or {}
            coll = f"{r['collective_count']}, {r['collective_bytes'] / 2**20:.1f}" if "collective_count" in r else ""
            b = r.get("bound")
            bound = f"{b['step_time_s'] * 1e3:.0f}, {b['images_per_s']:.0f}" if b else ""
            chips = r.get("chips", "?")
            la = row.get("load_average")  # the host's 1-minute load average at the row's start and end
            load = f" (load {la[0]:.1f}-{la[1]:.1f})" if la else ""
            w_mib = f"{w['total_bytes'] / 2**20:.1f}" if w else ""
            lines.append(f"| {recipe} | {gen}:{shape} ({chips} chip{'' if chips == 1 else 's'}) | {fits} | {hbm} | "
                         f"{w_mib} | {coll} | {bound} | {row['wall_s']:.0f} s{load} | `{row['command']}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="run only rows whose 'recipe topology' contains this text")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per row")
    p.add_argument("--max-rows", type=int, default=0, help="stop after this many rows (0: all)")
    p.add_argument("--list", action="store_true", help="print the rows still to run and exit")
    p.add_argument("--markdown", action="store_true", help="print the measured rows as a Markdown table and exit")
    args = p.parse_args(argv)
    results = load_results(args.results)
    if args.markdown:
        print(markdown(results))
        return 0
    ran = 0
    while True:
        todo = [(r, t, why) for r, t, why in planned(results) if args.only in f"{r} {t}"]
        if args.list:
            for recipe, topology, why in todo:
                print(f"{recipe} {topology} ({why})")
            print(f"{len(results)} row(s) measured in {args.results}")
            return 0
        if not todo or (args.max_rows and ran >= args.max_rows):
            return 0
        recipe, topology, _ = todo[0]
        row = run_row(recipe, topology, timeout_s=args.timeout)
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        results[(recipe, topology)] = row
        ran += 1


if __name__ == "__main__":
    sys.exit(main())

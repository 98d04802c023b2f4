"""``python -m x2jax.compare``: train every (loss, seed) of a comparison, then write the tables and figures.

    python -m x2jax.compare --config configs/synthetic_tiny_x2softmax.py \\
        --losses x2_softmax,arcface,cosface,normface --seeds 3 --workdir runs/compare_tiny \\
        [--batched | --sequential] [--config.key=value ...]

Everything is checked before any training (losses, their parameters, every
run's config, and in batched mode that the runs can share one step). Each run
trains in ``DIR/runs/<loss>/seed<s>`` as ``python train.py`` would (and
resumes there), so a comparison killed midway resumes with the same command;
``--report`` re-assembles ``results.json`` / ``results.md`` / the PNGs from what
is on disk without training. See docs/comparisons.md.
"""

from __future__ import annotations

import argparse
import sys

# The mode measured faster on this project's 2-core CPU with the default config:
# sequential (docs/benchmarks.md, "Batched comparison runs": batched K = 8 ran at
# 0.63-0.79x). --batched trains all runs in one vmapped step where that pays.
DEFAULT_MODE = "sequential"


def parse_args(argv: list[str], prog: str) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file (file.py or file.py:arg)")
    parser.add_argument("--losses", required=True, help="comma-separated registry names, each optionally "
                        "name:key=value:... (e.g. x2_softmax,arcface:margin=0.4)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per loss (config.seed, +1, ...)")
    parser.add_argument("--workdir", required=True, help="comparison directory")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--batched", dest="mode", action="store_const", const="batched",
                      help="all runs in one vmapped step" + (" (default)" if DEFAULT_MODE == "batched" else ""))
    mode.add_argument("--sequential", dest="mode", action="store_const", const="sequential",
                      help="one run after the other" + (" (default)" if DEFAULT_MODE == "sequential" else ""))
    parser.add_argument("--report", action="store_true", help="only re-assemble the results from disk")
    parser.add_argument("--angle-images", type=int, default=1024,
                        help="training images whose final angles are measured per run")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides look like --config.key=value)")
        overrides.append(item[len("--config."):])
    return args, overrides


def main(argv: list[str] | None = None, *, prog: str = "python -m x2jax.compare") -> int:
    """Runs the command; returns the exit status (2 for an error the user can fix)."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv, prog)
    import jax  # noqa: PLC0415

    from x2jax.compare import runs as runs_lib  # noqa: PLC0415
    from x2jax.compare.batched import check_batchable  # noqa: PLC0415
    from x2jax.train import config as config_lib  # noqa: PLC0415
    from x2jax.train.loop import USER_ERRORS  # noqa: PLC0415

    def say(message: str) -> None:
        print(message, flush=True)

    try:
        rest, loss_params = runs_lib.split_loss_overrides(overrides)
        config = config_lib.load_config(args.config, rest)  # as train.py loads it
        config_lib.validate(config)
        comparison = runs_lib.plan_comparison(config, losses_text=args.losses, num_seeds=args.seeds,
                                              workdir=args.workdir, loss_param_overrides=loss_params)
        mode = args.mode or DEFAULT_MODE
        if mode == "batched" and not args.report:
            n = config.mesh.num_devices or jax.device_count()
            try:
                check_batchable(comparison.runs, num_devices=n, process_count=jax.process_count())
            except config_lib.ConfigError as e:
                if args.mode == "batched":
                    raise
                say(f"not batched ({e}); training the runs one after the other")
                mode = "sequential"
        runs_lib.check_manifest(comparison)
        say(f"comparison in {comparison.workdir}: {len(comparison.losses)} loss(es) x {len(comparison.seeds)} "
            f"seed(s) = {len(comparison.runs)} runs, {mode}")
        return _run(comparison, mode=mode, report_only=args.report, angle_images=args.angle_images, say=say)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2


def _run(comparison, *, mode: str, report_only: bool, angle_images: int, say) -> int:
    from x2jax.compare.angles import final_angles  # noqa: PLC0415
    from x2jax.compare.batched_loop import train_batched  # noqa: PLC0415
    from x2jax.compare.plots import plot_accuracy, plot_target_angles  # noqa: PLC0415
    from x2jax.compare.results import write_results  # noqa: PLC0415
    from x2jax.compare.sequential import latest_step, train_sequential  # noqa: PLC0415
    from x2jax.compare.shared import build_shared  # noqa: PLC0415
    from x2jax.train.loop import setup_compilation_cache  # noqa: PLC0415
    from x2jax.train.workdir_lock import WorkdirLock  # noqa: PLC0415

    lock = WorkdirLock(comparison.workdir).acquire()  # one comparison process per directory
    try:
        setup_compilation_cache(comparison.base.compilation_cache_dir)
        shared = build_shared(comparison, say=say)
        complete = True
        if not report_only:
            todo = [p for p in comparison.runs if latest_step(p) < shared.total_steps]
            if todo:
                train = train_batched if mode == "batched" else train_sequential
                complete = train(todo, shared, comparison, say=say)
            if complete:
                for plan in comparison.runs:
                    final_angles(plan, shared, data_seed=comparison.data_seed, num_images=angle_images)
        results = write_results(comparison, shared.total_steps)
        pngs = plot_accuracy(results, comparison.workdir)
        angles_png = plot_target_angles(comparison, comparison.workdir)
        pngs += [angles_png] if angles_png is not None else []
        say(f"wrote {comparison.workdir / 'results.md'}, results.json and {', '.join(p.name for p in pngs)}")
        if not complete:
            say("interrupted: run the same command to resume")
        return 0
    finally:
        lock.release()


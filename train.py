"""Train a face-recognition model.

    python train.py                                   # the embedded default (synthetic, CPU minutes)
    python train.py --config configs/ms1mv3_r50_x2softmax.py --workdir runs/ms1mv3_r50 \
        --config.data.path=/data/ms1mv3 --config.data.batch_size=1024

--config takes file.py or file.py:arg (e.g. configs/ms1mv3_r50_x2softmax.py:arcface, the same
recipe with another loss). Any config key can be overridden with --config.<key>=<value>;
unknown keys are an error. Re-running the same command resumes from the latest checkpoint
in --workdir.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "synthetic_tiny_x2softmax.py"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="config file (file.py or file.py:arg)")
    parser.add_argument("--workdir", default=None, help="run directory (default: runs/<config name>)")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides look like --config.key=value)")
        overrides.append(item[len("--config."):])
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from x2jax.train import config as config_lib
    from x2jax.train.loop import USER_ERRORS, train

    try:
        config = config_lib.load_config(args.config, overrides)
        workdir = args.workdir or str(Path("runs") / Path(args.config.split(":")[0]).stem)
        train(config, workdir)
    except USER_ERRORS as e:  # what the user can fix: one message, no traceback
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    from x2jax.runtime import use_fast_cpu_flags

    use_fast_cpu_flags()  # before JAX starts: XLA_FLAGS is read once
    sys.exit(main())

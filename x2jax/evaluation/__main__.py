"""``python -m x2jax.evaluation``: the same command line as ``eval.py``."""

import sys

from x2jax.runtime import use_fast_cpu_flags

use_fast_cpu_flags()  # before JAX starts: XLA_FLAGS is read once

from x2jax.evaluation.main import main  # noqa: E402

sys.exit(main(prog="python -m x2jax.evaluation"))

"""``python -m x2jax.compare``: see :mod:`x2jax.compare.cli`."""

import sys

from x2jax.runtime import use_fast_cpu_flags

use_fast_cpu_flags()  # before JAX starts: XLA_FLAGS is read once

from x2jax.compare.cli import main  # noqa: E402

sys.exit(main())

"""Which optional dependencies (pyproject extras) a subpackage needs, checked when it is imported.

``pip install x2jax`` installs what ``x2jax.losses`` and ``x2jax.parallel`` need
(jax, numpy, chex, optax); models, data, evaluation and training need the
``train`` extra.
"""

from __future__ import annotations

import importlib.util


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that cannot be imported
        return False


def require(extra: str, *modules: str, what: str) -> None:
    """Raises ImportError naming ``extra`` if any of ``modules`` cannot be imported.

    Args:
      extra: the pyproject extra that installs them.
      modules: importable names, e.g. ``"orbax.checkpoint"``.
      what: the subpackage that needs them, for the message.
    """
    missing = [m for m in modules if not _installed(m)]
    if missing:
        raise ImportError(f"{what} needs the '{extra}' extra ({', '.join(missing)} cannot be imported): "
                          f"pip install 'x2jax[{extra}]'")

"""Load a model for evaluation: ``load_for_eval(path) -> (apply_fn, variables, info)``.

Dispatches over the two formats of :mod:`x2jax.models.io`:

* saved model (``x2jax.models.save_model``, also the output of the insightface
  weight converter ``python -m x2jax.models.convert``): ``<dir>/model.json`` +
  Orbax ``<dir>/variables`` (:func:`x2jax.models.io.load_model`);
* ``train.py`` run directories (or their ``checkpoints`` directory): the latest
  step's backbone (:func:`x2jax.models.io.load_backbone`).

``apply_fn(variables, images)`` maps float32 images (B, S, S, 3) normalised as
``(x / 255 - 0.5) / 0.5`` to embeddings (B, E) in inference mode; ``info`` is the
``model.json`` dict (``arch``, ``embedding_size``, ``image_size``, ...) plus
``"format"`` and ``"path"``. ``apply_fn`` is one object per load: reuse it across
:func:`x2jax.evaluation.embed_images` calls so that the compilation is reused.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import jax

ApplyFn = Callable[[Any, jax.Array], jax.Array]

# What the loaders add to a model description in ``info``.
LOADER_KEYS = ("format", "path", "step", "num_classes", "synthetic")


def load_for_eval(path: str | os.PathLike, **overrides: Any) -> tuple[ApplyFn, Any, dict[str, Any]]:
    """Load the model at ``path`` (see the module docstring for the formats).

    Args:
      path: a saved model directory or a ``train.py`` run directory.
      overrides: new values of :data:`x2jax.models.spec.LOAD_FIELDS` (e.g. ``dtype="bfloat16"``).

    Returns:
      ``(apply_fn, variables, info)``.

    Raises:
      FileNotFoundError: ``path`` is missing or neither format.
    """
    from x2jax.models import io  # imported here: evaluation must not need models at import time

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / io.MODEL_JSON).is_file():
        module, variables, info = io.load_model(path, **overrides)
        info = {**info, "format": "saved_model", "path": str(path.absolute())}
    elif io.is_train_run(path):
        module, variables, info = io.load_backbone(path, **overrides)
    else:
        raise FileNotFoundError(
            f"{path} is neither a saved model (no {io.MODEL_JSON}) nor a train.py run directory (no checkpoints/)"
        )
    return functools.partial(module.apply, train=False), variables, info


def model_spec(info: dict[str, Any], **overrides: Any):
    """The :class:`~x2jax.models.spec.ModelSpec` of a :func:`load_for_eval` ``info``, with ``overrides``.

    Raises:
      ValueError: ``info`` holds model keywords a ModelSpec does not have.
    """
    from x2jax.models.spec import ModelSpec  # noqa: PLC0415

    return ModelSpec.from_json(info, ignore=LOADER_KEYS).replace(**overrides)

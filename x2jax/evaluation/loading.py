"""Load a model for evaluation: ``load_for_eval(path) -> (apply_fn, variables, info)``.

Supported formats:

* saved model (``x2jax.models.save_model``, also the output of the insightface
  weight converter ``python -m x2jax.models.convert``): ``<dir>/model.json`` +
  Orbax ``<dir>/variables``;
* ``train.py`` checkpoints: through :func:`load_train_checkpoint` (a hook the
  training code fills in).

``apply_fn(variables, images)`` maps float32 images (B, S, S, 3) normalised as
``(x / 255 - 0.5) / 0.5`` to embeddings (B, E) in inference mode; ``info`` is the
``model.json`` dict (``arch``, ``embedding_size``, ``image_size``, ...) plus
``"format"`` and ``"path"``. ``apply_fn`` is one object per load: reuse it across
:func:`x2jax.evaluation.embed_images` calls so that the compilation is reused.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

ApplyFn = Callable[[Any, jax.Array], jax.Array]

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"


def load_for_eval(path: str | os.PathLike, **overrides: Any) -> tuple[ApplyFn, Any, dict[str, Any]]:
    """Load the model at ``path`` (see the module docstring for the formats).

    ``overrides`` go to :func:`x2jax.models.load_model` (e.g. ``dtype="bfloat16"``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / MODEL_JSON).is_file():
        return load_saved_model(path, **overrides)
    return load_train_checkpoint(path, **overrides)


def load_saved_model(path: str | os.PathLike, **overrides: Any) -> tuple[ApplyFn, Any, dict[str, Any]]:
    """A ``save_model`` directory, checked against its ``model.json`` before restoring."""
    from x2jax import models  # imported here: evaluation must not need models at import time

    path = Path(path).absolute()
    info = json.loads((path / MODEL_JSON).read_text())
    if "arch" not in info:
        raise ValueError(f"{path / MODEL_JSON} has no 'arch' entry")
    if not (path / VARIABLES_DIR).is_dir():
        raise FileNotFoundError(f"{path / VARIABLES_DIR} not found (incomplete save?)")
    kwargs = {k: v for k, v in info.items() if k != "arch"}
    module = models.get_model(info["arch"], **kwargs)
    check_saved_shapes(path / VARIABLES_DIR, models.abstract_variables(module), describe=_describe(info))
    module, variables, info = models.load_model(path, **overrides)
    apply_fn = functools.partial(module.apply, train=False)
    return apply_fn, variables, {**info, "format": "saved_model", "path": str(path)}


def load_train_checkpoint(path: str | os.PathLike, **overrides: Any) -> tuple[ApplyFn, Any, dict[str, Any]]:
    """A ``train.py`` run directory (or its ``checkpoints`` directory): the latest step's backbone.

    The model is rebuilt from the description stored in the checkpoint; ``info``
    carries ``format="train_checkpoint"``, ``step``, and for synthetic runs the
    ``synthetic`` data settings, so the held-out set is the one the run evaluated.
    """
    from x2jax.train.checkpointing import load_backbone

    path = Path(path)
    if not (path / "checkpoints").is_dir() and not any(p.name.isdigit() for p in path.iterdir()):
        raise FileNotFoundError(
            f"{path} is neither a saved model (no {MODEL_JSON}) nor a train.py run directory (no checkpoints/)"
        )
    module, variables, info = load_backbone(path, **overrides)
    return functools.partial(module.apply, train=False), variables, info


def _describe(info: dict[str, Any]) -> str:
    return (
        f"arch {info.get('arch')!r} (embedding_size {info.get('embedding_size')}, "
        f"image_size {info.get('image_size')}) from {MODEL_JSON}"
    )


def _key_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _leaves_with_names(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_key_str(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for p, leaf in leaves}


def check_saved_shapes(variables_dir: str | os.PathLike, expected: Any, *, describe: str) -> None:
    """Compare the Orbax checkpoint's metadata with ``expected`` (a ShapeDtypeStruct tree).

    Raises ValueError naming ``describe`` (the architecture) and the first entry
    that is missing, unexpected or of another shape; reads no array data.
    """
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(os.fspath(variables_dir))
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    saved = _leaves_with_names(tree)
    wanted = _leaves_with_names(expected)
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {variables_dir} does not fit {describe}: "
            f"{len(missing)} entries missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            "was it saved from another architecture?"
        )
    for name, (shape, _) in wanted.items():
        if saved[name][0] != shape:
            raise ValueError(
                f"checkpoint {variables_dir} does not fit {describe}: {name} is saved with shape "
                f"{saved[name][0]}, the model needs {shape}; was it saved from another architecture or image size?"
            )

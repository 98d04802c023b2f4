"""Saved-model format: ``<dir>/model.json`` + Orbax ``<dir>/variables``.

``model.json`` = ``{"arch": name, "embedding_size": E, "image_size": S, ...}``: the
keywords of :func:`x2jax.models.get_model` (``dtype`` as a string). ``variables``
is a StandardCheckpointer checkpoint of ``{'params', 'batch_stats'}`` (float32).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from x2jax.models.registry import Variables, abstract_variables, get_model

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"
# get_model keywords that may differ between saving and loading (they do not change shapes).
RUNTIME_KWARGS = ("dtype", "conv_impl", "dropout")


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def check_variables(module: nn.Module, variables: Variables) -> None:
    """Raises ValueError naming the first entry whose presence, shape or dtype differs
    from what ``module`` expects."""
    expected = dict(jax.tree_util.tree_flatten_with_path(abstract_variables(module))[0])
    got = dict(jax.tree_util.tree_flatten_with_path(
        {k: variables.get(k, {}) for k in ("params", "batch_stats")})[0])
    arch = getattr(module, "arch", type(module).__name__)
    exp_names = {_path_str(p): v for p, v in expected.items()}
    got_names = {_path_str(p): v for p, v in got.items()}
    missing = sorted(set(exp_names) - set(got_names))
    unexpected = sorted(set(got_names) - set(exp_names))
    if missing or unexpected:
        raise ValueError(f"variables do not fit {arch}: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for name, want in exp_names.items():
        have = got_names[name]
        if tuple(np.shape(have)) != tuple(want.shape):
            raise ValueError(f"variables do not fit {arch}: {name} has shape "
                             f"{tuple(np.shape(have))}, expected {tuple(want.shape)}")
        if jnp.dtype(have.dtype) != jnp.dtype(want.dtype):
            raise ValueError(f"variables do not fit {arch}: {name} has dtype {have.dtype}, "
                             f"expected {want.dtype}")


def save_model(directory: str | os.PathLike, variables: Variables, *, arch: str,
               **model_kwargs: Any) -> Path:
    """Writes ``variables`` (checked against ``get_model(arch, **model_kwargs)``) and
    ``model.json`` under ``directory``; returns the directory. Refuses to overwrite."""
    directory = Path(directory).absolute()
    module = get_model(arch, **model_kwargs)
    check_variables(module, variables)
    if (directory / VARIABLES_DIR).exists() or (directory / MODEL_JSON).exists():
        raise FileExistsError(f"{directory} already holds a saved model")
    info = {"arch": arch, "embedding_size": module.embedding_size,
            "image_size": module.image_size}
    for key, value in model_kwargs.items():
        info[key] = jnp.dtype(value).name if key == "dtype" else value
    info.setdefault("dtype", jnp.dtype(module.dtype).name)
    json.dumps(info)  # fail before writing anything if a keyword is not JSON-serialisable
    directory.mkdir(parents=True, exist_ok=True)
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / VARIABLES_DIR, state)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (directory / MODEL_JSON).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return directory


def load_model(directory: str | os.PathLike,
               **overrides: Any) -> tuple[nn.Module, Variables, dict[str, Any]]:
    """Reads a saved model: ``(module, variables, info)``, variables on the default device.

    ``overrides`` may change ``dtype``, ``conv_impl`` or ``dropout`` (e.g. bf16 inference).
    """
    directory = Path(directory).absolute()
    info_path = directory / MODEL_JSON
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: not a saved x2jax model directory")
    if not (directory / VARIABLES_DIR).is_dir():
        raise FileNotFoundError(f"{directory / VARIABLES_DIR} not found (incomplete save?)")
    info = json.loads(info_path.read_text())
    bad = set(overrides) - set(RUNTIME_KWARGS)
    if bad:
        raise ValueError(f"load_model can override only {RUNTIME_KWARGS}, got {sorted(bad)}")
    kwargs = {k: v for k, v in info.items() if k != "arch"}
    kwargs.update(overrides)
    module = get_model(info["arch"], **kwargs)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          abstract_variables(module))
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(directory / VARIABLES_DIR, target)
    return module, dict(variables), info

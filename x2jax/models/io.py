"""The two on-disk model formats: a saved model, and the backbone of a training checkpoint.

Saved model: ``<dir>/model.json`` + Orbax ``<dir>/variables``. ``model.json`` =
``{"arch": name, "embedding_size": E, "image_size": S, ...}``: the keywords of
:func:`x2jax.models.get_model` (``dtype`` as a string; a
:meth:`~x2jax.models.spec.ModelSpec.to_json` dict for models saved by training).
``variables`` is a StandardCheckpointer checkpoint of ``{'params', 'batch_stats'}``
(float32).

Training checkpoint (``train.py``): ``<run>/checkpoints/<step>/{state, data, meta}``
(:mod:`x2jax.train.checkpointing` writes it); ``meta["model"]`` is the
:class:`~x2jax.models.spec.ModelSpec` JSON. :func:`load_backbone` rebuilds the backbone
from it and reads only the backbone's variables out of ``state``.
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

from x2jax.models.layers import resolve_conv_impl
from x2jax.models.registry import Variables, abstract_variables, get_model
from x2jax.models.spec import LOAD_FIELDS, ModelSpec

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"


class CheckpointCorruptError(RuntimeError):
    """Checkpoints exist but none of them can be read."""


def one_line(error: BaseException) -> str:
    """``"Type: message"`` of ``error`` on one line, at most about 200 characters."""
    text = " ".join(str(error).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _key_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _leaves(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_key_str(p): leaf for p, leaf in leaves}


def check_shapes(have: Any, expected: Any, *, subject: str, saved: bool = False) -> None:
    """Compares a variables tree (or a checkpoint's metadata tree) with ``expected``.

    Args:
      have: arrays, ShapeDtypeStructs or Orbax array metadata.
      expected: the ShapeDtypeStruct tree the model needs (:func:`abstract_variables`).
      subject: the start of the message, e.g. "variables do not fit r50".
      saved: ``have`` is on disk: dtypes are not compared (restoring casts) and the
        message asks whether it was saved from another architecture.

    Raises:
      ValueError: naming the first entry that is missing, unexpected, or of another
        shape (or dtype, when not ``saved``).
    """
    have, want = _leaves(have), _leaves(expected)
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    hint = "; was it saved from another architecture?" if saved else ""
    if missing or unexpected:
        raise ValueError(f"{subject}: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}{hint}")
    verb = "is saved with" if saved else "has"
    for name, w in want.items():
        got = have[name]
        if tuple(np.shape(got)) != tuple(w.shape):
            raise ValueError(f"{subject}: {name} {verb} shape {tuple(np.shape(got))}, expected "
                             f"{tuple(w.shape)}{' (another architecture or image size?)' if saved else ''}")
        if not saved and jnp.dtype(got.dtype) != jnp.dtype(w.dtype):
            raise ValueError(f"{subject}: {name} has dtype {got.dtype}, expected {w.dtype}")


def _check_overrides(overrides: dict[str, Any], caller: str) -> None:
    bad = set(overrides) - set(LOAD_FIELDS)
    if bad:
        raise ValueError(f"{caller} can override only {LOAD_FIELDS}, got {sorted(bad)}")


def save_model(directory: str | os.PathLike, variables: Variables, *, arch: str,
               **model_kwargs: Any) -> Path:
    """Writes ``variables`` (checked against ``get_model(arch, **model_kwargs)``) and
    ``model.json`` under ``directory``; returns the directory. Refuses to overwrite."""
    directory = Path(directory).absolute()
    module = get_model(arch, **model_kwargs)
    check_shapes({k: variables.get(k, {}) for k in ("params", "batch_stats")}, abstract_variables(module),
                 subject=f"variables do not fit {getattr(module, 'arch', type(module).__name__)}")
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

    The variables on disk are checked against ``model.json`` before any is read;
    ``conv_impl="auto"`` is resolved for the default backend.

    Args:
      directory: the saved model's directory.
      overrides: new values of :data:`~x2jax.models.spec.LOAD_FIELDS` (``dtype``,
        ``conv_impl``, ``dropout``; e.g. bf16 inference).

    Returns:
      The module, ``{'params', 'batch_stats'}`` and the ``model.json`` dict.

    Raises:
      FileNotFoundError: no ``model.json`` or no ``variables``.
      ValueError: another override, no ``arch``, or variables that do not fit.
    """
    directory = Path(directory).absolute()
    info_path = directory / MODEL_JSON
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: not a saved x2jax model directory")
    info = json.loads(info_path.read_text())
    if "arch" not in info:
        raise ValueError(f"{info_path} has no 'arch' entry")
    if not (directory / VARIABLES_DIR).is_dir():
        raise FileNotFoundError(f"{directory / VARIABLES_DIR} not found (incomplete save?)")
    _check_overrides(overrides, "load_model")
    kwargs = {k: v for k, v in info.items() if k != "arch"}
    check_shapes(_saved_metadata(directory / VARIABLES_DIR), abstract_variables(get_model(info["arch"], **kwargs)),
                 subject=f"checkpoint {directory / VARIABLES_DIR} does not fit {_describe(info)}", saved=True)
    kwargs.update(overrides)
    if "conv_impl" in kwargs:
        kwargs["conv_impl"] = resolve_conv_impl(kwargs["conv_impl"])
    module = get_model(info["arch"], **kwargs)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          abstract_variables(module))
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(directory / VARIABLES_DIR, target)
    return module, dict(variables), info


def _describe(info: dict[str, Any]) -> str:
    return (f"arch {info.get('arch')!r} (embedding_size {info.get('embedding_size')}, "
            f"image_size {info.get('image_size')}) from {MODEL_JSON}")


def _saved_metadata(variables_dir: Path) -> Any:
    """The array metadata tree of a StandardCheckpointer checkpoint (no array data read)."""
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(os.fspath(variables_dir))
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def is_train_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``train.py`` run directory or its ``checkpoints`` directory."""
    path = Path(path)
    return (path / "checkpoints").is_dir() or any(p.name.isdigit() for p in path.iterdir())


def read_meta(checkpoint_dir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
    """``(step, meta)`` of the latest (or given) finished checkpoint under ``checkpoint_dir``.

    Raises:
      FileNotFoundError: no such directory or no finished checkpoint in it.
    """
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    manager = ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"meta": ocp.JsonCheckpointHandler()},
    )
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    return step, meta


def restore_backbone(checkpoint_dir: str | os.PathLike, abstract_variables: Any, step: int | None = None) -> tuple[int, Any]:
    """Restore only the backbone ``{'params', 'batch_stats'}`` of a training checkpoint.

    ``abstract_variables``: ShapeDtypeStructs (with shardings) of the backbone
    variables. The class-centre matrix and optimizer state are not read.
    """
    directory = Path(checkpoint_dir).absolute()
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    )
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    target = {"params": {"backbone": abstract_variables["params"]}, "batch_stats": abstract_variables["batch_stats"]}
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)
        if getattr(a, "sharding", None) is not None
        else ocp.RestoreArgs(dtype=a.dtype),
        target,
    )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        ),
    )["state"]
    manager.close()
    return step, {"params": restored["params"]["backbone"], "batch_stats": restored["batch_stats"]}


def finished_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
    """The finished checkpoint steps under ``checkpoint_dir``, newest first."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    manager = ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(create=False))
    steps = sorted(manager.all_steps(), reverse=True)
    manager.close()
    return steps


def load_backbone(path: str | os.PathLike, step: int | None = None, **overrides: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(module, variables, info)`` of a training run's backbone (latest step by default).

    ``path`` is a run's workdir or its ``checkpoints`` directory. Variables land on
    the default device; W and the optimizer state are not read. ``info`` is the
    model description plus ``format``, ``step``, ``num_classes`` and, for runs on
    synthetic data, ``synthetic`` (the data config that names the held-out set).
    ``overrides`` change :data:`~x2jax.models.spec.LOAD_FIELDS` of the model
    (``dtype``, ``conv_impl``, ``dropout``); the module is built with
    :meth:`~x2jax.models.spec.ModelSpec.build` for the default backend.

    Without ``step``, a latest step that does not read (truncated file, broken
    meta) is reported in one line and the next older one is read; nothing is
    moved, since a training run may own the directory. With ``step``, that step
    or a clear error.

    Raises:
      FileNotFoundError: no checkpoint directory or no finished checkpoint.
      ValueError: an override of another field.
      CheckpointCorruptError: no step (or not ``step``) reads.
    """
    path = Path(path)
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    _check_overrides(overrides, "load_backbone")
    steps = [step] if step is not None else finished_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    failures = []
    for s in steps:
        try:
            return _load_backbone_step(directory, s, overrides)
        except Exception as e:  # pylint: disable=broad-except  (any failure to read marks the step)
            failures.append(f"step {s}: {one_line(e)}")
            if step is not None:
                break
            print(f"checkpoint {directory / str(s)} does not restore ({one_line(e)}); trying the next older step",
                  flush=True)
    raise CheckpointCorruptError(f"no checkpoint in {directory} restores: " + "; ".join(failures))


def _load_backbone_step(directory: Path, step: int, overrides: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    _, meta = read_meta(directory, step)
    module = ModelSpec.from_json(meta["model"]).replace(**overrides).build()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_variables(module)
    )
    step, variables = restore_backbone(directory, abstract, step)
    info = dict(meta["model"], format="train_checkpoint", step=step, num_classes=meta["num_classes"],
                path=str(directory))
    data = meta["config"]["data"]
    if data["name"] == "synthetic":
        info["synthetic"] = {"variant": data["variant"]}
        info["synthetic"].update({k: data[k] for k in ("num_identities", "images_per_identity", "image_size") if data[k]})
        # families and long tail off their defaults (x2jax.evaluation.sets.SHAPE_FIELDS; this floor cannot import it)
        info["synthetic"].update({k: data[k] for k, off in (("family_size", 1), ("family_similarity", 0.0),
                                                            ("zipf_exponent", 0.0)) if data.get(k, off) != off})
    return module, variables, info

"""ONNX export of the embedding function, in the layout insightface's inference runs.

    from x2jax.evaluation.onnx_export import export_onnx
    info = export_onnx(spec, variables, "model.onnx")   # python eval.py --checkpoint DIR --export-onnx model.onnx

The graph is the model contract of insightface's recognition models, so that
``insightface.model_zoo.get_model("model.onnx")`` returns an ``ArcFaceONNX`` whose
``get_feat`` / ``FaceAnalysis`` feed it correctly:

* input ``input``: float32 (B, 3, S, S), NCHW, **RGB**, normalised as
  ``(x - 127.5) / 127.5`` (what ``ArcFaceONNX`` does: ``cv2.dnn.blobFromImages(img,
  1/127.5, (S, S), (127.5,) * 3, swapRB=True)`` on BGR uint8 crops); B is dynamic.
  This is x2jax's own preprocessing, ``(x / 255 - 0.5) / 0.5``, up to float rounding;
  the NCHW -> NHWC transpose is inside the graph;
* output ``embedding``: float32 (B, E), neither flip-summed nor L2-normalised.

Normalisation stays out of the graph: ``ArcFaceONNX`` guesses "normalisation inside"
(mean 0, std 1) when the names of the first 8 nodes start with ``Sub``/``_minus``
and ``Mul``/``_mul``; jax2onnx names nodes ``node_<Op>_<n>``, and :func:`export_onnx`
renames any node that would trip that guess, so insightface uses 127.5 / 127.5.

The network is ``spec.replace(conv_impl="xla", dtype="float32").build()`` in eval
mode (BN running statistics, no dropout), converted with jax2onnx (the ``onnx``
extra: ``pip install 'x2jax[onnx]'``); weights are constants of the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from typing import Any

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 17
"""ONNX opset of the file: 17 runs on onnxruntime >= 1.14 (insightface's deployments)."""

EXTRA_HINT = "pip install 'x2jax[onnx]'"

# ArcFaceONNX's sniffing of "normalisation inside the graph" (first 8 node names).
_SNIFF_NODES = 8
_SNIFF_PREFIXES = ("Sub", "_minus", "Mul", "_mul")


class OnnxExtraMissing(ImportError):
    """jax2onnx / onnx are not installed (the ``onnx`` extra)."""


class OnnxExportError(ValueError):
    """The model could not be converted, or the file could not be written."""


@dataclasses.dataclass(frozen=True)
class OnnxExportInfo:
    """What :func:`export_onnx` wrote."""

    path: str
    arch: str
    input_name: str
    input_shape: tuple[int | str, ...]
    output_name: str
    output_shape: tuple[int | str, ...]
    opset: int
    seconds: float

    def describe(self) -> str:
        """Two lines: the graph's input and output."""
        shape = lambda s: "(" + ", ".join(str(d) for d in s) + ")"
        return (
            f"input  {self.input_name!r}: float32 {shape(self.input_shape)} NCHW, RGB, "
            f"(x - 127.5) / 127.5 (insightface ArcFaceONNX's preprocessing), dynamic batch B\n"
            f"output {self.output_name!r}: float32 {shape(self.output_shape)} embedding "
            f"(not normalised, not flip-summed)"
        )


def _import_converter():
    try:
        import jax2onnx  # noqa: PLC0415
        import onnx  # noqa: PLC0415
    except ImportError as e:
        raise OnnxExtraMissing(
            f"ONNX export needs jax2onnx and onnx ({EXTRA_HINT}): {e}"
        ) from e
    return jax2onnx, onnx


def prepare_output_path(path: str | os.PathLike) -> str:
    """Absolute path whose directory exists and is writable (probed with a real file)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise OnnxExportError(f"cannot write the ONNX file {path}: it is a directory")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".x2jax-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OnnxExportError(
            f"cannot write the ONNX file {path}: {e.strerror or e} ({parent})"
        ) from e
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _avoid_normalisation_sniff(model: Any) -> int:
    """Rename early nodes whose names would make ArcFaceONNX skip its 127.5 / 127.5."""
    renamed = 0
    for node in model.graph.node[:_SNIFF_NODES]:
        if node.name.startswith(_SNIFF_PREFIXES):
            node.name = f"x2jax_{node.name}"
            renamed += 1
    return renamed


def _dims(value_info: Any) -> tuple[int | str, ...]:
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)


def export_onnx(
    spec: Any,
    variables: Any,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
) -> OnnxExportInfo:
    """Write the eval-mode embedding of ``spec`` as an ONNX file insightface can load.

    Args:
      spec: a :class:`~x2jax.models.spec.ModelSpec`, or a
        :func:`~x2jax.evaluation.loading.load_for_eval` ``info`` dict.
      variables: the backbone's ``{'params', 'batch_stats'}``.
      path: the ``.onnx`` file (parent directories created; written atomically).
      opset: the ONNX opset (default :data:`DEFAULT_OPSET`).

    Returns:
      An :class:`OnnxExportInfo` (path, graph input/output, conversion time).

    Raises:
      OnnxExtraMissing: jax2onnx / onnx are not installed.
      OnnxExportError: ``path`` is not writable (checked before converting), or
        jax2onnx cannot convert the model (the message names the arch and the error).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from x2jax.evaluation.loading import model_spec  # noqa: PLC0415
    from x2jax.models.spec import ModelSpec  # noqa: PLC0415

    jax2onnx, onnx = _import_converter()
    if not isinstance(spec, ModelSpec):
        spec = model_spec(spec)
    path = prepare_output_path(path)
    size = spec.image_size
    module = spec.replace(conv_impl="xla", dtype="float32").build()
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32) if jnp.issubdtype(jnp.result_type(v), jnp.floating)
                             else v, variables)

    def embed(images_nchw):
        return module.apply(variables, jnp.transpose(images_nchw, (0, 2, 3, 1)), train=False)

    start = time.perf_counter()
    serde_log = logging.getLogger("onnx_ir.serde")  # "value type ... not known" for shape constants
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        model = jax2onnx.to_onnx(
            embed,
            [("B", 3, size, size)],
            model_name=f"x2jax_{spec.arch}",
            opset=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
    except Exception as e:  # jax2onnx raises many kinds (NotImplementedError for an op, ...)
        raise OnnxExportError(
            f"jax2onnx {getattr(jax2onnx, '__version__', '?')} cannot convert {spec.arch} "
            f"({size}px) to ONNX opset {opset}: {_first_line(e)}"
        ) from e
    finally:
        serde_log.setLevel(level)
    seconds = time.perf_counter() - start
    _avoid_normalisation_sniff(model)
    meta = {
        "x2jax_model": json.dumps(spec.replace(conv_impl="xla", dtype="float32").to_json()),
        "x2jax_input": "float32 (B, 3, S, S) NCHW RGB, (x - 127.5) / 127.5",
        "x2jax_output": "float32 (B, E) embedding, not normalised",
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have made
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, (OSError, ValueError)):
            raise OnnxExportError(f"cannot write the ONNX file {path}: {_first_line(e)}") from e
        raise
    return OnnxExportInfo(
        path=path,
        arch=spec.arch,
        input_name=model.graph.input[0].name,
        input_shape=_dims(model.graph.input[0]),
        output_name=model.graph.output[0].name,
        output_shape=_dims(model.graph.output[0]),
        opset=opset,
        seconds=seconds,
    )


__all__ = ["DEFAULT_OPSET", "OnnxExportError", "OnnxExportInfo", "OnnxExtraMissing", "export_onnx", "prepare_output_path"]

"""Margin losses for face recognition, as pure functions.

Every margin function has one contract::

    fn(cosine (B, C), labels (B,), *, scale=..., **margin_params) -> logits (B, C) float32

Only the target column ``labels[i]`` of each row is changed by the margin; every
other column is ``scale * cosine``. Any float input dtype is computed in
float32; the floor of ``sin theta`` in arccos gradients follows the input dtype
(:func:`sin_floor`). Concrete labels outside ``[0, C)`` raise ``ValueError``;
under ``jit`` such a row gets no margin and contributes 0 (count them with
:func:`count_out_of_range`, or check in-graph with :func:`checkify_labels`).

Each loss is one :class:`MarginSpec` in the registry (:func:`register`,
:func:`spec`, :func:`get`, ``NAMES``): config validation, presets, the
single-device and sharded heads and the training state all read it.
"""

from x2jax.losses import _registry
from x2jax.losses._adaptive import (
    adaface,
    adaface_update,
    curricularface,
    curricularface_update,
    elasticface,
)
from x2jax.losses._common import (
    NORM_EPS,
    SIN_FLOOR,
    TargetMargin,
    check_labels,
    check_nonempty_batch,
    checkify_labels,
    clip_cosine,
    count_out_of_range,
    cross_entropy,
    l2_normalize,
    safe_arccos,
    sin_floor,
    target_margin_logits,
)
from x2jax.losses._fused import margin_loss, target_margin_cross_entropy, target_only_logits
from x2jax.losses._margins import arcface, combined_margin, cosface, normface, sphereface, x2_softmax
from x2jax.losses._registry import (
    MarginSpec,
    get,
    initial_state,
    register,
    spec,
    spec_of,
    update_state,
)


def __getattr__(name: str):
    if name == "NAMES":  # sorted registered names, kept current by register()
        return _registry.NAMES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "NAMES",
    "NORM_EPS",
    "SIN_FLOOR",
    "MarginSpec",
    "TargetMargin",
    "adaface",
    "adaface_update",
    "arcface",
    "check_labels",
    "check_nonempty_batch",
    "checkify_labels",
    "clip_cosine",
    "combined_margin",
    "cosface",
    "count_out_of_range",
    "cross_entropy",
    "curricularface",
    "curricularface_update",
    "elasticface",
    "get",
    "initial_state",
    "l2_normalize",
    "margin_loss",
    "normface",
    "register",
    "safe_arccos",
    "sin_floor",
    "spec",
    "spec_of",
    "sphereface",
    "target_margin_cross_entropy",
    "target_margin_logits",
    "target_only_logits",
    "update_state",
    "x2_softmax",
]

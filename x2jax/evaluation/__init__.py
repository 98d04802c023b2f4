"""Evaluation: verification pairs (insightface protocol), IJB-B/C 1:1, export (jax.export, ONNX), loading.

Modules: ``sets`` (verification sets by name), ``report`` (tables, JSON, ROC
figures), ``main`` (the ``eval.py`` command line).
"""

from x2jax.evaluation.loading import load_for_eval
from x2jax.evaluation.onnx_export import export_onnx
from x2jax.evaluation.verification import (
    VerificationResult,
    embed_images,
    pair_distances,
    verification_accuracy,
    verification_from_distances,
)

__all__ = [
    "VerificationResult",
    "embed_images",
    "export_onnx",
    "load_for_eval",
    "pair_distances",
    "verification_accuracy",
    "verification_from_distances",
]

"""x2jax: face recognition in JAX/Flax with the X2-Softmax loss.

Layout follows the data path: data -> models (backbone) -> losses / parallel
(head) -> train (step, loop, checkpoint) -> evaluation.
"""

__version__ = "0.1.0"

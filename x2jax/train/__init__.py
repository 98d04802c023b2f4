"""Training: config schema, ``build_run``, optimizer, state, step, loop, callbacks, checkpoints.

``x2jax.train.loop.train(config, workdir)`` is what ``train.py`` runs; the
modules are imported by name (``from x2jax.train import config``); importing the
package only checks that the ``train`` extra is installed.
"""

from x2jax._extras import require

require("train", "flax", "orbax.checkpoint", "grain", "ml_collections", "tensorboardX", what="x2jax.train")

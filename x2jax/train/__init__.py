"""Training: config schema, ``build_run``, optimizer, state, step, loop, callbacks, checkpoints.

``x2jax.train.loop.train(config, workdir)`` is what ``train.py`` runs; the
modules are imported by name (``from x2jax.train import config``), nothing is
imported here.
"""

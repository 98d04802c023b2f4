"""Loss comparisons: ``python -m x2jax.compare`` trains every (loss, seed) and reports mean +- std over seeds.

One job a module:

=================  ==========================================================
``runs``           ``--losses`` / seeds -> one checked config per run, the manifest
``shared``         what the runs share (data, mesh, eval sets), a run's ``Run``
``sequential``     each run through train.py's ``train_loop``
``batched``        K runs in one ``jit(vmap(step))`` (loss branches, stacked states)
``batched_loop``   the batched loop: per-run logs, verification, checkpoints
``angles``         final target / nearest angles of a run's training samples
``stats``          mean, std, paired t interval (numpy and math only)
``results``        results.json / results.md from what is on disk
``plots``          accuracy against step, final angles against the margin curves
``cli``            the command line
=================  ==========================================================

Importing the package imports nothing else (``__main__`` sets the CPU flags
before JAX starts). See docs/comparisons.md.
"""

"""Learning-rate schedules and the optimizer of backbone + class centres.

Parameters are ``{'backbone': ..., 'head': {'weight': W (C_pad, D)}}``. Both
groups share the schedule, momentum and weight decay (official X2-Softmax and
insightface recipes); only the backbone's gradient is clipped (global norm 5
in the official code). The head's optimizer is wrapped in
:func:`x2jax.parallel.optim.masked_row_updates`, so with Partial FC sampling
only sampled class-centre rows move (their momentum and weight decay too).
Weight decay is torch-style L2 added to the gradient before momentum
(``torch.optim.SGD(weight_decay=...)``); AdamW uses decoupled decay.

With ``row_sparse_head`` (Partial FC with SGD, the train step's default for
``loss.sample_rate < 1``) the head's optimizer is
:func:`x2jax.parallel.optim.row_sparse_sgd` instead: the same SGD, state and
checkpoint layout, applied to the gathered rows of W only (no dense gradient of
W, no pass over unsampled rows), its momentum stored in
``optimizer.head_momentum_dtype``.
"""

from __future__ import annotations

from typing import Any

import optax

from x2jax.parallel.optim import masked_row_updates, row_sparse_sgd

SCHEDULES = ("constant", "step", "polynomial", "cosine")
OPTIMIZERS = ("sgd", "adamw")


def warmup_length(cfg: Any, total_steps: int, num_epochs: float = 0.0) -> int:
    """The warm-up in steps: ``cfg.warmup_steps``, or ``cfg.warmup_epochs`` of a run of ``num_epochs``.

    In epochs it follows the batch: ``round(total_steps * warmup_epochs / num_epochs)``, which is
    arcface_torch's ``num_image // total_batch_size * warmup_epoch`` when ``total_steps`` is
    ``num_epochs`` whole epochs.
    """
    epochs = float(cfg.get("warmup_epochs", 0.0))
    if epochs <= 0:
        return int(cfg.warmup_steps)
    if num_epochs <= 0:
        raise ValueError(f"schedule.warmup_epochs={epochs} needs a run length in epochs (num_epochs); "
                         "with num_steps set schedule.warmup_steps")
    return int(round(total_steps * epochs / num_epochs))


def make_schedule(cfg: Any, total_steps: int, *, num_epochs: float = 0.0) -> optax.Schedule:
    """Warmup (linear from 0) then ``cfg.name`` decay over ``total_steps``.

    cfg fields: name, lr, warmup_steps or warmup_epochs (:func:`warmup_length`; ``num_epochs``
    is the run's length in epochs), and per schedule: ``step``: ``boundaries`` (fractions of
    total steps, or absolute steps if > 1) and ``decay_factor``; ``polynomial``: ``power`` and
    ``end_lr``; ``cosine``: ``end_lr``.
    """
    lr, warmup = float(cfg.lr), warmup_length(cfg, total_steps, num_epochs)
    if cfg.name not in SCHEDULES:
        raise ValueError(f"schedule.name must be one of {SCHEDULES}, got {cfg.name!r}")
    if not 0 <= warmup < max(total_steps, 1):
        raise ValueError(f"schedule.warmup_steps={warmup} must be in [0, total steps={total_steps})")
    decay_steps = max(total_steps - warmup, 1)
    if cfg.name == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.name == "step":
        bounds = [int(b * total_steps) if b <= 1 else int(b) for b in cfg.boundaries]
        main = optax.piecewise_constant_schedule(
            lr, {max(b - warmup, 1): float(cfg.decay_factor) for b in bounds}
        )
    elif cfg.name == "polynomial":
        main = optax.polynomial_schedule(lr, float(cfg.end_lr), float(cfg.power), decay_steps)
    else:
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(cfg.end_lr) / lr if lr else 0.0)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _base(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    if cfg.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(float(cfg.weight_decay)),
            optax.sgd(schedule, momentum=float(cfg.momentum) or None, nesterov=bool(cfg.nesterov)),
        )
    if cfg.name == "adamw":
        return optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay))
    raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {cfg.name!r}")


def make_optimizer(cfg: Any, schedule: optax.Schedule, *,
                   row_sparse_head: bool = False) -> optax.GradientTransformationExtraArgs:
    """Optimizer over ``{'backbone', 'head'}``; ``update(..., row_mask=...)`` for Partial FC.

    cfg fields: name ("sgd" | "adamw"), momentum, nesterov, weight_decay, b1, b2,
    eps, grad_clip_norm (backbone only; 0 disables), accumulate_steps (>1 wraps
    everything in ``optax.MultiSteps``), head_momentum_dtype (row-sparse head only).

    ``row_sparse_head``: the head is :func:`row_sparse_sgd` (``update(..., rows=...,
    row_values=..., apply=...)``, whose head "updates" are the new W); SGD only, no
    accumulation.

    Raises:
      ValueError: ``row_sparse_head`` with AdamW or accumulate_steps > 1.
    """
    backbone = _base(cfg, schedule)
    if float(cfg.grad_clip_norm) > 0:
        backbone = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip_norm)), backbone)
    if row_sparse_head:
        if cfg.name != "sgd" or int(cfg.accumulate_steps) > 1:
            raise ValueError(f"the row-sparse Partial FC head needs optimizer.name='sgd' and accumulate_steps=1, "
                             f"got {cfg.name!r} and {cfg.accumulate_steps}")
        head = row_sparse_sgd(schedule, momentum=float(cfg.momentum), weight_decay=float(cfg.weight_decay),
                              nesterov=bool(cfg.nesterov), momentum_dtype=cfg.get("head_momentum_dtype", "float32"))
    else:
        head = masked_row_updates(_base(cfg, schedule))
    tx = optax.partition(
        {"backbone": optax.with_extra_args_support(backbone), "head": head},
        {"backbone": "backbone", "head": "head"},
        mask_compatible_extra_args=False,
    )
    if int(cfg.accumulate_steps) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(cfg.accumulate_steps))
    return optax.with_extra_args_support(tx)

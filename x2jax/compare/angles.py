"""Where a finished run leaves its training samples: the angle to the class centre and to the nearest other.

:func:`final_angles` restores a run's last checkpoint, embeds the first
``num_images`` training images in the data seed's order (no flip, BatchNorm in
eval mode) and measures, in float64, ``theta_y = arccos(cos(e, W_y))`` and the
angle to the nearest other class centre (over all classes). The result is
cached in ``<run dir>/final_angles.json`` for the step it was computed at.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import numpy as np

from x2jax import data as x2data
from x2jax.compare.runs import RunPlan
from x2jax.compare.shared import abstract_state_for, make_checkpointer
from x2jax.train.setup import Run

ANGLES_FILE = "final_angles.json"


def _images(shared: Run, num_images: int, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    batch_size = shared.config.data.batch_size
    loader = x2data.make_train_loader(shared.train_data.source, batch_size=batch_size, seed=data_seed,
                                      shard_index=0, shard_count=1, flip=False, num_epochs=1,
                                      on_corrupt=shared.config.data.on_corrupt)
    images, labels = [], []
    for batch in loader:
        images.append(batch["image"])
        labels.append(batch["label"])
        if sum(len(x) for x in labels) >= num_images:
            break
    return np.concatenate(images)[:num_images], np.concatenate(labels)[:num_images]


def angles_from(embeddings: np.ndarray, weight: np.ndarray, labels: np.ndarray,
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(target, nearest non-target) angles in degrees, float64, from embeddings (N, D) and W (C_pad, D)."""
    e = embeddings.astype(np.float64)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    w = weight[:num_classes].astype(np.float64)
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    target, nearest = [], []
    for start in range(0, len(e), 256):  # (256, C) at a time
        cos = np.clip(e[start:start + 256] @ w.T, -1.0, 1.0)
        y = labels[start:start + 256]
        rows = np.arange(len(y))
        target.append(cos[rows, y])
        cos[rows, y] = -np.inf
        nearest.append(np.max(cos, axis=1) if num_classes > 1 else np.full(len(y), -1.0))
    return np.degrees(np.arccos(np.concatenate(target))), np.degrees(np.arccos(np.concatenate(nearest)))


@functools.lru_cache(maxsize=4)
def _jitted_apply(model):  # one compile per model, however many runs are measured
    return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def final_angles(plan: RunPlan, shared: Run, *, data_seed: int, num_images: int = 1024) -> dict[str, Any]:
    """``{"step", "target_deg": [...], "nearest_deg": [...]}`` of a run's newest checkpoint (cached).

    Args:
      plan: the run.
      shared: the comparison's shared run pieces (data, model, abstract state).
      data_seed: the comparison's data seed (the images' order).
      num_images: training images measured.

    Raises:
      FileNotFoundError: the run has no checkpoint.
    """
    path = plan.workdir / ANGLES_FILE
    ckpt = make_checkpointer(plan)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"run {plan.name}: no checkpoint in {ckpt.directory}")
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("step") == step and cached.get("num_images") == num_images:
                return cached
        import orbax.checkpoint as ocp  # noqa: PLC0415

        target = abstract_state_for(shared.step, plan.loss.name)
        state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    finally:
        ckpt.close()
    images, labels = _images(shared, num_images, data_seed)
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
    apply = _jitted_apply(shared.step.model)
    batch = shared.config.data.batch_size
    emb = np.concatenate([np.asarray(apply(variables, images[i:i + batch])) for i in range(0, len(images), batch)])
    weight = np.asarray(jax.device_get(state.params["head"]["weight"]))
    target_deg, nearest_deg = angles_from(emb, weight, labels, shared.num_classes)
    result = {"step": int(step), "num_images": int(num_images),
              "target_deg": [round(float(x), 4) for x in target_deg],
              "nearest_deg": [round(float(x), 4) for x in nearest_deg]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.replace(path)
    return result

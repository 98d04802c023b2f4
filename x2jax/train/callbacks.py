"""What the loop calls between steps: verification with best-model export.

:class:`VerificationCallback` plays the part of insightface's
``CallBackVerification``: it embeds each verification set with the current
backbone, logs accuracy and VAL@FAR, and keeps ``<workdir>/best_model`` (a saved
model ``eval.py`` reads) and ``best.json`` at the best mean accuracy so far.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from x2jax.evaluation.verification import embed_images, verification_accuracy
from x2jax.models.io import save_model
from x2jax.models.spec import ModelSpec
from x2jax.train.metrics import MetricWriter


def backbone_variables(state) -> dict[str, Any]:
    """The backbone's ``{'params', 'batch_stats'}`` of a TrainState (what eval and export read)."""
    return {"params": state.params["backbone"], "batch_stats": state.batch_stats}


@functools.lru_cache(maxsize=16)
def eval_apply(model) -> Callable[[Any, Any], Any]:
    """``(variables, images) -> embeddings`` in eval mode; one function object per (hashable) model,
    so the eval embedding compiles once per process, however many callbacks share the model."""
    def apply(variables, images):
        return model.apply(variables, images, train=False)

    return apply


def run_verification(apply_fn, variables, sets, *, batch_size: int, mesh) -> dict[str, dict]:
    """``{set name: verification_accuracy(...)}`` of the backbone on each set."""
    results = {}
    for name, (images, issame) in sets.items():
        emb = embed_images(apply_fn, variables, images, batch_size, mesh=mesh)
        results[name] = verification_accuracy(emb, issame)
    return results


class VerificationCallback:
    """Verification of the backbone on ``sets``; tracks and saves the best model.

    Args:
      model: the backbone module (evaluated with ``train=False``).
      spec: its :class:`~x2jax.models.spec.ModelSpec` (saved with ``best_model``).
      sets: ``{name: (images uint8 (2N, H, W, 3), issame bool (N,))}``.
      writer: where ``eval/<set>`` scalars go.
      workdir: the run directory (``best_model/``, ``best.json``).
      batch_size, mesh: of the embedding pass.
      say: prints a line (process 0 only).
    """

    def __init__(self, *, model, spec: ModelSpec, sets: dict, writer: MetricWriter, workdir: Path,
                 batch_size: int, mesh, say: Callable[[str], None]):
        self.sets, self.writer, self.workdir = sets, writer, Path(workdir)
        self.spec, self.batch_size, self.mesh, self.say = spec, batch_size, mesh, say
        self.best: dict[str, Any] = _read_best(self.workdir)
        self.last: dict[str, dict] = {}
        self._apply = eval_apply(model)

    def __call__(self, step: int, state, *, track_best: bool = True) -> None:
        if not self.sets:
            return
        variables = backbone_variables(state)
        results = run_verification(self._apply, variables, self.sets, batch_size=self.batch_size, mesh=self.mesh)
        for name, r in results.items():
            self.writer.write(step, f"eval/{name}", {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"],
                                                     "val_at_far": r["val"]})
            self.say(f"step {step}: verification {name}: accuracy {100 * r['accuracy']:.2f} +- "
                     f"{100 * r['accuracy_std']:.2f} %, VAL@FAR=1e-3 {100 * r['val']:.2f} %")
        self.last = {name: {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"], "val": r["val"]}
                     for name, r in results.items()}
        mean_acc = float(np.mean([r["accuracy"] for r in results.values()]))
        if track_best and mean_acc > self.best.get("accuracy", -1.0):
            self.best = {"step": step, "accuracy": mean_acc, "sets": self.last}
            if jax.process_index() == 0:
                self._save_best(step, variables)

    def _save_best(self, step: int, variables) -> None:
        target, tmp = self.workdir / "best_model", self.workdir / f"best_model.tmp{step}"
        save_model(tmp, variables, **self.spec.to_json())
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        (self.workdir / "best.json").write_text(json.dumps(self.best, indent=1) + "\n")


def _read_best(workdir: Path) -> dict[str, Any]:
    path = workdir / "best.json"
    return json.loads(path.read_text()) if path.is_file() else {}

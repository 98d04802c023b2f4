"""x2jax.compare end to end: batched == sequential, a killed comparison resumes, results from disk.

One tiny comparison (2 losses x 2 seeds, a 4-block IResNet at 16x16, 4 steps),
trained three ways: sequentially on 1 device (train.py's loop, the reference),
batched with the run axis split over 2 devices (2 runs a device), and batched
again but stopped by SIGTERM after step 3 and resumed with one run's newest
checkpoint lost (as if the kill came during its save).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from x2jax.compare import cli
from x2jax.compare import runs as runs_lib
from x2jax.compare.batched_loop import train_batched
from x2jax.compare.results import read_metrics
from x2jax.compare.shared import build_shared
from x2jax.models.io import load_backbone, read_meta
from x2jax.train import config as config_lib

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
LOSSES, SEEDS, STEPS = "x2_softmax,arcface", 2, 4
RUNS = [("x2_softmax", 0), ("x2_softmax", 1), ("arcface", 0), ("arcface", 1)]


def _args(workdir: Path, cache_dir: Path, *extra: str) -> list[str]:
    tiny = {
        "data.num_identities": 48, "data.images_per_identity": 8, "data.image_size": 16, "data.batch_size": 16,
        "model.layers": "(1,1,1,1)", "model.widths": "(8,8,16,16)", "model.embedding_size": 16,
        "model.conv_impl": "im2col", "num_steps": STEPS, "schedule.warmup_steps": 1, "log_every_steps": 1,
        "checkpoint.every_steps": 2, "eval.every_steps": 0, "eval.batch_size": 250,
        "compilation_cache_dir": str(cache_dir),
        # s = 4 for both losses: p_y is not negligible, so X2 and ArcFace train differently (at the
        # presets' s = 64 both get p_y ~ 0 and the same gradient: bitwise the same runs)
        "loss.params.scale": 4.0,
    }
    return ["--config", CONFIG, "--losses", LOSSES, "--seeds", str(SEEDS), "--workdir", str(workdir),
            "--angle-images", "64", *[f"--config.{k}={v}" for k, v in tiny.items()], *extra]


def _state(workdir: Path, step: int) -> dict:
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(workdir / "checkpoints" / str(step) / "state")
    return jax.tree.map(np.asarray, tree)


def _run_dir(comparison_dir: Path, loss: str, seed: int) -> Path:
    return runs_lib.run_dir(comparison_dir, loss, seed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """{'sequential', 'batched', 'resumed'}: the three comparison directories."""
    root = tmp_path_factory.mktemp("compare")
    dirs = {name: root / name for name in ("sequential", "batched", "resumed")}
    assert cli.main(_args(dirs["sequential"], cache_dir, "--sequential", "--config.mesh.num_devices=1")) == 0
    assert cli.main(_args(dirs["batched"], cache_dir, "--batched", "--config.mesh.num_devices=2")) == 0

    # the same batched comparison, stopped by SIGTERM after step 3 ...
    args = _args(dirs["resumed"], cache_dir, "--batched", "--config.mesh.num_devices=2")
    parsed, overrides = cli.parse_args(args, "test")
    rest, loss_params = runs_lib.split_loss_overrides(overrides)
    config = config_lib.load_config(CONFIG, rest)
    comparison = runs_lib.plan_comparison(config, losses_text=LOSSES, num_seeds=SEEDS, workdir=dirs["resumed"],
                                          loss_param_overrides=loss_params)
    runs_lib.check_manifest(comparison)
    shared = build_shared(comparison)
    finished = train_batched(comparison.runs, shared, comparison,
                             step_hook=lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == 3 else None)
    assert not finished
    # ... with one run's step-3 checkpoint lost (killed during its save): the runs resume from step 2
    for loss, seed in RUNS:
        assert (_run_dir(dirs["resumed"], loss, seed) / "checkpoints" / "3").is_dir()
    shutil.rmtree(_run_dir(dirs["resumed"], "arcface", 1) / "checkpoints" / "3")
    assert cli.main(args) == 0
    return dirs


def test_batched_runs_equal_the_same_runs_trained_one_by_one(trained):
    for loss, seed in RUNS:
        seq = _state(_run_dir(trained["sequential"], loss, seed), STEPS)
        bat = _state(_run_dir(trained["batched"], loss, seed), STEPS)
        assert jax.tree.structure(seq) == jax.tree.structure(bat)  # train.py's layout, own loss state
        assert int(bat["step"]) == STEPS
        np.testing.assert_array_equal(bat["rng"], seq["rng"])
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(seq), jax.tree.leaves(bat)):
            # float32 rounding (vmapped matmuls, traced loss params, 1 vs 2 devices) grown over 4 steps, as
            # a fraction of the leaf's scale: 1e-3 for params and BN statistics, 1e-2 for the momentum
            # (a PReLU input that rounds across 0 changes one gradient entry; seen: 2e-3 of the scale)
            frac = 1e-2 if jax.tree_util.keystr(path).startswith("['opt_state']") else 1e-3
            np.testing.assert_allclose(b, a, rtol=0, atol=max(frac * float(np.abs(a).max()), 1e-6),
                                       err_msg=f"{loss} seed {seed} {path}")
        # the parameters moved, and differently for each loss and seed
        init = _state(_run_dir(trained["batched"], loss, seed), 1)
        moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(init["params"]), jax.tree.leaves(bat["params"]))]
        assert max(moved) > 1e-3
        train_seq, eval_seq = read_metrics(_run_dir(trained["sequential"], loss, seed))
        train_bat, eval_bat = read_metrics(_run_dir(trained["batched"], loss, seed))
        assert [r["step"] for r in train_bat] == [r["step"] for r in train_seq] == list(range(1, STEPS + 1))
        for key in ("loss", "target_prob", "target_angle_deg", "nearest_angle_deg", "grad_norm", "lr"):
            np.testing.assert_allclose([r[key] for r in train_bat], [r[key] for r in train_seq], rtol=1e-3,
                                       atol=1e-30, err_msg=key)
        assert eval_bat["synthetic"][STEPS]["accuracy"] == pytest.approx(eval_seq["synthetic"][STEPS]["accuracy"],
                                                                         abs=2e-3)
    x2 = _state(_run_dir(trained["batched"], "x2_softmax", 0), STEPS)
    arc = _state(_run_dir(trained["batched"], "arcface", 0), STEPS)
    # the losses train apart by far more than that tolerance (so the test tells them apart)
    apart = [np.abs(a - b).max() / np.abs(a).max() for a, b in zip(jax.tree.leaves(x2["params"]),
                                                                    jax.tree.leaves(arc["params"]))]
    assert max(apart) > 1e-2


def test_a_killed_batched_comparison_resumes_to_the_same_states(trained):
    for loss, seed in RUNS:
        resumed_dir = _run_dir(trained["resumed"], loss, seed)
        straight, resumed = _state(_run_dir(trained["batched"], loss, seed), STEPS), _state(resumed_dir, STEPS)
        for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
            np.testing.assert_array_equal(a, b)  # bitwise: same data order, same compiled step
        steps = [r["step"] for r in read_metrics(resumed_dir)[0]]
        assert steps == list(range(1, STEPS + 1))  # replayed steps logged once
        if (loss, seed) != ("arcface", 1):
            assert (resumed_dir / "checkpoints" / "superseded-3").is_dir()  # set aside, then replayed


def test_each_batched_run_is_a_train_py_run_eval_py_reads(trained):
    run = _run_dir(trained["batched"], "arcface", 1)
    module, variables, info = load_backbone(run)  # what eval.py --checkpoint reads
    assert info["step"] == STEPS and info["num_classes"] == 48
    state = _state(run, STEPS)
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(state["params"]["backbone"])):
        np.testing.assert_array_equal(np.asarray(a), b)
    _, meta = read_meta(run / "checkpoints", STEPS)
    assert meta["config"]["loss"]["name"] == "arcface" and meta["config"]["seed"] == 1
    assert meta["compare"] == {"data_seed": 0, "loss_label": "arcface"}
    assert (run / "best_model").is_dir() and json.loads((run / "best.json").read_text())["step"] == STEPS


def test_results_are_assembled_from_disk(trained, cache_dir):
    directory = trained["sequential"]
    results = json.loads((directory / "results.json").read_text())
    md = (directory / "results.md").read_text()
    assert {"accuracy_synthetic.png", "target_angles.png"} <= {p.name for p in directory.iterdir()}
    assert results["reference"] == "x2_softmax" and results["sets"] == ["synthetic"]
    # mean +- std and the paired difference, recomputed from the runs' metrics.jsonl
    acc = {(loss, seed): read_metrics(_run_dir(directory, loss, seed))[1]["synthetic"][STEPS]["accuracy"]
           for loss, seed in RUNS}
    arc = results["losses"]["arcface"]["sets"]["synthetic"]
    values = [acc[("arcface", 0)], acc[("arcface", 1)]]
    assert arc["accuracy"]["mean"] == pytest.approx(np.mean(values))
    assert arc["accuracy"]["std"] == pytest.approx(np.std(values, ddof=1))
    d = np.array(values) - np.array([acc[("x2_softmax", 0)], acc[("x2_softmax", 1)]])
    half = 12.706204736174707 * np.std(d, ddof=1) / np.sqrt(2)  # t_{0.975, 1} = tan(0.475 pi)
    assert arc["diff_accuracy"]["mean"] == pytest.approx(d.mean(), abs=1e-12)
    if np.std(d) > 0:
        assert arc["diff_accuracy"]["high"] - arc["diff_accuracy"]["low"] == pytest.approx(2 * half, rel=1e-6)
    assert "paired t interval" in md and "| arcface | 2 |" in md and "Every run finished." in md
    last = read_metrics(_run_dir(directory, "arcface", 0))[0][-1]
    assert results["runs"][2]["train"]["target_angle_deg"] == pytest.approx(last["target_angle_deg"])
    angles = json.loads((_run_dir(directory, "arcface", 0) / "final_angles.json").read_text())
    assert angles["step"] == STEPS and len(angles["target_deg"]) == 64
    assert 0 < np.mean(angles["target_deg"]) < 180
    # --report re-assembles the same tables without training
    (directory / "results.md").unlink()
    assert cli.main(_args(directory, cache_dir, "--sequential", "--config.mesh.num_devices=1",
                          "--report")) == 0
    assert (directory / "results.md").read_text() == md

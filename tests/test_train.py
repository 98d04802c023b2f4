"""train.py / x2jax.train: resume, preemption, re-meshing, non-finite steps, config errors, optimizer."""

import json
import re
import os
import signal
import subprocess
import time
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from x2jax.train import config as config_lib
from x2jax.models.io import load_backbone
from x2jax.models.spec import ModelSpec
from x2jax.train.checkpointing import Checkpointer
from x2jax.train.loop import BadLabelError, NonFiniteLossError, train
from x2jax.train.optimizer import make_optimizer, make_schedule
from x2jax.train.state import make_state_factory
from x2jax.parallel.mesh import make_mesh

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(tmp_cache, **overrides) -> ml_collections.ConfigDict:
    """A few-second run: 48 synthetic identities at 16x16, a 4-block IResNet."""
    c = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
    c.data.num_identities, c.data.images_per_identity, c.data.image_size = 48, 8, 16
    c.data.batch_size = 32
    c.model.layers, c.model.widths, c.model.embedding_size = (1, 1, 1, 1), (8, 8, 16, 16), 32
    c.num_steps = 8
    c.schedule.warmup_steps = 2
    c.log_every_steps = 1
    c.checkpoint.every_steps = 4
    c.checkpoint.async_save = True
    c.eval.every_steps = 0
    c.eval.sets = ""
    c.compilation_cache_dir = str(tmp_cache)
    config_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])
    return c


def is_sharded_like(tree, shardings) -> bool:
    """True if every array leaf of ``tree`` has the matching ``NamedSharding`` spec."""
    return all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), tree, shardings)))


def nan_image_at(step_no: int):
    """A batch hook: a NaN pixel in the batch of step ``step_no`` (1-based)."""
    def hook(step, batch):
        if step + 1 == step_no:
            batch = dict(batch, image=batch["image"].copy())
            batch["image"][0] = np.nan
        return batch
    return hook


def bad_label_at(step_no: int, num_classes: int):
    """A batch hook: label ``num_classes`` (out of range) in the batch of step ``step_no``."""
    def hook(step, batch):
        if step + 1 == step_no:
            batch = dict(batch, label=batch["label"].copy())
            batch["label"][0] = num_classes
        return batch
    return hook


def sigterm_after(step_no: int):
    """A step hook: SIGTERM to this process after step ``step_no``."""
    return lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == step_no else None


def _final_state_arrays(workdir: Path, step: int) -> dict:
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(workdir / "checkpoints" / str(step) / "state")
    return jax.tree.map(np.asarray, tree)


def _assert_trees_bitwise_equal(a, b):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), "leaves differ"


# ---------------------------------------------------------------------------
# resume after SIGTERM == uninterrupted, bitwise
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_then_resume_is_bitwise_identical_to_uninterrupted_run(tmp_path, cache_dir):
    k = 4
    straight = tmp_path / "straight"
    out = train(tiny_config(cache_dir, num_steps=2 * k), straight)
    assert out["step"] == 2 * k and not out["preempted"]

    interrupted = tmp_path / "interrupted"
    # checkpoint interval 3 does not fall on step k: the SIGTERM save is its own
    first = train(tiny_config(cache_dir, num_steps=2 * k, **{"checkpoint.every_steps": 3}), interrupted,
                  step_hook=sigterm_after(k))
    assert first["preempted"] and first["step"] == k
    assert Checkpointer(interrupted / "checkpoints", every_steps=3, keep=3).latest_step() == k
    second = train(tiny_config(cache_dir, num_steps=2 * k, **{"checkpoint.every_steps": 3}), interrupted)
    assert second["start_step"] == k and second["step"] == 2 * k

    a = _final_state_arrays(straight, 2 * k)
    b = _final_state_arrays(interrupted, 2 * k)
    _assert_trees_bitwise_equal(a, b)
    # and training did move the parameters
    init = _final_state_arrays(interrupted, k)
    assert not np.array_equal(init["params"]["head"]["weight"], b["params"]["head"]["weight"])


def test_sigterm_at_the_first_step_of_a_fresh_run_saves_it_once(tmp_path, cache_dir):
    """Orbax saves a fresh run's first step by itself; the signal's save must not save it again."""
    out = train(tiny_config(cache_dir, num_steps=10, **{"checkpoint.every_steps": 100}), tmp_path,
                step_hook=sigterm_after(1))
    assert out["preempted"] and out["step"] == 1
    ckpt = Checkpointer(tmp_path / "checkpoints", every_steps=100, keep=3)
    assert ckpt.manager.all_steps() == [1]
    ckpt.close()


@pytest.mark.slow
def test_train_py_cli_exits_cleanly_on_sigterm_and_resumes(tmp_path, cache_dir):
    """The real script in a subprocess: SIGTERM -> checkpoint, exit 0; rerun -> resumes."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    args = [
        sys.executable, str(ROOT / "train.py"), "--workdir", str(tmp_path / "run"),
        "--config.data.num_identities=48", "--config.data.images_per_identity=8", "--config.data.image_size=16",
        "--config.data.batch_size=32", "--config.model.layers=(1,1,1,1)", "--config.model.widths=(8,8,16,16)",
        "--config.model.embedding_size=32", "--config.num_steps=6", "--config.eval.sets=",
        "--config.checkpoint.every_steps=100", f"--config.compilation_cache_dir={cache_dir}",
        "--config.log_every_steps=1", "--config.schedule.warmup_steps=2",
    ]
    # a long run, SIGTERM once it trains: it saves the step it is at and exits 0
    first = subprocess.Popen([a if a != "--config.num_steps=6" else "--config.num_steps=100000" for a in args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    saved = int(re.search(r"SIGTERM received: saved step (\d+) in", out).group(1))
    assert saved >= 2
    # the same command with its real length resumes there; every step is logged once
    second = subprocess.run(args + [f"--config.num_steps={saved + 3}"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from step {saved}" in second.stdout and f"done: {saved + 3} steps" in second.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, saved + 4))
    assert (tmp_path / "run" / "tensorboard").is_dir()


# ---------------------------------------------------------------------------
# save on 8 devices, restore on 4 and 1
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_save_on_8_devices_restore_on_4_and_1(tmp_path, cache_dir):
    cfg = tiny_config(cache_dir, num_steps=4)
    train(cfg, tmp_path)
    model = ModelSpec.from_json(json.loads((tmp_path / "checkpoints" / "4" / "meta" / "metadata").read_text())["model"]).build()
    tx = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule, 4))
    from x2jax.train.inputs import open_train_data

    data = open_train_data(cfg.data, seed=0)

    def restore_on(n):
        mesh = make_mesh(devices=jax.devices()[:n])
        _, shardings, abstract = make_state_factory(model=model, tx=tx, mesh=mesh, num_classes=48, loss_name="x2_softmax")
        ckpt = Checkpointer(tmp_path / "checkpoints", every_steps=4, keep=3)
        it = data.make_iterator(batch_size=32, shard_index=0, shard_count=1)
        state, _, meta = ckpt.restore(4, abstract, it)
        ckpt.close()
        assert meta["mesh"] == {"data": 8, "model": 1}
        assert is_sharded_like(state, shardings)
        assert len(state.params["head"]["weight"].sharding.device_set) == n
        return jax.tree.map(np.asarray, state)

    saved = restore_on(8)
    assert saved.params["head"]["weight"].shape[0] == 128  # 48 classes padded to lcm(128, 8)
    for n in (4, 1):
        _assert_trees_bitwise_equal(restore_on(n), saved)

    # and the run goes on, on 4 devices, from the 8-device checkpoint
    out = train(tiny_config(cache_dir, num_steps=6, **{"mesh.num_devices": 4}), tmp_path)
    assert out["start_step"] == 4 and out["step"] == 6 and np.isfinite(out["loss"])


# ---------------------------------------------------------------------------
# learning: loss falls, verification accuracy rises (X2-Softmax and ArcFace)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_decreases_and_verification_rises(tmp_path, cache_dir):
    """X2-Softmax through train.py's loop; other losses train through the same loop in test_compare."""
    cfg = tiny_config(cache_dir, num_steps=120, **{"log_every_steps": 1, "eval.every_steps": 120, "eval.sets": "synthetic", "eval.batch_size": 256})
    config_lib.set_loss(cfg, "x2_softmax")
    cfg.data.num_identities, cfg.data.images_per_identity, cfg.data.image_size = 100, 16, 16
    cfg.schedule.lr = 0.1
    out = train(cfg, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval/synthetic"]
    first, last = np.mean(train_losses[:10]), np.mean(train_losses[-20:])
    assert last < 0.85 * first, (first, last)
    assert [e["step"] for e in evals] == [0, 120]
    assert evals[-1]["accuracy"] > evals[0]["accuracy"] + 0.05, evals
    assert out["best"]["step"] == 120
    assert out["step_compiled_ahead"]  # the loop ran the step compiled in the background
    assert out["first_step_seconds"] <= out["startup_seconds"]
    # the best model is exported and loads back with the same embeddings function
    assert (tmp_path / "best_model" / "model.json").is_file()


# ---------------------------------------------------------------------------
# non-finite loss / bad labels / config errors
# ---------------------------------------------------------------------------


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, cache_dir):
    cfg = tiny_config(cache_dir, num_steps=8, **{"checkpoint.every_steps": 4})
    with pytest.raises(NonFiniteLossError, match="step 6: non-finite"):
        train(cfg, tmp_path, batch_hook=nan_image_at(6))
    ckpt = Checkpointer(tmp_path / "checkpoints", every_steps=4, keep=3)
    assert ckpt.latest_step() == 4  # the last save before the bad step, finished and intact
    ckpt.close()
    state = _final_state_arrays(tmp_path, 4)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state) if x.dtype.kind == "f")


def test_nan_skip_policy_leaves_params_unchanged_for_that_step(tmp_path, cache_dir):
    cfg = tiny_config(cache_dir, num_steps=3, **{"on_nonfinite": "skip", "checkpoint.every_steps": 1})
    out = train(cfg, tmp_path, batch_hook=nan_image_at(3))
    assert out["step"] == 3
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if r["split"] == "train"] == [0, 0, 1]
    s2, s3 = _final_state_arrays(tmp_path, 2), _final_state_arrays(tmp_path, 3)
    _assert_trees_bitwise_equal(s2["params"], s3["params"])
    _assert_trees_bitwise_equal(s2["opt_state"], s3["opt_state"])
    assert int(s3["step"]) == 3


def test_out_of_range_label_in_a_batch_stops_naming_the_step(tmp_path, cache_dir):
    cfg = tiny_config(cache_dir, num_steps=4)
    with pytest.raises(BadLabelError, match=r"step 2: 1 label\(s\) outside \[0, num_classes\)"):
        train(cfg, tmp_path, batch_hook=bad_label_at(2, cfg.data.num_identities))


@pytest.mark.parametrize(
    "overrides,error",
    [
        ({"data.batch_size": 12}, "data.batch_size=12 is not divisible by the 8 devices"),
        ({"data.name": "insightface_rec"}, "data.path is required"),
        ({"data.name": "insightface_rec", "data.path": "/nonexistent/ms1mv3"}, "data.path '/nonexistent/ms1mv3' does not exist"),
        ({"loss.params.margin": 0.5}, r"loss.params \['margin'\] not accepted by x2_softmax"),
        ({"model.name": "r1000"}, "model.name 'r1000' unknown"),
        ({"num_epochs": 2.0}, "set exactly one of num_steps"),
        ({"schedule.warmup_steps": 1000}, r"schedule.warmup_steps=1000 must be in \[0, num_steps="),
        ({"eval.sets": "lfw"}, "eval set: verification set 'lfw' not found: .*lfw.bin"),
    ],
)
def test_bad_config_is_a_clear_error_before_any_compile(tmp_path, cache_dir, overrides, error):
    cfg = tiny_config(cache_dir, **overrides)
    with pytest.raises(ValueError, match=error):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_config_key_is_an_error_naming_the_known_keys(cache_dir):
    with pytest.raises(ValueError, match=r"unknown config key 'optimizer.lrr'.*known: accumulate_steps"):
        tiny_config(cache_dir, **{"optimizer.lrr": 0.1})
    with pytest.raises(ValueError, match="--config.num_steps: expected an integer, got 'ten'"):
        tiny_config(cache_dir, **{"num_steps": "ten"})
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config.nope=1"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "unknown config key 'nope'" in out.stderr


def test_resume_takes_another_conv_impl_and_refuses_another_model(tmp_path, cache_dir):
    """conv_impl says how the backbone runs, not what it is: a resume may change it."""
    train(tiny_config(cache_dir, num_steps=4, **{"model.conv_impl": "xla"}), tmp_path)
    out = train(tiny_config(cache_dir, num_steps=5, **{"model.conv_impl": "im2col"}), tmp_path)
    assert (out["start_step"], out["step"]) == (4, 5)
    with pytest.raises(ValueError, match="was written for model .*'embedding_size': 32"):
        train(tiny_config(cache_dir, num_steps=6, **{"model.embedding_size": 16}), tmp_path)


def test_half_written_checkpoint_is_not_taken_as_latest(tmp_path, cache_dir):
    train(tiny_config(cache_dir, num_steps=4), tmp_path)
    # what an interrupted Orbax save leaves: a temporary directory for a later step
    junk = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000000000"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "partial").write_bytes(b"\0" * 10)
    ckpt = Checkpointer(tmp_path / "checkpoints", every_steps=4, keep=3)
    assert ckpt.latest_step() == 4
    ckpt.close()
    out = train(tiny_config(cache_dir, num_steps=5), tmp_path)
    assert out["start_step"] == 4 and out["step"] == 5


def test_eval_loader_reads_the_backbone_of_a_train_checkpoint(tmp_path, cache_dir):
    train(tiny_config(cache_dir, num_steps=4), tmp_path)
    module, variables, info = load_backbone(tmp_path)
    state = _final_state_arrays(tmp_path, 4)
    _assert_trees_bitwise_equal(jax.tree.map(np.asarray, variables["params"]), state["params"]["backbone"])
    assert info["arch"] == "r18_tiny" and info["image_size"] == 16 and info["step"] == 4
    emb = module.apply(variables, jnp.zeros((2, 16, 16, 3)), train=False)
    assert emb.shape == (2, 32) and emb.dtype == jnp.float32


# ---------------------------------------------------------------------------
# optimizer and schedules against references
# ---------------------------------------------------------------------------


def test_schedules_match_closed_forms():
    c = ml_collections.ConfigDict(dict(name="step", lr=0.1, warmup_steps=10, boundaries=(0.5, 0.75), decay_factor=0.1, power=2.0, end_lr=0.0))
    s = make_schedule(c, 100)
    assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.05) < 1e-7
    assert abs(float(s(49)) - 0.1) < 1e-7 and abs(float(s(50)) - 0.01) < 1e-8 and abs(float(s(80)) - 0.001) < 1e-9
    c.name = "polynomial"
    s = make_schedule(c, 100)
    np.testing.assert_allclose(float(s(55)), 0.1 * (1 - 45 / 90) ** 2, rtol=1e-6)
    c.name = "cosine"
    s = make_schedule(c, 100)
    np.testing.assert_allclose(float(s(55)), 0.05 * (1 + np.cos(np.pi * 45 / 90)), rtol=1e-5)
    c.warmup_steps = 100
    with pytest.raises(ValueError, match="warmup_steps=100"):
        make_schedule(c, 100)


def test_warmup_in_epochs_follows_the_run_length():
    """warmup_epochs of num_epochs: the same fraction of the run's steps, whatever the batch."""
    c = ml_collections.ConfigDict(dict(name="polynomial", lr=0.1, warmup_steps=0, warmup_epochs=2.0,
                                       boundaries=(), decay_factor=0.1, power=1.0, end_lr=0.0))
    for steps_per_epoch in (7, 50):
        total = 20 * steps_per_epoch
        s = make_schedule(c, total, num_epochs=20.0)
        warmup = 2 * steps_per_epoch
        np.testing.assert_allclose([float(s(warmup // 2)), float(s(warmup))], [0.05, 0.1], rtol=1e-6)
        np.testing.assert_allclose(float(s(warmup + (total - warmup) // 2)), 0.05, rtol=1e-5)
    with pytest.raises(ValueError, match="warmup_epochs=2.0 needs a run length in epochs"):
        make_schedule(c, 100)


def test_num_epochs_and_warmup_epochs_set_the_run_length(tmp_path, cache_dir):
    """48 x 8 images at batch 32 are 12 steps an epoch: 2 epochs are 24 steps, a 1-epoch warm-up 12."""
    cfg = tiny_config(cache_dir, num_steps=0, **{"num_epochs": 2.0, "schedule.warmup_steps": 0,
                                                 "schedule.warmup_epochs": 1.0, "checkpoint.every_steps": 24})
    train(cfg, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 25))
    # the lr logged at step k is the schedule at the step's start, k - 1: linear from 0 over 12 steps
    lr = float(cfg.schedule.lr)
    np.testing.assert_allclose([r["lr"] for r in steps[:13]], [lr * k / 12 for k in range(13)], rtol=1e-5, atol=1e-9)
    assert steps[13]["lr"] < lr


@pytest.mark.parametrize("overrides, match", [
    ({"schedule.warmup_epochs": 2.0, "num_steps": 100, "num_epochs": 0.0}, "num_epochs > warmup_epochs"),
    ({"schedule.warmup_epochs": 2.0, "schedule.warmup_steps": 10, "num_steps": 0, "num_epochs": 20.0},
     "needs schedule.warmup_steps=0"),
    ({"schedule.warmup_epochs": 20.0, "num_steps": 0, "num_epochs": 20.0}, "num_epochs > warmup_epochs"),
    ({"schedule.warmup_epochs": -1.0, "num_steps": 0, "num_epochs": 20.0}, "warmup_epochs=-1.0"),
])
def test_warmup_epochs_config_errors(cache_dir, overrides, match):
    cfg = tiny_config(cache_dir, num_steps=8)
    for key, value in overrides.items():
        group, _, name = key.rpartition(".")
        setattr(cfg[group] if group else cfg, name, value)
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(cfg)


@pytest.mark.torch
def test_sgd_with_weight_decay_and_clipping_matches_torch():
    torch = pytest.importorskip("torch")
    cfg = ml_collections.ConfigDict(dict(name="sgd", momentum=0.9, nesterov=False, weight_decay=5e-4, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0, accumulate_steps=1))
    tx = make_optimizer(cfg, optax.constant_schedule(0.1))
    rng = np.random.default_rng(0)
    params = {"backbone": {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}, "head": {"weight": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}}
    tb = torch.tensor(np.asarray(params["backbone"]["w"]), requires_grad=True)
    th = torch.tensor(np.asarray(params["head"]["weight"]), requires_grad=True)
    topt = torch.optim.SGD([tb, th], lr=0.1, momentum=0.9, weight_decay=5e-4)
    state = tx.init(params)
    for _ in range(3):
        gb, gh = rng.normal(size=(5, 3)) * 3, rng.normal(size=(4, 3))
        grads = {"backbone": {"w": jnp.asarray(gb, jnp.float32)}, "head": {"weight": jnp.asarray(gh, jnp.float32)}}
        updates, state = tx.update(grads, state, params, row_mask=None)
        params = optax.apply_updates(params, updates)
        tb.grad, th.grad = torch.tensor(gb, dtype=torch.float32), torch.tensor(gh, dtype=torch.float32)
        torch.nn.utils.clip_grad_norm_([tb], 1.0)  # the backbone only, as the official code
        topt.step()
    np.testing.assert_allclose(np.asarray(params["backbone"]["w"]), tb.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["head"]["weight"]), th.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equals_one_step_on_the_mean_gradient():
    base = dict(name="sgd", momentum=0.9, nesterov=False, weight_decay=5e-4, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.0)
    acc = make_optimizer(ml_collections.ConfigDict(dict(base, accumulate_steps=2)), optax.constant_schedule(0.1))
    one = make_optimizer(ml_collections.ConfigDict(dict(base, accumulate_steps=1)), optax.constant_schedule(0.1))
    rng = np.random.default_rng(1)
    params = {"backbone": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}, "head": {"weight": jnp.ones((4, 2))}}
    g1, g2 = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(2)]
    s = acc.init(params)
    u, s = acc.update(g1, s, params, row_mask=None)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))  # first micro-step: no update
    p_acc = optax.apply_updates(params, u)
    u, s = acc.update(g2, s, p_acc, row_mask=None)
    p_acc = optax.apply_updates(p_acc, u)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    u, _ = one.update(mean, one.init(params), params, row_mask=None)
    p_one = optax.apply_updates(params, u)
    for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.slow
def test_float16_dynamic_loss_scale_halves_on_overflow_and_skips_the_step(tmp_path, cache_dir):
    """GradScaler semantics: start at 2**16, halve and skip on a non-finite gradient,
    keep the scale otherwise (growth after 2000 good steps); overflow is not an error."""
    n, nan_step = 8, 7
    cfg = tiny_config(cache_dir, num_steps=n, **{"model.dtype": "float16", "checkpoint.every_steps": 1, "checkpoint.keep": 0})
    out = train(cfg, tmp_path, batch_hook=nan_image_at(nan_step))
    assert out["step"] == n
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    skipped = [r["skipped"] for r in records]
    scales = [r["loss_scale"] for r in records]  # the scale each step used
    assert scales[0] == 2.0**16
    for i in range(n - 1):
        assert scales[i + 1] == scales[i] / 2 if skipped[i] else scales[i + 1] == scales[i], (skipped, scales)
    assert skipped[nan_step - 1] == 1 and 0 in skipped[: nan_step - 1], skipped  # the scale settles, then NaN skips
    before, after = _final_state_arrays(tmp_path, nan_step - 1), _final_state_arrays(tmp_path, nan_step)
    _assert_trees_bitwise_equal(before["params"], after["params"])
    good = skipped.index(0) + 1
    assert not np.array_equal(
        _final_state_arrays(tmp_path, good - 1 if good > 1 else good)["params"]["head"]["weight"],
        _final_state_arrays(tmp_path, n)["params"]["head"]["weight"],
    )
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_final_state_arrays(tmp_path, n)["params"]))


@pytest.mark.slow
def test_eval_py_reports_the_accuracy_the_training_log_reported(tmp_path, cache_dir):
    cfg = tiny_config(cache_dir, num_steps=6, **{"eval.sets": "synthetic", "eval.every_steps": 6})
    out = train(cfg, tmp_path / "run")
    logged = out["eval"]["synthetic"]["accuracy"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reported = json.loads((tmp_path / "r.json").read_text())
    assert reported["model"]["step"] == 6 and reported["model"]["format"] == "train_checkpoint"
    assert reported["sets"]["synthetic"]["accuracy"] == pytest.approx(logged, abs=1e-12)
    assert f"{100 * logged:.2f}" in result.stdout


def test_partial_fc_training_moves_only_sampled_rows(tmp_path, cache_dir):
    # 48 classes padded to 128 rows over 8 shards: 16 rows a shard, ceil(0.25 * 16) = 4 sampled each
    cfg = tiny_config(cache_dir, num_steps=3, **{"loss.sample_rate": 0.25, "checkpoint.every_steps": 1})
    train(cfg, tmp_path)
    s1, s2 = _final_state_arrays(tmp_path, 2), _final_state_arrays(tmp_path, 3)  # lr > 0 after warmup
    moved = np.any(s1["params"]["head"]["weight"] != s2["params"]["head"]["weight"], axis=1)
    assert 0 < moved.sum() <= 8 * 4, moved.sum()
    assert not moved[48:].any()  # padding rows never move
    m1, m2 = (jax.tree.leaves(s["opt_state"]) for s in (s1, s2))
    for a, b in zip(m1, m2):
        if a.shape == s1["params"]["head"]["weight"].shape:  # head momentum: frozen where W did not move
            np.testing.assert_array_equal(a[~moved], b[~moved])

"""How a run fails: a locked workdir, corrupt checkpoints, a resume of another run,
a signal while waiting for data, replayed metrics, bad config values."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from x2jax.train import config as config_lib
from x2jax.models.io import load_backbone
from x2jax.train.checkpointing import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    PreemptionWatcher,
    RunInterrupted,
)
from x2jax.train.loop import train
from x2jax.train.workdir_lock import WorkdirInUseError, WorkdirLock

from test_train import ROOT, _assert_trees_bitwise_equal, _final_state_arrays, tiny_config


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    return env


def _tiny_cli(workdir, cache, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir),
            "--config.data.num_identities=48", "--config.data.images_per_identity=8",
            "--config.data.image_size=16", "--config.data.batch_size=32", "--config.model.layers=(1,1,1,1)",
            "--config.model.widths=(8,8,16,16)", "--config.model.embedding_size=32", "--config.eval.sets=",
            f"--config.compilation_cache_dir={cache}", "--config.log_every_steps=1", *extra]


# ---------------------------------------------------------------------------
# one run per workdir
# ---------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_second_train_py_on_a_workdir_exits_at_once_naming_the_first(tmp_path, cache_dir):
    first = subprocess.Popen(_tiny_cli(tmp_path / "run", cache_dir, "--config.num_steps=100000",
                                       "--config.checkpoint.every_steps=100000"),
                             env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lock = tmp_path / "run" / ".lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not take the lock"
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid
        t0 = time.monotonic()
        second = subprocess.run(_tiny_cli(tmp_path / "run", cache_dir, "--config.num_steps=40"), env=_env(),
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"train.py: error: workdir {tmp_path / 'run'} is in use by another run (pid {first.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr, "a usage error, not a crash"
        assert time.monotonic() - t0 < 60
        assert first.poll() is None, "the first run goes on"
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):  # training, not starting up
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not train"
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=120)[0]
        assert first.returncode == 0, out[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert not lock.read_text().strip(), "released on exit"


def test_lock_of_a_killed_process_is_recovered(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from x2jax.train.workdir_lock import WorkdirLock;"
         f"WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirInUseError, match=f"pid {holder.pid}"):
        WorkdirLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid  # the stale record is still there
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------------------
# corrupt checkpoints fall back
# ---------------------------------------------------------------------------
def _truncate_a_state_file(step_dir: Path) -> None:
    """Every array data file (OCDBT's ``d/`` files) cut to half: as a save cut off by a crash.

    Not just the largest file: that can be ``_METADATA`` or ``_sharding``, which a restore
    with the target's shardings may not need, or a data file no manifest refers to."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
             and p.stat().st_size > 64]
    assert files, f"no array data files under {step_dir}"
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])


def _remove_state(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "state")


def _break_meta_json(step_dir: Path) -> None:
    meta = next(p for p in (step_dir / "meta").rglob("*") if p.is_file() and p.suffix != ".tmp")
    meta.write_text(meta.read_text()[:-20])


@pytest.mark.parametrize("corrupt", [_truncate_a_state_file, _remove_state, _break_meta_json],
                         ids=["truncated", "missing_state", "broken_meta"])
def test_corrupt_latest_checkpoint_is_moved_aside_and_the_older_one_resumes(tmp_path, cache_dir, corrupt, capsys):
    straight = train(tiny_config(cache_dir, num_steps=6, **{"checkpoint.every_steps": 2}), tmp_path / "straight")
    assert straight["step"] == 6
    run = tmp_path / "run"
    train(tiny_config(cache_dir, num_steps=6, **{"checkpoint.every_steps": 2}), run)
    corrupt(run / "checkpoints" / "6")
    (run / "checkpoints" / "4" / "extra-file-that-must-survive").write_text("kept")
    capsys.readouterr()
    # the rerun restores 4 (not the corrupt 6) and replays steps 5, 6
    out = train(tiny_config(cache_dir, num_steps=6, **{"checkpoint.every_steps": 2}), run)
    said = capsys.readouterr().out
    assert out["start_step"] == 4 and out["step"] == 6
    assert said.count("does not restore") == 1 and "moved to" in said and "corrupt-6" in said
    assert (run / "checkpoints" / "corrupt-6").is_dir(), "moved aside, not deleted"
    _assert_trees_bitwise_equal(_final_state_arrays(run, 6), _final_state_arrays(tmp_path / "straight", 6))


def test_no_restorable_checkpoint_is_a_clear_error(tmp_path, cache_dir):
    train(tiny_config(cache_dir, num_steps=4, **{"checkpoint.every_steps": 2}), tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-2:] == [2, 4]
    for step in steps:
        _break_meta_json(tmp_path / "checkpoints" / str(step))
    with pytest.raises(CheckpointCorruptError, match=r"no checkpoint in .* restores .*step 4: .*step 2: "):
        train(tiny_config(cache_dir, num_steps=4, **{"checkpoint.every_steps": 2}), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(f"corrupt-{s}" for s in steps)


@pytest.mark.parametrize("corrupt", [_remove_state, _break_meta_json], ids=["missing_state", "broken_meta"])
def test_eval_loader_falls_back_past_a_corrupt_step_without_moving_it(tmp_path, cache_dir, capsys, corrupt):
    train(tiny_config(cache_dir, num_steps=4, **{"checkpoint.every_steps": 2}), tmp_path)
    state2 = _final_state_arrays(tmp_path, 2)
    corrupt(tmp_path / "checkpoints" / "4")
    _, variables, info = load_backbone(tmp_path)
    assert info["step"] == 2 and "checkpoint" in capsys.readouterr().out
    _assert_trees_bitwise_equal(jax.tree.map(np.asarray, variables["params"]), state2["params"]["backbone"])
    assert (tmp_path / "checkpoints" / "4").is_dir(), "evaluation never moves a run's files"
    with pytest.raises(CheckpointCorruptError, match="step 4"):
        load_backbone(tmp_path, step=4)


# ---------------------------------------------------------------------------
# a resume of another run; replayed metrics
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_step_run(tmp_path_factory, cache_dir):
    """A finished 3-step run of the tiny config (copied by each test that resumes it)."""
    workdir = tmp_path_factory.mktemp("three_steps")
    train(tiny_config(cache_dir, num_steps=3), workdir)
    return workdir


@pytest.mark.parametrize("change, key", [
    (lambda c: config_lib.set_loss(c, "arcface"), "loss"),
    (lambda c: config_lib.apply_overrides(c, ["loss.params.k=0.5"]), "loss"),
    (lambda c: config_lib.apply_overrides(c, ["data.batch_size=16"]), "data.batch_size"),
    (lambda c: config_lib.apply_overrides(c, ["seed=1"]), "seed"),
    (lambda c: config_lib.apply_overrides(c, ["schedule.lr=0.05"]), "schedule"),
], ids=["loss", "loss_param", "batch", "seed", "schedule"])
def test_resume_with_other_settings_is_an_error_unless_allowed(tmp_path, cache_dir, three_step_run, change, key):
    workdir = tmp_path / "run"
    shutil.copytree(three_step_run, workdir)
    with pytest.raises(CheckpointMismatchError, match=rf"other settings: {key}: .* -> .*resume_mismatch=allow"):
        train(change(tiny_config(cache_dir, num_steps=4)), workdir)
    if key in ("loss", "data.batch_size"):  # allowed: the run goes on with the new settings (loss, loss_param, batch)
        out = train(change(tiny_config(cache_dir, num_steps=4, resume_mismatch="allow")), workdir)
        assert (out["start_step"], out["step"]) == (3, 4)


def test_replayed_steps_are_logged_once(tmp_path, cache_dir):
    train(tiny_config(cache_dir, num_steps=4, **{"checkpoint.every_steps": 2}), tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if killed (-9) before the save of step 4 finished
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "spl')  # and mid-line
    train(tiny_config(cache_dir, num_steps=4, **{"checkpoint.every_steps": 2}), tmp_path)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ---------------------------------------------------------------------------
# signals while waiting for data
# ---------------------------------------------------------------------------
def test_watcher_interrupts_a_wait_that_never_ends():
    watcher = PreemptionWatcher(catch_sigint=True, wait_grace_s=1.0)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    t0 = time.monotonic()
    try:
        timer.start()
        with pytest.raises(RunInterrupted, match="SIGTERM"):
            with watcher.interruptible():
                while time.monotonic() - t0 < 30:
                    time.sleep(0.01)
    finally:
        timer.cancel()
        watcher.close()
    assert 1.4 < time.monotonic() - t0 < 10 and watcher.requested  # after the signal and the grace


def test_watcher_lets_a_wait_that_ends_within_the_grace_finish():
    """A loader that yields soon after SIGTERM: the step runs (and the loop then saves)."""
    watcher = PreemptionWatcher(wait_grace_s=1.0)
    t0 = time.monotonic()
    try:
        with watcher.interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
            while time.monotonic() - t0 < 0.3:
                time.sleep(0.01)
        time.sleep(1.5)  # past the grace: the timer finds the wait over and does nothing
    finally:
        watcher.close()
    assert watcher.requested and watcher.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


STARVED_RUN = r'''
import sys, time
sys.path.insert(0, sys.argv[3])
import grain
from x2jax.train import inputs
real = inputs.open_train_data
def starved(*a, **k):
    data = real(*a, **k)
    make = data.make_iterator
    class Starved(grain.DatasetIterator):
        def __init__(self, it):
            super().__init__(it)
            self.it, self.n = it, 0
        def __next__(self):
            self.n += 1
            if self.n > 3:  # a loader that never yields again (every record unusable)
                print("starving", flush=True)
                while True:
                    time.sleep(0.05)
            return next(self.it)
        def get_state(self): return self.it.get_state()
        def set_state(self, s): self.it.set_state(s)
    data.make_iterator = lambda **kw: Starved(make(**kw))
    return data
inputs.open_train_data = starved
from test_train import tiny_config
from x2jax.train.loop import train
summary = train(tiny_config(sys.argv[2], num_steps=8, **{"checkpoint.every_steps": 2}), sys.argv[1])
print("preempted", summary["preempted"], "step", summary["step"], flush=True)
'''


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_a_run_waiting_for_data_and_keeps_its_checkpoint(tmp_path, cache_dir, sig):
    script = tmp_path / "starved.py"
    script.write_text(STARVED_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), str(cache_dir), str(ROOT / "tests")],
                            env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("starving"):
                break
        time.sleep(0.5)
        proc.send_signal(sig)
        t0 = time.monotonic()
        lines.append(proc.communicate(timeout=60)[0])
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert f"{sig.name} received while waiting for data for step 4: nothing new saved" in out
    assert "latest checkpoint (step 2) is intact" in out and "preempted True step 3" in out
    assert max(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == 2, "nothing new saved"


# ---------------------------------------------------------------------------
# config values
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("override, error", [
    ("data.batch_size=2.5", "--config.data.batch_size: expected an integer, got '2.5'"),
    ("num_steps=2.7", "--config.num_steps: expected an integer, got '2.7'"),
    ("checkpoint.keep=True", "--config.checkpoint.keep: expected an integer, got 'True'"),
    ("schedule.lr=fast", "--config.schedule.lr: expected a number, got 'fast'"),
])
def test_override_of_the_wrong_type_is_an_error(override, error):
    with pytest.raises(ValueError, match=error.replace(".", r"\.")):
        config_lib.apply_overrides(config_lib.base_config(), [override])


def test_override_of_a_float_key_takes_an_int():
    c = config_lib.apply_overrides(config_lib.base_config(), ["schedule.lr=1"])
    assert c.schedule.lr == 1.0 and isinstance(c.schedule.lr, float)


@pytest.mark.parametrize("override, error", [
    ("model.conv_impl=onednnn", "model.conv_impl must be one of"),
    ("schedule.name=cosinee", "schedule.name must be one of"),
    ("optimizer.name=sgdd", "optimizer.name must be one of"),
    ("resume_mismatch=maybe", "resume_mismatch must be 'error' or 'allow'"),
    ("distributed.initialization_timeout_s=0", "initialization_timeout_s and distributed.heartbeat_timeout_s"),
    ("mesh.rules.classes=data,modle", r"mesh.rules: sharding rule classes: unknown mesh axes \['modle'\]"),
    ("mesh.rules.batch=", "mesh.rules.batch must name at least one mesh axis"),
])
def test_every_name_is_checked_before_any_data_work(tmp_path, cache_dir, override, error, monkeypatch):
    from x2jax.train import inputs  # noqa: PLC0415

    monkeypatch.setattr(inputs, "open_train_data", lambda *a, **k: pytest.fail("data opened before validation"))
    with pytest.raises(ValueError, match=error):
        train(config_lib.apply_overrides(tiny_config(cache_dir), [override]), tmp_path)


def test_more_devices_than_available_is_an_error(tmp_path, cache_dir):
    with pytest.raises(ValueError, match=rf"mesh.num_devices=16 but only {jax.device_count()} device"):
        train(tiny_config(cache_dir, **{"mesh.num_devices": 16}), tmp_path)


def test_sharding_rules_of_the_config_shard_the_state(cache_dir):
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    from x2jax.parallel.sharding import ShardingRules  # noqa: PLC0415
    from x2jax.train.setup import build_step, make_run_mesh  # noqa: PLC0415

    c = tiny_config(cache_dir, **{"mesh.model": 2, "mesh.rules.classes": "model"})
    config_lib.validate(c)
    rules = ShardingRules.from_config(c.mesh.rules)
    mesh = make_run_mesh(c, rules)
    step = build_step(c, mesh, rules, num_classes=48, image_size=16, total_steps=8)
    w = step.abstract_state.params["head"]["weight"]
    assert w.sharding.spec == P(("model",), None) and dict(mesh.shape) == {"data": 4, "model": 2}

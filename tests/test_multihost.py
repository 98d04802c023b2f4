"""Two local processes (jax.distributed on 127.0.0.1, 4 CPU devices each) train the
sharded head one step and match the single-process 8-device run; a missing or
killed process ends the others with a message naming it."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from x2jax import losses
from x2jax.parallel import make_mesh

WORKER = Path(__file__).with_name("multihost_worker.py")
REPO = WORKER.parent.parent
TIMEOUT_S = 150


def _worker_module():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(commands: list[list[str]], env: dict, timeout_s: float) -> list[str]:
    """Start the commands together (one per process), wait; each must exit 0. Their logs."""
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in commands]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{len(procs)} processes did not finish in {timeout_s} s: {commands[0][:3]}")
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
    return logs


@pytest.mark.multiprocess
def test_two_processes_match_single_process(tmp_path):
    worker = _worker_module()
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    outs = [tmp_path / f"proc{i}.npz" for i in range(2)]
    _run_processes([[sys.executable, str(WORKER), str(port), str(i), "2", str(outs[i])]
                    for i in range(2)], env, TIMEOUT_S)

    # Single process, 8 devices, same global batch and the same code.
    assert jax.device_count() == 8
    e, w, y = worker.global_problem()
    loss, w_new, e_new = worker.run_step(make_mesh(), e, w, y)
    ref_loss = losses.margin_loss(e, w, y, losses.x2_softmax)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)  # and both equal the plain head

    for out in outs:
        got = np.load(out)
        assert int(got["process_count"]) == 2
        assert int(got["local_rows"]) == w_new.shape[0] // 2  # each process holds half of W
        np.testing.assert_allclose(got["loss"], loss, rtol=1e-6)
        np.testing.assert_allclose(got["w"], w_new, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["e"], e_new, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(w_new)[: w.shape[0]], w)  # the step moved W


def _train_cli(tmp_path, port, process_id, num_steps):
    return [sys.executable, str(REPO / "train.py"), "--workdir", str(tmp_path / "run"),
            f"--config.num_steps={num_steps}", "--config.schedule.warmup_steps=1",
            "--config.log_every_steps=1", "--config.checkpoint.every_steps=3",
            "--config.data.num_identities=48", "--config.data.images_per_identity=8",
            "--config.data.image_size=16", "--config.data.batch_size=32",
            "--config.model.layers=(1,1,1,1)", "--config.model.widths=(8,8,16,16)",
            "--config.model.embedding_size=32", "--config.eval.sets=",
            f"--config.compilation_cache_dir={tmp_path / 'cache'}",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}"]


def _run_two(tmp_path, num_steps):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return _run_processes([_train_cli(tmp_path, port, i, num_steps) for i in range(2)],
                          env, 4 * TIMEOUT_S)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_train_py_in_two_processes_checkpoints_and_resumes(tmp_path):
    """The whole loop (compile ahead, sharded step, Orbax save, resume) on 2 processes x 2 devices."""
    first = _run_two(tmp_path, num_steps=3)
    assert "devices: 4 x cpu in 2 process(es)" in first[0]
    second = _run_two(tmp_path, num_steps=6)
    assert "resumed from step 3" in second[0]
    assert "resumed" not in second[1]  # only process 0 talks
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # one writer, nothing repeated or lost
    assert all(np.isfinite(r["loss"]) and r["bad_labels"] == 0 for r in train)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6
    from x2jax.models.io import read_meta
    step, meta = read_meta(tmp_path / "run" / "checkpoints")
    assert step == 6 and meta["process_count"] == 2 and meta["mesh"] == {"data": 4, "model": 1}


def _worker_env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    return env


def _loop_cli(port, process_id, init_timeout_s=60, heartbeat_s=10):
    return [sys.executable, str(WORKER), str(port), str(process_id), "2", "--loop",
            str(init_timeout_s), str(heartbeat_s)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("process_id", [0, 1])
def test_one_of_two_processes_times_out_with_a_clear_message(tmp_path, process_id):
    """Only one process starts: progress lines, then the timeout named with its config key."""
    port = _free_port()
    if process_id == 0:  # the coordinator, through train.py and its config key
        cmd = _train_cli(tmp_path, port, 0, num_steps=2) + [
            "--config.distributed.initialization_timeout_s=10"]
        env, timeout_s = dict(os.environ, JAX_PLATFORMS="cpu"), 10
    else:  # a worker with no coordinator to reach
        cmd, env, timeout_s = _loop_cli(port, 1, init_timeout_s=6), _worker_env(), 6
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=90)
    elapsed = time.monotonic() - t0
    out = proc.stdout
    assert proc.returncode != 0, out[-3000:]
    # JAX aborts 5 s after the timeout; the rest is start-up.
    assert elapsed < timeout_s + 20, f"{elapsed:.0f} s:\n{out[-3000:]}"
    assert re.search(rf"x2jax: process {process_id} of 2 waiting for the other 1 process\(es\) at "
                     rf"127\.0\.0\.1:{port} \(\d+ s of {timeout_s} s", out), out[-3000:]
    assert (f"x2jax: process {process_id} of 2 timed out waiting for the other 1 process(es) at "
            f"127.0.0.1:{port}: not every process joined within initialization_timeout_s="
            f"{timeout_s} s") in out, out[-3000:]
    assert "--config.distributed.initialization_timeout_s=N" in out
    assert "step 1/" not in out


class _Reader:
    """Collects a process's output in a thread; ``wait_for`` a line."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, text: str, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: any(text in x for x in self.lines), timeout_s)

    def text(self) -> str:
        self._thread.join(10)
        return "".join(self.lines)


@pytest.mark.multiprocess
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_process_ends_the_other_within_the_heartbeat_timeout(victim):
    """SIGKILL one of two processes in a loop of collectives; the other ends, naming it."""
    heartbeat_s = 10
    port = _free_port()
    procs = [subprocess.Popen(_loop_cli(port, i, heartbeat_s=heartbeat_s), env=_worker_env(),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    readers = [_Reader(p) for p in procs]
    survivor = 1 - victim
    try:
        for i, r in enumerate(readers):
            assert r.wait_for("step 20", 60), f"process {i} did not start:\n{r.text()[-3000:]}"
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        try:
            procs[survivor].wait(heartbeat_s + 20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {survivor} still running {heartbeat_s + 20} s after process "
                        f"{victim} was killed:\n{readers[survivor].text()[-3000:]}")
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    out = readers[survivor].text()
    assert procs[survivor].returncode != 0, out[-3000:]
    assert elapsed < heartbeat_s + 5, f"{elapsed:.1f} s:\n{out[-3000:]}"
    if victim == 1:  # the coordinator notices the missing heartbeats of process 1
        assert "Gloo all-reduce failed" in out  # the collective fails at once; the exit waits
        assert re.search(r"Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1\b", out), out[-3000:]
        assert (f"x2jax: process 0 of 2 is waiting at exit for the other processes to shut down. "
                f"If one died, JAX ends this process within heartbeat_timeout_s={heartbeat_s} s") in out
    else:  # the coordinator (process 0, the "leader") is gone: at once
        assert elapsed < 5, f"{elapsed:.1f} s"
        assert re.search(r"leader task|coordination service", out), out[-3000:]

"""Two local processes (jax.distributed on 127.0.0.1, 4 CPU devices each) train the
sharded head one step and match the single-process 8-device run."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
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
    from x2jax.train.checkpointing import read_meta
    step, meta = read_meta(tmp_path / "run" / "checkpoints")
    assert step == 6 and meta["process_count"] == 2 and meta["mesh"] == {"data": 4, "model": 1}

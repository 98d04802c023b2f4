"""x2jax.runtime: the XLA:CPU flags (convolutions away from YNNPACK, memory-minimising schedule)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from x2jax import runtime

ROOT = Path(__file__).resolve().parent.parent

# Prints whether XLA:CPU compiled a 3x3 conv and its weight gradient into YNNPACK fusions.
_PROBE = """
import jax, jax.numpy as jnp
from jax import lax
conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
x, w = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
step = jax.jit(jax.grad(lambda w: conv(x, w).sum()))
text = step.lower(w).compile().as_text()
print("YNN" if "__ynn_fusion" in text else "NO-YNN", "convolution(" in text)
"""


CONV, SCHED = runtime.CPU_CONV_FLAG, runtime.CPU_SCHEDULER_FLAG


@pytest.mark.parametrize("before, after, kept", [
    (None, f"{CONV} {SCHED}", True),
    ("--xla_force_host_platform_device_count=8",
     f"--xla_force_host_platform_device_count=8 {CONV} {SCHED}", True),
    (CONV, f"{CONV} {SCHED}", True),
    (f"{SCHED} {CONV}", f"{SCHED} {CONV}", True),
    # the user's own choice is never overwritten
    ("--xla_cpu_experimental_ynn_fusion_type=+individual_convolution",
     f"--xla_cpu_experimental_ynn_fusion_type=+individual_convolution {SCHED}", False),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=true",
     f"--xla_cpu_enable_concurrency_optimized_scheduler=true {CONV}", False),
])
def test_flags_are_appended_once_and_a_users_own_setting_is_kept(before, after, kept):
    env = {} if before is None else {"XLA_FLAGS": before}
    assert runtime.use_fast_cpu_flags(env) is kept
    assert env["XLA_FLAGS"] == after
    assert runtime.use_fast_cpu_flags(env) is kept  # idempotent
    assert env["XLA_FLAGS"] == after


def test_the_suite_runs_with_the_flags_as_train_py_does():
    assert set(runtime.CPU_FLAGS) <= set(os.environ["XLA_FLAGS"].split())


def test_too_late_is_a_warning_and_changes_nothing(monkeypatch):
    import jax

    jax.devices()  # the backend of this process has started
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with pytest.warns(RuntimeWarning, match="before the first JAX computation"):
        assert runtime.use_fast_cpu_flags() is False
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_flag_takes_convolutions_out_of_ynnpack_in_a_fresh_process():
    """The flag is read by this jaxlib: without it the conv is a YNNPACK fusion, with it
    XLA's own convolution (if jaxlib renames the flag, this fails instead of silently
    losing the speed)."""
    def probe(flags: str) -> str:
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    assert probe("") == ["YNN", "True"]
    assert probe(runtime.CPU_CONV_FLAG) == ["NO-YNN", "True"]


_SCHEDULE_PROBE = """
import jax, jax.numpy as jnp
from x2jax.models import registry
m = registry.get_model("r18_tiny", embedding_size=16, image_size=32, conv_impl="xla")
v = registry.init_variables(m, jax.random.key(0))
x = jnp.ones((16, 32, 32, 3))
def loss(p):
    e, _ = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                   mutable=["batch_stats"])
    return jnp.mean(e ** 2)
print(jax.jit(jax.grad(loss)).lower(v["params"]).compile().memory_analysis().temp_size_in_bytes)
"""


def test_scheduler_flag_shrinks_a_training_steps_temporaries_in_a_fresh_process():
    """This jaxlib knows the flag (an unknown XLA flag aborts the process) and the
    memory-minimising schedule needs less temporary memory for an IResNet gradient."""
    def temp_bytes(flags: str) -> int:
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, "-c", _SCHEDULE_PROBE], env=env,
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    default, ours = temp_bytes(""), temp_bytes(runtime.CPU_SCHEDULER_FLAG)
    assert ours < 0.75 * default, (ours, default)

"""x2jax.runtime: the XLA:CPU flag that takes convolutions away from YNNPACK."""
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


@pytest.mark.parametrize("before, after, kept", [
    (None, runtime.CPU_CONV_FLAG, True),
    ("--xla_force_host_platform_device_count=8",
     "--xla_force_host_platform_device_count=8 " + runtime.CPU_CONV_FLAG, True),
    (runtime.CPU_CONV_FLAG, runtime.CPU_CONV_FLAG, True),
    # the user's own choice is never overwritten
    ("--xla_cpu_experimental_ynn_fusion_type=+individual_convolution",
     "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution", False),
])
def test_flag_is_appended_once_and_a_users_own_setting_is_kept(before, after, kept):
    env = {} if before is None else {"XLA_FLAGS": before}
    assert runtime.use_fast_cpu_convolutions(env) is kept
    assert env["XLA_FLAGS"] == after
    assert runtime.use_fast_cpu_convolutions(env) is kept  # idempotent
    assert env["XLA_FLAGS"] == after


def test_the_suite_runs_with_the_flag_as_train_py_does():
    assert runtime.CPU_CONV_FLAG in os.environ["XLA_FLAGS"].split()


def test_too_late_is_a_warning_and_changes_nothing(monkeypatch):
    import jax

    jax.devices()  # the backend of this process has started
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with pytest.warns(RuntimeWarning, match="before the first JAX computation"):
        assert runtime.use_fast_cpu_convolutions() is False
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

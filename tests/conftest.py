"""Test-suite setup: 8 simulated CPU devices, set before JAX is imported."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from x2jax.runtime import use_fast_cpu_flags  # noqa: E402

use_fast_cpu_flags()  # as train.py / eval.py do

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One persistent compilation cache for the session: identical steps compile once."""
    return tmp_path_factory.mktemp("jax_cache")

"""ModelSpec: the JSON of checkpoints, resume comparison, conv_impl resolution, export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from x2jax.evaluation.export import export_embedding
from x2jax.models import onednn_conv
from x2jax.models.layers import resolve_conv_impl
from x2jax.models.registry import abstract_variables, init_variables
from x2jax.models.spec import LOAD_FIELDS, RUNTIME_FIELDS, ModelSpec
from x2jax.train import config as config_lib

ROOT = Path(__file__).resolve().parent.parent


def _old_description(config, image_size):
    """The model description training wrote before ModelSpec (checkpoints hold it)."""
    m = config.model
    description = {"arch": m.name, "embedding_size": int(m.embedding_size), "image_size": int(image_size),
                   "dtype": m.dtype, "conv_impl": m.conv_impl, "dropout": float(m.dropout)}
    for key in ("layers", "widths"):
        if m[key]:
            description[key] = [int(v) for v in m[key]]
    return description


def _configs():
    tiny = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
    custom = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
    custom.model.layers, custom.model.widths, custom.model.embedding_size = (1, 1, 1, 1), (8, 8, 16, 16), 32
    custom.model.conv_impl, custom.model.dtype, custom.model.dropout = "xla", "bfloat16", 0.2
    r50 = config_lib.load_config(f"{ROOT / 'configs' / 'ms1mv3_r50_x2softmax.py'}:arcface")
    r50.model.batch_norm = "global"  # the old description had no batch_norm (the recipe's is "local")
    mbf = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
    mbf.model.name = "mobilefacenet"
    return [(tiny, 16), (custom, 32), (r50, 112), (mbf, 112)]


@pytest.mark.parametrize("index", range(4))
def test_to_json_is_the_old_description_and_round_trips(index):
    config, image_size = _configs()[index]
    spec = ModelSpec.from_config(config, image_size)
    assert spec.to_json() == _old_description(config, image_size)
    assert list(spec.to_json()) == list(_old_description(config, image_size))  # same key order too
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert ModelSpec.from_json(_old_description(config, image_size)) == spec


def test_recipe_batch_norm_is_written_and_read_back():
    r50 = config_lib.load_config(ROOT / "configs" / "ms1mv3_r50_x2softmax.py")
    spec = ModelSpec.from_config(r50, 112)
    assert spec.batch_norm == "local" and spec.to_json()["batch_norm"] == "local"
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert "batch_norm" not in ModelSpec.from_config(config_lib.base_config(), 112).to_json()  # the default


def test_from_json_refuses_unknown_keys_unless_ignored():
    d = ModelSpec("r18_tiny", 8, 16).to_json()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['format'\]"):
        ModelSpec.from_json(dict(d, format="saved_model"))
    assert ModelSpec.from_json(dict(d, format="saved_model"), ignore=("format",)) == ModelSpec("r18_tiny", 8, 16)
    with pytest.raises(ValueError, match="no 'arch'"):
        ModelSpec.from_json({"embedding_size": 8, "image_size": 16})


def test_same_function_ignores_runtime_fields_only():
    spec = ModelSpec("r18_tiny", 8, 16, layers=(1, 1, 1, 1), widths=(8, 8, 16, 16))
    assert RUNTIME_FIELDS == ("conv_impl", "remat", "batch_norm")
    assert set(LOAD_FIELDS) == {"conv_impl", "remat", "batch_norm", "dtype", "dropout"}
    for impl in ("xla", "im2col", "onednn", "auto"):
        assert spec.same_function(spec.replace(conv_impl=impl))
    assert spec.same_function(spec.replace(remat="blocks", batch_norm="local"))
    for change in ({"dtype": "bfloat16"}, {"dropout": 0.1}, {"embedding_size": 16}, {"image_size": 32},
                   {"layers": (1, 1, 2, 1)}, {"widths": None}, {"arch": "mobilefacenet"}):
        assert not spec.same_function(spec.replace(**change)), change
    assert spec.replace(conv_impl="xla").conv_impl == "xla" and spec.conv_impl == "auto"


def _lowered_text(module):
    variables = abstract_variables(module)
    images = jax.ShapeDtypeStruct((2, module.image_size, module.image_size, 3), jnp.float32)
    return jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(variables, images).as_text()


def test_build_for_tpu_uses_xla_convs():
    spec = ModelSpec("r18_tiny", 8, 16, layers=(1, 1, 1, 1), widths=(8, 8, 16, 16))
    module = spec.build(platform="tpu")
    assert module.conv_impl == "xla"
    text = _lowered_text(module)
    assert "custom_call" not in text and "x2jax_onednn" not in text
    assert resolve_conv_impl("auto", "gpu") == "xla"
    assert resolve_conv_impl("auto", "cpu", num_devices=8) == "im2col"
    assert resolve_conv_impl("im2col", "tpu") == "im2col"  # only "auto" is resolved


def test_build_on_cpu_uses_onednn_and_equals_auto_bitwise():
    if jax.default_backend() != "cpu":
        pytest.skip("needs a CPU backend")
    if not onednn_conv.available():
        pytest.skip("oneDNN extension not available (pip install -e '.[onednn]')")
    spec = ModelSpec("r18_tiny", 8, 16, layers=(1, 1, 1, 1), widths=(8, 8, 16, 16))
    # build() counts this process's devices (the tests may run with several CPU devices)
    assert spec.build().conv_impl == ("onednn" if jax.device_count() == 1 else "im2col")
    module = spec.build(num_devices=1)
    assert module.conv_impl == "onednn"
    assert "x2jax_onednn" in _lowered_text(module)
    # In a single-device process, the same bits as "auto" resolved at trace time.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _BITWISE_PROBE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"devices": 1, "impl": "onednn", "bitwise": True}


_BITWISE_PROBE = """
import json
import jax, numpy as np
from x2jax.models.registry import init_variables
from x2jax.models.spec import ModelSpec
spec = ModelSpec("r18_tiny", 8, 16, layers=(1, 1, 1, 1), widths=(8, 8, 16, 16))
module = spec.build()
auto = module.clone(conv_impl="auto")
variables = init_variables(module.clone(conv_impl="xla"), jax.random.key(0))
x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
def run(m):
    def loss(p):
        emb, upd = m.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                           mutable=["batch_stats"])
        return (emb ** 2).mean(), (emb, upd)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
same = all(np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(run(module)), jax.tree.leaves(run(auto))))
print(json.dumps({"devices": jax.device_count(), "impl": module.conv_impl, "bitwise": bool(same)}))
"""


def test_export_module_uses_xla_convs():
    spec = ModelSpec("r18_tiny", 8, 16, conv_impl="onednn")
    variables = init_variables(spec.replace(conv_impl="xla").build(), jax.random.key(0))
    exported = export_embedding(spec.to_json(), variables, bake_variables=False)
    text = exported.mlir_module()
    assert "x2jax_onednn" not in text  # (jax.export's own shape assertions are custom calls)
    assert spec.conv_impl == "onednn"

"""The real train step compiled for a TPU topology (v5e:2x2) on this CPU, via libtpu: no TPU needed.

Skipped only where libtpu is not installed (``pip install 'x2jax[tpu]'``); the
libtpu-missing error is tested everywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from x2jax import tpu
from x2jax.train import config as config_lib
from x2jax.train.state import checkpoint_class_rows

pytestmark = pytest.mark.tpu

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY, CHIPS, NUM_CLASSES, IMAGE_SIZE = "v5e:2x2", 4, 1000, 16


@pytest.fixture
def libtpu():
    return pytest.importorskip("libtpu")


def tiny_config(**overrides):
    """tests/test_train.py's tiny IResNet (4 blocks, 32-d embedding), batch 32 at 16x16."""
    c = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
    c.data.batch_size, c.data.image_size = 32, IMAGE_SIZE
    c.model.layers, c.model.widths, c.model.embedding_size = (1, 1, 1, 1), (8, 8, 16, 16), 32
    config_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])
    return c


def backbone_convolutions(compiled):
    """Operand dtypes of the backbone's convolutions (TPU HLO spells dots as convolutions too)."""
    return [tuple(t.split("[")[0] for t in i.operands) for i in tpu.hlo_instructions(compiled.as_text())
            if i.opcode == "convolution" and i.op_name.endswith("conv_general_dilated")]


@pytest.fixture(scope="module")
def compiled_f32():
    pytest.importorskip("libtpu")
    return tpu.compile_train_step(tiny_config(), TOPOLOGY, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)


def test_topology_mesh(libtpu):
    mesh = tpu.topology_mesh(TOPOLOGY)
    assert dict(mesh.shape) == {"data": CHIPS, "model": 1}
    assert {d.platform for d in mesh.devices.flat} == {"tpu"}
    assert tpu.topology_mesh(TOPOLOGY, model=2).shape["model"] == 2
    assert tpu.topology_mesh("v5e:1x1").size == 1  # smaller than a host: retried with one host's bounds


def test_w_stays_sharded_and_no_cpu_custom_call(compiled_f32):
    plan = tpu.summarize_compiled(compiled_f32)
    state_shardings = compiled_f32.input_shardings[0][0]
    c_pad, d = checkpoint_class_rows(NUM_CLASSES, CHIPS), 32
    w_sharding = state_shardings.params["head"]["weight"]
    shard = w_sharding.shard_shape((c_pad, d))
    assert c_pad == 1024 and shard == (c_pad // CHIPS, d)
    assert np.prod(shard) * 4 == c_pad * d * 4 // CHIPS  # per-chip bytes of W
    w_shard_bytes = int(np.prod(shard)) * 4
    assert plan.memory["arguments"] >= w_shard_bytes
    for x in plan.collectives:
        if x.kind == "all-gather":  # the embeddings are gathered ((B/4, D) -> (B, D)), never W
            for t in x.operands + x.result:
                assert tpu.type_bytes(t) < w_shard_bytes, f"W-sized all-gather: {x}"
    assert plan.counts()["all-gather"] >= 1
    hlo = compiled_f32.as_text()
    assert "x2jax_onednn" not in hlo
    convs = backbone_convolutions(compiled_f32)
    assert convs and sum(ops == ("f32", "f32") for ops in convs) > len(convs) // 2


def test_bfloat16_convolutions(libtpu):
    compiled = tpu.compile_train_step(tiny_config(**{"model.dtype": "bfloat16"}), TOPOLOGY,
                                      num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
    convs = backbone_convolutions(compiled)
    assert convs and all(set(ops) == {"bf16"} for ops in convs), convs
    assert "x2jax_onednn" not in compiled.as_text()


def test_unknown_topology(libtpu):
    with pytest.raises(ValueError, match=r"unknown TPU topology 'v5e:3x3'.*known to work: v5e: 1x1, 2x2"):
        tpu.topology_mesh("v5e:3x3")
    with pytest.raises(ValueError, match="unknown TPU topology 'bogus'"):
        tpu.topology_mesh("bogus")
    with pytest.raises(ValueError, match="megacore"):
        tpu.topology_mesh("v4:2x2x1")


def test_libtpu_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # makes `import libtpu` fail
    with pytest.raises(ImportError, match=r"pip install 'x2jax\[tpu\]'"):
        tpu.topology_mesh(TOPOLOGY)


def test_hlo_parsing():
    hlo = """
  %p.1 = f32[8,32]{1,0:T(8,128)} parameter(0)
  %all-gather.4 = f32[32,32]{1,0:T(8,128)S(1)} all-gather(%p.1), channel_id=1, dimensions={0}
  %ars = (f32[16]{0}, f32[16]{0}) all-reduce-start(f32[16]{0} %a, f32[16]{0} %b), to_apply=%add
  %ard = (f32[16]{0}, f32[16]{0}) all-reduce-done(%ars)
  %convolution.1 = bf16[8,16,16,8]{3,0,2,1} convolution(%p.1, %p.1), metadata={op_name="x/conv_general_dilated"}
  %ags = (f32[8,32]{1,0}, f32[32,32]{1,0}) all-gather-start(%p.1), channel_id=2, dimensions={0}
  %agd = f32[32,32]{1,0} all-gather-done(%ags)
  %cp = bf16[4,2]{1,0} collective-permute(bf16[4,2]{1,0} %x), source_target_pairs={{0,1},{1,0}}
"""
    got = tpu.hlo_collectives(hlo)
    assert [(x.kind, x.operands, x.result) for x in got] == [
        ("all-gather", ("f32[8,32]",), ("f32[32,32]",)),
        ("all-reduce", ("f32[16]", "f32[16]"), ("f32[16]", "f32[16]")),
        ("all-gather", ("f32[8,32]",), ("f32[32,32]",)),  # async: the -done's result, not the -start's tuple
        ("collective-permute", ("bf16[4,2]",), ("bf16[4,2]",)),
    ]
    summary = tpu.CompiledPlan({}, got)
    assert summary.counts() == {"all-reduce": 1, "all-gather": 2, "reduce-scatter": 0, "all-to-all": 0,
                                "collective-permute": 1}
    assert summary.collective_bytes() == {"all-reduce": 2 * 16 * 4, "all-gather": 2 * 32 * 32 * 4,
                                          "reduce-scatter": 0, "all-to-all": 0, "collective-permute": 4 * 2 * 2}
    conv = [i for i in tpu.hlo_instructions(hlo) if i.opcode == "convolution"]
    assert conv[0].op_name == "x/conv_general_dilated" and conv[0].result == ("bf16[8,16,16,8]",)
    assert tpu.type_bytes("bf16[8,16,16,8]") == 2 * 8 * 16 * 16 * 8


def test_hbm_exhausted_message():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(30.85G) exceeds available HBM (15.75G).")
    e = tpu.parse_hbm_exhausted(msg)
    assert isinstance(e, tpu.HbmExhaustedError)
    assert (e.required_bytes, e.available_bytes) == (int(30.85 * 2**30), int(15.75 * 2**30))
    assert tpu.parse_hbm_exhausted("INVALID_ARGUMENT: something else") is None


def test_chip_specs():
    """Cloud TPU docs: v5e 16 GiB, 197 TFLOP/s, 819 GB/s; v5p 95 GiB, 459, 2765; v6e 32 GiB, 918, 1640."""
    got = {s.name: (s.hbm_bytes / 2**30, s.peak_flops / 1e12, s.hbm_bandwidth / 1e9) for s in tpu.CHIP_SPECS.values()}
    assert got == {"v5e": (16, 197, 819), "v5p": (95, 459, 2765), "v6e": (32, 918, 1640)}
    with pytest.raises(ValueError, match="no chip figures for TPU device kind 'TPU v4'"):
        tpu.chip_spec("TPU v4")

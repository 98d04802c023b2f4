"""``python -m x2jax.plan``: the fit / FLOPs / collectives table of a TPU compile, its errors and exit codes.

Tiny IResNet (4 blocks, 32-d embedding), batch 32 at 16x16, a few hundred classes, so each
compile takes seconds. Compiles need libtpu (``pip install 'x2jax[tpu]'``, installed in CI);
the libtpu-missing error and the pure parts run everywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from x2jax import plan
from x2jax.train.state import checkpoint_class_rows

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
TINY = ["--config.data.batch_size=32", "--config.model.layers=(1,1,1,1)", "--config.model.widths=(8,8,16,16)",
        "--config.model.embedding_size=32", "--config.data.image_size=16", "--config.data.num_identities=300"]
TOPOLOGY, CHIPS, BATCH, DIM, CLASSES = "v5e:2x2", 4, 32, 32, 300
# Cloud TPU docs, v5e: 16 GiB HBM, 197 bf16 TFLOP/s, 819 GB/s per chip.
V5E_HBM, V5E_FLOPS, V5E_BW = 16 * 2**30, 197e12, 819e9
GIB = 2**30

needs_libtpu = pytest.mark.skipif(__import__("importlib").util.find_spec("libtpu") is None,
                                  reason="needs libtpu: pip install 'x2jax[tpu]'")


def run_main(*argv: str) -> tuple[int, str, str]:
    """``plan.main(argv)`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = plan.main(list(argv))
    return status, out.getvalue(), err.getvalue()


def tiny_config(*overrides: str):
    return plan.load_plan_config(CONFIG, [o.removeprefix("--config.") for o in TINY + list(overrides)])


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("libtpu")
    status, out, err = run_main("--config", CONFIG, "--topology", TOPOLOGY, "--json", *TINY)
    assert status == 0, err
    return json.loads(out)


@pytest.mark.tpu
def test_every_field(report):
    keys = {"status", "fits", "config", "topology", "chips", "hosts", "chip", "device_kind", "hbm_per_chip_bytes",
            "capacity_bytes", "peak_bf16_flops_per_s", "hbm_bandwidth_bytes_per_s", "mesh", "model", "dtype", "loss",
            "num_classes", "padded_classes", "class_shards", "image_size", "global_batch", "per_chip_batch",
            "memory", "class_centers", "flops", "bytes_accessed_per_chip", "collectives", "collective_count",
            "collective_bytes", "bound", "compile_s"}
    assert keys <= set(report), keys - set(report)
    assert set(report["memory"]) >= {"arguments", "temporaries", "outputs", "aliased", "code", "peak", "total",
                                     "headroom"}
    assert set(report["flops"]) == {"per_chip", "per_step", "per_image"}
    assert set(report["collectives"]) == {"all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                                          "collective-permute"}
    assert all(set(v) == {"count", "bytes"} for v in report["collectives"].values())
    assert set(report["bound"]) >= {"step_time_s", "images_per_s", "compute_s", "hbm_s"}
    assert (report["chips"], report["chip"], report["device_kind"]) == (CHIPS, "v5e", "TPU v5 lite")
    assert (report["hbm_per_chip_bytes"], report["peak_bf16_flops_per_s"], report["hbm_bandwidth_bytes_per_s"]) == (
        V5E_HBM, V5E_FLOPS, V5E_BW)
    assert (report["num_classes"], report["global_batch"], report["per_chip_batch"]) == (CLASSES, BATCH, BATCH // CHIPS)


@pytest.mark.tpu
def test_w_bytes_closed_form(report):
    rows = checkpoint_class_rows(CLASSES, CHIPS)  # 384: a multiple of lcm(128, 4)
    assert report["padded_classes"] == rows == 384
    w = report["class_centers"]
    assert w["shard_shape"] == [rows // CHIPS, DIM] and w["dtype"] == "float32"
    assert w["weight_bytes"] == rows // CHIPS * DIM * 4
    assert w["optimizer_bytes"] == w["weight_bytes"]  # SGD with momentum: one W-sized trace
    assert w["total_bytes"] == 2 * rows // CHIPS * DIM * 4


@pytest.mark.tpu
@pytest.mark.parametrize("overrides, moments", [
    ((), 1),  # SGD momentum 0.9: one trace
    (("optimizer.momentum=0.0",), 0),  # plain SGD: no state of W's shape
    (("optimizer.name=adamw",), 2),  # mu and nu
    (("optimizer.accumulate_steps=2",), 2),  # + MultiSteps' accumulated gradient
])
def test_w_optimizer_state_bytes(overrides, moments):
    pytest.importorskip("libtpu")
    from x2jax import tpu

    built = tpu.build_train_step(tiny_config(*overrides), "v5e:2x4", num_classes=1000, image_size=16)
    rows = checkpoint_class_rows(1000, 8)  # 1024
    w = plan.class_center_bytes(built.step)
    assert w["weight_bytes"] == rows // 8 * DIM * 4
    assert w["optimizer_bytes"] == moments * rows // 8 * DIM * 4


@pytest.mark.tpu
def test_memory_fit_flops_bound(report):
    m = report["memory"]
    assert m["total"] == max(m["peak"], m["arguments"] + m["temporaries"] + m["outputs"] - m["aliased"])
    assert m["arguments"] >= report["class_centers"]["total_bytes"]  # W and its momentum are inputs
    assert report["capacity_bytes"] == V5E_HBM and report["fits"] is True and report["status"] == "fits"
    assert m["headroom"] == V5E_HBM - m["total"] > 0
    f = report["flops"]
    assert f["per_step"] == pytest.approx(f["per_chip"] * CHIPS)
    assert f["per_image"] == pytest.approx(f["per_step"] / BATCH)
    b = report["bound"]
    expect = max(f["per_chip"] / V5E_FLOPS, report["bytes_accessed_per_chip"] / V5E_BW)
    assert b["step_time_s"] == pytest.approx(expect) and b["images_per_s"] == pytest.approx(BATCH / expect)


@pytest.mark.tpu
def test_flops_per_image_against_a_cpu_forward(report):
    """A training step costs about 3 forward passes (forward, input and weight gradients): the TPU
    step's FLOPs per image against XLA:CPU's count for one forward pass of the same backbone."""
    import jax
    import jax.numpy as jnp

    from x2jax.models.registry import init_variables
    from x2jax.models.spec import ModelSpec

    model = ModelSpec.from_config(tiny_config("model.conv_impl=xla"), 16).build(platform="cpu")
    variables = init_variables(model, jax.random.key(0))
    x = jnp.zeros((BATCH, 16, 16, 3), jnp.float32)
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    forward_per_image = fwd.cost_analysis()["flops"] / BATCH
    ratio = report["flops"]["per_image"] / forward_per_image
    assert 2.5 < ratio < 4.5, ratio


@needs_libtpu
@pytest.mark.tpu
def test_flops_are_per_chip(report):
    """Twice the chips and twice the batch: the same per-chip program, the same per-chip FLOPs."""
    status, out, err = run_main("--config", CONFIG, "--topology", "v5e:2x4", "--per-chip-batch", str(BATCH // CHIPS),
                                "--json", *TINY)
    assert status == 0, err
    r = json.loads(out)
    assert (r["chips"], r["global_batch"]) == (2 * CHIPS, 2 * BATCH)
    assert r["flops"]["per_chip"] == pytest.approx(report["flops"]["per_chip"], rel=0.02)
    assert r["flops"]["per_step"] == pytest.approx(2 * report["flops"]["per_step"], rel=0.02)


@pytest.mark.tpu
def test_collectives(report):
    c = report["collectives"]
    assert report["collective_count"] == sum(v["count"] for v in c.values())
    assert report["collective_bytes"] == sum(v["bytes"] for v in c.values())
    # the head gathers the global batch's embeddings, f32 (B, D), once: W is never gathered
    assert c["all-gather"] == {"count": 1, "bytes": BATCH * DIM * 4}
    assert c["all-reduce"]["count"] > 20  # BatchNorm statistics and gradients over the batch


@pytest.mark.tpu
def test_text_table(report):
    text = plan.format_report(report)
    assert f"{CHIPS} x TPU v5 lite (v5e), 16.00 GiB HBM each" in text
    assert "FITS" in text and "W (class centres)    shard 96 x 32 float32: 12.00 KiB" in text
    assert f"collectives per chip   {report['collective_count']} ops" in text
    assert "bound (NOT a measurement)" in text


@needs_libtpu
@pytest.mark.tpu
def test_require_fit_exit_3_with_a_small_capacity():
    """The module itself (``python -m x2jax.plan``), against a 1 MiB "chip"."""
    done = subprocess.run([sys.executable, "-m", "x2jax.plan", "--config", CONFIG, "--topology", TOPOLOGY,
                           "--hbm-gib", str(1 / 1024), "--require-fit", *TINY],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == plan.EXIT_NO_FIT == 3, done.stderr[-3000:]
    assert "DOES NOT FIT" in done.stdout and "of 1.00 MiB" in done.stdout
    assert "does not fit v5e:2x2 (--require-fit)" in done.stderr


@needs_libtpu
@pytest.mark.tpu
def test_huge_class_count_is_refused_by_the_compiler():
    """60M classes x 32 on one v5e chip: W, momentum and gradient alone are 23 GB."""
    status, out, err = run_main("--config", CONFIG, "--topology", "v5e:1x1", "--num-classes", "60000000",
                                "--json", "--require-fit", *TINY)
    assert status == 3, err
    r = json.loads(out)
    assert (r["status"], r["fits"]) == ("does not fit", False)
    assert "HBM" in r["compiler_message"]
    assert r["memory"]["available_bytes"] == int(15.75 * GIB)  # the compiler's own v5e limit
    assert r["memory"]["required_bytes"] > V5E_HBM
    assert r["class_centers"]["weight_bytes"] == checkpoint_class_rows(60_000_000, 1) * DIM * 4
    assert "DOES NOT FIT" in plan.format_report(r)


@needs_libtpu
@pytest.mark.tpu
@pytest.mark.parametrize("topology, match", [("v5e:3x3", r"unknown TPU topology 'v5e:3x3'"),
                                             ("bogus", r"unknown TPU topology 'bogus'"),
                                             ("v4:2x2x1", r"megacore")])
def test_unknown_topology_exit_2(topology, match):
    import re

    status, out, err = run_main("--config", CONFIG, "--topology", topology, *TINY)
    assert status == 2 and out == ""
    assert re.search(match, err), err
    if topology != "v4:2x2x1":
        assert "known to work: v5e: 1x1, 2x2, 2x4" in err and "v5p: " in err and "v6e: " in err


def test_libtpu_missing_exit_2(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` fails
    status, out, err = run_main("--config", CONFIG, "--topology", TOPOLOGY, *TINY)
    assert status == 2 and out == ""
    assert "needs libtpu" in err and "pip install 'x2jax[tpu]'" in err


@pytest.mark.parametrize("argv, match", [
    (["--config.model.bogus=1"], r"unknown config key 'model.bogus'"),
    (["--config.data.batch_size=many"], r"data.batch_size"),
    (["--config.loss.sample_rate=0"], r"loss.sample_rate must be in \(0, 1\]"),
])
def test_config_errors_exit_2(argv, match):
    import re

    status, out, err = run_main("--config", CONFIG, "--topology", TOPOLOGY, *TINY, *argv)
    assert status == 2 and out == ""
    assert re.search(match, err), err


@needs_libtpu
@pytest.mark.tpu
def test_batch_that_does_not_split_exit_2():
    """train.py's mesh checks, against the slice's chips: 512 v5p chips and the recipe's eval batch of 256."""
    status, out, err = run_main("--config", str(ROOT / "configs" / "ms1mv3_r50_x2softmax.py"), "--topology",
                                "v5p:8x8x8", "--per-chip-batch", "128")
    assert status == 2 and out == ""
    assert "eval.batch_size=256 is not divisible by 512 devices" in err
    status, _, err = run_main("--config", CONFIG, "--topology", TOPOLOGY, *TINY, "--config.data.batch_size=30")
    assert status == 2 and "data.batch_size=30 is not divisible by the 4 devices of the batch axis" in err


def test_missing_config_file_exit_2():
    status, _, err = run_main("--config", str(ROOT / "configs" / "nope.py"), "--topology", TOPOLOGY)
    assert status == 2 and "nope.py" in err and "not found" in err


def test_real_dataset_sizes(tmp_path):
    """Recipes of known datasets take insightface's class counts; others need the flags."""
    c = plan.load_plan_config(str(ROOT / "configs" / "ms1mv3_r50_x2softmax.py"), [])
    s = plan.data_shape(c, "configs/ms1mv3_r50_x2softmax.py")
    assert (s.num_classes, s.image_size, s.num_images) == (93431, 112, 5179510)
    s = plan.data_shape(c, "configs/ms1mv3_r50_x2softmax.py", num_classes=1000)
    assert (s.num_classes, s.image_size) == (1000, 112)
    w = plan.load_plan_config(str(ROOT / "configs" / "webface42m_r100_x2softmax.py"), [])
    assert plan.data_shape(w, "configs/webface42m_r100_x2softmax.py").num_classes == 2059906
    mine = tmp_path / "my_faces.py"
    mine.write_text("from x2jax.train.config import base_config\n\ndef get_config():\n    c = base_config()\n"
                    "    c.data.name = 'image_folder'\n    c.num_steps = 10\n    return c\n")
    status, _, err = run_main("--config", str(mine), "--topology", TOPOLOGY)
    assert status == 2 and "--num-classes N and --image-size S" in err and "ms1mv3 93431" in err
    cfg = plan.load_plan_config(str(mine), [])
    assert plan.data_shape(cfg, str(mine), num_classes=7, image_size=96).num_classes == 7


def test_compiler_crash_becomes_a_report():
    r = plan.run_isolated([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert r["status"] == "compiler crashed" and "SIGSEGV" in r["compiler_message"]


@needs_libtpu
@pytest.mark.tpu
def test_v6e_compiles_in_a_child():
    """v6e train steps crash libtpu 0.0.42.1 (SIGSEGV; multi-chip ones, this one included): the plan
    reports it and exits 4, it does not die."""
    done = subprocess.run([sys.executable, "-m", "x2jax.plan", "--config", CONFIG, "--topology", "v6e:2x4", *TINY],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode in (0, plan.EXIT_COMPILER), (done.returncode, done.stderr[-3000:])
    assert "compiling in a child process" in done.stderr
    if done.returncode == plan.EXIT_COMPILER:
        assert "COMPILER CRASHED" in done.stdout and "SIGSEGV" in done.stderr


def test_max_fit_on_a_known_curve():
    """The fit, the check and the correction against an exact search of a known memory curve.

    The kink makes the first prediction overshoot; the correction (the line through the
    failed point) lands below the maximum of a convex curve: within 3 % here."""
    unit, capacity = 128, 100 * 2**20

    def curve(x):  # linear, plus a kink that makes the first prediction overshoot
        return 17e6 + 600 * x + (max(0, x - 120_000) * 300)

    def compile_at(x):
        total = curve(x)
        return {"fits": total <= capacity, "memory": {"total": total}, "capacity_bytes": capacity, "status": "x"}

    got = plan.max_fit(compile_at, 512, unit=unit, what="test", say=lambda _: None)
    exact = max(x for x in range(unit, 400_000, unit) if curve(x) <= capacity)
    assert got["verified"] and got["value"] <= exact and exact - got["value"] <= 0.03 * exact
    assert got["compiles"] == 4 and len(got["tried"]) == 4


def _fits(config, topology: str, classes: int, capacity: int) -> bool:
    return plan.plan_in_process(config, topology, num_classes=classes, image_size=16, capacity_bytes=capacity,
                                say=lambda _: None)["fits"]


@needs_libtpu
@pytest.mark.tpu
@pytest.mark.slow
def test_max_classes_against_a_bisection():
    """--max-classes on a 100 MiB v5e:2x2 "chip", checked by a bisection of compiles around it."""
    cap_gib = 100 / 1024
    status, out, err = run_main("--config", CONFIG, "--topology", TOPOLOGY, "--num-classes", "65536",
                                "--hbm-gib", str(cap_gib), "--max-classes", "--json", *TINY)
    assert status == 0, err
    m = json.loads(out)["max_classes"]
    assert m["verified"] and m["compiles"] <= 4, m
    got, unit, capacity = m["value"], 128, int(cap_gib * GIB)
    assert got % unit == 0
    config = tiny_config()
    lo, hi = got - 8 * unit, got + 8 * unit  # bracket: lo fits, hi does not
    assert _fits(config, TOPOLOGY, lo, capacity) and not _fits(config, TOPOLOGY, hi, capacity)
    for _ in range(2):  # bisection on multiples of `unit`
        mid = (lo + hi) // 2 // unit * unit
        lo, hi = (mid, hi) if _fits(config, TOPOLOGY, mid, capacity) else (lo, mid)
    assert lo <= got < hi + unit, (lo, got, hi)  # the largest that fits is in [lo, hi): so is the plan's



def test_plan_table_search():
    """scripts/plan_table.py: ascending slices until one fits, then the pod-scale slice; a crash ends a search."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_table", ROOT / "scripts" / "plan_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    recipe = "ms1mv3_r50_x2softmax"

    def row(topology, status, chips=1):
        report = {"status": status, "chips": chips, "capacity_bytes": V5E_HBM, "memory": {"total": GIB},
                  "class_centers": {"total_bytes": GIB // 4}, "collectives": {}, "collective_count": 3,
                  "collective_bytes": 2**20, "bound": {"step_time_s": 0.05, "images_per_s": 2560.0}}
        return {"recipe": recipe, "topology": topology, "command": " ".join(table.command(recipe, topology)),
                "wall_s": 10.0, "status": status, "report": report}

    def todo(results):
        return [(t, why) for r, t, why in table.planned(results) if r == recipe and t.startswith("v5e")]

    assert todo({}) == [("v5e:1x1", "smallest fitting slice"), ("v5e:16x16", "pod-scale slice")]
    results = {(recipe, "v5e:1x1"): row("v5e:1x1", "does not fit")}
    assert todo(results)[0] == ("v5e:2x2", "smallest fitting slice")
    results[(recipe, "v5e:2x2")] = row("v5e:2x2", "fits", 4)
    assert todo(results) == [("v5e:16x16", "pod-scale slice")]
    crashed = {(recipe, "v6e:1x1"): row("v6e:1x1", "compiler crashed")}
    assert [t for r, t, _ in table.planned(crashed) if r == recipe and t.startswith("v6e")] == ["v6e:16x16"]
    md = table.markdown(results).splitlines()
    assert len(md) == 4 and md[1].count("---") == 9
    assert md[3].startswith(f"| {recipe} | v5e:2x2 (4 chips) | yes | 1.00 (16.00) | 256.0 | 3, 1.0 | 50, 2560 |")
    assert "`python -m x2jax.plan --config configs/ms1mv3_r50_x2softmax.py --topology v5e:2x2 --per-chip-batch 128`" \
        in md[3]
    assert "| 10 s |" in md[3]  # a row from before the host load was recorded
    results[(recipe, "v5e:2x2")]["load_average"] = [1.04, 2.5]
    assert "| 10 s (load 1.0-2.5) |" in table.markdown(results).splitlines()[3]

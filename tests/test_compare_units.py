"""x2jax.compare without training: bad input is an error before any work, statistics, batch planning."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from x2jax.compare import batched as B
from x2jax.compare import cli, stats
from x2jax.compare.runs import plan_comparison
from x2jax.train import config as config_lib

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "synthetic_tiny_x2softmax.py")


def _base(**overrides):
    c = config_lib.load_config(CONFIG)
    return config_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])


# ---------------------------------------------------------------------------
# bad input: a clear error, before anything is written or trained
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["--losses", "x2_softmax,nosuchloss"], "unknown loss 'nosuchloss'"),
    (["--losses", "x2_softmax,arcface:a=1"], "arcface takes no parameter 'a'; it takes scale, margin"),
    (["--losses", "x2_softmax,arcface", "--config.loss.params.margin=0.3"], "x2_softmax takes no parameter 'margin'"),
    (["--losses", "arcface:margin"], "parameters look like arcface:key=value"),
    (["--losses", "x2_softmax", "--config.loss.name=arcface"], "takes its losses from --losses"),
    (["--losses", "x2_softmax", "--seeds", "0"], "--seeds must be >= 1"),
    (["--losses", "x2_softmax", "--config.model.name=nosuchnet"], "model.name 'nosuchnet' unknown"),
    # batched mode: runs that cannot share a step
    (["--losses", "x2_softmax,arcface", "--batched", "--config.loss.sample_rate=0.5"], "needs loss.sample_rate=1"),
    (["--losses", "x2_softmax,arcface,cosface", "--seeds", "1", "--batched", "--config.mesh.num_devices=2"],
     "the 3 runs over the 2 devices"),
])
def test_bad_input_is_an_error_before_any_work(tmp_path, capsys, argv, message):
    workdir = tmp_path / "cmp"
    rc = cli.main(["--config", CONFIG, "--workdir", str(workdir), *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and err.startswith("python -m x2jax.compare: error:")
    assert not workdir.exists()  # nothing written, nothing trained


def test_runs_whose_shapes_differ_cannot_be_batched(tmp_path):
    comparison = plan_comparison(_base(), losses_text="x2_softmax,arcface", num_seeds=1, workdir=tmp_path)
    x2, arc = comparison.runs
    arc.config.model.embedding_size = 64  # another shape of W and of the last layer
    with pytest.raises(config_lib.ConfigError, match=r"model.embedding_size: 128 vs 64.*same shapes"):
        B.check_batchable([x2, arc], num_devices=1, process_count=1)
    arc.config.model.embedding_size = 128
    B.check_batchable([x2, arc], num_devices=1, process_count=1)  # the same shapes: fine


def test_plan_gives_each_loss_its_preset_and_seeds_share_the_data_order(tmp_path):
    c = plan_comparison(_base(seed=5), losses_text="x2_softmax,arcface:margin=0.4", num_seeds=2,
                        workdir=tmp_path, loss_param_overrides={"scale": 32.0})
    assert [r.name for r in c.runs] == ["x2_softmax seed 5", "x2_softmax seed 6", "arcface:margin=0.4 seed 5",
                                        "arcface:margin=0.4 seed 6"]
    assert c.data_seed == 5 and c.seeds == (5, 6)
    assert c.runs[0].config.loss.params.to_dict() == {"scale": 32.0, "a": -0.9, "h": 0.0, "k": 0.65}
    assert c.runs[2].config.loss.to_dict()["params"] == {"scale": 32.0, "margin": 0.4}
    assert c.runs[3].workdir == tmp_path / "runs" / "arcface:margin=0.4" / "seed6"


# ---------------------------------------------------------------------------
# batch planning: loss branches and traced parameters
# ---------------------------------------------------------------------------


def test_traced_parameters_where_the_margin_traces_them():
    assert B.traceable_params("x2_softmax", {"scale": 64.0, "a": -0.9, "h": 0.0, "k": 0.65}) == ("a", "h", "k",
                                                                                                  "scale")
    assert B.traceable_params("arcface", {"scale": 64.0, "margin": 0.5}) == ("margin", "scale")
    # Python control flow on a parameter: static
    assert B.traceable_params("cosface", {"scale": 64.0, "margin": 0.35}) == ()  # `m3 == 0`
    assert B.traceable_params("x2_softmax", {"scale": 64.0, "a": -0.9, "gradient": "exact"}) == ()  # float(a)
    assert B.traceable_params("sphereface", {"scale": 64.0, "margin": 4}) == ()  # int(margin)


def test_runs_that_differ_in_a_traced_parameter_share_a_branch(tmp_path):
    c = plan_comparison(_base(), losses_text="arcface:margin=0.3,arcface:margin=0.5,cosface:margin=0.2,"
                        "cosface:margin=0.4", num_seeds=1, workdir=tmp_path)
    plan = B.plan_batch(c.runs)
    assert [(b.name, dict(b.params)) for b in plan.branches] == [
        ("arcface", {}), ("cosface", {"scale": 64.0, "margin": 0.2}), ("cosface", {"scale": 64.0, "margin": 0.4})]
    assert plan.branch_of_run == (0, 0, 1, 2)
    np.testing.assert_array_equal(plan.run_args["loss_index"], [0, 0, 1, 2])
    np.testing.assert_allclose(plan.run_args["loss_params"][0]["margin"][:2], [0.3, 0.5])
    assert plan.run_args["loss_params"][1] == {} and plan.run_args["loss_params"][2] == {}


# ---------------------------------------------------------------------------
# statistics: numpy/math only, against closed forms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_student_t_quantiles_match_closed_forms(p):
    # df = 1 is the Cauchy distribution; df = 2 has t = (2p - 1) / sqrt(2 p (1 - p))
    assert stats.student_t_ppf(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert stats.student_t_ppf(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    # df -> infinity: the normal quantile, by bisection on erf
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p else (lo, mid)
    assert stats.student_t_ppf(p, 1e7) == pytest.approx(lo, rel=1e-5)
    assert stats.student_t_ppf(1 - p, 3) == pytest.approx(-stats.student_t_ppf(p, 3), rel=1e-12)


def test_paired_t_interval_by_hand():
    a, b = [0.91, 0.88, 0.90], [0.89, 0.87, 0.86]
    d = np.array(a) - np.array(b)  # 0.02, 0.01, 0.04
    out = stats.paired_t_interval(a, b)
    # t_{0.975, 2} = (2 * 0.975 - 1) / sqrt(2 * 0.975 * 0.025) = 4.302652729...
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * np.std(d, ddof=1) / math.sqrt(3)
    assert out["mean"] == pytest.approx(d.mean(), abs=1e-15) and out["n"] == 3
    assert (out["low"], out["high"]) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-9)
    one = stats.paired_t_interval([0.9], [0.8])
    assert one["mean"] == pytest.approx(0.1) and math.isnan(one["low"]) and math.isnan(one["high"])
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_t_interval([0.9, 0.8], [0.8])
    s = stats.summarize([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3) and s["std"] == pytest.approx(np.std([1, 2, 4], ddof=1))

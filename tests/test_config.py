"""Config files through ml_collections' config flags: recipes with an argument, overrides, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from x2jax import losses
from x2jax.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def _flat(config) -> dict:
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v
    walk(json.loads(config.to_json()), "")
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_loads_locked_with_its_loss_argument(path):
    default = config_lib.load_config(path)
    assert default.is_locked
    with pytest.raises(AttributeError, match="locked"):
        default.model.nmae = "r50"
    for loss in ("arcface", "cosface"):
        other = config_lib.load_config(f"{path}:{loss}")
        assert other.loss.name == loss and other.loss.params.to_dict() == dict(losses.spec(loss).preset)
        a, b = _flat(default), _flat(other)
        # the argument changes the loss and nothing else
        assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} <= {
            k for k in a.keys() | b.keys() if k.startswith("loss.")}


def test_recipe_argument_equals_setting_the_loss_in_code():
    path = ROOT / "configs" / "ms1mv3_r50_x2softmax.py"
    by_arg = config_lib.load_config(f"{path}:arcface")
    in_code = config_lib.set_loss(config_lib.load_config(path), "arcface")
    assert by_arg.to_json() == in_code.to_json()
    assert by_arg.model.name == "r50" and by_arg.loss.params.margin == 0.5


def test_overrides_parse_to_the_type_of_the_value():
    c = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py", [
        "schedule.lr=1", "num_steps=7", "data.flip=false", "model.layers=(1,1,1,1)", "model.widths=8,8,16,16",
        "eval.sets=", "schedule.boundaries=(0.25, 0.5)", "mesh.rules.classes=data", "loss.params.k=0.5",
    ])
    assert c.schedule.lr == 1.0 and isinstance(c.schedule.lr, float)
    assert c.num_steps == 7 and c.data.flip is False and c.eval.sets == ""
    assert c.model.layers == (1, 1, 1, 1) and c.model.widths == (8, 8, 16, 16)
    assert c.schedule.boundaries == (0.25, 0.5) and c.mesh.rules.classes == "data" and c.loss.params.k == 0.5
    assert c.is_locked


@pytest.mark.parametrize("override, error", [
    ("optimizer.lrr=0.1", r"unknown config key 'optimizer.lrr': optimizer has no 'lrr' \(known: accumulate_steps"),
    ("nope=1", r"unknown config key 'nope': <top level> has no 'nope'"),
    ("data.batch_size=2.5", r"--config\.data\.batch_size: expected an integer, got '2\.5'"),
    ("num_steps=ten", r"--config\.num_steps: expected an integer, got 'ten'"),
    ("schedule.lr=fast", r"--config\.schedule\.lr: expected a number, got 'fast'"),
    ("data.flip=maybe", r"--config\.data\.flip: expected a boolean, got 'maybe'"),
    ("num_steps", r"config override 'num_steps' must look like key\.sub=value"),
])
def test_bad_overrides_are_errors_naming_the_key(override, error):
    with pytest.raises(config_lib.ConfigError, match=error):
        config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py", [override])


def test_a_loss_keyword_the_loss_does_not_take_is_refused_by_validate():
    c = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py", ["loss.params.margin=0.3"])
    with pytest.raises(config_lib.ConfigError, match=r"loss.params \['margin'\] not accepted by x2_softmax"):
        config_lib.validate(c)


@pytest.mark.parametrize("source, arg, error", [
    (None, "", r"config file .*missing\.py not found"),
    ("def get_config(:\n    pass\n", "", r"syntax error line 1"),
    ("x = 1\n", "", r"has no get_config\(\)"),
    ("import not_a_module_anywhere\n", "", r"could not be loaded: ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("from x2jax.train.config import base_config\ndef get_config():\n    c = base_config()\n"
     "    c.model.nmae = 1\n    return c\n", "", r"get_config\(\) failed: .*nmae.*cannot be added since the config is locked"),
    ("from x2jax.train.config import base_config, set_loss\ndef get_config(loss='x2_softmax'):\n"
     "    return set_loss(base_config(), loss)\n", "bogus", r"get_config\('bogus'\) failed: ValueError: unknown loss 'bogus'"),
    ("def get_config():\n    return {'a': 1}\n", "", r"must return an ml_collections\.ConfigDict, got dict"),
])
def test_bad_config_files_are_clear_errors(tmp_path, source, arg, error):
    path = tmp_path / "missing.py" if source is None else tmp_path / "recipe.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises((config_lib.ConfigError, FileNotFoundError), match=error):
        config_lib.load_config(f"{path}:{arg}" if arg else path)


def test_two_files_in_one_process_do_not_share_a_module(tmp_path):
    (tmp_path / "a.py").write_text("from x2jax.train.config import base_config\n"
                                   "def get_config():\n    c = base_config()\n    c.seed = 11\n    return c\n")
    (tmp_path / "b.py").write_text("x = 1\n")
    assert config_lib.load_config(tmp_path / "a.py").seed == 11
    with pytest.raises(config_lib.ConfigError, match="has no get_config"):  # not a's get_config
        config_lib.load_config(tmp_path / "b.py")


def test_configs_import_their_siblings_without_touching_sys_path():
    before = list(sys.path)
    c = config_lib.load_config(f"{ROOT / 'configs' / 'webface42m_r100_x2softmax.py'}:cosface")
    assert c.model.name == "r100" and c.loss.name == "cosface" and sys.path == before


@pytest.mark.parametrize("args, error", [
    (["--config", "configs/ms1mv3_r50_x2softmax.py:arcface", "--config.data.batch_size=abc"],
     "--config.data.batch_size: expected an integer, got 'abc'"),
    (["--config", "configs/ms1mv3_r50_x2softmax.py:arcface", "--config.optimizer.lrr=1"],
     "unknown config key 'optimizer.lrr'"),
    (["--config", "configs/ms1mv3_r50_x2softmax.py:arcface", "--config.model.name=r51", "--config.data.path=."],
     "model.name 'r51' unknown"),
    (["--config", "configs/nope.py"], "config file configs/nope.py not found"),
])
def test_train_py_refuses_bad_configs_before_any_device_work(tmp_path, args, error):
    # JAX_PLATFORMS names no real backend: touching a device would fail with another error.
    env = dict(os.environ, JAX_PLATFORMS="no_such_platform")
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--workdir", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"train.py: error: {error}" in out.stderr and "no_such_platform" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_resume_differences_fill_keys_added_after_the_checkpoint():
    """A checkpoint written before optimizer/loss/data keys existed compares as their defaults."""
    config = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
    saved = json.loads(config.to_json())
    for key in ("head_update", "head_store_dtype"):
        del saved["loss"][key]
    del saved["optimizer"]["head_momentum_dtype"]
    del saved["data"]["family_size"]
    assert config_lib.resume_differences(saved, config) == []
    # a changed value is still a difference, named by its group; a lacking key filled with the
    # default differs from a non-default value now
    saved["optimizer"]["momentum"] = 0.5
    diffs = config_lib.resume_differences(saved, config)
    assert len(diffs) == 1 and diffs[0].startswith("optimizer: ") and '"momentum": 0.5' in diffs[0]
    with config.unlocked():
        config.loss.head_store_dtype = "bfloat16"
        config.data.family_size = 4
    saved["optimizer"]["momentum"] = config.optimizer.momentum
    diffs = config_lib.resume_differences(saved, config)
    assert [d.split(":")[0] for d in diffs] == ["loss", "data.family_size"], diffs
    assert '"head_store_dtype": "float32"' in diffs[0] and diffs[1] == "data.family_size: 1 -> 4"

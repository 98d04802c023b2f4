"""ONNX export for insightface (``eval.py --export-onnx``): onnxruntime reproduces x2jax's
eval-mode embedding, insightface's own client (``model_zoo.get_model(...).get_feat``) on BGR
uint8 crops gives x2jax's embedding after x2jax's preprocessing (colour order, normalisation,
layout end to end), and an insightface PyTorch state_dict -> convert -> export -> get_feat
gives the PyTorch embedding."""

import builtins
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax2onnx")
ort = pytest.importorskip("onnxruntime")
model_zoo = pytest.importorskip("insightface.model_zoo")

from x2jax.data.images import normalize  # noqa: E402
from x2jax.evaluation import main as eval_main  # noqa: E402
from x2jax.evaluation.onnx_export import OnnxExportError, OnnxExtraMissing, export_onnx  # noqa: E402
from x2jax.models import ModelSpec, save_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _variables(spec, seed=0):
    """Initialised weights with NON-trivial BN statistics that keep activations O(1).

    The running statistics are set to those of 4 random images (one train-mode pass;
    the batch statistics solved from the momentum update), then perturbed per channel
    (means shifted by 0.1, variances scaled by 0.8..1.25): random statistics alone make
    a deep net's embedding a constant of its BN offsets, insensitive to the input.
    """
    from x2jax.models.layers import BN_MOMENTUM as m  # noqa: PLC0415

    module = spec.build()
    size = spec.image_size
    variables = jax.jit(lambda k: module.init(k, jnp.zeros((1, size, size, 3)), train=False))(jax.random.key(seed))
    calib = jax.random.uniform(jax.random.key(seed + 100), (4, size, size, 3), jnp.float32, -1, 1)
    _, updated = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"],
                                                   rngs={"dropout": jax.random.key(0)}))(variables, calib)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 10_000))

    def stat(path, old, new):
        batch = (new - m * old) / (1 - m)
        k = next(keys)
        if "var" in str(path[-1]):
            return batch * jax.random.uniform(k, old.shape, old.dtype, 0.8, 1.25)
        return batch + 0.1 * jax.random.normal(k, old.shape, old.dtype)

    stats = jax.tree_util.tree_map_with_path(stat, variables["batch_stats"], updated["batch_stats"])
    return module, {**variables, "batch_stats": stats}


def _embed(module, variables, nhwc):
    return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, jnp.asarray(nhwc)))


def _rel(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _cos(a, b):
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _bgr_images(n, size, seed=0):
    return [np.random.default_rng(seed + i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(n)]


def _x2jax_embedding_of_bgr(module, variables, bgr):
    """x2jax's own pipeline: RGB uint8 -> normalize -> NHWC apply."""
    rgb = np.stack([img[..., ::-1] for img in bgr])
    return _embed(module, variables, normalize(rgb))


SPECS = {
    "r18": ModelSpec("r18", embedding_size=512, image_size=112, conv_impl="xla"),
    "mobilefacenet": ModelSpec("mobilefacenet", embedding_size=128, image_size=112, conv_impl="xla"),
    "r18_tiny": ModelSpec("r18_tiny", embedding_size=32, image_size=32, conv_impl="xla"),
    "vit_tiny": ModelSpec("vit_tiny", embedding_size=32, image_size=32, conv_impl="xla"),  # attention, LayerNorm
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (module, variables, path): each model converted once."""
    out, cache = tmp_path_factory.mktemp("onnx"), {}

    def get(name):
        if name not in cache:
            module, variables = _variables(SPECS[name])
            info = export_onnx(SPECS[name], variables, out / f"{name}.onnx")
            assert info.input_shape == ("B", 3, SPECS[name].image_size, SPECS[name].image_size)
            assert info.output_shape == ("B", SPECS[name].embedding_size)
            cache[name] = module, variables, info.path
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r18", "mobilefacenet", "r18_tiny", "vit_tiny"])
def test_onnxruntime_matches_apply_eval_mode(exported, name):
    module, variables, path = exported(name)
    size = SPECS[name].image_size
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    want_all = None
    for batch in (1, 3):  # dynamic batch
        x = np.random.default_rng(batch).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
        got = session.run(None, {"input": x})[0]
        want = _embed(module, variables, x.transpose(0, 2, 3, 1))
        assert got.shape == want.shape == (batch, SPECS[name].embedding_size)
        assert _rel(got, want) <= 1e-4, name
        want_all = want
    # The BN statistics matter: the same weights with reset statistics give another function.
    plain = {**variables, "batch_stats": jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.ones_like(v) if "var" in str(p[-1]) else jnp.zeros_like(v), variables["batch_stats"])}
    assert _rel(_embed(module, plain, x.transpose(0, 2, 3, 1)), want_all) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r18", "mobilefacenet"])
def test_insightface_get_feat_matches_x2jax_preprocessing(exported, name):
    module, variables, path = exported(name)
    model = model_zoo.get_model(path)
    assert type(model).__name__ == "ArcFaceONNX" and model.taskname == "recognition"
    # insightface decided that normalisation is NOT in the graph: it feeds (x - 127.5) / 127.5.
    assert (model.input_mean, model.input_std) == (127.5, 127.5)
    assert model.input_size == (112, 112)
    bgr = _bgr_images(3, 112)
    want = _x2jax_embedding_of_bgr(module, variables, bgr)
    got = np.concatenate([model.get_feat(img) for img in bgr[:1]] + [model.get_feat(bgr[1:])])
    assert got.shape == want.shape
    assert _cos(got, want).min() >= 0.9999
    assert _rel(got, want) <= 1e-3
    # Colour order is really checked: the RGB-swapped images give other embeddings.
    swapped = _x2jax_embedding_of_bgr(module, variables, [img[..., ::-1] for img in bgr])
    assert _rel(got, swapped) > 1e-2


@pytest.mark.slow
@pytest.mark.torch
def test_torch_state_dict_convert_export_get_feat(tmp_path):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from reference import torch_iresnet as T  # noqa: PLC0415

    from x2jax.models import convert  # noqa: PLC0415

    model = T.iresnet("r18", num_features=512, image_size=112)
    T.randomize_(model, 0)
    calib = np.random.default_rng(100).uniform(-1, 1, (4, 3, 112, 112)).astype(np.float32)
    T.calibrate_bn_(model, torch.from_numpy(calib))
    pth = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), pth)
    assert convert.main([str(pth), str(tmp_path / "converted"), "--arch", "r18"]) == 0

    onnx_path = tmp_path / "pack" / "r18_x2jax.onnx"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint", str(tmp_path / "converted"),
         "--export-onnx", str(onnx_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {onnx_path}" in proc.stdout and "(B, 3, 112, 112)" in proc.stdout
    assert "accuracy" not in proc.stdout.lower()  # export only: nothing evaluated

    bgr = _bgr_images(2, 112, seed=7)
    got = model_zoo.get_model(str(onnx_path)).get_feat(bgr)
    # insightface's PyTorch pipeline: RGB, (x - 127.5) / 127.5, NCHW.
    rgb = np.stack([img[..., ::-1] for img in bgr]).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(((rgb - 127.5) / 127.5).transpose(0, 3, 1, 2).copy())).numpy()
    assert _cos(got, want).min() >= 0.9999
    assert _rel(got, want) <= 1e-3


# ------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    spec = SPECS["r18_tiny"]
    _, variables = _variables(spec)
    d = tmp_path_factory.mktemp("saved") / "model"
    save_model(d, variables, arch=spec.arch, embedding_size=spec.embedding_size, image_size=spec.image_size)
    return d, variables


def test_unwritable_path_fails_before_converting(tiny_saved, tmp_path, capsys, monkeypatch):
    _, variables = tiny_saved
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    import jax2onnx  # noqa: PLC0415

    def never(*a, **k):
        raise AssertionError("converted before checking the path")

    monkeypatch.setattr(jax2onnx, "to_onnx", never)
    with pytest.raises(OnnxExportError, match="cannot write the ONNX file"):
        export_onnx(SPECS["r18_tiny"], variables, blocker / "model.onnx")
    with pytest.raises(OnnxExportError, match="is a directory"):
        export_onnx(SPECS["r18_tiny"], variables, tmp_path)
    # The CLI: exit 2, one line, before the model is even loaded.
    assert eval_main.main(["--checkpoint", str(tmp_path / "missing"), "--export-onnx",
                           str(blocker / "model.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write the ONNX file" in err


def test_missing_extra_names_the_pip_command(tiny_saved, tmp_path, capsys, monkeypatch):
    d, variables = tiny_saved
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import jax2onnx -> ImportError
    with pytest.raises(OnnxExtraMissing, match=r"pip install 'x2jax\[onnx\]'"):
        export_onnx(SPECS["r18_tiny"], variables, tmp_path / "m.onnx")
    assert eval_main.main(["--checkpoint", str(d), "--export-onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'x2jax[onnx]'" in err
    assert not (tmp_path / "m.onnx").exists()


def test_unconvertible_model_names_arch_and_op(tiny_saved, tmp_path, monkeypatch):
    _, variables = tiny_saved
    import jax2onnx  # noqa: PLC0415

    def unsupported(*a, **k):
        raise NotImplementedError("No ONNX handler registered for JAX primitive 'erf_inv'\nmore detail")

    monkeypatch.setattr(jax2onnx, "to_onnx", unsupported)
    with pytest.raises(OnnxExportError, match=r"cannot convert r18_tiny .*primitive 'erf_inv'$"):
        export_onnx(SPECS["r18_tiny"], variables, tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)  # no partial or temporary file left


def test_import_blocker_via_builtins(monkeypatch, tmp_path, tiny_saved):
    """The extra missing as a real ImportError from ``__import__`` (not only sys.modules)."""
    _, variables = tiny_saved
    real_import = builtins.__import__

    def blocked(name, *a, **k):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", blocked)
    monkeypatch.delitem(sys.modules, "onnx", raising=False)
    with pytest.raises(OnnxExtraMissing, match="No module named 'onnx'"):
        export_onnx(SPECS["r18_tiny"], variables, tmp_path / "m.onnx")

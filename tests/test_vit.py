"""ViT backbones (arcface_torch backbones/vit.py): parameter counts and the state_dict layout against
the PyTorch reference (tests/reference/torch_vit.py), converted weights give PyTorch's embeddings
in eval mode and in training (same mask noise: masking, mask token, head BatchNorm statistics),
masking and drop path against numpy, rng discipline, bfloat16 attention, eval.py / export, errors,
and a tiny ViT that learns on synthetic identities."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from reference import torch_vit as T  # noqa: E402  (needs torch)

from x2jax import models  # noqa: E402
from x2jax.evaluation import main as eval_cli  # noqa: E402
from x2jax.evaluation.export import export_embedding  # noqa: E402
from x2jax.models import convert, vit  # noqa: E402

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(embed_dim=64, depth=2, heads=4, patch=4, crop=0)  # = x2jax's vit_tiny


def _closed_form_params(d, depth, n, e, p):
    """patch conv + pos + mask token + blocks (LN 2D, qkv 3D^2, proj D^2+D, LN 2D, fc1 4D^2+4D,
    fc2 4D^2+D) + final LN + head (N D^2, BN 2D, D E, BN 2E)."""
    return (3 * p * p * d + d) + n * d + d + depth * (12 * d * d + 10 * d) + 2 * d + (n * d * d + 2 * d + d * e + 2 * e)


def _torch_meta(name, **kw):
    with torch.device("meta"):
        return T.vit(name, **kw)


@pytest.mark.parametrize("name", ["vit_t", "vit_s", "vit_b", "vit_l"])
def test_param_count_and_state_dict_layout_equal_torch_reference(name):
    model = _torch_meta(name)
    dim, depth, *_ = T.VARIANTS[name]
    count = sum(p.numel() for p in model.parameters())
    assert count == models.num_params(name) == _closed_form_params(dim, depth, 144, 512, 9)
    # The converter's expected keys and shapes are exactly the torch state_dict's (shapes only).
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert convert.torch_shapes(models.get_model(name)) == want
    assert want["pos_embed"] == (1, 144, dim) and want["feature.0.weight"] == (dim, 144 * dim)


def test_webface42m_variants_have_the_same_parameters():
    for a, b in [("vit_t", "vit_t_dp005_mask0"), ("vit_s", "vit_s_dp005_mask_0"), ("vit_b", "vit_b_dp005_mask_005")]:
        assert convert.torch_shapes(models.get_model(a)) == convert.torch_shapes(models.get_model(b))
    m = models.get_model("vit_b_dp005_mask_005")
    assert (m.drop_path_rate, m.mask_ratio, m.depth, m.embed_dim) == (0.05, 0.05, 24, 512)


# ---------------------------------------------------------------- torch equality
def _images_nchw(batch, size, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


def _rel(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _flax_embed(module, variables, nchw, **kw):
    return np.asarray(jax.jit(functools.partial(module.apply, **kw))(variables, jnp.asarray(nchw.transpose(0, 2, 3, 1))))


@functools.lru_cache(maxsize=None)
def _torch_vit(name, seed=0, **kw):
    model = T.vit(name, **kw) if name in T.VARIANTS else T.VisionTransformer(**{**TINY, **kw})
    return T.randomize_(model, seed).eval()


@pytest.mark.parametrize("name,embedding", [("vit_t", 512), pytest.param("vit_s", 128, marks=pytest.mark.slow)])
def test_conversion_matches_torch_eval_at_112(name, embedding):
    model = _torch_vit(name, num_features=embedding)
    variables = convert.convert_state_dict(model.state_dict(), name)  # embedding size read from feature.3
    module = models.get_model(name, embedding_size=embedding)
    images = _images_nchw(2, 112, seed=1)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    got = _flax_embed(module, variables, images)
    assert 0.1 < float(np.abs(want).mean()) < 10
    assert _rel(got, want) <= 1e-4
    # The 4 px insightface drops are really dropped: they do not change the embedding.
    shifted = images.copy()
    shifted[:, :, 108:, :] = 5.0
    shifted[:, :, :, 108:] = -5.0
    np.testing.assert_array_equal(_flax_embed(module, variables, shifted), got)


def test_cli_conversion_load_model_and_eval_py(tmp_path, capsys):
    model = _torch_vit("tiny", num_features=32, image_size=32, drop_path_rate=0.1, mask_ratio=0.1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert convert.main([str(tmp_path / "model.pt"), str(tmp_path / "out"), "--arch", "vit_tiny",
                         "--image-size", "32"]) == 0
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in capsys.readouterr().out
    module, variables, info = models.load_model(tmp_path / "out")
    assert (info["arch"], info["embedding_size"], info["image_size"]) == ("vit_tiny", 32, 32)
    images = _images_nchw(3, 32, seed=2)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
        want_flip = model(torch.from_numpy(images[..., ::-1].copy())).numpy()
    assert _rel(_flax_embed(module, variables, images), want) <= 1e-4
    # jax.export of the converted model computes the same function, for any batch.
    exported = export_embedding(models.ModelSpec.from_json(info), variables)
    assert _rel(np.asarray(exported.call(jnp.asarray(images.transpose(0, 2, 3, 1)))), want) <= 1e-4
    # eval.py on a .bin set: its flip-summed embeddings are PyTorch's.
    from x2jax.data.verification_bin import write_bin  # noqa: PLC0415

    pixels = np.random.default_rng(3).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    write_bin(tmp_path / "data" / "eight.bin", pixels, [True, False, True, False], fmt="PNG")
    eval_cli.run(["--checkpoint", str(tmp_path / "out"), "--sets", "eight", "--data-dir", str(tmp_path / "data"),
                  "--export", str(tmp_path / "emb.npy"), "--folds", "2"])
    nchw = ((pixels.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2)
    with torch.no_grad():
        flip_sum = (model(torch.from_numpy(nchw)) + model(torch.from_numpy(nchw[..., ::-1].copy()))).numpy()
    assert _rel(np.load(tmp_path / "emb.npy"), flip_sum) <= 1e-4
    assert _rel(want_flip, want) > 1e-2  # the flip matters, so the check above sees it


def test_training_mode_matches_torch_with_the_same_mask_noise():
    """Masking (kept tokens only in the blocks, mask token after the norm, unshuffle) and the head's
    batch statistics and running-statistics update, with drop path off (its draws cannot be shared)."""
    model = T.randomize_(T.VisionTransformer(**TINY, drop_path_rate=0.0, mask_ratio=0.25, num_features=32,
                                             image_size=32), seed=1).train()
    variables = convert.convert_state_dict(model.state_dict(), "vit_tiny", image_size=32)
    module = models.get_model("vit_tiny", embedding_size=32, image_size=32, drop_path_rate=0.0, mask_ratio=0.25)
    assert module.num_kept() == 48
    images = _images_nchw(4, 32, seed=3)
    noise = np.random.default_rng(5).uniform(size=(4, 64)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(images), noise=torch.from_numpy(noise)).numpy()
    got, updates = jax.jit(lambda v, x, n: module.apply(v, x, train=True, mask_noise=n, mutable=["batch_stats"]))(
        variables, jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(noise))
    assert _rel(np.asarray(got), want) <= 1e-4
    after = convert.convert_state_dict(model.state_dict(), "vit_tiny", image_size=32)["batch_stats"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), updates["batch_stats"], after)
    # Masking changes the function: another noise, another embedding.
    other = module.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), train=True, mutable=["batch_stats"],
                         mask_noise=jnp.asarray(noise[:, ::-1].copy()))[0]
    assert _rel(np.asarray(other), want) > 1e-3


# ---------------------------------------------------------------- masking, drop path, rngs
def test_random_masking_and_restore_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 10, 4)).astype(np.float32)
    noise = rng.uniform(size=(3, 10)).astype(np.float32)
    token = rng.standard_normal((1, 1, 4)).astype(np.float32)
    kept, ids_restore = vit.random_masking(jnp.asarray(x), jnp.asarray(noise), 7)
    for b in range(3):
        order = np.argsort(noise[b], kind="stable")
        np.testing.assert_array_equal(np.asarray(kept[b]), x[b, order[:7]])
    full = np.asarray(vit.restore_tokens(kept, jnp.asarray(token), ids_restore))
    masked = noise >= np.sort(noise, axis=1)[:, 7:8]  # the 3 largest per row
    np.testing.assert_array_equal(full, np.where(masked[..., None], token, x))


def test_drop_path_is_per_example_and_rates_rise_linearly():
    x = jnp.ones((4000, 3, 2))
    y = np.asarray(vit.drop_path(x, 0.25, jax.random.key(0)))
    per_example = y.reshape(4000, -1)
    assert set(np.unique(per_example).tolist()) == {0.0, float(np.float32(1) / np.float32(0.75))}
    assert np.all(per_example.min(1) == per_example.max(1))  # one draw per example
    assert abs(float(np.mean(per_example[:, 0] == 0)) - 0.25) < 0.03  # 4 sigma
    np.testing.assert_allclose(vit.drop_path_rates(0.1, 12), torch.linspace(0, 0.1, 12).numpy(), rtol=1e-6)
    assert vit.drop_path_rates(0.1, 1) == [0.0]


@functools.lru_cache(maxsize=None)
def _tiny_model(**kw):
    module = models.get_model("vit_tiny", embedding_size=16, image_size=16, **kw)
    return module, jax.jit(models.init_variables, static_argnums=0)(module, jax.random.key(0))


def test_training_randomness_comes_from_the_dropout_rng():
    module, variables = _tiny_model()
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    run = jax.jit(lambda k: module.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})[0])
    a, b, c = run(jax.random.key(7)), run(jax.random.key(7)), run(jax.random.key(8))
    np.testing.assert_array_equal(a, b)  # a function of the key: resumable bitwise
    assert _rel(np.asarray(c), np.asarray(a)) > 1e-3
    # Evaluation draws nothing: no rng needed, and the same output whatever rng is given.
    ev = jax.jit(module.apply)(variables, x)
    np.testing.assert_array_equal(jax.jit(lambda v, k: module.apply(v, x, rngs={"dropout": k}))(
        variables, jax.random.key(3)), ev)
    with pytest.raises(ValueError, match=r"vit_tiny: training with mask_ratio 0.1 needs rngs=\{'dropout': key\}"):
        module.apply(variables, x, train=True, mutable=["batch_stats"])
    quiet, qvars = _tiny_model(mask_ratio=0.0)
    with pytest.raises(ValueError, match=r"blocks_1: training with drop path 0.1 needs rngs"):
        quiet.apply(qvars, x, train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="mask_noise is used only in training"):
        module.apply(variables, x, mask_noise=jnp.zeros((4, 16)))


def test_bfloat16_attention_softmax_in_float32_and_close_to_float32():
    module32, variables = _tiny_model()
    module16 = module32.clone(dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
    jaxpr = str(jax.make_jaxpr(lambda v: module16.apply(v, x))(variables))
    exps = [line for line in jaxpr.splitlines() if " = exp " in line]
    assert exps and all(":f32[" in line.split("=")[0] for line in exps)  # softmax: float32
    assert "bf16[3,16,192]" in jaxpr  # the qkv projection runs in bfloat16
    got, want = (np.asarray(jax.jit(m.apply)(variables, x)) for m in (module16, module32))
    assert got.dtype == np.float32 and np.isfinite(got).all()
    cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.999 and _rel(got, want) < 0.05


# ---------------------------------------------------------------- errors
def test_image_size_rule_and_bad_images():
    assert models.get_model("vit_b", image_size=121).num_patches == 13 * 13
    with pytest.raises(ValueError, match=r"vit_b: image_size 128 does not fit 9-px patches: the patch conv drops "
                                         r"the last 4 rows and columns .*124 must then be a positive multiple of the "
                                         r"patch 9; sizes that fit nearby: 121 \(13x13 tokens\), 130 \(14x14 tokens\)"):
        models.get_model("vit_b", image_size=128)
    with pytest.raises(ValueError, match=r"vit_tiny: image_size 30 .* positive multiple of the patch 4"):
        models.ModelSpec("vit_tiny", 16, 30).build()
    module, variables = _tiny_model()
    with pytest.raises(ValueError, match=r"expects images \(B, 16, 16, 3\) NHWC; got shape \(2, 3, 16, 16\)"):
        module.apply(variables, jnp.zeros((2, 3, 16, 16)))
    with pytest.raises(ValueError, match="remat must be one of"):
        models.get_model("vit_tiny", image_size=16, remat="sometimes")


@functools.lru_cache(maxsize=None)
def _shape_state_dict(name, **kw):
    """Zeros of the torch reference's shapes (cheap stand-ins: only keys and shapes matter)."""
    return {k: np.zeros(tuple(v.shape), np.float32) for k, v in _torch_meta(name, **kw).state_dict().items()}


def test_converter_names_the_variant_of_a_state_dict():
    sd = _shape_state_dict("vit_t")
    with pytest.raises(ValueError, match=r"does not match --arch vit_b \(the state_dict is a ViT of width 256, "
                                         r"depth 12, 144 tokens, patch 9, i.e. --arch vit_t or vit_t_dp005_mask0\): "
                                         r"132 missing key\(s\) \['blocks.12.attn.proj.bias'"):
        convert.convert_state_dict(sd, "vit_b", embedding_size=512)
    with pytest.raises(ValueError, match=r"has shape \(256,\), expected \(512,\); --arch vit_s is a ViT of width "
                                         r"512, depth 12, 144 tokens \(the state_dict is a ViT of width 256, depth "
                                         r"12, 144 tokens, patch 9, i.e. --arch vit_t or vit_t_dp005_mask0\)"):
        convert.convert_state_dict(sd, "vit_s", embedding_size=512)
    with pytest.raises(ValueError, match=r"feature.0.weight'\] has shape \(256, 36864\), expected \(256, 43264\); "
                                         r"the ViT's token count follows the image size: check --image-size"):
        convert.convert_state_dict(sd, "vit_t", image_size=121)
    broken = dict(sd)
    broken.pop("mask_token")
    broken["blocks.0.attn.qkv.bias"] = np.zeros(768, np.float32)
    with pytest.raises(ValueError, match=r"1 missing key\(s\) \['mask_token'\]; 1 unexpected key\(s\) "
                                         r"\['blocks.0.attn.qkv.bias'\]"):
        convert.convert_state_dict(broken, "vit_t")
    assert convert._read_embedding_size(sd, "vit_t") == 512


# ---------------------------------------------------------------- training
@pytest.mark.slow
def test_tiny_vit_learns_on_synthetic_identities(tmp_path, cache_dir):
    """The default synthetic data (32 x 32), vit_tiny, AdamW: the loss falls and held-out
    verification rises above chance (50 %) within a short run."""
    from x2jax.train import config as config_lib  # noqa: PLC0415
    from x2jax.train.loop import train  # noqa: PLC0415

    c = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
    c.data.num_identities, c.data.images_per_identity, c.data.batch_size = 100, 16, 64
    c.model.name, c.model.embedding_size = "vit_tiny", 64
    c.optimizer.name, c.optimizer.weight_decay = "adamw", 0.05
    c.schedule.lr, c.schedule.warmup_steps = 2e-3, 10
    c.num_steps, c.log_every_steps, c.checkpoint.every_steps = 150, 1, 150
    c.eval.every_steps, c.eval.sets = 150, "synthetic"
    c.compilation_cache_dir = str(cache_dir)
    train(c, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval/synthetic"]
    assert np.mean(losses[-20:]) < 0.85 * np.mean(losses[:10]), (losses[:10], losses[-20:])
    assert [e["step"] for e in evals] == [0, 150]
    assert evals[-1]["accuracy"] > max(0.6, evals[0]["accuracy"] + 0.05), evals


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe,arch,remat,batch,sample_rate,num_images", [
    ("ms1mv3_vit_t_x2softmax.py", "vit_t", "none", 1024, 1.0, 5_179_510),
    ("webface42m_vit_b_x2softmax.py", "vit_b_dp005_mask_005", "blocks", 384 * 64, 0.3, 42_474_557),
])
def test_vit_recipes_validate_and_follow_arcface_torch(tmp_path, recipe, arch, remat, batch, sample_rate, num_images):
    from x2jax.train import config as config_lib  # noqa: PLC0415
    from x2jax.train.optimizer import warmup_length  # noqa: PLC0415

    c = config_lib.load_config(f"{ROOT / 'configs' / recipe}:cosface",
                               [f"data.path={tmp_path}", "eval.sets="])
    config_lib.validate(c)
    assert (c.model.name, c.model.remat, c.model.dtype, c.data.batch_size) == (arch, remat, "bfloat16", batch)
    assert (c.optimizer.name, c.optimizer.weight_decay, c.schedule.lr, c.schedule.name) == ("adamw", 0.1, 1e-3, "polynomial")
    assert (c.loss.name, c.loss.sample_rate, c.num_epochs) == ("cosface", sample_rate, 40.0)
    assert not config_lib.row_sparse_head(c)  # AdamW: the dense-masked Partial FC head
    # warm-up: arcface_torch's num_image // total_batch_size * warmup_epoch (4 of 40 epochs), at the
    # recipe's batch and at 128 per chip on 256 chips, with total steps as train.py counts them
    for global_batch in (batch, 128 * 256):
        total = int(np.ceil(c.num_epochs * (num_images // global_batch)))
        assert warmup_length(c.schedule, total, c.num_epochs) == num_images // global_batch * 4


def test_recipe_optimizer_matches_torch_adamw_with_poly_warmup():
    """The ViT recipes' optimizer (AdamW over backbone and centres, backbone clipped to norm 5,
    linear warm-up then (1 - progress)^2) against torch.optim.AdamW + clip_grad_norm_ + LambdaLR."""
    import optax  # noqa: PLC0415

    from x2jax.train import config as config_lib  # noqa: PLC0415
    from x2jax.train.optimizer import make_optimizer, make_schedule  # noqa: PLC0415

    c = config_lib.load_config(ROOT / "configs" / "ms1mv3_vit_t_x2softmax.py")
    c.schedule.warmup_steps, c.schedule.warmup_epochs, total = 2, 0.0, 6
    tx = make_optimizer(c.optimizer, make_schedule(c.schedule, total))
    rng = np.random.default_rng(0)
    params = {"backbone": {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)},
              "head": {"weight": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}}
    tb = torch.tensor(np.asarray(params["backbone"]["w"]), requires_grad=True)
    th = torch.tensor(np.asarray(params["head"]["weight"]), requires_grad=True)
    topt = torch.optim.AdamW([tb, th], lr=1e-3, weight_decay=0.1)
    poly = lambda t: t / 2 if t < 2 else (1 - (t - 2) / (total - 2)) ** 2
    sched = torch.optim.lr_scheduler.LambdaLR(topt, poly)
    state = tx.init(params)
    for _ in range(total):
        gb, gh = rng.normal(size=(5, 3)) * 3, rng.normal(size=(4, 3))
        grads = {"backbone": {"w": jnp.asarray(gb, jnp.float32)}, "head": {"weight": jnp.asarray(gh, jnp.float32)}}
        updates, state = tx.update(grads, state, params, row_mask=None)
        params = optax.apply_updates(params, updates)
        tb.grad, th.grad = torch.tensor(gb, dtype=torch.float32), torch.tensor(gh, dtype=torch.float32)
        torch.nn.utils.clip_grad_norm_([tb], 5.0)
        topt.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(params["backbone"]["w"]), tb.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["head"]["weight"]), th.detach().numpy(), rtol=1e-5, atol=1e-6)

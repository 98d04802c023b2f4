"""Synthetic face identities: determinism, held-out verification layout, difficulty; families, long tail, hard / easy sets."""

import dataclasses

import numpy as np
import pytest

from x2jax.data import synthetic

CFG = synthetic.SyntheticConfig(
    num_identities=50,
    images_per_identity=20,
    num_verification_identities=100,
    verification_images_per_identity=6,
    num_verification_pairs=1000,
    seed=3,
)


@pytest.fixture(scope="module")
def train():
    return synthetic.generate_train(CFG)


@pytest.fixture(scope="module")
def verification():
    return synthetic.generate_verification(CFG)


def test_shapes_dtypes_and_labels(train, verification):
    images, labels = train
    assert images.shape == (1000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.tolist() == np.repeat(np.arange(50), 20).tolist()
    v, issame = verification
    assert v.shape == (2000, 32, 32, 3) and v.dtype == np.uint8
    assert issame.shape == (1000,) and issame.dtype == bool and issame.sum() == 500
    assert images.std() > 30  # not blank


def test_deterministic_from_seed(train):
    images, _ = train
    again, _ = synthetic.generate_train(CFG)
    assert np.array_equal(images, again)
    other, _ = synthetic.generate_train(dataclasses.replace(CFG, seed=4))
    assert np.mean(other != images) > 0.5


def test_identity_depends_only_on_seed_and_index(train):
    """Identity i renders the same whatever the dataset size (so held-out ids stay held out)."""
    images, _ = train
    bigger, _ = synthetic.generate_train(dataclasses.replace(CFG, num_identities=53))
    assert np.array_equal(bigger[:1000], images)
    # Verification identity 50 + j is what rendering identity 50 + j gives directly.
    table = np.concatenate([im for im, _ in synthetic.render_identities(CFG, [50, 51], 6)])
    direct = np.concatenate([im for im, _ in synthetic.render_identities(CFG, [51], 6)])
    assert np.array_equal(table[6:], direct)


def test_threads_and_chunking_do_not_change_the_images(train):
    """Chunks render in parallel threads; the result is the one-thread, one-chunk-size one."""
    images, labels = train
    for chunk, workers in ((256, 1), (60, 2), (20, 3)):
        parts = list(synthetic.render_identities(CFG, range(50), 20, chunk=chunk, workers=workers))
        assert np.array_equal(np.concatenate([im for im, _ in parts]), images), (chunk, workers)
        assert np.array_equal(np.concatenate([ids for _, ids in parts]), labels), (chunk, workers)


def test_verification_pairs_over_held_out_identities(verification):
    pairs, issame = synthetic.verification_pairs(CFG)
    k = CFG.verification_images_per_identity
    ident = pairs // k
    assert np.array_equal(ident[:, 0] == ident[:, 1], issame)  # same <=> same identity
    assert np.all(pairs[:, 0] != pairs[:, 1])  # never an image with itself
    assert ident.min() >= 0 and ident.max() < CFG.num_verification_identities
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == len(pairs)  # no duplicate pairs
    # Images 2i, 2i+1 are the table images of pair i.
    ids = np.arange(CFG.num_identities, CFG.num_identities + CFG.num_verification_identities)
    table = np.concatenate([im for im, _ in synthetic.render_identities(CFG, ids, k)])
    images, _ = verification
    assert np.array_equal(images[0::2], table[pairs[:, 0]])
    assert np.array_equal(images[1::2], table[pairs[:, 1]])


def test_identities_separable_but_not_by_raw_pixels(train, verification):
    """Raw-pixel baselines sit well above chance yet far below a solved task."""
    images, _ = train
    n, k = CFG.num_identities, CFG.images_per_identity
    x = images.reshape(n, k, -1).astype(np.float64)
    means = x[:, : k // 2].mean(1)
    test = x[:, k // 2 :].reshape(-1, x.shape[-1])
    d2 = (test**2).sum(1)[:, None] - 2 * test @ means.T + (means**2).sum(1)[None]
    ncm_acc = np.mean(d2.argmin(1) == np.repeat(np.arange(n), k - k // 2))
    chance = 1 / n
    assert 4 * chance < ncm_acc < 0.5, ncm_acc

    v, issame = verification
    f = v.reshape(len(v), -1).astype(np.float64)
    f -= f.mean(0)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = (f[0::2] * f[1::2]).sum(1)
    # Same-identity pairs are more similar (t statistic > 3: p < 0.002) ...
    diff = sim[issame].mean() - sim[~issame].mean()
    se = np.sqrt(sim[issame].var() / issame.sum() + sim[~issame].var() / (~issame).sum())
    assert diff / se > 3, (diff, se)
    # ... but the best threshold on raw pixels is nowhere near solving verification.
    best = max(np.mean((sim > t) == issame) for t in np.unique(sim))
    assert best < 0.75, best


def test_config_validation():
    with pytest.raises(ValueError, match="num_verification_pairs must be even"):
        synthetic.SyntheticConfig(num_verification_pairs=3)
    with pytest.raises(ValueError, match="unknown synthetic config 'huge'"):
        synthetic.get_config("huge")
    assert synthetic.get_config("large").image_size == 112


# ---------------------------------------------------------------------------
# families of look-alikes, long tail, hard / easy negatives
# ---------------------------------------------------------------------------


def _params_digest(cfg, identities, count) -> str:
    """sha256 of the per-image parameters (every input of the renderer) and the verification pairs.

    Floats are rounded to 8 decimals, so a last-bit difference of a libm ``exp`` between
    machines cannot change the digest; a changed draw or stream does.
    """
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256()
    params = synthetic._stack_params(cfg, np.asarray(identities), count)
    for key in sorted(params):
        value = params[key]
        value = np.round(value.astype(np.float64), 8) if value.dtype.kind == "f" else value
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    pairs, issame = synthetic.verification_pairs(cfg)
    digest.update(pairs.astype(np.int64).tobytes())
    digest.update(issame.tobytes())
    return digest.hexdigest()


# Computed with the generator as it was before families and the long tail existed (commit 2a30d78).
TODAYS_DIGEST = "c326e67528c6bb566f01b8ebce265649705a6c22538586c508cba69e1df311bd"


def test_default_knobs_reproduce_the_data_of_before_bitwise(train):
    assert (CFG.family_size, CFG.family_similarity, CFG.zipf_exponent) == (1, 0.0, 0.0)
    assert _params_digest(CFG, [0, 1, 49, 50, 149], 3) == TODAYS_DIGEST
    assert synthetic.train_image_counts(CFG).tolist() == [20] * 50
    # Families with similarity 0 keep every training image (only the verification pairs change).
    images, labels = train
    unpulled, unpulled_labels = synthetic.generate_train(dataclasses.replace(CFG, family_size=5))
    assert np.array_equal(unpulled, images) and np.array_equal(unpulled_labels, labels)


FAMILY_CFG = dataclasses.replace(CFG, num_identities=60, family_size=4, family_similarity=0.6,
                                 num_verification_identities=100, num_verification_pairs=1000)


def test_family_member_latent_is_centre_plus_scaled_own_offset():
    plain = dataclasses.replace(FAMILY_CFG, family_size=1, family_similarity=0.0)
    for identity in (0, 3, 4, 59, 60, 97):
        got = synthetic.identity_latent(FAMILY_CFG, identity)
        own = synthetic.identity_latent(plain, identity)  # the latent it has without families
        centre = synthetic.family_centre_latent(FAMILY_CFG, identity // 4)
        assert sorted(got) == sorted(own)
        for key in own:
            np.testing.assert_allclose(got[key], np.asarray(centre[key]) + 0.4 * (np.asarray(own[key]) - centre[key]),
                                       rtol=1e-12, atol=1e-9, err_msg=key)
    # The nuisance of each image is the identity's own, families or not.
    with_f = synthetic._stack_params(FAMILY_CFG, np.array([5]), 4)
    without = synthetic._stack_params(plain, np.array([5]), 4)
    for key in ("angle", "yaw", "bg", "occlude", "unit_noise"):
        np.testing.assert_array_equal(with_f[key], without[key])


def _latent_vectors(cfg, identities) -> np.ndarray:
    lats = [synthetic.identity_latent(cfg, int(i)) for i in identities]
    return np.stack([np.concatenate([np.ravel(lat[k]) for k in sorted(lat)]) for lat in lats])


@pytest.mark.parametrize("similarity", [0.3, 0.6, 0.9])
def test_within_family_latent_distance_matches_the_closed_form(similarity):
    """E|z_i - z_j|^2 of siblings / of strangers = (1-s)^2 / (s^2 + (1-s)^2) (centre and own latents iid)."""
    families = 600
    cfg = synthetic.SyntheticConfig(num_identities=2 * families, family_size=2, family_similarity=similarity,
                                    num_verification_identities=300, seed=11)
    first, second = _latent_vectors(cfg, range(0, 2 * families, 2)), _latent_vectors(cfg, range(1, 2 * families, 2))
    scale = np.concatenate([first, second]).std(0)  # every coordinate counts alike
    first, second = first / scale, second / scale
    siblings = np.mean(np.sum((first - second) ** 2, 1))
    strangers = np.mean(np.sum((first - np.roll(second, 1, axis=0)) ** 2, 1))  # member 0 of f, member 1 of f-1
    s = similarity
    want = (1 - s) ** 2 / (s**2 + (1 - s) ** 2)
    assert siblings / strangers == pytest.approx(want, rel=0.05), (siblings / strangers, want)


def test_zipf_counts_follow_the_closed_form():
    import math  # noqa: PLC0415

    cfg = dataclasses.replace(CFG, num_identities=40, images_per_identity=30, zipf_exponent=1.2)
    counts = synthetic.train_image_counts(cfg)
    want = [max(1, math.floor(30 * math.pow(r, -1.2) + 0.5)) for r in range(1, 41)]
    assert sorted(counts.tolist(), reverse=True) == want  # rank r has round(K r^-a) images
    rank = np.random.default_rng([cfg.seed, 7933]).permutation(40) + 1  # the documented rank of identity i
    assert counts.tolist() == [want[r - 1] for r in rank]
    assert want[0] == 30 and want[-1] == 1  # the tail is floored at one image

    images, labels = synthetic.generate_train(cfg)
    assert len(images) == sum(want) and labels.tolist() == np.repeat(np.arange(40), counts).tolist()
    start = int(counts[:7].sum())  # identity 7 renders as it does alone, with its own count
    alone = np.concatenate([im for im, _ in synthetic.render_identities(cfg, [7], int(counts[7]))])
    assert np.array_equal(images[start : start + counts[7]], alone)
    # Chunking over uneven counts does not change the images either.
    parts = list(synthetic.render_identities(cfg, range(40), counts, chunk=50, workers=2))
    assert np.array_equal(np.concatenate([im for im, _ in parts]), images)


def test_hard_negatives_are_same_family_and_easy_ones_are_not():
    cfg = FAMILY_CFG
    pairs, issame = synthetic.verification_pairs(cfg)
    k, f = cfg.verification_images_per_identity, cfg.family_size
    ident = pairs // k  # local to the verification split, which starts at a family boundary
    assert cfg.num_identities % f == 0
    same_id, same_family = ident[:, 0] == ident[:, 1], ident[:, 0] // f == ident[:, 1] // f
    assert np.array_equal(same_id, issame)
    kinds = synthetic.verification_pair_kinds(cfg)
    assert kinds.tolist() == [synthetic.PAIR_SAME, synthetic.PAIR_HARD, synthetic.PAIR_SAME, synthetic.PAIR_EASY] * 250
    hard, easy = synthetic.negative_subset(cfg, "hard"), synthetic.negative_subset(cfg, "easy")
    assert np.array_equal(np.sort(np.concatenate([hard, easy])), np.arange(1000))  # a partition
    for subset, negative_family in ((hard, True), (easy, False)):
        assert issame[subset].sum() == len(subset) // 2  # balanced
        neg = subset[~issame[subset]]
        assert np.all(same_family[neg] == negative_family) and not np.any(same_id[neg])
    assert np.all(pairs[:, 0] != pairs[:, 1])
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == len(pairs)  # no duplicate pairs
    with pytest.raises(ValueError, match="needs families"):
        synthetic.negative_subset(CFG, "hard")


def test_hard_negatives_look_more_alike_than_easy_ones():
    """At similarity 0.9 same-family negatives are closer in raw pixels than other negatives."""
    cfg = dataclasses.replace(FAMILY_CFG, family_similarity=0.9, occlusion_prob=0.0, num_verification_pairs=2000)
    images, issame = synthetic.generate_verification(cfg)
    f = images.reshape(len(images), -1).astype(np.float64)
    f -= f.mean(0)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = (f[0::2] * f[1::2]).sum(1)
    kinds = synthetic.verification_pair_kinds(cfg)
    hard, easy = sim[kinds == synthetic.PAIR_HARD], sim[kinds == synthetic.PAIR_EASY]
    t = (hard.mean() - easy.mean()) / np.sqrt(hard.var() / hard.size + easy.var() / easy.size)
    assert t > 3, t


def test_family_and_zipf_config_errors():
    with pytest.raises(ValueError, match=r"family_similarity must be in \[0, 1\), got 1.0"):
        synthetic.SyntheticConfig(family_size=4, family_similarity=1.0)
    with pytest.raises(ValueError, match="family_similarity=0.5 needs family_size > 1"):
        synthetic.SyntheticConfig(family_similarity=0.5)
    with pytest.raises(ValueError, match=r"family_size=7 must divide num_identities \(1000\)"):
        synthetic.SyntheticConfig(family_size=7)
    with pytest.raises(ValueError, match="family_size must be >= 1"):
        synthetic.SyntheticConfig(family_size=0)
    with pytest.raises(ValueError, match="num_verification_pairs must be a multiple of 4"):
        synthetic.SyntheticConfig(family_size=4, num_verification_pairs=1002)
    with pytest.raises(ValueError, match=r"zipf_exponent must be in \[0, 4.0\], got -1"):
        synthetic.SyntheticConfig(zipf_exponent=-1)


# ---------------------------------------------------------------------------
# the hard / easy sets and the config keys, as training and eval.py see them
# ---------------------------------------------------------------------------
FAMILY_DATA = dict(num_identities=20, images_per_identity=2, image_size=16, family_size=4, family_similarity=0.5)


def _data_config(**fields):
    from x2jax.train import config as config_lib  # noqa: PLC0415

    data = config_lib.base_config().data
    data.update(fields)
    return data


def test_hard_and_easy_sets_are_the_halves_of_the_synthetic_set():
    from x2jax.evaluation import sets  # noqa: PLC0415
    from x2jax.train import inputs  # noqa: PLC0415

    data = _data_config(**FAMILY_DATA)
    ref = sets.SyntheticSetRef.from_data_config(data)
    assert dict(ref.overrides) == FAMILY_DATA  # the families travel with the set's reference
    assert sets.SyntheticSetRef.from_info(ref.as_info()) == ref  # ... and through a checkpoint's info
    assert inputs.synthetic_overrides(data) == FAMILY_DATA
    assert inputs.synthetic_overrides(_data_config(num_identities=20)) == {"num_identities": 20}  # defaults: none
    opened = inputs.open_verification_sets(["synthetic", "synthetic_hard", "synthetic_easy"], data_dir="",
                                           data_config=data, image_size=16)
    cfg = synthetic.get_config("small", **FAMILY_DATA)
    images, issame = synthetic.generate_verification(cfg)
    np.testing.assert_array_equal(opened["synthetic"][0], images)
    pairs = images.reshape(-1, 2, 16, 16, 3)
    for name, subset in (("synthetic_hard", "hard"), ("synthetic_easy", "easy")):
        keep = synthetic.negative_subset(cfg, subset)
        got_images, got_issame = opened[name]
        np.testing.assert_array_equal(got_images, pairs[keep].reshape(-1, 16, 16, 3))
        np.testing.assert_array_equal(got_issame, issame[keep])
        assert got_issame.sum() == len(got_issame) // 2 == 500
    with pytest.raises(ValueError, match="set 'synthetic_hard' needs synthetic families"):
        inputs.open_verification_sets(["synthetic_hard"], data_dir="", data_config=_data_config(num_identities=20),
                                      image_size=16)


@pytest.mark.parametrize("override, error", [
    ("data.family_size=0", r"data.family_size must be >= 1"),
    ("data.family_similarity=1.0", r"data.family_similarity must be in \[0, 1\)"),
    ("data.family_similarity=-0.1", r"data.family_similarity must be in \[0, 1\)"),
    ("data.zipf_exponent=-0.5", r"data.zipf_exponent must be in \[0, 4.0\]"),
    ("data.family_size=3", r"data \(synthetic variant 'small'\): family_size=3 must divide num_identities \(200\)"),
    ("data.variant=huge", r"unknown synthetic config 'huge'"),
])
def test_family_config_keys_are_validated_naming_the_key(override, error):
    from x2jax.train import config as config_lib  # noqa: PLC0415

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    config = config_lib.load_config(root / "configs" / "synthetic_families.py:strong", [override])
    with pytest.raises(config_lib.ConfigError, match=error):
        config_lib.validate(config)


def test_families_need_synthetic_data_and_the_subsets_need_families():
    from x2jax.train import config as config_lib  # noqa: PLC0415

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    for arg in ("weak", "strong", "strong,arcface"):
        config_lib.validate(config_lib.load_config(root / "configs" / f"synthetic_families.py:{arg}"))
    default = root / "configs" / "synthetic_tiny_x2softmax.py"
    with pytest.raises(config_lib.ConfigError, match=r"data.family_similarity=0.5 needs data.family_size > 1"):
        config_lib.validate(config_lib.load_config(default, ["data.family_similarity=0.5"]))
    with pytest.raises(config_lib.ConfigError, match=r"eval set 'synthetic_easy' needs synthetic data with families"):
        config_lib.validate(config_lib.load_config(default, ["eval.sets=synthetic,synthetic_easy"]))
    with pytest.raises(config_lib.ConfigError, match=r"data.zipf_exponent applies to synthetic data only"):
        config_lib.validate(config_lib.load_config(default, ["data.name=image_folder", f"data.path={root}",
                                                             "data.zipf_exponent=0.5"]))
    assert {"data.family_size", "data.family_similarity", "data.zipf_exponent"} <= set(config_lib.RESUME_KEYS)


@pytest.mark.slow
def test_a_families_run_logs_and_prints_the_hard_and_easy_sets(tmp_path, cache_dir, capsys):
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from x2jax.train import config as config_lib  # noqa: PLC0415
    from x2jax.train.loop import train  # noqa: PLC0415

    root = Path(__file__).resolve().parent.parent
    c = config_lib.load_config(root / "configs" / "synthetic_families.py:strong", [
        "data.num_identities=48", "data.images_per_identity=8", "data.image_size=16", "data.batch_size=32",
        "data.zipf_exponent=0.5", "model.layers=(1,1,1,1)", "model.widths=(8,8,16,16)", "model.embedding_size=32",
        "num_steps=2", "schedule.warmup_steps=0", "eval.every_steps=0", f"compilation_cache_dir={cache_dir}",
    ])
    out = train(c, tmp_path)
    assert set(out["eval"]) == {"synthetic", "synthetic_hard", "synthetic_easy"}
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} >= {"eval/synthetic", "eval/synthetic_hard", "eval/synthetic_easy"}
    printed = capsys.readouterr().out
    for name in ("synthetic", "synthetic_hard", "synthetic_easy"):
        assert f"step 2: verification {name}: accuracy" in printed
    counts = synthetic.train_image_counts(synthetic.get_config("small", num_identities=48, images_per_identity=8,
                                                               zipf_exponent=0.5))
    assert f"({counts.sum()} images, 48 identities, 16x16)" in printed

    # eval.py reads the same sets from the checkpoint: its info names the families.
    from x2jax.evaluation import main as eval_cli  # noqa: PLC0415
    from x2jax.evaluation import sets  # noqa: PLC0415
    from x2jax.models.io import load_backbone  # noqa: PLC0415

    _, _, info = load_backbone(tmp_path)
    assert sets.SyntheticSetRef.from_info(info["synthetic"]) == sets.SyntheticSetRef.from_data_config(c.data)
    names = ["synthetic_hard", "synthetic_easy"]
    args = eval_cli.parse_args(["--checkpoint", str(tmp_path), "--sets", ",".join(names)])
    evaluated = {n: (im, same) for n, im, same in eval_cli.iter_verification_sets(
        args, sets.resolve_verification_sets(names, data_dir=""), info, 16)}
    from x2jax.train import inputs  # noqa: PLC0415

    trained = inputs.open_verification_sets(names, data_dir="", data_config=c.data, image_size=16)
    for name in names:
        np.testing.assert_array_equal(evaluated[name][0], trained[name][0])
        np.testing.assert_array_equal(evaluated[name][1], trained[name][1])


@pytest.mark.slow
def test_resuming_with_another_family_strength_is_a_mismatch(tmp_path, cache_dir):
    from pathlib import Path  # noqa: PLC0415

    from x2jax.train import config as config_lib  # noqa: PLC0415
    from x2jax.train.checkpointing import CheckpointMismatchError  # noqa: PLC0415
    from x2jax.train.loop import train  # noqa: PLC0415

    root = Path(__file__).resolve().parent.parent

    def config(*extra):
        return config_lib.load_config(root / "configs" / "synthetic_families.py:strong", [
            "data.num_identities=48", "data.images_per_identity=4", "data.image_size=16", "data.batch_size=32",
            "model.layers=(1,1,1,1)", "model.widths=(8,8,16,16)", "model.embedding_size=32", "eval.sets=",
            "schedule.warmup_steps=0", f"compilation_cache_dir={cache_dir}", *extra])

    train(config("num_steps=2"), tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"data.family_similarity: 0.8 -> 0.5"):
        train(config("num_steps=3", "data.family_similarity=0.5"), tmp_path)

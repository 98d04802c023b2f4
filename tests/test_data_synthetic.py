"""Synthetic face identities: determinism, held-out verification layout, difficulty."""

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

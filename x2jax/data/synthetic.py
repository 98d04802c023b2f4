"""Synthetic face identities: the offline default dataset, deterministic from a seed.

Each identity is a random latent (head shape, skin / hair / eye / lip colours,
positions and sizes of eyes, brows, nose and mouth, and a few skin marks)
rendered into a face-like RGB image. Each image adds nuisance variation:
in-plane rotation, shift, scale, yaw (inner features slide sideways, the face
narrows), expression (mouth / eye openness), lighting (gain, colour cast,
directional gradient), background colour, pixel noise and, with some
probability, a random occluding rectangle. Identities are separable, but not
by raw pixels alone (see ``docs/data.md`` for measured baselines).

Identity ``i`` depends only on ``(seed, i)``, so train identities
``0 .. num_identities-1`` and the held-out verification identities
(``num_identities ..``) come from the same distribution and never overlap.

Two optional knobs make the set harder in the way real face data is (both off
by default, which leaves every image as it was):

- **families** (``family_size`` > 1): identities ``f*F .. f*F + F-1`` form
  family ``f`` of look-alikes. Each family has a centre latent drawn like an
  identity's, and a member's latent is ``centre + (1 - family_similarity) *
  (own - centre)``, ``own`` being the latent it has without families
  (0 = independent identities, near 1 = near-duplicates). Verification
  negatives are then half *hard* (two identities of one family) and half
  *easy* (two families), see :func:`verification_pairs`.
- **long tail** (``zipf_exponent`` > 0): training identity of rank ``r``
  (1-based, ranks a seeded permutation of the identities) has
  ``max(1, floor(images_per_identity * r**-zipf_exponent + 0.5))`` images
  (:func:`train_image_counts`); verification identities keep
  ``verification_images_per_identity``.

Pure numpy: :func:`generate_train` and :func:`generate_verification` are
what the TFDS builder ``synthetic_faces`` stores.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Iterator

import numpy as np


MAX_ZIPF_EXPONENT = 4.0
"""Largest ``zipf_exponent`` (at 4 the second identity already has 1/16 of the first's images)."""


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and difficulty of a synthetic face dataset."""

    num_identities: int = 1000
    images_per_identity: int = 24
    image_size: int = 32
    # Verification split over held-out identities num_identities .. + num_verification_identities.
    num_verification_identities: int = 300
    verification_images_per_identity: int = 8
    num_verification_pairs: int = 2000
    seed: int = 0
    # Nuisance strengths (canonical face coordinates span [-1, 1]).
    max_rotation_deg: float = 12.0
    shift_std: float = 0.07
    scale_std: float = 0.07
    yaw_max: float = 0.8
    lighting_gain: tuple[float, float] = (0.6, 1.3)
    colour_cast_std: float = 0.08
    light_gradient_std: float = 0.3
    noise_std: tuple[float, float] = (3.0, 12.0)
    occlusion_prob: float = 0.35
    # How images are encoded when stored (TFDS / RecordIO): 'png' is lossless.
    image_format: str = "png"
    # Families of look-alike identities: F consecutive identities share a centre latent,
    # member = centre + (1 - family_similarity) * (own - centre). 1 = no families.
    family_size: int = 1
    family_similarity: float = 0.0
    # Long tail: images of the training identity of rank r = max(1, round(images_per_identity * r**-a)).
    zipf_exponent: float = 0.0

    def __post_init__(self):
        if self.num_identities < 1 or self.images_per_identity < 1:
            raise ValueError(f"need >= 1 identity and image per identity, got {self}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.num_verification_pairs % 2:
            raise ValueError(f"num_verification_pairs must be even, got {self.num_verification_pairs}")
        if self.verification_images_per_identity < 2 or self.num_verification_identities < 2:
            raise ValueError("verification needs >= 2 identities with >= 2 images each")
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', got {self.image_format!r}")
        f = self.family_size
        if f < 1:
            raise ValueError(f"family_size must be >= 1 (1 = independent identities), got {f}")
        if not 0.0 <= self.family_similarity < 1.0:
            raise ValueError(f"family_similarity must be in [0, 1), got {self.family_similarity}")
        if self.family_similarity > 0 and f == 1:
            raise ValueError(f"family_similarity={self.family_similarity} needs family_size > 1 (families of "
                             "look-alikes), got family_size=1")
        if f > 1:
            if self.num_identities % f or self.num_verification_identities % f:
                raise ValueError(
                    f"family_size={f} must divide num_identities ({self.num_identities}) and "
                    f"num_verification_identities ({self.num_verification_identities}): no family spans both splits")
            if self.num_verification_identities < 2 * f:
                raise ValueError(f"family_size={f}: easy negatives need >= 2 verification families, got "
                                 f"{self.num_verification_identities // f}")
            if self.num_verification_pairs % 4:
                raise ValueError("with families (family_size > 1) num_verification_pairs must be a multiple of 4 "
                                 f"(same, hard, same, easy), got {self.num_verification_pairs}")
        if not 0.0 <= self.zipf_exponent <= MAX_ZIPF_EXPONENT:
            raise ValueError(f"zipf_exponent must be in [0, {MAX_ZIPF_EXPONENT}], got {self.zipf_exponent}")

    def family_of(self, identity):
        """Family index of identity (or identity array) ``identity``: ``identity // family_size``."""
        return np.asarray(identity) // self.family_size


CONFIGS = {
    # CPU default: generated in a few seconds, a tiny IResNet trains in minutes.
    "small": SyntheticConfig(),
    # Research comparisons: insightface resolution, thousands of identities.
    "large": SyntheticConfig(
        num_identities=2000,
        images_per_identity=40,
        image_size=112,
        num_verification_identities=500,
        verification_images_per_identity=10,
        num_verification_pairs=3000,
        image_format="jpeg",
    ),
}


def get_config(name: str, **overrides) -> SyntheticConfig:
    """A named config ('small', 'large') with field overrides."""
    if name not in CONFIGS:
        raise ValueError(f"unknown synthetic config {name!r}; known: {sorted(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], **overrides)


# ---------------------------------------------------------------------------
# Latents
_ID_FIELDS = (
    "head_w",
    "head_h",
    "hairline",
    "hair_volume",
    "eye_x",
    "eye_y",
    "eye_r",
    "brow_dy",
    "brow_w",
    "brow_t",
    "nose_y",
    "nose_len",
    "nose_w",
    "mouth_y",
    "mouth_w",
    "mouth_h",
)
_NUM_MARKS = 4


def _identity_latent(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One identity's parameters (scalars and colours)."""
    u = rng.uniform
    lat = {
        "head_w": u(0.55, 0.78),
        "head_h": u(0.72, 0.92),
        "hairline": u(-0.62, -0.2),
        "hair_volume": u(1.02, 1.2),
        "eye_x": u(0.2, 0.4),
        "eye_y": u(-0.22, 0.02),
        "eye_r": u(0.06, 0.13),
        "brow_dy": u(0.12, 0.24),
        "brow_w": u(0.08, 0.18),
        "brow_t": u(0.02, 0.06),
        "nose_y": u(0.1, 0.3),
        "nose_len": u(0.1, 0.25),
        "nose_w": u(0.05, 0.12),
        "mouth_y": u(0.4, 0.6),
        "mouth_w": u(0.15, 0.32),
        "mouth_h": u(0.03, 0.09),
    }
    tone = u(0.25, 1.0)  # light .. dark skin
    lat["skin"] = np.clip(np.array([235, 200, 175]) * (1.08 - 0.6 * tone) + rng.normal(0, 14, 3), 20, 255)
    lat["hair"] = np.clip(
        rng.choice([[30, 25, 20], [90, 60, 30], [170, 130, 80], [200, 200, 200], [120, 40, 20]])
        + rng.normal(0, 20, 3),
        0,
        255,
    )
    lat["iris"] = np.clip(
        rng.choice([[40, 30, 20], [60, 90, 140], [70, 110, 70]]) + rng.normal(0, 15, 3), 0, 255
    )
    lat["lip"] = np.clip(lat["skin"] * np.array([0.85, 0.55, 0.55]) + rng.normal(0, 12, 3), 0, 255)
    lat["mark_xy"] = np.stack([u(-0.45, 0.45, _NUM_MARKS), u(-0.4, 0.6, _NUM_MARKS)], -1)
    lat["mark_sigma"] = u(0.04, 0.14, _NUM_MARKS)
    lat["mark_rgb"] = rng.normal(0, 45, (_NUM_MARKS, 3))
    return lat


def _nuisance(rng: np.random.Generator, n: int, cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """Per-image variation for ``n`` images."""
    u = rng.uniform
    out = {
        "angle": np.deg2rad(u(-cfg.max_rotation_deg, cfg.max_rotation_deg, n)),
        "dx": rng.normal(0, cfg.shift_std, n),
        "dy": rng.normal(0, cfg.shift_std, n),
        "scale": np.exp(rng.normal(0, cfg.scale_std, n)),
        "yaw": u(-cfg.yaw_max, cfg.yaw_max, n),
        "mouth_open": u(0.5, 1.8, n),
        "eye_open": u(0.5, 1.1, n),
        "gain": u(*cfg.lighting_gain, n),
        "cast": rng.normal(1, cfg.colour_cast_std, (n, 3)),
        "grad": rng.normal(0, cfg.light_gradient_std, (n, 2)),
        "bg": u(0, 255, (n, 3)),
        "bg_grad": rng.normal(0, 40, (n, 3)),
        "noise": u(*cfg.noise_std, n),
        "occlude": u(0, 1, n) < cfg.occlusion_prob,
        "occ_xy": u(-0.9, 0.6, (n, 2)),
        "occ_wh": u(0.3, 0.8, (n, 2)),
        "occ_rgb": u(0, 255, (n, 3)),
    }
    return out


def family_centre_latent(cfg: SyntheticConfig, family: int) -> dict[str, np.ndarray]:
    """The centre latent of family ``family``: drawn like an identity's, from its own stream."""
    return _identity_latent(np.random.default_rng([cfg.seed, 7927, int(family)]))


def identity_latent(cfg: SyntheticConfig, identity: int) -> dict[str, np.ndarray]:
    """The latent identity ``identity`` is rendered from (its family's pull included)."""
    return _identity_params(cfg, identity, 0)[0]


def _identity_params(cfg: SyntheticConfig, identity: int, count: int):
    rng = np.random.default_rng([cfg.seed, 7919, int(identity)])
    lat = _identity_latent(rng)
    if cfg.family_size > 1 and cfg.family_similarity > 0:
        # member = centre + (1 - s) * (own - centre); the nuisance stream below is unchanged.
        centre = family_centre_latent(cfg, int(identity) // cfg.family_size)
        keep = 1.0 - cfg.family_similarity
        lat = {k: centre[k] + keep * (np.asarray(v) - centre[k]) for k, v in lat.items()}
    return lat, _nuisance(rng, count, cfg)


def train_image_counts(cfg: SyntheticConfig) -> np.ndarray:
    """Images of each training identity, int64 (num_identities,).

    ``images_per_identity`` each when ``zipf_exponent`` is 0; otherwise identity
    ``i`` has rank ``r = P[i] + 1`` with ``P = default_rng([seed, 7933]).permutation(N)``
    and ``max(1, floor(images_per_identity * r**-zipf_exponent + 0.5))`` images.
    """
    n, k = cfg.num_identities, cfg.images_per_identity
    if cfg.zipf_exponent == 0:
        return np.full((n,), k, np.int64)
    rank = np.random.default_rng([cfg.seed, 7933]).permutation(n) + 1
    return np.maximum(1, np.floor(k * rank.astype(np.float64) ** -cfg.zipf_exponent + 0.5)).astype(np.int64)


def _stack_params(cfg: SyntheticConfig, identities: np.ndarray, counts):
    """Per-image parameter arrays for ``counts`` images of each identity (an int, or one per identity)."""
    counts = np.broadcast_to(np.asarray(counts, np.int64), (len(identities),))
    lats, nuis = [], []
    s = cfg.image_size
    for i, count in zip(identities, counts):
        lat, nui = _identity_params(cfg, int(i), int(count))
        # Pixel noise: one stream per identity, so chunking never changes the result.
        nrng = np.random.default_rng([cfg.seed, 7919, int(i), 1])
        nui["unit_noise"] = nrng.standard_normal((int(count), s, s, 3), dtype=np.float32)
        lats.append(lat)
        nuis.append(nui)
    params = {}
    for k in lats[0]:
        params[k] = np.repeat(np.stack([lat[k] for lat in lats]), counts, axis=0)
    for k in nuis[0]:
        params[k] = np.concatenate([n[k] for n in nuis])
    return params


# ---------------------------------------------------------------------------
# Rendering
def _ellipse(u, v, cx, cy, ax, ay, sharp):
    """Soft mask of an axis-aligned ellipse; inputs broadcast to (B, S, S)."""
    r2 = ((u - cx) / ax) ** 2 + ((v - cy) / ay) ** 2
    # Linear ramp about one pixel wide at the boundary (r^2 - 1 ~ 2 (r - 1) there).
    return np.clip(0.5 + (1.0 - r2) * (0.5 * sharp) * np.minimum(ax, ay), 0.0, 1.0)


def _render(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Renders B images from per-image parameter arrays -> uint8 (B, S, S, 3)."""
    f32 = np.float32
    b = p["angle"].shape[0]
    col = lambda k: p[k].astype(f32)[:, None, None, :]  # noqa: E731  (B,1,1,3)
    sc = lambda k: p[k].astype(f32)[:, None, None]  # noqa: E731  (B,1,1)
    coords = (np.arange(size, dtype=f32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    x, y = x[None], y[None]
    # Inverse similarity transform into canonical face coordinates.
    cos, sin = np.cos(sc("angle")), np.sin(sc("angle"))
    xs, ys = (x - sc("dx")) / sc("scale"), (y - sc("dy")) / sc("scale")
    u = cos * xs + sin * ys
    v = -sin * xs + cos * ys
    sharp = f32(size) * 1.2  # edge width ~ one pixel
    yaw = sc("yaw")
    head_w = sc("head_w") * (1 - 0.18 * np.abs(yaw))
    uf = u - 0.16 * yaw  # inner features slide with yaw
    feat_w = 1 - 0.25 * np.abs(yaw)

    bg = col("bg") + col("bg_grad") * (y[..., None] + 0.5 * x[..., None])
    img = np.array(np.broadcast_to(bg, (b, size, size, 3)), dtype=f32)

    tmp = np.empty_like(img)

    def paint(mask, colour):  # img += mask * (colour - img), in place
        np.subtract(colour, img, out=tmp)
        np.multiply(tmp, mask[..., None], out=tmp)
        np.add(img, tmp, out=img)

    skin, hair = col("skin"), col("hair")
    hair_back = _ellipse(
        u, v, 0, 0.0, head_w * sc("hair_volume"), sc("head_h") * sc("hair_volume"), sharp
    ) * (v < 0.15)
    paint(hair_back, hair)
    face = _ellipse(u, v, 0, 0.05, head_w, sc("head_h"), sharp)
    paint(face, skin)
    # Skin marks: identity-specific low-frequency texture.
    mxy, msig = p["mark_xy"].astype(f32), p["mark_sigma"].astype(f32)
    mrgb = p["mark_rgb"].astype(f32)
    for k in range(mxy.shape[1]):
        d2 = (uf - mxy[:, k, 0, None, None] * feat_w) ** 2 + (v - mxy[:, k, 1, None, None]) ** 2
        blob = np.exp(-d2 / (2 * msig[:, k, None, None] ** 2)) * face
        img = img + blob[..., None] * mrgb[:, k, None, None, :]
    fringe = face * np.clip(0.5 - (v - sc("hairline")) * (0.5 * sharp), 0.0, 1.0)
    paint(fringe, hair)
    ex, ey, er = sc("eye_x") * feat_w, sc("eye_y"), sc("eye_r")
    eye_open = sc("eye_open")
    for side in (-1, 1):
        white = _ellipse(uf, v, side * ex, ey, er * 1.4, er * eye_open, sharp)
        paint(white, np.float32(235))
        paint(_ellipse(uf, v, side * ex, ey, er * 0.7, er * 0.7 * eye_open, sharp) * white, col("iris"))
        brow = _ellipse(uf, v, side * ex, ey - sc("brow_dy"), sc("brow_w"), sc("brow_t"), sharp)
        paint(brow, hair * 0.7)
    nose = _ellipse(uf, v, 0, sc("nose_y"), sc("nose_w") * feat_w, sc("nose_len"), sharp)
    paint(nose * 0.5, skin * 0.7)
    mouth = _ellipse(uf, v, 0, sc("mouth_y"), sc("mouth_w") * feat_w, sc("mouth_h") * sc("mouth_open"), sharp)
    paint(mouth, col("lip"))

    # Lighting: gain, colour cast, directional gradient.
    grad = p["grad"].astype(f32)
    light = sc("gain") * (1 + grad[:, 0, None, None] * x + grad[:, 1, None, None] * y)
    img = img * light[..., None] * col("cast")
    # Occluder (in image coordinates, not face coordinates).
    occ = p["occlude"][:, None, None]
    oxy, owh = p["occ_xy"].astype(f32), p["occ_wh"].astype(f32)
    inside = (
        (x >= oxy[:, 0, None, None])
        & (x <= oxy[:, 0, None, None] + owh[:, 0, None, None])
        & (y >= oxy[:, 1, None, None])
        & (y <= oxy[:, 1, None, None] + owh[:, 1, None, None])
    )
    img = np.where((occ & inside)[..., None], col("occ_rgb"), img)
    img += p["unit_noise"] * p["noise"].astype(f32)[:, None, None, None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _chunks(counts: np.ndarray, chunk: int) -> list[slice]:
    """Consecutive identity ranges of at most ``chunk`` images (at least one identity each)."""
    out, start, total = [], 0, 0
    for i, c in enumerate(counts.tolist()):
        if i > start and total + c > chunk:
            out.append(slice(start, i))
            start, total = i, 0
        total += c
    if start < len(counts):
        out.append(slice(start, len(counts)))
    return out


def render_identities(
    cfg: SyntheticConfig, identities, images_per_identity, chunk: int = 256,
    workers: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (images uint8 (b, S, S, 3), identity int64 (b,)) chunks, identity-major.

    ``images_per_identity``: one count for all, or one per identity (e.g.
    :func:`train_image_counts`). Chunks render in ``workers`` threads (default:
    one per core; numpy releases the GIL in its array loops), yielded in order.
    Every identity has its own random streams, so the images do not depend on
    ``chunk`` or ``workers``.
    """
    identities = np.asarray(identities, np.int64)
    counts = np.array(np.broadcast_to(np.asarray(images_per_identity, np.int64), identities.shape))
    if counts.size and counts.min() < 1:
        raise ValueError(f"every identity needs >= 1 image, got a count of {counts.min()}")
    chunks = [(identities[sl], counts[sl]) for sl in _chunks(counts, chunk)]

    def render(part: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        ids, n = part
        params = _stack_params(cfg, ids, n)
        return _render(params, cfg.image_size), np.repeat(ids, n)

    workers = min(len(chunks), workers or os.cpu_count() or 1)
    if workers <= 1:
        yield from map(render, chunks)
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="x2jax-synthetic") as pool:
        yield from pool.map(render, chunks)


def generate_train(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train split: (images uint8 (N*K, S, S, 3), labels int32 (N*K,)), identity-major.

    N = ``cfg.num_identities``, K = ``cfg.images_per_identity``; label = identity.
    With ``zipf_exponent`` > 0, identity i has ``train_image_counts(cfg)[i]``
    images instead of K.
    """
    counts = train_image_counts(cfg)
    n = int(counts.sum())
    images = np.empty((n, cfg.image_size, cfg.image_size, 3), np.uint8)
    labels = np.empty((n,), np.int32)
    pos = 0
    for imgs, ids in render_identities(cfg, range(cfg.num_identities), counts):
        images[pos : pos + len(ids)] = imgs
        labels[pos : pos + len(ids)] = ids
        pos += len(ids)
    return images, labels


PAIR_SAME, PAIR_HARD, PAIR_EASY = 0, 1, 2
"""Pair kinds (:func:`verification_pair_kinds`): same identity; two identities of one
family (hard negative); two identities of different families (easy negative)."""

NEGATIVE_SUBSETS = {"hard": (0, 1), "easy": (2, 3)}
"""With families, pairs ``4j + r`` for r in these residues form the hard / easy subset:
a positive and a hard negative, or a positive and an easy negative (balanced)."""


def verification_pairs(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pair indices into the verification image table, and issame.

    The table holds ``verification_images_per_identity`` images for each held-out
    identity (identity-major). Returns (pairs int64 (P, 2), issame bool (P,)):
    even pair numbers same-identity, odd different, P = num_verification_pairs.

    With families (``family_size`` > 1) the negatives alternate: pair ``4j + 1``
    is two identities of one family (hard), pair ``4j + 3`` two identities of
    different families (easy).
    """
    m, k = cfg.num_verification_identities, cfg.verification_images_per_identity
    rng = np.random.default_rng([cfg.seed, 104729])
    p = cfg.num_verification_pairs
    pairs = np.empty((p, 2), np.int64)
    issame = np.zeros((p,), bool)
    issame[0::2] = True
    seen = set()
    if cfg.family_size > 1:
        return _family_pairs(cfg, rng, pairs, issame, seen)
    for i in range(p):
        while True:
            if issame[i]:
                ident = rng.integers(m)
                a, b = rng.choice(k, 2, replace=False)
                pair = (ident * k + a, ident * k + b)
            else:
                ia, ib = rng.choice(m, 2, replace=False)
                pair = (ia * k + rng.integers(k), ib * k + rng.integers(k))
            key = tuple(sorted(pair))
            if key not in seen or len(seen) >= m * k * (k - 1) // 2:
                seen.add(key)
                break
        pairs[i] = pair
    return pairs, issame


def _family_pairs(cfg, rng, pairs, issame, seen):
    """:func:`verification_pairs` with families: same, hard, same, easy, ... (identities local to the split)."""
    m, k, f = cfg.num_verification_identities, cfg.verification_images_per_identity, cfg.family_size
    families = m // f
    for i in range(len(pairs)):
        for tries in range(1000):  # duplicates are redrawn while fresh pairs are easy to find
            if issame[i]:
                ident = rng.integers(m)
                a, b = rng.choice(k, 2, replace=False)
                pair = (ident * k + a, ident * k + b)
            elif i % 4 == 1:  # hard: two members of one family
                fam = rng.integers(families)
                ia, ib = fam * f + rng.choice(f, 2, replace=False)
                pair = (ia * k + rng.integers(k), ib * k + rng.integers(k))
            else:  # easy: members of two families
                fa, fb = rng.choice(families, 2, replace=False)
                ia, ib = fa * f + rng.integers(f), fb * f + rng.integers(f)
                pair = (ia * k + rng.integers(k), ib * k + rng.integers(k))
            key = tuple(sorted(pair))
            if key not in seen or tries == 999:
                seen.add(key)
                break
        pairs[i] = pair
    return pairs, issame


def verification_pair_kinds(cfg: SyntheticConfig) -> np.ndarray:
    """Kind of each verification pair, int8 (P,): :data:`PAIR_SAME`, :data:`PAIR_HARD` or :data:`PAIR_EASY`.

    Computed from the pairs' identities: a negative is hard when both identities
    are of one family (never, without families).
    """
    pairs, issame = verification_pairs(cfg)
    ident = pairs // cfg.verification_images_per_identity + cfg.num_identities
    same_family = cfg.family_of(ident[:, 0]) == cfg.family_of(ident[:, 1])
    return np.where(issame, PAIR_SAME, np.where(same_family, PAIR_HARD, PAIR_EASY)).astype(np.int8)


def negative_subset(cfg: SyntheticConfig, subset: str) -> np.ndarray:
    """Pair indices of the ``"hard"`` or ``"easy"`` subset (:data:`NEGATIVE_SUBSETS`), int64.

    Raises:
      ValueError: an unknown subset, or ``cfg`` has no families (``family_size`` 1).
    """
    if subset not in NEGATIVE_SUBSETS:
        raise ValueError(f"unknown negative subset {subset!r}; known: {sorted(NEGATIVE_SUBSETS)}")
    if cfg.family_size < 2:
        raise ValueError(f"the {subset} negative subset needs families (family_size > 1), got family_size=1")
    index = np.arange(cfg.num_verification_pairs)
    return index[np.isin(index % 4, NEGATIVE_SUBSETS[subset])]


def generate_verification(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Verification split in ``.bin`` layout: (images uint8 (2P, S, S, 3), issame bool (P,)).

    Images ``2i`` and ``2i+1`` form pair ``i``; identities are held out of training
    (``num_identities .. num_identities + num_verification_identities - 1``).
    """
    ids = np.arange(cfg.num_identities, cfg.num_identities + cfg.num_verification_identities)
    table = np.concatenate(
        [imgs for imgs, _ in render_identities(cfg, ids, cfg.verification_images_per_identity)]
    )
    pairs, issame = verification_pairs(cfg)
    return table[pairs.reshape(-1)], issame

"""IJB-B/C 1:1: alignment, pooling, ROC/TAR against references, and a known-answer fixture."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve as sk_roc_curve

from x2jax.evaluation import ijb, report


def rotation(deg):
    r = np.deg2rad(deg)
    return np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])


def face_to_crop(scale, deg, shift):
    """Landmarks of a face placed in a loose crop: crop = scale R template + shift."""
    return scale * ijb.ARCFACE_TEMPLATE_112 @ rotation(deg).T + np.asarray(shift)


# ---------------------------------------------------------------- alignment --


def test_similarity_transform_maps_landmarks_onto_template():
    landmarks = face_to_crop(1.7, 12.0, (40.0, 25.0))
    m = ijb.similarity_transform(landmarks, ijb.ARCFACE_TEMPLATE_112)
    mapped = landmarks @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(mapped, ijb.ARCFACE_TEMPLATE_112, atol=1e-9)
    np.testing.assert_allclose(m[:, :2], rotation(-12.0) / 1.7, atol=1e-12)


def test_similarity_transform_is_least_squares_on_noisy_points():
    # Independent solution: linear least squares in (a, b, tx, ty) with M = [[a, -b, tx], [b, a, ty]].
    rng = np.random.default_rng(0)
    for _ in range(5):
        src = face_to_crop(rng.uniform(0.5, 3), rng.uniform(-40, 40), rng.uniform(0, 80, 2)) + rng.normal(0, 2, (5, 2))
        dst = ijb.ARCFACE_TEMPLATE_112
        rows = []
        for (x, y) in src:
            rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        a, b, tx, ty = np.linalg.lstsq(np.array(rows), dst.reshape(-1), rcond=None)[0]
        np.testing.assert_allclose(ijb.similarity_transform(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)


def bilinear_reference(image, m, size):
    """out[y, x] = bilinear(image at M^-1 (x, y)), pixel centres at integers, zero outside."""
    a_inv = np.linalg.inv(m[:, :2])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    pts = np.stack([xs - m[0, 2], ys - m[1, 2]], -1) @ a_inv.T
    sx, sy = pts[..., 0], pts[..., 1]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    img = image.astype(np.float64)
    h, w = img.shape[:2]

    def px(yy, xx):
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        return np.where(inside[..., None], img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0)

    return (
        px(y0, x0) * ((1 - fx) * (1 - fy))[..., None]
        + px(y0, x0 + 1) * (fx * (1 - fy))[..., None]
        + px(y0 + 1, x0) * ((1 - fx) * fy)[..., None]
        + px(y0 + 1, x0 + 1) * (fx * fy)[..., None]
    )


def test_align_face_matches_bilinear_reference():
    rng = np.random.default_rng(1)
    # Smooth random image (bilinear interpolation of a coarse grid) so rounding noise stays small.
    coarse = rng.integers(0, 256, size=(12, 12, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((240, 220), Image.Resampling.BICUBIC))
    landmarks = face_to_crop(1.6, -9.0, (35.0, 30.0))
    got = ijb.align_face(image, landmarks).astype(np.float64)
    m = ijb.similarity_transform(landmarks, ijb.ARCFACE_TEMPLATE_112)
    want = bilinear_reference(image, m, 112)
    interior = (slice(2, -2), slice(2, -2))
    assert np.abs(got[interior] - want[interior]).max() <= 1.0  # uint8 rounding only


def test_align_face_puts_landmark_blobs_on_template():
    scale = 3.0
    landmarks = face_to_crop(scale, 20.0, (60.0, 20.0))
    ys, xs = np.mgrid[0:420, 0:420].astype(np.float64)
    image = np.zeros((420, 420))
    for x, y in landmarks:
        image += 255 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 4.5**2))
    image = np.repeat(np.clip(image, 0, 255).round().astype(np.uint8)[..., None], 3, -1)
    aligned = ijb.align_face(image, landmarks)[..., 0].astype(np.float64)
    yy, xx = np.mgrid[0:112, 0:112]
    for tx, ty in ijb.ARCFACE_TEMPLATE_112:
        w = aligned * (((xx - tx) ** 2 + (yy - ty) ** 2) < 5**2)
        centroid = np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum()
        # A half-pixel convention error would move the blob by 0.5 * (1 - 1/3) = 0.33 px.
        np.testing.assert_allclose(centroid, [tx, ty], atol=0.1)


# ------------------------------------------------------------ pooling / ROC --


def ref_image2template_feature(img_feats, templates, medias):
    """insightface eval_ijbc.py image2template_feature, loops kept."""
    from sklearn.preprocessing import normalize

    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        template_feats[count_template] = np.sum(np.array(media_norm_feats), axis=0)
    return normalize(template_feats), unique_templates


def test_template_features_match_insightface_loops():
    rng = np.random.default_rng(2)
    m = 300
    feats = rng.normal(size=(m, 8))
    templates = rng.integers(100, 140, m)
    medias = rng.integers(0, 6, m)  # the same media id may appear in several templates
    scores = rng.uniform(0.3, 1.0, m)
    ids, got = ijb.template_features(feats, templates, medias, scores)
    want, want_ids = ref_image2template_feature(feats * scores[:, None], templates, medias)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_roc_curve_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    for trial in range(5):
        labels = rng.random(2000) < 0.3
        scores = np.round(rng.normal(size=2000) + labels, 1 + trial % 3)  # many tied scores
        fpr, tpr, thr = ijb.roc_curve(labels, scores)
        sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores)
        np.testing.assert_allclose(fpr, sk_fpr, atol=1e-15)
        np.testing.assert_allclose(tpr, sk_tpr, atol=1e-15)
        np.testing.assert_array_equal(thr, sk_thr)


def test_tar_at_far_matches_insightface_selection():
    rng = np.random.default_rng(4)
    labels = rng.random(50_000) < 0.1
    scores = rng.normal(size=labels.size) + 2.0 * labels
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores)
    fpr_f, tpr_f = np.flipud(sk_fpr), np.flipud(sk_tpr)
    want = {}
    for far in ijb.FARS:
        _, min_index = min(list(zip(abs(fpr_f - far), range(len(fpr_f)))))
        want[far] = tpr_f[min_index]
    fpr, tpr, _ = ijb.roc_curve(labels, scores)
    assert ijb.tar_at_far(fpr, tpr) == pytest.approx(want, abs=0)


# --------------------------------------------------------- known-answer IJB --

A, B, C, D = (255, 255, 255), (255, 255, 0), (255, 0, 0), (0, 0, 0)  # corners of [-1, 1]^3 after normalising
LANDMARKS = face_to_crop(1.2, 0.0, (10.0, 10.0))  # the aligned crop lies inside the 160x160 loose crop

# template id -> list of media, each a list of (colour, detector score)
TEMPLATES = {
    1: [[(A, 0.9)]], 2: [[(A, 0.7), (A, 0.8)]],  # genuine, cosine 1
    3: [[(B, 0.6)]], 4: [[(B, 0.9)]],
    5: [[(C, 0.8)]], 6: [[(C, 0.5)]],
    7: [[(D, 0.7)]], 8: [[(D, 0.9)]],
    9: [[(A, 1.0)]], 10: [[(B, 1.0)] * 3, [(A, 1.0)]],  # media mean: cos(a, a+b) = 0.816 (sum of images: 0.577)
    11: [[(A, 1.0)]], 12: [[(C, 0.1)], [(A, 0.9)]],  # detector weights: cos(a, 0.1c+0.9a) = 0.994 (unweighted 0.577)
    13: [[(A, 1.0)]], 14: [[(A, 1.0)], [(C, 1.0)]],  # genuine, cos(a, a+c) = 0.577
    15: [[(A, 1.0)]], 16: [[(B, 1.0)], [(B, 1.0)], [(A, 1.0)]],  # impostor, cos(a, 2b+a) = 0.662
}
PAIRS = [
    (1, 2, 1), (3, 4, 1), (5, 6, 1), (7, 8, 1), (9, 10, 1), (11, 12, 1), (13, 14, 1),
    (15, 16, 0),
    (1, 3, 0), (2, 4, 0), (9, 3, 0),  # cos 1/3
    (1, 5, 0), (2, 6, 0), (11, 5, 0),  # cos -1/3
    (1, 7, 0), (2, 8, 0), (13, 7, 0),  # cos -1
]


def write_ijb_fixture(root, target="ijbc"):
    os.makedirs(os.path.join(root, "meta"))
    os.makedirs(os.path.join(root, "loose_crop"))
    tid_mid, lmk_lines = [], []
    media_id, image_id = 100, 0
    for tid, medias in TEMPLATES.items():
        for media in medias:
            media_id += 1
            for colour, det in media:
                image_id += 1
                name = f"{image_id}.png"
                Image.new("RGB", (160, 160), colour).save(os.path.join(root, "loose_crop", name))
                tid_mid.append(f"{name} {tid} {media_id}")
                pts = " ".join(f"{v:.4f}" for v in LANDMARKS.reshape(-1))
                lmk_lines.append(f"{name} {pts} {det}")
    with open(os.path.join(root, "meta", f"{target}_face_tid_mid.txt"), "w") as f:
        f.write("\n".join(tid_mid) + "\n")
    with open(os.path.join(root, "meta", f"{target}_name_5pts_score.txt"), "w") as f:
        f.write("\n".join(lmk_lines) + "\n")
    with open(os.path.join(root, "meta", f"{target}_template_pair_label.txt"), "w") as f:
        f.write("\n".join(f"{a} {b} {l}" for a, b, l in PAIRS) + "\n")
    return root


def mean_colour_net(variables, x):
    """Embedding = mean normalised colour (B, 3): the fixture's cosines are known in closed form."""
    return jnp.mean(x, axis=(1, 2))


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    return write_ijb_fixture(str(tmp_path_factory.mktemp("ijb")))


def test_ijb_known_answer(ijb_root):
    result = ijb.evaluate_ijb(mean_colour_net, {}, ijb_root, "IJBC", batch_size=8, workers=2)
    # 7 genuine pairs, 10 impostors. Genuine scores 1 (x4), .994, .816, .577; impostors .662, 1/3, -1/3, -1 (x3 each).
    # Nearest ROC point to FAR <= 1e-2 is FPR 0: 6 of 7 genuine score above every impostor.
    # FAR 1e-1 is one impostor (.662) accepted: all 7 genuine are above 1/3.
    expected = {far: 6 / 7 for far in ijb.FARS}
    expected[1e-1] = 1.0
    assert result["tar_at_far"] == pytest.approx(expected, abs=1e-12)
    assert result["auc"] == pytest.approx(0.1 * 6 / 7 + 0.9, abs=1e-12)
    assert (result["num_images"], result["num_templates"], result["num_pairs"]) == (24, 16, 17)

    # Without the detector weights template 12 falls to cos .577, below the .662 impostor.
    unweighted = ijb.evaluate_ijb(mean_colour_net, {}, ijb_root, "IJBC", batch_size=8, use_detector_score=False)
    assert unweighted["tar_at_far"][1e-4] == pytest.approx(5 / 7, abs=1e-12)

    table = report.format_ijb_table([result])
    assert "85.71" in table and "100.00" in table
    png = report.plot_ijb_roc([result], os.path.join(ijb_root, "roc.png"))
    assert os.path.getsize(png) > 1000


def test_ijb_meta_errors(tmp_path):
    root = write_ijb_fixture(str(tmp_path / "ok"))
    with pytest.raises(FileNotFoundError, match=r"meta[/\\]ijbb_face_tid_mid.txt"):
        ijb.read_ijb_meta(root, "IJBB")
    lmk = os.path.join(root, "meta", "ijbc_name_5pts_score.txt")
    lines = open(lmk).read().splitlines()
    with open(lmk, "w") as f:
        f.write("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match="image order differs .* line 1 is '1.png' vs '2.png'"):
        ijb.read_ijb_meta(root, "IJBC")

    root = write_ijb_fixture(str(tmp_path / "badpair"))
    with open(os.path.join(root, "meta", "ijbc_template_pair_label.txt"), "a") as f:
        f.write("1 999 0\n")
    with pytest.raises(ValueError, match="templates absent .* e.g. 999"):
        ijb.read_ijb_meta(root, "IJBC")

    with open(os.path.join(root, "meta", "ijbc_template_pair_label.txt"), "a") as f:
        f.write("1 2\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label.txt: the number of columns changed"):
        ijb.read_ijb_meta(root, "IJBC")

    root = write_ijb_fixture(str(tmp_path / "noimage"))
    os.remove(os.path.join(root, "loose_crop", "5.png"))
    meta = ijb.read_ijb_meta(root, "IJBC")
    with pytest.raises(FileNotFoundError, match=r"loose_crop[/\\]5.png"):
        ijb.load_aligned_faces(meta, range(10))

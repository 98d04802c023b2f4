"""IJB-B / IJB-C 1:1 template verification (insightface ``eval_ijbc.py`` protocol).

Layout of ``root`` (as insightface distributes IJB, target ``IJBB`` or ``IJBC``)::

    root/meta/<t>_face_tid_mid.txt        "<image> <template_id> <media_id>" per line
    root/meta/<t>_template_pair_label.txt "<template_1> <template_2> <0|1>" per line
    root/meta/<t>_name_5pts_score.txt     "<image> x1 y1 ... x5 y5 <detector score>",
                                          same images in the same order
    root/loose_crop/<image>

where ``<t>`` is ``ijbb`` or ``ijbc``. Pipeline:

1. align each loose crop by the similarity transform (Umeyama, least squares)
   that maps its 5 landmarks onto the ArcFace 112x112 template, bilinear;
2. image feature ``f = emb(x) + emb(flip(x))`` (:func:`embed_images`), not
   normalised, times the detector score (optional, on by default as insightface);
3. media feature = mean of the image features of one media inside a template,
   template feature = sum of its media features, L2-normalised;
4. score = cosine of the two template features of each pair;
5. ROC as ``sklearn.metrics.roc_curve`` (``drop_intermediate=True``) and TAR at
   the ROC point whose FPR is nearest to each FAR in 1e-6 ... 1e-1 (ties: the
   point with the highest TPR), as insightface's table.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypedDict

import numpy as np
from PIL import Image

from x2jax.evaluation.verification import embed_images

ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
"""Eye centres, nose tip, mouth corners in a 112x112 aligned face (x, y), pixels."""

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


# ----------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) with dst ~ M @ [src, 1].

    Umeyama (1991), as ``skimage.transform.SimilarityTransform.estimate``:
    ``A = dc^T sc / K``, ``U S V^T = svd(A)``, ``R = U diag(d) V^T`` with d = (1, sign)
    so that det R = +1, ``scale = S.d / var(src)``, ``t = mean(dst) - scale R mean(src)``.
    src, dst: (K, 2). Returns M (2, 3) float64.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two (K>=2, 2) point sets of equal shape, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    sc, dc = src - src_mean, dst - dst_mean
    src_var = sc.var(0).sum()
    if src_var == 0:
        raise ValueError("source landmarks are all the same point")
    cov = dc.T @ sc / src.shape[0]
    u, s, vt = np.linalg.svd(cov)
    d = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0])
    rotation = u @ np.diag(d) @ vt
    scale = (s @ d) / src_var
    translation = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def template_for(image_size: int) -> np.ndarray:
    """The ArcFace landmark template scaled to a square ``image_size`` crop."""
    return ARCFACE_TEMPLATE_112 * (image_size / 112.0)


def align_face(image: np.ndarray | Image.Image, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Warp ``image`` so that its 5 ``landmarks`` (x, y) land on the ArcFace template.

    Bilinear, outside pixels black; same pixel convention as ``cv2.warpAffine``
    (integer coordinates are pixel centres): ``out[y, x] = in(M^-1 (x, y))``.
    Returns uint8 (image_size, image_size, 3) RGB.
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    pil = pil.convert("RGB")
    m = similarity_transform(np.asarray(landmarks, np.float64).reshape(5, 2), template_for(image_size))
    a, t = m[:, :2], m[:, 2]
    a_inv = np.linalg.inv(a)
    t_inv = -a_inv @ t
    # PIL samples at A^-1 (x + .5, y + .5) + c - .5; shift c to sample at A^-1 (x, y) + t_inv.
    c = t_inv - a_inv @ np.array([0.5, 0.5]) + 0.5
    data = (a_inv[0, 0], a_inv[0, 1], c[0], a_inv[1, 0], a_inv[1, 1], c[1])
    out = pil.transform((image_size, image_size), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


# ----------------------------------------------------------------------------
# Meta files
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class IJBMeta:
    """Parsed IJB meta files; row i of the image arrays is line i of both image files."""

    root: str
    target: str  # "IJBB" or "IJBC"
    names: np.ndarray  # (M,) str, paths relative to root/loose_crop
    templates: np.ndarray  # (M,) int64
    medias: np.ndarray  # (M,) int64
    landmarks: np.ndarray  # (M, 5, 2) float32, (x, y) in the loose crop
    detector_scores: np.ndarray  # (M,) float32
    pair_templates: np.ndarray  # (P, 2) int64
    pair_labels: np.ndarray  # (P,) bool, True = same subject


def _meta_path(root: str, target: str, suffix: str) -> str:
    path = os.path.join(root, "meta", f"{target.lower()}_{suffix}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IJB meta file not found: {path} (expected layout root/meta/, root/loose_crop/)")
    return path


def _read_columns(path: str, num_columns: int) -> list[list[str]]:
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != num_columns:
                raise ValueError(f"{path}:{line_number}: expected {num_columns} columns, got {len(fields)}")
            rows.append(fields)
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def _read_pairs(path: str) -> np.ndarray:
    """(P, 3) int64 of the pair file (numpy's C parser: IJB-C has 15.7M lines)."""
    try:
        pairs = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if pairs.shape[0] == 0:
        raise ValueError(f"{path} is empty")
    if pairs.shape[1] != 3:
        raise ValueError(f"{path}: expected 3 columns (template_1 template_2 label), got {pairs.shape[1]}")
    return pairs


def read_ijb_meta(root: str, target: str = "IJBC") -> IJBMeta:
    """Read and cross-check the three meta files of ``target`` under ``root/meta``."""
    target = target.upper()
    if target not in ("IJBB", "IJBC"):
        raise ValueError(f"target must be IJBB or IJBC, got {target!r}")
    tid_mid_path = _meta_path(root, target, "face_tid_mid.txt")
    tid_mid = _read_columns(tid_mid_path, 3)
    lmk_path = _meta_path(root, target, "name_5pts_score.txt")
    lmk = _read_columns(lmk_path, 12)
    pairs_path = _meta_path(root, target, "template_pair_label.txt")
    pairs = _read_pairs(pairs_path)

    names = np.array([r[0] for r in tid_mid])
    if len(lmk) != len(names):
        raise ValueError(f"{lmk_path} has {len(lmk)} images but {tid_mid_path} has {len(names)}")
    lmk_names = np.array([r[0] for r in lmk])
    mismatch = np.flatnonzero(lmk_names != names)
    if mismatch.size:
        i = mismatch[0]
        raise ValueError(
            f"image order differs between {tid_mid_path} and {lmk_path}: line {i + 1} is {str(names[i])!r} vs {str(lmk_names[i])!r}"
        )
    lmk_values = np.array([r[1:] for r in lmk], dtype=np.float32)
    templates = np.array([r[1] for r in tid_mid], dtype=np.int64)
    if not np.isin(pairs[:, 2], (0, 1)).all():
        raise ValueError(f"{pairs_path}: labels must be 0 or 1")
    missing = np.setdiff1d(pairs[:, :2], templates)
    if missing.size:
        raise ValueError(f"{pairs_path} names {missing.size} templates absent from {tid_mid_path}, e.g. {missing[0]}")
    return IJBMeta(
        root=root,
        target=target,
        names=names,
        templates=templates,
        medias=np.array([r[2] for r in tid_mid], dtype=np.int64),
        landmarks=lmk_values[:, :10].reshape(-1, 5, 2),
        detector_scores=lmk_values[:, 10],
        pair_templates=pairs[:, :2],
        pair_labels=pairs[:, 2].astype(bool),
    )


# ----------------------------------------------------------------------------
# Features, templates, scores
# ----------------------------------------------------------------------------


def load_aligned_faces(
    meta: IJBMeta, indices: Sequence[int], *, image_size: int = 112, workers: int = 4
) -> np.ndarray:
    """Aligned uint8 (len(indices), S, S, 3) faces of the given meta rows (threads decode)."""

    def load(i: int) -> np.ndarray:
        path = os.path.join(meta.root, "loose_crop", str(meta.names[i]))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"IJB image not found: {path}")
        with Image.open(path) as img:
            return align_face(img, meta.landmarks[i], image_size)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        return np.stack(list(pool.map(load, indices)))


def image_features(
    apply_fn: Callable[[Any, Any], Any],
    variables: Any,
    meta: IJBMeta,
    *,
    image_size: int = 112,
    batch_size: int = 128,
    chunk_batches: int = 16,
    mesh=None,
    workers: int = 4,
) -> np.ndarray:
    """Flip-summed embeddings (M, E) float32 of every aligned IJB image, streamed in chunks."""
    chunk = batch_size * chunk_batches
    out = []
    for start in range(0, len(meta.names), chunk):
        faces = load_aligned_faces(
            meta, range(start, min(start + chunk, len(meta.names))), image_size=image_size, workers=workers
        )
        out.append(embed_images(apply_fn, variables, faces, batch_size, mesh=mesh))
    return np.concatenate(out)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    return x / norms[:, None]


def template_features(
    features: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    detector_scores: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pool image features into L2-normalised template features.

    ``t = normalize(sum_m mean_{i in (t, m)} s_i f_i)``: mean over the images of a
    media within the template, sum over the template's media; ``s_i`` the detector
    score (1 when ``detector_scores`` is None). features (M, E); templates, medias (M,).
    Returns (unique template ids (T,) sorted, features (T, E) float64).
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or not (features.shape[0] == len(templates) == len(medias)):
        raise ValueError(
            f"features {features.shape}, templates {np.shape(templates)}, medias {np.shape(medias)} disagree"
        )
    if detector_scores is not None:
        features = features * np.asarray(detector_scores, np.float64)[:, None]
    keys = np.stack([np.asarray(templates, np.int64), np.asarray(medias, np.int64)], 1)
    media_keys, media_of_image = np.unique(keys, axis=0, return_inverse=True)
    media_of_image = media_of_image.reshape(-1)
    media_sum = np.zeros((len(media_keys), features.shape[1]))
    np.add.at(media_sum, media_of_image, features)
    media_mean = media_sum / np.bincount(media_of_image, minlength=len(media_keys))[:, None]
    unique_templates, template_of_media = np.unique(media_keys[:, 0], return_inverse=True)
    template_sum = np.zeros((len(unique_templates), features.shape[1]))
    np.add.at(template_sum, template_of_media.reshape(-1), media_mean)
    return unique_templates, _l2_normalize(template_sum)


def pair_scores(
    unique_templates: np.ndarray, template_feats: np.ndarray, pair_templates: np.ndarray, chunk: int = 100_000
) -> np.ndarray:
    """Cosine (dot of normalised features) of each template pair (P, 2) -> (P,) float64."""
    pair_templates = np.asarray(pair_templates, np.int64)
    rows = np.searchsorted(unique_templates, pair_templates)
    rows = np.clip(rows, 0, len(unique_templates) - 1)
    if not np.array_equal(unique_templates[rows], pair_templates):
        bad = pair_templates[unique_templates[rows] != pair_templates][0]
        raise ValueError(f"template {bad} of a pair has no image features")
    scores = np.empty(len(pair_templates))
    for s in range(0, len(pair_templates), chunk):
        a = template_feats[rows[s : s + chunk, 0]]
        b = template_feats[rows[s : s + chunk, 1]]
        scores[s : s + chunk] = np.einsum("ij,ij->i", a, b)
    return scores


# ----------------------------------------------------------------------------
# ROC and TAR@FAR
# ----------------------------------------------------------------------------


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as ``sklearn.metrics.roc_curve(labels, scores)``.

    Scores sorted descending (stable); one point per distinct score; collinear
    intermediate points dropped; a first point (0, 0) at threshold +inf.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal 1-D shapes")
    if labels.all() or not labels.any():
        raise ValueError("ROC needs both positive and negative pairs")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores = scores[order]
    sorted_labels = labels[order].astype(np.float64)
    last_of_score = np.r_[np.flatnonzero(np.diff(sorted_scores)), labels.size - 1]
    tps = np.cumsum(sorted_labels)[last_of_score]
    fps = 1 + last_of_score - tps
    thresholds = sorted_scores[last_of_score]
    if len(fps) > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float] = FARS) -> dict[float, float]:
    """TPR at the ROC point whose FPR is nearest each target FAR (ties: highest TPR)."""
    result = {}
    for far in fars:
        gap = np.abs(fpr - far)
        nearest = np.flatnonzero(gap == gap.min())[-1]  # last in sklearn order = largest TPR
        result[float(far)] = float(tpr[nearest])
    return result


class IJBResult(TypedDict):
    target: str
    tar_at_far: dict[float, float]
    auc: float
    fpr: np.ndarray
    tpr: np.ndarray
    num_images: int
    num_templates: int
    num_pairs: int


def evaluate_scores(labels: np.ndarray, scores: np.ndarray, target: str = "IJB") -> IJBResult:
    """ROC, AUC and TAR@FAR of pair ``scores`` (higher = more similar)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return IJBResult(
        target=target,
        tar_at_far=tar_at_far(fpr, tpr),
        auc=float(np.trapezoid(tpr, fpr)),
        fpr=fpr,
        tpr=tpr,
        num_images=0,
        num_templates=0,
        num_pairs=int(np.size(scores)),
    )


def evaluate_ijb(
    apply_fn: Callable[[Any, Any], Any],
    variables: Any,
    root: str,
    target: str = "IJBC",
    *,
    image_size: int = 112,
    batch_size: int = 128,
    use_detector_score: bool = True,
    mesh=None,
    workers: int = 4,
) -> IJBResult:
    """The whole 1:1 protocol on an IJB directory (see the module docstring)."""
    meta = read_ijb_meta(root, target)
    feats = image_features(
        apply_fn, variables, meta, image_size=image_size, batch_size=batch_size, mesh=mesh, workers=workers
    )
    ids, tfeats = template_features(
        feats, meta.templates, meta.medias, meta.detector_scores if use_detector_score else None
    )
    scores = pair_scores(ids, tfeats, meta.pair_templates)
    result = evaluate_scores(meta.pair_labels, scores, meta.target)
    result.update(num_images=len(meta.names), num_templates=len(ids))
    return result

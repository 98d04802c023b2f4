"""Verification protocol against an independent reference of insightface's loops.

The reference below follows insightface ``eval/verification.py`` line by line
(sklearn KFold, a Python loop over thresholds, ``np.less``); its only change is
the VAL interpolation, done with the degree-1 B-spline that
``interp1d(kind='slinear')`` built before SciPy started rejecting repeated x.
"""

import numpy as np
import pytest
from scipy.interpolate import BSpline
from sklearn.model_selection import KFold

from x2jax.evaluation import verification as ver


# ---------------------------------------------------------------- reference --


def ref_calculate_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    acc = float(tp + tn) / dist.size
    return tpr, fpr, acc


def ref_splits(n, folds):
    if folds == 1:
        idx = np.arange(n)
        return [(idx, idx)]
    return list(KFold(n_splits=folds, shuffle=False).split(np.arange(n)))


def ref_calculate_roc(thresholds, dist, actual_issame, nrof_folds):
    tprs = np.zeros((nrof_folds, len(thresholds)))
    fprs = np.zeros((nrof_folds, len(thresholds)))
    accuracy = np.zeros(nrof_folds)
    best = np.zeros(nrof_folds)
    for fold_idx, (train_set, test_set) in enumerate(ref_splits(len(dist), nrof_folds)):
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = ref_calculate_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        for threshold_idx, threshold in enumerate(thresholds):
            tprs[fold_idx, threshold_idx], fprs[fold_idx, threshold_idx], _ = ref_calculate_accuracy(
                threshold, dist[test_set], actual_issame[test_set]
            )
        _, _, accuracy[fold_idx] = ref_calculate_accuracy(
            thresholds[best_threshold_index], dist[test_set], actual_issame[test_set]
        )
        best[fold_idx] = thresholds[best_threshold_index]
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy, best


def ref_calculate_val_far(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    true_accept = np.sum(np.logical_and(predict_issame, actual_issame))
    false_accept = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    n_same = np.sum(actual_issame)
    n_diff = np.sum(np.logical_not(actual_issame))
    return float(true_accept) / float(n_same), float(false_accept) / float(n_diff)  # may raise ZeroDivisionError


def ref_slinear(x, y):
    """interp1d(x, y, kind='slinear') as SciPy < 1.9 built it (k=1 B-spline, no duplicate check)."""
    ind = np.argsort(x, kind="mergesort")
    x, y = x[ind], y[ind]
    return BSpline.construct_fast(np.r_[x[0], x, x[-1]], y, 1)


def ref_calculate_val(thresholds, dist, actual_issame, far_target, nrof_folds):
    val = np.zeros(nrof_folds)
    far = np.zeros(nrof_folds)
    for fold_idx, (train_set, test_set) in enumerate(ref_splits(len(dist), nrof_folds)):
        far_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, far_train[threshold_idx] = ref_calculate_val_far(threshold, dist[train_set], actual_issame[train_set])
        if np.max(far_train) >= far_target:
            threshold = ref_slinear(far_train, thresholds)(far_target)
        else:
            threshold = 0.0
        val[fold_idx], far[fold_idx] = ref_calculate_val_far(threshold, dist[test_set], actual_issame[test_set])
    return np.mean(val), np.std(val), np.mean(far)


def ref_distances(embeddings):
    from sklearn.preprocessing import normalize

    e = normalize(np.asarray(embeddings, np.float64))
    return np.sum(np.square(np.subtract(e[0::2], e[1::2])), 1)


def assert_matches_reference(result, dist, issame, folds=10, check_val=True):
    tpr, fpr, acc, best = ref_calculate_roc(np.arange(0, 4, 0.01), dist, issame, folds)
    np.testing.assert_allclose(result["fold_accuracies"], acc, atol=1e-9, rtol=0)
    np.testing.assert_allclose(result["accuracy"], np.mean(acc), atol=1e-9, rtol=0)
    np.testing.assert_allclose(result["accuracy_std"], np.std(acc), atol=1e-9, rtol=0)
    np.testing.assert_allclose(result["best_thresholds"], best, atol=1e-9, rtol=0)
    np.testing.assert_allclose(result["tpr"], tpr, atol=1e-9, rtol=0)
    np.testing.assert_allclose(result["fpr"], fpr, atol=1e-9, rtol=0)
    if check_val:
        val, val_std, far = ref_calculate_val(np.arange(0, 4, 0.001), dist, issame, 1e-3, folds)
        np.testing.assert_allclose([result["val"], result["val_std"], result["far"]], [val, val_std, far], atol=1e-9)


# -------------------------------------------------------------------- tests --


@pytest.mark.parametrize("n,folds", [(10, 10), (11, 10), (19, 10), (303, 10), (7, 3), (5, 1), (100, 2)])
def test_kfold_splits_match_sklearn(n, folds):
    ours = ver.kfold_splits(n, folds)
    ref = ref_splits(n, folds)
    assert len(ours) == len(ref)
    for (tr, te), (rtr, rte) in zip(ours, ref):
        np.testing.assert_array_equal(tr, rtr)
        np.testing.assert_array_equal(te, rte)


def test_kfold_rejects_too_few_pairs():
    with pytest.raises(ValueError, match="cannot split 9 pairs into 10 folds"):
        ver.kfold_splits(9, 10)


def test_interp_threshold_matches_bspline_with_duplicates():
    rng = np.random.default_rng(0)
    thresholds = np.arange(0, 4, 0.001)
    for trial in range(30):
        # A non-decreasing FAR curve with long plateaus, like far_train.
        steps = rng.random(thresholds.size) < rng.choice([0.005, 0.05, 0.5])
        far = np.cumsum(steps) / max(1, steps.sum())
        values = np.unique(far)
        targets = [1e-3, values[len(values) // 2], values[-1], (values[0] + values[1]) / 2 if len(values) > 1 else 0]
        for target in targets:
            if target < far[0] or target > far[-1] or len(values) < 2:
                continue
            ours = ver._interp_threshold(far, thresholds, target)
            if target == far[-1] and far[-2] == far[-1]:
                # The old spline evaluates to 0 here (a zero-length knot interval at the
                # right end); we take the first threshold that reaches the largest FAR.
                assert ours == thresholds[np.argmax(far == far[-1])]
                continue
            ref = float(ref_slinear(far, thresholds)(target))
            assert ours == pytest.approx(ref, abs=1e-12), (trial, target)


def test_random_embeddings_match_reference():
    rng = np.random.default_rng(1)
    n, d = 303, 16  # 303 pairs: folds of 31 and 30
    issame = rng.random(n) < 0.5
    base = rng.normal(size=(n, d))
    other = np.where(issame[:, None], base + 0.9 * rng.normal(size=(n, d)), rng.normal(size=(n, d)))
    emb = np.stack([base, other], 1).reshape(2 * n, d) * rng.uniform(0.1, 10, size=(2 * n, 1))
    result = ver.verification_accuracy(emb, issame)
    dist = ref_distances(emb)
    np.testing.assert_allclose(ver.pair_distances(emb), dist, atol=1e-12)
    assert_matches_reference(result, dist, issame)
    assert 0.5 < result["accuracy"] < 1.0  # the case is neither trivial nor hopeless
    assert result["threshold"] == pytest.approx(np.mean(result["best_thresholds"]))


def test_ties_and_distances_exactly_on_thresholds():
    # Every distance equals one of the thresholds (many ties, some at the chosen threshold).
    rng = np.random.default_rng(2)
    n = 250
    thresholds = np.arange(0, 4, 0.01)
    dist = thresholds[rng.choice([0, 50, 100, 101, 150, 200, 399], size=n)]
    issame = dist < 1.5
    flip = rng.random(n) < 0.2
    issame = issame ^ flip
    result = ver.verification_from_distances(dist, issame)
    assert_matches_reference(result, dist, issame)


def test_vals_on_fine_thresholds_exactly():
    rng = np.random.default_rng(3)
    n = 400
    fine = np.arange(0, 4, 0.001)
    dist = fine[rng.integers(0, 4000, size=n)]
    issame = rng.random(n) < dist / 4  # weak signal: VAL interpolation over many FAR plateaus
    result = ver.verification_from_distances(dist, issame)
    assert_matches_reference(result, dist, issame)


def test_orthogonal_identical_opposite_embeddings():
    # Unit vectors: identical (d=0), orthogonal (d=2 exactly) or opposite (d=4, above every threshold).
    n = 60
    kinds = np.arange(n) % 3
    emb = np.zeros((2 * n, 4))
    emb[0::2, 0] = 1.0
    emb[1::2][kinds == 0, 0] = 3.0
    emb[1::2][kinds == 1, 1] = 0.5
    emb[1::2][kinds == 2, 0] = -2.0
    issame = kinds == 0
    issame[::7] = ~issame[::7]
    result = ver.verification_accuracy(emb, issame)
    dist = ref_distances(emb)
    np.testing.assert_array_equal(np.unique(dist), [0.0, 2.0, 4.0])
    assert_matches_reference(result, dist, issame)


def test_all_same_pairs_accuracy_and_nan_val():
    rng = np.random.default_rng(4)
    n = 50
    dist = rng.uniform(0, 3.9, n)
    issame = np.ones(n, bool)
    result = ver.verification_from_distances(dist, issame)
    assert_matches_reference(result, dist, issame, check_val=False)
    with pytest.raises(ZeroDivisionError):  # insightface divides by zero negatives here
        ref_calculate_val(np.arange(0, 4, 0.001), dist, issame, 1e-3, 10)
    assert np.isnan(result["val"]) and np.isnan(result["far"])
    # Each fold picks the first threshold above its largest train distance (first maximum).
    for (train, _), best in zip(ver.kfold_splits(n, 10), result["best_thresholds"]):
        assert best == np.arange(0, 4, 0.01)[np.argmax(np.arange(0, 4, 0.01) > dist[train].max())]
    np.testing.assert_array_equal(result["fpr"], 0.0)


def test_all_different_pairs():
    rng = np.random.default_rng(5)
    n = 50
    dist = rng.uniform(0, 4, n)
    issame = np.zeros(n, bool)
    result = ver.verification_from_distances(dist, issame)
    assert_matches_reference(result, dist, issame, check_val=False)
    assert result["accuracy"] == 1.0  # threshold 0 rejects everything
    np.testing.assert_array_equal(result["best_thresholds"], 0.0)
    assert np.isnan(result["val"])  # no positive pair in any fold
    np.testing.assert_array_equal(result["tpr"], 0.0)


def test_all_distances_equal():
    dist = np.full(40, 1.234)
    issame = np.arange(40) % 4 == 0
    result = ver.verification_from_distances(dist, issame)
    assert_matches_reference(result, dist, issame)
    assert result["accuracy"] == pytest.approx(0.75)  # nothing separates: predict all "different"


def test_perfect_separation_reaches_one():
    dist = np.r_[np.full(50, 0.5), np.full(50, 3.0)]
    issame = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    perm = np.random.default_rng(6).permutation(100)
    result = ver.verification_from_distances(dist[perm], issame[perm])
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    # first maximum: the smallest threshold above 0.5 is 0.51
    np.testing.assert_allclose(result["best_thresholds"], 0.51)
    # FAR jumps from 0 (threshold 3.000) to 1 (3.001) on the train folds; the protocol
    # interpolates 3.000001 for FAR 1e-3, which accepts every negative at 3.0.
    assert result["val"] == 1.0 and result["far"] == 1.0


def test_folds_other_than_ten_match_reference():
    rng = np.random.default_rng(7)
    dist = rng.uniform(0, 4, 37)
    issame = rng.random(37) < 0.5
    for folds in (1, 3):
        assert_matches_reference(ver.verification_from_distances(dist, issame, folds=folds), dist, issame, folds)


def test_bad_inputs_raise_clear_errors():
    emb = np.ones((20, 4))
    with pytest.raises(ValueError, match="pair count mismatch: 20 embeddings need 10 issame labels"):
        ver.verification_accuracy(emb, np.ones(9, bool))
    with pytest.raises(ValueError, match=r"\(2N, D\)"):
        ver.verification_accuracy(np.ones((21, 4)), np.ones(10, bool))
    bad = emb.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        ver.verification_accuracy(bad, np.ones(10, bool))
    with pytest.raises(ValueError, match="boolean"):
        ver.verification_from_distances(np.ones(10), np.full(10, 2))
    with pytest.raises(ValueError, match="cannot split 5 pairs"):
        ver.verification_accuracy(np.ones((10, 4)), np.ones(5, bool))

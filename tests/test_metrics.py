"""AUC against scikit-learn's, the weighted-count bootstrap against explicit resampling, intervals, convergence."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medssl.downstream.convergence import steps_to_target
from medssl.downstream.kinds import accuracy
from medssl.downstream.metrics import auc_report, macro_auc, roc_auc, weighted_auc


def _data(n=300, k=3, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.random((n, k)) < 0.3
    scores = np.round(rng.random((n, k)) + 0.4 * targets, 1)  # rounded: many ties
    return targets, scores


def test_auc_equals_sklearn_with_ties():
    targets, scores = _data()
    for k in range(3):
        assert roc_auc(targets[:, k], scores[:, k]) == pytest.approx(roc_auc_score(targets[:, k], scores[:, k]),
                                                                     abs=1e-12)
    assert roc_auc(np.array([1, 1, 1]), np.array([0.1, 0.5, 0.2])) is None


def test_macro_auc_equals_sklearn_multilabel_and_multiclass():
    targets, scores = _data()
    report = auc_report(targets, scores, ["a", "b", "c"], n_bootstrap=10)
    assert report["auc"] == pytest.approx(roc_auc_score(targets, scores, average="macro"), abs=1e-12)
    assert report["per_label"]["b"] == pytest.approx(roc_auc_score(targets[:, 1], scores[:, 1]), abs=1e-12)
    assert macro_auc(targets, scores) == pytest.approx(report["auc"], abs=1e-12)

    rng = np.random.default_rng(1)
    classes = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + np.eye(4)[classes]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ours = auc_report(np.eye(4)[classes], probs, list("wxyz"), n_bootstrap=10)["auc"]
    assert ours == pytest.approx(roc_auc_score(classes, probs, multi_class="ovr", average="macro"), abs=1e-12)


def test_weighted_auc_equals_auc_of_the_explicit_resample():
    targets, scores = _data(n=80, k=1, seed=2)
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, 80, 80) for _ in range(5)]
    counts = np.stack([np.bincount(p, minlength=80) for p in picks]).astype(float)
    ours = weighted_auc(targets[:, 0], scores[:, 0], counts)
    for value, p in zip(ours, picks):
        assert value == pytest.approx(roc_auc_score(targets[p, 0], scores[p, 0]), abs=1e-12)


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    targets, scores = _data(n=150)
    a = auc_report(targets, scores, ["a", "b", "c"], n_bootstrap=500, seed=7)
    lo, hi = a["auc_ci"]
    assert lo < a["auc"] < hi and hi - lo < 0.2
    for name in "abc":
        plo, phi = a["per_label_ci"][name]
        assert plo < a["per_label"][name] < phi and (phi - plo) > (hi - lo)  # one label is noisier than the mean
    assert auc_report(targets, scores, ["a", "b", "c"], n_bootstrap=500, seed=7)["auc_ci"] == a["auc_ci"]
    assert auc_report(targets, scores, ["a", "b", "c"], n_bootstrap=500, seed=8)["auc_ci"] != a["auc_ci"]
    assert a["bootstrap"] == 500


def test_undefined_label_is_left_out_of_the_macro():
    targets, scores = _data(n=100)
    targets[:, 2] = False  # no positive for label c
    report = auc_report(targets, scores, ["a", "b", "c"], n_bootstrap=20)
    assert report["per_label"]["c"] is None and report["per_label_ci"]["c"] is None
    assert report["auc"] == pytest.approx(roc_auc_score(targets[:, :2], scores[:, :2], average="macro"), abs=1e-12)


def test_accuracy():
    assert accuracy("binary", np.array([[1], [0], [1]]), np.array([[0.9], [0.4], [0.2]])) == pytest.approx(2 / 3)
    assert accuracy("multiclass", np.eye(3),
                    np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0, 0, 1]])) == pytest.approx(2 / 3)
    assert accuracy("multilabel", np.eye(3), np.eye(3)) is None


def test_steps_to_target():
    history = [(10, 0.6), (20, 0.8), (30, 0.7)]
    assert steps_to_target(history, 0.8) == 20
    assert steps_to_target(history, 0.65) == 20
    assert steps_to_target(history, 0.9) is None


@pytest.mark.parametrize("order", [slice(None), slice(None, None, -1), [1, 3, 0, 2, 5, 4]])
def test_non_finite_scores_give_no_auc(order):
    """A diverged model's NaN scores have no ranking: no AUC, whatever the row order (was 0.44, 0.56 or 0)."""
    targets = np.array([[1], [0], [1], [0], [1], [0]])[order]
    nan = np.full((6, 1), np.nan)
    assert roc_auc(targets[:, 0], nan[:, 0]) is None
    assert macro_auc(targets, nan) is None
    report = auc_report(targets, nan, ["a"], n_bootstrap=20)
    assert report["auc"] is None and report["auc_ci"] is None and report["per_label"] == {"a": None}
    assert np.isnan(weighted_auc(targets[:, 0].astype(bool), nan[:, 0], np.ones((3, 6)))).all()
    assert accuracy("binary", targets, nan) is None


def test_one_non_finite_score_leaves_that_label_and_the_macro_undefined():
    targets, scores = _data(n=60, k=2)
    scores[5, 1] = np.inf
    report = auc_report(targets, scores, ["a", "b"], n_bootstrap=20)
    assert report["per_label"]["a"] == pytest.approx(roc_auc_score(targets[:, 0], scores[:, 0]), abs=1e-12)
    assert report["per_label"]["b"] is None and report["auc"] is None and report["auc_ci"] is None
    assert macro_auc(targets, scores) is None

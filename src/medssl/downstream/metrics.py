"""ROC AUC per label and macro, bootstrap 95% intervals, accuracy.

AUC is the Mann-Whitney statistic: the probability that a random positive scores above a random
negative, ties counting one half (Hanley & McNeil 1982) -- what scikit-learn's ``roc_auc_score``
computes. Multi-class AUC is one-vs-rest per class; the macro AUC is the plain mean over the labels
whose AUC is defined (both positives and negatives present).

Non-finite scores (a diverged model) have no AUC: NaN has no rank, and sorting would place it by row
order, so the "AUC" would depend on the order of the rows. A label with any non-finite score has no AUC,
and then neither has the macro (it is not quietly averaged over the other labels); accuracy is None too.

The bootstrap (Efron & Tibshirani 1993, percentile interval) resamples images with replacement.
One resample is a vector of counts per image, so every resample's AUC comes from one sort of the
original scores: ``weighted_auc`` takes the counts as weights.
"""

from __future__ import annotations

import numpy as np


def weighted_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of one label under R weightings of the images: positive (N,) bool, scores (N,), weights (R, N).

    Returns (R,) with NaN where a weighting has no positive or no negative weight, and everywhere if a
    score is not finite.
    """
    if not np.isfinite(scores).all():
        return np.full(len(weights), np.nan)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tie blocks
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)      # (R, levels) positive weight per score level
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg                              # negative weight strictly below each level
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """AUC of one label; None when only one class is present or a score is not finite."""
    positive = np.asarray(positive).astype(bool)
    auc = weighted_auc(positive, np.asarray(scores, dtype=np.float64), np.ones((1, len(positive))))[0]
    return None if np.isnan(auc) else float(auc)


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[~np.isnan(values)]
    return [float(v) for v in np.percentile(values, [2.5, 97.5])] if len(values) else None


def auc_report(targets: np.ndarray, scores: np.ndarray, names: list[str], n_bootstrap: int = 1000,
               seed: int = 0) -> dict:
    """Per-label and macro AUC with bootstrap 95% intervals.

    targets, scores: (N, K); names: K label names. Returns ``auc`` (macro), ``auc_ci``, ``per_label``
    {name: auc or None}, ``per_label_ci`` {name: [lo, hi] or None} and ``bootstrap`` (resamples used
    for the macro interval: those where every label defined on the full set is defined too). With any
    non-finite score the macro AUC and its interval are None.
    """
    targets = np.asarray(targets).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n = len(targets)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(np.float64)
    weights = np.vstack([np.ones((1, n)), counts])  # row 0: the data themselves
    aucs = np.stack([weighted_auc(targets[:, k], scores[:, k], weights) for k in range(targets.shape[1])], axis=1)
    point, resampled = aucs[0], aucs[1:]
    defined = ~np.isnan(point)
    has_macro = defined.any() and np.isfinite(scores).all()
    macro = resampled[:, defined].mean(1) if has_macro else np.full(n_bootstrap, np.nan)
    return {
        "auc": float(point[defined].mean()) if has_macro else None,
        "auc_ci": _interval(macro),
        "per_label": {name: (float(a) if ok else None) for name, a, ok in zip(names, point, defined)},
        "per_label_ci": {name: (_interval(resampled[:, k]) if defined[k] else None) for k, name in enumerate(names)},
        "bootstrap": int(np.sum(~np.isnan(macro))),
    }


def auc_difference_ci(targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, n_bootstrap: int = 1000,
                      seed: int = 0) -> list[float] | None:
    """Bootstrap 95% interval of macro AUC(a) - AUC(b), paired: both scored on the same resamples of the
    same images (a perturbation's effect on one classifier, told apart from the noise of a small test set).
    None with non-finite scores or no label defined."""
    targets = np.asarray(targets).astype(bool)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    n = len(targets)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(np.float64)
    defined = [k for k in range(targets.shape[1]) if 0 < targets[:, k].sum() < n]
    if not defined:
        return None
    diff = np.mean([weighted_auc(targets[:, k], a[:, k], counts) - weighted_auc(targets[:, k], b[:, k], counts)
                    for k in defined], axis=0)
    return _interval(diff)


def macro_auc(targets: np.ndarray, scores: np.ndarray) -> float | None:
    """Mean AUC over the labels where it is defined; None if it is defined for none or a score is not
    finite (no bootstrap)."""
    if not np.isfinite(scores).all():
        return None
    aucs = [roc_auc(targets[:, k], scores[:, k]) for k in range(targets.shape[1])]
    defined = [a for a in aucs if a is not None]
    return float(np.mean(defined)) if defined else None

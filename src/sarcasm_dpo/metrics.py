"""Evaluation metrics for the sarcasm detector: point scores, bootstrap intervals, paired tests.

Labels are 1 = sarcastic, 0 = not sarcastic. Everything returned is plain Python (float / int /
list / None) so results can go straight into json.dump without a custom encoder. Scores must be
probabilities (`probabilities`), and every threshold is applied by `decide`, the one rule for it.

The comparison between models (Base vs SFT vs DPO) is paired: every model answers the same test
items, so the exact McNemar test on the items where they disagree is the right test, not a
comparison of two independent accuracies.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import binom
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

CLASS_NAMES = {1: "sarcastic", 0: "not_sarcastic"}


def _binary(name: str, values) -> np.ndarray:
    """Return `values` as a 1-D int array of 0/1, or raise: a stray 2 or -1 would silently skew F1."""
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0 and 1")
    return arr.astype(int)


def probabilities(name: str, values) -> np.ndarray:
    """Return `values` as a 1-D float64 array of probabilities, or raise ValueError.

    A NaN compares false with every threshold (it would be counted "not sarcastic") and a score
    outside [0, 1] (a logit, a percentage) lands on one side of every cut: either way the metrics
    would come out as numbers that measure nothing, so they are refused here, for every metric.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} must be finite probabilities; {int(bad.sum())} of {arr.size} are NaN or infinite")
    outside = (arr < 0) | (arr > 1)
    if outside.any():
        raise ValueError(f"{name} must be probabilities in [0, 1]; {int(outside.sum())} of {arr.size} are outside "
                         f"it (e.g. {float(arr[outside][0])!r})")
    return arr


def fmt(value, spec: str = ".3f", width: int = 0) -> str:
    """A metric for a printed line: `format(value, spec)`, or "n/a" where it is undefined (None: ROC-AUC or
    macro-F1 of a one-class set, a KL not measured), right-aligned to `width`."""
    return f"{'n/a' if value is None else format(value, spec):>{width}}"


def decide(probs, threshold: float) -> np.ndarray:
    """The labels at `threshold`: 1 (sarcastic) iff P(sarcastic) >= threshold, as a 0/1 int array.

    The one place a threshold is applied. Both sides are compared as float64: under numpy 2 a
    float32 array compared with a Python float is compared in float32, which rounds the threshold
    (a cut chosen between two float32 scores can round onto one of them and flip its label).
    """
    return (np.asarray(probs, dtype=np.float64) >= np.float64(threshold)).astype(int)


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"length mismatch: {lengths}")


def classification_metrics(labels, probs, threshold: float = 0.5) -> dict:
    """Score P(sarcastic) `probs` against gold `labels`; an item is predicted sarcastic iff prob >= threshold
    (`decide`). `probs` must be finite and in [0, 1] (`probabilities`, ValueError otherwise). "roc_auc" and
    "macro_f1" are None when `labels` hold one class only: both are undefined there."""
    y = _binary("labels", labels)
    p = probabilities("probs", probs)
    _same_length(labels=y, probs=p)
    pred = decide(p, threshold)

    # labels=[0, 1] pins the class order, so a batch where one class never occurs still yields
    # a 2x2 matrix and two per-class rows instead of silently shrinking.
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    cm = confusion_matrix(y, pred, labels=[0, 1])
    # ROC AUC is undefined with one class present; None is honest where 0.5 or NaN would mislead.
    # Macro-F1 likewise: the absent class's F1 is 0/0, and averaging it in as 0 would show a perfect
    # model as 0.500.
    both = len(np.unique(y)) == 2
    auc = float(roc_auc_score(y, p)) if both else None
    macro_f1 = float(f1_score(y, pred, labels=[0, 1], average="macro", zero_division=0)) if both else None

    per_class = {
        CLASS_NAMES[c]: {
            "precision": float(prec[c]),
            "recall": float(rec[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
        }
        for c in (1, 0)
    }
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(prec[1]),  # positive class = sarcastic
        "recall": float(rec[1]),
        "f1": float(f1[1]),
        "macro_f1": macro_f1,  # None when one class is absent from `labels` (see above)
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),  # [[tn, fp], [fn, tp]]
        "roc_auc": auc,
        "threshold": float(threshold),
    }


def bootstrap_ci(
    labels,
    preds,
    metric: str = "accuracy",
    n_resamples: int = 1000,
    seed: int = 42,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval for accuracy or (sarcastic-class) F1, resampling items.

    Both metrics depend only on the counts (tp, fp, fn, tn). Drawing n items with replacement and
    counting their outcome categories is exactly a multinomial draw with the observed category
    proportions, so we sample the counts directly: same distribution as resampling item indices,
    but O(n_resamples) memory and time instead of O(n_resamples * n).
    """
    if metric not in ("accuracy", "f1"):
        raise ValueError(f"metric must be 'accuracy' or 'f1', got {metric!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y = _binary("labels", labels)
    pred = _binary("preds", preds)
    _same_length(labels=y, preds=pred)

    n = len(y)
    counts = np.array([
        np.sum((y == 1) & (pred == 1)),  # tp
        np.sum((y == 0) & (pred == 1)),  # fp
        np.sum((y == 1) & (pred == 0)),  # fn
        np.sum((y == 0) & (pred == 0)),  # tn
    ])
    rng = np.random.default_rng(seed)
    tp, fp, fn, tn = rng.multinomial(n, counts / n, size=n_resamples).T

    if metric == "accuracy":
        stats = (tp + tn) / n
    else:
        # F1 = 2tp / (2tp + fp + fn); a resample with no positives at all scores 0 (zero_division=0).
        denom = 2 * tp + fp + fn
        stats = np.divide(2 * tp, denom, out=np.zeros(n_resamples), where=denom > 0)

    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def with_intervals(labels, probs, threshold: float = 0.5, n_resamples: int = 1000, seed: int = 42) -> dict:
    """classification_metrics plus 95% bootstrap intervals for accuracy and F1, as [low, high] lists."""
    out = classification_metrics(labels, probs, threshold)  # checks the probabilities
    pred = decide(probs, threshold)
    for metric in ("accuracy", "f1"):
        out[f"{metric}_ci"] = list(bootstrap_ci(labels, pred, metric, n_resamples=n_resamples, seed=seed))
    return out


def mcnemar_exact(labels, preds_a, preds_b) -> dict:
    """Exact McNemar test: are A and B equally accurate on the same items?

    Items both models get right (or both wrong) say nothing about which is better; only the
    discordant ones do. Under H0 each discordant item is a fair coin flip between "A right" and
    "B right", so the two-sided p-value is 2 * P(Binomial(b + c, 1/2) <= min(b, c)), capped at 1.
    The exact form is used because b + c is often small, where the chi-square approximation is poor.
    """
    y = _binary("labels", labels)
    a = _binary("preds_a", preds_a)
    b_pred = _binary("preds_b", preds_b)
    _same_length(labels=y, preds_a=a, preds_b=b_pred)

    a_right, b_right = a == y, b_pred == y
    b = int(np.sum(a_right & ~b_right))
    c = int(np.sum(~a_right & b_right))
    n_disc = b + c
    p = 1.0 if n_disc == 0 else float(min(1.0, 2 * binom.cdf(min(b, c), n_disc, 0.5)))
    return {"a_right_b_wrong": b, "a_wrong_b_right": c, "n_discordant": n_disc, "p_value": p}


def significance_verdict(name_a: str, name_b: str, acc_a: float, acc_b: float, p_value: float, alpha: float = 0.05) -> str:
    """One plain sentence on whether newer model `name_a` differs from `name_b` (e.g. from mcnemar_exact)."""
    p = f"p={p_value:.2g}"
    if p_value < alpha and acc_a > acc_b:
        return f"{name_a} beats {name_b} at p<{alpha:g} ({p})"
    if p_value < alpha and acc_a < acc_b:
        return f"{name_a} is worse than {name_b} at p<{alpha:g} ({p})"
    # Also reached when p < alpha but accuracies tie: no direction to report, so no claim.
    return f"no significant difference between {name_a} and {name_b} ({p})"


def improvement_pp(
    metrics_new: dict,
    metrics_old: dict,
    keys: Sequence[str] = ("accuracy", "precision", "recall", "f1", "macro_f1"),
) -> dict:
    """Change from old to new in percentage points, e.g. accuracy 0.70 -> 0.75 gives +5.0."""
    out = {}
    for k in keys:
        new, old = metrics_new[k], metrics_old[k]
        # A metric that is undefined on either side (roc_auc=None) has no difference either.
        out[k] = None if new is None or old is None else round(100 * (new - old), 2)
    return out

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from sarcasm_dpo.metrics import (
    bootstrap_ci,
    classification_metrics,
    improvement_pp,
    mcnemar_exact,
    significance_verdict,
    with_intervals,
)

# Hand-worked example used below.
# labels [1, 1, 0, 0, 1], probs [0.9, 0.4, 0.6, 0.2, 0.7], threshold 0.5 -> preds [1, 0, 1, 0, 1]
# item 0: 1/1 tp, item 1: 1/0 fn, item 2: 0/1 fp, item 3: 0/0 tn, item 4: 1/1 tp
# -> tp=2, fp=1, fn=1, tn=1
LABELS = [1, 1, 0, 0, 1]
PROBS = [0.9, 0.4, 0.6, 0.2, 0.7]


def random_example(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    # Informative but noisy scores: positives drift up, so AUC is well inside (0.5, 1).
    probs = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.25, n), 0, 1)
    return labels, probs


def assert_plain_json(obj):
    """Only builtin types: np.float64 passes json.dumps (float subclass) but np.int64 does not."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert type(k) is str
            assert_plain_json(v)
    elif isinstance(obj, list):
        for v in obj:
            assert_plain_json(v)
    else:
        assert obj is None or type(obj) in (int, float, str, bool), (obj, type(obj))


def test_hand_worked_metrics():
    m = classification_metrics(LABELS, PROBS)
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)  # tp + tn = 3 of 5
    assert m["precision"] == pytest.approx(2 / 3)  # tp / (tp + fp) = 2 / 3
    assert m["recall"] == pytest.approx(2 / 3)  # tp / (tp + fn) = 2 / 3
    assert m["f1"] == pytest.approx(2 / 3)  # 2tp / (2tp + fp + fn) = 4 / 6
    # not_sarcastic as positive: precision tn/(tn+fn) = 1/2, recall tn/(tn+fp) = 1/2, f1 1/2
    ns = m["per_class"]["not_sarcastic"]
    assert ns["precision"] == pytest.approx(1 / 2)
    assert ns["recall"] == pytest.approx(1 / 2)
    assert ns["f1"] == pytest.approx(1 / 2)
    assert ns["support"] == 2
    s = m["per_class"]["sarcastic"]
    assert s == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # = 7/12
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]  # [[tn, fp], [fn, tp]]
    # AUC = fraction of (pos, neg) pairs ranked correctly. pos {0.9, 0.4, 0.7}, neg {0.6, 0.2}:
    # 0.9 beats both, 0.7 beats both, 0.4 beats only 0.2 -> 5 of 6 pairs.
    assert m["roc_auc"] == pytest.approx(5 / 6)
    assert m["threshold"] == 0.5


def test_threshold_moves_predictions():
    # threshold 0.65 -> preds [1, 0, 0, 0, 1]: tp=2, fp=0, fn=1, tn=2
    m = classification_metrics(LABELS, PROBS, threshold=0.65)
    assert m["confusion_matrix"] == [[2, 0], [1, 2]]
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["threshold"] == 0.65
    # prob == threshold counts as sarcastic (>=)
    assert classification_metrics([1], [0.5], threshold=0.5)["confusion_matrix"] == [[0, 0], [0, 1]]


def test_zero_division_is_zero():
    # Never predicting sarcastic: tp=fp=0, so precision is 0/0 -> 0 by convention, recall 0/2 = 0.
    m = classification_metrics([1, 1, 0], [0.1, 0.2, 0.3])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["accuracy"] == pytest.approx(1 / 3)


def test_agrees_with_sklearn():
    labels, probs = random_example(200, seed=0)
    preds = (probs >= 0.5).astype(int)
    m = classification_metrics(labels, probs)
    prec, rec, f1, sup = precision_recall_fscore_support(labels, preds, labels=[0, 1], zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert m["precision"] == pytest.approx(prec[1])
    assert m["recall"] == pytest.approx(rec[1])
    assert m["f1"] == pytest.approx(f1[1])
    assert m["f1"] == pytest.approx(f1_score(labels, preds))
    assert m["per_class"]["not_sarcastic"]["f1"] == pytest.approx(f1[0])
    assert m["per_class"]["sarcastic"]["support"] + m["per_class"]["not_sarcastic"]["support"] == 200
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert m["confusion_matrix"] == confusion_matrix(labels, preds).tolist()
    assert 0.5 < m["roc_auc"] < 1.0  # the example is informative, so the check above is not trivial


def test_single_class_roc_auc_is_none():
    m = classification_metrics([1, 1, 1], [0.9, 0.2, 0.6])
    assert m["roc_auc"] is None
    assert m["confusion_matrix"] == [[0, 0], [1, 2]]  # still 2x2 with one class absent
    assert m["per_class"]["not_sarcastic"]["support"] == 0
    json.dumps(m)


def test_results_are_plain_json():
    labels, probs = random_example(50, seed=3)
    out = with_intervals(labels, probs, n_resamples=200)
    assert_plain_json(out)
    assert json.loads(json.dumps(out)) == out
    assert_plain_json(mcnemar_exact(labels, labels, 1 - labels))


def test_with_intervals():
    labels, probs = random_example(200, seed=1)
    out = with_intervals(labels, probs, seed=7)
    base = classification_metrics(labels, probs)
    assert {k: out[k] for k in base} == base
    preds = (probs >= 0.5).astype(int)
    assert out["accuracy_ci"] == list(bootstrap_ci(labels, preds, "accuracy", seed=7))
    assert out["f1_ci"] == list(bootstrap_ci(labels, preds, "f1", seed=7))
    assert out["accuracy_ci"][0] <= out["accuracy"] <= out["accuracy_ci"][1]
    assert out["f1_ci"][0] <= out["f1"] <= out["f1_ci"][1]


def test_bootstrap_deterministic_per_seed():
    labels, probs = random_example(200, seed=2)
    preds = (probs >= 0.5).astype(int)
    for metric in ("accuracy", "f1"):
        a = bootstrap_ci(labels, preds, metric, seed=123)
        assert a == bootstrap_ci(labels, preds, metric, seed=123)
        assert a != bootstrap_ci(labels, preds, metric, seed=124)
        assert all(type(x) is float for x in a)


def test_bootstrap_contains_point_estimate():
    labels, probs = random_example(200, seed=4)
    m = classification_metrics(labels, probs)
    preds = (probs >= 0.5).astype(int)
    lo, hi = bootstrap_ci(labels, preds, "accuracy")
    assert lo < m["accuracy"] < hi
    lo, hi = bootstrap_ci(labels, preds, "f1")
    assert lo < m["f1"] < hi


def test_bootstrap_narrower_with_more_items():
    labels, probs = random_example(100, seed=5)
    preds = (probs >= 0.5).astype(int)
    # Same proportions, 10x the items: the interval should shrink (roughly by sqrt(10)).
    for metric in ("accuracy", "f1"):
        lo, hi = bootstrap_ci(labels, preds, metric)
        lo10, hi10 = bootstrap_ci(np.tile(labels, 10), np.tile(preds, 10), metric)
        assert hi10 - lo10 < 0.5 * (hi - lo)


def test_bootstrap_all_correct():
    labels = [1, 0, 1, 1, 0, 0, 1]
    assert bootstrap_ci(labels, labels, "accuracy") == (1.0, 1.0)
    assert bootstrap_ci(labels, labels, "f1") == (1.0, 1.0)


def test_bootstrap_matches_index_resampling():
    # The count-based bootstrap claims to equal resampling item indices; check against the naive way.
    labels, probs = random_example(200, seed=6)
    preds = (probs >= 0.5).astype(int)
    idx = np.random.default_rng(99).integers(0, 200, size=(4000, 200))
    y, p = labels[idx], preds[idx]
    acc = (y == p).mean(axis=1)
    tp = ((y == 1) & (p == 1)).sum(1)
    f1 = 2 * tp / (2 * tp + ((y == 0) & (p == 1)).sum(1) + ((y == 1) & (p == 0)).sum(1))
    for metric, naive in (("accuracy", acc), ("f1", f1)):
        lo, hi = bootstrap_ci(labels, preds, metric, n_resamples=4000)
        assert lo == pytest.approx(np.percentile(naive, 2.5), abs=0.015)
        assert hi == pytest.approx(np.percentile(naive, 97.5), abs=0.015)


def test_bootstrap_confidence_level():
    labels, probs = random_example(200, seed=8)
    preds = (probs >= 0.5).astype(int)
    lo90, hi90 = bootstrap_ci(labels, preds, confidence=0.90)
    lo99, hi99 = bootstrap_ci(labels, preds, confidence=0.99)
    assert lo99 <= lo90 and hi90 <= hi99
    with pytest.raises(ValueError):
        bootstrap_ci(labels, preds, metric="auc")


def test_mcnemar_hand_worked():
    # 10 items, all label 1.
    # item 0:    A right, B wrong            -> b = 1
    # items 1-6: A wrong, B right            -> c = 6
    # items 7-8: both right, item 9: both wrong (concordant, ignored)
    labels = [1] * 10
    a = [1, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    r = mcnemar_exact(labels, a, b)
    # p = 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128 = 0.125
    assert r == {"a_right_b_wrong": 1, "a_wrong_b_right": 6, "n_discordant": 7, "p_value": pytest.approx(0.125)}
    # symmetric in which model is better
    assert mcnemar_exact(labels, b, a)["p_value"] == pytest.approx(0.125)


def test_mcnemar_more_cases():
    # b=0, c=5: p = 2 * (1/2)^5 = 0.0625
    assert mcnemar_exact([0] * 5, [1] * 5, [0] * 5)["p_value"] == pytest.approx(0.0625)
    # b=c=3: 2 * P(X <= 3), X ~ Bin(6, 1/2) = 2 * 42/64 > 1 -> capped at 1
    r = mcnemar_exact([1] * 6, [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1])
    assert (r["a_right_b_wrong"], r["a_wrong_b_right"], r["p_value"]) == (3, 3, 1.0)


def test_mcnemar_no_discordant_pairs():
    # Identical predictions: b = c = 0, nothing to test -> p = 1.0
    r = mcnemar_exact([1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0])
    assert r == {"a_right_b_wrong": 0, "a_wrong_b_right": 0, "n_discordant": 0, "p_value": 1.0}


def test_input_validation():
    with pytest.raises(ValueError):
        mcnemar_exact([1, 0, 1], [1, 0], [1, 0, 1])
    with pytest.raises(ValueError):
        classification_metrics([1, 0], [0.5])
    with pytest.raises(ValueError):
        classification_metrics([1, 2], [0.5, 0.5])  # labels must be 0/1
    with pytest.raises(ValueError):
        classification_metrics([], [])


def test_significance_verdicts():
    assert significance_verdict("DPO", "SFT", 0.80, 0.70, 0.012) == "DPO beats SFT at p<0.05 (p=0.012)"
    assert significance_verdict("SFT", "Base", 0.60, 0.70, 0.003) == "SFT is worse than Base at p<0.05 (p=0.003)"
    assert significance_verdict("DPO", "SFT", 0.72, 0.71, 0.41) == "no significant difference between DPO and SFT (p=0.41)"
    # a large accuracy gap without significance is still no claim
    assert significance_verdict("DPO", "SFT", 0.9, 0.5, 0.2).startswith("no significant difference")
    assert significance_verdict("DPO", "SFT", 0.8, 0.7, 0.02, alpha=0.01).startswith("no significant difference")


def test_improvement_pp():
    new = {"accuracy": 0.75, "precision": 0.80, "recall": 1 / 3, "f1": 0.5, "macro_f1": 0.6, "roc_auc": None}
    old = {"accuracy": 0.70, "precision": 0.85, "recall": 0.0, "f1": 0.5, "macro_f1": 0.55, "roc_auc": 0.7}
    d = improvement_pp(new, old)
    # 100 * (0.75 - 0.70) = 5.0; 100 * (0.80 - 0.85) = -5.0; 100 * (1/3 - 0) = 33.33
    assert d == {"accuracy": 5.0, "precision": -5.0, "recall": 33.33, "f1": 0.0, "macro_f1": 5.0}
    assert improvement_pp(new, old, keys=("roc_auc",)) == {"roc_auc": None}


@pytest.mark.parametrize("probs, words", [
    ([1.5, -0.2], "in \\[0, 1\\]; 2 of 2 are outside it"),
    ([0.3, float("nan")], "finite probabilities; 1 of 2 are NaN or infinite"),
    ([float("inf"), 0.2], "finite probabilities"),
])
def test_scores_that_are_not_probabilities_are_refused(probs, words):
    """A NaN is labelled "not sarcastic" at every threshold and 1.5 "sarcastic": metrics of such scores measure
    nothing, so every function that takes P(sarcastic) refuses them (1.5 and -0.2 used to score accuracy 1.0)."""
    from sarcasm_dpo.thresholds import choose_threshold, metrics_at, threshold_interval

    for call in (lambda: classification_metrics([1, 0], probs), lambda: with_intervals([1, 0], probs),
                 lambda: metrics_at([1, 0], probs, 0.5), lambda: choose_threshold([1, 0], probs),
                 lambda: threshold_interval([1, 0], probs)):
        with pytest.raises(ValueError, match=words):
            call()


def test_macro_f1_is_none_when_a_class_is_absent():
    """The absent class's F1 is 0/0: averaged in as 0 it showed a perfect one-class model as 0.500."""
    m = classification_metrics([1, 1, 1], [0.9, 0.8, 0.7])
    assert m["accuracy"] == 1.0 and m["f1"] == 1.0 and m["macro_f1"] is None
    assert classification_metrics([0, 0], [0.1, 0.2])["macro_f1"] is None
    assert improvement_pp(m, m)["macro_f1"] is None

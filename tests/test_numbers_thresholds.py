"""Thresholds: the value reported is the value achieved, one rule applies every cut, and one rule saves it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from sarcasm_dpo.metrics import classification_metrics, with_intervals
from sarcasm_dpo.thresholds import (choose_threshold, metrics_at, selection_score, threshold_interval,
                                    threshold_record_from_validation)


def doubles_whose_midpoint_rounds_down() -> tuple[float, float]:
    """Two adjacent doubles whose midpoint (a + b) / 2 rounds to the lower one (round half to even)."""
    low = 0.3
    while True:
        high = float(np.nextafter(low, 1.0))
        if (low + high) / 2 == low:
            return low, high
        low = high


def float32_neighbours_whose_midpoint_rounds_down() -> tuple[np.float32, np.float32, float]:
    """(low, high, cut): adjacent float32 scores and the float64 midpoint between them, which float32 rounds to low."""
    low = np.float32(0.3)
    while True:
        high = np.nextafter(low, np.float32(1.0))
        cut = (float(low) + float(high)) / 2
        if np.float32(cut) == low:
            return low, high, cut
        low = high


def test_a_cut_between_adjacent_doubles_lies_strictly_above_the_lower_one():
    low, high = doubles_whose_midpoint_rounds_down()
    choice = choose_threshold([0, 1], [low, high])
    assert low < choice["threshold"] <= high
    # The value reported is the value the cut achieves: the lower score is not sarcastic at it.
    assert choice["value"] == 1.0
    assert metrics_at([0, 1], [low, high], choice["threshold"])["balanced_accuracy"] == 1.0
    record = threshold_record_from_validation([0, 1] * 20, [low, high] * 20)
    assert record["val_metrics_at_threshold"]["balanced_accuracy"] == record["criterion_value"]


def test_every_place_that_applies_a_threshold_compares_in_float64():
    from sarcasm_dpo.metrics import decide

    low, high, cut = float32_neighbours_whose_midpoint_rounds_down()
    p32 = np.array([low, high], dtype=np.float32)
    assert (p32 >= cut).tolist() == [True, True]  # what numpy 2 does in float32: the reason for metrics.decide
    assert decide(p32, cut).tolist() == [0, 1]
    assert choose_threshold([0, 1], p32)["threshold"] == cut
    assert classification_metrics([0, 1], p32, cut)["confusion_matrix"] == [[1, 0], [0, 1]]
    assert with_intervals([0, 1], p32, cut, n_resamples=10)["accuracy"] == 1.0


def test_compare_decides_mcnemar_pairs_with_the_same_rule(monkeypatch):
    """compare.evaluate's McNemar inputs come from metrics.decide, like its metrics: the same labels."""
    from types import SimpleNamespace

    import pandas as pd

    from sarcasm_dpo.stages import compare

    low, high, cut = float32_neighbours_whose_midpoint_rounds_down()
    seen = []
    real = compare.metrics.mcnemar_exact
    monkeypatch.setattr(compare.metrics, "mcnemar_exact", lambda y, a, b: seen.append((list(a), list(b))) or real(y, a, b))
    frame = pd.DataFrame({"label": [0, 1]})
    probs = {"sft": np.array([low, high], dtype=np.float32), "base": np.array([0.2, 0.9])}
    block = compare.evaluate(frame, probs, SimpleNamespace(n_bootstrap=10, seed=1), {"sft": cut})
    assert seen == [([0, 1], [0, 1])]
    assert block["models"]["sft"]["accuracy"] == 1.0


def test_threshold_interval_checks_lengths_like_the_others():
    with pytest.raises(ValueError, match="length mismatch"):
        threshold_interval([0, 1, 0], [0.2, 0.8])
    with pytest.raises(ValueError, match="finite"):
        threshold_interval([0, 1], [0.2, float("nan")])


@pytest.mark.parametrize("labels, probs", [([0, 0, 0], [0.7, 0.2, 0.9]), ([1, 1], [0.7, 0.2]), ([0, 1, 1], [0.6, 0.4, 0.9])])
def test_balanced_accuracy_averages_the_classes_present(labels, probs):
    pred = (np.asarray(probs) >= 0.5).astype(int)
    expected = balanced_accuracy_score(labels, pred) if len(set(labels)) == 2 else \
        float(np.mean(np.asarray(labels) == pred))  # the one class's recall
    assert metrics_at(labels, probs, 0.5)["balanced_accuracy"] == pytest.approx(expected)
    if labels == [0, 0, 0]:
        assert metrics_at(labels, probs, 0.5)["balanced_accuracy"] == pytest.approx(1 / 3)


def _weak_centred():
    """Validation scores whose best cut (away from 0.5) is not told apart from 0.5 by its bootstrap interval."""
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 150)
    return labels, np.clip(rng.normal(0.45 + 0.1 * labels, 0.2), 0, 1)


def test_a_checkpoint_is_ranked_by_the_balanced_accuracy_its_saved_threshold_gives():
    labels, probs = _weak_centred()
    record = threshold_record_from_validation(labels, probs)
    assert record["threshold"] == 0.5 and record["best_cut"] != 0.5  # the saved model labels at 0.5
    achieved = record["val_metrics_at_threshold"]["balanced_accuracy"]
    assert record["best_cut_value"] > achieved  # the in-sample best cut's score, which the saved model does not get
    score = selection_score(labels, probs, classification_metrics(labels, probs), "balanced_accuracy")
    assert score == pytest.approx(achieved, abs=1e-12) and record["criterion_value"] == pytest.approx(achieved, abs=1e-12)
    # Where validation does pin the cut down, the score is the cut's, as before.
    labels = [0] * 30 + [1] * 30
    leaning = [0.7 + 0.001 * i for i in range(30)] + [0.9 + 0.001 * i for i in range(30)]
    record = threshold_record_from_validation(labels, leaning)
    assert record["threshold"] == record["best_cut"] != 0.5
    assert selection_score(labels, leaning, classification_metrics(labels, leaning), "balanced_accuracy") == 1.0


def test_the_validation_callback_ranks_by_what_its_threshold_record_saves(monkeypatch):
    """The score a checkpoint is kept for is the balanced accuracy of the saved model at its saved threshold."""
    import pandas as pd

    import sarcasm_dpo.training.callbacks as callbacks

    labels, probs = _weak_centred()
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(len(labels))], "label": labels})

    class FakeScorer:
        def __init__(self, *args, **kwargs):
            pass

        def predict_proba(self, texts):
            return probs if len(texts) == len(labels) else np.full(len(texts), 0.5)

    monkeypatch.setattr(callbacks, "Scorer", FakeScorer)
    monkeypatch.setattr(callbacks, "adapter_state", lambda model: {})
    cb = callbacks.ValidationCallback(None, {"gen_val": frame}, select_by="balanced_accuracy", printer=lambda s: None)
    cb.evaluate(None, 1, 1.0)
    saved = cb.threshold_record(None)
    assert cb.history[0]["selection_score"] == pytest.approx(saved["val_metrics_at_threshold"]["balanced_accuracy"],
                                                             abs=1e-12)
    assert cb.best_score == pytest.approx(saved["criterion_value"], abs=1e-12)


def test_the_first_evaluation_is_kept_when_no_score_can_be_computed(monkeypatch):
    """Every validation score equal: balanced accuracy at the saved threshold is undefined (-inf ranks last), yet the
    first evaluation (DPO's SFT start) is the one kept, not none at all (SFT used to fail after training, DPO to
    save its last weights while saying it kept the SFT start)."""
    import pandas as pd

    import sarcasm_dpo.training.callbacks as callbacks

    frame = pd.DataFrame({"text": [f"t{i}" for i in range(8)], "label": [0, 1] * 4})

    class FlatScorer:
        def __init__(self, *args, **kwargs):
            pass

        def predict_proba(self, texts):
            return np.full(len(texts), 0.5)

    states = iter([{"w": 0}, {"w": 1}, {"w": 2}])
    monkeypatch.setattr(callbacks, "Scorer", FlatScorer)
    monkeypatch.setattr(callbacks, "adapter_state", lambda model: next(states))
    cb = callbacks.ValidationCallback(None, {"gen_val": frame}, select_by="balanced_accuracy", printer=lambda s: None)
    for step in (0, 4, 8):
        cb.evaluate(None, step, step / 4)
    assert cb.best_step == 0 and cb.best_state == {"w": 0}
    assert [r["is_best"] for r in cb.history] == [True, False, False]
    assert all(r["selection_score"] is None for r in cb.history)

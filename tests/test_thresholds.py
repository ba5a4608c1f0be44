"""Thresholds chosen on validation (thresholds.py): the cut, its ties, degenerate inputs, the record, calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from sarcasm_dpo.errors import UserError
from sarcasm_dpo.thresholds import (THRESHOLD_FILE, choose_threshold, contextual_threshold, read_threshold,
                                    threshold_interval, threshold_record_from_validation, write_threshold)


def brute_force(labels, probs, criterion):
    """Every midpoint between adjacent distinct scores, scored with scikit-learn."""
    u = np.unique(probs)
    score = {"balanced_accuracy": balanced_accuracy_score,
             "macro_f1": lambda y, p: f1_score(y, p, average="macro", zero_division=0),
             "accuracy": lambda y, p: float(np.mean(np.asarray(y) == p))}[criterion]
    return {float(t): score(labels, (np.asarray(probs) >= t).astype(int)) for t in (u[:-1] + u[1:]) / 2}


def test_a_shifted_model_gets_the_threshold_that_separates_it():
    # Every score sits above 0.5, so 0.5 calls everything sarcastic; the classes split between 0.7 and 0.8.
    labels = [0, 0, 0, 1, 1, 1]
    probs = [0.55, 0.6, 0.7, 0.8, 0.85, 0.9]
    choice = choose_threshold(labels, probs)
    assert choice == {"threshold": pytest.approx(0.75), "criterion": "balanced_accuracy", "value": 1.0, "reason": None}


@pytest.mark.parametrize("criterion", ["balanced_accuracy", "macro_f1", "accuracy"])
def test_the_choice_is_the_best_midpoint_by_brute_force(criterion):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.round(np.clip(0.3 * labels + rng.normal(0.4, 0.2, 300), 0, 1), 2)  # rounded: many tied scores
    choice = choose_threshold(labels, probs, criterion)
    table = brute_force(labels, probs, criterion)
    best = max(table.values())
    assert choice["value"] == pytest.approx(best, abs=1e-12)
    nearest = min(table, key=lambda t: abs(t - choice["threshold"]))
    assert abs(nearest - choice["threshold"]) < 1e-12  # a midpoint, never a validation score
    ties = [t for t, v in table.items() if abs(v - best) < 1e-12]
    assert abs(choice["threshold"] - 0.5) == pytest.approx(min(abs(t - 0.5) for t in ties), abs=1e-12)


def test_ties_resolve_to_the_cut_nearest_one_half_then_the_lower():
    # Perfectly separated with a wide gap: every cut in it is perfect; the one nearest 0.5 wins.
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["threshold"] == pytest.approx(0.5)
    # Two perfect cuts at equal distance from 0.5 would be a coin flip: the lower one is taken, every time.
    labels, probs = [0, 1, 0, 1], [0.3, 0.45, 0.55, 0.7]
    table = brute_force(labels, probs, "balanced_accuracy")
    cuts = sorted(table)
    assert cuts == pytest.approx([0.375, 0.5, 0.625]) and [table[t] for t in cuts] == [0.75, 0.5, 0.75]
    choice = choose_threshold(labels, probs)
    assert choice["threshold"] == pytest.approx(0.375) and choice["value"] == 0.75
    assert choose_threshold(labels, probs) == choice  # deterministic


@pytest.mark.parametrize("labels,probs,why", [
    ([1, 1, 1], [0.2, 0.4, 0.9], "only sarcastic"),
    ([0, 0], [0.2, 0.4], "only not sarcastic"),
    ([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3], "every validation score is the same"),
])
def test_degenerate_validation_keeps_one_half_and_says_why(labels, probs, why):
    choice = choose_threshold(labels, probs)
    assert choice["threshold"] == 0.5 and choice["value"] is None and why in choice["reason"]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="length mismatch"):
        choose_threshold([0, 1], [0.5])
    with pytest.raises(ValueError, match="only 0 and 1"):
        choose_threshold([0, 2], [0.5, 0.6])
    with pytest.raises(ValueError, match="finite"):
        choose_threshold([0, 1], [0.5, float("nan")])
    with pytest.raises(UserError, match="Unknown threshold criterion 'f1'"):
        choose_threshold([0, 1], [0.2, 0.6], "f1")


def test_the_threshold_interval_is_narrow_when_validation_pins_the_cut_and_wide_when_it_does_not():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 200)
    separated = np.where(labels == 1, rng.uniform(0.60, 0.62, 400), rng.uniform(0.58, 0.60, 400))
    low, high = threshold_interval(labels, separated)
    assert 0.59 <= low <= high <= 0.61  # every resample cuts in the narrow gap
    noise = rng.uniform(0, 1, 400)  # scores that know nothing: the best cut wanders
    low, high = threshold_interval(labels, noise)
    assert high - low > 0.3
    assert threshold_interval([1, 1, 1], [0.1, 0.2, 0.3]) is None


def test_the_record_keeps_one_half_when_validation_cannot_tell_the_best_cut_from_it():
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 150)
    probs = np.clip(rng.normal(0.45 + 0.1 * labels, 0.2), 0, 1)  # weak, centred scores: a flat criterion
    record = threshold_record_from_validation(labels, probs)
    low, high = record["threshold_ci"]
    assert low <= 0.5 <= high and record["best_cut"] != 0.5
    assert record["threshold"] == 0.5 and "does not pin the threshold down" in record["reason"]
    assert record["val_metrics_at_threshold"] == record["val_metrics_at_0.5"]
    assert threshold_record_from_validation(labels, probs, keep_default_if_unsure=False)["threshold"] == record["best_cut"]


def test_contextual_calibration_is_the_mean_content_free_probability():
    seen = []

    def fake_scorer(texts):
        seen.append(list(texts))
        return [{"": 0.7, "N/A": 0.8, "[MASK]": 0.9}[t] for t in texts]

    out = contextual_threshold(fake_scorer)
    assert seen == [["", "N/A", "[MASK]"]]  # one call, Zhao et al.'s three inputs, through the given scorer
    assert out == {"threshold": pytest.approx(0.8), "inputs": ["", "N/A", "[MASK]"], "p_content_free": [0.7, 0.8, 0.9]}
    # The calibrated decision q >= 0.5 with q = (p/p_cf) / (p/p_cf + (1-p)/(1-p_cf)) is the decision p >= p_cf.
    p = np.linspace(0.01, 0.99, 99)
    q = (p / 0.8) / (p / 0.8 + (1 - p) / 0.2)
    assert ((q >= 0.5) == (p >= 0.8 - 1e-12)).all()
    with pytest.raises(ValueError, match="one probability in"):
        contextual_threshold(lambda texts: [1.5] * len(texts))
    with pytest.raises(ValueError, match="one probability in"):
        contextual_threshold(lambda texts: [0.5])


def test_record_round_trips_and_reports_both_thresholds(tmp_path):
    labels = [0, 0, 0, 1, 1, 1]
    probs = [0.55, 0.6, 0.7, 0.8, 0.85, 0.9]
    contextual = contextual_threshold(lambda texts: [0.65] * len(texts))
    record = threshold_record_from_validation(labels, probs, contextual=contextual)
    assert record["threshold"] == pytest.approx(0.75) and record["split"] == "gen_val" and record["n"] == 6
    assert record["criterion"] == "balanced_accuracy" and record["class_counts"] == {"sarcastic": 3, "not_sarcastic": 3}
    assert record["threshold_ci"] == threshold_interval(labels, probs) and record["threshold_ci"][0] > 0.5
    assert record["best_cut"] == record["threshold"] and record["reason"] is None  # validation is sure: it moves
    assert record["val_metrics_at_threshold"]["accuracy"] == 1.0
    assert record["val_metrics_at_0.5"]["accuracy"] == 0.5 and record["val_metrics_at_0.5"]["balanced_accuracy"] == 0.5
    assert record["contextual_calibration"]["threshold"] == 0.65
    assert record["contextual_calibration"]["val_metrics_at_threshold"]["accuracy"] == pytest.approx(5 / 6)
    path = write_threshold(tmp_path, record)
    assert path == tmp_path / THRESHOLD_FILE
    assert read_threshold(tmp_path) == json.loads(json.dumps(record))
    assert read_threshold(tmp_path / "elsewhere") is None and read_threshold(None) is None


@pytest.mark.parametrize("content", ['{"threshold": 1.5}', '{"criterion": "x"}', "[0.5]", "not json", '{"threshold": true}'])
def test_a_damaged_record_is_a_clear_error(tmp_path, content):
    (tmp_path / THRESHOLD_FILE).write_text(content)
    with pytest.raises(UserError, match=r"threshold\.json"):
        read_threshold(tmp_path)


# -- predict reads the record -----------------------------------------------------------------------------------


def test_predict_prefers_the_adapters_record_then_the_export_record_then_one_half(tmp_path):
    from sarcasm_dpo.detector import recorded_threshold

    adapter, export = tmp_path / "adapter", tmp_path / "export"
    adapter.mkdir(), export.mkdir()
    assert recorded_threshold(str(export), str(adapter)) == 0.5
    (export / "sarcasm_dpo.json").write_text('{"threshold": 0.4}')
    assert recorded_threshold(str(export), str(adapter)) == 0.4
    write_threshold(adapter, threshold_record_from_validation([0, 0, 1, 1], [0.6, 0.7, 0.8, 0.9]))
    assert recorded_threshold(str(export), str(adapter)) == pytest.approx(0.75)
    assert recorded_threshold(None, str(adapter)) == pytest.approx(0.75)


def test_predict_labels_follow_the_adapters_threshold_and_the_flag_overrides_it(tiny_model_dir, tmp_path, capsys):
    from test_compare import make_adapter

    from sarcasm_dpo.cli import main

    adapter = make_adapter(tiny_model_dir, tmp_path / "sft", seed=1)
    texts = tmp_path / "texts.txt"
    texts.write_text("oh great, rain again\nwe agreed on the plan\nlove waiting in line for hours\n")
    args = ["predict", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--input", str(texts)]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    probs = sorted(r["p_sarcastic"] for r in rows)
    cut = (probs[0] + probs[1]) / 2  # a recorded threshold that puts exactly one text below it
    (adapter / THRESHOLD_FILE).write_text(json.dumps({"threshold": cut}))
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["label"] for r in rows) == [0, 1, 1]
    assert all(r["label"] == int(r["p_sarcastic"] >= cut) for r in rows)
    assert main(args + ["--threshold", "1"]) == 0
    assert [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()] == [0, 0, 0]


def _leaning_and_all_yes():
    """Balanced labels; `leaning` ranks every text right but scores all above 0.5, `all_yes` knows nothing."""
    labels = np.array([0, 1] * 20)
    leaning = np.where(labels == 1, 0.9, 0.7) + np.linspace(0, 0.01, 40)
    all_yes = np.full(40, 0.8) + np.linspace(0, 0.001, 40)[::-1] * (labels == 0)
    return labels, leaning, all_yes


@pytest.mark.parametrize("select_by, leaning_wins", [("f1", False), ("balanced_accuracy", True), ("roc_auc", True)])
def test_selection_score_ranks_a_leaning_ranker_above_answering_yes_except_by_f1(select_by, leaning_wins):
    from sarcasm_dpo.metrics import classification_metrics
    from sarcasm_dpo.thresholds import selection_score

    labels, leaning, all_yes = _leaning_and_all_yes()
    score = {name: selection_score(labels, p, classification_metrics(labels, p), select_by)
             for name, p in (("leaning", leaning), ("all_yes", all_yes))}
    # Both answer Yes to everything at 0.5: F1 0.667 each, a tie that leaves the first (SFT) kept.
    if select_by == "f1":
        assert score["all_yes"] == pytest.approx(2 / 3) and score["leaning"] == pytest.approx(2 / 3)
    assert (score["leaning"] > score["all_yes"]) is leaning_wins
    if select_by == "balanced_accuracy":
        assert score["leaning"] == pytest.approx(1.0)


def test_selection_score_refuses_an_unknown_metric_and_ranks_an_impossible_one_last():
    from sarcasm_dpo.thresholds import selection_score

    with pytest.raises(UserError, match="Unknown selection metric 'loss'"):
        selection_score([0, 1], [0.2, 0.8], {"f1": 1.0}, "loss")
    assert selection_score([1, 1], [0.2, 0.8], {"roc_auc": None}, "roc_auc") == -np.inf


def test_validation_callback_keeps_the_best_evaluation_by_select_by(monkeypatch):
    """Two evaluations: the first answers Yes to everything (F1 0.667), the second ranks perfectly but
    leans to Yes (F1 0.667 too, balanced accuracy 1.0 at its own cut). By F1 the first stays best and
    one evaluation without improvement counts towards patience; by balanced accuracy the second wins."""
    import pandas as pd

    import sarcasm_dpo.training.callbacks as callbacks

    labels, leaning, all_yes = _leaning_and_all_yes()
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(40)], "label": labels})
    for select_by, best_step in (("f1", 1), ("balanced_accuracy", 2)):
        outputs = iter([all_yes, leaning])

        class FakeScorer:
            def __init__(self, *args, **kwargs):
                pass

            def predict_proba(self, texts):
                return next(outputs)

        monkeypatch.setattr(callbacks, "Scorer", FakeScorer)
        monkeypatch.setattr(callbacks, "adapter_state", lambda model: {"step": "copy"})
        cb = callbacks.ValidationCallback(None, {"gen_val": frame}, select_by=select_by, printer=lambda s: None)
        cb.evaluate(None, 1, 0.5)
        cb.evaluate(None, 2, 1.0)
        assert cb.best_step == best_step, select_by
        assert [h["is_best"] for h in cb.history] == [True, best_step == 2]
        assert cb.best_f1 == pytest.approx(2 / 3)
        assert cb.history[1]["selection_score"] == pytest.approx(1.0 if select_by == "balanced_accuracy" else 2 / 3)
        assert cb.bad_evals == (1 if select_by == "f1" else 0)
        state = cb.state_dict()
        assert state["select_by"] == select_by and state["best_score"] == cb.best_score

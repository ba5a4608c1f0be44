"""bench/isarcasm_reference.py: thresholds come from the training texts' cross-validated scores, never the
validation tweets; the in-sample figure is the bound it claims to be."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import isarcasm_reference as ref  # noqa: E402
from sarcasm_dpo.metrics import classification_metrics  # noqa: E402


def test_the_f1_cut_gives_the_best_f1_of_any_cut_and_sits_between_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.2 + rng.random(200) * 0.8, 0, 1)
    cut = ref.f1_cut(labels, probs)
    assert not np.isclose(probs, cut).any()  # in a gap, not on an item's score
    best = max(classification_metrics(labels, probs, c)["f1"] for c in np.unique(probs))
    assert np.isclose(classification_metrics(labels, probs, cut)["f1"], best)
    assert np.isclose(ref.best_f1_in_sample(labels, probs), best)


def test_a_reference_chooses_its_cuts_without_the_validation_labels():
    words = ["great", "sure", "love", "rain", "meeting", "monday", "traffic", "lunch"]
    rng = np.random.default_rng(1)

    def frame(n, seed_shift):
        labels = rng.integers(0, 2, n)
        texts = [" ".join(rng.choice(words, 5)) + (" yeah right" if y and rng.random() < 0.7 else "")
                 for y in labels]
        return pd.DataFrame({"text": texts, "label": labels})

    train, val = frame(120, 0), frame(60, 1)
    flipped = val.assign(label=1 - val["label"])
    a, b = ref.reference("x", train, val, seed=0), ref.reference("x", train, flipped, seed=0)
    for cut in ("0.5", "balanced_accuracy_cut", "f1_cut"):
        assert a["at"][cut]["threshold"] == b["at"][cut]["threshold"]  # the validation labels played no part
    assert a["at"]["f1_cut"]["f1"] <= a["best_f1_any_cut_in_sample_bound"]
    assert a["at"]["0.5"]["roc_auc"] > 0.6  # the cue is learnt: the figures come from a fitted model
    table = ref.markdown({"val": "60 tweets", "always_sarcastic_f1": 0.5, "references": [a]})
    assert table.count("| x |") == 3

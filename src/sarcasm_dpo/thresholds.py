"""Decision thresholds chosen on validation, and label-free contextual calibration.

A model that ranks texts well but leans towards one answer loses accuracy at P(sarcastic) = 0.5
for nothing. `choose_threshold` picks the threshold on VALIDATION scores (never on test), and
`saved_threshold` turns that choice into the threshold a trained model is saved with (keeping 0.5
when validation cannot tell the best cut from it) and the criterion there: the one rule behind both
the `threshold.json` record (`threshold_record_from_validation`) and the ranking of checkpoints by
balanced accuracy (`selection_score`). `predict` and `compare` read the record with `read_threshold`.

The criterion is balanced accuracy, (recall of sarcastic + recall of not sarcastic) / 2, by
default: the test set (GEN) is 50/50 and the comparison leads with accuracy, and on a 50/50 set
accuracy IS balanced accuracy; unlike accuracy or F1 on the validation texts, it does not move
with the validation split's class ratio, so the same threshold also serves iSarcasmEval (25%
sarcastic) without learning to answer the majority class. It is the Youden-J point of the ROC
curve. `macro_f1` and `accuracy` can be asked for instead.

`contextual_threshold` is the label-free alternative (Zhao et al. 2021, "Calibrate before use"):
score content-free inputs ("", "N/A", "[MASK]") through the same scorer; their mean P(sarcastic)
p_cf is the model's bias towards "Yes". Contextual calibration divides each class probability by
the content-free one and renormalises, so a text is called sarcastic iff p/p_cf >= (1-p)/(1-p_cf),
i.e. iff p >= p_cf: with two labels the calibration is exactly the threshold p_cf.

    python -c "from sarcasm_dpo.thresholds import choose_threshold as c; print(c([0,0,1,1],[.1,.6,.7,.9]))"
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import UserError
from .metrics import _binary, _same_length, classification_metrics, decide, probabilities
from .settings import SELECTION_METRICS

THRESHOLD_FILE = "threshold.json"
CRITERIA = ("balanced_accuracy", "macro_f1", "accuracy")
DEFAULT_CRITERION = "balanced_accuracy"
DEFAULT = 0.5
CONTENT_FREE = ("", "N/A", "[MASK]")  # Zhao et al. 2021's content-free inputs


def _criterion_values(tp, fp, pos: int, neg: int, criterion: str) -> np.ndarray:
    """The criterion at every cut, from the cumulative true/false positive counts (vectorised)."""
    fn, tn = pos - tp, neg - fp
    if criterion == "balanced_accuracy":
        return (tp / pos + tn / neg) / 2
    if criterion == "accuracy":
        return (tp + tn) / (pos + neg)
    if criterion == "macro_f1":
        def f1(t, f_pos, f_neg):
            denom = 2 * t + f_pos + f_neg
            return np.divide(2 * t, denom, out=np.zeros(len(denom)), where=denom > 0)
        return (f1(tp, fp, fn) + f1(tn, fn, fp)) / 2
    raise UserError(f"Unknown threshold criterion {criterion!r}; choose one of {', '.join(CRITERIA)}.")


def choose_threshold(labels, probs, criterion: str = DEFAULT_CRITERION) -> dict:
    """{"threshold", "criterion", "value", "reason"}: the cut of the validation scores that maximises `criterion`.

    Candidates are the midpoints between adjacent distinct scores (an item is sarcastic iff
    p >= threshold), so the threshold sits in the gap rather than on a validation item's score and
    nudges no unseen text that scores just below it. Each candidate leaves at least one item on
    each side. Where two scores are adjacent doubles their midpoint rounds onto one of them; a cut
    that rounds onto the lower one is moved to the next double up, so that the lower score stays
    below the cut and the value reported is the value the cut achieves (metrics.decide). Several cuts reaching the best value (a tie) resolve to the one nearest 0.5, then
    the lower: the threshold moves away from the default only as far as validation asks.
    Degenerate inputs (one class present, or every score equal) give 0.5 and say why in "reason"
    (None otherwise).
    """
    y = _binary("labels", labels)
    p = probabilities("probs", probs)
    _same_length(labels=y, probs=p)
    if criterion not in CRITERIA:
        raise UserError(f"Unknown threshold criterion {criterion!r}; choose one of {', '.join(CRITERIA)}.")
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        return {"threshold": DEFAULT, "criterion": criterion, "value": None,
                "reason": f"validation holds only {'not ' if pos == 0 else ''}sarcastic texts: no threshold "
                          "can be chosen, the default 0.5 is kept"}
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    # A cut after position i (in descending order) marks items 0..i sarcastic; only cuts between
    # distinct scores are real choices.
    distinct = np.flatnonzero(p_sorted[:-1] > p_sorted[1:])
    if distinct.size == 0:
        return {"threshold": DEFAULT, "criterion": criterion, "value": None,
                "reason": "every validation score is the same: the scores cannot separate the classes, "
                          "the default 0.5 is kept"}
    tp = np.cumsum(y_sorted)[distinct]
    fp = (distinct + 1) - tp
    values = _criterion_values(tp, fp, pos, neg, criterion)
    upper, lower = p_sorted[distinct], p_sorted[distinct + 1]
    cuts = (upper + lower) / 2
    cuts = np.where(cuts > lower, cuts, np.nextafter(lower, np.inf))  # <= upper, as upper > lower
    best = values.max()
    tied = np.flatnonzero(np.isclose(values, best, rtol=0, atol=1e-12))
    pick = tied[np.lexsort((cuts[tied], np.abs(cuts[tied] - DEFAULT)))[0]]
    return {"threshold": float(cuts[pick]), "criterion": criterion, "value": float(values[pick]), "reason": None}


def selection_score(labels, probs, metrics: dict, select_by: str) -> float:
    """How one validation evaluation ranks against the others when training keeps its best checkpoint.

    `metrics` is the evaluation's classification_metrics record (at 0.5). balanced_accuracy is the
    value at the threshold this evaluation's model would be saved with (`saved_threshold`, the rule
    threshold.json is written by): every evaluation gets the same chance to move its threshold, so a
    checkpoint that ranks well but leans to one answer is not thrown away, and the score that ranks
    it is the one the saved model achieves on validation, not that of a cut it would not be given.
    A value that cannot be computed (one class present) ranks last.
    """
    if select_by == "f1":
        value = metrics.get("f1")
    elif select_by == "roc_auc":
        value = metrics.get("roc_auc")
    elif select_by == "balanced_accuracy":
        value = saved_threshold(labels, probs, "balanced_accuracy")["value"]
    else:
        raise UserError(f"Unknown selection metric {select_by!r}; choose one of {', '.join(SELECTION_METRICS)}.")
    return -np.inf if value is None else float(value)


def threshold_interval(labels, probs, criterion: str = DEFAULT_CRITERION, n_resamples: int = 200,
                       seed: int = 42) -> list[float] | None:
    """95% percentile interval of the threshold `choose_threshold` picks on bootstrap resamples of validation.

    How well validation pins the threshold down: a wide interval says the criterion is flat and
    the chosen cut is partly noise. None when no resample gives a real choice.
    """
    y = _binary("labels", labels)
    p = probabilities("probs", probs)
    _same_length(labels=y, probs=p)
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(y), len(y))
        choice = choose_threshold(y[idx], p[idx], criterion)
        if choice["reason"] is None:
            picks.append(choice["threshold"])
    if not picks:
        return None
    low, high = np.percentile(picks, [2.5, 97.5])
    return [float(low), float(high)]


def metrics_at(labels, probs, threshold: float) -> dict:
    """classification_metrics plus balanced accuracy: the mean recall of the classes present in `labels`.

    A class with no items has no recall (0/0); averaging it in as 0 would halve a one-class score
    (scikit-learn's balanced_accuracy_score leaves it out too).
    """
    m = classification_metrics(labels, probs, threshold)
    recalls = [c["recall"] for c in m["per_class"].values() if c["support"] > 0]
    m["balanced_accuracy"] = sum(recalls) / len(recalls)
    return m


def criterion_at(labels, probs, threshold: float, criterion: str = DEFAULT_CRITERION) -> float:
    """`criterion` of the decisions at `threshold`, computed as choose_threshold computes it for its cuts
    (both classes must be present)."""
    y = _binary("labels", labels)
    pred = decide(probabilities("probs", probs), threshold)
    _same_length(labels=y, probs=pred)
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        raise ValueError("criterion_at needs both classes in labels")
    tp, fp = np.array([np.sum(pred & y)]), np.array([np.sum(pred & (1 - y))])
    return float(_criterion_values(tp, fp, pos, neg, criterion)[0])


def saved_threshold(labels, probs, criterion: str = DEFAULT_CRITERION, keep_default_if_unsure: bool = True) -> dict:
    """{"threshold", "value", "best_cut", "best_value", "threshold_ci", "reason"}: the threshold a model with these
    validation scores is saved with, and `criterion` at that threshold.

    The one rule behind both the model's threshold.json (threshold_record_from_validation) and the ranking of
    checkpoints by balanced accuracy (selection_score), so the score a checkpoint is kept for is the score the
    saved model achieves. "threshold" is "best_cut" (choose_threshold, worth "best_value") unless
    `keep_default_if_unsure` and the bootstrap interval of the best cut ("threshold_ci", threshold_interval)
    holds 0.5: then validation cannot tell the best cut from 0.5, moving would fit its noise, 0.5 stays, "value"
    is the criterion at 0.5 and "reason" says why. Degenerate validation (one class, one score): 0.5 and
    value None (choose_threshold's "reason").
    """
    y = _binary("labels", labels)
    p = probabilities("probs", probs)
    choice = choose_threshold(y, p, criterion)
    interval = threshold_interval(y, p, criterion) if choice["reason"] is None else None
    threshold, value, reason = choice["threshold"], choice["value"], choice["reason"]
    if keep_default_if_unsure and interval is not None and interval[0] <= DEFAULT <= interval[1]:
        threshold, value = DEFAULT, criterion_at(y, p, DEFAULT, criterion)
        reason = (f"validation does not pin the threshold down: the 95% bootstrap interval of the best cut "
                  f"[{interval[0]:.3f}, {interval[1]:.3f}] holds 0.5, so 0.5 is kept")
    return {"threshold": threshold, "value": value, "best_cut": choice["threshold"], "best_value": choice["value"],
            "threshold_ci": interval, "reason": reason}


def contextual_threshold(scorer: Callable[[list[str]], Sequence[float]],
                         content_free: Sequence[str] = CONTENT_FREE) -> dict:
    """{"threshold", "inputs", "p_content_free"}: the label-free threshold p_cf (see the module doc).

    `scorer` maps texts to P(sarcastic), through the same prompt as every other text (for a model:
    `Scorer(model, tokenizer).predict_proba`).
    """
    inputs = [str(t) for t in content_free]
    if not inputs:
        raise ValueError("contextual calibration needs at least one content-free input")
    raw = scorer(inputs)
    try:
        probs = probabilities("content-free probabilities", raw)
        _same_length(inputs=np.asarray(inputs), probs=probs)
    except ValueError as exc:
        raise ValueError(f"the scorer must return one probability in [0, 1] per input, got {raw!r} ({exc})") from None
    return {"threshold": float(probs.mean()), "inputs": inputs,
            "p_content_free": [float(x) for x in probs]}


def threshold_record_from_validation(labels, probs, *, criterion: str = DEFAULT_CRITERION, split: str = "gen_val",
                                     contextual: dict | None = None, keep_default_if_unsure: bool = True) -> dict:
    """The `threshold.json` record of a trained model, from its (best checkpoint's) validation scores.

    {"threshold", "criterion", "split", "n", "class_counts", "best_cut", "best_cut_value", "criterion_value",
     "threshold_ci" (threshold_interval), "reason", "val_metrics_at_threshold", "val_metrics_at_0.5"}; with
    `contextual` (from `contextual_threshold`) also "contextual_calibration": that threshold and the validation
    metrics at it, so the label-free and the validation threshold are measured side by side.

    "threshold" and "criterion_value" (the criterion AT "threshold") come from `saved_threshold`, the rule
    checkpoints are ranked by too: "best_cut" (choose_threshold, worth "best_cut_value") unless
    `keep_default_if_unsure` and the bootstrap interval of the best cut holds 0.5: then validation cannot tell
    the best cut from 0.5, and moving would fit its noise, so 0.5 stays ("reason" says so). On 522 GEN validation texts a
    well-centred scorer's best cut wanders over [0.37, 0.61] (TF-IDF, bench/detector_check.py);
    a model that leans to one answer (DPO's F1 0.276 at 0.5) has an interval far from 0.5 and moves.
    """
    y = _binary("labels", labels)
    saved = saved_threshold(y, probs, criterion, keep_default_if_unsure)
    threshold = saved["threshold"]
    record = {
        "threshold": threshold, "criterion": criterion, "split": split, "n": int(len(y)),
        "class_counts": {"sarcastic": int(y.sum()), "not_sarcastic": int(len(y) - y.sum())},
        "best_cut": saved["best_cut"], "best_cut_value": saved["best_value"], "criterion_value": saved["value"],
        "threshold_ci": saved["threshold_ci"], "reason": saved["reason"],
        "val_metrics_at_threshold": metrics_at(y, probs, threshold),
        "val_metrics_at_0.5": metrics_at(y, probs, DEFAULT),
    }
    if contextual is not None:
        record["contextual_calibration"] = {**contextual,
                                            "val_metrics_at_threshold": metrics_at(y, probs, contextual["threshold"])}
    return record


def write_threshold(folder: str | Path, record: dict) -> Path:
    """Write `record` as FOLDER/threshold.json, atomically."""
    from .atomic import write_json

    _checked(record, Path(folder) / THRESHOLD_FILE)
    return write_json(Path(folder) / THRESHOLD_FILE, record)


def read_threshold(folder: str | Path | None) -> dict | None:
    """The threshold record in a model folder, None when there is none; a damaged one is a UserError, and so
    is none in a finished folder that held one (atomic.require_whole): 0.5 in its place would change labels."""
    if not folder:
        return None
    path = Path(folder) / THRESHOLD_FILE
    from .atomic import read_json, require_whole

    if not path.is_file():
        require_whole(folder)
        return None

    return _checked(read_json(path, fix=_DAMAGED), path)


# What to do about a damaged threshold record, whichever command read it.
_DAMAGED = ("It records the model's decision threshold, chosen on validation by the stage that trained it: run that "
            "stage again to write it anew (`predict` can also be given --threshold).")


def _checked(record, path: Path) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{path} holds JSON {type(record).__name__} {json.dumps(record)[:40]}, where an object with "
                        f"the decision threshold belongs. {_DAMAGED}")
    value = record.get("threshold")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"{path} holds no decision threshold in [0, 1] (found {value!r}). {_DAMAGED}")
    return record

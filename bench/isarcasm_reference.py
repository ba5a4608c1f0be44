"""What a bag of n-grams reaches on iSarcasmEval validation: the yardstick for issue 18's F1 target (0.45).

The language models are trained on GEN forum posts and only see tweets in DPO, and they rank the
iSarcasmEval validation tweets with ROC-AUC 0.57-0.59 (bench/README.md). Is 0.45 out of reach for
them only, or for anything this data can teach? This script trains the project's own TF-IDF +
logistic regression (`baseline.tfidf_logreg`, the compare stage's baseline) on the tweets of the
iSarcasmEval *train* split, in domain, and scores the validation tweets, beside the same model trained
on GEN train (what compare reports). Thresholds are chosen out of sample: on five-fold cross-validated
predictions of the training split (never on the validation tweets), by balanced accuracy (the
project's criterion) and by the sarcastic class's F1 (the target's metric). The best F1 of any cut
on the validation tweets themselves is printed too, labelled as what it is: an in-sample upper bound.

Splits are made in memory exactly as `sarcasm-dpo split` makes them with its defaults. Seconds on a
CPU; raw figures go to bench/results/isarcasm_reference.json (and a table beside it, .md).

    SARCASM_DPO_DATA_DIRS=../shared/data python bench/isarcasm_reference.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import common

KEEP = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc")


def f1_cut(labels, probs) -> float:
    """The cut that maximises the sarcastic class's F1 (an item is sarcastic iff p >= cut), midway between scores."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, cuts = precision_recall_curve(labels, probs)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=(precision + recall) > 0)[:-1]  # the last point has no cut
    best = int(np.argmax(f1))
    lower = probs[probs < cuts[best]]  # midway to the next lower score, as thresholds.choose_threshold does
    return float((cuts[best] + lower.max()) / 2) if lower.size else float(cuts[best])


def best_f1_in_sample(labels, probs) -> float:
    """The highest F1 any cut of these very scores gives: a bound, never a result (the cut saw the labels)."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(labels, probs)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=(precision + recall) > 0)
    return float(f1.max())


def cross_validated_probs(train, seed: int, folds: int = 5) -> np.ndarray:
    """P(sarcastic) for every training text from a model that did not train on it (stratified k-fold)."""
    from sklearn.model_selection import StratifiedKFold

    from sarcasm_dpo.baseline import predict_proba, tfidf_logreg

    probs = np.zeros(len(train))
    for fit, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(train, train["label"]):
        pipe = tfidf_logreg(train.iloc[fit], seed=seed)
        probs[held] = predict_proba(pipe, train["text"].iloc[held])
    return probs


def reference(name: str, train, val, seed: int) -> dict:
    """One reference model: trained on `train`, thresholds from its cross-validated predictions, scored on `val`."""
    from sarcasm_dpo.baseline import predict_proba, tfidf_logreg
    from sarcasm_dpo.metrics import bootstrap_ci, decide
    from sarcasm_dpo.thresholds import choose_threshold, metrics_at

    train_y = train["label"].to_numpy(int)
    cv = cross_validated_probs(train, seed)
    cuts = {"0.5": 0.5, "balanced_accuracy_cut": choose_threshold(train_y, cv, "balanced_accuracy")["threshold"],
            "f1_cut": f1_cut(train_y, cv)}
    probs = predict_proba(tfidf_logreg(train, seed=seed), val["text"])
    y = val["label"].to_numpy(int)
    at = {}
    for cut_name, cut in cuts.items():
        m = metrics_at(y, probs, cut)
        at[cut_name] = {"threshold": round(cut, 4), **{k: round(m[k], 4) for k in KEEP},
                        "f1_ci": [round(v, 4) for v in bootstrap_ci(y, decide(probs, cut), "f1", seed=seed)]}
    return {"model": name, "trained_on": f"{len(train)} texts ({int(train_y.sum())} sarcastic)",
            "thresholds_from": "five-fold cross-validated predictions of the training texts", "at": at,
            "best_f1_any_cut_in_sample_bound": round(best_f1_in_sample(y, probs), 4)}


def markdown(result: dict) -> str:
    lines = [f"iSarcasmEval validation: {result['val']}. Always-sarcastic F1 {result['always_sarcastic_f1']}.", "",
             "| Reference model | trained on | threshold (chosen on train, cross-validated) | F1 (sarcastic) [95% CI] "
             "| precision | recall | ROC-AUC | best F1 of any val cut (in-sample bound) |", "|---|---|---|---|---|---|---|---|"]
    for row in result["references"]:
        for cut_name, m in row["at"].items():
            lines.append(f"| {row['model']} | {row['trained_on']} | {cut_name} = {m['threshold']} | {m['f1']:.3f} "
                         f"[{m['f1_ci'][0]:.3f}, {m['f1_ci'][1]:.3f}] | {m['precision']:.3f} | {m['recall']:.3f} | "
                         f"{m['roc_auc']:.3f} | {row['best_f1_any_cut_in_sample_bound']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help="Folder with the datasets (default: SARCASM_DPO_DATA_DIRS, "
                                                         "the cache, or a download).")
    parser.add_argument("--seed", type=common.seed, default=42, help="Split, fold and model seed.")
    parser.add_argument("--output", default=str(common.RESULTS / "isarcasm_reference.json"),
                        help="Result JSON (a markdown table is written beside it).")
    args = parser.parse_args(argv)

    from sarcasm_dpo import data
    from sarcasm_dpo.download import ensure_data_dir

    started = time.perf_counter()
    root = ensure_data_dir(args.data_dir, log=lambda _m: None)
    gen = data.load_gen(root / data.GEN_RELPATH, log=lambda _m: None)
    isarcasm = data.load_isarcasm(root / data.ISARCASM_RELPATH, drop_conflicts=True, log=lambda _m: None)
    splits = data.make_splits(gen, isarcasm, seed=args.seed)
    val = splits["isarcasm_val"]
    share = float(val["label"].mean())
    result = {
        "command": common.command_line(), "machine": common.machine_info(),
        "val": f"{len(val)} tweets, {int(val['label'].sum())} sarcastic",
        "always_sarcastic_f1": round(2 * share / (1 + share), 4),
        "references": [reference("TF-IDF + LR, in domain", splits["isarcasm_train"], val, args.seed),
                       reference("TF-IDF + LR, GEN (compare's baseline)", splits["gen_train"], val, args.seed)],
    }
    took = f"{time.perf_counter() - started:.1f} s"
    result["wall_s"] = round(time.perf_counter() - started, 1)
    common.write_results(Path(args.output), result, markdown(result), took)
    return result


if __name__ == "__main__":
    common.run_main(main)

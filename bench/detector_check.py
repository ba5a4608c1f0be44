"""Sanity check of the detector's task layer on the real data, with TF-IDF + LR as a stand-in scorer.

1. thresholds: the best cut on GEN validation (thresholds.choose_threshold), the recorded threshold
   (threshold_record_from_validation: 0.5 unless validation is sure the best cut differs) and 0.5,
   each scored on GEN test and iSarcasmEval validation; and the label-free contextual threshold
   (content-free inputs through the same scorer). A check of the plumbing, not a model result:
   TF-IDF is trained on balanced GEN train, so 0.5 is already near its best.
2. preference sources: how many pairs each source builds from the real iSarcasmEval train split
   (balanced by default, and at the natural ratio). `mined` depends on an SFT model, so it is not here.

3. with --base_lm: the base SmolLM2-135M-Instruct on GEN validation only (no test text): a model
   that leans to one answer, where the threshold matters. In-sample figures, and a two-fold
   out-of-sample check (threshold from one half of validation, accuracy on the other).

Splits are made in memory exactly as `sarcasm-dpo split` makes them with its defaults. CPU only,
under a minute (two with --base_lm); raw figures go to bench/results/detector_check.json (--output).

    SARCASM_DPO_DATA_DIRS=../shared/data python bench/detector_check.py --base_lm

A run without --base_lm does not measure section 3. When the result file it replaces holds that
section, the section is kept, not dropped: measuring it costs a model load, and it depends on the
GEN validation split alone, which such a run rebuilds the same. It is kept only when it was measured
on the same validation texts (their fingerprint, which --base_lm runs record, or where an older file
has none, their number), and it is marked as kept: its `from_earlier_run` field says that this run
did not measure it, and the run says so when it writes. Measured on other texts, it is not kept and
the run stops before writing (exit code 2): run with --base_lm to measure it again, or pass
--output to write elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = common.REPO
sys.path.insert(0, str(ROOT / "tests"))  # tiny_model: a local chat tokenizer, no download

BASE_LM = "base_lm_on_gen_val"  # section 3, written by --base_lm runs only
KEPT_NOTE = "not measured by this run (it had no --base_lm): kept from an earlier --base_lm run's result in this file"



def _round4(value):
    """A metric rounded for the record; None (macro-F1 or ROC-AUC of a one-class split) stays None."""
    return None if value is None else round(value, 4)

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="A run without --base_lm keeps an earlier run's base-LM section, marked as "
                                       "such (see the module's docstring).")
    p.add_argument("--base_lm", action="store_true",
                   help="Also score GEN validation with the base SmolLM2-135M-Instruct (section 3; about a minute "
                        "more on a CPU).")
    p.add_argument("--data_dir", default=None, help="Folder with the datasets (default: SARCASM_DPO_DATA_DIRS, the "
                                                     "cache, or a download).")
    p.add_argument("--output", default=str(common.RESULTS / "detector_check.json"), help="Result JSON.")
    return p.parse_args(argv)


def gen_val_fingerprint(val) -> str:
    """Which GEN validation texts (and labels) a base-LM section was measured on, in 16 hex digits."""
    digest = hashlib.sha256()
    for text, label in zip(val["text"], val["label"]):
        digest.update(f"{int(label)}\t{text}\n".encode())
    return digest.hexdigest()[:16]


def earlier_section(path: Path) -> dict | None:
    """The base-LM section of the result file a run is about to replace (None when there is none)."""
    if not path.is_file():
        return None
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise common.BadInput(f"--output {path} is there but not a readable JSON result ({exc}); it is left as it "
                              "is. Move it away or pass another --output.") from None
    section = earlier.get(BASE_LM) if isinstance(earlier, dict) else None
    return section if isinstance(section, dict) else None


def keep_earlier(section: dict, val, path: Path) -> dict:
    """`section` marked as kept from an earlier run, when it was measured on the texts of `val`; else BadInput."""
    recorded = section.get("gen_val_fingerprint")
    if recorded:
        same, how = recorded == gen_val_fingerprint(val), "measured on the same GEN validation texts (fingerprint)"
    else:  # written before sections recorded their texts' fingerprint: the count is all there is to go by
        same, how = section.get("n") == len(val), (f"measured on as many GEN validation texts ({len(val)}) as this "
                                                  "run's; that run recorded no fingerprint of them")
    if not same:
        raise common.BadInput(
            f"{path} holds a {BASE_LM} section measured on other GEN validation texts than this run's, and this run "
            "(without --base_lm) cannot measure it again. Nothing was written. Run with --base_lm to measure it on "
            "these texts, or pass --output to write this run's figures elsewhere.")
    return {**section, "from_earlier_run": f"{KEPT_NOTE}, {how}"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from sarcasm_dpo import baseline, data, metrics
    from sarcasm_dpo.atomic import write_json
    from sarcasm_dpo.download import ensure_data_dir
    from sarcasm_dpo.pairs import PAIR_SOURCES, build_preference_pairs, prefers_yes
    from sarcasm_dpo.rephrases import attach_rephrases, check_rephrase_sides, load_rephrases
    from sarcasm_dpo.thresholds import contextual_threshold, metrics_at, threshold_record_from_validation

    started = time.perf_counter()
    output = Path(args.output)
    earlier = earlier_section(output)  # read first: a file that is not a result stops the run before any work
    root = ensure_data_dir(args.data_dir, log=lambda _m: None)
    gen = data.load_gen(root / data.GEN_RELPATH, log=lambda _m: None)
    isarcasm = data.load_isarcasm(root / data.ISARCASM_RELPATH, drop_conflicts=True, log=lambda _m: None)
    splits = data.make_splits(gen, isarcasm)
    kept = keep_earlier(earlier, splits["gen_val"], output) if earlier and not args.base_lm else None

    pipe = baseline.tfidf_logreg(splits["gen_train"])
    probs = {name: baseline.predict_proba(pipe, splits[name]["text"]) for name in ("gen_val", "gen_test", "isarcasm_val")}
    labels = {name: splits[name]["label"].to_numpy(int) for name in probs}
    contextual = contextual_threshold(lambda texts: baseline.predict_proba(pipe, texts))
    out: dict = {"scorer": "tfidf_logreg trained on gen_train", "thresholds": {}}
    for criterion in ("balanced_accuracy", "macro_f1"):
        record = threshold_record_from_validation(labels["gen_val"], probs["gen_val"], criterion=criterion,
                                                  contextual=contextual)
        cuts = {"0.5": 0.5, "best_cut": record["best_cut"], "validation": record["threshold"],
                "contextual": contextual["threshold"]}
        keep = ("accuracy", "balanced_accuracy", "f1", "macro_f1", "roc_auc")
        test_p, test_y = probs["gen_test"], labels["gen_test"]
        mcnemar = metrics.mcnemar_exact(test_y, metrics.decide(test_p, record["best_cut"]), metrics.decide(test_p, 0.5))
        if criterion == "balanced_accuracy":
            out["tfidf_two_fold_accuracy_on_gen_val"] = two_fold(labels["gen_val"], probs["gen_val"],
                                                                 contextual["threshold"])
        out["thresholds"][criterion] = {
            "best_cut_on_gen_val": record["best_cut"], "threshold_ci_gen_val_bootstrap": record["threshold_ci"],
            "threshold": record["threshold"], "reason": record["reason"],
            "gen_test_mcnemar_best_cut_vs_0.5": mcnemar, "contextual_p_cf": contextual,
            **{f"{split}@{name}": {k: _round4(metrics_at(labels[split], probs[split], cut)[k]) for k in keep}
               for split in ("gen_val", "gen_test", "isarcasm_val") for name, cut in cuts.items()}}

    if args.base_lm:
        out[BASE_LM] = base_lm_check(splits["gen_val"])
    elif kept:
        out[BASE_LM] = kept

    from tiny_model import build_tiny_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(Path(tempfile.mkdtemp())))
    table = load_rephrases(root / data.ISARCASM_RELPATH)
    for name in ("isarcasm_train", "isarcasm_val"):
        splits[name] = attach_rephrases(splits[name], table, name)
    check_rephrase_sides(splits)
    train = splits["isarcasm_train"]
    counts = {"train_split": data.class_counts(train),
              "sarcastic_with_usable_rephrase": int(train.loc[train.label == 1, "rephrase"].notna().sum())}
    for spec in [s for s in PAIR_SOURCES if s != "mined"] + ["rephrase+label", "label+rephrase", "rephrase+reasoning"]:
        for balance in (None, False):
            pairs = build_preference_pairs(spec, train, tokenizer, balance=balance)
            yes = int(prefers_yes(pairs).sum())
            counts[f"{spec} ({'default' if balance is None else 'natural'})"] = {
                "pairs": len(pairs), "prefer_yes": yes, "prefer_no": len(pairs) - yes,
                "by_source": pairs["pair_source"].value_counts().to_dict()}
    out["pair_counts"] = counts
    out["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(output, out)
    print(json.dumps(out, indent=1))
    if kept:
        print(f"{BASE_LM}: {kept['from_earlier_run']}; run with --base_lm to measure it again.")
    print(f"Written: {output}")
    return out


def two_fold(labels, probs, contextual: float, seed: int = 42) -> dict:
    """Validation only, out of sample: the threshold recorded from one half of GEN val, scored on the other half
    (and the reverse), beside 0.5 and the label-free threshold; mean accuracy of the two halves."""
    import numpy as np

    from sarcasm_dpo.thresholds import metrics_at, threshold_record_from_validation

    order = np.random.default_rng(seed).permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    acc = {"0.5": [], "recorded": [], "best_cut": [], "contextual": []}
    for fit, held in (halves, halves[::-1]):
        record = threshold_record_from_validation(labels[fit], probs[fit])
        for name, cut in (("0.5", 0.5), ("recorded", record["threshold"]), ("best_cut", record["best_cut"]),
                          ("contextual", contextual)):
            acc[name].append(metrics_at(labels[held], probs[held], cut)["accuracy"])
    return {name: round(float(np.mean(v)), 4) for name, v in acc.items()}


def base_lm_check(val) -> dict:
    """The base SmolLM2-135M-Instruct (a model that leans to "No") on GEN validation: where calibration matters."""
    from sarcasm_dpo.model_route import route_model
    from sarcasm_dpo.models import load_model, pick_device
    from sarcasm_dpo.scoring import Scorer
    from sarcasm_dpo.thresholds import contextual_threshold, threshold_record_from_validation

    ref = route_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    model, tokenizer = load_model(ref, device=pick_device("cpu"))
    scorer = Scorer(model, tokenizer, batch_size=16, max_text_tokens=256)
    labels, probs = val["label"].to_numpy(int), scorer.predict_proba(val["text"].tolist())
    contextual = contextual_threshold(scorer.predict_proba)
    record = threshold_record_from_validation(labels, probs, contextual=contextual)
    keep = ("accuracy", "balanced_accuracy", "f1", "macro_f1", "roc_auc")
    return {"model": ref, "n": record["n"], "gen_val_fingerprint": gen_val_fingerprint(val),
            "best_cut": record["best_cut"], "threshold_ci": record["threshold_ci"],
            "threshold": record["threshold"], "reason": record["reason"], "contextual": contextual,
            "in_sample": {name: {k: _round4(block[k]) for k in keep} for name, block in (
                ("at_0.5", record["val_metrics_at_0.5"]), ("at_threshold", record["val_metrics_at_threshold"]),
                ("at_contextual", record["contextual_calibration"]["val_metrics_at_threshold"]))},
            "two_fold_accuracy": two_fold(labels, probs, contextual["threshold"])}


if __name__ == "__main__":
    common.run_main(main)

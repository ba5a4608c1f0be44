"""Mine DPO preference pairs from the SFT model's mistakes on the iSarcasmEval training split.

The SFT model scores every text with the shared scorer (one forward pass per batch, P(sarcastic)
from the Yes/No logits). A text is a mistake when its decision at 0.5 differs from the label, and a
confident mistake when the probability the model gave the wrong answer is at least --confidence.
`--filter_strategy` keeps all texts, the mistakes, or the confident mistakes; each kept text
becomes one pair (pairs.py: chosen = the right answer, rejected = the wrong one, same prompt as
SFT and evaluation). Never point it at a validation split: DPO refuses pairs whose texts are in
its validation splits.

    sarcasm-dpo mine --sft_model models/sft --filter_strategy mistakes_only
    python scripts/mine_hard_negatives.py --filter_strategy confident_mistakes --confidence 0.8 --no_wandb
    sarcasm-dpo dpo --preference_data data/preference_pairs_mined.json

Outputs: --output_file (a JSON list of {prompt, chosen, rejected, text, label, p_sarcastic, id}) and
beside it <stem>_summary.json (the SFT model's accuracy and per-class metrics on the mined split,
how many texts were mistakes and how many pairs were kept, per class). A folder <stem>_run/ holds
only the completion marker the pipeline uses to skip a finished mining stage; it also tells a later
run whose pairs these are: pairs mined with other settings are replaced only with --overwrite.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ..atomic import (finish_output_dir, input_differences, prepare_output_dir, read_complete, settings_differences,
                     write_json)
from ..detector import note_text_lengths, refuse_adapter_on_export
from ..errors import UserError

STRATEGIES = ("all", "mistakes_only", "confident_mistakes")


def summary_path(output_file: str | Path) -> Path:
    output_file = Path(output_file)
    return output_file.with_name(f"{output_file.stem}_summary.json")


def marker_dir(output_file: str | Path) -> Path:
    output_file = Path(output_file)
    return output_file.parent / f"{output_file.stem}_run"


def inputs_of(s) -> dict[str, str]:
    """The checksums of what mining reads (the split and the SFT adapter), recorded beside its marker."""
    from ..rundir import input_identity

    return input_identity({"input_csv": s.input_csv, "sft_model": s.sft_model})


def check_output_file(out_file: Path, config, overwrite: bool, inputs: dict | None = None) -> None:
    """Read-only: may this run write `out_file`? Another run's pairs are replaced only with --overwrite.

    The completion record in <stem>_run/ tells whose pairs these are: the same settings may be
    mined again, other settings are refused. Files with no record folder beside them were not
    written by this stage (a hand-made or older pairs file) and are refused too. A record folder
    without its marker is an interrupted mining run, which the same command may redo.
    """
    if out_file.suffix.lower() != ".json":
        raise UserError(f"--output_file must be a .json file, got {out_file}.")
    if out_file.is_dir():
        raise UserError(f"--output_file {out_file} is a folder; name a .json file.")
    if overwrite:
        return
    marker = marker_dir(out_file)
    record = read_complete(marker)
    if record is not None:
        diff = settings_differences(record, config) + input_differences(record, inputs)
        if diff:
            raise UserError(f"{out_file} already holds the results of another run (settings differ in: "
                            f"{', '.join(diff)}; see {marker}). Pass --overwrite to replace them, or choose "
                            "another --output_file.")
    elif not marker.is_dir():
        found = [p.name for p in (out_file, summary_path(out_file)) if p.exists()]
        if found:
            raise UserError(f"{out_file.parent} already holds {', '.join(found)}, which `sarcasm-dpo mine` did not "
                            f"write (there is no {marker.name}/ record beside it). Pass --overwrite to replace them, "
                            "or choose another --output_file.")


def select(labels: np.ndarray, probs: np.ndarray, strategy: str, confidence: float) -> np.ndarray:
    """Boolean mask of the texts that become pairs."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    wrong = (probs >= 0.5).astype(int) != labels
    p_wrong = np.where(labels == 1, 1.0 - probs, probs)  # the probability the model gave the wrong answer
    if strategy == "all":
        return np.ones(len(labels), dtype=bool)
    if strategy == "mistakes_only":
        return wrong
    if strategy == "confident_mistakes":
        return wrong & (p_wrong >= confidence)
    raise UserError(f"Unknown --filter_strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")


def run(s) -> dict:
    """Score the split with the SFT model, keep the chosen items, write the pairs and the summary."""
    from ..data import class_counts, load_split, stratified_sample
    from ..models import adapter_base_model, check_adapter_dir, check_adapter_fits

    started = time.perf_counter()
    config = dataclasses.asdict(s)
    # Every check on the input runs before anything is written, so a refused run leaves a
    # previous run's pairs, summary and completion record as they were. The inputs come first: a missing or
    # bad input is the problem to report, not that the output file holds another run's pairs (whose
    # settings differ in input_csv precisely because this one is missing).
    sft_dir = check_adapter_dir(s.sft_model)
    base_ref = adapter_base_model(sft_dir)
    refuse_adapter_on_export(None, sft_dir)  # its base since replaced by an export: mining would score that
    frame = load_split(s.input_csv, "iSarcasmEval training split")
    if s.sample_size:
        frame = stratified_sample(frame, s.sample_size, s.seed)
    out_file = Path(s.output_file)
    inputs = inputs_of(s)
    check_output_file(out_file, s, s.overwrite, inputs)
    check_adapter_fits(sft_dir, base_ref)
    note_text_lengths({"the SFT adapter": sft_dir}, s.max_text_tokens, "mining run")

    from ..metrics import classification_metrics
    from ..models import load_model, pick_device
    from ..pairs import build_pairs, check_one_answer_per_prompt, check_pair_tokens, write_pairs_file
    from ..scoring import Scorer
    from ..tracking import Tracker

    with Tracker(enabled=not s.no_wandb, project=s.wandb_project, job_type="mine", config={**config, "model": base_ref},
                 group=s.wandb_group) as tracker:
        tracker.use_artifact(sft_dir, type="model", name="sft-adapter")
        device = pick_device(s.device)
        model, tokenizer = load_model(base_ref, adapter=str(sft_dir), device=device)
        load_s = time.perf_counter() - started
        score_start = time.perf_counter()
        probs = Scorer(model, tokenizer, batch_size=s.batch_size, max_text_tokens=s.max_text_tokens,
                       progress="scoring sft (mining)").predict_proba(frame["text"].tolist())
        score_s = time.perf_counter() - score_start

        labels = frame["label"].to_numpy()
        keep = select(labels, probs, s.filter_strategy, s.confidence)
        kept = frame[keep].assign(p_sarcastic=probs[keep]).reset_index(drop=True)
        pairs = build_pairs(kept, tokenizer, s.pair_style, s.seed, s.max_text_tokens)
        if len(pairs):
            first = pairs.iloc[0]
            check_pair_tokens(tokenizer, first["prompt"], first["chosen"], first["rejected"], int(first["label"]))
        # Refused here, not first by DPO: two texts of opposite labels cut to one prompt would teach it both answers.
        check_one_answer_per_prompt(pairs, f"Mining {s.input_csv}", f"--max_text_tokens {s.max_text_tokens}",
                                    disagree="the split gives one text both labels")
        # check_output_file decided; only now, with every result in hand, is the previous run's marker cleared, so
        # a run that fails while loading or scoring (out of memory, a damaged adapter) leaves the previous pairs' record.
        marker = prepare_output_dir(marker_dir(out_file), config, overwrite=True)
        write_pairs_file(out_file, pairs)

        wrong = select(labels, probs, "mistakes_only", s.confidence)
        confident = select(labels, probs, "confident_mistakes", s.confidence)
        metrics = classification_metrics(labels, probs)
        summary = {
            "config": {**config, "model": base_ref},
            "sft_model": str(sft_dir),
            "base_model": base_ref,
            "input_csv": s.input_csv,
            "output_file": str(out_file),
            "filter_strategy": s.filter_strategy,
            "confidence": s.confidence,
            "pair_style": s.pair_style,
            "sft_on_input": {k: metrics[k] for k in ("accuracy", "precision", "recall", "f1", "macro_f1", "roc_auc",
                                                      "per_class", "confusion_matrix")},
            "counts": {"scored": class_counts(frame), "mistakes": class_counts(frame[wrong]),
                       "confident_mistakes": class_counts(frame[confident]), "kept": class_counts(kept)},
            "timings": {"load_s": round(load_s, 2), "score_s": round(score_s, 2),
                        "total_s": round(time.perf_counter() - started, 2)},
        }
        write_json(summary_path(out_file), summary)
        finish_output_dir(marker, config, {"stage": "mine", "kept": len(pairs), "output_file": str(out_file),
                                           "inputs": inputs})
        tracker.log_summary({"mine": {"kept": len(pairs), "mistakes": int(wrong.sum()), "scored": len(frame),
                                      "sft_accuracy": metrics["accuracy"], "sft_f1": metrics["f1"]}})
        tracker.log_artifact(out_file, name="mined-pairs", type="dataset",
                             metadata={"filter_strategy": s.filter_strategy, "kept": len(pairs)})

    print(describe(summary, len(pairs)))
    if not len(pairs):
        print(f"Warning: the {s.filter_strategy} filter kept no pairs, so `sarcasm-dpo dpo --preference_data "
              f"{out_file}` has nothing to train on. Use a looser --filter_strategy or a lower --confidence.")
    return summary


def describe(summary: dict, kept: int) -> str:
    counts = summary["counts"]
    acc = summary["sft_on_input"]["accuracy"]
    return (f"Mined {summary['input_csv']}: the SFT model got {acc:.1%} of {counts['scored']['total']} texts right "
            f"({counts['mistakes']['total']} mistakes, {counts['confident_mistakes']['total']} with the wrong answer "
            f"at probability >= {summary['confidence']:g}). Kept {kept} pair(s) with --filter_strategy "
            f"{summary['filter_strategy']} ({counts['kept']['sarcastic']} sarcastic, {counts['kept']['not_sarcastic']} "
            f"not) in {summary['output_file']}; summary in {summary_path(summary['output_file'])}. "
            f"Next: sarcasm-dpo dpo --sft_model {summary.get('sft_model', 'models/sft')} --preference_data "
            f"{summary['output_file']}")

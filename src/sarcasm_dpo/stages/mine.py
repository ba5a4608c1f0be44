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

The three are one output, replaced whole: a run writes them into a staging folder beside the file
(.staging-<name>-XXXXXXXX/, laid out like the folder, its marker last), and only then swaps them in:
the previous marker goes first, the pairs file and the summary are moved over the old ones, the new
marker comes last (`swap_in_outputs`). A run stopped before the swap leaves the previous pairs,
summary and marker as they were; one stopped during it leaves its complete staged set, which the
next run finishes putting in place before it looks at the file (`recover_outputs`), so the folder
never keeps two runs' files under one marker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ..atomic import (COMPLETE_MARKER, finish_output_dir, input_differences, prepare_output_dir, read_complete,
                     settings_differences, write_json)
from ..detector import note_text_lengths, refuse_adapter_on_export
from ..errors import UserError
from ..metrics import decide

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
    marker = marker_dir(out_file)
    if marker.exists() and not marker.is_dir():  # where the run's record goes when its outputs are swapped in
        raise UserError(f"{marker} is a file, where `sarcasm-dpo mine` keeps the record of the run that wrote "
                        f"{out_file.name} (a folder). Move it away, or choose another --output_file.")
    if overwrite:
        return
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


# -- the pairs file, its summary and its marker: replaced as one --------------------------------------------


def _staged_folders(out_file: Path) -> list[Path]:
    """The staging folders runs into `out_file` left beside it (`staged_outputs`' names, never another output's)."""
    from ..rundir import STAGING

    parent = out_file.parent
    if not parent.is_dir():
        return []
    name = re.compile(rf"{re.escape(STAGING)}{re.escape(out_file.name)}-[A-Za-z0-9_]{{8}}")  # mkdtemp's suffix
    return sorted(p for p in parent.iterdir() if name.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def _staged_marker(stage: Path, out_file: Path) -> Path:
    return marker_dir(stage / out_file.name) / COMPLETE_MARKER


@contextlib.contextmanager
def staged_outputs(out_file: Path, config) -> Iterator[Path]:
    """A fresh folder beside `out_file` to write the run's outputs into, laid out as `out_file`'s folder (the pairs
    file, its summary, <stem>_run/ with the marker, written last); swapped in when the block succeeds."""
    from ..atomic import _umask
    from ..rundir import STAGING

    out_file.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING}{out_file.name}-", dir=out_file.parent))
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it owner-only; outputs get the usual permissions
    try:
        yield stage
        swap_in_outputs(stage, out_file, config)
    except BaseException:
        # Stopped (Ctrl-C, a failure) once the swap had begun: the previous marker is gone and some files may be
        # the new ones already, so the complete staged set stays for the next run to finish the swap with.
        if not _staged_marker(stage, out_file).is_file() or (marker_dir(out_file) / COMPLETE_MARKER).is_file():
            shutil.rmtree(stage, ignore_errors=True)  # not begun (the previous outputs are whole), or done
        raise
    shutil.rmtree(stage, ignore_errors=True)


def swap_in_outputs(stage: Path, out_file: Path, config) -> None:
    """Put the complete staged outputs in place of `out_file`'s: the previous marker goes first (from then on the
    folder is not a finished run, and `recover_outputs` completes the swap from the staged set), the pairs file
    and the summary are moved over the old ones, the new marker comes last."""
    prepare_output_dir(marker_dir(out_file), config, overwrite=True)  # a folder, its previous marker cleared
    _move_staged(stage, out_file)


def _move_staged(stage: Path, out_file: Path) -> None:
    """The staged files into place, each in one rename (a reader sees the old file or the new one), those a stopped
    swap moved already skipped; the marker last."""
    for name in (out_file.name, summary_path(out_file).name):
        if (stage / name).is_file():
            os.replace(stage / name, out_file.parent / name)
    os.replace(_staged_marker(stage, out_file), marker_dir(out_file) / COMPLETE_MARKER)


def recover_outputs(out_file: Path) -> bool:
    """Clean up after runs into `out_file` that were stopped (call it with the output's lock held, before the file
    is checked): a complete staged set whose swap had begun (the folder's own marker is gone) is put in place;
    every other staged folder goes (unfinished, or complete but never swapped in: the previous outputs are whole).
    True when a stopped run's outputs were put in place."""
    staged = _staged_folders(out_file)
    complete = [stage for stage in staged if _staged_marker(stage, out_file).is_file()]
    finished = bool(complete) and not (marker_dir(out_file) / COMPLETE_MARKER).is_file()
    if finished:
        newest = max(complete, key=lambda stage: _staged_marker(stage, out_file).stat().st_mtime_ns)
        marker_dir(out_file).mkdir(parents=True, exist_ok=True)
        _move_staged(newest, out_file)
        print(f"Note: finished the replacement of {out_file}, {summary_path(out_file).name} and "
              f"{marker_dir(out_file).name}/ that a stopped run had begun.", file=sys.stderr)
    for stage in staged:
        shutil.rmtree(stage, ignore_errors=True)
    return finished


def select(labels: np.ndarray, probs: np.ndarray, strategy: str, confidence: float) -> np.ndarray:
    """Boolean mask of the texts that become pairs."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    wrong = decide(probs, 0.5) != labels
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
    from ..data import class_counts, load_split
    from ..sampling import stratified_sample
    from ..models import adapter_base_model, check_adapter_dir, check_adapter_fits

    started = time.perf_counter()
    config = dataclasses.asdict(s)
    out_file = Path(s.output_file)
    # First, as the CLI tidies a folder output: a run stopped while swapping its outputs in left them whole beside the
    # file, and they are put in place. Until then the folder held no marker, an interrupted mining run, which any run
    # may redo (the pipeline, deciding before this, counts on it): they are this run's to replace, --overwrite or not.
    stopped_run = recover_outputs(out_file)
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
    inputs = inputs_of(s)
    check_output_file(out_file, s, s.overwrite or stopped_run, inputs)
    check_adapter_fits(sft_dir, base_ref)
    note_text_lengths({"the SFT adapter": sft_dir}, s.max_text_tokens, "mining run")

    from ..metrics import classification_metrics
    from ..models import load_model, pick_device
    from ..pairs import build_pairs, check_one_answer_per_prompt, check_pair_tokens, write_pairs_file
    from ..scoring import Scorer
    from ..tracking import Tracker, adapter_artifact

    with Tracker(enabled=not s.no_wandb, project=s.wandb_project, job_type="mine", config={**config, "model": base_ref},
                 group=s.wandb_group) as tracker:
        tracker.use_artifact(sft_dir, type="model", name=adapter_artifact("sft"))
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
        # check_output_file decided; the outputs are staged beside the file and swapped in whole once complete, so a
        # run that fails or is stopped before the swap (while loading, scoring or writing) leaves the previous pairs,
        # summary and record as they were.
        with staged_outputs(out_file, config) as stage:
            write_pairs_file(stage / out_file.name, pairs)
            write_json(summary_path(stage / out_file.name), summary)
            marker = prepare_output_dir(marker_dir(stage / out_file.name), config, overwrite=True)
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

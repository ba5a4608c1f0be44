"""Phase 2: Direct Preference Optimisation on iSarcasmEval, from the SFT adapter, with TRL's DPOTrainer.

The policy is the SFT adapter itself, trained further. The reference is the frozen SFT model: TRL
copies the loaded adapter into a second, frozen adapter named "ref" on the same base weights, so
there is no second copy of the model in memory, and at step 0 policy and reference are identical
(KL exactly 0, rewards 0 up to float rounding: the reference's log-probs of every pair are computed
once before training, in other batches, see fast_dpo.py). Only the trained adapter is saved, so

    PeftModel.from_pretrained(base, "models/dpo_enhanced")

is the DPO model. Preference pairs come from the iSarcasmEval training split (its validation split
is only evaluated), with THE prompt used by SFT and evaluation (see pairs.py), or from a file
mined by `sarcasm-dpo mine` (--preference_data). --sample_size draws from them, seeded: stratified by
class, or with --balance (and every --pairs spec but reasoning or mined alone) as many pairs of each
class, the smaller class's count or half of --sample_size (sampling.equal_class_sample; a pair's class is
the answer it prefers); a tweet's rephrase pair comes with it or not at all. The summary's `pairs`
record says what was done: `balanced`, `sampling`, `class_counts` and `available_class_counts`.

    sarcasm-dpo dpo --sft_model models/sft --output_dir models/dpo_enhanced --beta 0.1 --epochs 3 --no_wandb
    python scripts/dpo_train_v2.py --beta_sweep --betas 0.01,0.1,0.5 --no_wandb

Diagnostics (training/diagnostics.py has the exact definitions): at every logging step TRL's rewards/* and a
reward ratio exp(margin/beta); at every evaluation, every --diagnostics_steps (default about four
times per epoch) and the last step, the exact KL of the answer-position distribution to the
reference over a fixed probe set of validation prompts, the drift of the adapter from SFT and the
share of probe predictions that flipped. Validation F1 on the GEN validation split (iSarcasmEval validation
F1 beside it) is measured at step 0 and every epoch (or --eval_steps); the best adapter on GEN
validation by --select_by (F1 at 0.5, balanced accuracy at its own validation threshold, or ROC-AUC)
is saved, which may be the SFT start itself if DPO never beat it; training stops after --patience
evaluations without improvement.

Outputs in --output_dir, each written atomically, COMPLETE.json last: the adapter,
dpo_epoch_metrics.json, dpo_batch_metrics.json, dpo_training_curves.png, dpo_training_summary.json.
--beta_sweep trains one model per --betas value (sweep.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import clear_complete, finish_output_dir, read_json, write_json
from ..detector import note_text_lengths, refuse_adapter_on_export
from ..errors import UserError
from ..metrics import fmt
from ..thresholds import THRESHOLD_FILE, read_threshold, write_threshold
from ..training.checkpoints import CHECKPOINTS
from ..training.diagnostics import DEFINITIONS
from ..run_context import RunContext
from ..training.fast_dpo import describe_step, dpo_trainer_class, is_label_pairs
from ..training.fused_head import project_labelled_positions_only
from ..tracking import adapter_artifact

PRIMARY = "gen_val"  # its F1 picks the saved checkpoint and the best beta
SECONDARY = "isarcasm_val"  # reported beside it
# The records' keys above name the roles; messages about a file's content name the file by the setting that gave it.
VAL_FILES = {PRIMARY: "val_csv", SECONDARY: "isarcasm_val_csv"}
STATE_FILE = "dpo_state.json"  # in each checkpoint, written last: the checkpoint is complete
EPOCH_FILE = "dpo_epoch_metrics.json"
BATCH_FILE = "dpo_batch_metrics.json"
CURVES_FILE = "dpo_training_curves.png"
SUMMARY_FILE = "dpo_training_summary.json"
SFT_ARTIFACT = adapter_artifact("sft")  # the SFT stage logs its folder under this name; we declare it as input
DPO_ARTIFACT = adapter_artifact("dpo")

def run(settings) -> dict:
    """One DPO run, or a beta sweep with --beta_sweep; returns the summary."""
    settings.validate()  # the CLI validated already; a caller from Python may not have
    if settings.beta_sweep:
        import sys

        from .sweep import run_sweep

        # The sweep drives this module's train() once per beta; it is handed this module rather than
        # importing it, so dpo -> sweep is the only import between the two (no cycle).
        return run_sweep(settings, sys.modules[__name__])
    return train(settings)


# -- one run -------------------------------------------------------------------------------------------


@dataclass
class Trained:
    """What `fit` hands to the save phase."""

    trainer: Any  # the DPOTrainer that ran
    validation: Any  # DPOValidationCallback: F1 history, best step and its adapter
    diagnostics: Any  # DPODiagnosticsCallback: KL, drift, flips and TRL's rewards per logged step
    batch: dict  # the batch settings the run ended with (--auto_find_batch_size may shrink them)


def train(s, run_name: str | None = None) -> dict:
    """Train DPO from the SFT adapter, keep the best adapter by its GEN validation --select_by score, save it and its record.

    Under `accelerate launch` / `torchrun` every process trains; only the main one writes files and logs.
    """
    from ..models import adapter_base_model, check_adapter_dir, check_adapter_fits, load_tokenizer, pick_device
    from ..training.checkpoints import final_outputs, plan_run_dir
    from ..training.distributed import barrier, is_main_process

    ctx = RunContext(s, Path(s.output_dir), main=is_main_process())
    sft_dir = check_adapter_dir(s.sft_model)  # before the heavy imports: a wrong folder fails at once
    ctx.model = adapter_base_model(sft_dir)
    refuse_adapter_on_export(None, sft_dir)  # its base since replaced by an export: training would start from that

    from ..tracking import Tracker

    # Setup. Every check on the input runs before the output folder is touched, so a run refused for
    # any reason leaves a previous result in --output_dir byte for byte as it was.
    ctx.inputs = inputs_of(s)
    finished = finished_with(ctx.out, s, ctx.inputs)
    if s.resume and finished:
        if ctx.main:
            print(f"{ctx.out} already holds the finished run of these settings; nothing to resume.")
        return read_json(ctx.out / SUMMARY_FILE)
    tokenizer = load_tokenizer(ctx.model)
    note_text_lengths({"the SFT adapter": sft_dir}, s.max_text_tokens, "DPO run")
    data = load_data(s, tokenizer)
    check_adapter_fits(sft_dir, ctx.model)
    ctx.resume_from = plan_run_dir(ctx.out, s, finished=finished, state_file=STATE_FILE, inputs=ctx.inputs)

    import transformers

    transformers.set_seed(s.seed)
    ctx.device = pick_device(s.device)
    model = load_policy(ctx.model, sft_dir, ctx.device)
    ctx.timings["load_s"] = time.perf_counter() - ctx.started

    with Tracker(enabled=not s.no_wandb and ctx.main, project=s.wandb_project, job_type="dpo",
                 config={**ctx.config, "model": ctx.model}, group=s.wandb_group, name=run_name) as ctx.tracker:
        ctx.tracker.use_artifact(sft_dir, type="model", name=SFT_ARTIFACT)

        # Train (out of memory: smaller batches or a clear message; Ctrl-C / SIGTERM: a checkpoint first).
        with ctx.timed("train_s"):
            trained = fit(ctx, model, tokenizer, data)
        # Here, to keep the summary's key order; updated after the save phase, which measures once more.
        ctx.timings["eval_s"] = trained.validation.eval_seconds
        ctx.timings["diagnostics_s"] = trained.diagnostics.seconds

        # Save: the best adapter by GEN validation (--select_by), then the record of how it was made, the marker last; all
        # into a staging folder that replaces the output folder whole (a kill mid-save leaves no mix of two runs).
        with final_outputs(ctx.out, ctx.main) as folder:
            with ctx.timed("save_s"):
                epochs, saved_diagnostics = save_outputs(ctx, trained, tokenizer, folder)
            ctx.timings.update(eval_s=trained.validation.eval_seconds, diagnostics_s=trained.diagnostics.seconds)
            ctx.total()
            summary = build_summary(ctx, data, trained, epochs, saved_diagnostics)
            if ctx.main:
                write_json(folder / SUMMARY_FILE, summary)
                finish_output_dir(folder, ctx.config, {"stage": "dpo", "best_step": summary["best_step"],
                                                       "best_f1": summary["best_f1"],
                                                       "beta": s.beta, "inputs": ctx.inputs})
        barrier()  # the other processes end when the outputs are in place

        ctx.tracker.log_image("dpo/training_curves", ctx.out / CURVES_FILE)
        ctx.tracker.log_summary({"best_step": summary["best_step"], "best_f1": summary["best_f1"],
                                 "improved_over_sft": summary["improved_over_sft"], "health": summary["health"],
                                 "final": summary["diagnostics"]["end_of_training"], "timings": summary["timings"]})
        ctx.tracker.log_artifact(ctx.out, name=DPO_ARTIFACT, type="model",
                                 metadata={"base_model": ctx.model, "beta": s.beta, "best_step": summary["best_step"],
                                           "best_val_f1": summary["best_f1"]})
    if ctx.main:
        print(describe_result(summary, ctx.out))
    return summary


def load_policy(base_ref: str, sft_dir: Path, device):
    """The base model with the SFT adapter on it, trainable (TRL adds the frozen "ref" copy)."""
    from ..models import attach_adapter, load_base_model

    return attach_adapter(load_base_model(base_ref, device), sft_dir, trainable=True)


def fit(ctx: RunContext, model, tokenizer, data: DPOData) -> Trained:
    """Build the trainer and train; returns what the save phase needs.

    Out of memory: with --auto_find_batch_size each retry halves the batch, doubles gradient
    accumulation and starts over from the SFT adapter and the same seed (resilience.train_within_memory).
    Ctrl-C / SIGTERM: the current step finishes, a checkpoint is written, StopRequested ends the run.
    A NaN/inf loss stops it with the step and the last good checkpoint named.
    """
    import transformers

    from ..training.checkpoints import claim_run_dir, latest_checkpoint
    from ..training.distributed import quiet, say
    from ..training.recipe import run_trainer
    from ..training.resilience import TrainingDiverged, fit_within_memory, free_memory

    s, out, resume_from, main = ctx.settings, ctx.out, ctx.resume_from, ctx.main
    current = model  # the model the next attempt trains; a retry loads a fresh copy of the SFT start
    claimed = False  # the output folder is taken over once, by the first attempt whose trainer exists

    def attempt(batch_size: int, grad_accum: int, eval_batch_size: int, flag):
        nonlocal current, claimed
        if claimed:  # a retry: a fresh copy of the SFT starting point, the same seed
            current = None
            free_memory()
            transformers.set_seed(s.seed)
            current = load_policy(ctx.model, Path(s.sft_model), ctx.device)
        sized = dataclasses.replace(s, batch_size=batch_size, grad_accum=grad_accum, eval_batch_size=eval_batch_size)
        trainer, validation, diagnostics = build_trainer(sized, current, tokenizer, data, out / CHECKPOINTS,
                                                         ctx.tracker.log, stop_flag=flag,
                                                         printer=say if main else quiet)
        if resume_from:
            load_state(resume_from, validation, diagnostics)
        if not claimed:
            claim_run_dir(out, s, resume_from, ctx.inputs)
            claimed = True
        if main:
            print(describe_start(sized, data, ctx.model, ctx.device, resume_from))
        try:
            run_trainer(trainer, resume_from)
        except TrainingDiverged as exc:
            if main:
                clear_complete(out)  # the metrics below are this run's: the previous run's marker would lie
                write_json(out / BATCH_FILE, batch_metrics(s, diagnostics))
            raise exc.explained("DPO training", latest_checkpoint(out / CHECKPOINTS, STATE_FILE),
                                f"Lower --lr (now {s.lr:g}) or raise --warmup_ratio, then start over with --overwrite; "
                                f"the metrics up to that step are in {out / BATCH_FILE}.") from None
        return trainer, validation, diagnostics

    (trainer, validation, diagnostics), used = fit_within_memory(attempt, s, "dpo", ctx.device)
    return Trained(trainer, validation, diagnostics, used)


def save_outputs(ctx: RunContext, trained: Trained, tokenizer, folder: Path) -> tuple[dict, dict]:
    """The best adapter, its decision threshold (chosen on GEN validation), metrics and curves into `folder`
    (the staging folder of the output); returns (epoch metrics, the saved adapter's diagnostics)."""
    from ..training.checkpoints import save_adapter

    s, trainer, validation, diagnostics = ctx.settings, trained.trainer, trained.validation, trained.diagnostics
    validation.restore_best(trainer.model)
    saved_diagnostics = diagnostics.measure(trainer.model)
    epochs = epoch_metrics(s, validation, diagnostics)
    threshold = validation.threshold_record(trainer.model)
    if validation.best_step == 0:
        threshold = kept_start_threshold(s.sft_model, threshold)
    if ctx.main:
        save_adapter(trainer.model, tokenizer, folder, selected_adapters=["default"])  # never TRL's "ref" copy
        write_threshold(folder, threshold)
        write_json(folder / EPOCH_FILE, epochs)
        write_json(folder / BATCH_FILE, batch_metrics(s, diagnostics))
        from ..plots import plot_dpo_curves

        plot_dpo_curves(diagnostics.records, validation.history, folder / CURVES_FILE,
                        best_step=validation.best_step, primary=PRIMARY)
    return epochs, saved_diagnostics


def kept_start_threshold(sft_dir, chosen_here: dict) -> dict:
    """The threshold of a DPO run that kept its SFT start unchanged: the SFT adapter's own, when it has one.

    The saved adapter then IS the SFT adapter, so it must decide as SFT does; a threshold chosen again on this
    run's validation sample (another sample size, another file) would make the same weights score differently
    in compare, a "gain" of nothing."""
    inherited = read_threshold(sft_dir)
    if inherited is None:
        return chosen_here
    return {**inherited, "inherited_from": str(Path(sft_dir).resolve()),
            "note": "DPO kept its SFT start unchanged, so this is the SFT adapter's threshold."}


# -- data ------------------------------------------------------------------------------------------------


@dataclass
class DPOData:
    pairs: object  # DataFrame: prompt, chosen, rejected (+ text, label, id, p_sarcastic)
    val_sets: dict  # name -> DataFrame(text, label); the first is PRIMARY
    probe_texts: list[str]
    info: dict = field(default_factory=dict)


def load_data(s, tokenizer) -> DPOData:
    """Preference pairs (built or read), validation splits and the fixed probe set."""
    from ..data import check_validation_split, load_split, overlap_count
    from ..sampling import stratified_sample
    from ..pairs import (build_pairs, check_one_answer_per_prompt, check_prompts_match, fit_pairs, load_pairs_file,
                         prefers_yes)

    gen_val = load_split(s.val_csv, "GEN validation split")
    full_val = {PRIMARY: gen_val}
    if s.isarcasm_val_csv:
        full_val[SECONDARY] = load_split(s.isarcasm_val_csv, "iSarcasmEval validation split")
    val_sets = {name: stratified_sample(frame, s.val_sample_size, s.seed) for name, frame in full_val.items()}
    # Early stopping, the saved checkpoint and its threshold are all chosen on GEN validation: the file, then the
    # --val_sample_size sample of it, must hold both classes (checked in that order, so the message names the cause).
    check_validation_split(gen_val, s.val_csv)
    check_validation_split(val_sets[PRIMARY], s.val_csv, s.val_sample_size)
    # Fixed probe set for KL and flips: the first --probe_size rows of a seeded shuffle of GEN val.
    probe = gen_val.sample(frac=1.0, random_state=s.seed).head(s.probe_size)["text"].tolist()

    if s.pairs:
        pairs, source, available, balanced, sampling, offered = preference_pairs(s, tokenizer, full_val)
    elif s.preference_data:
        pairs = load_pairs_file(s.preference_data)
        check_prompts_match(pairs, tokenizer, s.max_text_tokens, s.preference_data)
        source, available, offered = s.preference_data, len(pairs), prefers_yes(pairs)
        # A pair's class is the answer it prefers, which every pair has (its label, where given, agrees).
        pairs, sampling = sample_rows(pairs, s, offered, what=f"the pairs of {source}")
        balanced = bool(s.balance)
    else:
        train = load_split(s.train_csv, "iSarcasmEval training split")
        if train["label"].nunique() < 2:
            raise UserError(f"{s.train_csv} holds only one class; preference pairs need examples of both.")
        source, available, offered = s.train_csv, len(train), train["label"].astype(int) == 1
        rows, sampling = sample_rows(train, s, offered)
        pairs = build_pairs(rows, tokenizer, s.pair_style, s.seed, s.max_text_tokens)
        balanced = bool(s.balance)
    # Over --max_length: the text is cut further, never the answer (the rule of prompts.build_prompts, as in SFT).
    pairs = fit_pairs(pairs, tokenizer, s.max_text_tokens, s.max_length)
    # Whatever the source, cutting texts may leave two texts of opposite labels one prompt.
    check_one_answer_per_prompt(pairs, f"The preference pairs from {source}",
                                f"--max_text_tokens {s.max_text_tokens} (and --max_length {s.max_length})",
                                disagree="their pairs disagree on its label")
    requested = s.sample_size or None
    capped = bool(requested and requested > available)
    yes = prefers_yes(pairs)  # by the answer each pair prefers (a file's labels, where given, agree: load_pairs_file)
    counts = {"sarcastic": int(yes.sum()), "not_sarcastic": int((~yes).sum())}
    if balanced and counts["sarcastic"] != counts["not_sarcastic"]:  # the sample rules make them equal
        raise RuntimeError(f"A class-balanced sample came out unequal: {counts}.")
    note = sampling_note(requested, source, available, offered, len(pairs), balanced)
    if note:
        print(note)

    if "text" in pairs.columns:  # pairs without their text (a hand-made file) cannot be checked
        with_text = pairs[pairs["text"].map(lambda t: isinstance(t, str))]
        for name, frame in full_val.items():
            shared = overlap_count(with_text, frame)
            if shared:
                # Named by its file: PRIMARY and SECONDARY are the record's keys, whatever file the flag named.
                flag = VAL_FILES[name]
                raise UserError(f"{shared} training pair text(s) of {source} also appear in the validation file "
                                f"{getattr(s, flag)} (--{flag}); validation F1 would be inflated. Build the "
                                "pairs from the training split only (sarcasm-dpo split, mine).")
    check_pairs(pairs, tokenizer)
    # `balanced`: what was done (as many pairs of each class), not the --balance flag: rephrase+label is balanced
    # without it. `available_class_counts`: of the rows or pairs sampled from (for --pairs, after its balancing).
    info = {"source": "preference_data" if s.preference_data and not s.pairs else "built", "file": source,
            "pair_style": s.pair_style if not s.preference_data and not s.pairs else "as in the file",
            "requested": requested, "available": available, "used": len(pairs), "capped": capped,
            "balanced": bool(balanced), "sampling": sampling,
            "available_class_counts": {"sarcastic": int(offered.sum()), "not_sarcastic": int((~offered).sum())},
            "class_counts": counts}
    if s.pairs:
        info.update(pair_style="as its source builds it", pairs_spec=s.pairs,
                    pair_sources={k: int(v) for k, v in pairs["pair_source"].value_counts().sort_index().items()})
    return DPOData(pairs=pairs.reset_index(drop=True), val_sets=val_sets, probe_texts=probe, info=info)


def preference_pairs(s, tokenizer, val_splits: dict) -> tuple:
    """(pairs, where they came from, how many there were, whether they are class-balanced, how they were sampled,
    the class of each pair there was) for --pairs (pairs.build_preference_pairs), cut to --sample_size: at random,
    seeded, with as many pairs of each class where the spec is balanced (sampling.equal_class_sample), and a tweet's
    pair and its rephrase's kept or dropped together (pairs.tweet_units)."""
    from ..data import load_split
    from ..sampling import equal_class_sample, stratified_rows, unit_sample
    from ..pairs import build_preference_pairs, is_balanced, parse_pairs_spec, prefers_yes, tweet_units

    sources = parse_pairs_spec(s.pairs)
    train = None
    if sources != ("mined",):
        train = load_split(s.train_csv, "iSarcasmEval training split")
        if "rephrase" in sources:
            train = with_rephrases(s, train, val_splits)
    balance = True if s.balance else None  # no --balance: each spec's own default
    balanced = is_balanced(sources, balance)
    pairs = build_preference_pairs(s.pairs, train, tokenizer, seed=s.seed, max_text_tokens=s.max_text_tokens,
                                   balance=balance, mined_file=s.preference_data)
    available, offered = len(pairs), prefers_yes(pairs)
    origin = f"{s.pairs} from {s.train_csv if train is not None else s.preference_data}"
    sampling = "all"
    if s.sample_size and s.sample_size < available:
        units = tweet_units(pairs)
        alone = len(set(units)) == len(units)  # no tweet with its rephrase: every pair a unit of its own
        if balanced:
            pairs, sampling = equal_class_sample(pairs, s.sample_size, s.seed, positive=offered, units=units,
                                                 what=f"the --pairs {origin} pairs"), "balanced"
        elif alone:  # reasoning or mined alone: drawn as --pair_style rows and a pairs file are
            pairs, sampling = stratified_rows(pairs, s.sample_size, s.seed, offered), "stratified"
        else:
            pairs, sampling = unit_sample(pairs, s.sample_size, s.seed, units), "random"
    return pairs.reset_index(drop=True), origin, available, balanced, sampling, offered


def with_rephrases(s, train, val_splits: dict):
    """The training split with its tweets' rephrases, then checked: no tweet or rephrase of one split is a text
    of another (rephrases.check_rephrase_sides).

    The rephrases come from the training file's own `rephrase` column where it has one (a file of one's own in
    the raw iSarcasmEval layout), else from the raw iSarcasmEval file the splits were made from (split_info.json
    beside --train_csv names it and its sha256; else found as `split` finds data), joined on the row id. The
    iSarcasmEval validation file's rephrases count in the check too: its own column's, else the raw file's for
    the tweets it shares with it, matched by text (a plain text,label file carries no raw ids)."""
    from ..rephrases import attach_by_text, attach_rephrases, check_rephrase_sides, file_rephrases

    raw: list = []  # the raw file's rephrases, read once and only when needed

    def raw_table():
        if not raw:
            raw.append(_raw_rephrases(s.train_csv))
        return raw[0]

    own = file_rephrases(s.train_csv)
    train = attach_rephrases(train, own if own is not None else raw_table(), "iSarcasmEval training file",
                             s.train_csv)
    splits = {"isarcasm_train": train, **val_splits}
    if SECONDARY in val_splits:
        own_val = file_rephrases(s.isarcasm_val_csv)
        val = val_splits[SECONDARY]
        splits[SECONDARY] = (attach_rephrases(val, own_val, "iSarcasmEval validation file", s.isarcasm_val_csv)
                             if own_val is not None and len(own_val) else attach_by_text(val, raw_table()))
    check_rephrase_sides(splits)
    return train


def _raw_rephrases(train_csv):
    """The rephrases of the raw iSarcasmEval file: the one split_info.json beside `train_csv` names, while its
    sha256 still matches, else the one `split` would read."""
    from ..atomic import has_sha256, read_json
    from ..data import ISARCASM_RELPATH
    from ..download import ensure_data_dir
    from ..rephrases import load_rephrases

    info_file = Path(train_csv).parent / "split_info.json"
    if info_file.is_file():
        source = (read_json(info_file).get("sources") or {}).get("isarcasmeval") or {}
        path = Path(source.get("path") or "")
        if source.get("path") and has_sha256(path, source.get("sha256")):
            return load_rephrases(path)
    return load_rephrases(ensure_data_dir(None, keys=["isarcasmeval"]) / ISARCASM_RELPATH)


def sample_rows(frame, s, positive=None, what: str | None = None):
    """(--sample_size rows, how they were drawn): all when empty, 0 or more than there are ("all"); else, seeded,
    with --balance as many of each class (sampling.equal_class_sample: the smaller class's count, or half of
    --sample_size when that is fewer; "balanced"), else stratified ("stratified"). `positive`: each row's class
    (default: label == 1; a pair's is the answer it prefers, pairs.prefers_yes, which every pair has)."""
    from ..sampling import equal_class_sample, stratified_rows

    positive = frame["label"].astype(int) == 1 if positive is None else positive
    if s.balance:
        return equal_class_sample(frame, s.sample_size, s.seed, positive=positive,
                                  what=what or f"the rows of {s.train_csv}"), "balanced"
    drawn = s.sample_size and s.sample_size < len(frame)
    return stratified_rows(frame, s.sample_size, s.seed, positive), "stratified" if drawn else "all"


def sampling_note(requested: int | None, source: str, available: int, offered, used: int, balanced: bool) -> str:
    """The note printed when the pairs are fewer than --sample_size asked for (or than there are), saying why."""
    yes, no = int(offered.sum()), int(len(offered) - offered.sum())
    wanted = min(requested or available, available)
    if balanced and used < wanted:
        smaller = "sarcastic" if yes < no else "non-sarcastic"
        why = (f"the smaller class, {smaller}, has {min(yes, no)} of the {available} in {source}"
               if used == 2 * min(yes, no) else f"--sample_size {requested} is odd")
        return (f"Note: class-balanced: {used // 2} pairs of each class, {used} in all ({why}"
                + (f"; --sample_size {requested} asked for more than there are" if requested and requested > available
                   else "") + ").")
    if requested and requested > available:
        return (f"Note: --sample_size {requested} asks for more pairs than {source} holds ({available}); "
                f"using all {available}.")
    return ""


def check_pairs(pairs, tokenizer) -> None:
    """Both answers start with the scorer's label token, checked once per form of pair: how its prompt ends and
    how each answer opens (label word and the character after it), which is all that decides whether a tokenizer
    merges the label word with its neighbours. Whether the words are right is checked on every pair where the
    pairs are made or read (pairs.load_pairs_file)."""
    from ..pairs import answer_word, check_pair_tokens

    def opening(answer: str) -> str:
        word = answer_word(answer)
        return answer[: answer.index(word) + len(word) + 1]

    seen = set()
    for row in pairs.itertuples(index=False):
        key = (row.prompt[-1:], opening(row.chosen), opening(row.rejected))
        if key in seen:
            continue
        seen.add(key)
        label = getattr(row, "label", None)
        check_pair_tokens(tokenizer, row.prompt, row.chosen, row.rejected, None if _missing(label) else int(label))


def _missing(value) -> bool:
    """A pair without a label: None (a file's pair without one) or NaN (pandas' gap in a numeric column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


# -- trainer ---------------------------------------------------------------------------------------------


def dpo_args(s, model, ckpt_dir: Path):
    from trl import DPOConfig

    from ..training.recipe import trainer_arguments

    if s.save_steps:
        save = {"save_strategy": "steps", "save_steps": s.save_steps}
    elif s.eval_steps:  # a checkpoint at each evaluation keeps the early-stopping state in step with it
        save = {"save_strategy": "steps", "save_steps": s.eval_steps}
    else:
        save = {"save_strategy": "epoch"}
    return DPOConfig(
        **trainer_arguments(s, model, ckpt_dir),
        activation_checkpointing=s.gradient_checkpointing,  # TRL defaults to on; here only when asked
        beta=s.beta,
        loss_type=[s.loss_type],
        # The "ref" adapter's log-probs of every pair, once before training (fast_dpo.py), or on the fly each step.
        precompute_ref_log_probs=s.precompute_ref,
        **save,
    )


def build_trainer(s, model, tokenizer, data: DPOData, ckpt_dir: Path, log=None, stop_flag=None, printer=print):
    """DPOTrainer on the SFT PeftModel (TRL adds the frozen "ref" copy), with our callbacks.

    With `stop_flag` (resilience.stop_on_signal) a Ctrl-C / SIGTERM ends training with a checkpoint.
    """
    from datasets import Dataset

    from ..training.callbacks import install_callbacks, stage_callbacks
    from ..training.diagnostics import DPODiagnosticsCallback, DPOValidationCallback
    from ..training.lean_step import lean
    from ..training.recipe import seeded_length_grouping
    from ..training.trl_tokens import check_trl_tokens, trl_prompts, trl_tokenizer

    given = trl_tokenizer(tokenizer)  # adds no special tokens of its own: TRL reads the scorer's tokens
    prompts = trl_prompts(given, data.pairs["prompt"])
    dataset = Dataset.from_dict({"prompt": prompts, "chosen": list(data.pairs["chosen"]),
                                 "rejected": list(data.pairs["rejected"])})
    validation = DPOValidationCallback(tokenizer, data.val_sets, batch_size=s.eval_batch_size,
                                       max_text_tokens=s.max_text_tokens, eval_steps=s.eval_steps,
                                       patience=s.patience, eval_at_start=True, log=log, printer=printer,
                                       select_by=s.select_by)
    project_labelled_positions_only()  # CPU/MPS: the LM head on the completion rows only (fused_head.py)
    try:
        one_pass = s.one_pass and is_label_pairs(data.pairs)
        printer(describe_step(one_pass, s.precompute_ref, s.shared_prefix, one_pass and s.pack_pairs))
        trainer_class = dpo_trainer_class(precompute_ref=s.precompute_ref, one_pass=one_pass,  # TRL's + fast paths
                                          shared_prefix=s.shared_prefix, pack_pairs=s.pack_pairs)
        trainer = seeded_length_grouping(lean(trainer_class))(model=model, ref_model=None, args=dpo_args(s, model, ckpt_dir), train_dataset=dataset,
                             processing_class=given, callbacks=[validation])
    except ValueError as exc:  # TRL's checks on the settings (e.g. a loss type that needs other options)
        raise UserError(f"TRL's DPOTrainer refused these settings: {exc}") from None
    if "ref" not in model.peft_config:
        raise RuntimeError("DPOTrainer did not add the frozen 'ref' adapter; the reference would not be the SFT model.")
    check_trl_tokens(trainer.train_dataset, prompts, given, s.max_length, what="Pair",
                     fix="use --pair_style label or another model")
    diagnostics = DPODiagnosticsCallback(model, tokenizer, data.probe_texts, beta=s.beta,
                                         batch_size=s.eval_batch_size, max_text_tokens=s.max_text_tokens, log=log,
                                         diagnostics_steps=s.diagnostics_steps, printer=printer)
    validation.diagnostics = diagnostics
    # The trainer holds `validation` already; the rest follow it, in stage_callbacks' order.
    install_callbacks(trainer, stage_callbacks(validation, lambda folder: save_state(folder, validation, diagnostics),
                                               save_each_epoch=bool(s.save_steps or s.eval_steps),
                                               stop_flag=stop_flag, diagnostics=diagnostics), "dpo")
    return trainer, validation, diagnostics


# -- checkpoints and resume ------------------------------------------------------------------------------


def save_state(folder: Path, validation, diagnostics) -> None:
    """Validation history, best adapter and diagnostics beside a Trainer checkpoint; the state file last."""
    from ..training.checkpoints import save_checkpoint_state

    save_checkpoint_state(folder, STATE_FILE, {"validation": validation.state_dict(),
                                               "diagnostics": diagnostics.state_dict()}, validation.best_state)


def load_state(folder: Path, validation, diagnostics) -> None:
    from ..training.checkpoints import load_checkpoint_state

    state, best = load_checkpoint_state(folder, STATE_FILE)
    validation.load_state_dict(state["validation"])
    diagnostics.load_state_dict(state["diagnostics"])
    if best is not None:
        validation.best_state = best


def inputs_of(s) -> dict[str, str]:
    """The checksums of what DPO reads (the SFT adapter, the splits, a pairs file): a finished (or stopped)
    run from another SFT adapter or other data is not this run's, though its settings are the same."""
    from ..rundir import input_identity

    return input_identity({"sft_model": s.sft_model, "train_csv": s.train_csv, "val_csv": s.val_csv,
                           "isarcasm_val_csv": s.isarcasm_val_csv, "preference_data": s.preference_data})


def finished_with(out: Path, s, inputs: dict | None = None) -> bool:
    """True when `out` holds a finished run of these settings, from the same SFT adapter (its config and weights,
    `inputs_of`) and data (`inputs`: `inputs_of(s)`, when the caller has them already)."""
    from ..training.checkpoints import finished_record

    return finished_record(out, s, SUMMARY_FILE, inputs if inputs is not None else inputs_of(s)) is not None


# -- outputs ---------------------------------------------------------------------------------------------


def _window_means(records: list[dict], after: int, upto: int, beta: float) -> dict | None:
    """Mean training metrics per optimizer step over the steps in (after, upto]; the ratio from the mean margin.

    Each logged row is the mean over the steps since the log before it, so rows count by the steps they
    cover: a log forced off the schedule (a checkpoint on Ctrl-C, an epoch's end) splits a window in two
    without changing its mean, and a resumed run reports what the uninterrupted one does. A metric a row
    lacks (the lean trainer computes TRL's rewards only on steps it knows will log, not on a forced stop)
    is the mean over the steps that measured it.
    """
    from ..training.diagnostics import reward_ratio

    logged = sorted((r for r in records if "train/loss" in r), key=lambda r: r["step"])
    covered = {id(r): r["step"] - (logged[i - 1]["step"] if i else 0) for i, r in enumerate(logged)}
    rows = [r for r in logged if after < r["step"] <= upto]
    if not rows:
        return None
    keys = ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    means = {}
    for key in keys:
        having = [(r[key], covered[id(r)]) for r in rows if r.get(key) is not None]
        if having and sum(w for _, w in having) > 0:
            means[key] = sum(v * w for v, w in having) / sum(w for _, w in having)
    means["dpo/reward_ratio"] = reward_ratio(means.get("rewards/margins"), beta)
    means["logged_steps"] = len(rows)
    return means


def epoch_metrics(s, validation, diagnostics) -> dict:
    """One record per evaluation: F1 on each split, the diagnostics of those weights, and the mean
    training metrics since the previous evaluation."""
    evaluations = []
    previous = 0
    for h in validation.history:
        record = dict(h)
        record["train"] = _window_means(diagnostics.records, previous, h["step"], s.beta) if h["step"] else None
        record["selected"] = h["step"] == validation.best_step
        evaluations.append(record)
        previous = h["step"]
    return {"primary_split": PRIMARY, "validation_rows": {k: len(v) for k, v in validation.val_sets.items()},
            "beta": s.beta, "best_step": validation.best_step, "best_epoch": validation.best_epoch,
            "best_f1": validation.best_f1, "stopped_early": validation.stopped_early, "evaluations": evaluations}


def batch_metrics(s, diagnostics) -> dict:
    return {"beta": s.beta, "logging_steps": s.logging_steps, "probe_size": len(diagnostics.encoded),
            "definitions": DEFINITIONS, "steps": diagnostics.records}


def build_summary(ctx: RunContext, data: DPOData, trained: Trained, epochs: dict, saved: dict) -> dict:
    from ..data import class_counts, frame_checksum
    from ..training.diagnostics import kl_verdict, ratio_verdict
    from ..training.recipe import run_record

    s, trainer, validation, diagnostics = ctx.settings, trained.trainer, trained.validation, trained.diagnostics
    history = validation.history
    best = next((h for h in history if h["step"] == validation.best_step), None)
    start = next((h for h in history if h["step"] == 0), None)
    logged = [r for r in diagnostics.records if "train/loss" in r]
    last = logged[-1] if logged else (diagnostics.records[-1] if diagnostics.records else {})
    last_eval = epochs["evaluations"][-1] if epochs["evaluations"] else {}
    window = last_eval.get("train") or {}
    ratio = window.get("dpo/reward_ratio", last.get("dpo/reward_ratio"))
    return {
        "config": {**ctx.config, "model": ctx.model},  # models.adapter_base_model reads config.model
        "base_model": ctx.model,
        "sft_model": str(Path(s.sft_model)),
        "reference": "frozen copy of the SFT adapter (TRL's 'ref' adapter on the same base weights)",
        "best_step": validation.best_step,
        "best_epoch": validation.best_epoch,
        "best_f1": validation.best_f1 if math.isfinite(validation.best_f1) else None,
        "selected_by": s.select_by,
        "best_score": validation.best_score if math.isfinite(validation.best_score) else None,
        "best_val": {k: best[k] for k in validation.val_sets} if best else None,
        "sft_start_val": {k: start[k] for k in validation.val_sets} if start else None,
        "improved_over_sft": bool(best and start and validation.best_step != 0),
        "stopped_early": validation.stopped_early,
        "epochs_run": round(float(trainer.state.epoch or 0), 4),
        "global_steps": trainer.state.global_step,
        "pairs": data.info,
        "data": {"val_csv": s.val_csv, "isarcasm_val_csv": s.isarcasm_val_csv or None,
                 **{f"{k}_rows": class_counts(v) for k, v in data.val_sets.items()},
                 **{f"{k}_checksum": frame_checksum(v) for k, v in data.val_sets.items()},
                 "probe_size": len(data.probe_texts)},
        "diagnostics": {"end_of_training": last, "saved_model": saved, "definitions": DEFINITIONS},
        "health": {"measured_at_step": last.get("step"),
                   "kl": kl_verdict(last.get("dpo/kl")),
                   # The verdict reads a window's mean; the curves plot each logged step: both are kept, so
                   # the printed figure can say which it is and what the plot's last point shows.
                   "reward_ratio": {**ratio_verdict(ratio),
                                    "over": ("logging steps since the last evaluation" if "dpo/reward_ratio" in window
                                             else "the last logged step"),
                                    "logged_steps": window.get("logged_steps") if "dpo/reward_ratio" in window else None,
                                    "last_logged": {"step": last.get("step"), "value": last.get("dpo/reward_ratio")}}},
        **run_record(trainer, ctx.device, ctx.resume_from, trained.batch, ctx.timings),
        "outputs": {"adapter": "adapter_model.safetensors", "threshold": THRESHOLD_FILE, "epoch_metrics": EPOCH_FILE,
                    "batch_metrics": BATCH_FILE, "curves": CURVES_FILE},
    }


def describe_start(s, data: DPOData, base_ref: str, device, resume_from) -> str:
    info = data.info
    counts = info.get("class_counts") or {}
    classes = f" ({counts.get('sarcastic')} sarcastic, {counts.get('not_sarcastic')} not)" if counts else ""
    vals = ", ".join(f"{len(v)} texts of {getattr(s, VAL_FILES[k])}" for k, v in data.val_sets.items())
    made = (f"--pairs {info['pairs_spec']}: " + ", ".join(f"{k} {v}" for k, v in info["pair_sources"].items())
            if info.get("pairs_spec") else f"{info['pair_style']} style")
    return (f"DPO on {info['used']} preference pairs{classes} from {info['file']} ({made}); "
            f"SFT adapter {s.sft_model} on {base_ref}, {device}; reference = frozen SFT adapter; beta {s.beta:g}, "
            f"loss {s.loss_type}, {s.epochs:g} epoch(s), lr {s.lr:g}, batch {s.batch_size}x{s.grad_accum}"
            f"{_processes()}; "
            f"validating on {vals}; KL probe {len(data.probe_texts)} prompts"
            + (f"; resuming from {resume_from.name}" if resume_from else "") + ".")


def _processes() -> str:
    from ..training.distributed import world_size

    return f"x{world_size()} processes" if world_size() > 1 else ""


def _ratio_window(ratio: dict) -> str:
    """What the printed reward ratio covers, and the curves' last point beside it (they are not the same figure)."""
    n, last = ratio.get("logged_steps"), ratio.get("last_logged") or {}
    if last.get("value") is None:
        return ""
    if not n:  # the figure is the last logged step's own, the curves' last point
        return f"; at step {last['step']}, the curves' last point"
    return (f"; mean of the {n} logged steps since the last evaluation; "
            f"the curves' last point, step {last['step']}, is {fmt(last['value'], '.3g')}")


def describe_result(summary: dict, out: Path) -> str:
    minutes, seconds = divmod(int(summary["timings"]["total_s"]), 60)
    best = (summary.get("best_val") or {}).get(PRIMARY) or {}
    start = (summary.get("sft_start_val") or {}).get(PRIMARY) or {}
    health = summary["health"]
    lines = [f"DPO finished in {minutes}m{seconds:02d}s ({summary['global_steps']} steps"
             + (", stopped early" if summary["stopped_early"] else "") + ")."]
    by = summary.get("selected_by", "f1")
    score = "" if by == "f1" else f", {by} {fmt(summary.get('best_score'))}"
    # The validation file by its path (the record's PRIMARY key names its role, not the file --val_csv gave).
    val_file = (summary.get("data") or {}).get("val_csv") or "the validation file"
    if summary["improved_over_sft"]:
        lines.append(f"Best evaluation on {val_file} by {by} at step {summary['best_step']}: F1 {fmt(best.get('f1'))}"
                     f"{score} (SFT start: F1 {fmt(start.get('f1'))}); that adapter is saved in {out}/.")
    else:
        lines.append(f"DPO never beat the SFT start on {val_file} by {by} (F1 {fmt(start.get('f1'))}{score}); the "
                     f"saved adapter in {out}/ is the SFT adapter unchanged.")
    lines.append(f"End of training: KL to SFT {fmt(health['kl']['value'], '.4g')} ({health['kl']['verdict']}), "
                 f"reward ratio {fmt(health['reward_ratio']['value'], '.2f')} ({health['reward_ratio']['verdict']}"
                 f"{_ratio_window(health['reward_ratio'])}).")
    for part in (health["kl"], health["reward_ratio"]):
        if part.get("advice"):
            lines.append("Advice: " + part["advice"])
    lines.append(f"Records: {EPOCH_FILE}, {BATCH_FILE}, {CURVES_FILE}, {SUMMARY_FILE}. "
                 f"Next: sarcasm-dpo compare --sft_model {summary.get('sft_model', 'models/sft')} --dpo_model {out}")
    return "\n".join(lines)

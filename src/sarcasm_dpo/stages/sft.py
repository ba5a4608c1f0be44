"""Phase 1: LoRA supervised fine-tuning on the GEN training split, with TRL's SFTTrainer.

Every training example is the one prompt (`prompts.build_prompts`: the question in a user turn,
rendered with the model's chat template, ending with the generation prompt) and, as completion,
the label word ("Yes" = sarcastic, "No") followed by EOS. The loss covers the completion only.
After each epoch (and every --eval_steps steps when set) the shared scorer measures accuracy,
precision, recall and F1 on the GEN validation split; the adapter of the best evaluation (by F1,
or as --select_by says) is the one that is saved.

    sarcasm-dpo sft --epochs 2                                   # Qwen2.5-0.5B-Instruct, data/splits
    python scripts/finetune_qwen.py --no_wandb --epochs 1 --sample_size 200 --output_dir /tmp/sft-smoke

What lands in --output_dir (default models/sft), each file written atomically, COMPLETE.json last:
adapter_model.safetensors + adapter_config.json (`PeftModel.from_pretrained(base, "models/sft")`),
the tokenizer, sft_metrics.json (loss per logged step and per epoch, validation metrics per
epoch), sft_training_curves.png, training_summary.json (the settings used, best epoch, timings,
trainable parameters). The folder is the W&B artifact `sft-adapter` that the DPO run declares
as its input.

Checkpoints: the Trainer saves one at every epoch end (and every --save_steps steps if set) into
OUTPUT_DIR/checkpoints/, keeping the newest two: weights, optimizer, scheduler, RNG states and
trainer state; beside each we store the validation history and the best adapter so far
(validation_state.json, written last, marks the checkpoint complete). `--resume` continues from
the newest complete checkpoint and ends exactly where an uninterrupted run with the same seed
ends (on CPU bit for bit; tests/test_reliability_resume.py). After a successful run the
checkpoints are deleted: the saved adapter is the result, and nothing is left to resume.

When things go wrong (training/resilience.py holds the shared parts; tests/test_reliability_*.py, one per point):
- Ctrl-C / SIGTERM: the current step finishes, a checkpoint is written, the W&B run is closed as
  interrupted, and the CLI prints the command that resumes (exit 130 / 143). A second signal stops at once.
- Out of memory: --auto_find_batch_size halves --batch_size and doubles --grad_accum (same effective
  batch) and starts over; without it the error names the flags to change.
- NaN/inf loss or gradients, or a loss or LoRA weight norm that explodes (training/lean_step.py): the run stops
  with the step named and the last good checkpoint kept; --lr and --beta outside their usual ranges warn.
- Bad input or settings: every check runs before --output_dir is touched, so nothing is overwritten.
- Several processes (accelerate launch / torchrun): all train, the main one writes; see README.
- Determinism: the same seed and settings give the same data order, adapter and metrics; on CPU
  bit for bit (tested). On one H200, two bf16 runs in one process were bit-identical too
  (bench/determinism.py, bench/README.md); across GPU models, library versions or process counts
  the summation order changes, so compare such runs by their validation metrics, not their weights.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import finish_output_dir, read_json, write_json
from ..training.callbacks import ValidationCallback, install_callbacks, stage_callbacks
from ..data import check_validation_split, class_counts, frame_checksum, load_split, overlap_count
from ..errors import UserError
from ..sampling import balanced_sample, stratified_sample
from ..training.fused_head import project_labelled_positions_only
from ..training.lean_step import lean
from ..models import load_base_model, load_tokenizer, pick_device
from ..training.shared_prefix import SharedPrefixTraining
from ..training.shared_prefix import trainer_class as prefix_trainer_class
from ..prompts import answer_length, build_prompts, label_token_ids, label_word
from ..run_context import RunContext
from ..thresholds import THRESHOLD_FILE, write_threshold
from ..training.checkpoints import (CHECKPOINTS, claim_run_dir, final_outputs, finished_record, latest_checkpoint,
                                    load_checkpoint_state, plan_run_dir, save_adapter, save_checkpoint_state)
from ..training.distributed import barrier, is_main_process, quiet, say, world_size
from ..training.recipe import run_record, run_trainer, seeded_length_grouping, trainer_arguments
from ..training.resilience import TrainingDiverged, fit_within_memory
from ..training.lora import check_lora_targets, peft_targets
from ..training.trl_tokens import check_trl_tokens, trl_prompts, trl_tokenizer
from ..tracking import Tracker, adapter_artifact

ARTIFACT_NAME = adapter_artifact("sft")  # the DPO run declares this artifact (the output folder) as its input
ARTIFACT_TYPE = "model"
VAL_SPLIT = "gen_val"
STATE_FILE = "validation_state.json"  # in each checkpoint, written last: the checkpoint is complete
METRICS_FILE = "sft_metrics.json"
CURVES_FILE = "sft_training_curves.png"
SUMMARY_FILE = "training_summary.json"


@dataclass
class SFTData:
    """What SFT learns from and is validated on."""

    train: Any  # DataFrame(text, label, ...): the training split, sampled as asked
    val: Any  # DataFrame(text, label, ...): the validation split (VAL_SPLIT), sampled as asked


@dataclass
class Trained:
    """What `fit` hands to the save phase."""

    trainer: Any  # the SFTTrainer that ran
    validation: ValidationCallback  # validation history, best epoch and its adapter
    result: Any  # the Trainer's TrainOutput
    batch: dict  # the batch settings the run ended with (--auto_find_batch_size may shrink them)


def run(settings, extra_callbacks=()) -> dict:
    """Train, keep the best evaluation by its validation --select_by score, save it; returns the training summary.

    `extra_callbacks` are more TrainerCallbacks for the trainer (the tests interrupt runs with one).
    Under `accelerate launch` / `torchrun` every process trains; only the main one writes.
    """
    settings.validate()  # the CLI validated already; a caller from Python may not have
    s = settings
    ctx = RunContext(s, Path(s.output_dir), main=is_main_process(), model=s.model)

    # Setup. Every check on the input runs before the output folder is touched, so a run refused
    # for any reason leaves a previous result in --output_dir byte for byte as it was.
    data = SFTData(*load_data(s))  # a wrong path fails in a second, before any model is loaded
    ctx.inputs = inputs_of(s)
    finished = finished_record(ctx.out, s, SUMMARY_FILE, ctx.inputs) is not None
    if s.resume and finished:
        if ctx.main:
            print(f"{ctx.out} already holds the finished run of these settings; nothing to resume.")
        return read_json(ctx.out / SUMMARY_FILE)
    ctx.resume_from = plan_run_dir(ctx.out, s, finished=finished, state_file=STATE_FILE, inputs=ctx.inputs)

    import transformers

    transformers.set_seed(s.seed)  # LoRA init, dropout and data order all follow from the seed
    ctx.device = pick_device(s.device)
    tokenizer = load_tokenizer(s.model)
    label_token_ids(tokenizer)  # both label words must be single tokens: fail now, not at the first evaluation
    model = load_base_model(s.model, ctx.device)
    check_lora_targets(model, s.lora_targets)
    train_ds = build_dataset(tokenizer, data.train, s.max_text_tokens, s.max_length)
    ctx.timings["load_s"] = time.perf_counter() - ctx.started

    with Tracker(enabled=not s.no_wandb and ctx.main, project=s.wandb_project, job_type="sft", config=ctx.config,
                 group=s.wandb_group) as ctx.tracker:
        # Train (on an out-of-memory error: smaller batches or a clear message; on Ctrl-C: a checkpoint).
        with ctx.timed("train_s"):
            trained = fit(ctx, model, tokenizer, train_ds, data, extra_callbacks)
        ctx.timings["eval_s"] = trained.validation.eval_seconds  # here, to keep the summary's key order

        # Save: the best epoch's adapter, then the record of how it was made, the marker last; all into a
        # staging folder that replaces the output folder whole (a kill mid-save leaves no mix of two runs).
        with final_outputs(ctx.out, ctx.main) as folder:
            with ctx.timed("save_s"):
                params = save_outputs(ctx, trained, tokenizer, data, folder)
            ctx.timings["eval_s"] = trained.validation.eval_seconds  # the save phase may have evaluated once more
            ctx.total()
            summary = build_summary(ctx, data, trained, params)
            if ctx.main:
                write_json(folder / SUMMARY_FILE, summary)
                finish_output_dir(folder, ctx.config, {"stage": "sft", "best_epoch": summary["best_epoch"],
                                                       "best_f1": summary["best_val"]["f1"], "inputs": ctx.inputs})
        barrier()  # the other processes end when the outputs are in place

        ctx.tracker.log_image("sft/training_curves", ctx.out / CURVES_FILE)
        ctx.tracker.log_summary({k: summary[k] for k in ("best_epoch", "best_step", "best_val", "trainable_params",
                                                         "trainable_share", "timings")})
        ctx.tracker.log_artifact(ctx.out, name=ARTIFACT_NAME, type=ARTIFACT_TYPE,
                                 metadata={"base_model": s.model, "best_epoch": summary["best_epoch"],
                                           "best_val_f1": summary["best_val"]["f1"]})
    if ctx.main:
        print(describe_result(summary, ctx.out))
    return summary


def fit(ctx: RunContext, model, tokenizer, train_ds, data: SFTData, extra_callbacks=()) -> Trained:
    """Build the trainer and train; returns what the save phase needs.

    Out of memory: with --auto_find_batch_size each retry halves the batch, doubles gradient
    accumulation and starts over from the same seed and weights (resilience.train_within_memory).
    Ctrl-C / SIGTERM: the current step finishes, a checkpoint is written, StopRequested ends it.
    """
    import transformers

    s, out, tracker, resume_from, main = ctx.settings, ctx.out, ctx.tracker, ctx.resume_from, ctx.main
    current = model  # the model the next attempt trains; a retry unloads the previous attempt's LoRA layers
    claimed = False  # the output folder is taken over once, by the first attempt whose trainer exists

    def attempt(batch_size: int, grad_accum: int, eval_batch_size: int, flag):
        nonlocal current, claimed
        if claimed:  # a retry: take the LoRA layers off and start from the same seed again
            current = current.unload()
            transformers.set_seed(s.seed)
        validation = ValidationCallback(tokenizer, {VAL_SPLIT: data.val}, batch_size=eval_batch_size,
                                        max_text_tokens=s.max_text_tokens, eval_steps=s.eval_steps, select_by=s.select_by,
                                        log=tracker.log,
                                        printer=say if main else quiet)
        if resume_from:
            load_validation_state(validation, resume_from)
        # Beside each checkpoint: validation history + best adapter (step checkpoints also at epoch ends).
        callbacks = stage_callbacks(validation, lambda folder: save_validation_state(validation, folder),
                                    save_each_epoch=bool(s.save_steps or s.eval_steps), stop_flag=flag, tracker_log=tracker.log,
                                    extra=extra_callbacks)
        sized = dataclasses.replace(s, batch_size=batch_size, grad_accum=grad_accum)
        base = current
        trainer = build_trainer(sized, current, tokenizer, train_ds, out / CHECKPOINTS, callbacks)
        current = trainer.model
        if not claimed:
            claim_run_dir(out, s, resume_from, ctx.inputs)
            claimed = True
        if main:
            print(describe_start(sized, data, base.device, parameter_counts(trainer.model), resume_from))
        try:
            return trainer, validation, run_trainer(trainer, resume_from)
        except TrainingDiverged as exc:  # the lean trainer's per-step check, or a NaN/inf logged loss
            raise exc.explained("Training", latest_checkpoint(out / CHECKPOINTS, STATE_FILE),
                                "Lower --lr (or raise --warmup_ratio) and start over with --overwrite.") from None

    (trainer, validation, result), used = fit_within_memory(attempt, s, "sft", model.device)
    return Trained(trainer, validation, result, used)


def save_outputs(ctx: RunContext, trained: Trained, tokenizer, data: SFTData, folder: Path) -> dict:
    """The best epoch's adapter, its decision threshold (chosen on validation), metrics and curves into
    `folder` (the staging folder of the output); returns the parameter counts."""
    trainer, validation = trained.trainer, trained.validation
    if not validation.history:  # e.g. resumed from a checkpoint taken after the last step
        validation.evaluate(trainer.model, trainer.state.global_step, trainer.state.epoch or 0.0)
    validation.restore_best(trainer.model)
    metrics = training_metrics(trainer.state.log_history, validation, len(data.val), trained.result.training_loss)
    params = parameter_counts(trainer.model)
    threshold = validation.threshold_record(trainer.model)
    if ctx.main:
        save_adapter(trainer.model, tokenizer, folder, save_embedding_layers=False)  # LoRA only; embeddings frozen
        write_threshold(folder, threshold)
        write_json(folder / METRICS_FILE, metrics)
        from ..plots import plot_sft_curves

        plot_sft_curves(metrics["steps"], [{"epoch": e["epoch"], **e[VAL_SPLIT]} for e in metrics["epochs"]],
                        folder / CURVES_FILE, best_epoch=validation.best_epoch, split_name=VAL_SPLIT)
    return params


# -- setup -------------------------------------------------------------------------------------------


def inputs_of(s) -> dict[str, str]:
    """The checksums of the splits SFT reads: a finished (or stopped) run on other data is not this run's,
    though its settings, which name the files by path, are the same (the pipeline re-split, say)."""
    from ..rundir import input_identity

    return input_identity({"train_csv": s.train_csv, "val_csv": s.val_csv})


def load_data(s):
    """(training table, validation table), sampled as asked; both classes must be present to learn from."""
    train = load_split(s.train_csv, "training split")
    val = load_split(s.val_csv, "validation split")
    if train["label"].nunique() < 2:
        raise UserError(f"{s.train_csv} holds only one class ({class_counts(train)}); SFT needs both to learn from.")
    if s.sample_size:
        train = balanced_sample(train, s.sample_size, s.seed)  # class-balanced so neither answer dominates
    if s.val_sample_size:
        val = stratified_sample(val, s.val_sample_size, s.seed)
    check_validation_split(val, s.val_csv, s.val_sample_size)
    if train["label"].nunique() < 2:  # the sample, where the file had both: --sample_size 1
        raise UserError(f"--sample_size {s.sample_size} leaves one class to train on ({class_counts(train)}); "
                        "SFT needs both. Use a sample of at least 2.")
    shared = overlap_count(train, val)
    if shared:  # selection on validation only: a checkpoint chosen on texts it trained on is chosen on training data
        raise UserError(f"{shared} text(s) appear in both {s.train_csv} and {s.val_csv}: the best checkpoint and the "
                        "decision threshold would be chosen on texts the model trained on. Re-create the splits with "
                        "`sarcasm-dpo split`, or remove those texts from one of the files.")
    return train, val


def build_dataset(tokenizer, frame, max_text_tokens: int, max_length: int):
    """Prompt-completion pairs in TRL's non-conversational format (the prompt is already rendered).

    TRL appends EOS to each completion, so the trained tokens are exactly the label word and EOS.
    """
    from datasets import Dataset

    answer = max(answer_length(tokenizer, label_word(y)) for y in (0, 1))
    # Over --max_length: the text is cut further, never the answer (the rule of prompts.build_prompts, as in DPO).
    prompts = build_prompts(tokenizer, frame["text"], max_text_tokens, room=max_length - answer)
    # The prompts as TRL must get them with the tokenizer it gets (build_trainer), for its tokens to be the scorer's.
    return Dataset.from_dict({"prompt": trl_prompts(trl_tokenizer(tokenizer), prompts),
                              "completion": [label_word(y) for y in frame["label"]]})


def lora_config(s):
    from peft import LoraConfig

    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=peft_targets(s.lora_targets), bias="none", task_type="CAUSAL_LM")


def training_args(s, model, ckpt_dir: Path):
    from trl import SFTConfig

    return SFTConfig(
        **trainer_arguments(s, model, ckpt_dir),
        weight_decay=s.weight_decay,
        activation_checkpointing=s.gradient_checkpointing,  # TRL defaults to on; here only when asked
        completion_only_loss=True,  # loss on the answer tokens only, never the prompt or padding
        packing=False,
        padding_free=False,  # dynamic padding to the longest example of each batch
        train_sampling_strategy="group_by_length",  # similar lengths together: little padding
        # A checkpoint at each evaluation keeps the best-adapter state in step with it (as in DPO).
        save_strategy="steps" if s.save_steps or s.eval_steps else "epoch",
        save_steps=s.save_steps or s.eval_steps or 500,
    )


def build_trainer(s, model, tokenizer, train_ds, ckpt_dir: Path, callbacks=()):
    """SFTTrainer with LoRA on the base model; the progress bar shows loss and ETA."""
    from trl import SFTTrainer

    # On CPU/MPS, TRL would run the LM head over every prompt position only to mask it out (fused_head.py).
    project_labelled_positions_only()
    # Batches grouped by length, shuffled by (seed, epoch): a resumed run sees the same order.
    # The tokens every prompt starts with run once per micro-batch, with gradients (training/shared_prefix.py).
    trainer_class = prefix_trainer_class(SFTTrainer, *([SharedPrefixTraining] if s.shared_prefix else []))
    given = trl_tokenizer(tokenizer)  # adds no special tokens of its own: TRL reads the scorer's tokens
    trainer = seeded_length_grouping(lean(trainer_class))(
        model=model, args=training_args(s, model, ckpt_dir), train_dataset=train_ds, processing_class=given,
        peft_config=lora_config(s), callbacks=list(callbacks))
    install_callbacks(trainer, list(callbacks), "sft")
    check_trl_tokens(trainer.train_dataset, list(train_ds["prompt"]), given, s.max_length)
    return trainer


def parameter_counts(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1)}


# -- checkpoint state -------------------------------------------------------


def save_validation_state(validation: ValidationCallback, folder: Path) -> None:
    """Written after the Trainer's own checkpoint files; the state file, last, marks the checkpoint complete."""
    save_checkpoint_state(folder, STATE_FILE, validation.state_dict(), validation.best_state)


def load_validation_state(validation: ValidationCallback, folder: Path) -> None:
    state, best = load_checkpoint_state(folder, STATE_FILE)
    validation.load_state_dict(state)
    if best is not None:
        validation.best_state = best


# -- save --------------------------------------------------------------------------------------------


def training_metrics(log_history: list[dict], validation: ValidationCallback, val_rows: int,
                     train_loss: float) -> dict:
    """Loss per logged step and, per evaluation, the mean training loss of the steps since the
    previous evaluation (an epoch's mean when validation runs once per epoch) beside its metrics."""
    steps = [{"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"],
              "learning_rate": e.get("learning_rate"), "grad_norm": e.get("grad_norm")}
             for e in log_history if "loss" in e]

    # A logged loss is the mean over the steps since the previous log, so it weighs that many steps.
    # Evaluations fall on logged steps (TrackerLogCallback forces a log at each epoch end and at
    # each --eval_steps step), so every logged window lies between two evaluations.
    def mean_loss(first_step: int, last_step: int) -> float | None:
        total = weight = 0.0
        previous = 0
        for record in steps:
            span, previous = record["step"] - previous, record["step"]
            if first_step < record["step"] <= last_step:
                total += record["loss"] * span
                weight += span
        return total / weight if weight else None

    epochs, previous_eval = [], 0
    for h in validation.history:
        epochs.append({"epoch": h["epoch"], "step": h["step"], "train_loss": mean_loss(previous_eval, h["step"]),
                       VAL_SPLIT: h[VAL_SPLIT], "selected": h["step"] == validation.best_step})
        previous_eval = h["step"]
    best = next((e for e in epochs if e["selected"]), None)
    # The mean over every step, from the logged windows: the Trainer's own figure only counts the
    # steps since a --resume, while the log history (restored from the checkpoint) covers them all.
    mean = mean_loss(0, steps[-1]["step"]) if steps else None
    return {"validation_split": VAL_SPLIT, "validation_rows": val_rows,
            "train_loss_mean": mean if mean is not None else train_loss,
            "epochs": epochs, "steps": steps,
            "best": {"epoch": validation.best_epoch, "step": validation.best_step,
                     "f1": best[VAL_SPLIT]["f1"] if best else None}}


def build_summary(ctx: RunContext, data: SFTData, trained: Trained, params: dict) -> dict:
    s, trainer, validation = ctx.settings, trained.trainer, trained.validation
    train_df, val_df = data.train, data.val
    best = next((h for h in validation.history if h["step"] == validation.best_step), None)
    return {
        "config": ctx.config,  # other stages read the base model from config.model
        "base_model": s.model,
        "best_epoch": validation.best_epoch,
        "best_step": validation.best_step,
        "best_val": best[VAL_SPLIT] if best else None,
        "selected_by": s.select_by,
        "best_score": best.get("selection_score") if best else None,
        "epochs_run": round(float(trainer.state.epoch or 0), 4),
        "global_steps": trainer.state.global_step,
        **params,
        "data": {
            "train_csv": s.train_csv, "train": class_counts(train_df), "train_checksum": frame_checksum(train_df),
            "val_csv": s.val_csv, "val": class_counts(val_df), "val_checksum": frame_checksum(val_df),
        },
        **run_record(trainer, ctx.device, ctx.resume_from, trained.batch, ctx.timings),
        "outputs": {"adapter": "adapter_model.safetensors", "metrics": METRICS_FILE, "curves": CURVES_FILE,
                    "threshold": THRESHOLD_FILE},
    }


# -- messages ----------------------------------------------------------------------------------------


def describe_start(s, data: SFTData, device, params, resume_from) -> str:
    counts = class_counts(data.train)
    return (f"SFT on {counts['total']} examples ({counts['sarcastic']} sarcastic, {counts['not_sarcastic']} not), "
            f"validating on {len(data.val)}; model {s.model} on {device}; LoRA r={s.lora_r} alpha={s.lora_alpha} on "
            f"{','.join(s.lora_targets)}: {params['trainable_params']:,} trainable parameters "
            f"({100 * params['trainable_share']:.2f}%); {s.epochs:g} epoch(s), lr {s.lr:g}, batch "
            f"{s.batch_size}x{s.grad_accum}" + (f"x{world_size()} processes" if world_size() > 1 else "")
            + (f"; resuming from {resume_from.name}" if resume_from else "") + ".")


def describe_result(summary: dict, out: Path) -> str:
    best = summary["best_val"]
    minutes, seconds = divmod(int(summary["timings"]["total_s"]), 60)
    # The validation file by its path: VAL_SPLIT is the record's key for it, whatever file --val_csv named.
    return (f"SFT finished in {minutes}m{seconds:02d}s. The best evaluation by validation "
            f"{summary['selected_by']} was at epoch {summary['best_epoch']:g} of {summary['epochs_run']:g}: F1 {best['f1']:.3f}, accuracy "
            f"{best['accuracy']:.3f}, precision {best['precision']:.3f}, recall {best['recall']:.3f} on "
            f"{summary['data']['val']['total']} texts of {summary['data']['val_csv']}. "
            f"Its adapter ({summary['trainable_params']:,} trainable parameters, "
            f"{100 * summary['trainable_share']:.2f}% of the model) is in {out}/, with {METRICS_FILE}, {CURVES_FILE} "
            f"and {SUMMARY_FILE}. Next: sarcasm-dpo dpo --sft_model {out}")

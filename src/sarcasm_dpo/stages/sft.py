"""Phase 1: LoRA supervised fine-tuning on the GEN training split, with TRL's SFTTrainer.

Every training example is the one prompt (`prompts.build_prompt`: the question in a user turn,
rendered with the model's chat template, ending with the generation prompt) and, as completion,
the label word ("Yes" = sarcastic, "No") followed by EOS. The loss covers the completion only.
After each epoch the shared scorer measures accuracy, precision, recall and F1 on the GEN
validation split; the adapter of the epoch with the best F1 is the one that is saved.

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
- NaN/inf loss or gradients, or a loss or LoRA weight norm that explodes (lean_trainer.py): the run stops
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
import math
import time
import warnings
from pathlib import Path

from ..atomic import read_json, write_json
from ..training.callbacks import ValidationCallback, install_callbacks, stage_callbacks
from ..data import balanced_sample, class_counts, frame_checksum, load_split, overlap_count, stratified_sample
from ..errors import UserError
from ..training.fused_head import project_labelled_positions_only
from ..training.lean_step import lean
from ..models import load_base_model, load_tokenizer, pick_device
from ..training.shared_prefix import SharedPrefixTraining
from ..training.shared_prefix import trainer_class as prefix_trainer_class
from ..prompts import build_prompt, label_token_ids, label_word
from ..prompts import strip_special_prefix
from ..settings import check_training_settings
from ..training.checkpoints import (CHECKPOINTS, claim_run_dir, finish_run_dir, finished_record, latest_checkpoint,
                                    load_checkpoint_state, plan_run_dir, save_adapter, save_checkpoint_state)
from ..training.distributed import barrier, is_main_process, quiet, say, world_size
from ..training.recipe import run_record, run_trainer, seeded_length_grouping, trainer_arguments
from ..training.resilience import TrainingDiverged, fit_within_memory
from ..tracking import Tracker

ARTIFACT_NAME = "sft-adapter"  # the DPO run declares this artifact (the output folder) as its input
ARTIFACT_TYPE = "model"
VAL_SPLIT = "gen_val"
STATE_FILE = "validation_state.json"  # in each checkpoint, written last: the checkpoint is complete
METRICS_FILE = "sft_metrics.json"
CURVES_FILE = "sft_training_curves.png"
SUMMARY_FILE = "training_summary.json"


def run(settings, extra_callbacks=()) -> dict:
    """Train, pick the best epoch by validation F1, save it; returns the training summary.

    `extra_callbacks` are more TrainerCallbacks for the trainer (the tests interrupt runs with one).
    Under `accelerate launch` / `torchrun` every process trains; only the main one writes.
    """
    s = settings
    started = time.perf_counter()
    config = dataclasses.asdict(s)
    out = Path(s.output_dir)
    main = is_main_process()
    check_settings(s)

    # Setup. Every check on the input runs before the output folder is touched, so a run refused
    # for any reason leaves a previous result in --output_dir byte for byte as it was.
    train_df, val_df = load_data(s)  # a wrong path fails in a second, before any model is loaded
    finished = finished_record(out, config, SUMMARY_FILE) is not None
    if s.resume and finished:
        if main:
            print(f"{out} already holds the finished run of these settings; nothing to resume.")
        return read_json(out / SUMMARY_FILE)
    resume_from = plan_run_dir(out, config, s, finished=finished, state_file=STATE_FILE)

    import transformers

    transformers.set_seed(s.seed)  # LoRA init, dropout and data order all follow from the seed
    device = pick_device(s.device)
    tokenizer = load_tokenizer(s.model)
    label_token_ids(tokenizer)  # both label words must be single tokens: fail now, not at the first evaluation
    model = load_base_model(s.model, device)
    check_lora_targets(model, s.lora_targets)
    train_ds = build_dataset(tokenizer, train_df, s.max_text_tokens, s.max_length)
    load_s = time.perf_counter() - started

    with Tracker(enabled=not s.no_wandb and main, project=s.wandb_project, job_type="sft", config=config,
                 group=s.wandb_group) as tracker:
        # Train (on an out-of-memory error: smaller batches or a clear message; on Ctrl-C: a checkpoint).
        train_start = time.perf_counter()
        trainer, validation, result, used = fit(s, config, out, model, tokenizer, train_ds, val_df, tracker,
                                                resume_from, extra_callbacks, train_df)
        train_s = time.perf_counter() - train_start

        # Save: the best epoch's adapter, then the record of how it was made, the marker last.
        save_start = time.perf_counter()
        if not validation.history:  # e.g. resumed from a checkpoint taken after the last step
            validation.evaluate(trainer.model, trainer.state.global_step, trainer.state.epoch or 0.0)
        validation.restore_best(trainer.model)
        metrics = training_metrics(trainer.state.log_history, validation, len(val_df), result.training_loss)
        params = parameter_counts(trainer.model)
        if main:
            save_adapter(trainer.model, tokenizer, out, save_embedding_layers=False)  # LoRA only; embeddings are frozen
            write_json(out / METRICS_FILE, metrics)
            from ..plots import plot_sft_curves

            plot_sft_curves(metrics["steps"], [{"epoch": e["epoch"], **e[VAL_SPLIT]} for e in metrics["epochs"]],
                            out / CURVES_FILE, best_epoch=validation.best_epoch, split_name=VAL_SPLIT)
        timings = {"load_s": load_s, "train_s": train_s, "eval_s": validation.eval_seconds,
                   "save_s": time.perf_counter() - save_start}
        timings["total_s"] = time.perf_counter() - started
        summary = build_summary(s, config, train_df, val_df, validation, trainer, params, device, timings,
                                resume_from, used)
        if main:
            write_json(out / SUMMARY_FILE, summary)
            finish_run_dir(out, config, {"best_epoch": summary["best_epoch"], "best_f1": summary["best_val"]["f1"]})
        barrier()  # the other processes end when the outputs are in place

        tracker.log_image("sft/training_curves", out / CURVES_FILE)
        tracker.log_summary({k: summary[k] for k in ("best_epoch", "best_step", "best_val", "trainable_params",
                                                     "trainable_share", "timings")})
        tracker.log_artifact(out, name=ARTIFACT_NAME, type=ARTIFACT_TYPE,
                             metadata={"base_model": s.model, "best_epoch": summary["best_epoch"],
                                       "best_val_f1": summary["best_val"]["f1"]})
    if main:
        print(describe_result(summary, out))
    return summary


def fit(s, config, out: Path, model, tokenizer, train_ds, val_df, tracker, resume_from, extra_callbacks, train_df):
    """Build the trainer and train; returns (trainer, validation callback, train output, batch used).

    Out of memory: with --auto_find_batch_size each retry halves the batch, doubles gradient
    accumulation and starts over from the same seed and weights (resilience.train_within_memory).
    Ctrl-C / SIGTERM: the current step finishes, a checkpoint is written, StopRequested ends it.
    """
    import transformers

    main = is_main_process()
    holder = {"model": model, "claimed": False}

    def attempt(batch_size: int, grad_accum: int, eval_batch_size: int, flag):
        current = holder["model"]
        if holder["claimed"]:  # a retry: take the LoRA layers off and start from the same seed again
            current = current.unload()
            transformers.set_seed(s.seed)
        validation = ValidationCallback(tokenizer, {VAL_SPLIT: val_df}, batch_size=eval_batch_size,
                                        max_text_tokens=s.max_text_tokens, log=tracker.log,
                                        printer=say if main else quiet)
        if resume_from:
            load_validation_state(validation, resume_from)
        # Beside each checkpoint: validation history + best adapter (step checkpoints also at epoch ends).
        callbacks = stage_callbacks(validation, lambda folder: save_validation_state(validation, folder),
                                    save_each_epoch=bool(s.save_steps), stop_flag=flag, tracker_log=tracker.log,
                                    extra=extra_callbacks)
        sized = dataclasses.replace(s, batch_size=batch_size, grad_accum=grad_accum)
        trainer = build_trainer(sized, current, tokenizer, train_ds, out / CHECKPOINTS, callbacks)
        holder["model"] = trainer.model
        if not holder["claimed"]:
            claim_run_dir(out, config, s, resume_from)
            holder["claimed"] = True
        if main:
            print(describe_start(sized, train_df, val_df, current.device, parameter_counts(trainer.model),
                                 resume_from))
        try:
            return trainer, validation, run_trainer(trainer, resume_from)
        except TrainingDiverged as exc:  # the lean trainer's per-step check, or a NaN/inf logged loss
            raise exc.explained("Training", latest_checkpoint(out / CHECKPOINTS, STATE_FILE),
                                "Lower --lr (or raise --warmup_ratio) and start over with --overwrite.") from None

    (trainer, validation, result), used = fit_within_memory(attempt, s, "sft", model.device)
    return trainer, validation, result, used


# -- setup -------------------------------------------------------------------------------------------


def check_settings(s) -> None:
    """What SFTSettings.validate leaves to the stage."""
    check_training_settings(s)
    if s.save_steps < 0:
        raise UserError(f"--save_steps must be 0 (each epoch) or a positive count, got {s.save_steps}.")
    if s.lora_alpha <= 0:
        raise UserError(f"--lora_alpha must be positive, got {s.lora_alpha}.")
    if not s.lora_targets:
        raise UserError("--lora_targets is empty; name the modules that get LoRA adapters, e.g. q_proj,v_proj.")


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
    shared = overlap_count(train, val)
    if shared:
        warnings.warn(f"{shared} text(s) appear in both {s.train_csv} and {s.val_csv}; validation F1 will be "
                      "optimistic. Re-create the splits with `sarcasm-dpo split`.", stacklevel=2)
    return train, val


def check_lora_targets(model, targets: list[str]) -> None:
    """Fail with the module names that do exist, instead of PEFT's bare ValueError."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise UserError(f"--lora_targets {','.join(missing)} match no linear layer of this model. "
                        f"Its linear layers are: {', '.join(sorted(names))}.")


def fit_prompt(tokenizer, text: str, max_text_tokens: int, room: int) -> str:
    """The prompt for `text`, with the text cut further if prompt + answer would pass --max_length.

    TRL would otherwise cut the sequence from the end, i.e. cut off the answer we train on.
    """
    budget = max_text_tokens
    for _ in range(10):
        prompt = build_prompt(tokenizer, text, budget)
        excess = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - room
        if excess <= 0:
            return prompt
        budget -= max(excess, 1)
        if budget < 1:
            break
    need = len(tokenizer(build_prompt(tokenizer, "", 1), add_special_tokens=False)["input_ids"])
    raise UserError(f"--max_length leaves no room for the text: the prompt around it needs {need} tokens, and "
                    f"{max(room, 0)} are left for the prompt once the answer's are taken. Raise --max_length "
                    f"(default 512) by at least {need + 1 - room}.")


def build_dataset(tokenizer, frame, max_text_tokens: int, max_length: int):
    """Prompt-completion pairs in TRL's non-conversational format (the prompt is already rendered).

    TRL appends EOS to each completion, so the trained tokens are exactly the label word and EOS.
    """
    from datasets import Dataset

    answer = max(len(tokenizer(label_word(y) + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
                 for y in (0, 1))
    prompts = [fit_prompt(tokenizer, text, max_text_tokens, max_length - answer) for text in frame["text"]]
    stripped = strip_special_prefix(tokenizer, prompts)
    if stripped is None:
        warnings.warn("This tokenizer adds special tokens that the chat template does not contain; training inputs "
                      "differ slightly from the scorer's.", stacklevel=2)
    return Dataset.from_dict({"prompt": stripped or prompts, "completion": [label_word(y) for y in frame["label"]]})


def lora_config(s):
    from peft import LoraConfig

    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=list(s.lora_targets), bias="none", task_type="CAUSAL_LM")


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
        save_strategy="steps" if s.save_steps else "epoch",
        save_steps=s.save_steps or 500,
    )


def build_trainer(s, model, tokenizer, train_ds, ckpt_dir: Path, callbacks=()):
    """SFTTrainer with LoRA on the base model; the progress bar shows loss and ETA."""
    from trl import SFTTrainer

    # On CPU/MPS, TRL would run the LM head over every prompt position only to mask it out (fused_head.py).
    project_labelled_positions_only()
    # Batches grouped by length, shuffled by (seed, epoch): a resumed run sees the same order.
    # The tokens every prompt starts with run once per micro-batch, with gradients (prefix_training.py).
    trainer_class = prefix_trainer_class(SFTTrainer, *([SharedPrefixTraining] if s.shared_prefix else []))
    trainer = seeded_length_grouping(lean(trainer_class))(
        model=model, args=training_args(s, model, ckpt_dir), train_dataset=train_ds, processing_class=tokenizer,
        peft_config=lora_config(s), callbacks=list(callbacks))
    install_callbacks(trainer, list(callbacks), "sft")
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
    """Loss per logged step and, per epoch, the mean training loss beside the validation metrics."""
    steps = [{"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"],
              "learning_rate": e.get("learning_rate"), "grad_norm": e.get("grad_norm")}
             for e in log_history if "loss" in e]
    # TrackerLogCallback forces a log at each epoch end, so each logged window lies within one epoch.
    sums: dict[int, list[float]] = {}
    previous = 0
    for record in steps:
        epoch_index = max(1, math.ceil((record["epoch"] or 0) - 1e-6))
        weight = record["step"] - previous
        previous = record["step"]
        acc = sums.setdefault(epoch_index, [0.0, 0.0])
        acc[0] += record["loss"] * weight
        acc[1] += weight
    epochs = []
    for h in validation.history:
        acc = sums.get(max(1, math.ceil(h["epoch"] - 1e-6)))
        epochs.append({"epoch": h["epoch"], "step": h["step"],
                       "train_loss": acc[0] / acc[1] if acc and acc[1] else None,
                       VAL_SPLIT: h[VAL_SPLIT], "selected": h["step"] == validation.best_step})
    best = next((e for e in epochs if e["selected"]), None)
    # The mean over every step, from the logged windows: the Trainer's own figure only counts the
    # steps since a --resume, while the log history (restored from the checkpoint) covers them all.
    total = sum(acc[0] for acc in sums.values())
    steps_logged = sum(acc[1] for acc in sums.values())
    mean = total / steps_logged if steps_logged else train_loss
    return {"validation_split": VAL_SPLIT, "validation_rows": val_rows, "train_loss_mean": mean,
            "epochs": epochs, "steps": steps,
            "best": {"epoch": validation.best_epoch, "step": validation.best_step,
                     "f1": best[VAL_SPLIT]["f1"] if best else None}}


def build_summary(s, config, train_df, val_df, validation, trainer, params, device, timings, resume_from,
                  used: dict | None = None) -> dict:
    best = next((h for h in validation.history if h["step"] == validation.best_step), None)
    return {
        "config": config,  # other stages read the base model from config.model
        "base_model": s.model,
        "best_epoch": validation.best_epoch,
        "best_step": validation.best_step,
        "best_val": best[VAL_SPLIT] if best else None,
        "epochs_run": round(float(trainer.state.epoch or 0), 4),
        "global_steps": trainer.state.global_step,
        **params,
        "data": {
            "train_csv": s.train_csv, "train": class_counts(train_df), "train_checksum": frame_checksum(train_df),
            "val_csv": s.val_csv, "val": class_counts(val_df), "val_checksum": frame_checksum(val_df),
        },
        **run_record(trainer, device, resume_from, used, timings),
        "outputs": {"adapter": "adapter_model.safetensors", "metrics": METRICS_FILE, "curves": CURVES_FILE},
    }


# -- messages ----------------------------------------------------------------------------------------


def describe_start(s, train_df, val_df, device, params, resume_from) -> str:
    counts = class_counts(train_df)
    return (f"SFT on {counts['total']} examples ({counts['sarcastic']} sarcastic, {counts['not_sarcastic']} not), "
            f"validating on {len(val_df)}; model {s.model} on {device}; LoRA r={s.lora_r} alpha={s.lora_alpha} on "
            f"{','.join(s.lora_targets)}: {params['trainable_params']:,} trainable parameters "
            f"({100 * params['trainable_share']:.2f}%); {s.epochs:g} epoch(s), lr {s.lr:g}, batch "
            f"{s.batch_size}x{s.grad_accum}" + (f"x{world_size()} processes" if world_size() > 1 else "")
            + (f"; resuming from {resume_from.name}" if resume_from else "") + ".")


def describe_result(summary: dict, out: Path) -> str:
    best = summary["best_val"]
    minutes, seconds = divmod(int(summary["timings"]["total_s"]), 60)
    return (f"SFT finished in {minutes}m{seconds:02d}s. The best epoch by {VAL_SPLIT} F1 was epoch "
            f"{summary['best_epoch']:g} of {summary['epochs_run']:g}: F1 {best['f1']:.3f}, accuracy "
            f"{best['accuracy']:.3f}, precision {best['precision']:.3f}, recall {best['recall']:.3f} on "
            f"{summary['data']['val']['total']} validation texts. "
            f"Its adapter ({summary['trainable_params']:,} trainable parameters, "
            f"{100 * summary['trainable_share']:.2f}% of the model) is in {out}/, with {METRICS_FILE}, {CURVES_FILE} "
            f"and {SUMMARY_FILE}. Next: sarcasm-dpo dpo --sft_model {out}")

"""Every TrainerCallback the training stages use, and the one function that puts them in order.

- ValidationCallback: scores validation splits with the shared Scorer (one forward pass per
  batch), keeps the best adapter by `select_by` (thresholds.selection_score: F1 at 0.5, balanced
  accuracy at the threshold the adapter would be saved with (thresholds.saved_threshold, the rule
  `threshold_record` writes threshold.json by), or ROC-AUC) and stops early after `patience`
  evaluations without a better one. Used by SFT and DPO alike, so "best" means the same in both.
- TrackerLogCallback / LossProgressCallback: the Trainer's logs to W&B and to a tqdm bar.
- SaveStateCallback, BarrierOnSaveCallback, GracefulStopCallback, LogBeforeSaveCallback: what
  makes a checkpoint complete, and a Ctrl-C end in one (resilience.stop_on_signal).
- NonFiniteLossCallback: a NaN/inf logged loss stops the run (resilience.TrainingDiverged).
- `stage_callbacks()` fixes their order for every stage; `install_callbacks()` hands them to a trainer.
  The DPO diagnostics (KL, reward ratio, drift) are in diagnostics.py.

    python -c "from sarcasm_dpo.training.callbacks import stage_callbacks; help(stage_callbacks)"
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Callable

import pandas as pd
from transformers import TrainerCallback

from ..metrics import classification_metrics
from ..scoring import Scorer
from ..thresholds import selection_score
from .distributed import any_process, barrier, note
from .resilience import StopFlag, StopRequested, check_logged_loss, validation_scoring

def adapter_state(model) -> dict:
    """A detached CPU copy of the trainable adapter weights (a few MB for LoRA)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state)


class ValidationCallback(TrainerCallback):
    """Validation metrics at each evaluation point; the best adapter by `select_by` kept; early stopping.

    `val_sets` maps a name to a table (text, label); the first one is the primary split whose F1
    selects the best checkpoint and drives early stopping. Evaluation happens at the end of each
    epoch, or every `eval_steps` optimizer steps when that is > 0, and once before training when
    `eval_at_start` (so DPO can tell whether it improved on its SFT starting point at all).
    """

    def __init__(self, tokenizer, val_sets: dict[str, pd.DataFrame], *, batch_size: int = 16,
                 max_text_tokens: int = 256, eval_steps: int = 0, patience: int | None = None,
                 eval_at_start: bool = False, log: Callable[[dict, int], None] | None = None,
                 printer: Callable[[str], None] = print, select_by: str = "f1"):
        self.tokenizer = tokenizer
        self.val_sets = val_sets
        self.primary = next(iter(val_sets))
        self.batch_size = batch_size
        self.max_text_tokens = max_text_tokens
        self.eval_steps = eval_steps
        self.patience = patience
        self.eval_at_start = eval_at_start
        self.log = log
        self.printer = printer
        self.select_by = select_by
        self.history: list[dict] = []
        self.best_score = -math.inf  # the best evaluation's selection score (select_by)
        self.best_f1 = -math.inf  # that evaluation's F1 at 0.5, reported beside it
        self.best_step: int | None = None
        self.best_epoch: float | None = None
        self.best_state: dict | None = None
        self.best_probs: list[float] | None = None  # the best evaluation's primary-split scores (its threshold)
        self.bad_evals = 0
        self.stopped_early = False
        self.eval_seconds = 0.0

    # -- state for resume: the early-stopping counters and decision travel with each checkpoint --
    def state_dict(self) -> dict:
        return {"history": self.history, "best_score": self.best_score, "best_f1": self.best_f1,
                "select_by": self.select_by, "best_step": self.best_step,
                "best_epoch": self.best_epoch, "bad_evals": self.bad_evals, "best_probs": self.best_probs,
                "stopped_early": self.stopped_early}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.best_f1 = state.get("best_f1", -math.inf)
        self.best_score = state.get("best_score", self.best_f1)  # older checkpoints selected by F1
        self.best_step = state.get("best_step")
        self.best_epoch = state.get("best_epoch")
        self.bad_evals = state.get("bad_evals", 0)
        self.best_probs = state.get("best_probs")  # absent in checkpoints of older versions: rescored at the end
        # A checkpoint written once early stopping had decided: the resumed run trains no further (the trainer's
        # own record of the stop, recipe.training_stopped) and must report the same decision.
        self.stopped_early = bool(state.get("stopped_early", False))

    def evaluate(self, model, step: int, epoch: float) -> dict:
        start = time.perf_counter()
        scorer = Scorer(model, self.tokenizer, batch_size=self.batch_size, max_text_tokens=self.max_text_tokens)
        record: dict = {"step": int(step), "epoch": round(float(epoch or 0.0), 4)}
        scores = {}
        with validation_scoring():  # out of memory here: --eval_batch_size is what to shrink
            for name, frame in self.val_sets.items():
                scores[name] = scorer.predict_proba(frame["text"].tolist())
                record[name] = classification_metrics(frame["label"].to_numpy(), scores[name])
        self.eval_seconds += time.perf_counter() - start
        frame = self.val_sets[self.primary]
        score = selection_score(frame["label"].to_numpy(), scores[self.primary], record[self.primary], self.select_by)
        record["selection_score"] = score if math.isfinite(score) else None
        # The first evaluation is always a best so far, even when its score cannot be computed (-inf: every
        # validation score equal, say): otherwise no adapter would be kept at all, and a DPO run would call the
        # weights it trained last "the SFT start". Later ones must do strictly better (ties keep the earlier).
        improved = self.best_step is None or score > self.best_score
        if improved:
            self.best_score, self.best_step, self.best_epoch = score, int(step), record["epoch"]
            self.best_f1 = record[self.primary]["f1"]
            self.best_state = adapter_state(model)
            self.best_probs = [float(p) for p in scores[self.primary]]
            self.bad_evals = 0
        elif step > 0:
            self.bad_evals += 1
        record["is_best"] = improved
        self.history.append(record)
        primary = record[self.primary]
        others = "  ".join(f"{n} F1 {record[n]['f1']:.3f}" for n in self.val_sets if n != self.primary)
        self.printer(f"[eval] step {step} epoch {record['epoch']:.2f}: {self.primary} acc {primary['accuracy']:.3f} "
                     f"F1 {primary['f1']:.3f}{self._selection_note(score)}{'  (best)' if improved else ''}  "
                     f"{others}".rstrip())
        if self.log:
            # macro_f1 is None on a one-class split (metrics.classification_metrics): left out, not logged as 0.
            flat = {f"eval/{k}": primary[k] for k in ("accuracy", "precision", "recall", "f1", "macro_f1")
                    if primary[k] is not None}
            for name in self.val_sets:
                if name != self.primary:
                    flat[f"eval/{name}/f1"] = record[name]["f1"]
                    flat[f"eval/{name}/accuracy"] = record[name]["accuracy"]
            flat["eval/epoch"] = record["epoch"]
            if record["selection_score"] is not None:
                flat[f"eval/selection/{self.select_by}"] = record["selection_score"]
            self.log(flat, int(step))
        return record

    def _maybe_stop(self, control, args=None) -> None:
        # Under several processes each one evaluates; they must stop at the same step or the one that
        # goes on waits forever for the others, so one process wanting to stop stops them all.
        if any_process(bool(self.patience and self.bad_evals >= self.patience), getattr(args, "device", None)):
            self.stopped_early = True
            control.should_training_stop = True
            self.printer(f"[early stop] no better {self.primary} {self.select_by} in {self.bad_evals} evaluations; "
                         f"best {self.best_score:.3f} at step {self.best_step}.")

    def _selection_note(self, score: float) -> str:
        if self.select_by == "f1":
            return ""
        return f"  {self.select_by} {score:.3f}" if math.isfinite(score) else f"  {self.select_by} n/a"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.eval_at_start and not self.history and state.global_step == 0:
            self.evaluate(model, 0, 0.0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self.evaluate(model, state.global_step, state.epoch)
            self._maybe_stop(control, args)
            # Close the loss window here, so the training loss reported beside this evaluation
            # covers exactly the steps since the previous one (whatever --logging_steps is).
            control.should_log = True
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        already = self.history and self.history[-1]["step"] == state.global_step
        if not self.eval_steps or not already:
            if not already:
                self.evaluate(model, state.global_step, state.epoch)
            self._maybe_stop(control, args)
        return control

    def restore_best(self, model) -> None:
        """Put the best-F1 adapter weights back into the model before it is saved."""
        if self.best_state is not None:
            load_adapter_state(model, self.best_state)

    def threshold_record(self, model) -> dict:
        """The saved model's `threshold.json` record (thresholds.py), from validation only.

        Call it after `restore_best`: the decision threshold is chosen on the best evaluation's
        primary-split scores (the model being saved), and the label-free contextual threshold is
        measured on that same model beside it. Scores missing (a checkpoint of an older version):
        the primary split is scored once more.
        """
        from ..thresholds import contextual_threshold, threshold_record_from_validation

        frame = self.val_sets[self.primary]
        scorer = Scorer(model, self.tokenizer, batch_size=self.batch_size, max_text_tokens=self.max_text_tokens)
        start = time.perf_counter()
        with validation_scoring():
            probs = self.best_probs if self.best_probs is not None else scorer.predict_proba(frame["text"].tolist())
            contextual = contextual_threshold(scorer.predict_proba)
        self.eval_seconds += time.perf_counter() - start
        return threshold_record_from_validation(frame["label"].to_numpy(), probs, split=self.primary,
                                                contextual=contextual)


# --- logging forwarding and the progress bar (used by SFT; usable by any Trainer) ------------------

# End-of-training totals the Trainer logs once; a stage reports them in its own summary instead.
_RUN_TOTALS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss")


class TrackerLogCallback(TrainerCallback):
    """Forward the Trainer's periodic logs to our Tracker as `train/<key>` (W&B groups by the prefix).

    `loss`, `learning_rate`, `grad_norm` (and DPO's `rewards/...`) become `train/loss`, ...;
    `eval_*` keys become `eval/*`. With `log_at_epoch_end`, a log is also forced at every epoch
    end, so no loss window straddles two epochs and per-epoch losses can be read off the history.
    """

    def __init__(self, log: Callable[[dict, int], None], log_at_epoch_end: bool = True):
        self.log = log
        self.log_at_epoch_end = log_at_epoch_end

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.log_at_epoch_end:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        out = {}
        for key, value in (logs or {}).items():
            if key in _RUN_TOTALS or not isinstance(value, (int, float)):
                continue
            out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = value
        if out:
            self.log(out, int(state.global_step))


class LossProgressCallback(TrainerCallback):
    """A tqdm bar over optimizer steps (tqdm gives rate and ETA) with the latest loss and learning rate
    as its postfix, instead of the default bar that prints every log dict as a line.

    Swap it in with `trainer.remove_callback(ProgressCallback); trainer.add_callback(LossProgressCallback())`.
    """

    def __init__(self, desc: str = "training"):
        self.desc = desc
        self.bar = None
        self.last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not args.disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                            dynamic_ncols=True)
        self.last_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.last_step)
        self.last_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            postfix = {"loss": f"{logs['loss']:.4f}"}
            if "learning_rate" in logs:
                postfix["lr"] = f"{logs['learning_rate']:.2e}"
            self.bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def epoch_ends_here(state, control) -> bool:
    """Does the Trainer end the epoch right after this optimizer step (call on_epoch_end, save or stop there)?
    It does at an epoch's last step, and at a step where training (or the epoch) was told to stop: the loop
    breaks out of the epoch and ends it. Read at on_step_end, after the callbacks that decide a stop."""
    last_step = state.epoch is not None and float(state.epoch).is_integer()
    return last_step or bool(control.should_training_stop or control.should_epoch_stop)


class SaveStateCallback(TrainerCallback):
    """Call `save(folder)` after each Trainer checkpoint, so a stage can store its own state beside it
    (validation history, best adapter, diagnostics); written last, it marks the checkpoint complete.

    A checkpoint is written once per step, after everything that step brings: one asked for at a step after
    which the epoch ends (--save_steps falling on an epoch's last step, or on the step where training stops)
    waits for the epoch end, so it holds that epoch's validation and the stop decision. Written before them,
    a run killed during that validation would resume after the epoch and never validate it."""

    def __init__(self, save: Callable, save_each_epoch: bool = False):
        self.save = save
        self.save_each_epoch = save_each_epoch
        self.deferred = False  # a checkpoint asked for at this step waits for the epoch end

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and epoch_ends_here(state, control):
            control.should_save = False
            self.deferred = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.save_each_epoch or self.deferred:
            control.should_save = True
        self.deferred = False
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")


# --- checkpoints and a clean stop -----------------------------------------------------------------


class GracefulStopCallback(TrainerCallback):
    """Turn a pending stop request into a checkpoint and a clean stop, at a step boundary.

    At each step end (and epoch end, which follows the validation pass) the processes agree on
    whether any of them was signalled; if so the Trainer saves a checkpoint right away (its usual
    `_save_checkpoint`: weights, optimizer, scheduler, RNG states, trainer state). Put this callback
    after the stage's state saver, so that by the time `on_save` reaches it the checkpoint is
    complete; it then raises StopRequested, which ends `trainer.train()` without another evaluation.
    """

    def __init__(self, flag: StopFlag):
        self.flag = flag
        self.stopping = False

    def _check(self, args, control, state=None) -> None:
        if not self.stopping and any_process(bool(self.flag), getattr(args, "device", None)):
            self.stopping = True
            control.should_save = True
            if state is not None:  # the wait is over: say what the last seconds are spent on
                note(f"Writing checkpoint-{state.global_step}, then stopping.\n")

    def on_step_begin(self, args, state, control, **kwargs):
        self.flag.step = state.global_step + 1
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # An epoch's last step (and a step where training stops, which ends the epoch too) is followed by
        # that epoch's validation (on_epoch_end). A checkpoint taken here would miss it, and the resumed
        # run, starting after the epoch, would never validate it: its best-epoch choice would differ
        # from an uninterrupted run's. So wait for the epoch end there (as SaveStateCallback does).
        # state.epoch and the stop decision are the same in every process, so they all agree.
        if not epoch_ends_here(state, control):
            self._check(args, control, state)
        elif self.flag and not self.stopping:
            ends = (f"ends epoch {round(state.epoch)}" if float(state.epoch or 0).is_integer()
                    else f"ends training (epoch {state.epoch:.2f})")
            note(f"Step {state.global_step} {ends}: validating it first, then writing the checkpoint.\n")
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self._check(args, control, state)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopping:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            raise StopRequested(self.flag.signum or signal.SIGTERM, checkpoint, state.global_step)


class LogBeforeSaveCallback(TrainerCallback):
    """Close the Trainer's logging window at every checkpoint; put it last.

    The Trainer averages the loss (and TRL its reward metrics) over the steps since the last log,
    and a resumed run starts a fresh window. A checkpoint taken mid-window would lose the steps
    before it from every average, and the first log after a resume would be read as covering
    steps it never saw. Logging at each checkpoint keeps each logged window exact, so per-epoch
    and whole-run training losses of a resumed run equal the uninterrupted run's.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True
        return control

    on_epoch_end = on_step_end


class BarrierOnSaveCallback(TrainerCallback):
    """Every process has written its part of a checkpoint (each writes its own RNG state) before the
    main process marks it complete; put it before the state saver."""

    def on_save(self, args, state, control, **kwargs):
        barrier()



class NonFiniteLossCallback(TrainerCallback):
    """Stop when a logged loss is NaN or infinite (resilience.TrainingDiverged, naming the step).

    The lean trainer (lean_step.py) checks the gradients, the step's loss and the weights at every
    step, before the update, so this rarely fires first; it keeps the rule whole for a loss that
    turns non-finite only in the Trainer's averaging. The stage turns the exception into its message.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        check_logged_loss(logs, state.global_step)


# --- the order ------------------------------------------------------------------------------------


def stage_callbacks(validation: ValidationCallback, save_state: Callable[[Path], None], *, save_each_epoch: bool,
                    stop_flag: StopFlag | None = None, diagnostics: TrainerCallback | None = None,
                    tracker_log: Callable[[dict, int], None] | None = None, extra=()) -> list:
    """A training stage's callbacks, in the one order that works (the Trainer calls them in list order):

    1. `validation`: at an epoch end it scores before anything below saves or stops there, so a
       checkpoint (and a Ctrl-C stop) carries that epoch's validation.
    2. `diagnostics` (DPO's, diagnostics.py): they check the logged loss themselves, before they record
       it; without them NonFiniteLossCallback (6) does.
    3. BarrierOnSaveCallback: every process has written its part of a checkpoint before
    4. the state saver (SaveStateCallback calling `save_state(folder)`) writes the stage's state, last,
       which marks the checkpoint complete; with `save_each_epoch`, it also asks for one at each epoch end.
    5. TrackerLogCallback(`tracker_log`) when given: the Trainer's logs to W&B.
    6. NonFiniteLossCallback, when there are no `diagnostics`.
    7. GracefulStopCallback(`stop_flag`) when given: after the state saver, so the checkpoint is
       complete when it raises StopRequested.
    8. `extra` (the tests interrupt or poison runs with these).
    9. LogBeforeSaveCallback: last, so it sees every save request, the stop's included.
    """
    return [validation,
            *([diagnostics] if diagnostics is not None else []),
            BarrierOnSaveCallback(),
            SaveStateCallback(save_state, save_each_epoch=save_each_epoch),
            *([TrackerLogCallback(tracker_log)] if tracker_log is not None else []),
            *([NonFiniteLossCallback()] if diagnostics is None else []),
            *([GracefulStopCallback(stop_flag)] if stop_flag is not None else []),
            *extra,
            LogBeforeSaveCallback()]


def install_callbacks(trainer, callbacks: list, bar: str) -> None:
    """Add to `trainer` those of `callbacks` it does not hold yet, in order, and swap the Trainer's progress
    bar (one line per log) for LossProgressCallback's (`bar` names it: "sft", "dpo")."""
    from transformers import ProgressCallback

    held = trainer.callback_handler.callbacks
    for callback in callbacks:
        if not any(c is callback for c in held):
            trainer.add_callback(callback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LossProgressCallback(bar))

"""TrainerCallbacks: the diagnostics that the trainers do not compute themselves, in one module.

- ValidationCallback: scores validation splits with the shared Scorer (one forward pass per
  batch), keeps the best adapter by F1 and stops early after `patience` evaluations without a
  better F1. Used by SFT and DPO alike, so "validation F1" means the same thing in both.
- DPO-only diagnostics (KL to the reference, reward ratio, drift) live below it.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import pandas as pd
from transformers import TrainerCallback

from .metrics import classification_metrics
from .scoring import Scorer


def adapter_state(model) -> dict:
    """A detached CPU copy of the trainable adapter weights (a few MB for LoRA)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state)


class ValidationCallback(TrainerCallback):
    """F1 on validation splits at each evaluation point; best-F1 adapter kept; early stopping.

    `val_sets` maps a name to a table (text, label); the first one is the primary split whose F1
    selects the best checkpoint and drives early stopping. Evaluation happens at the end of each
    epoch, or every `eval_steps` optimizer steps when that is > 0, and once before training when
    `eval_at_start` (so DPO can tell whether it improved on its SFT starting point at all).
    """

    def __init__(self, tokenizer, val_sets: dict[str, pd.DataFrame], *, batch_size: int = 16,
                 max_text_tokens: int = 256, eval_steps: int = 0, patience: int | None = None,
                 eval_at_start: bool = False, log: Callable[[dict, int], None] | None = None,
                 printer: Callable[[str], None] = print):
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
        self.history: list[dict] = []
        self.best_f1 = -math.inf
        self.best_step: int | None = None
        self.best_epoch: float | None = None
        self.best_state: dict | None = None
        self.bad_evals = 0
        self.stopped_early = False
        self.eval_seconds = 0.0

    # -- state for resume: the early-stopping counters travel with each checkpoint -------------
    def state_dict(self) -> dict:
        return {"history": self.history, "best_f1": self.best_f1, "best_step": self.best_step,
                "best_epoch": self.best_epoch, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.best_f1 = state.get("best_f1", -math.inf)
        self.best_step = state.get("best_step")
        self.best_epoch = state.get("best_epoch")
        self.bad_evals = state.get("bad_evals", 0)

    def evaluate(self, model, step: int, epoch: float) -> dict:
        start = time.perf_counter()
        scorer = Scorer(model, self.tokenizer, batch_size=self.batch_size, max_text_tokens=self.max_text_tokens)
        record: dict = {"step": int(step), "epoch": round(float(epoch or 0.0), 4)}
        for name, frame in self.val_sets.items():
            probs = scorer.predict_proba(frame["text"].tolist())
            record[name] = classification_metrics(frame["label"].to_numpy(), probs)
        self.eval_seconds += time.perf_counter() - start
        f1 = record[self.primary]["f1"]
        improved = f1 > self.best_f1
        if improved:
            self.best_f1, self.best_step, self.best_epoch = f1, int(step), record["epoch"]
            self.best_state = adapter_state(model)
            self.bad_evals = 0
        elif step > 0:
            self.bad_evals += 1
        record["is_best"] = improved
        self.history.append(record)
        primary = record[self.primary]
        others = "  ".join(f"{n} F1 {record[n]['f1']:.3f}" for n in self.val_sets if n != self.primary)
        self.printer(f"[eval] step {step} epoch {record['epoch']:.2f}: {self.primary} acc {primary['accuracy']:.3f} "
                     f"F1 {primary['f1']:.3f}{'  (best)' if improved else ''}  {others}".rstrip())
        if self.log:
            flat = {f"eval/{k}": primary[k] for k in ("accuracy", "precision", "recall", "f1", "macro_f1")}
            for name in self.val_sets:
                if name != self.primary:
                    flat[f"eval/{name}/f1"] = record[name]["f1"]
                    flat[f"eval/{name}/accuracy"] = record[name]["accuracy"]
            flat["eval/epoch"] = record["epoch"]
            self.log(flat, int(step))
        return record

    def _maybe_stop(self, control) -> None:
        if self.patience and self.bad_evals >= self.patience:
            self.stopped_early = True
            control.should_training_stop = True
            self.printer(f"[early stop] no better {self.primary} F1 in {self.bad_evals} evaluations; "
                         f"best F1 {self.best_f1:.3f} at step {self.best_step}.")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.eval_at_start and not self.history and state.global_step == 0:
            self.evaluate(model, 0, 0.0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self.evaluate(model, state.global_step, state.epoch)
            self._maybe_stop(control)
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        already = self.history and self.history[-1]["step"] == state.global_step
        if not self.eval_steps or not already:
            if not already:
                self.evaluate(model, state.global_step, state.epoch)
            self._maybe_stop(control)
        return control

    def restore_best(self, model) -> None:
        """Put the best-F1 adapter weights back into the model before it is saved."""
        if self.best_state is not None:
            load_adapter_state(model, self.best_state)


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

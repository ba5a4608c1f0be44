"""What a training run does when the machine or the numbers fail it: a signal, out of memory, divergence.

- `stop_on_signal()`: the first Ctrl-C (SIGINT) or SIGTERM lets the current optimizer step finish;
  callbacks.GracefulStopCallback then writes a checkpoint through the Trainer's own save path
  (model, optimizer, scheduler, RNG states, plus the stage's validation state) and stops with
  `StopRequested`; the CLI prints the command that resumes and exits 128 + signal number. A second
  signal stops at once (the newest complete checkpoint is still there).
- `fit_within_memory()` / `train_within_memory()`: on a CUDA/MPS out-of-memory error during
  training, halve the per-device batch and double gradient accumulation (same effective batch)
  when --auto_find_batch_size is on, or explain which flags to change when it is off. An
  out-of-memory error raised inside `validation_scoring()` (the validation scorer, sized by
  --eval_batch_size) halves --eval_batch_size instead.
- `TrainingDiverged`: the one exception, and the one rule, for a run whose numbers blew up.

    sarcasm-dpo sft --auto_find_batch_size --batch_size 64 --no_wandb   # shrinks the batch until it fits
"""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .distributed import is_main_process, note, quiet, say, world_size

# -- Ctrl-C and SIGTERM -------------------------------------------------------------------------------


class StopRequested(KeyboardInterrupt):
    """Training stopped on a signal after writing `checkpoint`; the CLI turns it into a resume hint."""

    def __init__(self, signum: int, checkpoint: Path | None = None, step: int | None = None):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step


class StopFlag:
    """Set by the signal handler, read by GracefulStopCallback at step boundaries."""

    def __init__(self):
        self.signum: int | None = None
        self.step: int | None = None  # the optimizer step running now (GracefulStopCallback), for the messages

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_on_signal():
    """While inside: the first SIGINT/SIGTERM sets the flag (checkpoint at the next step end, or after
    the validation of the epoch that step ends), a second one (a second or more later) raises
    KeyboardInterrupt at once. Outside the main thread signals cannot be caught; no-op there."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    first = [0.0]

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if flag.signum is not None and time.monotonic() - first[0] < 1.0:
            # The same stop request twice (a terminal's Ctrl-C and a launcher forwarding it), or a user's
            # quick second Ctrl-C: either way it is acknowledged, not dropped without a word.
            note(f"{name} received again within 1 s: taken as the same stop request. Send it again to stop "
                  "at once.\n")
            return
        if flag.signum is None:
            flag.signum = signum
            first[0] = time.monotonic()
            step = f"finishing step {flag.step}" if flag.step is not None else "finishing the current step"
            note(f"\n{name} received: stopping after the current step: {step}, then writing a checkpoint. "
                  "Send it again to stop at once, without one.\n")
            return
        note(f"{name} received again: stopping now, without a new checkpoint; --resume starts from the newest "
              "complete one.\n")
        raise StopRequested(signum)  # no new checkpoint: the newest complete one is where --resume starts

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- divergence -----------------------------------------------------------------------------------------


class TrainingDiverged(UserError):
    """Training diverged: the run stops at the optimizer step named, before the bad update is used.

    The rule, checked at every optimizer step before the optimizer applies the update (lean_step.py):
    training has diverged when the gradients, the step's loss or the trainable weights are NaN or
    infinite, when the loss exceeds lean_step.LOSS_FACTOR x max(first step's loss, 1) (single
    process), or when the trainable weights' norm exceeds lean_step.WEIGHT_FACTOR x its value at
    the start. A NaN/inf loss in the Trainer's logs (`check_logged_loss`) is the same fault seen
    later, and stops the run the same way. A UserError: the fix is a setting (a lower --lr), so the
    CLI prints one paragraph and exits 2. `what` and `step` say what blew up and where; `applied`:
    the update was applied already (but never saved or scored). `explained()` adds what was kept
    and what to change.
    """

    def __init__(self, what: str, step: int, *, applied: bool = False, message: str | None = None):
        super().__init__(message or f"the {what} at optimizer step {step}")
        self.what, self.step, self.applied = what, step, applied

    def explained(self, prefix: str, last_checkpoint: Path | None, fix: str) -> "TrainingDiverged":
        """The same fault, with the stage's message: `prefix` ("Training", "DPO training"), the checkpoint
        kept, and `fix` (the settings to change)."""
        kept = (f"The last good checkpoint, {last_checkpoint}, is kept (written before the fault)" if last_checkpoint
                else "No checkpoint was written before the fault")
        update = "that update was never saved or scored" if self.applied else "the bad update was not applied"
        return TrainingDiverged(self.what, self.step, applied=self.applied,
                                message=f"{prefix} diverged: {self}; {update}. {kept}. {fix}")


def check_logged_loss(logs: dict | None, step: int) -> None:
    """Raise TrainingDiverged when the loss the Trainer logs at `step` is NaN or infinite."""
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(loss):
        raise TrainingDiverged(f"logged loss became {loss}", step)


# -- out of memory ------------------------------------------------------------------------------------

OOM_FLAGS = ("--batch_size (lower), --grad_accum (raise it by the same factor to keep the effective batch), "
             "--auto_find_batch_size (does both for you), --max_text_tokens / --max_length (shorter inputs), "
             "--gradient_checkpointing (recompute activations)")


class OutOfMemory(UserError):
    """The device ran out of memory; the message names the flags that fix it."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA, MPS (and XPU, CPU allocator) out-of-memory errors, the way accelerate recognises them."""
    import torch

    if isinstance(exc, (ValidationOutOfMemory, getattr(torch, "OutOfMemoryError", ()))):
        return True
    from accelerate.utils.memory import should_reduce_batch_size

    return should_reduce_batch_size(exc)


class ValidationOutOfMemory(RuntimeError):
    """An out-of-memory error raised while the validation scorer ran: --eval_batch_size, not --batch_size,
    is what to shrink. Carries the original error's message (and the error itself as its cause)."""


@contextlib.contextmanager
def validation_scoring():
    """Around a validation (or diagnostics) scoring pass: an out-of-memory error inside becomes
    ValidationOutOfMemory, so `train_within_memory` knows which batch to shrink."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - anything but an OOM goes on untouched
        if isinstance(exc, ValidationOutOfMemory) or not is_out_of_memory(exc):
            raise
        raise ValidationOutOfMemory(str(exc)) from exc


def free_memory() -> None:
    """Give the memory of dropped models and tensors back: to Python, then the CUDA/MPS caches."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if hasattr(torch, "mps") and hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def train_within_memory(attempt: Callable, *, batch_size: int, grad_accum: int, eval_batch_size: int,
                        auto: bool, stage: str, printer: Callable[[str], None] = print):
    """`attempt(batch_size, grad_accum, eval_batch_size)` until it fits in memory; returns what it returns.

    With `auto` (--auto_find_batch_size), an out-of-memory error during training halves the per-device
    batch and doubles gradient accumulation, so batch x accumulation, the batch the optimizer sees,
    stays the same (the fix the original README's troubleshooting gives by hand); one during
    validation halves --eval_batch_size. Each retry starts the attempt over (the stage restores the
    starting weights). Without `auto`, or at batch size 1, it raises OutOfMemory naming the flags.
    """
    while True:
        try:
            return attempt(batch_size, grad_accum, eval_batch_size)
        except Exception as exc:  # noqa: BLE001 - anything but an OOM is re-raised untouched
            if not is_out_of_memory(exc):
                raise
            while_scoring = isinstance(exc, ValidationOutOfMemory)
            detail = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        # Out of the except block: the traceback, and the tensors its frames hold, are released.
        free_memory()
        where = f"scoring the validation set ({eval_batch_size} texts per pass)" if while_scoring else \
            f"training ({batch_size} examples per device per step, gradient accumulation {grad_accum})"
        can_shrink = (eval_batch_size if while_scoring else batch_size) > 1
        if not (auto and can_shrink):
            fix = ("--eval_batch_size (lower)" if while_scoring else OOM_FLAGS)
            tried = " even at the smallest batch" if auto else ""
            raise OutOfMemory(f"{stage}: the device ran out of memory while {where}{tried} ({detail}). "
                              f"Change: {fix}. Checkpoints written so far are kept; add --resume to continue.")
        if while_scoring:
            eval_batch_size = max(1, eval_batch_size // 2)
            printer(f"[{stage}] out of memory while {where}; retrying from the start with --eval_batch_size "
                    f"{eval_batch_size}.")
        else:
            batch_size, grad_accum = smaller_batch(batch_size, grad_accum)
            printer(f"[{stage}] out of memory while {where}; retrying from the start with --batch_size "
                    f"{batch_size} --grad_accum {grad_accum} (same effective batch).")


def smaller_batch(batch_size: int, grad_accum: int) -> tuple[int, int]:
    """The largest batch at most half of `batch_size` that divides the effective batch, and the accumulation
    that keeps it: (8, 2) -> (4, 4); (3, 4) -> (1, 12), where plain halving would give (1, 8)."""
    effective = batch_size * grad_accum
    smaller = next(b for b in range(max(1, batch_size // 2), 0, -1) if effective % b == 0)
    return smaller, effective // smaller


def auto_batch(s, stage: str, device=None, printer: Callable[[str], None] = print) -> tuple[int, int, bool]:
    """(batch_size, grad_accum, retry on OOM) for --batch_size auto.

    On CUDA in a single process: start at the recipe's whole effective batch in one micro-batch
    (batch x grad_accum, the batch being the setting's default) and let the out-of-memory retry
    shrink it to the largest size that divides it and fits (smaller_batch), so batch x grad_accum
    stays exactly the recipe's. The length-grouped sampler puts the longest batch first, so a
    batch that does not fit fails at the first step. Elsewhere (CPU, MPS: the batch does not buy
    speed there; several processes: they cannot retry in step) the recipe's batch is kept.
    """
    import dataclasses

    import torch

    recipe = next(f.default for f in dataclasses.fields(s) if f.name == "batch_size")
    kind = getattr(device, "type", str(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if kind != "cuda" or world_size() > 1:
        printer(f"[{stage}] --batch_size auto: {recipe} (the recipe's; auto searches only on a single CUDA device).")
        return recipe, s.grad_accum, s.auto_find_batch_size
    effective = recipe * s.grad_accum
    printer(f"[{stage}] --batch_size auto: trying {effective} (the whole effective batch of {recipe} x {s.grad_accum} "
            "in one micro-batch), smaller on an out-of-memory error.")
    return effective, 1, True


def fit_within_memory(attempt: Callable, s, stage: str, device=None) -> tuple:
    """`attempt(batch_size, grad_accum, eval_batch_size, stop_flag)` under `stop_on_signal()` and
    `train_within_memory()`, starting from the batch settings in `s`; returns (what the attempt that
    fitted returned, the batch it used, for the run's record)."""
    with stop_on_signal() as flag:
        def sized(batch_size: int, grad_accum: int, eval_batch_size: int):
            used = {"batch_size": batch_size, "grad_accum": grad_accum, "eval_batch_size": eval_batch_size,
                    "processes": world_size()}
            if s.batch_size == "auto":  # what was asked for, beside what it became
                used["batch_size_setting"] = "auto"
            return attempt(batch_size, grad_accum, eval_batch_size, flag), used

        batch_size, grad_accum, auto = s.batch_size, s.grad_accum, s.auto_find_batch_size
        if batch_size == "auto":
            batch_size, grad_accum, auto = auto_batch(s, stage, device, printer=say if is_main_process() else quiet)
        return train_within_memory(sized, batch_size=batch_size, grad_accum=grad_accum,
                                   eval_batch_size=s.eval_batch_size, auto=auto, stage=stage)


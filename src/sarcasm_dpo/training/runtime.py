"""How a training stage survives the machine it runs on: signals, out-of-memory errors, several processes.

Used by the SFT and DPO stages (the code lives in them, this module holds the shared parts):

- `plan_run_dir()` / `claim_run_dir()` / `finish_run_dir()`: the output folder's life, checked
  read-only first, taken over only when every check passed, marked complete last; with
  `latest_checkpoint()` and `save/load_checkpoint_state()` for --resume, and `save_adapter()`.
- `stop_on_signal()` + `GracefulStopCallback`: the first Ctrl-C (SIGINT) or SIGTERM lets the
  current optimizer step finish, writes a checkpoint through the Trainer's own save path (model,
  optimizer, scheduler, RNG states, plus the stage's validation state) and stops with
  `StopRequested`; the CLI then prints the command that resumes and exits 128 + signal number.
  A second signal stops at once (the newest complete checkpoint is still there).
- `train_within_memory()`: runs training; on a CUDA/MPS out-of-memory error it halves the
  per-device batch and doubles gradient accumulation (same effective batch) when
  --auto_find_batch_size is on, or explains which flags to change when it is off.
  `fit_within_memory()` runs a stage's training attempt under both.
- `world_size()`, `is_main_process()`, `barrier()`: what a stage needs under `accelerate launch`
  or `torchrun`: every process trains, only the main one writes files and talks to W&B.
- `cpu_workers_requested()` / `run_workers()`: `accelerate launch --cpu --num_processes N` starts a
  single process (accelerate leaves multi-CPU runs to mpirun); the CLI then starts the N workers
  itself, as torchrun would, so the command runs data-parallel over gloo.

    accelerate launch --num_processes 2 --cpu -m sarcasm_dpo.cli sft --model PATH --no_wandb
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from ..errors import UserError

# -- processes ----------------------------------------------------------------------------------------


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single-process run or before the process group exists)."""
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def any_process(flag: bool, device=None) -> bool:
    """True on every process when `flag` is true on at least one (so all take the same branch)."""
    if world_size() <= 1:
        return flag
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=device or "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


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
            _note(f"{name} received again within 1 s: taken as the same stop request. Send it again to stop "
                  "at once.\n")
            return
        if flag.signum is None:
            flag.signum = signum
            first[0] = time.monotonic()
            step = f"finishing step {flag.step}" if flag.step is not None else "finishing the current step"
            _note(f"\n{name} received: stopping after the current step: {step}, then writing a checkpoint. "
                  "Send it again to stop at once, without one.\n")
            return
        _note(f"{name} received again: stopping now, without a new checkpoint; --resume starts from the newest "
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


def _note(text: str) -> None:
    """One line on stderr from the main process, safe inside a signal handler.

    os.write, not print: the handler may interrupt a print, and buffered streams are not reentrant.
    """
    if is_main_process():
        with contextlib.suppress(OSError):
            os.write(2, text.encode())


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
                _note(f"Writing checkpoint-{state.global_step}, then stopping.\n")

    def on_step_begin(self, args, state, control, **kwargs):
        self.flag.step = state.global_step + 1
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # An epoch's last step is followed by that epoch's validation (on_epoch_end). A checkpoint
        # taken here would miss it, and the resumed run, starting after the epoch, would never
        # validate it: its best-epoch choice would differ from an uninterrupted run's. So wait for
        # the epoch end there. state.epoch is the same in every process, so they all agree.
        if state.epoch is None or not float(state.epoch).is_integer():
            self._check(args, control, state)
        elif self.flag and not self.stopping:
            _note(f"Step {state.global_step} ends epoch {round(state.epoch)}: validating it first, then writing "
                  "the checkpoint.\n")
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


# -- settings both training stages check ----------------------------------------------------------------


def check_training_settings(s) -> None:
    """The checks SFT and DPO share, beyond what their settings' validate() does."""
    if not 0 <= s.warmup_ratio < 1:
        raise UserError(f"--warmup_ratio must be in [0, 1), got {s.warmup_ratio}.")
    if s.logging_steps < 1:
        raise UserError(f"--logging_steps must be at least 1, got {s.logging_steps}.")
    if s.auto_find_batch_size and world_size() > 1:
        raise UserError("--auto_find_batch_size works in single-process runs only: the processes of a distributed "
                        "run cannot retry in step. Set --batch_size and --grad_accum instead.")
    warn_if_unusual("lr", s.lr, USUAL_LR, "LoRA fine-tuning uses 1e-5 to 1e-3; far above, the adapter blows up "
                    "(the run stops when its weight norm or loss explodes), far below, it does not move")


USUAL_LR = (1e-6, 1e-2)  # LoRA learning rates seen in practice, with a margin on both sides
USUAL_BETA = (0.005, 2.0)  # DPO betas seen in practice (0.01 to 0.5), with a margin


def warn_if_unusual(name: str, value: float, usual: tuple[float, float], why: str) -> None:
    """A warning, not an error: values outside the usual range are legal, but most often a typo."""
    import warnings

    low, high = usual
    if not low <= value <= high:
        warnings.warn(f"--{name} {value:g} is outside its usual range [{low:g}, {high:g}]: {why}.", stacklevel=3)


# -- the output folder and its checkpoints --------------------------------------------------------------

CHECKPOINTS = "checkpoints"  # in the output folder
RUN_CONFIG = "run_config.json"  # in checkpoints/: whose checkpoints these are
BEST_FILE = "validation_best_adapter.safetensors"  # in each checkpoint: the best adapter so far
# Settings that may change between an interrupted run and its --resume without changing the math.
RESUME_NEUTRAL = ("device", "eval_batch_size", "logging_steps", "save_steps", "auto_find_batch_size",
                  "gradient_checkpointing", "diagnostics_steps")


def latest_checkpoint(ckpt_dir: Path, state_file: str) -> Path | None:
    """The newest checkpoint whose save finished (the stage's `state_file` is written after the Trainer's)."""
    if not ckpt_dir.is_dir():
        return None
    found = []
    for folder in ckpt_dir.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if match and (folder / "trainer_state.json").is_file() and (folder / state_file).is_file():
            found.append((int(match.group(1)), folder))
    return max(found)[1] if found else None


def finished_record(out: Path, config: dict, summary_file: str) -> dict | None:
    """The completion record of `out` when it holds the finished run of these settings, else None."""
    from ..atomic import read_complete, stable_config

    record = read_complete(out)
    if record and stable_config(record.get("config") or {}) == stable_config(config) \
            and (out / summary_file).is_file() and not interrupted_run(out):  # a newer run stopped: not this record's
        return record
    return None


def plan_run_dir(out: Path, config: dict, s, *, finished: bool, state_file: str) -> Path | None:
    """Read-only: may this run use the output folder, and which checkpoint does it continue from?

    A folder with another run's results is refused unless --overwrite (check_output_dir). Old
    checkpoints are never silently reused nor silently thrown away: without --resume they are an
    error, unless --overwrite says to start over. Nothing is changed here (see claim_run_dir).
    `finished`: the folder holds the finished run of these settings (each stage knows what that takes).
    """
    from ..atomic import check_output_dir, read_json, settings_differences

    ckpt_dir = out / CHECKPOINTS
    # Checkpoints beside a finished run of these settings are leftovers of a run killed after its marker.
    latest = None if finished else latest_checkpoint(ckpt_dir, state_file)
    resume_from = latest if s.resume else None
    if latest is not None and not s.resume and not s.overwrite:  # say so first: --resume is the likely wish
        raise UserError(f"{ckpt_dir} holds checkpoints of an unfinished run. Pass --resume to continue it, "
                        "or --overwrite to start over.")
    check_output_dir(out, config, overwrite=s.overwrite, resume=resume_from is not None)
    if resume_from is not None:
        had = read_json(ckpt_dir / RUN_CONFIG) if (ckpt_dir / RUN_CONFIG).is_file() else {}
        diff = settings_differences({"config": had}, config, ignore_keys=RESUME_NEUTRAL)
        if diff:
            raise UserError(f"The checkpoints in {ckpt_dir} were made with other settings (differ in: "
                            f"{', '.join(diff)}). Resume with the same settings, or pass --overwrite "
                            "without --resume to start over.")
    return resume_from


def claim_run_dir(out: Path, config: dict, s, resume_from: Path | None) -> None:
    """Take the folder over once every check passed: stale checkpoints gone, the settings recorded beside
    the checkpoints. The previous run's files and COMPLETE.json stay until this run's outputs start to
    land (save_adapter clears the marker), so a run that fails while training (out of memory, a full
    disk, a diverging loss) leaves them whole; `interrupted_run()` tells the pipeline a newer run was
    stopped there. Call it on every process once the trainer exists (it sets up the process group);
    only the main process writes, and all wait until it has."""
    from ..atomic import check_output_dir, write_json

    barrier()
    if is_main_process():
        ckpt_dir = out / CHECKPOINTS
        if s.resume and resume_from is None:
            print(f"--resume: no complete checkpoint in {ckpt_dir}; starting from the beginning.")
        check_output_dir(out, config, overwrite=s.overwrite, resume=resume_from is not None)
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            print(f"Resuming from {resume_from}.")
        elif ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # --overwrite, or leftovers with no complete checkpoint to resume from
        write_json(ckpt_dir / RUN_CONFIG, config)
    barrier()


def interrupted_run(out: Path) -> bool:
    """A run was stopped in `out` before it finished: its checkpoints' record is there and no completion
    marker, or only one older than that record (the previous run's, which this one had not yet replaced)."""
    from ..atomic import COMPLETE_MARKER

    started = out / CHECKPOINTS / RUN_CONFIG
    marker = out / COMPLETE_MARKER
    if not started.is_file():
        return False
    return not marker.is_file() or marker.stat().st_mtime < started.stat().st_mtime


def finish_run_dir(out: Path, config: dict, extra: dict) -> None:
    """Main process, after every output is written: the completion marker, then the checkpoints go."""
    from ..atomic import finish_output_dir

    finish_output_dir(out, config, extra)
    # Only now: a run killed before the marker can still --resume from its checkpoints.
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def save_checkpoint_state(folder: Path, state_file: str, state: dict, best_state: dict | None) -> None:
    """The stage's state beside a Trainer checkpoint: the best adapter so far, then `state_file`, which
    is written last and so marks the checkpoint complete."""
    from safetensors.torch import save_file

    from ..atomic import atomic_path, write_json

    if best_state is not None:
        with atomic_path(folder / BEST_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in best_state.items()}, str(tmp))
    write_json(folder / state_file, state)


def load_checkpoint_state(folder: Path, state_file: str) -> tuple[dict, dict | None]:
    """(state, best adapter so far or None) as `save_checkpoint_state` left them."""
    from safetensors.torch import load_file

    from ..atomic import read_json

    best = folder / BEST_FILE
    return read_json(folder / state_file), (load_file(str(best)) if best.is_file() else None)


def save_adapter(model, tokenizer, out: Path, **save_kwargs) -> None:
    """Write adapter and tokenizer to a scratch folder, then move each file into place.

    adapter_config.json moves last, so a folder killed mid-save never holds a loadable adapter
    with missing weights; COMPLETE.json (written after everything) is the final word anyway.
    `save_kwargs` go to the model's save_pretrained (which adapter, which layers).
    """
    from ..atomic import _umask, clear_complete

    # The first of this run's outputs to land in the folder: from here on the previous run's marker would lie.
    clear_complete(out)
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=out))
    try:
        model.save_pretrained(str(scratch), **save_kwargs)
        tokenizer.save_pretrained(str(scratch))
        (scratch / "README.md").unlink(missing_ok=True)  # PEFT's empty model card template
        folders = [p.name for p in scratch.iterdir() if p.is_dir()]
        if folders:  # PEFT saves every adapter but the first into a subfolder: more than one was saved
            raise RuntimeError(f"Saving the adapter wrote subfolders {folders}.")
        files = sorted(scratch.iterdir(), key=lambda p: p.name == "adapter_config.json")
        mode = 0o666 & ~_umask()  # safetensors writes owner-only files; outputs get the usual permissions
        for path in files:
            os.chmod(path, mode)
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- what the trainer is given and what it shows --------------------------------------------------------


def run_record(trainer, device, resume_from: Path | None, used: dict | None, timings: dict) -> dict:
    """What a training summary says about how the run went, beside the stage's own results."""
    import peft
    import torch
    import transformers
    import trl

    return {
        "device": str(device),
        "dtype": str(next(trainer.model.parameters()).dtype).replace("torch.", ""),
        "resumed_from": str(resume_from) if resume_from else None,
        # What training really used: --auto_find_batch_size may have shrunk the batch; processes > 1 under DDP.
        "batch": used,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": peft.__version__},
    }


def trainer_arguments(s, model, ckpt_dir: Path) -> dict:
    """The TrainingArguments SFT and DPO share; each stage adds its loss, saving and memory settings."""
    import torch

    return dict(
        output_dir=str(ckpt_dir),
        num_train_epochs=s.epochs,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        auto_find_batch_size=False,  # ours (train_within_memory) also keeps the effective batch
        optim="adamw_torch",
        learning_rate=s.lr,
        lr_scheduler_type="cosine",
        warmup_steps=s.warmup_ratio,  # transformers 5: a value below 1 is a share of all steps
        # The model was loaded in bf16 only where the GPU does bf16 (models.pick_dtype); fp32 elsewhere.
        bf16=model.dtype == torch.bfloat16,
        fp16=False,
        use_cpu=next(model.parameters()).device.type == "cpu",
        max_length=s.max_length,
        logging_steps=s.logging_steps,
        logging_first_step=True,  # DPO: step 1's rewards are measured before any update, exactly 0
        logging_nan_inf_filter=False,  # show a NaN loss as NaN; the stage's divergence check stops the run
        save_total_limit=2,  # the newest may be half-written when killed; the one before it is whole
        eval_strategy="no",  # validation is the F1 of the scorer, in the stage's validation callback
        report_to="none",  # W&B goes through our Tracker
        seed=s.seed,
        data_seed=s.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable (LoRA) parameter gets a gradient at every step
        # --compile: a few padded lengths instead of one shape per batch, so torch.compile does not recompile each step
        **({"torch_compile": True, "pad_to_multiple_of": COMPILE_PAD} if getattr(s, "compile", False) else {}),
    )


COMPILE_PAD = 64  # tokens; sequence lengths are rounded up to a multiple of this under --compile


def run_trainer(trainer, resume_from: Path | None):
    """trainer.train(), from `resume_from` if given; whatever ends it early closes the progress bar first."""
    try:
        return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException:
        close_progress_bars(trainer)
        raise


def close_progress_bars(trainer) -> None:
    """So that the message after a failed or stopped run starts on a line of its own."""
    from ..training.callbacks import LossProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, LossProgressCallback) and callback.bar is not None:
            callback.bar.close()
            callback.bar = None


def quiet(*_args, **_kwargs) -> None:
    """The printer of processes other than the main one: one copy of each message is enough."""


def say(message: str) -> None:
    """The main process's printer while a training bar may be on screen: tqdm clears the bar, prints the
    line on a line of its own (stdout, as print) and redraws the bar, instead of gluing both together."""
    from tqdm.auto import tqdm

    tqdm.write(message)


# -- data order that survives a resume ------------------------------------------------------------------


def seeded_length_grouping(trainer_class: type) -> type:
    """`trainer_class` whose length-grouped batches come in an order fixed by (seed, epoch) alone.

    transformers' LengthGroupedSampler shuffles with the global torch RNG at the start of each
    epoch; after a --resume that RNG is not where the uninterrupted run had it (the checkpoint's RNG
    state is restored only after the loader is built), so from the second epoch on a resumed run
    would see the examples in another order. Seeding each epoch's shuffle with seed + epoch makes
    the order a pure function of the settings, so a resumed run retraces the uninterrupted one.
    """
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if trainer_class in _SEEDED:
        return _SEEDED[trainer_class]

    class Seeded(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is not LengthGroupedSampler:
                return sampler
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, seed=seed,
                                                   epoch_of=lambda: math.floor((self.state.epoch or 0) + 1e-6))

    Seeded.__name__ = Seeded.__qualname__ = f"Seeded{trainer_class.__name__}"
    _SEEDED[trainer_class] = Seeded
    return Seeded


_SEEDED: dict[type, type] = {}


def _length_grouped_sampler_class():
    from transformers.trainer_pt_utils import LengthGroupedSampler

    return LengthGroupedSampler


class EpochSeededLengthGroupedSampler(_length_grouped_sampler_class()):
    """Length-grouped indices shuffled by a generator seeded with seed + the epoch being started
    (`epoch_of()` reads it from the trainer state, which a resume restores)."""

    def __init__(self, batch_size: int, *, lengths: list[int], seed: int, epoch_of: Callable[[], int]):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch_of = epoch_of

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator()
        generator.manual_seed(int(self.seed) + int(self.epoch_of()))
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


# -- out of memory ------------------------------------------------------------------------------------

OOM_FLAGS = ("--batch_size (lower), --grad_accum (raise it by the same factor to keep the effective batch), "
             "--auto_find_batch_size (does both for you), --max_text_tokens / --max_length (shorter inputs), "
             "--gradient_checkpointing (recompute activations)")


class OutOfMemory(UserError):
    """The device ran out of memory; the message names the flags that fix it."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA, MPS (and XPU, CPU allocator) out-of-memory errors, the way accelerate recognises them."""
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    from accelerate.utils.memory import should_reduce_batch_size

    return should_reduce_batch_size(exc)


def _raised_while_scoring(exc: BaseException) -> bool:
    """Did the error come from the validation scorer (sized by --eval_batch_size) rather than training?"""
    return any(Path(frame.filename).name == "scoring.py" for frame in traceback.extract_tb(exc.__traceback__))


def free_memory() -> None:
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
            while_scoring = _raised_while_scoring(exc)
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


# -- `accelerate launch --cpu --num_processes N` --------------------------------------------------------

_MPI_OR_TORCHRUN = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def cpu_workers_requested() -> int:
    """N when this process is the one process `accelerate launch --cpu --num_processes N` (N > 1) started.

    accelerate's CPU launcher runs the script once and expects mpirun to start the other ranks; it
    only sets MASTER_ADDR (for N > 1) and ACCELERATE_USE_CPU. N itself is read from the launcher's
    command line (or its config file). 0 when not in that situation.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() not in ("1", "true", "yes"):
        return 0
    if "MASTER_ADDR" not in os.environ or any(k in os.environ for k in _MPI_OR_TORCHRUN):
        return 0
    try:
        return max(0, _launcher_num_processes())
    except Exception:  # noqa: BLE001 - an unreadable parent is "not launched that way"
        return 0


def _launcher_num_processes() -> int:
    import psutil

    cmdline = psutil.Process(os.getppid()).cmdline()
    for marker in ("launch", "accelerate.commands.launch"):
        if marker in cmdline:
            argv = cmdline[cmdline.index(marker) + 1:]
            break
    else:
        return 0
    from accelerate.commands.launch import launch_command_parser

    args, _ = launch_command_parser().parse_known_args(argv)
    n = args.num_processes
    if n is None:
        from accelerate.commands.config import default_config_file
        from accelerate.commands.config.config_args import load_config_from_file

        if args.config_file or os.path.isfile(default_config_file):
            n = load_config_from_file(args.config_file).num_processes
    return int(n or 0)


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    return preferred


def run_workers(n: int, argv: list[str], module: str = "sarcasm_dpo.cli") -> int:
    """Start `n` ranks of `python -m module argv` the way torchrun does, wait, return the exit code.

    The workers stay in our process group, so a Ctrl-C in the terminal reaches each of them; a
    SIGINT or SIGTERM sent to this launcher alone is forwarded (the workers count two signals
    within a second as one). If accelerate, our parent, dies (it does not pass SIGTERM on), the
    workers are stopped the same way: a checkpoint first. If one worker fails, the others are stopped.
    """
    port = _free_port(int(os.environ.get("MASTER_PORT", "29500")))
    threads = str(max(1, (os.cpu_count() or n) // n))
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": threads}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env))

    def forward(signum, frame=None):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    parent = os.getppid()
    try:
        code = 0
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                code = failed[0]
                if code not in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # a stopped rank: the others stop too
                    _stop_all(procs)
                    break
            if parent and os.getppid() != parent:
                parent = 0
                forward(signal.SIGTERM)
            time.sleep(0.2)
        return code or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_all(procs, grace_s: float = 10.0) -> None:
    """The other ranks cannot finish without the failed one: ask them to stop, then make them."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

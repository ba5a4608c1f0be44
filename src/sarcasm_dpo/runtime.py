"""How a training stage survives the machine it runs on: signals, out-of-memory errors, several processes.

Used by the SFT and DPO stages (the code lives in them, this module holds the shared parts):

- `stop_on_signal()` + `GracefulStopCallback`: the first Ctrl-C (SIGINT) or SIGTERM lets the
  current optimizer step finish, writes a checkpoint through the Trainer's own save path (model,
  optimizer, scheduler, RNG states, plus the stage's validation state) and stops with
  `StopRequested`; the CLI then prints the command that resumes and exits 128 + signal number.
  A second signal stops at once (the newest complete checkpoint is still there).
- `train_within_memory()`: runs training; on a CUDA/MPS out-of-memory error it halves the
  per-device batch and doubles gradient accumulation (same effective batch) when
  --auto_find_batch_size is on, or explains which flags to change when it is off.
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
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from .errors import UserError

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

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_on_signal():
    """While inside: the first SIGINT/SIGTERM sets the flag (checkpoint at the next step end), a second
    one (a second or more later) raises KeyboardInterrupt at once. Outside the main thread signals
    cannot be caught; no-op there."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    first = [0.0]

    def handler(signum, frame):
        if flag.signum is not None and time.monotonic() - first[0] < 1.0:
            return  # the same stop request twice: a terminal's Ctrl-C and a launcher forwarding it
        if flag.signum is None:
            flag.signum = signum
            first[0] = time.monotonic()
            if is_main_process():
                # os.write, not print: the handler may interrupt a print, and buffered streams are not reentrant.
                note = (f"\n{signal.Signals(signum).name} received: finishing the current step and writing a "
                        "checkpoint, then stopping. Send it again to stop at once.\n")
                with contextlib.suppress(OSError):
                    os.write(2, note.encode())
            return
        raise StopRequested(signum)  # no new checkpoint: the newest complete one is where --resume starts

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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

    def _check(self, args, control) -> None:
        if not self.stopping and any_process(bool(self.flag), getattr(args, "device", None)):
            self.stopping = True
            control.should_save = True

    def on_step_end(self, args, state, control, **kwargs):
        self._check(args, control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self._check(args, control)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopping:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            raise StopRequested(self.flag.signum or signal.SIGTERM, checkpoint, state.global_step)


class BarrierOnSaveCallback(TrainerCallback):
    """Every process has written its part of a checkpoint (each writes its own RNG state) before the
    main process marks it complete; put it before the state saver."""

    def on_save(self, args, state, control, **kwargs):
        barrier()


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
            batch_size, grad_accum = max(1, batch_size // 2), grad_accum * 2
            printer(f"[{stage}] out of memory while {where}; retrying from the start with --batch_size "
                    f"{batch_size} --grad_accum {grad_accum} (same effective batch).")


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

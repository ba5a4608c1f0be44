"""Several processes: who is who, waiting for each other, what each one prints, and the CPU launcher.

Under `accelerate launch` or `torchrun` every process of a training stage trains; only the main one
(rank 0) writes files and talks to W&B. Any other command runs on the main process alone
(`runs_here`, applied once by the CLI), but for the pipeline, which runs on every process: its training
stages train on all of them, its other stages on the main one while the others wait
(`start_process_group()` before its first stage, then `on_main_process()`). `world_size()`, `rank()`,
`is_main_process()`, `barrier()` and `any_process()` are what a stage needs for that; they read the
launcher's environment, so they cost nothing in a single-process run. `say` / `quiet` / `note` are the
printers: one copy of each message, from the main process, that does not garble a progress bar or a
signal handler.

`accelerate launch --cpu --num_processes N` starts a single process (accelerate leaves multi-CPU
runs to mpirun); `cpu_workers_requested()` notices that and the CLI starts the N workers itself
with `run_workers()`, as torchrun would, so the command runs data-parallel over gloo:

    accelerate launch --num_processes 2 --cpu -m sarcasm_dpo.cli sft --model PATH --no_wandb
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

from ..errors import UserError

# -- processes ----------------------------------------------------------------------------------------


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    return rank() == 0


def runs_here(every_process: bool) -> bool:
    """Whether this process runs a command, under any launch: a command that trains data-parallel (sft, dpo), or the
    pipeline, which runs its training stages that way, runs on every process (`every_process`); any other one
    (split, compare, export, predict, ...) on the main process only, as a plain run would, and the other processes
    have nothing to do (no file written, no line printed, no W&B run, stdin left alone)."""
    return every_process or is_main_process()


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

# -- the pipeline under a launch: one process group from the start, the main process working alone --------

# How long the other processes wait for a stage the main process runs alone (split, mine, compare): minutes
# usually, an hour for a big comparison on CPUs. Their own process group (gloo) carries only that wait, so the
# training stages keep the Trainer's timeout; a main process that dies ends the wait at once (its connections close).
MAIN_ONLY_TIMEOUT = timedelta(hours=24)

_main_only_group = None  # the process group the waits use (start_process_group)
_others_wait_for_exit = False  # the main process handed a failure on: the others wait for it to end (on_main_process)


class MainProcessStopped(UserError):
    """Raised on the processes other than the main one when work the main process did alone failed, or the main
    process is gone: they end too, printing nothing (the CLI prints a UserError on the main process only: that
    process says what went wrong), with exit code 1."""

    exit_code = 1

    def __init__(self, message: str = "the main process stopped; it says why") -> None:
        super().__init__(message)


def start_process_group(cpu: bool) -> None:
    """Under a launch of several processes: make the process group now, as accelerate (and so the Trainer) makes it:
    gloo for training on CPUs (`cpu`, or `accelerate launch --cpu`), else nccl on each process's GPU, with the
    Trainer's timeout. A Trainer built later finds it and uses it (it only makes one when none exists). Also makes
    the gloo group `on_main_process` waits on. Call it on every process, before the first `on_main_process`;
    nothing in a single-process run."""
    global _main_only_group
    if world_size() <= 1 or _main_only_group is not None:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState
        from transformers import TrainingArguments

        cpu = cpu or os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")
        timeout = timedelta(seconds=TrainingArguments.__dataclass_fields__["ddp_timeout"].default)
        PartialState(cpu=cpu, timeout=timeout)  # what TrainingArguments asks of accelerate, sooner
    if not dist.is_initialized():
        raise UserError(f"This launch asks for {world_size()} processes, but accelerate found no way for them to work "
                        "together on this machine's device (GPUs take nccl, CPUs gloo). Nothing was run. Run the "
                        "command without a launcher.")
    _main_only_group = dist.new_group(backend="gloo", timeout=MAIN_ONLY_TIMEOUT)
    atexit.register(_end_process_groups)


def _end_process_groups() -> None:
    """At exit: take the gloo groups down, as torch asks. A process that exits with a gloo group up while another
    process of it still runs may abort ("terminate called without an active exception", exit -6) after its work
    is done. An nccl group is left to the exit, as a launched sft or dpo leaves it (tearing it down waits for the
    other processes in some versions, and the main process may end before the others here). Nor does a main
    process that failed take them down: the others wait for its connections to close, which must be its end, so
    that the launcher sees its exit code first."""
    global _main_only_group
    import torch.distributed as dist

    if _others_wait_for_exit:
        return
    with contextlib.suppress(Exception):
        if dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()  # every group
        elif _main_only_group is not None:
            dist.destroy_process_group(_main_only_group)
    _main_only_group = None


def on_main_process(work, share: bool = False):
    """`work()` on the main process alone while the other processes wait for it; its value on the main process, and
    on every process with `share` (sent as a pickle: settings, decisions, not models). In a single-process run,
    just `work()`.

    Every process leaves together, and a failure there ends them all: the main process raises what `work` raised
    (an error, Ctrl-C), the others `MainProcessStopped`, once the main process has ended, so that a launcher,
    which stops the other processes as soon as one fails, cannot stop the main one before it has said why. A
    Ctrl-C that reaches every process (a terminal's) ends each as Ctrl-C does."""
    global _others_wait_for_exit
    if world_size() <= 1:
        return work()
    if _main_only_group is None:
        raise RuntimeError("on_main_process under a launch needs start_process_group() first, on every process")
    import torch.distributed as dist

    failure, value, box = None, None, [None]
    if is_main_process():
        try:
            value = work()
        except BaseException as exc:  # noqa: BLE001 - handed on below, once the others know
            failure = exc
        box[0] = (failure is None, value if share else None)
    try:
        dist.broadcast_object_list(box, src=0, group=_main_only_group)
        sent = True
    except RuntimeError:  # a process is gone (its connections closed): one a Ctrl-C reached first, or one that died
        sent = False
    if failure is not None:
        _others_wait_for_exit = sent
        raise failure
    if not sent and is_main_process():
        raise UserError("Another process of this launch stopped while the main process worked alone (the launcher's "
                        "lines say which and why); the run cannot go on without it. Run the same command again.")
    if not sent:
        raise MainProcessStopped()
    done, shared = box[0]
    if not done:
        with contextlib.suppress(RuntimeError):  # a collective the main process never joins: ends when that one does
            dist.barrier(group=_main_only_group)
        raise MainProcessStopped()
    return value if is_main_process() else shared


# -- what each process prints ---------------------------------------------------------------------------


def note(text: str) -> None:
    """One line on stderr from the main process, safe inside a signal handler.

    os.write, not print: the handler may interrupt a print, and buffered streams are not reentrant.
    """
    if is_main_process():
        with contextlib.suppress(OSError):
            os.write(2, text.encode())


def quiet(*_args, **_kwargs) -> None:
    """The printer of processes other than the main one: one copy of each message is enough."""


def say(message: str) -> None:
    """The main process's printer while a training bar may be on screen: tqdm clears the bar, prints the
    line on a line of its own (stdout, as print) and redraws the bar, instead of gluing both together."""
    from tqdm.auto import tqdm

    tqdm.write(message)

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

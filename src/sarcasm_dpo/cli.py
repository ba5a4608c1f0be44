"""`sarcasm-dpo`: one command, one subcommand per stage.

    sarcasm-dpo split --data_dir ../shared/data
    sarcasm-dpo sft --model Qwen/Qwen2.5-0.5B-Instruct --epochs 2
    sarcasm-dpo dpo --sft_model models/sft --beta 0.1
    sarcasm-dpo compare --test_csv data/splits/gen_test.csv
    sarcasm-dpo pipeline --config configs/qwen2.5-0.5b.yaml

Bad input or settings end with one paragraph on stderr and exit code 2 (no traceback), and so do
files and folders the machine refuses (a full disk, a read-only or unreadable path, a name too long,
a truncated .safetensors file, text that is not UTF-8); a missing or misplaced path only when the
settings name it (or it lies in or beside one): about any other path it is a bug (errors.py says
why). A closed pipe (`predict ... | head -1`) ends quietly with 141, as Unix tools do; anything
else is a bug and keeps its traceback. Ctrl-C or
SIGTERM during sft/dpo training writes a checkpoint, prints the command that resumes, and exits
128 + the signal number (130, 143). Runs under `accelerate launch ... -m sarcasm_dpo.cli sft ...`
as well, `--cpu --num_processes N` included (see training/distributed.py). Under such a launch the
stages that train (sft, dpo) run on every process; every other command runs once, on the main
process, and the others exit 0 at once; `pipeline` runs on every process, its training stages
data-parallel and its other stages on the main process while the others wait (stages/pipeline.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import signal
import sys
import threading

from . import __version__
from .config import TRUTH_WORDS, add_arguments, from_namespace, whole_number_flag
from .errors import UserError, describe_failure, note_paths
from .stages import STAGES, settings_classes
from .training.distributed import is_main_process, runs_here

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sarcasm-dpo",
        description="Turn a small chat model into a sarcasm detector (SFT -> DPO) and measure what each stage bought.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="Dataset commands (download).", description="Dataset commands.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    text = ("Fetch GEN and iSarcasmEval from their GitHub repositories into the cache, verify their sha256 and "
            "write them atomically; files already there with the right checksum are kept. Every command that "
            "reads the datasets finds them there afterwards, offline too.")
    download = data_sub.add_parser("download", help="Fetch GEN and iSarcasmEval into the cache and verify checksums.",
                                   description=text)
    download.add_argument("--cache_dir", default=None,
                          help="Where to put the files (default: $SARCASM_DPO_DATA or ~/.cache/sarcasm-dpo/data).")
    download.add_argument("--base_url", default=None,
                          help="Mirror to fetch from instead of the GitHub repositories (default: "
                               "https://raw.githubusercontent.com).")

    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        add_arguments(p, stage.settings)

    text = ("Classify texts with a model (a hub id, a folder such as an `export`, or a .gguf) and an optional "
            "LoRA adapter; prints one JSON line per text: {\"text\", \"p_sarcastic\", \"label\"}.")
    predict = sub.add_parser("predict", help="Classify texts with a model and an optional adapter; prints JSON lines.",
                             description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    predict.add_argument("--model", default=None, help="Base model: hub id, folder or .gguf (empty: the adapter's base).")
    predict.add_argument("--adapter", default=None, help="LoRA adapter folder (from sft or dpo).")
    predict.add_argument("--input", default=None, help="Text file (one text per line), or CSV/TSV/JSON/JSONL with a text (or tweet) column; stdin if absent or -.")
    predict.add_argument("--batch_size", type=whole_number_flag("batch_size"), default=16,
                         help="Texts per forward pass.")
    predict.add_argument("--max_text_tokens", type=whole_number_flag("max_text_tokens"), default=None,
                         help="Texts are cut to this many tokens inside the prompt (empty: the length the model "
                              "was trained and validated with, as its run or export records it, else 256).")
    predict.add_argument("--threshold", type=float, default=None,
                         help="P(sarcastic) at or above which the label is 1 (empty: the threshold the adapter's "
                              "threshold.json records, chosen on validation, else the one an exported model records "
                              "in sarcasm_dpo.json, else 0.5).")
    predict.add_argument("--device", default=None, help="cuda, mps or cpu (auto-detected when empty).")
    return parser


def run_command(args: argparse.Namespace) -> object:
    if args.command == "data":
        from .download import DEFAULT_BASE_URL, download

        return download(cache_dir=args.cache_dir, base_url=args.base_url or DEFAULT_BASE_URL)
    if args.command == "predict":
        from .stages.predict import run as predict_run

        return predict_run(args)
    stage = STAGES[args.command]
    settings = from_namespace(settings_classes(), args, stage.name)
    note_paths(settings)  # an OSError about one of them is the user's to fix (errors.describe_failure)
    if getattr(settings, "model", None):  # a hub id with an offline fallback becomes what is actually loaded
        from dataclasses import replace

        from .model_route import route_model

        settings = replace(settings, model=route_model(settings.model))
    if stage.driver:  # it locks every stage's output itself, once it knows them
        return stage.run(settings, config_path=getattr(args, "config", None))
    from .rundir import claim_outputs, input_paths, refuse_outputs_over_inputs

    refuse_outputs_over_inputs(stage.outputs(settings), input_paths(settings))
    with claim_outputs(stage.outputs(settings), command_line(args), main_process=is_main_process()):
        return stage.run(settings)


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (recorded in an output's lock, so a second run can name the first)."""
    return "sarcasm-dpo " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])


def _trains(args: argparse.Namespace) -> bool:
    """A stage whose checkpoints `--resume` continues from, and that trains data-parallel (on every process of a
    multi-process launch; any other command runs on the main process only: training.distributed.runs_here)."""
    stage = STAGES.get(args.command)
    return stage is not None and stage.trains


def _drives(args: argparse.Namespace) -> bool:
    """The pipeline: re-running it skips finished stages and resumes an interrupted one."""
    stage = STAGES.get(args.command)
    return stage is not None and stage.driver


def _every_process(args: argparse.Namespace) -> bool:
    """Runs on every process of a multi-process launch: a stage that trains, and the pipeline, which runs its
    training stages that way and its other stages on the main process (stages/pipeline.py)."""
    return _trains(args) or _drives(args)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, a closing laptop lid), handled like Ctrl-C."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated


def resume_command(args: argparse.Namespace, argv: list[str]) -> str:
    """The command line that continues an interrupted run: the make command when make started it."""
    rerun = os.environ.get("SARCASM_DPO_RERUN")  # set by the Makefile's run targets
    if rerun and _drives(args):
        return rerun
    words = list(argv)
    if _trains(args):
        # Whatever the command said about --resume (the flag alone, `--resume false`, `--resume=no`), it resumes now.
        kept = []
        for word in words:
            if kept and kept[-1] == "--resume" and str(word).strip().lower() in TRUTH_WORDS:
                kept.pop()  # `--resume VALUE`: both words go
                continue
            kept.append(word)
        words = [w for w in kept if w != "--resume" and not str(w).startswith("--resume=")] + ["--resume"]
    return "sarcasm-dpo " + shlex.join(words)


def interrupt_message(args: argparse.Namespace, argv: list[str], exc: KeyboardInterrupt) -> str:
    name = signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
    again = resume_command(args, argv)
    launcher = " (under accelerate launch or torchrun: the same launch line, with --resume added)" \
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""
    checkpoint = getattr(exc, "checkpoint", None)
    if _trains(args) and checkpoint is not None:
        return (f"Stopped by {name} at step {exc.step}: checkpoint {checkpoint} holds the weights, optimizer, "
                f"scheduler, random-number states and validation history. Continue with: {again}{launcher}")
    if _trains(args):
        return (f"Interrupted by {name} before a new checkpoint was written. Finished files are intact; continue "
                f"from the newest complete checkpoint (or from the start if there is none) with: {again}{launcher}")
    if _drives(args):
        return (f"Interrupted by {name}. Re-run the same command; finished stages are skipped and an interrupted "
                f"training stage resumes from its newest checkpoint: {again}"
                + (" (under accelerate launch or torchrun: the same launch line)" if launcher else ""))
    if args.command == "predict":  # it writes no files; what its rows on stdout hold, it said itself
        return f"Interrupted by {name}. Re-run: {again}"
    return f"Interrupted by {name}. Files already written are whole (each is written atomically); re-run: {again}"


def quiet_known_noise() -> None:
    """Silence library chatter that says nothing to a user of this tool; its own progress and warnings stay.

    - transformers' deprecation of `is_gradient_checkpointing`, raised by its own Trainer/PEFT code, not ours;
    - peft's "Could not find a config file" when the base model is a .gguf file (no config.json to compare
      embedding sizes against; our adapters never touch the embeddings);
    - the datasets library's per-step preparation bars ("Tokenizing train dataset", "Adding EOS ...");
    - transformers' "Loading weights" bar, drawn at each of a pipeline's model loads (its download bars stay).
    """
    import warnings

    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Could not find a config file in", category=UserWarning)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    if hasattr(hf_logging, "set_tqdm_hook"):  # transformers >= 5.x; older ones keep their bar
        hf_logging.set_tqdm_hook(_without_loading_bar)


def route_warnings_clear_of_bars() -> None:
    """In the command's own process only (not under a caller's warning capture, e.g. in-process tests)."""
    import warnings

    warnings.showwarning = _show_warning_clear_of_bars


def _show_warning_clear_of_bars(message, category, filename, lineno, file=None, line=None):
    """A warning that comes during training gets a line of its own, not the end of the progress bar's."""
    import warnings

    from tqdm.auto import tqdm

    tqdm.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"), file=file or sys.stderr)


def _without_loading_bar(factory, args, kwargs):
    if kwargs.get("desc") == "Loading weights":
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Under a launch every process parses the same flags: one copy of --help or of a flag's error is enough.
    hush = contextlib.ExitStack()
    if not is_main_process():
        hush.enter_context(contextlib.redirect_stdout(io.StringIO()))
        hush.enter_context(contextlib.redirect_stderr(io.StringIO()))
    with hush:
        args = parser.parse_args(argv)
    if not runs_here(_every_process(args)):  # another process of a launch runs this command: nothing to do here
        return 0
    quiet_known_noise()
    args.argv = argv
    if _every_process(args) and os.environ.get("ACCELERATE_USE_CPU"):
        from .training.distributed import cpu_workers_requested, run_workers

        workers = cpu_workers_requested()
        if workers > 1:  # `accelerate launch --cpu --num_processes N` started only us; start the N ranks
            what = "processes (gloo): its training stages run data-parallel on all, its other stages on the first" \
                if _drives(args) else "data-parallel processes (gloo)"
            print(f"[{args.command}] accelerate launch --cpu --num_processes {workers}: starting {workers} {what}.",
                  file=sys.stderr)
            return run_workers(workers, argv)
    from types import SimpleNamespace

    from .download import default_cache_dir, extra_data_dirs

    # The paths an OSError may be the user's about: the flags, the datasets' cache and $SARCASM_DPO_DATA_DIRS
    # (run_command and the pipeline add every setting once they are built).
    note_paths(args, SimpleNamespace(data_dir=[str(default_cache_dir()), *map(str, extra_data_dirs())]), reset=True)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        run_command(args)
    except UserError as exc:
        if is_main_process():  # every process meets the same bad input; one message is enough
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if is_main_process():  # on a line of its own: a progress bar may be mid-line
            print("\n" + interrupt_message(args, argv, exc), file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
    except BrokenPipeError:  # `sarcasm-dpo predict ... | head -1`: the reader left; stop quietly, as Unix tools do
        _silence_stdout()
        return 128 + signal.SIGPIPE
    except Exception as exc:  # noqa: BLE001 - the one boundary: the user's machine or files, or a bug
        message = describe_failure(exc, user_paths=note_paths())
        if message is None:  # a bug: keep the traceback visible, and say where it belongs
            import traceback

            traceback.print_exc()
            print(f"\nThis looks like a bug in sarcasm-dpo {__version__}; please report it with the command and the "
                  "traceback above.", file=sys.stderr)
            return 1
        if is_main_process():
            print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def entry_point() -> None:
    route_warnings_clear_of_bars()
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C while the command was still starting (imports, flags): nothing ran yet
        print("\nInterrupted by SIGINT while starting, before any work: nothing was written.", file=sys.stderr)
        code = 128 + signal.SIGINT
    try:  # the last lines may still sit in the buffer when the reader of a pipe has gone
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        code = 128 + signal.SIGPIPE
    sys.exit(code)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    entry_point()

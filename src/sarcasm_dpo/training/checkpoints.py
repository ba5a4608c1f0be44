"""A training stage's output folder and its checkpoints: the folder's life, --resume, the saved adapter.

- `plan_run_dir()` / `claim_run_dir()` / `final_outputs()`: the output folder is checked read-only
  first, taken over only when every check passed, replaced whole by the staged outputs (their
  completion marker written last) and then freed of its checkpoints; `finished_record()` and
  `interrupted_run()` tell a finished run from a stopped one.
- `latest_checkpoint()` and `save/load_checkpoint_state()`: the Trainer's checkpoints in
  OUTPUT_DIR/checkpoints/, with the stage's own state beside each (written last, so its presence
  marks the checkpoint complete); --resume continues from the newest complete one, once
  `check_checkpoint()` has read back every file the resume loads (a damaged one is a UserError naming it,
  the checkpoint before it and how to start over, before anything is loaded or written).
- `save_adapter()`: the trained adapter and tokenizer, moved into place file by file.

    sarcasm-dpo sft --output_dir models/sft --resume --no_wandb   # continue an interrupted run
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError, describe_failure
from .distributed import barrier, is_main_process

CHECKPOINTS = "checkpoints"  # in the output folder
RUN_CONFIG = "run_config.json"  # in checkpoints/: whose checkpoints these are
RUN_INPUTS = "run_inputs.json"  # in checkpoints/: the checksums of the data and adapter they were trained from
BEST_FILE = "validation_best_adapter.safetensors"  # in each checkpoint: the best adapter so far
TRAINER_STATE = "trainer_state.json"  # in each checkpoint: the Trainer's step, epoch and log history
# Settings that may change between an interrupted run and its --resume without changing the math.
RESUME_NEUTRAL = ("device", "eval_batch_size", "logging_steps", "save_steps", "auto_find_batch_size",
                  "gradient_checkpointing", "diagnostics_steps")


def complete_checkpoints(ckpt_dir: Path, state_file: str) -> list[Path]:
    """The checkpoints whose save finished (the stage's `state_file` is written after the Trainer's), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for folder in ckpt_dir.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if match and (folder / TRAINER_STATE).is_file() and (folder / state_file).is_file():
            found.append((int(match.group(1)), folder))
    return [folder for _, folder in sorted(found)]


def latest_checkpoint(ckpt_dir: Path, state_file: str) -> Path | None:
    """The newest checkpoint whose save finished: the one --resume continues from."""
    found = complete_checkpoints(ckpt_dir, state_file)
    return found[-1] if found else None


def finished_record(out: Path, config, summary_file: str, inputs: dict | None = None) -> dict | None:
    """The completion record of `out` when it holds the finished run of these settings (a settings
    dataclass or dict, compared by atomic.settings_differences) and of these `inputs` (checksums of the
    data and adapter read, by atomic.input_differences), else None."""
    from ..atomic import DamagedRecord, input_differences, missing_outputs, read_complete, read_json, settings_differences

    record = read_complete(out)
    if record and not settings_differences(record, config) and not input_differences(record, inputs) \
            and (out / summary_file).is_file() and not missing_outputs(out) \
            and not interrupted_run(out):  # a newer run stopped: not this record's
        try:  # what --resume of a finished run returns, and a beta sweep reuses: it must read back
            read_json(out / summary_file, expect=dict)
        except DamagedRecord as exc:
            if is_main_process():
                print(f"Note: {exc.path} is damaged: {exc.problem}; the run in {out} counts as unfinished.")
            return None
        return record
    return None


def plan_run_dir(out: Path, s, *, finished: bool, state_file: str, inputs: dict | None = None) -> Path | None:
    """Read-only: may this run use the output folder, and which checkpoint does it continue from?

    A folder with another run's results (other settings, or other `inputs`: checksums of the data and
    adapter it read) is refused unless --overwrite (check_output_dir). Old checkpoints are never
    silently reused nor silently thrown away: without --resume they are an error, unless --overwrite
    says to start over; checkpoints trained from other settings or other data cannot be resumed.
    Nothing is changed here (see claim_run_dir).
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
    check_output_dir(out, s, overwrite=s.overwrite, resume=resume_from is not None, inputs=inputs)
    if resume_from is not None:
        run_config = ckpt_dir / RUN_CONFIG
        fix = (f"It records the settings the checkpoints in {ckpt_dir} were made with; without it they cannot be "
               f"checked against this run's. {START_OVER.format(ckpt_dir=ckpt_dir)}")
        had = read_json(run_config, fix, expect=dict) if run_config.is_file() else {}
        diff = settings_differences({"config": had}, s, ignore_keys=RESUME_NEUTRAL)
        diff += checkpoint_input_differences(out, inputs)
        if diff:
            raise UserError(f"The checkpoints in {ckpt_dir} were made with other settings or data (differ in: "
                            f"{', '.join(diff)}). Resume with the same settings, or pass --overwrite "
                            "without --resume to start over.")
        check_checkpoint(resume_from, state_file)
    return resume_from


def checkpoint_input_differences(out: Path, inputs: dict | None) -> list[str]:
    """The inputs (data files, adapter: by checksum) in which this run differs from what the checkpoints in
    `out` were trained from. Checkpoints of a version that did not record them are compared on settings only."""
    from ..atomic import DamagedRecord, input_differences, read_json

    recorded = out / CHECKPOINTS / RUN_INPUTS
    if inputs is None or not recorded.is_file():
        return []
    try:
        had = read_json(recorded, expect=dict)
    except DamagedRecord:
        return [f"input record {recorded.name} (unreadable)"]
    return input_differences({"inputs": had}, inputs)


def claim_run_dir(out: Path, s, resume_from: Path | None, inputs: dict | None = None) -> None:
    """Take the folder over once every check passed: stale checkpoints gone, the settings recorded beside
    the checkpoints. The previous run's files and COMPLETE.json stay until this run's outputs start to
    land (save_adapter clears the marker), so a run that fails while training (out of memory, a full
    disk, a diverging loss) leaves them whole; `interrupted_run()` tells the pipeline a newer run was
    stopped there. Call it on every process once the trainer exists (it sets up the process group);
    only the main process writes, and all wait until it has."""
    from ..atomic import check_output_dir, settings_and_defaults, write_json

    barrier()
    if is_main_process():
        ckpt_dir = out / CHECKPOINTS
        if s.resume and resume_from is None:
            print(f"--resume: no complete checkpoint in {ckpt_dir}; starting from the beginning.")
        check_output_dir(out, s, overwrite=s.overwrite, resume=resume_from is not None, inputs=inputs)
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            print(f"Resuming from {resume_from}.")
        elif ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # --overwrite, or leftovers with no complete checkpoint to resume from
        write_json(ckpt_dir / RUN_CONFIG, settings_and_defaults(s)[0])
        if inputs is not None:
            write_json(ckpt_dir / RUN_INPUTS, inputs)
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


# How to get past a damaged checkpoint: the rule every message about one gives.
START_OVER = ("To start over, run without --resume and with --overwrite, or remove {ckpt_dir} (a pipeline then runs "
              "the stage from the beginning). Nothing was changed.")


def damaged_checkpoint_fix(folder: Path, state_file: str) -> str:
    """What to do about a damaged checkpoint `folder`: resume from the complete one before it, or start over."""
    ckpt_dir = folder.parent
    earlier = [f for f in complete_checkpoints(ckpt_dir, state_file) if f != folder]
    back = (f"To resume from the checkpoint before it ({earlier[-1].name}), remove {folder} and run again with the "
            "same command" if earlier else f"No complete checkpoint comes before it in {ckpt_dir}")
    return f"The checkpoint {folder.name} cannot be resumed from. {back}. {START_OVER.format(ckpt_dir=ckpt_dir)}"


def check_checkpoint(folder: Path, state_file: str) -> None:
    """Read-only, before anything is loaded or written: read back every file a resume from `folder` loads (the
    JSON records, the adapter and best-adapter weights, the optimizer, scheduler and RNG states) the way the
    Trainer and the stage load them. A damaged one (cut short, overwritten, edited) is a UserError naming it,
    instead of a traceback from deep inside the Trainer after the model was loaded. Other files (training_args.bin,
    which a resume never reads; the tokenizer, which the stage loads from --model) are not read."""
    import torch
    from safetensors.torch import load_file
    from transformers.trainer_pt_utils import safe_globals

    from ..atomic import DamagedRecord, read_json

    fix = damaged_checkpoint_fix(folder, state_file)
    for path in sorted(folder.iterdir()):
        try:
            if path.name in (TRAINER_STATE, state_file):
                read_json(path, fix, expect=dict)
            elif path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix in (".pt", ".pth"):  # optimizer.pt, scheduler.pt, scaler.pt, rng_state*.pth
                with safe_globals():  # the numpy types in the RNG state, as the Trainer allows them
                    torch.load(path, map_location="cpu", weights_only=True)
        except DamagedRecord:
            raise
        except Exception as exc:  # noqa: BLE001 - torch and safetensors fail on damaged bytes in many ways
            if isinstance(exc, OSError) and describe_failure(exc) is not None:
                raise  # the machine's failure (a full disk, no permission): errors.describe_failure says so
            # Their first sentence says what was wrong with the bytes; the rest is advice about trusting the file.
            reason = re.split(r"(?<=\.)\s", (str(exc).strip().splitlines() or [""])[0])[0][:160]
            raise UserError(f"{path} is damaged: it does not load ({type(exc).__name__}"
                            f"{': ' + reason.rstrip('.') if reason else ''}). {fix}") from None


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
    state = read_json(folder / state_file, damaged_checkpoint_fix(folder, state_file), expect=dict)
    return state, (load_file(str(best)) if best.is_file() else None)


@contextlib.contextmanager
def final_outputs(out: Path, main: bool) -> Iterator[Path]:
    """The folder a training stage writes its final outputs into: on the main process a staging folder
    beside `out` that replaces it whole when the block succeeds (rundir.staged), so a kill or a full
    disk during the save leaves the previous outputs or the new ones, never a mix. The run's
    checkpoints (carried into the new folder by the swap) go only after it: a run killed before the
    swap can still --resume from them. Other processes get `out` and write nothing."""
    if not main:
        yield out
        return
    from ..rundir import staged

    with staged(out) as stage:
        yield stage
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


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


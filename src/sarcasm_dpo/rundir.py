"""Who may write an output folder, and how a finished one is replaced without ever being half-gone.

- `lock_outputs(paths, command)`: an exclusive lock per output folder (or per mined-pairs file),
  taken by the CLI before anything is written and released on exit. The lock is a file beside the
  output, `.NAME.lock`, held with flock(2), so the kernel releases it when its process dies; it
  records pid, host and command, so a second run into a busy folder exits 2 naming the running one,
  and a lock left by a dead process is taken over with one line.
- `staged(out)`: a stage writes its whole output into a staging folder beside `out`; only when
  every file (COMPLETE.json last) is there does it swap the two (two renames). Until then the
  previous run's files and marker stay as they were, whatever goes wrong (a full disk, a crash).
- `tidy(out)`: under the lock, before a stage claims `out`: finish or undo a swap a kill cut in
  half, and remove the staging folders and `.tmp-*` files killed runs left behind.

    sarcasm-dpo compare --output_dir results & sarcasm-dpo compare --output_dir results   # the second exits 2
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator

from .atomic import _umask, file_sha256
from .errors import SPACE_ERRORS, UserError, describe_failure, paths_named

STAGING = ".staging-"  # .staging-NAME-XXXX beside the output: a run's outputs before the swap
OLD = ".old-"  # .old-NAME-XXXX: the previous outputs during the swap (two renames)

_held: dict[str, int] = {}  # lock file -> descriptor, for the locks this process holds
_made: dict[str, list[Path]] = {}  # lock file -> the folders taking it created, deepest first


def real_output(out: str | os.PathLike) -> Path:
    """Where an output really is, as `staged` swaps it: a link and its target are one output (one lock). A
    link to nothing stays itself (the stage refuses it; resolving it would create folders for its target)."""
    path = os.path.abspath(os.path.expanduser(str(out)))
    return Path(os.path.realpath(path) if os.path.exists(path) else path)


def lock_path(out: str | os.PathLike) -> Path:
    out = real_output(out)
    return out.parent / f".{out.name}.lock"


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def acquire(out: str | os.PathLike, command: str) -> Path | None:
    """Take the lock of `out` for this process (a no-op if it already holds it); UserError if another run has it."""
    path = lock_path(out)
    if str(path) in _held:
        return None
    for folder in [path.parent, *path.parent.parents]:  # the nearest existing folder above must be a folder
        if folder.is_symlink() and not folder.exists():
            raise UserError(f"Cannot write the output {out}: {folder} is a symbolic link to {os.readlink(folder)}, "
                            "which does not exist. Create what it points to, or choose another output path.")
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"Cannot write the output {out}: {folder} is a file, not a folder. Choose another "
                                "output path.")
            break
    made = []  # so a run refused before it wrote anything leaves no empty folders behind (release)
    for folder in [path.parent, *path.parent.parents]:
        if folder.exists() or folder.is_symlink():
            break
        made.append(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
                       f"{holder.get('command', '?')}") if holder else "a process that is still starting"
                raise UserError(f"{out} is in use by another run ({who}). Two runs into one output would overwrite "
                                "each other's files; wait for that run to finish, or choose another output path.") from None
            try:  # the holder before us may have removed the file between our open and our lock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _holder(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
    except OSError as exc:
        raise UserError(f"Cannot write the output {out}: {describe_failure(exc) or exc}") from None
    if stale.get("pid") is not None:
        alive = stale.get("host") == socket.gethostname() and _pid_alive(stale["pid"])
        print(f"Note: taking over the lock {path} left by pid {stale.get('pid')} on {stale.get('host')} "
              f"({stale.get('command', '?')}), which {'released it' if alive else 'is no longer running'}.",
              file=sys.stderr)
    _held[str(path)] = fd
    _made[str(path)] = made
    return path


def release(path: Path | None) -> None:
    """Give a lock back: the file goes (a clean exit leaves nothing behind), then the lock itself."""
    if path is None or str(path) not in _held:
        return
    fd = _held.pop(str(path))
    try:
        path.unlink(missing_ok=True)
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)  # closing releases the flock
    for folder in _made.pop(str(path), []):  # those the lock created, if nothing else came into them
        try:
            folder.rmdir()
        except OSError:
            break  # not empty: the run's outputs (or another run's) are in it


@contextlib.contextmanager
def lock_outputs(outputs: Iterable[str | os.PathLike], command: str) -> Iterator[None]:
    """Hold the locks of every output in `outputs` for the duration of the block."""
    taken: list[Path | None] = []
    try:
        for out in dict.fromkeys(str(o) for o in outputs if o):
            taken.append(acquire(out, command))
        yield
    finally:
        for path in reversed(taken):
            release(path)


# -- staging and swap ---------------------------------------------------------------------------------


class FileOutput(str):
    """An output that is one file (mine's pairs file), not a folder: `tidy` treats the two differently."""


class RecordedBase(str):
    """An input no setting names: the base model an adapter's run record names (`adapter`), which a run given
    that adapter loads. A message about it says where it comes from, as the user never typed it."""

    adapter: str

    def __new__(cls, path: str, adapter: str) -> "RecordedBase":
        made = super().__new__(cls, path)
        made.adapter = adapter
        return made

    def why(self) -> str:
        return f" (the base model that {self.adapter} records as the one it was trained on)"


def refuse_outputs_over_inputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str]) -> None:
    """Refuse a run whose output would replace one of its own inputs, --overwrite or not.

    An output folder replaces the files directly in it when the run ends (`swap_in`; the folders
    inside are carried over), so an input that is the folder itself or a file in it would be gone;
    a file output replaces the file of its name, and the files written beside it (mine's summary and
    record folder), so one inside an input folder (a model's config.json) would replace that input's
    files. `inputs`: the paths the run's input settings name, and the bases their adapters record
    (`input_paths`)."""
    real: dict[str, str] = {}  # real path -> why it is an input, said where no setting names it
    for p in inputs:
        if isinstance(p, RecordedBase):
            real.setdefault(os.path.realpath(p), p.why())
        else:
            real[os.path.realpath(p)] = ""  # a path a setting names: the user knows why it is read
    for out in (o for o in outputs if o):
        real_out = Path(os.path.realpath(out))
        for path, why in sorted(real.items()):
            if Path(path) == real_out:
                raise UserError(f"{out} is both an input{why} and an output of this run: writing its results there "
                                "would replace what it reads (--overwrite or not). Choose another output path.")
            if isinstance(out, FileOutput):
                if Path(path).is_dir() and Path(path) in real_out.parents:
                    raise UserError(f"The output file {out} lies inside {path}, which this run reads{why}: writing it "
                                    "(and the files written beside it) there would replace or add to that input's "
                                    "files (--overwrite or not). Choose an output file outside it.")
                continue
            try:
                first = real_out / Path(path).relative_to(real_out).parts[0]
            except ValueError:
                continue  # not inside this output
            if not first.is_dir() or first.is_symlink():
                raise UserError(f"The output folder {out} holds {path}, which this run reads{why}: writing its "
                                "results there would replace it (--overwrite or not). Choose another output folder.")


def input_paths(settings) -> list[str]:
    """The paths a stage's settings name, but for its outputs (settings called output_*), and the local base model
    each adapter among them records: a stage given an adapter loads the base it was trained on, though no setting
    names it (compare, dpo, mine, export without --model/--base_model). Given another base, the recorded one still
    counts: replacing it would leave the adapter without the model it belongs to."""
    named = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if not f.name.startswith("output_")}
    paths = paths_named(SimpleNamespace(**named))
    return list(dict.fromkeys([*paths, *recorded_base_models(paths)]))


def recorded_base_models(paths: Iterable[str]) -> list[RecordedBase]:
    """The local base models the adapter folders among `paths` record (models.adapter_base_model), as absolute
    and real paths. An adapter whose records do not read is passed over: the stage that reads it names what
    is wrong when it starts, and refusing here would hide that message behind this one's."""
    from .models import adapter_base_model

    out = []
    for path in paths:
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            continue  # not an adapter folder (a data file, a split folder, a model, a hub id)
        try:
            base = os.path.expanduser(adapter_base_model(path))
        except (UserError, OSError, ValueError):
            continue
        if os.path.exists(base):  # a hub id, or a path no longer there, is nothing a run could write over
            base = os.path.abspath(base)
            out += [RecordedBase(base, path), RecordedBase(os.path.realpath(base), path)]
    return out


@contextlib.contextmanager
def claim_outputs(outputs: Iterable[str | os.PathLike], command: str, main_process: bool = True) -> Iterator[None]:
    """The CLI's one gate before a stage runs: lock every output, then clean up after killed runs of it.
    Only the main process of a distributed run locks; the others write nothing."""
    outputs = [o for o in outputs if o] if main_process else []
    with lock_outputs(outputs, command):
        for out in outputs:
            tidy(out, is_file=isinstance(out, FileOutput))
        yield


def _leftovers(parent: Path, pattern: str) -> list[Path]:
    """Entries of `parent` whose whole name matches `pattern` (never another output's: names are exact)."""
    import re

    rule = re.compile(pattern)
    return sorted(p for p in parent.iterdir() if rule.fullmatch(p.name))


def tidy(out: str | os.PathLike, is_file: bool = False) -> None:
    """Clean up after killed runs of `out` (call it with the lock held, before checking the folder).

    A swap cut between its two renames is finished when the staged outputs are complete, undone
    otherwise; then leftover staging folders, old copies and `.tmp-*` files are removed."""
    import re

    from .atomic import COMPLETE_MARKER

    out = real_output(out)
    parent = out.parent
    if not parent.is_dir():
        return
    name = re.escape(out.name)
    if is_file:  # a file output (mined pairs): only its own atomic-write leftovers beside it
        for leftover in _leftovers(parent, rf"\.tmp-{name}\..+"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
        return
    staged_dirs = _leftovers(parent, rf"{re.escape(STAGING)}{name}-[A-Za-z0-9_]{{8}}")  # mkdtemp's suffix
    old_dirs = _leftovers(parent, rf"{re.escape(OLD)}{name}-\d+-\d+")  # swap_in's pid and time
    if not out.exists() and not out.is_symlink():
        done = [d for d in staged_dirs if (d / COMPLETE_MARKER).is_file()]
        if done:
            os.rename(done[-1], out)
            print(f"Note: finished the replacement of {out} that a stopped run had begun.", file=sys.stderr)
        elif old_dirs:
            os.rename(old_dirs[-1], out)
            print(f"Note: restored the previous {out}, which a stopped run was replacing.", file=sys.stderr)
    for folder in [*staged_dirs, *old_dirs]:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
    # Only in a folder that holds a run of ours (finished, or with checkpoints): a folder someone else
    # filled is refused by the stage, and must be left exactly as it was.
    if out.is_dir() and ((out / COMPLETE_MARKER).exists() or (out / "checkpoints").is_dir()):
        for leftover in out.glob(".tmp-*"):  # atomic writes and adapter saves of killed runs
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(out: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder beside `out` to write every output into; it replaces `out` when the block succeeds."""
    out = Path(os.path.realpath(out))  # a link to a folder: replace what it points to, not the link
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING}{out.name}-", dir=out.parent))
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it owner-only; outputs get the usual permissions
    try:
        try:
            yield stage
        except OSError as exc:
            if exc.errno in SPACE_ERRORS and getattr(exc, "bytes_staged", None) is None:
                exc.bytes_staged = _size_of(stage)  # the disk filled: the CLI's message says how much was written
            raise
        swap_in(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _size_of(folder: Path) -> int:
    """Bytes of the files below `folder` (what a stage had written before it stopped)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def swap_in(stage: Path, out: Path) -> None:
    """Put the complete `stage` where `out` is: out -> .old-*, stage -> out, then the old copy goes.

    A kill between the two renames leaves no `out`; `tidy()` then finishes the swap (the staged
    copy is complete: its marker is written before the swap) on the next run."""
    _carry_over(out, stage)
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f"{OLD}{out.name}-{os.getpid()}-{time.time_ns()}"
        os.rename(out, old)
    os.rename(stage, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _carry_over(out: Path, stage: Path) -> None:
    """Move into `stage` what `out` holds beside this stage's own files: other outputs nested in it (folders,
    e.g. results/smollm2 inside results) and hidden entries (their locks, staging folders), so that the swap
    replaces this stage's files and never deletes another run's. Refused, before anything moves, while one of
    those nested outputs is locked by a running process. Top-level files this run did not write (an older
    run's extra files, or what --overwrite was given for) are replaced with the folder."""
    if not out.is_dir() or out.is_symlink():
        return
    carried = [entry for entry in out.iterdir()
               if not (stage / entry.name).exists() and not entry.name.startswith(".tmp-")
               and (entry.is_dir() or entry.name.startswith("."))]
    for entry in carried:
        if entry.name.endswith(".lock") and entry.is_file() and _locked(entry):
            raise UserError(f"{out} holds another output that a running process is writing ({entry.name}); "
                            f"replacing {out} now would pull it from under that run. This run's results were not "
                            f"written: run it again when that one has finished, or choose another output folder.")
    for entry in carried:
        os.rename(entry, stage / entry.name)


def _locked(path: Path) -> bool:
    """Does a live process hold this lock file's flock?"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the flock we may have taken
    return False


def input_identity(inputs: dict[str, str | os.PathLike | None]) -> dict[str, str]:
    """{name: sha256} of a run's input files, and of adapter folders (their weights and config), so a
    finished output made from other data or another adapter is never taken for this run's."""
    import hashlib

    out = {}
    for name, path in inputs.items():
        if not path or not Path(path).exists():
            continue
        path = Path(path)
        if path.is_dir():
            digest = hashlib.sha256()
            for part in ("adapter_config.json", "adapter_model.safetensors"):
                if (path / part).is_file():
                    digest.update(f"{part}:{file_sha256(path / part)}\n".encode())
            out[name] = digest.hexdigest()
        else:
            out[name] = file_sha256(path)
    return out

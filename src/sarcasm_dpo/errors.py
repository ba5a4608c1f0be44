"""The one exception type a user should ever see.

Anything raised as UserError is a problem with the input or the settings: the CLI prints its
message as one paragraph and exits with code 2, without a traceback. Everything else is a bug.
"""


class UserError(Exception):
    """Bad input or bad settings; the message says what was found and what to do."""

    exit_code = 2


# -- the CLI's error boundary ----------------------------------------------------------------------
# Failures of the machine or of the files a user pointed at (a full disk, a read-only folder, a
# truncated download) are not bugs: the CLI turns them into one paragraph and exit code 2 here, in
# one place, whichever stage met them. Anything not recognised keeps its traceback (cli.py).
#
# Whose is an OSError? The machine's when its errno says so whatever the path (a full disk, a quota,
# a read-only file system, permission denied, an I/O error): always one paragraph. A path that is not
# there, already there, a folder or not a folder, or not permitted (PATH_ERRORS) may be the user's
# (a typo in a flag) or ours (our code opening a file that should exist): it is the user's only when
# the path is one the run's settings name, or lies inside or beside one (an output's staging folder,
# lock and temporary files); any other keeps its traceback, with the line asking to report it. The
# CLI passes the settings' paths (`note_paths`); without them (None) every path counts as the user's.

import errno as _errno  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

# errno -> what it means for the person at the keyboard, and what to do about it.
_OS_ERRORS = {
    _errno.ENOSPC: ("there is no space left on the device", "free some space or choose an output folder on "
                    "another disk, then run the same command again"),
    _errno.EDQUOT: ("the disk quota is exceeded", "free some space or choose another output folder"),
    _errno.EFBIG: ("the file grew past the size this process may write (ulimit -f)", "raise the limit or write "
                   "somewhere else"),
    _errno.EACCES: ("permission was denied", "check the permissions of the path, or choose another one"),
    _errno.EPERM: ("the operation is not permitted", "check the permissions of the path, or choose another one"),
    _errno.EROFS: ("it is on a read-only file system", "choose a writable location"),
    _errno.ENAMETOOLONG: ("the name is too long for the file system", "choose a shorter path"),
    _errno.ELOOP: ("it is a loop of symbolic links", "fix the link, or give the real path"),
    _errno.ENOTDIR: ("a part of the path that should be a folder is a file", "fix the path"),
    _errno.EISDIR: ("it is a folder where a file was expected", "give a file"),
    _errno.ENOENT: ("it does not exist (or is a link to nothing)", "fix the path"),
    _errno.EEXIST: ("something is already there (a file, or a link to nothing)", "remove it or choose another path"),
    _errno.EIO: ("the device reported an input/output error", "check the disk or the network file system"),
    _errno.EMFILE: ("too many files are open", "raise the limit (ulimit -n)"),
    _errno.ENXIO: ("no device or reader is behind it", "give a regular file"),
}


# errnos about the shape of a path, which our own bugs raise as readily as a user's typo.
PATH_ERRORS = (_errno.ENOENT, _errno.EEXIST, _errno.EISDIR, _errno.ENOTDIR, _errno.EPERM)
SPACE_ERRORS = (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG)


# Settings (and predict's flags) that hold paths: output_dir, train_csv, sft_model, input, config, ...
_PATH_SETTING = re.compile(r".*(dir|file|csv|model|adapter|input|data|results|config|extra_test)")


def is_path_setting(name: str) -> bool:
    """Does a setting of this name hold a path (or paths)? The one rule, by name."""
    return bool(_PATH_SETTING.fullmatch(name))


def paths_named(*sources) -> list[str]:
    """The paths the path settings of a run name (from settings dataclasses or argparse namespaces): as
    absolute paths, and as real paths where links lead elsewhere; NAME=PATH items (--extra_test) by their path."""
    import dataclasses

    values: list = []
    for source in sources:
        items = ({f.name: getattr(source, f.name) for f in dataclasses.fields(source)}
                 if dataclasses.is_dataclass(source) else vars(source) if source is not None else {})
        values += [v for name, v in items.items() if is_path_setting(name)]
    out = []
    for value in values:
        for text in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(text, (str, os.PathLike)) or not str(text).strip():
                continue
            name, sep, item = str(text).partition("=")
            for one in [str(text), *([item] if sep and os.sep not in name else [])]:
                path = os.path.abspath(os.path.expanduser(one))
                out += [path, os.path.realpath(path)]
    return list(dict.fromkeys(out))


_noted: list[str] = []  # the running command's paths: cli.main starts it, the CLI and the pipeline add settings


def note_paths(*sources, reset: bool = False) -> list[str]:
    """Add the paths these settings name to the running command's (`reset`: start anew); returns them all."""
    if reset:
        _noted.clear()
    _noted.extend(p for p in paths_named(*sources) if p not in _noted)
    return list(_noted)


def _users_path(filename, user_paths: list[str]) -> bool:
    """Is `filename` one of `user_paths`, inside one, or beside one with its name in it (.staging-NAME-*,
    .NAME.lock, .tmp-NAME.*, NAME_summary.json)?"""
    name = os.path.abspath(os.path.expanduser(str(filename)))
    for path in user_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if name == path or name.startswith(path.rstrip(os.sep) + os.sep):
            return True
        if stem and os.path.dirname(name) == os.path.dirname(path) and stem in os.path.basename(name):
            return True
    return False


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _space_needed(exc: OSError) -> str:
    """What the write that filled the disk needed, as far as it is known: atomic.write_text notes the size of
    its file (bytes_needed), rundir.staged the outputs staged before it (bytes_staged, a lower bound)."""
    needed, staged = getattr(exc, "bytes_needed", None), getattr(exc, "bytes_staged", None)
    if needed is not None and staged is not None:
        return (f"; the file being written needed {_size(needed)}, on top of the {_size(staged)} of outputs this "
                "run had staged before it")
    if needed is not None:
        return f"; the file being written needed {_size(needed)}"
    if staged is not None:
        return (f"; this run had staged {_size(staged)} of outputs before it, and how much the rest needed is not "
                "known")
    return "; how much space the write needed is not known"


def _free_space(path) -> str:
    """Free space on the file system of `path` (or of the nearest folder above it that exists)."""
    import os
    import shutil

    folder = os.path.abspath(str(path)) if path else os.getcwd()
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" (free there now: {_size(free)})"


def describe_failure(exc: BaseException, user_paths: list[str] | None = None) -> str | None:
    """One paragraph for an environment failure the user can fix, or None for what looks like a bug.

    `user_paths` (from `paths_named`): the paths the run's settings name; a PATH_ERRORS error about any
    other path is a bug. None: no settings to tell by, every path counts as the user's."""
    if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
        what, fix = _OS_ERRORS[exc.errno]
        where = exc.filename if exc.filename is not None else _filename_in_traceback(exc)
        if exc.errno in PATH_ERRORS and user_paths is not None \
                and not any(_users_path(name, user_paths) for name in (where, exc.filename2) if name is not None):
            return None  # not a path the user gave or a folder the run writes: our bug, keep the traceback
        place = f"{where}" + (f" -> {exc.filename2}" if exc.filename2 else "") if where else "a file"
        extra = ""
        if exc.errno in SPACE_ERRORS:
            extra = _free_space(where) + _space_needed(exc)
        return (f"Could not use {place}: {what}{extra} ({exc.strerror or exc}). To fix: {fix}. Files written "
                "before this are whole (each is written atomically); a stage's folder is marked complete only "
                "when all its files are in place.")
    if isinstance(exc, UnicodeDecodeError):
        where = _filename_in_traceback(exc) or "an input"
        return (f"Could not read {where} as UTF-8 text: byte {exc.object[exc.start:exc.start + 1]!r} at position "
                f"{exc.start} is not valid UTF-8 (a binary file, or text in another encoding). Give a UTF-8 text "
                "file (re-save it as UTF-8).")
    import re

    os_error = re.search(r"os error (\d+)", str(exc))  # Rust I/O errors (safetensors, tokenizers) carry the errno
    if os_error and int(os_error.group(1)) in _OS_ERRORS:
        code = int(os_error.group(1))
        return describe_failure(OSError(code, os.strerror(code), _filename_in_traceback(exc)), user_paths)
    if isinstance(exc, RuntimeError) and "inline_container" in str(exc):  # torch.save's zip writer, e.g. a full disk
        where = _filename_in_traceback(exc)
        return (f"Could not write {where or 'a PyTorch file'}: PyTorch's file writer failed "
                f"({str(exc).splitlines()[0][:200]}), which almost always means the disk filled up"
                f"{_free_space(where)}. Free some space or choose an output folder on another disk, then run the same "
                "command again (sft and dpo: with --resume).")
    if type(exc).__name__ == "SafetensorError":
        where = _filename_in_traceback(exc) or "a .safetensors file"
        return (f"Could not read {where}: {str(exc).splitlines()[0] if str(exc) else 'invalid safetensors data'}. "
                "The file is truncated or not a safetensors file (an interrupted copy or download); copy it "
                "again or retrain the adapter.")
    return None


def _filename_in_traceback(exc: BaseException) -> str | None:
    """The innermost file path a failing frame was working on (`path`, `filename`, ... locals), if any.

    Decode and safetensors errors do not carry the file's name; the frames that raised them do."""
    import os
    import re

    found = None
    tb = exc.__traceback__
    while tb is not None:
        for name in ("filename", "path", "file", "fname", "filepath", "weights", "p", "f"):
            value = tb.tb_frame.f_locals.get(name)
            text = str(value) if isinstance(value, (str, os.PathLike)) else ""
            if text and len(text) < 4096 and (isinstance(value, os.PathLike) or os.sep in text
                                               or re.search(r"\.[A-Za-z]\w*$", text)):
                found = text
                break
        tb = tb.tb_next
    return found

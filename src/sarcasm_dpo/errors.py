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
    """Free space on the file system of `path` (or of the nearest folder above it that exists); nothing where
    no path is known (the current folder's free space would be of another disk, as like as not)."""
    room = _disk_room(path)
    return "" if room is None else f" (free there now: {_size(room[0])})"


def _free_space_fd(fd: int | None) -> str:
    """Free space on the file system an open file descriptor writes to, where it is a file or folder on a disk;
    nothing for a pipe, a terminal or a device (/dev/full), whose file system says nothing about their room."""
    import stat

    if fd is None:
        return ""
    try:
        if not (stat.S_ISREG(os.fstat(fd).st_mode) or stat.S_ISDIR(os.fstat(fd).st_mode)):
            return ""
        info = os.fstatvfs(fd)
    except (OSError, ValueError):
        return ""
    return f" (free there now: {_size(info.f_bavail * info.f_frsize)})"


def _file_behind(fd: int | None) -> str | None:
    """The path of the regular file an open descriptor writes to (`> out.jsonl`), where the system says it."""
    import stat

    if fd is None:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        path = os.readlink(f"/proc/self/fd/{fd}")
    except (OSError, ValueError):
        return None
    return path if path.startswith(os.sep) else None


STANDARD_OUTPUT = "standard output"


def stream_failure(exc: OSError, stream: str, fd: int | None, outcome: str) -> OSError:
    """Mark `exc`, met writing a stream no setting names by a path (predict's rows on standard output), so that
    its message names `stream` (and the file behind it, where there is one), the free space of the disk under
    that stream's descriptor `fd` (none for a pipe or a device), and what the run left (`outcome`) instead of the
    words about files written atomically. Returns `exc`, to be raised on."""
    exc.stream, exc.stream_fd, exc.outcome = stream, fd, outcome
    return exc


def describe_failure(exc: BaseException, user_paths: list[str] | None = None) -> str | None:
    """One paragraph for an environment failure the user can fix, or None for what looks like a bug.

    `user_paths` (from `paths_named`): the paths the run's settings name; a PATH_ERRORS error about any
    other path is a bug. None: no settings to tell by, every path counts as the user's."""
    if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
        what, fix = _OS_ERRORS[exc.errno]
        stream = getattr(exc, "stream", None)  # a stream the user pointed somewhere (stream_failure): theirs
        where = exc.filename if exc.filename is not None else stream or _filename_in_traceback(exc, user_paths)
        if exc.errno in PATH_ERRORS and user_paths is not None and not stream \
                and not any(_users_path(name, user_paths) for name in (where, exc.filename2) if name is not None):
            return None  # not a path the user gave or a folder the run writes: our bug, keep the traceback
        place = f"{where}" + (f" -> {exc.filename2}" if exc.filename2 else "") if where else "a file"
        extra = ""
        if stream and exc.filename is None:
            behind = _file_behind(getattr(exc, "stream_fd", None))
            place += f" ({behind})" if behind else ""
        if exc.errno in SPACE_ERRORS:
            space = _free_space_fd(getattr(exc, "stream_fd", None)) if stream else _free_space(where)
            extra = space + _space_needed(exc)
            if stream:
                fix = "free some space where it goes, or send it to another disk, then run the same command again"
        outcome = getattr(exc, "outcome", None) if stream else None
        return (f"Could not use {place}: {what}{extra} ({exc.strerror or exc}). To fix: {fix}. "
                + (outcome or "Files written before this are whole (each is written atomically); a stage's folder "
                               "is marked complete only when all its files are in place."))
    if isinstance(exc, UnicodeDecodeError):
        where = _filename_in_traceback(exc, user_paths) or "an input"
        return (f"Could not read {where} as UTF-8 text: byte {exc.object[exc.start:exc.start + 1]!r} at position "
                f"{exc.start} is not valid UTF-8 (a binary file, or text in another encoding). Give a UTF-8 text "
                "file (re-save it as UTF-8).")
    import re

    os_error = re.search(r"os error (\d+)", str(exc))  # Rust I/O errors (safetensors, tokenizers) carry the errno
    if os_error and int(os_error.group(1)) in _OS_ERRORS:
        code = int(os_error.group(1))
        return describe_failure(OSError(code, os.strerror(code), _filename_in_traceback(exc, user_paths)), user_paths)
    if torch_write_failure(exc):
        return _torch_write_message(exc, _filename_in_traceback(exc, user_paths))
    if type(exc).__name__ == "SafetensorError":
        where = _filename_in_traceback(exc, user_paths) or "a .safetensors file"
        return (f"Could not read {where}: {str(exc).splitlines()[0] if str(exc) else 'invalid safetensors data'}. "
                "The file is truncated or not a safetensors file (an interrupted copy or download); copy it "
                "again or retrain the adapter.")
    return None


# What torch.save's writer (caffe2/serialize/inline_container.cc, PyTorchStreamWriter) raises when a write fails:
# it says neither the errno nor the file. "PytorchStreamWriter failed writing file data/7: file write failed",
# "... failed writing central directory ...", "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs
# 598" (older versions), and "basic_ios::clear: iostream error" (torch 2.x's file stream, e.g. on a full disk).
_TORCH_WRITER_WORDS = ("PytorchStreamWriter failed", "file write failed", "unexpected pos ")
_STREAM_WORDS = ("basic_ios::clear", "iostream error")


def torch_write_failure(exc: BaseException) -> bool:
    """Is `exc` torch.save's file writer failing (a full disk, a quota, an I/O error), not a bug?"""
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    if "PytorchStreamReader" in text:  # reading a file, not writing one
        return False
    if any(words in text for words in _TORCH_WRITER_WORDS) or "inline_container" in text:
        return True
    # The C++ stream's own words name no library: torch's only when torch's serializer was writing.
    return any(words in text for words in _STREAM_WORDS) and _in_torch_serialization(exc)


def _in_torch_serialization(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if name.endswith("torch/serialization.py"):
            return True
        tb = tb.tb_next
    return False


def _disk_room(path) -> tuple[int, int] | None:
    """(free, total) bytes on the file system of `path` (or of the nearest folder above it that exists)."""
    import shutil

    if not path:
        return None
    folder = os.path.abspath(str(path))
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    try:
        usage = shutil.disk_usage(folder)
    except (OSError, ValueError):
        return None
    return usage.free, usage.total


LOW_SPACE = 64 << 20  # below this (or 1% of the disk), a failed write is taken for a full disk


def _torch_write_message(exc: BaseException, where: str | None) -> str:
    """torch.save's failure in one paragraph. Its writer keeps the errno to itself, so the disk under the file
    tells a full disk (nearly no room left) from the other causes (a quota, a size limit, the disk's errors)."""
    said = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    room = _disk_room(where)
    if room is None:
        why = "which almost always means the disk filled up"
    elif room[0] < max(LOW_SPACE, room[1] // 100):
        why = f"because the disk it is on is full (free there now: {_size(room[0])})"
    else:
        why = (f"and the disk it is on has room now (free there now: {_size(room[0])}), so the cause is not a full "
               "disk unless space was freed since: a disk quota, a file-size limit (ulimit -f) or the disk's own "
               "errors stop a write as well")
    return (f"Could not write {where or 'a PyTorch file'}: PyTorch's file writer failed ({said}), {why}. Free some "
            "space (or lift the limit) or choose an output folder on another disk, then run the same command again "
            "(sft and dpo: with --resume).")


# Frame locals that hold the file a frame works on, by name: these first, then any whose name says file or path
# (tokenizers' `tokenizer_file`, `save_path`, `output_file`), then any path under the run's own paths.
_PATH_LOCALS = ("filename", "path", "file", "fname", "filepath", "weights", "p", "f")
_PATH_LIKE_NAME = re.compile(r"(?:^|_)(?:file|filename|fname|path|filepath|file_path|file_name)$")


def _path_text(value) -> str | None:
    """`value` as a path, if it looks like one (a PathLike, or text with a folder separator or a file suffix)."""
    text = str(value) if isinstance(value, (str, os.PathLike)) else ""
    if text and len(text) < 4096 and "\0" not in text and (isinstance(value, os.PathLike) or os.sep in text
                                                             or re.search(r"\.[A-Za-z]\w*$", text)):
        return text
    return None


def _path_in_frame(names: dict, user_paths: list[str] | None) -> str | None:
    for name in _PATH_LOCALS:
        text = _path_text(names.get(name))
        if text:
            return text
    for name, value in names.items():
        text = _PATH_LIKE_NAME.search(name) and _path_text(value)
        if text:
            return text
    if user_paths:  # a path under the output folder or an input, whatever the frame called it; a file before a folder
        found = [text for text in map(_path_text, names.values()) if text and _users_path(text, user_paths)]
        found.sort(key=lambda text: (os.path.isdir(text), -len(text)))  # a file in a folder before the folder
        if found:
            return found[0]
    return None


def _filename_in_traceback(exc: BaseException, user_paths: list[str] | None = None) -> str | None:
    """The innermost file path a failing frame was working on (`path`, `filename`, `tokenizer_file`, ... locals,
    or any local holding a path under `user_paths`), if any.

    Decode, safetensors, tokenizers and torch errors do not carry the file's name; the frames that raised them do."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        try:
            names = dict(tb.tb_frame.f_locals)
        except Exception:  # noqa: BLE001 - a frame whose locals cannot be read names nothing
            names = {}
        found = _path_in_frame(names, user_paths) or found
        tb = tb.tb_next
    return found
